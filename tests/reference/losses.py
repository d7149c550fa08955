"""Slow, obviously-correct reference for the per-sample cross-entropy: one Python loop per sample and token.

Independent of ``torch.nn.functional.cross_entropy``: each token's loss is ``logsumexp(z) - z[label]`` written
out, with Python floats in float64.
"""

from __future__ import annotations

import math

import torch


def token_nll(logits: list[float], label: int) -> float:
    """``-log softmax(logits)[label]``, by the definition."""
    top = max(logits)
    log_total = top + math.log(sum(math.exp(v - top) for v in logits))
    return log_total - logits[label]


def per_sample_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, shift: bool = False
) -> torch.Tensor:
    """Mean token loss over each sample's non-ignored labels (0 when it has none); class logits ``[B, C]`` are one
    token per sample. ``shift`` scores position t against label t + 1."""
    if shift:
        logits, target = logits[:, :-1], target[:, 1:]
    batch, classes = logits.shape[0], logits.shape[-1]
    rows = logits.double().reshape(batch, -1, classes).tolist()
    labels = target.reshape(batch, -1).tolist()
    out = []
    for sample_rows, sample_labels in zip(rows, labels):
        losses = [token_nll(row, lab) for row, lab in zip(sample_rows, sample_labels) if lab != ignore_index]
        out.append(sum(losses) / len(losses) if losses else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def per_sample_soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class probabilities ``Tensor[B, C]``: ``sum_c p_c * nll(c)``."""
    out = []
    for row, p in zip(logits.double().tolist(), probs.double().tolist()):
        out.append(sum(pc * token_nll(row, c) for c, pc in enumerate(p)))
    return torch.tensor(out, dtype=torch.float64)
