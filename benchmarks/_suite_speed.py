"""The GPU suite's speed parts. Every figure is a median of interleaved repeats (see ``_common``), the device
synchronised around each timed call, and every ratio compares variants measured side by side in the same run.
Optional work that would overrun the suite's time budget (compilations above all) is skipped and reported.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from _common import interleaved_medians, markdown_table, ratio
from _suite_models import (
    BalancedTransportWeighter,
    CoELoss,
    Context,
    LabelGenerator,
    Outcome,
    autocast,
    balanced_assignment,
    compile_inference,
    count_syncs,
    export,
    geometric_mean,
    peak_memory,
    pwlu,
    solve_balanced_transport,
    to_device,
    to_host,
)
from bench_coe import eval_throughput
from bench_condconv import SHAPES as CONDCONV_SHAPES
from bench_condconv import bench_cell
from bench_conditional import build, flops_rows, time_and_ratio_tables
from bench_pwlu import make_params
from torch import nn


def conditional_models(ctx: Context) -> dict[str, nn.Module]:
    """bench_conditional's four networks (eval mode, on the device), built once per run."""
    if "conditional_models" not in ctx.cache:
        s = ctx.sizes
        ctx.cache["conditional_models"] = build(s.cond_classes, s.cond_resolution, ctx.device, tiny=s.tiny_backbones)
    return ctx.cache["conditional_models"]


# ---------------------------------------------------------------------------------------------- bench_conditional
def _compiled_variant(ctx: Context, name: str, model: nn.Module, example: torch.Tensor, graphs: bool):
    if name == "coe":  # one graph with the data-dependent sub-batches; CUDA graphs cannot hold those
        return None if graphs else compile_inference(model, example, backend=ctx.backend)
    if graphs:
        return torch.compile(model, mode="reduce-overhead", dynamic=True)
    return torch.compile(model, backend=ctx.backend, dynamic=True)


def _mode_variants(ctx: Context, mode: str, models: dict[str, nn.Module], example: torch.Tensor) -> dict:
    """The variants of one mode whose preparation (and first calls: compilation) fit the time budget."""
    s, variants = ctx.sizes, {}
    for name, model in models.items():
        if mode == "eager":
            variants[(name, mode)] = model
            continue
        if name not in (s.exported_models if mode == "exported" else s.compiled_models):
            continue
        if not ctx.afford(60.0, f"{name} {mode}"):
            continue
        try:
            fn = _prepared_variant(ctx, mode, name, model, example)
        except Exception as error:  # reported; the other variants still run
            ctx.notes.append(f"FAILED: {name} {mode}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            continue
        if fn is not None:
            variants[(name, mode)] = fn
    return variants


def _prepared_variant(ctx: Context, mode: str, name: str, model: nn.Module, example: torch.Tensor):
    """One exported or compiled variant, called once at every batch size (compiling them), or ``None`` where the
    mode does not apply."""
    if mode == "exported":
        fn = export(model, example).module()
    else:
        fn = _compiled_variant(ctx, name, model, example, graphs=mode == "compiled + CUDA graphs")
        if fn is None:
            ctx.notes.append(f"{name} {mode}: not applicable (data-dependent sub-batch sizes)")
            return None
    with torch.inference_mode():  # compile every batch size now, within the budget check of the caller
        for batch in ctx.sizes.cond_batches:
            fn(torch.randn(batch, *example.shape[1:], device=ctx.device))
    return fn


def conditional(ctx: Context) -> Outcome:
    """bench_conditional's table on the device: static, CoE, CondConv and BasisNet at about matched FLOPs, eager,
    exported, compiled and compiled with CUDA graphs (where it applies); time per sample, ratios, memory peaks."""
    s = ctx.sizes
    models = conditional_models(ctx)
    res, batches = s.cond_resolution, list(s.cond_batches)
    flops = flops_rows(models, res, ctx.device)
    example = torch.randn(8, 3, res, res, device=ctx.device)
    modes = ["eager", "exported", "compiled"] + (["compiled + CUDA graphs"] if ctx.cuda else [])
    if not ctx.cuda:
        ctx.notes.append("compiled + CUDA graphs: not measured off CUDA")
    results, memory, seconds = {}, [], {}
    for mode in modes:
        start = time.perf_counter()
        torch._dynamo.reset()
        variants = _mode_variants(ctx, mode, models, example)
        if not variants:
            continue
        for batch in batches:
            x = torch.randn(batch, 3, res, res, device=ctx.device)
            calls = {key: (lambda fn=fn: fn(x)) for key, fn in variants.items()}
            with torch.inference_mode():
                med = interleaved_medians(calls, s.repeats, device=ctx.device, warmup=2)
                if batch == batches[-1]:
                    memory += [[*key, peak_memory(call, ctx.device)] for key, call in calls.items()]
            results.update({(*key, batch): t / batch for key, t in med.items()})
        seconds[mode] = time.perf_counter() - start
    static = flops[0][1]
    parts = [
        markdown_table(
            ["model", "MFLOPs / sample", "x static", "params (M)"], [[r[0], r[1], r[1] / static, r[2]] for r in flops]
        ),
        "",
        f"Time per sample (ms), median of {s.repeats}, {res}x{res}",
        "",
        time_and_ratio_tables(results, list(models), batches),
        "",
        f"GPU memory peak (MiB above the models' own) of one call at batch {batches[-1]}",
        "",
        markdown_table(["model", "mode", "MiB"], memory) if ctx.cuda else "(not measured off CUDA)",
        "",
        "Wall time of each mode (preparation, compilation and timing): "
        + ", ".join(f"{m} {t:.0f} s" for m, t in seconds.items()),
    ]
    speedups = [ratio(results.get(("condconv", m, b)), results.get(("coe", m, b))) for m in modes for b in batches]
    speedups = [v for v in speedups if math.isfinite(v)]
    summary = f"{len(results)} cells in modes {', '.join(seconds)}"
    if speedups:
        summary += f"; CondConv / CoE from {min(speedups):.2f} to {max(speedups):.2f}"
    failed = [n for n in ctx.notes if n.startswith("FAILED")]
    if failed:
        summary += f"; {len(failed)} variants failed (see the notes)"
    data = {"flops": flops, "seconds_per_sample": {"|".join(map(str, k)): v for k, v in results.items()}}
    data.update(memory_mib=memory, mode_seconds=seconds)
    return Outcome(not failed, summary, "\n".join(parts), data)


# ---------------------------------------------------------------------------------------------- routed eval
def routed_vs_ideal(ctx: Context) -> Outcome:
    """The routed eval CoE (no early exit) against its ideal, the delegator + one expert on the whole batch, and
    against the oracle (each expert on its sub-batch split in advance: the dispatch without its work)."""
    s = ctx.sizes
    model = conditional_models(ctx)["coe"]
    rows = []
    for batch in s.routed_batches:
        load, thr = eval_throughput(model, batch, s.cond_resolution, s.repeats, ctx.device, loop=False)
        rows.append(
            [
                batch,
                str(load),
                thr["ideal"],
                thr["coe"],
                thr["oracle"],
                thr["dense"],
                thr["coe"] / thr["ideal"],
                thr["oracle"] / thr["ideal"],
                thr["coe"] / thr["oracle"],
            ]
        )
    headers = ["batch", "load", "ideal /s", "coe /s", "oracle /s", "dense /s", "coe/ideal", "oracle/ideal"]
    table = markdown_table([*headers, "coe/oracle"], rows)
    summary = ", ".join(f"coe/ideal {r[6]:.2f} at batch {r[0]}" for r in rows)
    return Outcome(True, summary, table, {"rows": rows})


# ---------------------------------------------------------------------------------------------- WGM in the step
class ArgmaxWeighter(nn.Module):
    """A stand-in WGM without a solve (each sample to its argmax expert): the step without the balanced
    assignment, to measure what the assignment costs."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, logits: torch.Tensor):
        index = logits.argmax(dim=1)
        weights = (index[:, None] == torch.arange(self.k, device=logits.device)).to(logits.dtype)
        return type("Weights", (), {"weights": weights, "load": weights.sum(0).long()})()


def _step_variants(ctx: Context, model: nn.Module, batch: int, bf16: bool) -> tuple[dict, Callable]:
    s, k = ctx.sizes, model.num_experts
    x = torch.randn(batch, 3, s.step_resolution, s.step_resolution, device=ctx.device)
    y = torch.randint(0, s.cond_classes, (batch,), device=ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    exact = CoELoss(BalancedTransportWeighter(k), LabelGenerator())
    standin = CoELoss(ArgmaxWeighter(k), LabelGenerator())

    def step(criterion):
        opt.zero_grad(set_to_none=True)
        with autocast(ctx, bf16):
            loss, _ = criterion(model(x), y)
        loss.backward()
        opt.step()

    with torch.no_grad(), autocast(ctx, bf16):
        scores = exact.weighter.transform(model.delegator(x).selection_logits.float())
    return {
        "step, exact WGM": lambda: step(exact),
        "step, argmax stand-in": lambda: step(standin),
        "exact solve alone (round trip)": lambda: balanced_assignment(scores),
    }, lambda: step(exact)


def solver_share(ctx: Context) -> Outcome:
    """The WGM's exact solve as a share of a training step (CoE of bench_conditional's networks, fp32 and bf16
    autocast), its host round trip included; and the solver's copies through pageable against pinned memory."""
    s = ctx.sizes
    model = copy.deepcopy(conditional_models(ctx)["coe"]).train()
    rows = []
    for bf16 in (False, True):
        for batch in s.step_batches:
            variants, exact_step = _step_variants(ctx, model, batch, bf16)
            med = interleaved_medians(variants, s.repeats, device=ctx.device, warmup=2)
            t_exact, t_standin, t_solve = med.values()
            syncs = count_syncs(exact_step, ctx.device)
            mem = peak_memory(exact_step, ctx.device)
            rows.append(
                [
                    "bf16" if bf16 else "fp32",
                    batch,
                    t_exact * 1e3,
                    t_standin * 1e3,
                    t_solve * 1e3,
                    ratio(t_exact - t_standin, t_exact),
                    ratio(t_solve, t_exact),
                    syncs,
                    mem,
                ]
            )
    step_table = markdown_table(
        [
            "dtype",
            "batch",
            "step ms",
            "stand-in step ms",
            "solve ms",
            "(step - stand-in) / step",
            "solve / step",
            "host syncs per step",
            "peak MiB",
        ],
        rows,
    )
    transfer_rows = []
    for n, k in s.transfer_sizes:
        t = torch.randn(n, k, device=ctx.device).log_softmax(1)

        def round_trip(pinned: bool, t=t):
            a = solve_balanced_transport(to_host(t, pinned=pinned)).assignment
            return to_device(a, t.device, pinned=pinned)

        med = interleaved_medians(
            {
                "library": lambda t=t: balanced_assignment(t),
                "pageable": lambda: round_trip(False),
                "pinned": lambda: round_trip(True),
            },
            s.repeats * 3,
            device=ctx.device,
            warmup=2,
        )
        transfer_rows.append([n, k, *(v * 1e6 for v in med.values()), ratio(med["pinned"], med["pageable"])])
    transfer_table = markdown_table(
        ["N", "K", "library us", "pageable us", "pinned us", "pinned / pageable"], transfer_rows
    )
    summary = ", ".join(f"{r[0]} batch {r[1]}: solve {r[6]:.1%} of the step" for r in rows)
    return Outcome(True, summary, step_table + "\n\n" + transfer_table, {"step": rows, "transfer": transfer_rows})


# ---------------------------------------------------------------------------------------------- layers
def pwlu_speed(ctx: Context) -> Outcome:
    """PWLU forward + backward against ReLU, eager and compiled (ratios against the compiled ReLU)."""
    s, rows = ctx.sizes, []
    torch._dynamo.reset()
    relu_c = torch.compile(lambda t: torch.relu(t), backend=ctx.backend, dynamic=False)
    pwlu_c = torch.compile(lambda t, *p: pwlu(t, *p), backend=ctx.backend, dynamic=False)
    for shape in s.pwlu_shapes:
        x = torch.randn(shape, device=ctx.device, requires_grad=True)
        g = torch.randn(shape, device=ctx.device)
        layer = [p.detach().to(ctx.device).requires_grad_() for p in make_params(1)]
        chan = [p.detach().to(ctx.device).requires_grad_() for p in make_params(shape[1])]
        fns = {
            "ReLU": torch.relu,
            "PWLU layer": lambda t: pwlu(t, *layer),
            "PWLU channel": lambda t: pwlu(t, *chan),
            "compiled ReLU": relu_c,
            "compiled PWLU layer": lambda t: pwlu_c(t, *layer),
            "compiled PWLU channel": lambda t: pwlu_c(t, *chan),
        }

        def fwd_bwd(fn):
            x.grad = None
            for p in layer + chan:
                p.grad = None
            fn(x).backward(g)

        med = interleaved_medians(
            {n: (lambda f=f: fwd_bwd(f)) for n, f in fns.items()}, s.repeats * 2, device=ctx.device, warmup=2
        )
        for name, t in med.items():
            rows.append([str(shape), name, t * 1e3, ratio(t, med["ReLU"]), ratio(t, med["compiled ReLU"])])
    table = markdown_table(["shape", "candidate", "fwd+bwd ms", "vs ReLU", "vs compiled ReLU"], rows)
    compiled = [r[4] for r in rows if r[1].startswith("compiled PWLU")]
    summary = f"compiled PWLU / compiled ReLU {min(compiled):.2f} to {max(compiled):.2f}"
    return Outcome(True, summary, table, {"rows": rows})


def condconv_speed(ctx: Context) -> Outcome:
    """CondConv2d (default strategy) against timm's CondConv2d, forward and forward + backward, bench_condconv's
    shapes with E = 4 at the suite's CondConv batch (paired ratios of interleaved repeats)."""
    s, rows = ctx.sizes, []
    for backward in (False, True):
        for label, c, o, k, g, h in CONDCONV_SHAPES[: s.condconv_shapes]:
            if h > s.condconv_hw:
                label = label.replace(f"@{h}", f"@{s.condconv_hw}")
                h = s.condconv_hw
            cell = (label, c, o, k, g, h, 4, s.condconv_batch)
            median, ratios = bench_cell(cell, backward, s.repeats, s.min_time, (), time.perf_counter, ctx.device)
            rows.append(
                [
                    label,
                    "fwd+bwd" if backward else "fwd",
                    median["timm"] * 1e3,
                    median["pycoe"] * 1e3,
                    ratios["pycoe"],
                    ratios["conv2d"],
                ]
            )
    table = markdown_table(["shape", "mode", "timm ms", "pycoe ms", "pycoe/timm", "conv2d/timm"], rows)
    geo = {m: geometric_mean([r[4] for r in rows if r[1] == m]) for m in ("fwd", "fwd+bwd")}
    summary = f"batch {s.condconv_batch}, pycoe/timm geometric mean: fwd {geo['fwd']:.2f}, fwd+bwd {geo['fwd+bwd']:.2f}"
    return Outcome(True, summary, table, {"rows": rows, "geometric_mean": geo})


SPEED = {
    "solver_share": solver_share,
    "pwlu_speed": pwlu_speed,
    "condconv_speed": condconv_speed,
    "routed_vs_ideal": routed_vs_ideal,
    "conditional": conditional,
}
