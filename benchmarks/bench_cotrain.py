"""Concurrent vs sequential inference of a co-trained ensemble on the CPU (pycoe.cotrain.CoTrainingEnsemble).

The members are torchvision ResNet-18s (100 classes) divided with :func:`pycoe.cotrain.divide_module` into
S = 2 and 4, run on 32x32 images. For each (intra-op threads, S, batch) the two modes are timed side by
side in the same process, alternating, and the medians of the repeats are reported with their ratio
(sequential / concurrent: > 1 means the thread pool helps). Outputs are checked to be exactly equal.

The machine's load average is printed before and after (the ratios are only meaningful with it).

Run:  python benchmarks/bench_cotrain.py [--repeats 11] [--threads 1 2] [--batch-sizes 4 32] [--size 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics

import torch
from _common import load_average, timed

from pycoe.cotrain import count_parameters, divide_module
from pycoe.cotrain.ensemble import CoTrainingEnsemble


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--splits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--size", type=int, default=32, help="image side")
    args = p.parse_args(argv)

    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None, num_classes=100)
    print(
        f"# {platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}; "
        f"ResNet-18 ({count_parameters(base):,} params) divided into S members, {args.size}x{args.size} input; "
        f"median of {args.repeats} repeats (modes alternated); load average {load_average()}"
    )
    rows = []
    ensembles = {}
    for s in args.splits:
        members = [m.eval() for m in divide_module(base, s)]
        ensembles[s] = CoTrainingEnsemble(members).eval()
    header = "| threads | S | batch | sequential (ms) | concurrent (ms) | seq / conc |"
    print(header)
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for s in args.splits:
            seq = ensembles[s]
            conc = copy.deepcopy(seq)
            conc.concurrent = True
            for b in args.batch_sizes:
                x = torch.randn(b, 3, args.size, args.size)
                with torch.inference_mode():
                    assert torch.equal(seq(x), conc(x)), "concurrent output differs from sequential"
                    seq(x), conc(x)  # warm-up
                    t_seq, t_conc = [], []
                    for _ in range(args.repeats):
                        t_seq.append(timed(lambda: seq(x)))
                        t_conc.append(timed(lambda: conc(x)))
                ms_seq, ms_conc = 1e3 * statistics.median(t_seq), 1e3 * statistics.median(t_conc)
                row = {"threads": threads, "S": s, "batch": b, "sequential_ms": ms_seq, "concurrent_ms": ms_conc}
                rows.append(row)
                print(f"| {threads} | {s} | {b} | {ms_seq:.1f} | {ms_conc:.1f} | {ms_seq / ms_conc:.2f} |", flush=True)
    print(f"# load average at the end: {load_average()}")
    return rows


if __name__ == "__main__":
    main()
