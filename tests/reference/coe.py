"""Slow, obviously-correct references for the CoE training loss: the WGM weights by brute force.

Independent of :mod:`pycoe.routing` (no solver, no weighter): every balanced assignment is enumerated.
"""

from __future__ import annotations

import torch


def near_equal(n: int, k: int) -> list[int]:
    """``n // k`` samples per expert, the remainder one by one to the first experts."""
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def best_balanced_assignment(scores: torch.Tensor, capacities: list[int]) -> torch.Tensor:
    """The assignment (one expert per sample, expert j exactly ``capacities[j]`` samples) of maximum total score,
    found by enumerating every such assignment. Exponential: for a handful of samples only.

    Args:
        scores: Tensor[B, K].
        capacities: K counts summing to B.

    Returns:
        LongTensor[B].
    """
    b, k = scores.shape
    assert sum(capacities) == b and len(capacities) == k
    values = scores.double().tolist()
    best: tuple[float, list[int]] = (float("-inf"), [])
    left = list(capacities)
    chosen: list[int] = []

    def visit(i: int, total: float) -> None:
        nonlocal best
        if i == b:
            if total > best[0]:
                best = (total, list(chosen))
            return
        for j in range(k):
            if left[j]:
                left[j] -= 1
                chosen.append(j)
                visit(i + 1, total + values[i][j])
                chosen.pop()
                left[j] += 1

    visit(0, 0.0)
    return torch.tensor(best[1], dtype=torch.long)


def wgm_weights(selection_logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """pycoe's WGM weights, written out: log-softmax scores, the best near-equal balanced assignment, then 1 for the
    assigned expert and ``epsilon`` elsewhere. Tensor[B, K], detached."""
    logits = selection_logits.detach()
    b, k = logits.shape
    assignment = best_balanced_assignment(torch.log_softmax(logits.double(), dim=1), near_equal(b, k))
    weights = torch.full((b, k), float(epsilon), dtype=logits.dtype)
    weights[torch.arange(b), assignment] = 1.0
    return weights
