r"""The exact method of the balanced-transport solver: dual warm start, assignment route, certificate.

Internal module of :mod:`pycoe.routing.transport` (its public API, where the problem and its dual are
stated). Notation: ``N`` samples, ``K`` experts; ``s`` scores ``[N, K]``, held transposed as ``S = s.T``
``[K, N]`` so that per-expert rows are contiguous; ``c`` (``caps``) capacities ``[K]``; ``p`` expert prices
(dual variables) ``[K]``; ``a`` the assignment ``[N]``.

1. *Dual warm start.* Block-coordinate descent on the convex dual ``g(p) = sum_i max_k (s_ik - p_k) +
   sum_k c_k p_k``. Minimising over one price ``p_k`` with the others fixed is exact and cheap: with margins
   ``m_i = s_ik - max_{l != k}(s_il - p_l)``, ``g`` is minimal for any ``p_k`` between the ``c_k``-th and the
   ``(c_k + 1)``-th largest margin (``np.partition``). A few vectorised sweeps (on strided subsamples first
   when ``N`` is large) give prices whose induced assignment ``argmax_k (s_ik - p_k)`` is nearly balanced.
2. *Zero-cost balancing.* Samples exactly tied between their expert and an under-full one are moved (this
   keeps complementary slackness and matters for heavily tied scores).
3. *Exact repair* by successive shortest paths (:mod:`pycoe.routing.transport.repair`).
4. *Certificate.* The capacities and complementary slackness are checked (up to floating-point tolerance)
   before returning (:func:`certify`).

Small problems with many experts per sample (``N <= 16 K`` and ``N <= max(512, 8 K)``, no forbidden pairs)
skip steps 1-3: the assignment problem on the expert columns repeated by their capacities is solved by scipy's
``linear_sum_assignment`` (exact, ``O(N^3)``, faster than the flow repair at that size), the prices come from
shortest paths on the ``K``-node exchange graph, and step 4 certifies the result the same way.

Cost: ``O(N K)`` per coordinate sweep and for building the exchange graph, plus ``O(K^2)`` per augmentation
(few after a good warm start). Everything runs in NumPy float64 on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pycoe.routing.transport.common import TransportInfeasibleError
from pycoe.routing.transport.repair import ssp_repair

__all__: list[str] = []  # internal: see pycoe.routing.transport

# Strided subsample size for the first coordinate-descent sweeps when N is large.
_SUBSAMPLE = 16384
# Rough cost ratio of one coordinate sweep per N*K element to one augmentation of the repair.
_SWEEP_PER_AUGMENTATION = 4096
# Small problems with many experts per sample (and no forbidden pairs) take the assignment route (scipy's
# linear_sum_assignment on the capacity-replicated columns, O(N^3)); see _assignment_route. Where the switch
# sits was measured with benchmarks/bench_transport_routes.py (figures in docs/guide/transport.rst).
_LSA_SAMPLES_PER_EXPERT = 16
_LSA_MAX_N = 512


def solve_exact(t: torch.Tensor, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact solver on CPU float64. Returns (assignment int64[N], prices float64[K], objective).

    ``t`` is a real Tensor[N, K] (N, K >= 1) already checked for NaN and ``+inf``; ``-inf`` marks a forbidden
    pair. ``caps`` is int64[K] summing to N. Raises :class:`TransportInfeasibleError` when the forbidden pairs
    make the capacities unreachable.
    """
    N, K = t.shape
    src = t.cpu()
    if src.dtype in (torch.bfloat16, torch.float16):
        src = src.float()
    S = _transpose_f64(src.numpy())  # [K, N]
    forbidden = not math.isfinite(float(np.add.reduce(S, axis=None))) and bool(np.isneginf(S).any())
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
    else:
        gap = max(spread, 1.0)
        big = 4.0 * K * (spread + 1.0)
        p = _warm_start(S, caps, gap, big)
        a = _shifted_argmax(S, p)
        if not np.array_equal(np.bincount(a, minlength=K), caps):
            t1, t2 = _top2(S, p)
            slack = t1 - t2
            _balance_ties(S, a, p, caps, np.flatnonzero(slack == 0))
            p = ssp_repair(S, a, p, caps, slack)
    certify(S, a, p, caps, spread)
    if (caps > 0).any():
        p = p - p[caps > 0].mean()
    return a, p, float(S[a, np.arange(N)].sum())


def certify(S: np.ndarray, a: np.ndarray, p: np.ndarray, caps: np.ndarray, spread: float) -> None:
    """Check the capacities and complementary slackness of ``a`` with prices ``p``; raise RuntimeError otherwise.

    Together the two conditions prove ``a`` optimal (the primal objective equals the dual's ``g(p)``). Every
    exact result passes here before it is returned, so a failure is a bug of the solver (hence
    ``RuntimeError``, "internal error"). The tolerance per sample is ``1e-9 (1 + spread + max |p|)``.

    Args:
        S: float64[K, N] scores (transposed; ``-inf`` for forbidden pairs).
        a: int64[N] assignment.
        p: float64[K] prices.
        caps: int64[K] capacities.
        spread: range of the finite scores (max - min), for the tolerance.
    """
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


def _transpose_f64(x: np.ndarray) -> np.ndarray:
    """float64 copy of x[N, K].T as a C-contiguous [K, N] array (blocked: cache-friendly)."""
    N, K = x.shape
    out = np.empty((K, N), dtype=np.float64)
    B = 32768
    for s in range(0, N, B):
        out[:, s : s + B] = x[s : s + B].T
    return out


# --------------------------------------------------------------------------------------------------
# Assignment route (small problems with many experts)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Dual warm start (block-coordinate descent) and zero-cost balancing
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
    for k in np.flatnonzero(excess > 0).tolist():
        for l in np.flatnonzero(excess < 0).tolist():
            if excess[k] <= 0:
                break
            if excess[l] >= 0:
                continue
            mem = tied[a[tied] == k]
            ok = mem[(S[k, mem] - p[k]) == (S[l, mem] - p[l])]
            q = min(int(excess[k]), int(-excess[l]), ok.size)
            if q:
                a[ok[:q]] = l
                excess[k] -= q
                excess[l] += q
