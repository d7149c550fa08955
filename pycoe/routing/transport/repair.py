"""Exact repair of the balanced-transport solver: successive shortest paths on the K-node exchange graph.

Internal module of :mod:`pycoe.routing.transport` (its public API); used by the exact method after the dual
warm start (:mod:`pycoe.routing.transport.exact`).

Notation: ``N`` samples, ``K`` experts; ``S`` the scores held transposed ``[K, N]``; ``a`` the assignment
``[N]``; ``p`` the expert prices ``[K]``; ``caps`` the capacities ``[K]``.

The current assignment is optimal for its own loads with prices ``p`` (complementary slackness). Moving one
sample ``i`` from ``k`` to ``l`` has reduced cost ``(s_ik - p_k) - (s_il - p_l) >= 0``; the edge ``k -> l``
costs the minimum of that over the samples currently in ``k`` (the order of those samples depends only on
``s_ik - s_il``, so each edge keeps a pre-sorted candidate list with lazy deletion plus a heap for arrivals).
Shortest paths from the over-full experts (Bellman-Ford rounds on the ``K`` nodes, non-negative reduced costs)
give the nearest under-full one; the prices drop by the (capped) distances, which keeps every reduced cost
non-negative and makes the path's edges tight, and one sample moves along every edge of the path. Each
augmentation lowers the total excess by one and keeps complementary slackness, so when the excess reaches
zero the assignment is optimal (standard successive-shortest-path argument). If no under-full expert can be
reached, the experts reached hold more samples than their capacities while none of those samples may go
elsewhere (``-inf`` scores), which proves infeasibility.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from pycoe.routing.transport.common import TransportInfeasibleError

__all__: list[str] = []  # internal: see pycoe.routing.transport

# Size of the exchange graph's initial candidate set: per expert, plus per unit of excess.
_CANDIDATES_PER_EXPERT = 64
_CANDIDATES_PER_EXCESS = 16


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


def ssp_repair(S: np.ndarray, a: np.ndarray, p: np.ndarray, caps: np.ndarray, slack: np.ndarray) -> np.ndarray:
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
