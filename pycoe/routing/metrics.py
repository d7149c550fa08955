"""Routing metrics and a load-balance regulariser for expert selection (pure functions).

Used to monitor how a Collaboration-of-Experts model (Zhang, Chen & Zhong, ICML 2022,
arXiv:2107.03815) spreads samples over its experts. None of these is a module of the CoE paper.
In particular :func:`load_balance_cv2` is the importance loss of Shazeer et al., "Outrageously Large
Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer" (ICLR 2017), under its own name; the
"variance calculation module" (VCM) named in CoE's first arXiv version is not public and is **not**
implemented here.

Einstein legend: B = samples, K = experts, C = classes.
Scalar results are 0-dim float tensors (convert with ``float()`` only where you log them).

Every function runs inside ``torch.compile`` (``fullgraph=True`` included) without a graph break: the counts
use ``scatter_add`` (whose output size does not depend on the data, unlike ``bincount``), and the checks of
index ranges and non-finite values become ``torch._assert_async`` (``RuntimeError`` when the compiled code
runs, instead of eager mode's ``ValueError``).

Each public function checks its arguments, and the checks that read values (index ranges, NaN/inf) make the host
wait for a GPU. Each wraps a private unchecked form (``_expert_load``, ``_assignment_entropy``, ``_agreement``,
``_oracle_accuracy``, ``_load_balance_cv2``) for library code whose inputs are valid by construction or were
checked already (the CoE loss's metrics): a check belongs where the values enter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pycoe._validation import (
    check_bool,
    check_data,
    check_expert_index,
    check_finite,
    check_positive_int,
    check_tensor,
)

__all__ = [
    "expert_load",
    "assignment_entropy",
    "mean_selection_entropy",
    "agreement",
    "oracle_accuracy",
    "load_balance_cv2",
]


def _check_logits(name: str, logits: torch.Tensor) -> torch.Tensor:
    check_tensor(name, logits, ndim=2, floating=True)
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, K] with B >= 1 and K >= 1, got {tuple(logits.shape)}")
    check_finite(name, logits)
    return logits


def expert_load(index: torch.Tensor, num_experts: int, *, normalize: bool = False) -> torch.Tensor:
    """Number (or fraction) of samples routed to each expert.

    Entries equal to -1 (samples that exited early, as in ``CoEOutput.expert_index``) are not counted.

    Args:
        index: LongTensor[B], expert per sample, in [-1, K-1].
        num_experts: K.
        normalize: return fractions of the routed samples (summing to 1; all zeros if none was routed)
            instead of counts.

    Returns:
        LongTensor[K] of counts, or Tensor[K] (float32) of fractions.
    """
    k = check_positive_int("num_experts", num_experts)
    idx = check_expert_index("index", index, k, allow_exited=True)
    return _expert_load(idx, k, normalize=check_bool("normalize", normalize))


def _expert_load(idx: torch.Tensor, k: int, normalize: bool = False) -> torch.Tensor:
    """:func:`expert_load` unchecked: ``idx`` is a LongTensor[B] in [-1, K-1]."""
    routed = idx >= 0
    counts = torch.zeros(k, dtype=torch.long, device=idx.device)
    counts.scatter_add_(0, idx.clamp_min(0), routed.long())  # exited samples (-1) add 0
    if not normalize:
        return counts
    total = counts.sum()
    return counts.float() / total.clamp_min(1).float()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    # Tensor[K] distribution -> entropy in nats, with 0 log 0 = 0.
    return -(torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))).sum()


def assignment_entropy(index: torch.Tensor, num_experts: int, *, normalize: bool = False) -> torch.Tensor:
    r"""Entropy of the load distribution :math:`H(n / \sum n) = -\sum_k f_k \log f_k` (nats).

    ``log K`` when every expert gets the same share, 0 when all samples go to one expert.

    Args:
        index: LongTensor[B], expert per sample (-1 entries, exited samples, are ignored).
        num_experts: K.
        normalize: divide by :math:`\log K` (result in [0, 1]; for K = 1 the result is 1).

    Returns:
        Tensor[] (float32). 0 if no sample was routed.
    """
    check_bool("normalize", normalize)
    return _normalized_entropy(expert_load(index, num_experts, normalize=True), normalize)


def _assignment_entropy(idx: torch.Tensor, k: int, normalize: bool = False) -> torch.Tensor:
    """:func:`assignment_entropy` unchecked: ``idx`` is a LongTensor[B] in [-1, K-1]."""
    return _normalized_entropy(_expert_load(idx, k, normalize=True), normalize)


def _normalized_entropy(f: torch.Tensor, normalize: bool) -> torch.Tensor:
    h = _entropy(f)
    if normalize:
        k = f.numel()
        return h / math.log(k) if k > 1 else torch.ones_like(h)
    return h


def mean_selection_entropy(selection_logits: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    r"""Entropy of the batch-mean selection distribution :math:`\bar p = \frac1B \sum_b \operatorname{softmax}(z_b)`.

    High when the delegator spreads its probability mass over all experts on average (even if each
    sample is confident), low when it favours a few. Differentiable.

    Args:
        selection_logits: Tensor[B, K].
        normalize: divide by :math:`\log K`.

    Returns:
        Tensor[] in the logits' dtype.
    """
    z = _check_logits("selection_logits", selection_logits)
    check_bool("normalize", normalize)
    return _normalized_entropy(F.softmax(z, dim=1).mean(dim=0), normalize)  # of p_bar, Tensor[K]


def agreement(selection_logits: torch.Tensor, label_index: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose top-1 selected expert equals the label (e.g. from the LGM).

    Ties in the logits resolve to the lowest expert index (``torch.argmax``'s rule on CPU).

    Args:
        selection_logits: Tensor[B, K].
        label_index: LongTensor[B], in [0, K-1].

    Returns:
        Tensor[] (float32) in [0, 1].
    """
    z = _check_logits("selection_logits", selection_logits)
    idx = check_expert_index("label_index", label_index, z.shape[1], allow_exited=False)
    if idx.shape[0] != z.shape[0]:
        raise ValueError(
            f"label_index must have shape [B={z.shape[0]}] to match selection_logits, got {tuple(idx.shape)}"
        )
    return _agreement(z, idx)


def _agreement(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """:func:`agreement` unchecked: finite ``z`` Tensor[B, K], ``idx`` LongTensor[B] in [0, K-1]."""
    return (z.argmax(dim=1) == idx).float().mean()


def oracle_accuracy(expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of samples that at least one expert classifies correctly (top-1).

    The accuracy a perfect delegator could reach with these experts: an upper bound for routed accuracy.

    Args:
        expert_logits: Tensor[K, B, C], every expert's class logits on the batch.
        target: LongTensor[B], class indices in [0, C-1].

    Returns:
        Tensor[] (float32) in [0, 1].
    """
    check_tensor("expert_logits", expert_logits, ndim=3, floating=True)
    k, b, c = expert_logits.shape
    if k == 0 or b == 0 or c == 0:
        raise ValueError(f"expert_logits must have shape [K, B, C] with all sizes >= 1, got {(k, b, c)}")
    check_finite("expert_logits", expert_logits)
    check_tensor("target", target, shape=(b,))
    tgt = check_expert_index("target", target, c, allow_exited=False, size_name="C")
    return _oracle_accuracy(expert_logits, tgt)


def _oracle_accuracy(expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`oracle_accuracy` unchecked: ``expert_logits`` Tensor[K, B, C], ``target`` LongTensor[B] in [0, C)."""
    correct = expert_logits.argmax(dim=2) == target[None, :]  # [K, B]
    return correct.any(dim=0).float().mean()


def load_balance_cv2(selection: torch.Tensor, *, is_probs: bool = False) -> torch.Tensor:
    r"""Squared coefficient of variation of per-expert importance: a differentiable load-balance loss.

    With :math:`p_b = \operatorname{softmax}(z_b)` and importance :math:`I_k = \sum_b p_{bk}`,

    .. math::

        \mathrm{CV}^2(I) = \frac{\operatorname{Var}_k(I_k)}{\left(\operatorname{Mean}_k(I_k)\right)^2},

    with the population variance over the K experts. It is 0 when every expert receives the same total
    probability mass and :math:`K - 1` when one expert receives all of it. This is the importance loss
    of Shazeer et al. (2017), used by mixture-of-experts libraries; add it to the delegator's loss with
    a small weight. It is pycoe's optional regulariser, not part of the published CoE method.

    Args:
        selection: Tensor[B, K] of selection logits (default) or of probabilities (``is_probs=True``:
            non-negative, used as given).
        is_probs: whether ``selection`` already holds probabilities.

    Returns:
        Tensor[] (differentiable) in the input's dtype; 0 for K = 1.
    """
    x = _check_logits("selection", selection)
    if check_bool("is_probs", is_probs):
        check_data((x.detach() >= 0).all(), "selection must be non-negative when is_probs=True")
        check_data(x.detach().sum() > 0, "selection must have a positive total probability mass when is_probs=True")
    return _load_balance_cv2(x, is_probs)


def _load_balance_cv2(selection: torch.Tensor, is_probs: bool = False) -> torch.Tensor:
    """:func:`load_balance_cv2` unchecked: finite ``selection`` Tensor[B, K] (B, K >= 1; probabilities when
    ``is_probs``)."""
    p = selection if is_probs else F.softmax(selection, dim=1)
    importance = p.sum(dim=0)  # [K]
    mean = importance.mean()
    var = importance.var(unbiased=False) if importance.numel() > 1 else torch.zeros_like(mean)
    return var / mean.square()
