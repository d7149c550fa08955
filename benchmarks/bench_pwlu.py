"""Benchmark of the PWLU fast path (pycoe.functional.pwlu).

Forward + backward time of PWLU (layer and channel granularity) against ReLU and against a straightforward
autograd implementation in the index-and-gather style of the community ports (written here from the
formula), measured side by side in one run (the candidates are interleaved in every repeat; medians).
Also the bytes that autograd saves for backward per input byte, measured with
``torch.autograd.graph.saved_tensors_hooks`` (sum of the unique storages packed).

    python benchmarks/bench_pwlu.py                # (64, 64, 56, 56) NCHW and (32, 128, 512) (B, T, C)
    python benchmarks/bench_pwlu.py --quick        # smaller shapes
    python benchmarks/bench_pwlu.py --threads 1,2 --repeats 7   # one table per thread count

Targets (issue 2): PWLU forward+backward within 3x of ReLU's time; at most 1.25 bytes saved per input byte.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from pycoe.functional.pwlu import pwlu

N_INTERVALS = 16


def pwlu_gather(x: Tensor, points: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor, channel_dim: int) -> Tensor:
    """Straightforward autograd PWLU: normalise, floor to an int64 index, gather two knots, interpolate.

    points: Tensor[P, N + 1]; lb, rb, ks, kr: Tensor[P]; P = 1 (layer) or the channel count.
    """
    rows, k = points.shape
    n = k - 1
    shape = [1] * x.dim()
    if rows > 1:
        shape[channel_dim] = rows
    left, right = lb.view(shape), rb.view(shape)
    d = (right - left) / n
    u = (x - left) / d
    idx = u.detach().floor().clamp(0, n - 1).long()
    frac = u - idx
    if rows > 1:
        offset = (torch.arange(rows, device=x.device) * k).view(shape)
        idx = idx + offset
    flat = points.reshape(-1)
    y0 = torch.take(flat, idx)
    y1 = torch.take(flat, idx + 1)
    inside = y0 + frac * (y1 - y0)
    first, last = points[:, 0].view(shape), points[:, n].view(shape)
    outside_left = (x - left) * ks.view(shape) + first
    outside_right = (x - right) * kr.view(shape) + last
    return torch.where(x < left, outside_left, torch.where(x >= right, outside_right, inside))


def make_params(rows: int) -> list[Tensor]:
    pts = torch.nn.functional.relu(torch.linspace(-3, 3, N_INTERVALS + 1)).repeat(rows, 1)
    pts = pts + 0.05 * torch.randn_like(pts)
    return [
        pts.requires_grad_(),
        torch.full((rows,), -3.0, requires_grad=True),
        torch.full((rows,), 3.0, requires_grad=True),
        torch.zeros(rows, requires_grad=True),
        torch.ones(rows, requires_grad=True),
    ]


def saved_bytes_per_input_byte(fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """Bytes of the unique storages autograd packs for backward, divided by the input's bytes."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(storages.values()) / (x.numel() * x.element_size())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument(
        "--threads", default=None, help="comma-separated torch.set_num_threads values, one table each (default: keep)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per candidate (median)")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    for i, threads in enumerate(thread_counts):
        if i:
            print()
        torch.set_num_threads(threads)
        run_table(args.quick, args.repeats)


def run_table(quick: bool, repeats: int) -> None:
    torch.manual_seed(0)
    cases = [("NCHW", (64, 64, 56, 56), 1), ("(B, T, C)", (32, 128, 512), -1)]
    if quick:
        cases = [("NCHW", (8, 32, 28, 28), 1), ("(B, T, C)", (8, 64, 256), -1)]
    print(
        f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, float32, "
        f"N = {N_INTERVALS}, {repeats} repeats (median), forward + backward"
    )
    print("load average (1, 5, 15 min) at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print()
    header = "| input | candidate | fwd+bwd ms (median) | vs ReLU | saved bytes / input byte |"
    print(header)
    print("|" + "---|" * 5)
    for label, shape, cd in cases:
        x = torch.randn(shape)
        g = torch.randn(shape)
        channels = shape[cd]
        layer, chan = make_params(1), make_params(channels)
        candidates: dict[str, Callable[[Tensor], Tensor]] = {
            "ReLU": torch.relu,
            "pycoe pwlu, layer": lambda t: pwlu(t, *layer, channel_dim=cd),
            "pycoe pwlu, channel": lambda t: pwlu(t, *chan, channel_dim=cd),
            "gather autograd, layer": lambda t: pwlu_gather(t, *layer, channel_dim=cd % len(shape)),
            "gather autograd, channel": lambda t: pwlu_gather(t, *chan, channel_dim=cd % len(shape)),
        }
        times: dict[str, list[float]] = {name: [] for name in candidates}
        xr = x.clone().requires_grad_()

        def run(fn: Callable[[Tensor], Tensor]) -> float:
            xr.grad = None
            for p in layer + chan:
                p.grad = None
            t0 = time.perf_counter()
            fn(xr).backward(g)
            return time.perf_counter() - t0

        for fn in candidates.values():  # warm-up
            run(fn)
        for _ in range(repeats):
            for name, fn in candidates.items():  # interleaved: every repeat sees the same machine load
                times[name].append(run(fn))
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        for name, fn in candidates.items():
            saved = saved_bytes_per_input_byte(fn, x.clone().requires_grad_())
            ratio = med[name] / med["ReLU"]
            print(f"| {label} {tuple(shape)} | {name} | {med[name]:.1f} | {ratio:.2f}x | {saved:.2f} |")
    print("load average (1, 5, 15 min) at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
