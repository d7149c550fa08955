"""The approximate methods of the balanced-transport solver: greedy capacity fill and entropic Sinkhorn.

Internal module of :mod:`pycoe.routing.transport` (its public API). Both run in torch on the scores' device.
Notation: ``N`` samples, ``K`` experts; ``X`` scores ``[N, K]``; ``caps`` capacities ``[K]``.

- ``"greedy"``: all pairs ``(i, k)`` in decreasing score order (ties: smaller ``i``, then smaller ``k``); a pair
  is taken when the sample is free and the expert not full.
- ``"sinkhorn"``: entropic regularisation ``max <P, X> + entropic_reg * H(P)`` with rows summing to 1 and
  columns to the capacities, by log-domain Sinkhorn iterations, then the greedy fill on the plan's logarithm
  (so the capacities are met exactly).

Neither is guaranteed optimal, and with forbidden (``-inf``) pairs the greedy rounding can get stuck on a
forbidden pair although a feasible assignment exists; the caller checks for that.
"""

from __future__ import annotations

import math

import torch

__all__: list[str] = []  # internal: see pycoe.routing.transport

#: Default maximum number of Sinkhorn iterations.
SINKHORN_MAX_ITER = 200
# Sinkhorn stops when every column sum is within this fraction of max(1, largest capacity).
_SINKHORN_TOL = 1e-3


def solve_approximate(
    X: torch.Tensor,
    caps: torch.Tensor,
    method: str,
    *,
    entropic_reg: float | None = None,
    max_iter: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``"greedy"`` or ``"sinkhorn"``. Returns (assignment LongTensor[N], prices Tensor[K] or None).

    ``X`` is a float32/float64 Tensor[N, K] without NaN or ``+inf``; ``caps`` a LongTensor[K] on its device.
    The assignment may use a forbidden (``-inf``) pair only when the rounding got stuck.
    """
    if method == "greedy":
        return greedy_fill(_finite_stand_in(X), caps), None
    Xs = X.to(torch.float64) if X.device.type == "cpu" else X
    iters = SINKHORN_MAX_ITER if max_iter is None else max_iter
    log_plan, prices = sinkhorn_prices(Xs, caps, entropic_reg, iters, _SINKHORN_TOL)
    return greedy_fill(_finite_stand_in(log_plan), caps), prices


def greedy_fill(X: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
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


def sinkhorn_prices(
    X: torch.Tensor, caps: torch.Tensor, entropic_reg: float | None, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn for max <P, X> + entropic_reg * H(P), rows summing to 1 and columns to caps.

    ``entropic_reg`` defaults to 0.05 times the standard deviation of the finite entries of X (1 if that is 0).
    Returns (log_plan Tensor[N, K], prices Tensor[K]) with log P_ik = (X_ik - u_i - p_k) / entropic_reg.
    """
    _N, K = X.shape
    fin = torch.isfinite(X)
    if entropic_reg is None:
        vals = X[fin]
        scale = float(vals.std()) if vals.numel() > 1 else 0.0
        entropic_reg = 0.05 * (scale if scale > 0 else 1.0)
    eps = float(entropic_reg)
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
