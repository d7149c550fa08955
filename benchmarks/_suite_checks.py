"""The GPU suite's correctness parts: each runs one path of pycoe on the suite's device and compares it with its
reference (eager against compiled, the device against the CPU, pycoe against timm or a plain autograd formula).

Where two computations round differently (TF32 convolutions, bfloat16, another algorithm), a discrete decision
(which expert, whether to exit, the balanced assignment) can flip at a near-tie: such a flip is accepted when the
reference's own scores show the tie, and the continuous results are then compared where the decisions agree.
"""

from __future__ import annotations

import copy

import torch
from _common import markdown_table
from _suite_models import (
    MIXTURE_STRATEGIES,
    PWLU,
    BalancedTransportWeighter,
    CondConv2d,
    Context,
    LabelGenerator,
    Outcome,
    autocast,
    balanced_assignment,
    calibrate_exit_threshold,
    count_syncs,
    eval_coe,
    export,
    pwlu,
    rel_err,
    solve_balanced_transport,
    training_setup,
)
from bench_condconv import SHAPES as CONDCONV_SHAPES
from bench_pwlu import make_params, pwlu_gather


def _tolerance(ctx: Context, bf16: bool = False) -> float:
    """Relative tolerance of a comparison on the suite's device: bfloat16, TF32 (torch's default for cuDNN
    convolutions on a GPU) or plain float32."""
    if bf16:
        return 5e-2
    if ctx.cuda and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return 5e-3
    return 1e-4


# ---------------------------------------------------------------------------------------------- training step
def _step(model, criterion, x, y):
    out = model(x)
    loss, info = criterion(out, y)
    return loss, info, out.selection_logits.detach()


def _flips(criterion, sel, csel, losses, closs) -> dict[str, int]:
    """How many WGM assignments and LGM labels differ between the eager and the compiled step, recomputed from
    each step's inputs to them (the selection logits, the per-sample losses; both modules are deterministic
    functions of those). A flip is rounding at a near-tie exactly when those inputs agree within tolerance: the
    optimum of slightly moved numbers may move to an almost-as-good neighbour."""
    wgm, lgm = criterion.weighter, criterion.labeler
    a, ca = wgm(sel.float()).assignment, wgm(csel.float()).assignment
    return {
        "wgm_flips": int((a != ca).sum()),
        "lgm_flips": int((lgm(losses).index != lgm(closs).index).sum()),
    }


def training_step(ctx: Context, bf16: bool = False) -> Outcome:
    """A CoE training step (WGM with the exact solver, LGM) eagerly and ``torch.compile(fullgraph=True)``: loss,
    info and the gradients within tolerance; the host synchronisations of each counted on CUDA.

    Where rounding flipped a WGM assignment or an LGM label at a near-tie, the numbers those decisions drive
    (the expert and selection losses, the metrics, the gradients) legitimately differ: then only the decisions'
    inputs (selection logits, per-sample losses) and the rough loss are compared, and the flips are reported."""
    s, tol = ctx.sizes, _tolerance(ctx, bf16)
    model, criterion = training_setup(ctx)
    twin = copy.deepcopy(model)
    x = torch.randn(s.batch, 3, s.resolution, s.resolution, device=ctx.device)
    y = torch.randint(0, s.classes, (s.batch,), device=ctx.device)
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, backend=ctx.backend)
    with autocast(ctx, bf16):
        loss, info, sel = _step(model, criterion, x, y)
        closs, cinfo, csel = compiled(twin, criterion, x, y)
    loss.backward()
    closs.backward()
    flips = _flips(criterion, sel, csel, info["per_sample_losses"], cinfo["per_sample_losses"])
    data: dict = {"tolerance": tol, "keys_equal": cinfo.keys() == info.keys(), **flips}
    compared = ["per_sample_losses", "rough_loss"]
    if not (flips["wgm_flips"] or flips["lgm_flips"]):
        compared = list(info)
    errors = {"selection logits": rel_err(csel.float(), sel.float())}
    errors.update({f"info[{k}]": rel_err(cinfo[k].float(), info[k].float()) for k in compared if k in info})
    if len(compared) == len(info):
        errors["loss"] = rel_err(closs, loss)
        params = list(model.named_parameters())
        flat = [
            torch.cat([p.grad.flatten() for _, p in params]),
            torch.cat([q.grad.flatten() for q in twin.parameters()]),
        ]
        errors["gradients (all parameters)"] = rel_err(flat[1], flat[0])
        per_param = {n: rel_err(q.grad, p.grad) for (n, p), q in zip(params, twin.parameters())}
        data["worst_parameter"] = [max(per_param, key=per_param.get), max(per_param.values())]
    data["errors"] = errors
    with autocast(ctx, bf16):
        data["syncs_eager"] = count_syncs(lambda: _step(model, criterion, x, y), ctx.device)
        data["syncs_compiled"] = count_syncs(lambda: compiled(twin, criterion, x, y), ctx.device)
    worst = max(errors, key=errors.get)
    ok = data["keys_equal"] and errors[worst] <= tol
    summary = f"worst relative error {errors[worst]:.2g} ({worst}), tolerance {tol:g}"
    if flips["wgm_flips"] or flips["lgm_flips"]:
        summary += (
            f"; decisions flipped at near-ties: WGM {flips['wgm_flips']}, LGM {flips['lgm_flips']} samples, so only "
            f"their inputs and the rough loss compared"
        )
    if data["syncs_eager"] is not None:
        summary += f"; host syncs per step: eager {data['syncs_eager']}, compiled {data['syncs_compiled']}"
    rows = [[k, v] for k, v in errors.items()]
    return Outcome(ok, summary, markdown_table(["compared", "relative error"], rows), data)


def training_step_bf16(ctx: Context) -> Outcome:
    """:func:`training_step` under bfloat16 autocast."""
    return training_step(ctx, bf16=True)


# ---------------------------------------------------------------------------------------------- routed eval
def _decisions(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the margin of the selection (top-1 minus top-2 logit) and the distance of the confidence to the
    exit threshold, the two quantities whose sign decides the routing."""
    with torch.no_grad():
        d = model.delegator(x)
        top = d.selection_logits.float().topk(2, dim=1).values
        conf = torch.softmax(d.rough_logits.float(), dim=1).amax(dim=1)
    return top[:, 0] - top[:, 1], (conf - model.exit_threshold).abs()


def _compare_coe_outputs(model, x, got, ref, tol: float) -> tuple[bool, dict]:
    """Exit decisions and experts equal except at near-ties; outputs close where the decisions agree."""
    same = (got.exited == ref.exited) & (got.expert_index == ref.expert_index)
    margin, distance = _decisions(model, x)
    scale = 1.0 + margin.abs().max()
    tie = (margin <= tol * scale) | (distance <= tol)
    data = {"decision_mismatches": int((~same).sum()), "unexplained_mismatches": int((~same & ~tie).sum())}
    data["output_rel_err"] = rel_err(got.output[same], ref.output[same])
    ok = data["unexplained_mismatches"] == 0 and data["output_rel_err"] <= tol
    return ok, data


def routed_eval(ctx: Context) -> Outcome:
    """The eval CoE (early exit, then one expert per sample batched by expert) against a per-sample loop."""
    s, tol = ctx.sizes, _tolerance(ctx)
    model = eval_coe(ctx)
    x = torch.randn(s.batch, 3, s.resolution, s.resolution, device=ctx.device)
    with torch.no_grad():
        out = model(x)
        rows = [model(x[i : i + 1]) for i in range(s.batch)]
    loop = type(out)(
        *(torch.cat([getattr(r, f) for r in rows]) for f in ("output", "expert_index", "exited", "confidence"))
    )
    ok, data = _compare_coe_outputs(model, x, out, loop, tol)
    data["exited"] = int(out.exited.sum())
    data["load"] = torch.bincount(out.expert_index[~out.exited], minlength=s.experts).tolist()
    data["devices"] = sorted({str(t.device) for t in (out.output, out.expert_index, out.exited)})
    ok = ok and data["devices"] == [str(x.device)]
    summary = (
        f"{data['exited']} of {s.batch} exited, load {data['load']}; output relative error "
        f"{data['output_rel_err']:.2g}; decision mismatches {data['decision_mismatches']} "
        f"(unexplained {data['unexplained_mismatches']})"
    )
    return Outcome(ok, summary, data=data)


def exported(ctx: Context) -> Outcome:
    """``pycoe.export.export`` on the device against the eager model, at several batch sizes."""
    s, tol = ctx.sizes, max(_tolerance(ctx), 1e-3)  # BatchNorm folding rounds
    model = eval_coe(ctx)
    program = export(model, torch.randn(8, 3, s.resolution, s.resolution, device=ctx.device)).module()
    data, ok = {}, True
    for batch in (1, 5, s.batch):
        x = torch.randn(batch, 3, s.resolution, s.resolution, device=ctx.device)
        with torch.no_grad():
            got, ref = program(x), model(x)
        cell_ok, cell = _compare_coe_outputs(model, x, got, ref, tol)
        cell["device"] = str(got.output.device)
        data[f"batch {batch}"] = cell
        ok = ok and cell_ok and cell["device"] == str(x.device)
    worst = max(c["output_rel_err"] for c in data.values())
    mism = sum(c["decision_mismatches"] for c in data.values())
    return Outcome(ok, f"worst output relative error {worst:.2g}; decision mismatches {mism} (near-ties)", data=data)


def calibration(ctx: Context) -> Outcome:
    """``calibrate_exit_threshold`` on the device against the same model and data on the CPU."""
    s = ctx.sizes
    model = eval_coe(ctx)
    torch.manual_seed(1)
    data = [
        (torch.randn(s.batch, 3, s.resolution, s.resolution), torch.randint(0, s.classes, (s.batch,))) for _ in range(3)
    ]
    on_device = calibrate_exit_threshold(
        model, [(x.to(ctx.device), y.to(ctx.device)) for x, y in data], max_accuracy_drop=0.02
    )
    on_cpu = calibrate_exit_threshold(copy.deepcopy(model).cpu(), data, max_accuracy_drop=0.02)
    n = on_cpu.num_samples
    out = {
        "threshold": [on_device.threshold, on_cpu.threshold],
        "accuracy": [on_device.accuracy, on_cpu.accuracy],
        "flops_per_sample": [on_device.flops_per_sample, on_cpu.flops_per_sample],
        "exit_rate": [on_device.exit_rate, on_cpu.exit_rate],
    }
    curve_gap = max(abs(a["accuracy"] - b["accuracy"]) for a, b in zip(on_device.curve, on_cpu.curve))
    out["curve_accuracy_gap"] = curve_gap
    # a sample whose confidence sits within rounding of a candidate threshold may count differently
    ok = curve_gap <= 2.0 / n and abs(on_device.accuracy - on_cpu.accuracy) <= 2.0 / n
    summary = (
        f"threshold {on_device.threshold} (CPU {on_cpu.threshold}), accuracy {on_device.accuracy:.4f} "
        f"(CPU {on_cpu.accuracy:.4f}), largest accuracy gap on the curve {curve_gap:.4f} (N={n})"
    )
    return Outcome(ok, summary, data=out)


# ---------------------------------------------------------------------------------------------- layers
def condconv_vs_timm(ctx: Context) -> Outcome:
    """CondConv2d (the default strategy and every explicit one) against timm's CondConv2d: output and gradients
    for x, the kernel bank and the coefficients, at batches 1, 8 and the suite's batch."""
    from timm.layers import CondConv2d as TimmCondConv2d

    tol = _tolerance(ctx)
    rows, worst = [], 0.0
    for label, c, o, k, g, h in (CONDCONV_SHAPES[0], CONDCONV_SHAPES[4], CONDCONV_SHAPES[3], CONDCONV_SHAPES[6]):
        for batch in (1, 8, ctx.sizes.condconv_batch):
            hw = min(h, ctx.sizes.condconv_hw)
            x = torch.randn(batch, c, hw, hw, device=ctx.device, requires_grad=True)
            label = label.replace(f"@{h}", f"@{hw}")
            routing = torch.sigmoid(torch.randn(batch, 4, device=ctx.device)).requires_grad_()
            ref_layer = TimmCondConv2d(c, o, k, padding=k // 2, groups=g, bias=False, num_experts=4).to(ctx.device)
            ref = ref_layer(x, routing)
            ref_grads = torch.autograd.grad(ref.square().sum(), (x, ref_layer.weight, routing))
            for strategy in MIXTURE_STRATEGIES:
                layer = CondConv2d(
                    c, o, k, padding=k // 2, groups=g, bias=False, num_kernels=4, router=False, strategy=strategy
                ).to(ctx.device)
                with torch.no_grad():
                    layer.weight.copy_(ref_layer.weight.reshape(layer.weight.shape))
                got = layer(x, routing)
                grads = torch.autograd.grad(got.square().sum(), (x, layer.weight, routing))
                errs = [rel_err(got, ref), rel_err(grads[0], ref_grads[0])]
                errs += [rel_err(grads[1].reshape(ref_grads[1].shape), ref_grads[1]), rel_err(grads[2], ref_grads[2])]
                worst = max(worst, *errs)
                rows.append([label, batch, strategy, *errs])
    table = markdown_table(["shape", "B", "strategy", "output", "grad x", "grad bank", "grad routing"], rows)
    return Outcome(
        worst <= tol,
        f"{len(rows)} cells, worst relative error {worst:.2g} (tolerance {tol:g})",
        table,
        {"worst": worst, "cells": len(rows)},
    )


def _off_the_knots(x: torch.Tensor, low: float = -3.0, high: float = 3.0, intervals: int = 16) -> torch.Tensor:
    """``x`` moved at least 1e-3 of a segment away from every knot of ``bench_pwlu.make_params`` (bounds -3 and 3,
    16 intervals): at a knot the derivative jumps, and float32 rounding may put an input on either side."""
    d = (high - low) / intervals
    u = (x - low) / d
    frac = u - u.round()
    return torch.where(frac.abs() < 1e-3, x + 2e-3 * d, x)


# Tolerances of the PWLU check: float64 is the check proper; in float32 the parameter gradients are sums over the
# whole input whose terms cancel (the outer slopes' above all), so their rounding is judged more loosely.
PWLU_TOLERANCE = {"float64": 1e-11, "float32": 1e-5, "float32 parameter gradients": 1e-2}


def pwlu_vs_reference(ctx: Context) -> Outcome:
    """``pycoe.functional.pwlu`` (and the ``PWLU`` layer) against a plain autograd PWLU (index, gather,
    interpolate): output and every gradient, layer and channel granularity, float64 and float32."""
    rows, ok = [], True
    for dtype in (torch.float64, torch.float32):
        x0 = _off_the_knots(3 * torch.randn(8, 16, 14, 14, dtype=dtype, device=ctx.device))
        name = str(dtype).replace("torch.", "")
        for rows_ in (1, 16):
            params = [p.detach().to(ctx.device, dtype).requires_grad_() for p in make_params(rows_)]
            twins = [p.detach().clone().requires_grad_() for p in params]
            xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
            got, ref = pwlu(xa, *params), pwlu_gather(xb, *twins, channel_dim=1)
            g = torch.randn_like(ref)
            got.backward(g)
            ref.backward(g)
            errs = [rel_err(got, ref), rel_err(xa.grad, xb.grad)]
            errs.append(max(rel_err(p.grad, q.grad) for p, q in zip(params, twins)))
            loose = PWLU_TOLERANCE[f"{name} parameter gradients"] if name == "float32" else PWLU_TOLERANCE[name]
            ok = ok and max(errs[:2]) <= PWLU_TOLERANCE[name] and errs[2] <= loose
            rows.append([name, "layer" if rows_ == 1 else "channel", *errs])
    layer = PWLU(granularity="channel", num_channels=16).to(ctx.device).eval()
    x = torch.randn(4, 16, 5, 5, device=ctx.device)
    y = layer(x)
    ref = pwlu_gather(x, layer.points, layer.left_bound, layer.right_bound, layer.left_slope, layer.right_slope, 1)
    layer_err = rel_err(y, ref)
    ok = ok and layer_err <= PWLU_TOLERANCE["float32"] and y.device == x.device
    table = markdown_table(["dtype", "granularity", "output", "grad x", "worst grad of a parameter"], rows)
    worst: dict[str, float] = {}
    for r in rows:
        worst[r[0]] = max(worst.get(r[0], 0.0), *r[2:])
    summary = ", ".join(f"{k} worst relative error {v:.2g}" for k, v in worst.items())
    return Outcome(ok, f"{summary}; PWLU layer {layer_err:.2g} (tolerances {PWLU_TOLERANCE})", table, worst)


# ---------------------------------------------------------------------------------------------- the solver
def solver_on_device(ctx: Context) -> Outcome:
    """The balanced-transport solver fed scores on the device: results on the device, the same assignment as on
    the CPU (exact and greedy; Sinkhorn's objective within rounding), forbidden pairs, capacities on the device,
    and the WGM and the balanced LGM on device logits; one host synchronisation per exact solve on CUDA."""
    rows, ok = [], True
    gen = torch.Generator().manual_seed(0)
    for n, k in ((16, 4), (256, 8), (1000, 16)):
        scores = torch.log_softmax(2 * torch.randn(n, k, generator=gen) + torch.linspace(0, 3, k), dim=1)
        forbidden = n == 256
        if forbidden:  # forbidden pairs: the exact method only (the approximate ones may get stuck on them)
            scores[::7, 0] = float("-inf")
        dev = scores.to(ctx.device)
        for method in ("exact",) if forbidden else ("exact", "greedy", "sinkhorn"):
            cpu, got = solve_balanced_transport(scores, method=method), solve_balanced_transport(dev, method=method)
            devices = {got.assignment.device, got.capacities.device}
            if got.prices is not None:
                devices.add(got.prices.device)
            same = torch.equal(got.assignment.cpu(), cpu.assignment)
            gap = abs(got.objective - cpu.objective) / (1.0 + abs(cpu.objective))
            cell_ok = devices == {dev.device} and (same if method != "sinkhorn" else gap <= 1e-4)
            ok = ok and cell_ok
            rows.append([n, k, method, str(got.assignment.device), same, gap, cell_ok])
    scores = torch.randn(64, 4, device=ctx.device)
    caps = torch.tensor([10, 20, 30, 4], device=ctx.device)
    op = balanced_assignment(scores, caps)
    ok = ok and op.device == scores.device and torch.bincount(op, minlength=4).tolist() == [10, 20, 30, 4]
    wgm, lgm = BalancedTransportWeighter(4), LabelGenerator("balanced")
    outs = [wgm(scores).weights, wgm(scores).assignment, wgm(scores).load, lgm(scores.abs()).index]
    ok = ok and all(t.device == scores.device for t in outs)
    balanced_assignment(scores)
    syncs = count_syncs(lambda: balanced_assignment(scores), ctx.device)
    if syncs is not None:
        ok = ok and syncs == 1
    table = markdown_table(["N", "K", "method", "result device", "same as CPU", "objective gap", "ok"], rows)
    summary = f"{len(rows)} solves, results on {scores.device}, host syncs per exact solve: {syncs}"
    return Outcome(ok, summary, table, {"syncs_per_exact_solve": syncs})


CHECKS = {
    "training_step": training_step,
    "training_step_bf16": training_step_bf16,
    "routed_eval": routed_eval,
    "export": exported,
    "calibrate": calibration,
    "condconv_vs_timm": condconv_vs_timm,
    "pwlu_vs_reference": pwlu_vs_reference,
    "solver_on_device": solver_on_device,
}
