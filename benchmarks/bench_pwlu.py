"""Benchmark of pycoe.functional.pwlu against ReLU, eager and under torch.compile.

Forward + backward time of PWLU (layer and channel granularity) next to ReLU, measured side by side in one
process: every repeat runs every candidate once, in turn, so that all of them see the same machine load;
the table gives medians over the repeats of the wall time and of the process's CPU time (the latter is the
steadier figure on a shared machine: time stolen by other processes does not count). Each step is
``x.grad = None; f(x).backward(g)``, as in training (a fresh input gradient per step).

* eager: ``torch.relu`` against ``pwlu`` (the chunked CPU kernel);
* compiled: ``torch.compile`` (inductor, CPU) of each, ratios against the compiled ReLU and the eager ReLU.

Also the bytes that autograd saves for backward per input byte, measured with
``torch.autograd.graph.saved_tensors_hooks`` (the unique storages packed), and optionally
(``--with-gather``) a straightforward autograd PWLU in the index-and-gather style of the community ports.

    python benchmarks/bench_pwlu.py                          # both shapes, eager and compiled
    python benchmarks/bench_pwlu.py --threads 1,2 --repeats 21
    python benchmarks/bench_pwlu.py --modes eager --quick    # a smoke run
    python benchmarks/bench_pwlu.py --floor                  # the ATen ops of the eager kernel, per element
    python benchmarks/bench_pwlu.py --modes eager --threads 2 --shapes 8x16x48x48,32x64x28x28

``--floor`` times, on one cache-resident chunk (in a loop, no allocation, no Python between the ops beyond the
calls themselves), the exact sequence of ATen ops that the eager kernel issues per chunk (forward: index,
two gathers, multiply-add; backward: index, gather, two products, int64 copy, two ``scatter_add_``) next to
ReLU's forward and backward on the same chunk: the lowest cost per element that any kernel built from these
ATen ops can reach.

Targets: eager PWLU fwd+bwd <= 4x ReLU; compiled PWLU <= 2x compiled ReLU; at (32, 64, 28, 28)
and (64, 64, 56, 56); at most 1 byte saved per input byte.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import load_average
from torch import Tensor

from pycoe.functional import pwlu

N_INTERVALS = 16


def pwlu_gather(x: Tensor, points: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor, channel_dim: int) -> Tensor:
    """Straightforward autograd PWLU: normalise, floor to an int64 index, gather two knots, interpolate."""
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
        idx = idx + (torch.arange(rows, device=x.device) * k).view(shape)
    flat = points.reshape(-1)
    y0, y1 = torch.take(flat, idx), torch.take(flat, idx + 1)
    inside = y0 + frac * (y1 - y0)
    outside_left = (x - left) * ks.view(shape) + points[:, 0].view(shape)
    outside_right = (x - right) * kr.view(shape) + points[:, n].view(shape)
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


def load() -> str:
    return f"load average: {load_average()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--threads", default=None, help="comma-separated torch.set_num_threads values (default: keep)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per candidate (median)")
    parser.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    parser.add_argument("--with-gather", action="store_true", help="also time the gather-style autograd PWLU")
    parser.add_argument("--floor", action="store_true", help="time the eager kernel's ATen ops on one chunk")
    parser.add_argument("--shapes", default=None, help="comma-separated input shapes, e.g. 8x16x48x48,32x64x28x28")
    args = parser.parse_args()
    if args.floor:
        for threads in [int(t) for t in args.threads.split(",")] if args.threads else [1]:
            torch.set_num_threads(threads)
            op_floor(args.repeats)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("eager", "compiled"):
            parser.error(f"unknown mode {m!r}")
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    shapes = [(32, 64, 28, 28), (64, 64, 56, 56)] if not args.quick else [(8, 16, 14, 14), (8, 32, 28, 28)]
    if args.shapes:
        shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
    print(f"torch {torch.__version__}, float32, N = {N_INTERVALS}, {args.repeats} interleaved repeats (medians)")
    print(f"start: {load()}")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for shape in shapes:
            run_shape(shape, modes, args.repeats, args.with_gather)
    print(f"end: {load()}")


def run_shape(shape: tuple[int, ...], modes: list[str], repeats: int, with_gather: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    g = torch.randn(shape)
    layer, chan = make_params(1), make_params(shape[1])
    candidates: dict[str, Callable[[Tensor], Tensor]] = {"ReLU": torch.relu}
    if "eager" in modes:
        candidates["PWLU layer"] = lambda t: pwlu(t, *layer)
        candidates["PWLU channel"] = lambda t: pwlu(t, *chan)
        if with_gather:
            candidates["gather PWLU layer"] = lambda t: pwlu_gather(t, *layer, channel_dim=1)
            candidates["gather PWLU channel"] = lambda t: pwlu_gather(t, *chan, channel_dim=1)
    if "compiled" in modes:
        torch._dynamo.reset()
        relu_c = torch.compile(lambda t: torch.relu(t), dynamic=False)
        pwlu_c = torch.compile(lambda t, *p: pwlu(t, *p), dynamic=False)
        candidates["compiled ReLU"] = relu_c
        candidates["compiled PWLU layer"] = lambda t: pwlu_c(t, *layer)
        candidates["compiled PWLU channel"] = lambda t: pwlu_c(t, *chan)
    xr = x.clone().requires_grad_()

    def step(fn: Callable[[Tensor], Tensor]) -> tuple[float, float]:
        xr.grad = None
        for p in layer + chan:
            p.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        fn(xr).backward(g)
        return time.perf_counter() - t0, time.process_time() - c0

    compile_s = {}
    for name, fn in candidates.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        step(fn)
        compile_s[name] = time.perf_counter() - t0
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            w, c = step(fn)
            wall[name].append(w)
            cpu[name].append(c)
    med_w = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
    med_c = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    print()
    print(f"### {shape}, torch.get_num_threads() = {torch.get_num_threads()}; {load()}")
    print()
    print("| candidate | wall ms | CPU ms | CPU vs ReLU | CPU vs compiled ReLU | saved bytes / input byte |")
    print("|---|---|---|---|---|---|")
    for name, fn in candidates.items():
        saved = saved_bytes_per_input_byte(fn, x.clone().requires_grad_())
        vs_relu = med_c[name] / med_c["ReLU"]
        vs_comp = f"{med_c[name] / med_c['compiled ReLU']:.2f}x" if "compiled ReLU" in med_c else "-"
        print(f"| {name} | {med_w[name]:.2f} | {med_c[name]:.2f} | {vs_relu:.2f}x | {vs_comp} | {saved:.2f} |")
    if "compiled" in modes:
        first = ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items() if k.startswith("compiled"))
        print(f"\n(first call, including compilation: {first})")


def op_floor(repeats: int, chunk: int = 1 << 17) -> None:
    """CPU time per element of the eager kernel's per-chunk ATen ops, and of ReLU, on one resident chunk."""
    torch.manual_seed(0)
    n = N_INTERVALS
    x, g = 3 * torch.randn(chunk), torch.randn(chunk)
    v, w, out, gx = torch.empty(chunk), torch.empty(chunk), torch.empty(chunk), torch.empty(chunk)
    idx, lidx = torch.empty(chunk, dtype=torch.int32), torch.empty(chunk, dtype=torch.int64)
    alpha, beta = torch.randn(n + 2), torch.randn(n + 2)
    part_a, part_b = torch.zeros(n + 2), torch.zeros(n + 2)
    scale, shift = torch.tensor([n / 6.0]), torch.tensor([1.0 + 3.0 * n / 6.0])

    def index() -> None:
        torch.mul(x, scale, out=v)
        v.add_(shift)
        v.clamp_(0, n + 1)
        idx.copy_(v)
        idx.clamp_(0, n + 1)

    def forward() -> None:
        index()
        torch.index_select(alpha, 0, idx, out=w)
        torch.index_select(beta, 0, idx, out=v)
        torch.addcmul(w, v, x, out=out)

    def backward() -> None:
        index()
        torch.index_select(beta, 0, idx, out=w)
        torch.mul(w, g, out=gx)
        torch.mul(g, x, out=v)
        lidx.copy_(idx)
        part_a.scatter_add_(0, lidx, g)
        part_b.scatter_add_(0, lidx, v)

    def relu_forward() -> None:
        torch.relu(x)

    def relu_backward() -> None:
        torch.ops.aten.threshold_backward(g, out, 0.0)

    results = {}
    for name, fn in {"PWLU forward": forward, "PWLU backward": backward}.items():
        results[name] = _ns_per_element(fn, chunk, repeats)
    for name, fn in {"ReLU forward": relu_forward, "ReLU backward": relu_backward}.items():
        results[name] = _ns_per_element(fn, chunk, repeats)
    print(
        f"\n### ATen op floor, one chunk of {chunk} float32 elements, torch.get_num_threads() = "
        f"{torch.get_num_threads()}; {load()}\n"
    )
    print("| ops | CPU ns / element (median) |")
    print("|---|---|")
    for name, ns in results.items():
        print(f"| {name} | {ns:.2f} |")
    pw = results["PWLU forward"] + results["PWLU backward"]
    rl = results["ReLU forward"] + results["ReLU backward"]
    print(f"| PWLU fwd+bwd / ReLU fwd+bwd | {pw / rl:.1f}x |")


def _ns_per_element(fn: Callable[[], None], chunk: int, repeats: int, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        for _ in range(calls):
            fn()
        times.append((time.process_time() - c0) / calls)
    return statistics.median(times) / chunk * 1e9


if __name__ == "__main__":
    main()
