"""Slow, obviously-correct oracles for the balanced transportation problem (pycoe.routing.transport).

- :func:`reference_exact`: the LP solved by scipy's HiGHS (any N, K, capacities, forbidden ``-inf`` pairs).
- :func:`lsa_optimum`: the assignment problem on capacity-replicated expert columns (scipy's Hungarian
  ``linear_sum_assignment``; cubic in N, small N only).
- :func:`enumerate_optimum`: every one of the K^N assignments with the given loads (tiny N only).
- :func:`sequential_greedy`: the greedy capacity fill as the plain sequential scan it is defined as.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import linear_sum_assignment, linprog
from scipy.sparse import coo_matrix

from pycoe.routing.transport import TransportInfeasibleError


def near_equal(n: int, k: int) -> list[int]:
    """``n // k`` each, the remainder one by one to the first experts (written out independently)."""
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def reference_exact(scores, caps) -> tuple[np.ndarray, float]:
    """The LP solved by HiGHS. Returns (x[N, K], optimal objective); raises TransportInfeasibleError if infeasible.

    ``-inf`` scores are forbidden pairs (their variable is fixed to 0).
    """
    s = np.asarray(scores, dtype=np.float64)
    caps = np.asarray(caps)
    N, K = s.shape
    rows = np.concatenate([np.repeat(np.arange(N), K), N + np.tile(np.arange(K), N)])
    cols = np.concatenate([np.arange(N * K), np.arange(N * K)])
    A = coo_matrix((np.ones(2 * N * K), (rows, cols)), shape=(N + K, N * K)).tocsr()
    b = np.concatenate([np.ones(N), caps.astype(np.float64)])
    finite = np.isfinite(s).reshape(-1)
    c = -np.where(np.isfinite(s), s, 0.0).reshape(-1)
    bounds = np.stack([np.zeros(N * K), np.where(finite, np.inf, 0.0)], axis=1)
    res = linprog(c, A_eq=A, b_eq=b, bounds=bounds, method="highs")
    if res.status == 2:
        raise TransportInfeasibleError("reference LP is infeasible")
    if res.status != 0:
        raise RuntimeError(f"reference LP failed: {res.message}")
    return res.x.reshape(N, K), -float(res.fun)


def lp_objective(scores, caps) -> float:
    """Optimal objective of the LP (see :func:`reference_exact`)."""
    return reference_exact(scores, caps)[1]


def lsa_optimum(scores, caps=None) -> tuple[float, np.ndarray]:
    """Optimal (objective, assignment[N]) by the Hungarian algorithm on replicated expert columns (maximising)."""
    s = np.asarray(scores, dtype=np.float64)
    n, k = s.shape
    caps = near_equal(n, k) if caps is None else list(caps)
    cols = np.repeat(np.arange(k), caps)
    rows, c = linear_sum_assignment(s[:, cols], maximize=True)
    a = np.empty(n, dtype=np.int64)
    a[rows] = cols[c]
    return float(s[np.arange(n), a].sum()), a


def enumerate_optimum(scores, caps=None) -> float:
    """Optimal objective by enumerating all K^N assignments whose loads equal the capacities."""
    s = np.asarray(scores, dtype=np.float64)
    n, k = s.shape
    caps = near_equal(n, k) if caps is None else list(caps)
    best = -np.inf
    for a in itertools.product(range(k), repeat=n):
        if np.bincount(a, minlength=k).tolist() == list(caps):
            best = max(best, float(s[np.arange(n), list(a)].sum()))
    return best


def sequential_greedy(s: np.ndarray, caps) -> list[int]:
    """Greedy fill: pairs by (-score, i, k); take a pair when its sample is free and its expert not full."""
    n, k = s.shape
    order = sorted((-s[i, j], i, j) for i in range(n) for j in range(k))
    a = [-1] * n
    rem = list(np.asarray(caps))
    for _, i, j in order:
        if a[i] < 0 and rem[j] > 0:
            a[i] = j
            rem[j] -= 1
    return a
