"""Benchmark: pycoe's exact balanced-transport solver against generic solvers and approximations.

Peers (side by side, same instances, same process):
  * POT ``ot.emd`` (network simplex) on the N x K problem with marginals 1 and the capacities;
  * scipy ``linprog`` (HiGHS) on the LP;
  * scipy ``linear_sum_assignment`` on the score matrix with each expert's column repeated c_k times;
  * pycoe's own ``"sinkhorn"`` and ``"greedy"`` methods (approximate: the relative objective gap is shown).

Scores imitate WGM's: log-softmax of (2 * standard normal + a linear per-expert bias), so experts are not
equally popular and the capacities bind. Capacities: near-equal.

Usage:
    python benchmarks/bench_transport.py            # full grid (slow: N up to 1,281,167)
    python benchmarks/bench_transport.py --quick    # small grid
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from _common import median_time

from pycoe.routing.transport import _solve_balanced_transport as solve_balanced_transport
from pycoe.routing.transport import near_equal_capacities

# Size caps for the generic peers (N * K entries, or N for the N x N Hungarian matrix).
LIMITS = {"ot.emd": 1 << 19, "linprog": 1 << 13, "lsa": 1024, "sinkhorn": 1 << 21}
TIME_CAP = 60.0  # a peer that took longer than this is not run on larger sizes


def make_scores(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, k, generator=g) + torch.linspace(0.0, 3.0, k)
    return torch.log_softmax(z, dim=1)  # float32


def run_exact(s, caps):
    return solve_balanced_transport(s, caps).objective


def run_sinkhorn(s, caps):
    return solve_balanced_transport(s, caps, method="sinkhorn").objective


def run_greedy(s, caps):
    return solve_balanced_transport(s, caps, method="greedy").objective


def run_emd(s, caps):
    import ot

    x = s.double().numpy()
    plan = ot.emd(np.ones(x.shape[0]), caps.astype(np.float64), -x, numItermax=10_000_000)
    return float((plan * x).sum())


def run_linprog(s, caps):
    """The LP (one equality per sample and per expert, x >= 0) solved by scipy's HiGHS; its optimal objective."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    x = s.double().numpy()
    n, k = x.shape
    rows = np.concatenate([np.repeat(np.arange(n), k), n + np.tile(np.arange(k), n)])
    cols = np.concatenate([np.arange(n * k), np.arange(n * k)])
    a_eq = coo_matrix((np.ones(2 * n * k), (rows, cols)), shape=(n + k, n * k)).tocsr()
    b_eq = np.concatenate([np.ones(n), np.asarray(caps, dtype=np.float64)])
    res = linprog(-x.reshape(-1), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"linprog failed: {res.message}")
    return -float(res.fun)


def run_lsa(s, caps):
    from scipy.optimize import linear_sum_assignment

    x = s.double().numpy()
    cols = np.repeat(np.arange(x.shape[1]), caps)
    r, c = linear_sum_assignment(x[:, cols], maximize=True)
    return float(x[r, cols[c]].sum())


PEERS = {
    "ot.emd": run_emd,
    "linprog": run_linprog,
    "lsa": run_lsa,
    "sinkhorn": run_sinkhorn,
    "greedy": run_greedy,
}


def timed_peer(fn, s, caps, repeats):
    """Median seconds of ``fn(s, caps)`` over ``repeats`` calls, and its value."""
    out = {}

    def call():
        out["value"] = fn(s, caps)

    return median_time(call, repeats), out["value"]


def size_of(name, n, k):
    return n if name == "lsa" else n * k


def peak_memory_child(n: int, k: int) -> dict:
    """Run the exact solver in a fresh process (this script, ``--memory-child N K``) and report its peak memory.

    Uses VmHWM from /proc/self/status (reset by exec, unlike ru_maxrss, which Linux carries over from
    the parent) and tracemalloc's peak of the NumPy allocations made by the solve itself.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(n), str(k)]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(n: int, k: int) -> None:
    """The child of :func:`peak_memory_child`: solve once and print the measurements as JSON."""
    import tracemalloc

    s = make_scores(n, k)
    before = _hwm_mb()
    tracemalloc.start()
    t = time.perf_counter()
    solve_balanced_transport(s)
    dt = time.perf_counter() - t
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    print(json.dumps({"before_mb": before, "peak_mb": _hwm_mb(), "traced_mb": traced, "seconds": dt}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grid (N in {256, 4096}, K in {4, 16})")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (numpy is single-threaded here)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory measurement")
    ap.add_argument("--memory-child", type=int, nargs=2, metavar=("N", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        torch.set_num_threads(args.threads)
        memory_child(*args.memory_child)
        return
    if args.memory_only:
        torch.set_num_threads(args.threads)
        print_memory()
        return

    torch.set_num_threads(args.threads)
    import ot  # noqa: F401  (import and first-call costs out of the timings)

    run_emd(make_scores(8, 2), np.array([4, 4]))
    run_exact(make_scores(8, 2), np.array([4, 4]))
    ns = [256, 4096] if args.quick else [256, 4096, 65536, 1281167]
    ks = [4, 16] if args.quick else [4, 16, 64]
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(
        f"median of {args.repeats} repeats (1 for N >= 65536); ratio = peer time / exact time; "
        "gap = (exact objective - peer objective) / |exact objective|\n"
    )

    rows = []
    slow: set[str] = set()
    for n in ns:
        for k in ks:
            s = make_scores(n, k)
            caps = near_equal_capacities(n, k).numpy()
            reps = args.repeats if n < 65536 else 1
            t_ex, obj = timed_peer(run_exact, s, caps, reps)
            rows.append((n, k, "exact (pycoe)", f"{t_ex * 1e3:.1f}", "1.00", "0 (optimal)"))
            print(f"N={n} K={k} exact {t_ex * 1e3:.1f} ms", flush=True)
            for name, fn in PEERS.items():
                if size_of(name, n, k) > LIMITS.get(name, 1 << 62) or name in slow:
                    rows.append((n, k, name, "skipped (too large)", "", ""))
                    continue
                t, val = timed_peer(fn, s, caps, reps if name not in ("linprog", "lsa", "ot.emd") or n <= 4096 else 1)
                if t > TIME_CAP:
                    slow.add(name)
                gap = (obj - val) / abs(obj) if obj else 0.0
                gap_s = f"{gap:.2e}" if abs(gap) > 1e-12 else "0"
                rows.append((n, k, name, f"{t * 1e3:.1f}", f"{t / t_ex:.2f}", gap_s))
                print(f"N={n} K={k} {name} {t * 1e3:.1f} ms gap {gap_s}", flush=True)

    print("\n| N | K | method | median ms | ratio vs exact | relative objective gap |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")

    if not args.no_memory and not args.quick:
        print_memory()


def print_memory():
    mem = peak_memory_child(1281167, 16)
    print(
        f"\nexact, N=1,281,167, K=16 in a fresh process: {mem['seconds']:.2f} s (under tracemalloc), "
        f"peak RSS (VmHWM) {mem['peak_mb']:.0f} MB, of which {mem['before_mb']:.0f} MB before the solve "
        f"(python, torch, the float32 scores); NumPy peak traced during the solve {mem['traced_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
