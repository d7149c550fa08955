"""Routing under torch.compile: the cost of the custom operator, and a compiled WGM + LGM + metrics step.

1. ``balanced_assignment`` (which runs the solver as the custom operator ``pycoe::balanced_assignment``) against
   ``solve_balanced_transport`` (the same solver called directly), eagerly: the operator's overhead.
2. One routing step (``BalancedTransportWeighter`` + ``LabelGenerator("best")`` + the routing metrics, what a
   CoE loss computes besides the losses) eagerly and compiled with ``fullgraph=True`` (backends ``aot_eager``
   and ``inductor``). The compile time is reported separately; the step times are medians after warm-up.

All timings are medians of repeats measured side by side in one process; ratios are the figures to read.

    python benchmarks/bench_transport_compile.py [--repeats 51] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import load_average, median_time

from pycoe.routing.labels import LabelGenerator
from pycoe.routing.metrics import agreement, assignment_entropy, expert_load, mean_selection_entropy
from pycoe.routing.transport import _solve_balanced_transport as solve_balanced_transport
from pycoe.routing.transport import balanced_assignment
from pycoe.routing.weighting import BalancedTransportWeighter


def median_us(fn, repeats: int) -> float:
    return median_time(fn, repeats) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=51)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, load {load_average()}")
    print(f"medians of {args.repeats} repeats (interleaved in rounds)\n")

    print("| N | K | balanced_assignment (op) us | solve_balanced_transport us | op / direct |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n, k in [(64, 4), (256, 4), (256, 16), (1024, 16), (4096, 16)]:
        s = torch.randn(n, k, generator=g).log_softmax(dim=1)
        op, direct = [], []
        for _ in range(3):  # interleave to share the machine's load
            op.append(median_us(lambda: balanced_assignment(s), args.repeats))
            direct.append(median_us(lambda: solve_balanced_transport(s), args.repeats))
        a, b = min(op), min(direct)
        print(f"| {n} | {k} | {a:.0f} | {b:.0f} | {a / b:.2f} |")

    wgm = BalancedTransportWeighter(4, epsilon=0.1)
    lgm = LabelGenerator("best")

    def step(logits, losses):
        w = wgm(logits)
        labels = lgm(losses)
        choice = logits.argmax(dim=1)
        return (
            w.weights,
            w.load,
            labels.index,
            expert_load(choice, 4),
            assignment_entropy(choice, 4, normalize=True),
            mean_selection_entropy(logits),
            agreement(logits, labels.index),
        )

    print("\n| B (K = 4) | eager us | aot_eager us | inductor us | aot_eager / eager | inductor / eager |")
    print("|---|---|---|---|---|---|")
    compiled = {}
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        fn = torch.compile(step, fullgraph=True, backend=backend, dynamic=True)
        t0 = time.perf_counter()
        fn(torch.randn(256, 4), torch.rand(256, 4))
        compiled[backend] = fn
        print(f"compile ({backend}, first call): {time.perf_counter() - t0:.1f} s")
    for b in (64, 256, 1024):
        logits, losses = torch.randn(b, 4, generator=g), torch.rand(b, 4, generator=g)
        for fn in compiled.values():
            fn(logits, losses)  # warm-up (no recompilation expected: dynamic batch)
        times: dict[str, list[float]] = {"eager": [], "aot_eager": [], "inductor": []}
        for _ in range(3):
            times["eager"].append(median_us(lambda: step(logits, losses), args.repeats))
            for name, fn in compiled.items():
                times[name].append(median_us(lambda: fn(logits, losses), args.repeats))
        e, a, i = (min(times[n]) for n in ("eager", "aot_eager", "inductor"))
        print(f"| {b} | {e:.0f} | {a:.0f} | {i:.0f} | {a / e:.2f} | {i / e:.2f} |")


if __name__ == "__main__":
    main()
