"""The two routes of the exact balanced-transport solver, side by side.

``solve_balanced_transport(method="exact")`` solves small problems with many experts as an assignment problem
on capacity-replicated columns (scipy's ``linear_sum_assignment``) and everything else by warm start + flow
repair. This script times both routes on the same instances (forcing each through the switch in
``pycoe.routing.transport.exact``) to
check where the switch sits. Prints a markdown table of medians; both routes are exact, and the script checks
that their objectives agree.

    python benchmarks/bench_transport_routes.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import median_time

from pycoe.routing.transport import _solve_balanced_transport as solve_balanced_transport
from pycoe.routing.transport import exact

SIZES = [
    (64, 64),
    (128, 4),
    (256, 4),
    (256, 16),
    (256, 32),
    (256, 64),
    (384, 16),
    (512, 16),
    (512, 32),
    (512, 64),
    (1024, 64),
    (1024, 128),
    (2048, 128),
]


def timed_route(scores: np.ndarray, limits: tuple[int, int], repeats: int) -> tuple[float, float]:
    """Median milliseconds of the exact solve with the route switch's limits set to ``limits``, and its objective."""
    saved = (exact._LSA_MAX_N, exact._LSA_SAMPLES_PER_EXPERT)
    exact._LSA_MAX_N, exact._LSA_SAMPLES_PER_EXPERT = limits
    out = {}

    def solve():
        out["objective"] = solve_balanced_transport(scores).objective

    try:
        ms = median_time(solve, repeats) * 1e3
    finally:
        exact._LSA_MAX_N, exact._LSA_SAMPLES_PER_EXPERT = saved
    return ms, out["objective"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch.get_num_threads() = {torch.get_num_threads()}, medians of {args.repeats}, standard normal scores\n")
    print("| N | K | flow route ms | assignment route ms | flow / assignment | default route |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n, k in SIZES:
        s = rng.standard_normal((n, k))
        flow_ms, flow_obj = timed_route(s, (0, 0), args.repeats)
        lsa_ms, lsa_obj = timed_route(s, (10**9, 10**9), args.repeats)
        if abs(flow_obj - lsa_obj) > 1e-9 * (1 + abs(flow_obj)):
            raise SystemExit(f"objectives differ at {n}x{k}: {flow_obj} vs {lsa_obj}")
        default = "assignment" if exact._assignment_route(n, k) else "flow"
        print(f"| {n} | {k} | {flow_ms:.2f} | {lsa_ms:.2f} | {flow_ms / lsa_ms:.2f} | {default} |")


if __name__ == "__main__":
    main()
