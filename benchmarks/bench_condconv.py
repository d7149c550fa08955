"""Benchmark pycoe's CondConv2d (each mixture strategy and "auto") against timm's CondConv2d and a per-sample loop.

Every method gets the same expert kernels and the same routing weights [B, E] from outside (timm's layer has no
router; the router's cost is the same for all and left out). Forward only (under ``torch.no_grad``) and forward +
backward (gradients for x, the kernel bank and the routing weights). The methods of one cell are timed
interleaved, ``--repeats`` times, and the median is reported with the ratio to timm's median of the same run.

Usage::

    python benchmarks/bench_condconv.py              # full grid (a few minutes on 2 cores)
    python benchmarks/bench_condconv.py --quick      # reduced grid
    python benchmarks/bench_condconv.py --calibrate  # also fit the constants of pycoe's cost model

Needs timm (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from pycoe.functional.mixture import choose_mixture_strategy, mixture_conv2d_reference
from pycoe.layers.condconv import CondConv2d

# (label, C, O, kernel, groups, spatial)
SHAPES = [
    ("3x3 64->64 @28", 64, 64, 3, 1, 28),
    ("3x3 128->128 @14", 128, 128, 3, 1, 14),
    ("1x1 32->64 @56", 32, 64, 1, 1, 56),
    ("1x1 256->256 @14", 256, 256, 1, 1, 14),
    ("dw3x3 128 @28", 128, 128, 3, 128, 28),
    ("dw3x3 256 @14", 256, 256, 3, 256, 14),
    ("SE 1x1 256->64 @1", 256, 64, 1, 1, 1),  # squeeze-excitation conv: where output mixing wins
]
QUICK_SHAPES = [SHAPES[1], SHAPES[3], SHAPES[5], SHAPES[6]]
BATCHES = (1, 8, 64)
EXPERTS = (4, 8)
METHODS = ("weight", "output", "auto", "timm", "loop")


def _timm_layer(c, o, k, g, e, bank):
    from timm.layers import CondConv2d as TimmCondConv2d

    layer = TimmCondConv2d(c, o, k, stride=1, padding=k // 2, groups=g, bias=False, num_experts=e)
    with torch.no_grad():
        layer.weight.copy_(bank.reshape(e, -1))
    return layer


def _make_cell(c, o, k, g, h, e, b):
    x = torch.randn(b, c, h, h)
    routing = torch.sigmoid(torch.randn(b, e))
    layers = {s: CondConv2d(c, o, k, padding=k // 2, groups=g, bias=False, num_experts=e, router=False, strategy=s)
              for s in ("weight", "output", "auto")}
    bank = layers["weight"].weight.detach()
    for s in ("output", "auto"):
        with torch.no_grad():
            layers[s].weight.copy_(bank)
    timm_layer = _timm_layer(c, o, k, g, e, bank)
    loop_bank = bank.clone().requires_grad_()

    def run(method, x, r):
        if method in layers:
            return layers[method](x, r)
        if method == "timm":
            return timm_layer(x, r)
        return mixture_conv2d_reference(x, loop_bank, r, None, 1, k // 2, 1, g)

    return x, routing, run


def _time_once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_cell(c, o, k, g, h, e, b, backward, repeats, methods):
    x, routing, run = _make_cell(c, o, k, g, h, e, b)
    if backward:
        x.requires_grad_()
        routing.requires_grad_()

    def step(method):
        if backward:
            y = run(method, x, routing)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                run(method, x, routing)

    fns = {m: (lambda m=m: step(m)) for m in methods}
    first = {m: _time_once(f) for m, f in fns.items()}  # warm-up
    times = {m: [] for m in methods}
    reps = repeats if max(first.values()) < 1.0 else max(3, repeats // 2)
    for _ in range(reps):
        for m in methods:
            if first[m] > 3.0 and len(times[m]) >= 1:  # very slow method (the loop at batch 64): 1-2 samples suffice
                continue
            times[m].append(_time_once(fns[m]))
    return {m: statistics.median(v) for m, v in times.items()}, {m: min(v) for m, v in times.items()}


def _fmt(t):
    return f"{t * 1e3:.2f}"


def run_grid(shapes, batches, experts, repeats, modes):
    rows = []
    for backward in modes:
        for label, c, o, k, g, h in shapes:
            for e in experts:
                for b in batches:
                    med, best = bench_cell(c, o, k, g, h, e, b, backward, repeats, METHODS)
                    choice = choose_mixture_strategy(b, c, o, k, e, h, g, requires_grad=backward)
                    rows.append(dict(label=label, C=c, O=o, k=k, g=g, hw=h, E=e, B=b, backward=backward,
                                     choice=choice, **{m: med[m] for m in METHODS},
                                     **{f"min_{m}": best[m] for m in METHODS}))
                    print(f"  done {label} E={e} B={b} {'fwd+bwd' if backward else 'fwd'}", flush=True)
    return rows


def markdown(rows, backward):
    head = ("| shape | E | B | weight ms | output ms | auto ms (pick) | timm ms | loop ms | auto/timm | "
            "weight/timm | output/timm | loop/timm |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if r["backward"] != backward:
            continue
        t = r["timm"]
        lines.append(
            f"| {r['label']} | {r['E']} | {r['B']} | {_fmt(r['weight'])} | {_fmt(r['output'])} | "
            f"{_fmt(r['auto'])} ({r['choice'][0]}) | {_fmt(t)} | {_fmt(r['loop'])} | {r['auto'] / t:.2f} | "
            f"{r['weight'] / t:.2f} | {r['output'] / t:.2f} | {r['loop'] / t:.2f} |"
        )
    return "\n".join(lines)


def summary(rows):
    out = []
    for backward in (False, True):
        for b in sorted({r["B"] for r in rows}):
            sel = [r for r in rows if r["backward"] == backward and r["B"] == b]
            if not sel:
                continue
            ratios = [r["auto"] / r["timm"] for r in sel]
            geo = float(np.exp(np.mean(np.log(ratios))))
            oracle = [min(r["weight"], r["output"]) / r["timm"] for r in sel]
            hits = sum(r["choice"] == ("weight" if r["weight"] <= r["output"] else "output") for r in sel)
            out.append(
                f"- {'fwd+bwd' if backward else 'fwd'}, B={b}: auto/timm geometric mean {geo:.2f} "
                f"(min {min(ratios):.2f}, max {max(ratios):.2f}); best-strategy/timm geometric mean "
                f"{float(np.exp(np.mean(np.log(oracle)))):.2f}; auto picked the faster strategy in {hits}/{len(sel)} cells"
            )
    return "\n".join(out)


def calibrate(rows):
    """Fit the cost-model constants (non-negative least squares on relative error of the per-cell minima)."""
    from scipy.optimize import nnls

    result = {}
    for backward in (False, True):
        sel = [r for r in rows if r["backward"] == backward]
        if not sel:
            continue
        wa, wb, oa, ob = [], [], [], []
        for r in sel:
            p = r["O"] * (r["C"] // r["g"]) * r["k"] ** 2
            m = r["B"] * p * r["hw"] ** 2
            # times in ns; rows divided by the measured time -> least squares on relative error
            wa.append(np.array([r["B"] * r["E"] * p, m, r["B"] * r["g"]]) / (r["min_weight"] * 1e9))
            wb.append(1.0)
            oa.append(np.array([r["E"] * m, r["E"] * r["B"] * r["O"] * r["hw"] ** 2]) / (r["min_output"] * 1e9))
            ob.append(1.0)
        cw, _ = nnls(np.array(wa), np.array(wb))
        co, _ = nnls(np.array(oa), np.array(ob))
        result[backward] = {"mix": cw[0], "gconv": cw[1], "group": cw[2], "dense": co[0], "combine": co[1]}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced grid")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the raw medians to this file")
    parser.add_argument("--calibrate", action="store_true", help="fit the cost model's constants")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import timm

    shapes = QUICK_SHAPES if args.quick else SHAPES
    experts = (4,) if args.quick else EXPERTS
    modes = [m == "fwdbwd" for m in args.modes.split(",")]
    print(f"torch {torch.__version__}, timm {timm.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"repeats = {args.repeats} (medians), float32, bias=False, padding=k//2, stride 1")
    start = time.perf_counter()
    rows = run_grid(shapes, BATCHES, experts, args.repeats, modes)
    print(f"\ngrid time {time.perf_counter() - start:.0f} s\n")
    for backward in modes:
        print(f"### {'forward + backward' if backward else 'forward only'}\n")
        print(markdown(rows, backward) + "\n")
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.calibrate:
        print("\nfitted cost-model constants (ns per unit):")
        for backward, consts in calibrate(rows).items():
            print(f"  requires_grad={backward}: " + ", ".join(f"{k}={v:.4g}" for k, v in consts.items()))


if __name__ == "__main__":
    main()
