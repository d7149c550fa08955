"""Benchmark pycoe's CondConv2d (its default strategy, and optionally each explicit strategy) against timm's CondConv2d.

Every method gets the same kernel bank and the same coefficients [B, E] from outside (timm's layer has no
router; a router costs the same for all and is left out). The column ``conv2d`` is the floor: a plain
``nn.Conv2d`` (one kernel) on the same batch. Forward only (under ``torch.no_grad``) and forward +
backward (gradients for x, the kernel bank and the coefficients). The methods of a cell are timed interleaved,
in a random order, ``--repeats`` times; one timing runs a method once untimed (so that it does not pay for the
memory the previous method freed), then often enough to last ``--min-time`` seconds.
Reported: the median time per call of each method, and the median over the repeats of the ratio method / timm of
the same repeat (paired ratios: a burst of load from other processes slows both sides of a pair alike).

Clock: with one intra-op thread (``--threads 1``) the default is the CPU time of the calling thread
(``time.thread_time``), which does not count the time the operating system gives to other processes: on a shared
machine it measures the operation, not the load. With several threads the default is the wall clock
(``time.perf_counter``), since the work runs on other threads too. ``--clock`` overrides either.

Usage::

    python benchmarks/bench_condconv.py --threads 1                     # the default strategy against timm
    python benchmarks/bench_condconv.py --threads 1 --strategies all    # also every explicit strategy
    python benchmarks/bench_condconv.py --quick                         # reduced grid

Needs timm (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from _common import load_average, markdown_table, timed

from pycoe.functional.mixture import MIXTURE_STRATEGIES, choose_mixture_strategy
from pycoe.layers.condconv import CondConv2d

# (label, C, O, kernel, groups, spatial size)
SHAPES = [
    ("3x3 64->64 @28", 64, 64, 3, 1, 28),
    ("3x3 128->128 @14", 128, 128, 3, 1, 14),
    ("1x1 32->64 @56", 32, 64, 1, 1, 56),
    ("1x1 256->256 @14", 256, 256, 1, 1, 14),
    ("dw3x3 128 @28", 128, 128, 3, 128, 28),
    ("dw3x3 256 @14", 256, 256, 3, 256, 14),
    ("SE 1x1 256->64 @1", 256, 64, 1, 1, 1),  # a squeeze-excitation conv on a 1x1 map
]
QUICK_SHAPES = [SHAPES[1], SHAPES[3], SHAPES[5], SHAPES[6]]
# More layers of common CNNs (ResNet stages, MobileNet depthwise and pointwise layers): the evidence for the rule
# of strategy="auto" beyond the main grid (--grid extended).
EXTENDED_SHAPES = [
    ("3x3 16->16 @32", 16, 16, 3, 1, 32),
    ("3x3 32->32 @32", 32, 32, 3, 1, 32),
    ("3x3 32->32 @16", 32, 32, 3, 1, 16),
    ("3x3 64->64 @56", 64, 64, 3, 1, 56),
    ("3x3 128->128 @28", 128, 128, 3, 1, 28),
    ("3x3 256->256 @14", 256, 256, 3, 1, 14),
    ("3x3 256->256 @7", 256, 256, 3, 1, 7),
    ("3x3 512->512 @7", 512, 512, 3, 1, 7),
    ("1x1 64->256 @56", 64, 256, 1, 1, 56),
    ("1x1 128->512 @28", 128, 512, 1, 1, 28),
    ("1x1 512->512 @7", 512, 512, 1, 1, 7),
    ("1x1 1024->256 @7", 1024, 256, 1, 1, 7),
    ("dw3x3 32 @112", 32, 32, 3, 32, 112),
    ("dw3x3 96 @56", 96, 96, 3, 96, 56),
    ("dw3x3 144 @56", 144, 144, 3, 144, 56),
    ("dw3x3 192 @28", 192, 192, 3, 192, 28),
    ("dw3x3 384 @14", 384, 384, 3, 384, 14),
    ("dw3x3 576 @14", 576, 576, 3, 576, 14),
    ("dw3x3 960 @7", 960, 960, 3, 960, 7),
    ("dw5x5 240 @14", 240, 240, 5, 240, 14),
]
BATCHES = (1, 8, 64)
KERNEL_COUNTS = (4, 8)
EXPLICIT = tuple(s for s in MIXTURE_STRATEGIES if s != "auto")


def _make_cell(
    c: int, o: int, k: int, g: int, h: int, e: int, b: int, strategies: tuple[str, ...], device: torch.device | str
):
    from timm.layers import CondConv2d as TimmCondConv2d

    x = torch.randn(b, c, h, h, device=device)
    routing = torch.sigmoid(torch.randn(b, e, device=device))
    layers: dict[str, torch.nn.Module] = {
        "pycoe": CondConv2d(c, o, k, padding=k // 2, groups=g, bias=False, num_kernels=e, router=False)
    }
    for s in strategies:
        layers[s] = CondConv2d(c, o, k, padding=k // 2, groups=g, bias=False, num_kernels=e, router=False, strategy=s)
    bank = layers["pycoe"].weight.detach()
    for layer in layers.values():
        with torch.no_grad():
            layer.weight.copy_(bank)  # type: ignore[operator]
    timm_layer = TimmCondConv2d(c, o, k, stride=1, padding=k // 2, groups=g, bias=False, num_experts=e)
    with torch.no_grad():
        timm_layer.weight.copy_(bank.reshape(e, -1))
    layers["timm"] = timm_layer
    # the floor: one ordinary convolution of the batch with a single kernel (what a plain nn.Conv2d costs)
    layers["conv2d"] = _PlainConv(torch.nn.Conv2d(c, o, k, padding=k // 2, groups=g, bias=False))
    return x, routing, {name: layer.to(device) for name, layer in layers.items()}


class _PlainConv(torch.nn.Module):
    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def bench_cell(
    cell: tuple,
    backward: bool,
    repeats: int,
    min_time: float,
    strategies: tuple[str, ...],
    clock: Callable[[], float],
    device: torch.device | str = "cpu",
):
    """Median seconds per call of every method on one cell, and the median paired ratio method / timm."""
    _, c, o, k, g, h, e, b = cell
    x, routing, layers = _make_cell(c, o, k, g, h, e, b, strategies, device)
    if backward:
        x.requires_grad_()
        routing.requires_grad_()

    def step(layer: torch.nn.Module) -> None:
        if backward:
            y = layer(x, routing)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                layer(x, routing)

    steps: dict[str, Callable[[], None]] = {m: (lambda layer=layer: step(layer)) for m, layer in layers.items()}
    inner = {}
    for m, fn in steps.items():  # warm-up, and the number of calls per timing
        fn()
        once = max(timed(fn, device, clock), 1e-6)
        inner[m] = max(1, int(min_time / once))
    methods = list(steps)
    times: dict[str, list[float]] = {m: [] for m in methods}
    shuffle = random.Random(0)
    for _ in range(repeats):
        order = shuffle.sample(methods, len(methods))
        for m in order:
            fn = steps[m]
            fn()  # untimed: the allocator settles after whatever the previous method freed
            times[m].append(timed(lambda fn=fn, n=inner[m]: [fn() for _ in range(n)], device, clock) / inner[m])
    median = {m: statistics.median(v) for m, v in times.items()}
    ratio = {m: statistics.median(t / u for t, u in zip(times[m], times["timm"])) for m in methods}
    return median, ratio


def _pick(b: int, c: int, o: int, k: int, g: int, h: int, backward: bool) -> str:
    if b == 1:
        return "conv"  # batch 1: one F.conv2d with the mixed kernel
    return choose_mixture_strategy(b, k, h, g)


def run_grid(shapes, batches, kernel_counts, modes, repeats, min_time, strategies, clock):
    rows = []
    for backward in modes:
        for label, c, o, k, g, h in shapes:
            for e in kernel_counts:
                for b in batches:
                    cell = (label, c, o, k, g, h, e, b)
                    median, ratio = bench_cell(cell, backward, repeats, min_time, strategies, clock)
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
                            pick=_pick(b, c, o, k, g, h, backward),
                            time=median,
                            ratio=ratio,
                        )
                    )
                    print(
                        f"  {label} E={e} B={b} {'fwd+bwd' if backward else 'fwd'}: pycoe/timm {ratio['pycoe']:.2f}",
                        flush=True,
                    )
    return rows


def grid_table(rows, backward: bool, strategies: tuple[str, ...]) -> str:
    """The Markdown table of one mode (forward, or forward + backward) of the grid."""
    cols = ["pycoe", *strategies, "conv2d"]
    headers = ["shape", "E", "B", "timm ms", "pycoe ms (strategy)", *(f"{m}/timm" for m in cols)]
    cells = [
        [r["label"], r["E"], r["B"], f"{r['time']['timm'] * 1e3:.3f}", f"{r['time']['pycoe'] * 1e3:.3f} ({r['pick']})"]
        + [f"{r['ratio'][m]:.2f}" for m in cols]
        for r in rows
        if r["backward"] == backward
    ]
    return markdown_table(headers, cells, cell=str)


def _geo(values) -> float:
    return float(np.exp(np.mean(np.log(values))))


def summary(rows) -> str:
    out = []
    for backward in (False, True):
        for b in sorted({r["B"] for r in rows}):
            ratios = [r["ratio"]["pycoe"] for r in rows if r["backward"] == backward and r["B"] == b]
            if not ratios:
                continue
            out.append(
                f"- {'fwd+bwd' if backward else 'fwd'}, B={b}: pycoe/timm geometric mean {_geo(ratios):.2f}, "
                f"min {min(ratios):.2f}, max {max(ratios):.2f}; cells <= 1.00: {sum(x <= 1.0 for x in ratios)}"
                f"/{len(ratios)}, <= 1.05: {sum(x <= 1.05 for x in ratios)}/{len(ratios)}"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced grid (4 shapes, E=4)")
    parser.add_argument("--grid", choices=("main", "extended"), default="main", help="the shapes (see the source)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.02, help="seconds per timing (calls are repeated)")
    parser.add_argument("--batches", default="1,8,64", help="comma list of batch sizes")
    parser.add_argument("--kernels", default=None, help="comma list of kernel counts E (default 4,8; --quick: 4)")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument("--shapes", default=None, help="comma list of shape indices into the grid")
    parser.add_argument("--strategies", default="", help="explicit strategies to time too: comma list, or 'all'")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None, help="default: cpu with 1 thread, else wall")
    parser.add_argument("--json", default=None, help="write the raw results to this file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import timm

    grid = EXTENDED_SHAPES if args.grid == "extended" else SHAPES
    shapes = QUICK_SHAPES if args.quick else grid
    if args.shapes:
        shapes = [grid[int(i)] for i in args.shapes.split(",")]
    kernel_counts = (4,) if args.quick else KERNEL_COUNTS
    if args.kernels:
        kernel_counts = tuple(int(e) for e in args.kernels.split(","))
    strategies = EXPLICIT if args.strategies == "all" else tuple(s for s in args.strategies.split(",") if s)
    modes = [m == "fwdbwd" for m in args.modes.split(",")]
    batches = tuple(int(b) for b in args.batches.split(","))
    clock_name = args.clock or ("cpu" if torch.get_num_threads() == 1 else "wall")
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, clock: {'thread CPU time' if clock_name == 'cpu' else 'wall'}, "
        f"repeats = {args.repeats}, min time per timing {args.min_time} s, float32, bias=False, padding=k//2, stride 1"
    )
    print(f"load average (1, 5, 15 min) before: {load_average()}", flush=True)
    start = time.perf_counter()
    # one untimed cell first: the first convolutions of a process pay for one-off initialisation
    bench_cell(("warm-up", *shapes[0][1:], kernel_counts[0], batches[0]), False, 1, 0.0, (), clock)
    rows = run_grid(shapes, batches, kernel_counts, modes, args.repeats, args.min_time, strategies, clock)
    print(f"\ngrid time {time.perf_counter() - start:.0f} s; load average after: {load_average()}\n")
    for backward in modes:
        print(f"{'Forward + backward' if backward else 'Forward only'}\n")
        print(grid_table(rows, backward, strategies) + "\n")
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
