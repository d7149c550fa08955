"""Co-training losses of Divide-and-Co-training.

Zhao, Zhou, Wang, Cai, Lam, Xu, *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*,
IEEE TIP 2022 (arXiv 2011.14660). The S small networks obtained by dividing one large network are trained
together; besides each member's own cross-entropy, a co-training loss pulls their predictions towards each
other. The paper's default is the generalised Jensen-Shannon divergence of the S predicted distributions,
:func:`js_divergence`; :func:`pairwise_kl` is the alternative in which each member is pulled towards its
(detached) peers.

Both work on log-probabilities only (``log_softmax`` and ``logsumexp``), so no logarithm of a probability
that underflowed to zero is ever taken: the losses and their gradients stay finite for logits of any
magnitude.

Einstein legend:
    S: number of members (predictions); B...: batch dimensions (any number, usually one); C: classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._validation import check_bool, check_choice, check_tensor, describe

__all__ = ["js_divergence", "pairwise_kl"]

_REDUCTIONS = ("mean", "sum", "none")


def _stack_logits(logits: Tensor | Sequence[Tensor], name: str = "logits") -> Tensor:
    """Return the predictions as one floating tensor ``Tensor[S, B..., C]``."""
    if isinstance(logits, Tensor):
        check_tensor(name, logits, floating=True)
        if logits.dim() < 2:
            raise ValueError(f"{name} must have shape [S, B..., C] (at least 2 dimensions), got {tuple(logits.shape)}")
        stacked = logits
    elif isinstance(logits, Sequence) and not isinstance(logits, (str, bytes)):
        if len(logits) == 0:
            raise ValueError(f"{name} must hold at least one prediction, got an empty sequence")
        for i, item in enumerate(logits):
            check_tensor(f"{name}[{i}]", item, floating=True)
            if item.dim() < 1:
                raise ValueError(f"{name}[{i}] must have shape [B..., C], got a scalar")
            if item.shape != logits[0].shape:
                raise ValueError(
                    f"every prediction in {name} must have the same shape; {name}[0] has "
                    f"{tuple(logits[0].shape)} but {name}[{i}] has {tuple(item.shape)}"
                )
        stacked = torch.stack(list(logits), dim=0)
    else:
        raise TypeError(f"{name} must be a Tensor[S, B..., C] or a sequence of Tensor[B..., C], got {describe(logits)}")
    if stacked.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one prediction (S >= 1), got shape {tuple(stacked.shape)}")
    if stacked.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one class in its last dimension, got {tuple(stacked.shape)}")
    return stacked


def _check_not_empty(stacked: Tensor, reduction: str) -> None:
    if reduction == "mean" and stacked[0, ..., 0].numel() == 0:
        raise ValueError(
            f"logits of shape {tuple(stacked.shape)} hold no sample: the mean over the batch is undefined "
            "(use reduction='sum' or 'none' for possibly empty batches)"
        )


def _reduce(value: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return value
    if reduction == "sum":
        return value.sum()
    return value.mean()


def js_divergence(logits: Tensor | Sequence[Tensor], reduction: str = "mean") -> Tensor:
    r"""Generalised Jensen-Shannon divergence of S predicted distributions (the paper's co-training loss).

    With :math:`p_i = \operatorname{softmax}(z_i)` and :math:`\bar p = \frac1S\sum_i p_i`,

    .. math::
        \mathrm{JS}(p_1, \dots, p_S) = H(\bar p) - \frac1S \sum_{i=1}^S H(p_i)
        = \frac1S \sum_{i=1}^S \mathrm{KL}(p_i \,\|\, \bar p) \;\ge 0.

    It is computed in the second (equal) form from log-probabilities: :math:`\log \bar p` is the
    ``logsumexp`` of the members' log-probabilities minus :math:`\log S`, so no log of zero appears and
    each term is non-negative up to rounding. Gradients flow into every member (nothing is detached).

    Args:
        logits: ``Tensor[S, B..., C]`` or a sequence of S ``Tensor[B..., C]``: unnormalised scores,
            classes in the last dimension. ``S = 1`` is allowed and gives zero.
        reduction: ``"mean"`` (over the batch dimensions; an empty batch raises), ``"sum"``, or ``"none"``
            (``Tensor[B...]``).

    Returns:
        ``Tensor[]``, or ``Tensor[B...]`` with ``reduction="none"``.
    """
    check_choice("reduction", reduction, _REDUCTIONS)
    z = _stack_logits(logits)
    _check_not_empty(z, reduction)
    num = z.shape[0]
    logp = torch.log_softmax(z, dim=-1)  # [S, B..., C]
    log_mean = torch.logsumexp(logp, dim=0) - math.log(num)  # [B..., C]
    # KL(p_i || mean) = sum_c p_i (log p_i - log mean); p_i = exp(logp) is 0 exactly where logp is
    # very negative, and the difference of two finite log-probabilities is finite, so no 0 * inf.
    kl = (logp.exp() * (logp - log_mean)).sum(dim=-1)  # [S, B...]
    return _reduce(kl.mean(dim=0), reduction)


def pairwise_kl(
    logits: Tensor | Sequence[Tensor],
    reduction: str = "mean",
    detach_peers: bool = True,
) -> Tensor:
    r"""Each member's KL divergence from its peers, averaged over the S-1 peers.

    For member :math:`i`,

    .. math::
        L_i = \frac{1}{S-1} \sum_{j \ne i} \mathrm{KL}\big(\operatorname{sg}(p_j) \,\|\, p_i\big)
            = \frac{1}{S-1} \sum_{j \ne i} \sum_c p_{j,c} (\log p_{j,c} - \log p_{i,c}),

    where :math:`\operatorname{sg}` stops the gradient (the peers act as targets), so member :math:`i`
    receives gradient only through its own :math:`L_i`.

    Args:
        logits: ``Tensor[S, B..., C]`` or a sequence of S ``Tensor[B..., C]``. ``S = 1`` gives zero (no
            peers).
        reduction: ``"none"`` returns ``Tensor[S, B...]`` (the loss of each member on each sample);
            ``"mean"`` averages over the batch and **sums over the members** (like the sum of the members'
            cross-entropies it is added to; an empty batch raises); ``"sum"`` sums everything.
        detach_peers: stop the gradient through the target distributions :math:`p_j` (default ``True``).

    Returns:
        ``Tensor[]``, or ``Tensor[S, B...]`` with ``reduction="none"``.
    """
    check_choice("reduction", reduction, _REDUCTIONS)
    check_bool("detach_peers", detach_peers)
    z = _stack_logits(logits)
    _check_not_empty(z, reduction)
    num = z.shape[0]
    logp = torch.log_softmax(z, dim=-1)  # [S, B..., C]
    if num == 1:
        per = logp.new_zeros(logp.shape[:-1]) + 0.0 * logp.sum(dim=-1)  # keeps the graph
    else:
        target = logp.detach() if detach_peers else logp  # [S_j, B..., C]
        # kl[j, i] = KL(p_j || p_i) = sum_c p_j (log p_j - log p_i); both logs are finite log-softmaxes.
        kl = (target.exp().unsqueeze(1) * (target.unsqueeze(1) - logp.unsqueeze(0))).sum(dim=-1)  # [S_j, S_i, B...]
        eye = torch.eye(num, dtype=torch.bool, device=z.device).reshape((num, num) + (1,) * (logp.dim() - 2))
        per = kl.masked_fill(eye, 0.0).sum(dim=0) / (num - 1)  # [S_i, B...]
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.reshape(num, -1).mean(dim=1).sum()
