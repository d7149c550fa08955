"""CoE inference throughput against its ideal.

Collaboration of Experts (Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815) sends each sample to one expert.
Samples routed to the same expert can be batched, so a CoE should run almost as fast as the delegator plus a
*single* expert on the whole batch (the "ideal"). This script measures, side by side in one run:

* eval throughput (samples/s) at several batch sizes of
  - ``ideal``: delegator + expert 0 on the whole batch (no routing),
  - ``coe``: ``CoE.eval()`` routing every sample to its argmax expert, batched by expert (no early exit),
  - ``oracle``: delegator + each expert on its sub-batch split in advance (the routing without any dispatch
    work: what ``coe`` costs if gathering and scattering were free),
  - ``loop``: the same CoE called on one sample at a time,
  - ``dense``: delegator + every expert on the whole batch (what training mode costs),
  with ratios to ``ideal`` (target for ``coe`` at batch 256: >= 0.95).

Every measurement is the median of repeats, and the variants are interleaved within each repeat (the machine is
shared and noisy). The routing of the untrained delegator is spread over the experts on purpose (its BatchNorm
statistics are calibrated on the data and its selection head scaled), and the realised load is printed.

Where the time goes (``--profile``): ``torch.profiler`` self times of the convolutions, grouped by their number of
input channels (ResNet-18's stages), of the experts on the whole batch (the ideal) against the K experts on their
sub-batches, at each batch size.

Other ways to execute the experts (``--alternatives``), measured against running them one after the other, at the
benchmark's batch sizes:

* per ResNet-18 stage, K convolutions on their sub-batches against one grouped convolution of the K experts'
  stacked kernels over the sub-batches concatenated along channels (what fusing identical experts into one call
  computes) and against one convolution of a single kernel on the whole batch (the ideal's);
* the K experts run by a pool of 2 Python threads (1 intra-op thread each) against the main thread running
  them in turn with 2 intra-op threads.

Usage::

    python benchmarks/bench_coe.py                 # full run
    python benchmarks/bench_coe.py --quick         # fewer repeats, smaller batches
    python benchmarks/bench_coe.py --batches 8 32 64 --profile --alternatives
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import torchvision
from _common import interleaved_medians, load_average, markdown_table
from torch import nn

from pycoe import CoE, Delegator, ExpertPool


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


VARIANTS = ("ideal", "coe", "oracle", "loop", "dense")


def eval_throughput(
    model: CoE, batch: int, resolution: int, repeats: int, device: str | torch.device = "cpu", loop: bool = True
) -> tuple[list[int], dict[str, float]]:
    """Samples per second of each variant at one batch size (medians of interleaved repeats, under no_grad), and
    the realised load per expert. ``loop`` (the per-sample calls) is left out above batch 64 or when not asked."""
    delegator, pool, k = model.delegator, model.experts, model.num_experts
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    with torch.no_grad():
        index = delegator(x).selection_logits.argmax(1)
    load = torch.bincount(index, minlength=k).tolist()
    subs = [x[index == j] for j in range(k)]  # split in advance: no dispatch work in the timed call

    def ideal():
        delegator(x)
        pool[0](x)

    def oracle():
        delegator(x)
        for j, sub in enumerate(subs):
            if sub.shape[0]:
                pool[j](sub)

    def per_sample():
        for i in range(batch):
            model(x[i : i + 1])

    def dense():
        delegator(x)
        pool(x)

    variants = {"ideal": ideal, "coe": lambda: model(x), "oracle": oracle, "loop": per_sample, "dense": dense}
    if batch > 64 or not loop:
        del variants["loop"]  # minutes per repeat, and known: the loop's per-sample time barely changes
    with torch.no_grad():
        med = interleaved_medians(variants, repeats, device=device)
    return load, {name: batch / t for name, t in med.items()}


def bench_eval(args) -> None:
    k, classes, res = args.experts, 10, args.resolution
    calib = torch.randn(64, 3, res, res)
    model = build_coe(k, classes, res, calib)
    rows = []
    nan = float("nan")
    for batch in args.batches:
        load, thr = eval_throughput(model, batch, res, args.repeats)
        rows.append(
            [batch, str(load)]
            + [thr.get(n, nan) for n in VARIANTS]
            + [
                thr["coe"] / thr["ideal"],
                thr["oracle"] / thr["ideal"],
                thr["coe"] / thr["oracle"],
                thr.get("loop", nan) / thr["ideal"],
                thr["dense"] / thr["ideal"],
            ]
        )
        print(f"  batch {batch}: done", flush=True)
    print()
    print(f"Eval throughput (samples/s), K={k} resnet18 experts, mobilenet_v3_small delegator, {res}x{res} input")
    print()
    print(
        markdown_table(
            [
                "batch",
                "load per expert",
                "ideal",
                "coe",
                "oracle",
                "loop",
                "dense",
                "coe/ideal",
                "oracle/ideal",
                "coe/oracle",
                "loop/ideal",
                "dense/ideal",
            ],
            rows,
        )
    )
    print()


def routed_subbatches(model: CoE, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        index = model.delegator(x).selection_logits.argmax(1)
    return [x[index == j] for j in range(model.num_experts)]


def conv_times_by_width(fn, repeats: int) -> dict[int, float]:
    """Self CPU time (ms per call) of the convolutions run by ``fn``, by number of input channels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(repeats):
                fn()
    times: dict[int, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in ("aten::mkldnn_convolution", "aten::thnn_conv2d", "aten::_slow_conv2d_forward"):
            width = event.input_shapes[0][1]
            times[width] = times.get(width, 0.0) + event.self_cpu_time_total / repeats / 1e3
    return times


def bench_profile(args) -> None:
    model = build_coe(args.experts, 10, args.resolution, torch.randn(64, 3, args.resolution, args.resolution))
    pool = model.experts
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.resolution, args.resolution)
        subs = routed_subbatches(model, x)
        ideal = conv_times_by_width(lambda: pool[0](x), args.repeats)
        routed = conv_times_by_width(lambda: [pool[j](sub) for j, sub in enumerate(subs) if sub.shape[0]], args.repeats)
        for width in sorted(ideal):
            rows.append([batch, width, ideal[width], routed.get(width, 0.0), routed.get(width, 0.0) / ideal[width]])
        rows.append(
            [batch, "all", sum(ideal.values()), sum(routed.values()), sum(routed.values()) / sum(ideal.values())]
        )
    print("Where the time goes: convolution self time (ms per forward) by input channels (ResNet-18 stage)")
    print()
    print(markdown_table(["batch", "in channels", "one expert, whole batch", "K experts, sub-batches", "ratio"], rows))
    print()


def bench_alternatives(args) -> None:
    k, res = args.experts, args.resolution
    rows = []
    # (channels, spatial size) of ResNet-18's 3x3 stages at this resolution
    stages = [(64, res // 4), (128, res // 8), (256, res // 16), (512, res // 32)]
    for batch in args.batches:
        sub = max(batch // k, 1)
        for channels, size in stages:
            size = max(size, 1)
            kernels = [torch.randn(channels, channels, 3, 3) for _ in range(k)]
            stacked = torch.cat(kernels)  # [K*C, C, 3, 3]
            inputs = [torch.randn(sub, channels, size, size) for _ in range(k)]
            side_by_side = torch.cat(inputs, dim=1)  # [B/K, K*C, h, w]
            whole = torch.randn(sub * k, channels, size, size)
            variants = {
                "separate": lambda: [F.conv2d(i, w, padding=1) for i, w in zip(inputs, kernels)],
                "grouped": lambda: F.conv2d(side_by_side, stacked, padding=1, groups=k),
                "ideal": lambda: F.conv2d(whole, kernels[0], padding=1),
            }
            with torch.no_grad():
                med = interleaved_medians(variants, args.repeats * 2)
            rows.append(
                [
                    batch,
                    f"{channels}x{size}x{size}",
                    med["separate"] * 1e3,
                    med["grouped"] * 1e3,
                    med["ideal"] * 1e3,
                    med["grouped"] / med["separate"],
                    med["separate"] / med["ideal"],
                ]
            )
    print(f"Alternative 1: fuse the K experts' convolutions (ms per call; sub-batches of B/K = batch/{k})")
    print()
    print(
        markdown_table(
            [
                "batch",
                "stage (C x h x w)",
                "K separate",
                "1 grouped",
                "ideal (1 kernel, B)",
                "grouped/separate",
                "separate/ideal",
            ],
            rows,
        )
    )
    print()

    model = build_coe(k, 10, res, torch.randn(64, 3, res, res))
    pool = model.experts
    threads = torch.get_num_threads()
    executor = ThreadPoolExecutor(2)

    def one_thread() -> int:
        torch.set_num_threads(1)  # this worker's intra-op threads (OpenMP: per calling thread)
        return torch.get_num_threads()

    assert [f.result() for f in [executor.submit(one_thread) for _ in range(2)]] == [1, 1]
    torch.set_num_threads(2)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, res, res)
        subs = routed_subbatches(model, x)
        jobs = [(j, s) for j, s in enumerate(subs) if s.shape[0]]

        def run(part):
            with torch.no_grad():
                return [pool[j](s) for j, s in part]

        variants = {
            "in turn, 2 intra-op threads": lambda: run(jobs),
            "2 threads x 1 intra-op": lambda: [
                f.result() for f in [executor.submit(run, jobs[0::2]), executor.submit(run, jobs[1::2])]
            ],
            "ideal, 2 intra-op threads": lambda: pool[0](x),
        }
        with torch.no_grad():
            med = interleaved_medians(variants, args.repeats)
        rows.append(
            [batch, str([s.shape[0] for s in subs])]
            + [med[n] * 1e3 for n in variants]
            + [med["2 threads x 1 intra-op"] / med["in turn, 2 intra-op threads"]]
        )
    torch.set_num_threads(threads)
    executor.shutdown()
    print("Alternative 2: run the experts concurrently (ms per call of the K experts on their sub-batches)")
    print()
    print(
        markdown_table(
            [
                "batch",
                "load",
                "in turn, 2 intra-op threads",
                "2 threads x 1 intra-op",
                "ideal, 2 intra-op threads",
                "concurrent/in turn",
            ],
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
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 32 256 (quick: 1 32)")
    parser.add_argument("--profile", action="store_true", help="also: where the experts' time goes")
    parser.add_argument("--alternatives", action="store_true", help="also: grouped-convolution and threads")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.batches is None:
        args.batches = [1, 32] if args.quick else [1, 32, 256]
    if args.quick:
        args.resolution = min(args.resolution, 32)
    print(
        f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, repeats = {args.repeats}, "
        f"quick = {args.quick}, load average (1, 5, 15 min) = {load_average()}"
    )
    if not args.no_throughput:
        bench_eval(args)
    if args.profile:
        bench_profile(args)
    if args.alternatives:
        bench_alternatives(args)
    print(f"load average (1, 5, 15 min) at the end = {load_average()}")


if __name__ == "__main__":
    main()
