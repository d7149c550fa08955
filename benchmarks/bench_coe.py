"""CoE inference throughput against its ideal.

Collaboration of Experts (Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815) sends each sample to one expert.
Samples routed to the same expert can be batched, so a CoE should run almost as fast as the delegator plus a
*single* expert on the whole batch (the "ideal"). This script measures, side by side in one run:

* eval throughput (samples/s) at several batch sizes of
  - ``ideal``: delegator + expert 0 on the whole batch (no routing),
  - ``coe``: ``CoE.eval()`` routing every sample to its argmax expert, batched by expert (no early exit),
  - ``loop``: the same CoE called on one sample at a time,
  - ``dense``: delegator + every expert on the whole batch (what training mode costs),
  with ratios to ``ideal`` (target for ``coe`` at batch 256: >= 0.95).

Every measurement is the median of repeats, and the variants are interleaved within each repeat (the machine is
shared and noisy). The routing of the untrained delegator is spread over the experts on purpose (its BatchNorm
statistics are calibrated on the data and its selection head scaled), and the realised load is printed.

Usage::

    python benchmarks/bench_coe.py            # full run
    python benchmarks/bench_coe.py --quick    # fewer repeats, smaller batches
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torchvision
from torch import nn

from pycoe.coe.delegator import Delegator
from pycoe.coe.experts import ExpertPool
from pycoe.coe.model import CoE


def markdown(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build_coe(k: int, classes: int, resolution: int, calib: torch.Tensor) -> CoE:
    torch.manual_seed(0)
    delegator = Delegator(
        torchvision.models.mobilenet_v3_small(weights=None),
        num_experts=k,
        num_classes=classes,
        zero_init_selection=False,
    )
    experts = ExpertPool.from_template(torchvision.models.resnet18(weights=None, num_classes=classes), k, init="reinit")
    # An untrained MobileNetV3 has near-zero eval features (default BatchNorm statistics): calibrate them, then
    # spread the selection so that the routed path really splits the batch.
    for m in delegator.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        delegator.train()(calib)
        delegator.selection_head.weight.mul_(200.0)
    return CoE(delegator, experts).eval()


def bench_eval(args) -> None:
    k, classes, res = args.experts, 10, args.resolution
    calib = torch.randn(64, 3, res, res)
    model = build_coe(k, classes, res, calib)
    delegator, pool = model.delegator, model.experts
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, res, res)
        with torch.no_grad():
            index = delegator(x).selection_logits.argmax(1)
        load = torch.bincount(index, minlength=k).tolist()

        def ideal():
            delegator(x)
            pool[0](x)

        def coe():
            model(x)

        def loop():
            for i in range(batch):
                model(x[i : i + 1])

        def dense():
            delegator(x)
            pool(x)

        variants = {"ideal": ideal, "coe": coe, "loop": loop, "dense": dense}
        times = {name: [] for name in variants}
        with torch.no_grad():
            for fn in variants.values():  # warm-up
                fn()
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    times[name].append(timed(fn))
        med = {name: statistics.median(t) for name, t in times.items()}
        thr = {name: batch / med[name] for name in med}
        rows.append(
            [batch, str(load)]
            + [thr[n] for n in variants]
            + [thr["coe"] / thr["ideal"], thr["loop"] / thr["ideal"], thr["dense"] / thr["ideal"]]
        )
        print(f"  batch {batch}: done", flush=True)
    print()
    print(f"Eval throughput (samples/s), K={k} resnet18 experts, mobilenet_v3_small delegator, {res}x{res} input")
    print()
    print(
        markdown(
            ["batch", "load per expert", "ideal", "coe", "loop", "dense", "coe/ideal", "loop/ideal", "dense/ideal"],
            rows,
        )
    )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batches 1 and 32 only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    args.batches = [1, 32] if args.quick else [1, 32, 256]
    if args.quick:
        args.resolution = min(args.resolution, 32)
    print(
        f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, repeats = {args.repeats}, "
        f"quick = {args.quick}, load average (1, 5, 15 min) = {os.getloadavg()}"
    )
    bench_eval(args)


if __name__ == "__main__":
    main()
