"""The early-exit rule shared by :class:`~pycoe.coe.model.CoE` and :class:`~pycoe.basisnet.model.BasisNet`.

Both models let a cheap first stage (the delegator, the lightweight model) answer on its own when its rough
prediction is confident, and send only the other samples to the expensive second stage (the experts, the
synthesised specialist). The rule (**pycoe's formulation** for both papers): a sample exits when the maximum
softmax probability of its rough logits is ``>= exit_threshold``; ``None`` never exits.

Einstein legend: ``b`` sample (B), ``c`` class (C).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ._validation import check_probability

__all__ = ["resolve_exit_threshold", "rough_confidence", "exit_decision", "merge_early_exit"]


def resolve_exit_threshold(value: Any, default: float | None) -> float | None:
    """``default`` when ``value`` is the string ``"default"``, else ``value`` checked to be in [0, 1] or ``None``."""
    if isinstance(value, str) and value == "default":
        return default
    return check_probability("exit_threshold", value, allow_none=True)


def rough_confidence(rough_logits: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Maximum softmax probability of each sample's rough logits (float32, detached).

    Args:
        rough_logits: Tensor[B, C], or ``None`` when there is no rough head.
        batch: B (used when ``rough_logits`` is ``None``).
        device: the device of the result when ``rough_logits`` is ``None``.

    Returns:
        Tensor[B]: the confidence, all ``NaN`` without rough logits.
    """
    if rough_logits is None:
        return torch.full((batch,), float("nan"), device=device)
    return F.softmax(rough_logits.detach().float(), dim=1).amax(dim=1)


def exit_decision(
    rough_logits: torch.Tensor | None,
    threshold: float | None,
    batch: int,
    device: torch.device,
    source: str = "the first stage",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples exit early, and the confidence that decided it.

    Args:
        rough_logits: Tensor[B, C], or ``None``.
        threshold: in [0, 1], or ``None`` (no sample exits).
        batch: B.
        device: device of the results when ``rough_logits`` is ``None``.
        source: names the model that produced ``rough_logits``, for the error message.

    Returns:
        ``(confidence Tensor[B], exited BoolTensor[B])`` with ``exited = confidence >= threshold``.

    Raises:
        ValueError: a threshold is given but there are no rough logits.
    """
    confidence = rough_confidence(rough_logits, batch, device)
    if threshold is None:
        return confidence, torch.zeros(batch, dtype=torch.bool, device=confidence.device)
    if rough_logits is None:
        raise ValueError(f"exit_threshold needs a rough prediction, but {source} returned rough_logits=None")
    return confidence, confidence >= threshold


def merge_early_exit(
    rough_logits: torch.Tensor | None,
    exited: torch.Tensor,
    run: Callable[[torch.Tensor | None], torch.Tensor],
    what: str,
) -> torch.Tensor:
    """Rough logits for the exited samples, the second stage's output for the others, in the input order.

    Args:
        rough_logits: Tensor[B, C] (may be ``None`` only when no sample exited).
        exited: BoolTensor[B].
        run: ``keep -> Tensor[B_kept, ...]`` runs the second stage on the samples ``keep`` (LongTensor[B_kept])
            or, when ``keep`` is ``None``, on the whole batch. It is not called when every sample exited.
        what: names the second stage's outputs for the error message (e.g. ``"expert"``).

    Returns:
        Tensor[B, ...].

    Raises:
        ValueError: some samples exited and the second stage's per-sample shape differs from the rough logits'.
    """
    batch = exited.shape[0]
    n_exit = int(exited.sum())
    if n_exit == 0:
        return run(None)
    if n_exit == batch:
        return rough_logits
    keep = (~exited).nonzero().squeeze(1)  # LongTensor[B_kept]
    routed = run(keep)
    if routed.shape[1:] != rough_logits.shape[1:]:
        raise ValueError(
            f"early exit mixes rough predictions of per-sample shape {tuple(rough_logits.shape[1:])} with {what} "
            f"outputs of per-sample shape {tuple(routed.shape[1:])}; early exit needs {what} outputs of the rough "
            "head's shape [B, C] (use exit_threshold=None for other tasks)"
        )
    return rough_logits.to(routed.dtype).index_copy(0, keep, routed)
