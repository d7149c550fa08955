r"""Balanced transportation: assign N samples to K experts with fixed capacities, maximising the score.

This is the optimisation problem behind the weight generation module (WGM) of Collaboration of Experts
(Zhang, Chen and Zhong, *Collaboration of Experts: Achieving 80% Top-1 Accuracy on ImageNet with 100M
FLOPs*, ICML 2022, arXiv:2107.03815), whose abstract states that the training data is partitioned "by
solving a balanced transportation problem". The paper's solver and score matrix are not public; the
formulation below (scores ``s[i, k]``, higher is better, expert ``k`` receives exactly ``c[k]`` samples) is
pycoe's formulation.

Einstein legend: ``N`` samples, ``K`` experts; ``s`` scores ``[N, K]``; ``c`` capacities ``[K]``;
``p`` expert prices (dual variables) ``[K]``; ``a`` assignment ``[N]``. Inside the exact solver the scores
are held transposed, ``S = s.T`` ``[K, N]``, so that per-expert rows are contiguous.

Problem (primal LP; its constraint matrix is the incidence matrix of a bipartite graph, hence totally
unimodular, so an optimal vertex is integral, i.e. a hard assignment)::

    maximise   sum_ik x_ik s_ik
    subject to sum_k x_ik = 1 (every sample),  sum_i x_ik = c_k (every expert),  x >= 0.

Dual::

    minimise   g(p) = sum_i max_k (s_ik - p_k) + sum_k c_k p_k       (u_i = max_k (s_ik - p_k)).

Optimality certificate (complementary slackness): an assignment ``a`` that meets the capacities exactly
and prices ``p`` with ``s[i, a_i] - p[a_i] = max_k (s[i, k] - p[k])`` for every ``i`` are optimal for
the primal and the dual, because then the primal objective equals ``g(p)``.

Method ``"exact"`` (pycoe's algorithm):

1. *Dual warm start.* Block-coordinate descent on the convex dual ``g``. Minimising over one price
   ``p_k`` with the others fixed is exact and cheap: with margins ``m_i = s_ik - max_{l != k}(s_il -
   p_l)``, ``g`` is minimal for any ``p_k`` between the ``c_k``-th and the ``(c_k + 1)``-th largest
   margin (``np.partition``). A few vectorised sweeps (on a strided subsample first when ``N`` is large)
   give prices whose induced assignment ``argmax_k (s_ik - p_k)`` is nearly balanced.
2. *Zero-cost balancing.* Samples exactly tied between their expert and an under-full one are moved
   (this keeps complementary slackness and matters for heavily tied scores).
3. *Exact repair: successive shortest paths* (a min-cost-flow primal-dual scheme) on the ``K``-node
   exchange graph. The current assignment is optimal for its own loads with prices ``p``. Moving one
   sample ``i`` from ``k`` to ``l`` has reduced cost ``(s_ik - p_k) - (s_il - p_l) >= 0``; the edge
   ``k -> l`` costs the minimum of that over the samples currently in ``k`` (the order of those samples
   depends only on ``s_ik - s_il``, so each edge keeps a pre-sorted candidate list with lazy deletion
   plus a heap for arrivals). Shortest paths from the over-full experts (Bellman-Ford rounds on the
   ``K`` nodes, non-negative reduced costs) give the nearest under-full one;
   the prices drop by the (capped) distances, which keeps every reduced cost non-negative and makes the
   path's edges tight, and one sample moves along every edge of the path. Each augmentation lowers the
   total excess by one and keeps complementary slackness, so when the excess reaches zero the
   assignment is optimal (standard successive-shortest-path argument). If no under-full expert can be
   reached, the experts reached hold more samples than their capacities while none of those samples may
   go elsewhere (``-inf`` scores), which proves infeasibility.
4. *Certificate.* The capacities and complementary slackness are checked (up to floating-point
   tolerance) before returning.

Small problems with many experts per sample (``N <= 16 K`` and ``N <= max(512, 8 K)``, no forbidden pairs)
skip steps 1-3: the assignment problem on the expert
columns repeated by their capacities is solved by scipy's ``linear_sum_assignment`` (exact, ``O(N^3)``,
faster than the flow repair at that size), the prices come from shortest paths on the ``K``-node exchange
graph, and step 4 certifies the result the same way.

Cost: ``O(N K)`` per coordinate sweep and for building the exchange graph, plus ``O(K^2)`` per
augmentation (few after a good warm start). Everything runs in NumPy float64 on the CPU.

Method ``"sinkhorn"``: entropic regularisation (log-domain Sinkhorn iterations in torch, on the scores'
device) followed by a greedy capacity fill on the transport plan's log. Approximate.

Method ``"greedy"``: the greedy capacity fill on the scores themselves (all pairs ``(i, k)`` in decreasing
score order, a pair is taken when the sample is free and the expert not full). Approximate.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pycoe._validation import check_choice, check_nonnegative_int, check_positive_int

__all__ = [
    "TransportResult",
    "balanced_assignment",
    "solve_balanced_transport",
    "near_equal_capacities",
    "TransportInfeasibleError",
]

METHODS = ("exact", "sinkhorn", "greedy")

# Strided subsample size for the first coordinate-descent sweeps when N is large.
_SUBSAMPLE = 16384
# Rough cost ratio of one coordinate sweep per N*K element to one augmentation of the repair.
_SWEEP_PER_AUGMENTATION = 4096
# Size of the exchange graph's initial candidate set: per expert, plus per unit of excess.
_CANDIDATES_PER_EXPERT = 64
_CANDIDATES_PER_EXCESS = 16


class TransportInfeasibleError(ValueError):
    """No assignment meets the capacities without using a forbidden (``-inf``) pair."""


@dataclass
class TransportResult:
    """Result of :func:`solve_balanced_transport`.

    Attributes:
        assignment: LongTensor[N], the expert of every sample.
        objective: total score of the assigned pairs, ``sum_i scores[i, assignment[i]]`` (float64 sum).
        capacities: LongTensor[K], the capacities that were met exactly.
        prices: Tensor[K] (float64) of dual prices, or ``None`` (``"greedy"``). For ``"exact"`` they
            certify optimality: every sample's expert maximises ``scores[i, k] - prices[k]``. For
            ``"sinkhorn"`` they are the entropic dual potentials (``+inf`` for zero-capacity experts).
        method: the method that produced the result.
    """

    assignment: torch.Tensor
    objective: float
    capacities: torch.Tensor
    prices: torch.Tensor | None
    method: str


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------


def near_equal_capacities(n: int, k: int) -> torch.Tensor:
    """Near-equal capacities: ``n // k`` each, the remainder one by one to the first ``n % k`` experts.

    Args:
        n: number of samples (>= 0).
        k: number of experts (>= 1).

    Returns:
        LongTensor[K] summing to ``n``.

    Example:
        >>> near_equal_capacities(10, 4).tolist()
        [3, 3, 2, 2]
    """
    n = check_nonnegative_int("n", n)
    k = check_positive_int("k", k)
    caps = torch.full((k,), n // k, dtype=torch.long)
    caps[: n % k] += 1
    return caps


def _check_scores(scores: Any) -> torch.Tensor:
    """Check the type, rank and size of ``scores`` and return it as a tensor (CPU numpy shares memory).

    Values (NaN / +inf) are checked later by the method, in the precision it computes in.
    """
    if isinstance(scores, np.ndarray):
        if scores.dtype == np.bool_ or not (
            np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)
        ):
            raise TypeError(f"scores must hold real numbers, got a numpy array of dtype {scores.dtype}")
        if scores.ndim != 2:
            raise ValueError(f"scores must have 2 dimensions [N, K], got shape {tuple(scores.shape)}")
        if scores.dtype.byteorder not in ("=", "|") or scores.dtype == np.float16:
            scores = scores.astype(np.float64)
        t = torch.from_numpy(scores)
    elif isinstance(scores, torch.Tensor):
        t = scores.detach()
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"scores must hold real numbers, got a tensor of dtype {t.dtype}")
    else:
        raise TypeError(
            f"scores must be a torch.Tensor or a numpy.ndarray of shape [N, K], got {type(scores).__name__}"
        )
    if t.dim() != 2:
        raise ValueError(f"scores must have 2 dimensions [N, K], got shape {tuple(t.shape)}")
    n, k = t.shape
    if n == 0:
        raise ValueError(f"scores must have at least one sample (N >= 1), got shape {tuple(t.shape)}")
    if k == 0:
        raise ValueError(f"scores must have at least one expert (K >= 1), got shape {tuple(t.shape)}")
    return t


def _check_values_np(S: np.ndarray) -> bool:
    """Raise on NaN / +inf in a float64 array; return whether it holds -inf (forbidden pairs)."""
    total = float(np.add.reduce(S, axis=None))
    if math.isfinite(total):
        return False
    if np.isnan(S).any():
        raise ValueError("scores must not contain NaN")
    if np.isposinf(S).any():
        raise ValueError("scores must not contain +inf (only -inf is allowed, meaning a forbidden pair)")
    return bool(np.isneginf(S).any())


def _check_values_torch(t: torch.Tensor) -> None:
    """Raise on NaN / +inf in a tensor."""
    if bool(torch.isnan(t).any()):
        raise ValueError("scores must not contain NaN")
    if bool(torch.isposinf(t).any()):
        raise ValueError("scores must not contain +inf (only -inf is allowed, meaning a forbidden pair)")


def _check_capacities(capacities: Any, n: int, k: int) -> np.ndarray:
    """Return the capacities as int64[K] summing to ``n``, or raise."""
    if capacities is None:
        return near_equal_capacities(n, k).numpy()
    if isinstance(capacities, bool):
        raise TypeError("capacities must be None, an int or a length-K sequence of ints, got a bool")
    if isinstance(capacities, (int, np.integer)):
        c = int(capacities)
        if c < 0:
            raise ValueError(f"capacities must be non-negative, got {c}")
        if c * k != n:
            raise ValueError(
                f"capacities={c} for each of K={k} experts gives {c * k} slots, but there are N={n} samples "
                "(an int capacity needs capacities * K == N; pass a sequence or None for near-equal)"
            )
        return np.full(k, c, dtype=np.int64)
    if isinstance(capacities, torch.Tensor):
        if capacities.is_floating_point() or capacities.is_complex() or capacities.dtype == torch.bool:
            raise TypeError(f"capacities must hold integers, got a tensor of dtype {capacities.dtype}")
        arr = capacities.detach().cpu().numpy()
    elif isinstance(capacities, np.ndarray):
        if not np.issubdtype(capacities.dtype, np.integer):
            raise TypeError(f"capacities must hold integers, got a numpy array of dtype {capacities.dtype}")
        arr = capacities
    elif isinstance(capacities, Sequence) and not isinstance(capacities, (str, bytes)):
        for v in capacities:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"capacities must hold integers, got {v!r} ({type(v).__name__})")
        arr = np.asarray([int(v) for v in capacities], dtype=np.int64)
    else:
        raise TypeError(
            f"capacities must be None, an int or a length-K sequence of ints, got {type(capacities).__name__}"
        )
    arr = np.asarray(arr, dtype=np.int64).reshape(-1) if np.ndim(arr) == 1 else np.asarray(arr)
    if arr.ndim != 1 or arr.shape[0] != k:
        raise ValueError(f"capacities must have length K={k}, got shape {tuple(arr.shape)}")
    if (arr < 0).any():
        raise ValueError(f"capacities must be non-negative, got {arr.tolist()}")
    if int(arr.sum()) != n:
        raise ValueError(f"capacities must sum to N={n}, got sum {int(arr.sum())}")
    return arr.astype(np.int64, copy=True)


# --------------------------------------------------------------------------------------------------
# Exact solver
# --------------------------------------------------------------------------------------------------


def _top2(S: np.ndarray, p: np.ndarray, cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Largest and second-largest value (counting multiplicity) of S[k, i] - p[k] over k, per column.

    Streams over the K rows (no [K, N] temporary); ``cols`` restricts to some columns. Needs K >= 2.
    """

    def row(k: int) -> np.ndarray:
        return (S[k] if cols is None else S[k, cols]) - p[k]

    v0, v1 = row(0), row(1)
    t1 = np.maximum(v0, v1)
    t2 = np.minimum(v0, v1)
    tmp = np.empty_like(t1)
    for k in range(2, S.shape[0]):
        vk = row(k)
        np.minimum(t1, vk, out=tmp)
        np.maximum(t2, tmp, out=t2)
        np.maximum(t1, vk, out=t1)
    return t1, t2


def _shifted_argmax(S: np.ndarray, p: np.ndarray) -> np.ndarray:
    """First index of the maximum of S[k, i] - p[k] over k, for every column i (no [K, N] temporary)."""
    K, N = S.shape
    best = S[0] - p[0]
    idx = np.zeros(N, dtype=np.int64)
    v = np.empty(N)
    for k in range(1, K):
        np.subtract(S[k], p[k], out=v)
        better = v > best
        np.copyto(best, v, where=better)
        idx[better] = k
    return idx


def _apportion(caps: np.ndarray, n_total: int, n_sub: int) -> np.ndarray:
    """Scale integer capacities to a subsample of size n_sub (largest remainder, ties to lower index)."""
    exact = caps * (n_sub / n_total)
    base = np.floor(exact).astype(np.int64)
    rest = n_sub - int(base.sum())
    if rest > 0:
        order = np.argsort(-(exact - base), kind="stable")
        base[order[:rest]] += 1
    return base


def _price_step(m: np.ndarray, c: int, gap: float) -> float:
    """Minimiser of g over one price: between the c-th and (c + 1)-th largest margin (midpoint)."""
    N = m.shape[0]
    if c == 0:
        return float(m.max()) + gap
    if c == N:
        return float(m.min()) - gap
    part = np.partition(m, (N - c - 1, N - c))
    return 0.5 * (float(part[N - c - 1]) + float(part[N - c]))


def _coordinate_descent(
    S: np.ndarray, caps: np.ndarray, p: np.ndarray, sweeps: int, gap: float, big: float, target: int = 0
) -> tuple[np.ndarray, int]:
    """Block-coordinate descent on the dual g(p). Returns (prices p[K] (a copy), excess of the argmax).

    Every step minimises g exactly over one price p_k: with the margins m_i = s_ik - r_i, where
    r_i = max_{l != k} (s_il - p_l), g is minimal for p_k between the c_k-th and (c_k + 1)-th largest
    margin. Only the best and second-best values t1, t2 of v_i = s_i - p are kept (no indices: k is a
    sample's best expert exactly when v_ik == t1_i, and if that is a tie then t2_i == t1_i anyway).
    Stops once the excess (samples above capacity, summed) is at most ``target``, or when it stalls.
    """
    K, N = S.shape
    p = p.copy()
    t1, t2 = _top2(S, p)
    best_excess = None
    stall = 0
    excess = -1
    vk = np.empty(N)
    r = np.empty(N)
    was_top = np.empty(N, dtype=bool)
    mask = np.empty(N, dtype=bool)
    for _ in range(sweeps):
        for k in range(K):
            c = int(caps[k])
            np.subtract(S[k], p[k], out=vk)
            np.equal(vk, t1, out=was_top)
            np.copyto(r, t1)
            np.copyto(r, t2, where=was_top)
            m = np.subtract(S[k], r, out=r)
            new = _price_step(m, c, gap)
            if not math.isfinite(new):  # forbidden pairs give infinite margins: clip them
                np.clip(m, -big, big, out=m)
                new = _price_step(m, c, gap)
            old = p[k]
            if new == old:
                continue
            p[k] = new
            if new < old:
                # v_k increases: the top-2 values update in O(N) without looking at other experts.
                np.subtract(S[k], new, out=vk)
                np.greater(vk, t1, out=mask)  # rises above the old best (only possible if not the best)
                mask &= ~was_top
                np.copyto(t2, t1, where=mask)
                np.copyto(t1, vk, where=mask | was_top)
                mask |= was_top
                np.copyto(t2, vk, where=~mask & (vk > t2))
            else:
                # v_k decreases: rows where it was among the top two and falls below t2 need a recount.
                np.greater_equal(vk, t2, out=mask)
                np.subtract(S[k], new, out=vk)
                mask &= vk < t2
                np.copyto(t1, vk, where=was_top & ~mask)  # still the best: only t1 changes
                aff = np.flatnonzero(mask)
                if aff.size:
                    a1, a2 = _top2(S, p, aff)
                    t1[aff] = a1
                    t2[aff] = a2
        excess = int(np.maximum(np.bincount(_shifted_argmax(S, p), minlength=K) - caps, 0).sum())
        if excess <= target:
            break
        if best_excess is not None and excess >= best_excess:
            stall += 1
            if stall >= 2:
                break
        else:
            stall = 0
            best_excess = excess
    return p, excess


def _warm_start(S: np.ndarray, caps: np.ndarray, gap: float, big: float) -> np.ndarray:
    """Dual prices p[K] whose induced assignment is nearly balanced (multi-level coordinate descent).

    Coarse levels are strided subsamples (N / 8, N / 64, ...) with proportionally scaled capacities;
    each level's prices warm-start the next. On the full data the sweeps stop once the remaining excess
    is cheaper to remove by the exact repair than by another sweep.
    """
    K, N = S.shape
    p = np.zeros(K)
    sizes = []
    n = N
    while n > 8 * _SUBSAMPLE:
        n //= 8
        sizes.append(n)
    for n_sub in reversed(sizes):
        stride = N // n_sub
        sub = np.ascontiguousarray(S[:, ::stride])
        n_here = sub.shape[1]
        p, _ = _coordinate_descent(sub, _apportion(caps, N, n_here), p, 30, gap, big, int(math.sqrt(n_here)))
    p, _ = _coordinate_descent(S, caps, p, 30, gap, big, _repair_budget(N, K))
    return p


def _repair_budget(N: int, K: int) -> int:
    """Excess below which the exact repair is cheaper than another coordinate sweep (measured ratio)."""
    return max(8, (N * K) // _SWEEP_PER_AUGMENTATION)


def _balance_ties(S: np.ndarray, a: np.ndarray, p: np.ndarray, caps: np.ndarray, tied: np.ndarray) -> None:
    """Move samples exactly tied (s_ik - p_k == s_il - p_l) from over-full to under-full experts.

    ``tied`` holds the candidate samples (zero slack). Keeps complementary slackness exactly; modifies
    ``a`` in place. Deterministic: lowest sample indices first.
    """
    K = S.shape[0]
    excess = np.bincount(a, minlength=K) - caps
    if tied.size == 0 or not (excess > 0).any():
        return
    for k in np.flatnonzero(excess > 0):
        k = int(k)
        for l in np.flatnonzero(excess < 0):
            if excess[k] <= 0:
                break
            l = int(l)
            if excess[l] >= 0:
                continue
            mem = tied[a[tied] == k]
            ok = mem[(S[k, mem] - p[k]) == (S[l, mem] - p[l])]
            q = min(int(excess[k]), int(-excess[l]), ok.size)
            if q:
                a[ok[:q]] = l
                excess[k] -= q
                excess[l] += q


class _ExchangeGraph:
    """Edge minima of the K-node exchange graph: W[k, l] = min over samples i in k of S[k, i] - S[l, i].

    Each edge keeps a candidate array sorted by (key, sample) taken from the members of ``k`` at build
    time, consumed with lazy deletion, a heap of the samples that arrived in ``k`` later, and a threshold
    ``thr[k, l]``: every member of the build-time snapshot left out of the candidates has a key above it.
    So the best candidate is the true edge minimum as long as its key is at most ``thr``; otherwise the
    edge is rebuilt from the current members of ``k``.
    """

    def __init__(self, S: np.ndarray, a: np.ndarray, p: np.ndarray, slack: np.ndarray, count: int) -> None:
        self.S = S
        self.a = a
        K, N = S.shape
        self.K = K
        self.W = np.full((K, K), np.inf)
        self.E = np.full((K, K), -1, dtype=np.int64)
        self.cand: list[list[np.ndarray]] = [[np.empty(0, np.int64)] * K for _ in range(K)]
        self.ckey: list[list[np.ndarray]] = [[np.empty(0)] * K for _ in range(K)]
        self.ptr = np.zeros((K, K), dtype=np.int64)
        self.thr = np.full((K, K), np.inf)
        self.heap: list[list[list]] = [[[] for _ in range(K)] for _ in range(K)]
        self.rebuilds = 0
        # Candidates: the samples with the smallest slack (own value minus best other value, >= 0).
        # A left-out sample j in k has key S[k, j] - S[l, j] >= slack_j + p_k - p_l > theta + p_k - p_l.
        if count < N:
            theta = float(np.partition(slack, count - 1)[count - 1])
            cand = np.flatnonzero(slack <= theta)
            if cand.size == N:
                theta = np.inf
        else:
            theta = np.inf
            cand = np.arange(N)
        ac = a[cand]
        Sc = S[:, cand]
        for k in range(K):
            sel = ac == k
            mem = cand[sel]
            Sk = Sc[:, sel]
            for l in range(K):
                if l == k:
                    continue
                key = Sk[k] - Sk[l]
                order = np.lexsort((mem, key))
                thr = theta + p[k] - p[l] if math.isfinite(theta) else np.inf
                self._set_edge(k, l, mem[order], key[order], thr)

    def _set_edge(self, k: int, l: int, cand: np.ndarray, key: np.ndarray, thr: float) -> None:
        self.cand[k][l] = cand
        self.ckey[k][l] = key
        self.ptr[k, l] = 0
        self.thr[k, l] = thr
        self.heap[k][l] = []
        self._refresh(k, l)

    def _rebuild(self, k: int, l: int) -> None:
        """Rebuild edge (k, l) from the current members of k (keep the smallest keys, at least 1024)."""
        self.rebuilds += 1
        mem = np.flatnonzero(self.a == k)
        key = self.S[k, mem] - self.S[l, mem]
        budget = max(1024, 4 * self.cand[k][l].size)
        if budget < key.size:
            kth = np.partition(key, budget - 1)[budget - 1]
            sel = np.flatnonzero(key <= kth)
            thr = float(kth) if sel.size < key.size else np.inf
            mem, key = mem[sel], key[sel]
        else:
            thr = np.inf
        order = np.lexsort((mem, key))
        self._set_edge(k, l, mem[order], key[order], thr)

    def _refresh(self, k: int, l: int) -> None:
        """Recompute W[k, l], E[k, l] from the candidate list and the arrival heap."""
        a = self.a
        cand = self.cand[k][l]
        j = int(self.ptr[k, l])
        n = cand.size
        while j < n and a[cand[j]] != k:
            j += 1
        self.ptr[k, l] = j
        h = self.heap[k][l]
        while h and a[h[0][1]] != k:
            heapq.heappop(h)
        best_key, best_i = np.inf, -1
        if j < n:
            best_key, best_i = float(self.ckey[k][l][j]), int(cand[j])
        if best_key > self.thr[k, l]:
            self._rebuild(k, l)  # a left-out member may be smaller; also covers an exhausted list
            return
        if h and (h[0][0] < best_key or (h[0][0] == best_key and h[0][1] < best_i)):
            best_key, best_i = h[0]
        self.W[k, l] = best_key
        self.E[k, l] = best_i

    def move(self, i: int, k: int, l: int) -> None:
        """Move sample i from expert k to expert l and update the affected edges."""
        self.a[i] = l
        K = self.K
        for m in range(K):
            if m != k and self.E[k, m] == i:
                self._refresh(k, m)
        col = self.S[:, i]
        keys = (col[l] - col).tolist()
        W, E = self.W, self.E
        for m in range(K):
            if m == l:
                continue
            key = keys[m]
            heapq.heappush(self.heap[l][m], (key, i))
            if key < W[l, m] or (key == W[l, m] and i < E[l, m]):
                W[l, m] = key
                E[l, m] = i


def _ssp_repair(S: np.ndarray, a: np.ndarray, p: np.ndarray, caps: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """Successive shortest paths from the CS-optimal assignment ``a`` (prices ``p``) to the capacities.

    Modifies ``a`` in place and returns the final prices. Shortest paths from the over-full experts use
    Bellman-Ford rounds in NumPy (non-negative reduced costs; paths are short in practice).
    """
    K, N = S.shape
    excess = np.bincount(a, minlength=K) - caps
    total = int(excess[excess > 0].sum())
    if total == 0:
        return p
    p = p.copy()
    graph = _ExchangeGraph(S, a, p, slack, count=min(N, _CANDIDATES_PER_EXPERT * K + _CANDIDATES_PER_EXCESS * total))
    W = graph.W
    E = graph.E
    eye = np.eye(K, dtype=bool)
    cols = np.arange(K)
    while total > 0:
        R = W - p[:, None] + p[None, :]
        np.maximum(R, 0.0, out=R)  # float rounding only: CS keeps the true reduced costs >= 0
        R[eye] = np.inf
        dist = np.where(excess > 0, 0.0, np.inf)
        pred = np.full(K, -1, dtype=np.int64)
        for _ in range(K):
            cand = dist[:, None] + R
            u = np.argmin(cand, axis=0)
            nd = cand[u, cols]
            better = nd < dist
            if not better.any():
                break
            dist[better] = nd[better]
            pred[better] = u[better]
        deficit = excess < 0
        D = float(dist[deficit].min())
        if np.inf == D:
            reach = np.flatnonzero(dist < np.inf)
            load = int((excess[reach] + caps[reach]).sum())
            raise TransportInfeasibleError(
                "scores: no assignment meets the capacities without a forbidden (-inf) pair: the "
                f"{load} samples currently assigned to experts {reach.tolist()} may only go to those "
                f"experts, whose capacities sum to {int(caps[reach].sum())}"
            )
        target = int(np.flatnonzero(deficit & (dist == D))[0])
        p -= np.minimum(dist, D)
        # Collect the moves first (one tight sample per path edge), then apply them.
        path = []
        v = target
        while pred[v] >= 0:
            u = int(pred[v])
            path.append((int(E[u, v]), u, v))
            v = u
            if len(path) > K:
                raise RuntimeError("internal error: cycle in the shortest-path tree")
        source = v
        for i, u, w in path:
            graph.move(i, u, w)
        excess[source] -= 1
        excess[target] += 1
        total -= 1
    return p


def _transpose_f64(x: np.ndarray) -> np.ndarray:
    """float64 copy of x[N, K].T as a C-contiguous [K, N] array (blocked: cache-friendly)."""
    N, K = x.shape
    out = np.empty((K, N), dtype=np.float64)
    B = 32768
    for s in range(0, N, B):
        out[:, s : s + B] = x[s : s + B].T
    return out


def _solve_exact(t: torch.Tensor, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact solver on CPU float64. Returns (assignment int64[N], prices float64[K], objective)."""
    N, K = t.shape
    src = t.cpu()
    if src.dtype in (torch.bfloat16, torch.float16):
        src = src.float()
    S = _transpose_f64(src.numpy())  # [K, N]
    forbidden = _check_values_np(S)
    if forbidden:
        finite = np.isfinite(S)
        any_ok = finite.any(axis=0)
        if not any_ok.all():
            i = int(np.flatnonzero(~any_ok)[0])
            raise TransportInfeasibleError(f"scores: sample {i} has no finite score (every expert is forbidden)")
        vals = S[finite]
        lo, hi = float(vals.min()), float(vals.max())
        del finite, vals
    else:
        lo, hi = float(S.min()), float(S.max())
    if K == 1:
        return np.zeros(N, dtype=np.int64), np.zeros(1), float(S[0].sum())
    spread = hi - lo
    if not forbidden and _assignment_route(N, K):
        a = _lsa_assignment(S, caps)
        p = _potentials(S, a)
        _certify(S, a, p, caps, spread)
        if (caps > 0).any():
            p = p - p[caps > 0].mean()
        return a, p, float(S[a, np.arange(N)].sum())
    gap = max(spread, 1.0)
    big = 4.0 * K * (spread + 1.0)
    p = _warm_start(S, caps, gap, big)
    a = _shifted_argmax(S, p)
    if not np.array_equal(np.bincount(a, minlength=K), caps):
        t1, t2 = _top2(S, p)
        slack = t1 - t2
        _balance_ties(S, a, p, caps, np.flatnonzero(slack == 0))
        p = _ssp_repair(S, a, p, caps, slack)
    _certify(S, a, p, caps, spread)
    if (caps > 0).any():
        p = p - p[caps > 0].mean()
    objective = float(S[a, np.arange(N)].sum())
    return a, p, objective


# Small problems with many experts per sample (and no forbidden pairs) are solved as an assignment problem on
# the expert columns repeated by their capacities (scipy's linear_sum_assignment, O(N^3)); see
# _assignment_route. Measured with benchmarks/bench_transport_routes.py (1 thread, medians of 7, flow route /
# assignment route): 64x64 39.6x, 256x16 1.9x, 256x64 12.6x, 512x64 3.5x, 1024x128 3.3x in favour of the
# assignment route; 256x4 0.36x, 384x16 0.68x, 1024x64 0.67x, 2048x128 0.44x against it.
_LSA_SAMPLES_PER_EXPERT = 16
_LSA_MAX_N = 512


def _assignment_route(n: int, k: int) -> bool:
    """Whether the exact method takes the assignment route for N samples and K experts."""
    return n <= _LSA_SAMPLES_PER_EXPERT * k and n <= max(_LSA_MAX_N, (_LSA_SAMPLES_PER_EXPERT // 2) * k)


def _lsa_assignment(S: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Optimal assignment by linear_sum_assignment on the capacity-replicated columns. S is [K, N]."""
    from scipy.optimize import linear_sum_assignment

    cols = np.repeat(np.arange(S.shape[0]), caps)  # one column per slot: [N]
    _, slot = linear_sum_assignment(S[cols].T, maximize=True)  # rows come back as 0..N-1
    return cols[slot].astype(np.int64)


def _potentials(S: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Dual prices that certify an optimal assignment ``a``.

    Complementary slackness asks ``s_ik - p_k >= s_il - p_l`` for every sample ``i`` in expert ``k``, i.e.
    ``q_l <= q_k + w(k, l)`` for ``q = -p`` and ``w(k, l) = min_{i: a_i = k} (s_ik - s_il)``: ``q`` are
    shortest-path distances on the K-node exchange graph with these edge lengths (Bellman-Ford from a virtual
    source joined to every node at length 0). An optimal assignment has no negative cycle there, so K rounds
    suffice; the certificate check that follows catches anything else.
    """
    K, _N = S.shape
    w = np.full((K, K), np.inf)
    for k in range(K):
        rows = a == k
        if rows.any():
            w[k] = (S[k, rows][None, :] - S[:, rows]).min(axis=1)
    q = np.zeros(K)
    for _ in range(K):
        relaxed = np.minimum(q, (q[:, None] + w).min(axis=0))
        if np.array_equal(relaxed, q):
            break
        q = relaxed
    return -q


def _certify(S: np.ndarray, a: np.ndarray, p: np.ndarray, caps: np.ndarray, spread: float) -> None:
    """Check capacities and complementary slackness; raise RuntimeError (a bug) otherwise."""
    K, N = S.shape
    load = np.bincount(a, minlength=K)
    if not np.array_equal(load, caps):
        raise RuntimeError(f"internal error: loads {load.tolist()} differ from capacities {caps.tolist()}")
    own = S[a, np.arange(N)] - p[a]
    if not np.isfinite(own).all():
        raise RuntimeError("internal error: a sample was assigned to a forbidden expert")
    tol = 1e-9 * (1.0 + spread + float(np.abs(p).max()))
    viol = 0.0
    v = np.empty(N)
    for k in range(K):
        np.subtract(S[k], p[k], out=v)
        v -= own
        viol = max(viol, float(v.max()))
    if viol > tol:
        raise RuntimeError(f"internal error: optimality certificate failed (slack violation {viol:.3g} > {tol:.3g})")


def _reference_exact(scores: np.ndarray, caps: np.ndarray) -> tuple[np.ndarray, float]:
    """Slow, obviously correct reference: the LP solved by scipy's HiGHS. Returns (x[N, K], objective)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    s = np.asarray(scores, dtype=np.float64)
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


# --------------------------------------------------------------------------------------------------
# Approximate methods (torch, on the scores' device)
# --------------------------------------------------------------------------------------------------


def _greedy_fill(X: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Greedy capacity fill: pairs (i, k) by decreasing X[i, k] (ties: smaller i, then smaller k).

    A pair is taken when sample i is still free and expert k not full. Computed in at most K
    vectorised rounds: every free sample proposes its best open expert, and all proposals before the
    first one that would overflow an expert are accepted (exactly what the sequential scan does).

    Args:
        X: Tensor[N, K] of finite values.
        caps: LongTensor[K] summing to N (same device).

    Returns:
        LongTensor[N].
    """
    N, K = X.shape
    dev = X.device
    assign = torch.full((N,), -1, dtype=torch.long, device=dev)
    remaining = caps.clone()
    free = torch.arange(N, device=dev)
    neg = torch.tensor(-math.inf, dtype=X.dtype, device=dev)
    while free.numel() > 0:
        open_ = remaining > 0
        Xf = torch.where(open_[None, :], X[free], neg)
        val = Xf.max(dim=1).values
        best = torch.argmax(Xf, dim=1)  # first maximal index
        order = torch.sort(val, descending=True, stable=True).indices  # ties: smaller sample first
        e_sorted = best[order]
        counts = torch.bincount(e_sorted, minlength=K)
        over = counts > remaining
        if not bool(over.any()):
            take = order
        else:
            grouped = torch.sort(e_sorted, stable=True).indices  # positions grouped by expert, ascending
            starts = torch.cumsum(counts, 0) - counts
            ks = torch.nonzero(over).flatten()
            first_over = grouped[starts[ks] + remaining[ks]]
            take = order[: int(first_over.min())]
        assign[free[take]] = best[take]
        remaining -= torch.bincount(best[take], minlength=K)
        keep = torch.ones(free.numel(), dtype=torch.bool, device=dev)
        keep[take] = False
        free = free[keep]
    return assign


def _finite_stand_in(X: torch.Tensor) -> torch.Tensor:
    """Replace -inf by a finite value below every finite entry (so that forbidden pairs come last)."""
    fin = torch.isfinite(X)
    if bool(fin.all()):
        return X
    vals = X[fin]
    lo = vals.min() if vals.numel() else torch.zeros((), dtype=X.dtype, device=X.device)
    hi = vals.max() if vals.numel() else lo
    low = lo - 2.0 * (hi - lo) - 1.0
    return torch.where(fin, X, low)


def _sinkhorn_prices(
    X: torch.Tensor, caps: torch.Tensor, epsilon: float | None, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn for max <P, X> + eps * H(P), rows summing to 1 and columns to caps.

    Returns (log_plan Tensor[N, K], prices Tensor[K]) with log P_ik = (X_ik - u_i - p_k) / eps.
    """
    _N, K = X.shape
    fin = torch.isfinite(X)
    if epsilon is None:
        vals = X[fin]
        scale = float(vals.std()) if vals.numel() > 1 else 0.0
        epsilon = 0.05 * (scale if scale > 0 else 1.0)
    eps = float(epsilon)
    log_c = torch.log(caps.to(X.dtype))  # -inf for zero capacity
    active = caps > 0
    Xe = X / eps
    q = torch.zeros(K, dtype=X.dtype, device=X.device)  # p / eps
    q = torch.where(active, q, torch.full_like(q, math.inf))
    target = caps.to(X.dtype)
    for it in range(max_iter):
        u = torch.logsumexp(Xe - q[None, :], dim=1)  # [N]
        lse = torch.logsumexp(Xe - u[:, None], dim=0)  # [K]
        q = torch.where(active, lse - log_c, torch.full_like(lse, math.inf))
        if (it + 1) % 10 == 0 or it == max_iter - 1:
            u = torch.logsumexp(Xe - q[None, :], dim=1)
            col = torch.exp(Xe - q[None, :] - u[:, None]).sum(dim=0)
            if float((col - target).abs().max()) <= tol * max(1.0, float(target.max())):
                break
    u = torch.logsumexp(Xe - q[None, :], dim=1)
    return Xe - q[None, :] - u[:, None], q * eps


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def solve_balanced_transport(
    scores: Any,
    capacities: Any = None,
    method: str = "exact",
    *,
    epsilon: float | None = None,
    max_iter: int = 200,
) -> TransportResult:
    r"""Assign every sample to one expert, expert ``k`` receiving exactly ``capacities[k]`` samples.

    Maximises the total score :math:`\sum_i s_{i, a_i}` (higher is better). See the module docstring
    and the user guide (*Balanced transport*) for the formulation and the algorithms.

    Args:
        scores: Tensor[N, K] or ndarray[N, K] of real scores, higher is better. ``-inf`` marks a forbidden
            pair (infeasibility raises :class:`TransportInfeasibleError`); NaN and ``+inf`` raise.
        capacities: ``None`` for :func:`near_equal_capacities` (``N // K`` each, the remainder one by one
            to the first ``N % K`` experts); an int ``c`` (every expert ``c``, needs ``c * K == N``); or a
            length-K sequence / array / tensor of non-negative ints summing to ``N``.
        method: ``"exact"`` (default; provably optimal, NumPy float64 on the CPU), ``"sinkhorn"``
            (entropic regularisation + greedy rounding in torch on the scores' device; approximate) or
            ``"greedy"`` (greedy capacity fill by score; approximate).
        epsilon: ``"sinkhorn"`` only: entropic regularisation strength in score units (default
            ``0.05 * std(scores)``).
        max_iter: ``"sinkhorn"`` only: maximum number of Sinkhorn iterations.

    Returns:
        TransportResult: assignment LongTensor[N] (on the scores' device for a tensor input, CPU
        otherwise), objective, capacities LongTensor[K], prices Tensor[K] or None, method.

    Raises:
        TypeError: scores or capacities of a wrong type.
        ValueError: bad shape, NaN/+inf scores, bad capacities or method.
        TransportInfeasibleError: (a ValueError) the forbidden pairs make the capacities unreachable.
    """
    check_choice("method", method, METHODS)
    t = _check_scores(scores)
    N, K = t.shape
    caps = _check_capacities(capacities, N, K)
    device = t.device
    if method == "exact":
        a_np, p_np, obj = _solve_exact(t, caps)
        assignment = torch.from_numpy(a_np).to(device)
        prices: torch.Tensor | None = torch.from_numpy(p_np).to(device)
    else:
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if epsilon is not None and (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, (int, float))
            or not (epsilon > 0 and math.isfinite(epsilon))
        ):
            raise ValueError(f"epsilon must be a positive finite number or None, got {epsilon!r}")
        X = t if t.dtype in (torch.float32, torch.float64) else t.float()
        _check_values_torch(X)
        caps_t = torch.from_numpy(caps).to(device)
        if method == "greedy":
            assignment = _greedy_fill(_finite_stand_in(X), caps_t)
            prices = None
        else:
            Xs = X.to(torch.float64) if device.type == "cpu" else X
            log_plan, pr = _sinkhorn_prices(Xs, caps_t, epsilon, max_iter, 1e-3)
            assignment = _greedy_fill(_finite_stand_in(log_plan), caps_t)
            prices = pr
        chosen = torch.gather(X, 1, assignment[:, None])
        if bool(torch.isneginf(chosen).any()):
            raise TransportInfeasibleError(
                f"method={method!r} could not avoid the forbidden (-inf) pairs; method='exact' finds an "
                "assignment avoiding them whenever one exists"
            )
        obj = float(chosen.double().sum()) if device.type != "mps" else float(chosen.sum())
    return TransportResult(
        assignment=assignment,
        objective=obj,
        capacities=torch.from_numpy(caps).to(device),
        prices=prices,
        method=method,
    )


def balanced_assignment(scores: Any, capacities: Any = None, method: str = "exact") -> torch.Tensor:
    """Each sample's expert under exact capacities, maximising the total score.

    Shorthand for ``solve_balanced_transport(scores, capacities, method).assignment``.

    Args:
        scores: Tensor[N, K] or ndarray[N, K], higher is better (``-inf``: forbidden pair).
        capacities: ``None`` (near-equal), an int, or a length-K sequence of ints summing to N.
        method: ``"exact"`` (default), ``"sinkhorn"`` or ``"greedy"``.

    Returns:
        LongTensor[N]: expert index per sample, on the scores' device (CPU for a numpy input).

    Example:
        >>> import torch
        >>> s = torch.tensor([[3.0, 1.0], [2.0, 0.0], [0.0, 5.0], [1.0, 0.5]])
        >>> balanced_assignment(s).tolist()
        [0, 0, 1, 1]
    """
    return solve_balanced_transport(scores, capacities, method).assignment
