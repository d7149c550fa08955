"""Benchmark pycoe's CondConv2d (each mixture strategy and "auto") against timm's CondConv2d.

The strategies are ``weight`` (one grouped conv, timm's algorithm), ``loop`` (the per-sample loop: one
``F.conv2d`` per sample with its mixed kernel), ``bmm`` (the convolution as one batched matmul) and ``output``.

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

from pycoe.functional.mixture import _cost_features, choose_mixture_strategy
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
STRATEGIES = ("weight", "loop", "bmm", "output")
METHODS = (*STRATEGIES, "auto", "timm")


def _timm_layer(c, o, k, g, e, bank):
    from timm.layers import CondConv2d as TimmCondConv2d

    layer = TimmCondConv2d(c, o, k, stride=1, padding=k // 2, groups=g, bias=False, num_experts=e)
    with torch.no_grad():
        layer.weight.copy_(bank.reshape(e, -1))
    return layer


def _make_cell(c, o, k, g, h, e, b):
    x = torch.randn(b, c, h, h)
    routing = torch.sigmoid(torch.randn(b, e))
    layers = {
        s: CondConv2d(c, o, k, padding=k // 2, groups=g, bias=False, num_experts=e, router=False, strategy=s)
        for s in (*STRATEGIES, "auto")
    }
    bank = layers["weight"].weight.detach()
    for layer in layers.values():
        with torch.no_grad():
            layer.weight.copy_(bank)
    timm_layer = _timm_layer(c, o, k, g, e, bank)

    def run(method, x, r):
        if method in layers:
            return layers[method](x, r)
        return timm_layer(x, r)

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
                    # at batch 1 every strategy but "output" is one F.conv2d with the mixed kernel
                    choice = "conv" if b == 1 else choose_mixture_strategy(b, c, o, k, e, h, g, requires_grad=backward)
                    rows.append(
                        dict(
                            label=label,
                            C=c,
                            O=o,
                            k=k,
                            g=g,
                            hw=h,
                            E=e,
                            B=b,
                            backward=backward,
                            choice=choice,
                            **{m: med[m] for m in METHODS},
                            **{f"min_{m}": best[m] for m in METHODS},
                        )
                    )
                    print(f"  done {label} E={e} B={b} {'fwd+bwd' if backward else 'fwd'}", flush=True)
    return rows


def markdown(rows, backward):
    head = (
        "| shape | E | B | "
        + " | ".join(f"{m} ms" for m in STRATEGIES)
        + " | auto ms (pick) | timm ms | auto/timm | "
        + " | ".join(f"{m}/timm" for m in STRATEGIES)
        + " |"
    )
    lines = [head, "|" + "---|" * (6 + 2 * len(STRATEGIES))]
    for r in rows:
        if r["backward"] != backward:
            continue
        t = r["timm"]
        lines.append(
            f"| {r['label']} | {r['E']} | {r['B']} | "
            + " | ".join(_fmt(r[m]) for m in STRATEGIES)
            + f" | {_fmt(r['auto'])} ({r['choice']}) | {_fmt(t)} | {r['auto'] / t:.2f} | "
            + " | ".join(f"{r[m] / t:.2f}" for m in STRATEGIES)
            + " |"
        )
    return "\n".join(lines)


def _geo(values):
    return float(np.exp(np.mean(np.log(values))))


def _picked(row):
    return "weight" if row["choice"] == "conv" else row["choice"]


def summary(rows):
    out = []
    for backward in (False, True):
        for b in sorted({r["B"] for r in rows}):
            sel = [r for r in rows if r["backward"] == backward and r["B"] == b]
            if not sel:
                continue
            ratios = [r["auto"] / r["timm"] for r in sel]
            oracle = [min(r[m] for m in STRATEGIES) / r["timm"] for r in sel]
            hits = sum(r[_picked(r)] <= 1.1 * min(r[m] for m in STRATEGIES) for r in sel)
            under = sum(x <= 0.8 for x in ratios)
            not_slower = sum(x <= 1.0 for x in ratios)
            out.append(
                f"- {'fwd+bwd' if backward else 'fwd'}, B={b}: auto/timm geometric mean {_geo(ratios):.2f} "
                f"(min {min(ratios):.2f}, max {max(ratios):.2f}; <= 0.8 in {under}/{len(sel)} cells, <= 1.0 in "
                f"{not_slower}/{len(sel)}); fastest-strategy/timm geometric mean {_geo(oracle):.2f}; auto's pick "
                f"within 10% of the fastest strategy in {hits}/{len(sel)} cells"
            )
    return "\n".join(out)


def calibrate(rows):
    """Fit the cost-model constants: per strategy, non-negative least squares on the relative error of the
    per-cell minima over the batch > 1 cells (at batch 1 the layer does not consult the model)."""
    from scipy.optimize import nnls

    result = {}
    for backward in (False, True):
        sel = [r for r in rows if r["backward"] == backward and r["B"] > 1]
        if not sel:
            continue
        consts = {}
        for strategy in STRATEGIES:
            a = []
            for r in sel:
                feats = _cost_features(r["B"], r["C"], r["O"], r["k"], r["k"], r["E"], r["hw"], r["hw"], r["g"])
                a.append(np.array(feats[strategy], dtype=float) / (r[f"min_{strategy}"] * 1e9))
            consts[strategy], _ = nnls(np.array(a), np.ones(len(a)))
        result[backward] = consts
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced grid")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the raw medians to this file")
    parser.add_argument("--calibrate", action="store_true", help="fit the cost model's constants")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument("--from-json", default=None, help="re-print the tables of a --json file instead of measuring")
    parser.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,8,64)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import timm

    shapes = QUICK_SHAPES if args.quick else SHAPES
    experts = (4,) if args.quick else EXPERTS
    modes = [m == "fwdbwd" for m in args.modes.split(",")]
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"repeats = {args.repeats} (medians), float32, bias=False, padding=k//2, stride 1"
    )
    start = time.perf_counter()
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
        for r in rows:
            if r["B"] == 1:
                r["choice"] = "conv"
        for backward in modes:
            print(f"### {'forward + backward' if backward else 'forward only'}\n")
            print(markdown(rows, backward) + "\n")
        print(summary(rows))
        return
    batches = BATCHES if args.batches is None else tuple(int(b) for b in args.batches.split(","))
    rows = run_grid(shapes, batches, experts, args.repeats, modes)
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
            print(f"  requires_grad={backward}:")
            for strategy, c in consts.items():
                print(f"    {strategy!r}: ({', '.join(f'{v:.3g}' for v in c)}),")


if __name__ == "__main__":
    main()
