"""Oracles for Divide-and-Co-training: the co-training divergences straight from their definitions."""

import torch


def js_divergence_reference(logits: torch.Tensor) -> torch.Tensor:
    """H(mean p) - mean H(p_i), straight from the definition, in float64: ``[S, B, C] -> [B]``."""
    p = torch.softmax(logits.double(), dim=-1)
    mean = p.mean(0)

    def entropy(q: torch.Tensor) -> torch.Tensor:
        return -(q * torch.log(q)).sum(-1)

    return entropy(mean) - torch.stack([entropy(pi) for pi in p]).mean(0)


def pairwise_kl_reference(logits: torch.Tensor) -> torch.Tensor:
    """Member i's mean KL(p_j || p_i) over its peers j, by loops, in float64: ``[S, B, C] -> [S, B]``."""
    p = torch.softmax(logits.double(), dim=-1)
    s = p.shape[0]
    rows = []
    for i in range(s):
        acc = torch.zeros(p.shape[1:-1], dtype=torch.float64)
        for j in range(s):
            if j != i:
                acc = acc + (p[j] * (torch.log(p[j]) - torch.log(p[i]))).sum(-1)
        rows.append(acc / (s - 1))
    return torch.stack(rows)


def smoothed_cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy against the smoothed target ``(1 - eps) q + eps / C``, in float64: ``[B, C] -> []``.

    ``target`` holds class indices ``[B]`` (``q`` one-hot) or class probabilities ``[B, C]``.
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    classes = logits.shape[-1]
    q = target.double() if target.is_floating_point() else torch.eye(classes, dtype=torch.float64)[target]
    smoothed = (1.0 - smoothing) * q + smoothing / classes
    return -(smoothed * logp).sum(-1).mean()
