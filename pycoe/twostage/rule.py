"""The early-exit rule, written once for every two-stage model (:class:`~pycoe.coe.model.CoE`,
:class:`~pycoe.basisnet.model.BasisNet`, the cascade baseline) and for the evaluation helpers.

A cheap first stage (the delegator, the lightweight model) answers on its own when its rough prediction is
confident, and only the other samples go to the expensive second stage (the experts, the synthesised specialist).
The rule (**pycoe's formulation** for both papers; neither publishes one):

    a sample exits when the maximum softmax probability of its rough logits is ``>= threshold``;
    ``threshold=None`` never exits, ``0`` exits every sample whose confidence is a number, ``1`` only samples
    predicted with probability 1.

**NaN confidence.** Rough logits holding a NaN (or ``+inf``: the softmax of an infinite logit is NaN) give a NaN
confidence, and a NaN confidence never exits, at any threshold, ``0`` included: the rough prediction of such a
sample is unusable, so the second stage answers for it. The traced path (``torch.compile``, ``torch.export``,
ONNX) compares the same way (``NaN >= t`` is false) and agrees.

:func:`rough_confidence` and :func:`exit_mask` are that rule; use them (rather than re-writing it) when you replay
the exit decision on cached predictions, as :func:`~pycoe.twostage.evaluate.threshold_sweep` does.

Einstein legend: ``b`` sample (B), ``c`` class (C).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pycoe._validation import check_probability, check_tensor

__all__ = ["rough_confidence", "exit_mask"]


def resolve_exit_threshold(value: Any, default: float | None) -> float | None:
    """``default`` when ``value`` is the string ``"default"``, else ``value`` checked as a number in [0, 1] or ``None``
    (the per-call override of ``forward_eval(..., exit_threshold="default")``)."""
    if isinstance(value, str) and value == "default":
        return default
    return check_probability("exit_threshold", value, allow_none=True)


def rough_confidence(rough_logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability of each sample's rough logits, the quantity the exit rule thresholds.

    Args:
        rough_logits: ``Tensor[B, C]`` (floating point).

    Returns:
        ``Tensor[B]``: float32 (computed in float32 whatever the logits' dtype, so that the rule does not depend on
        the precision the model ran in), detached; ``NaN`` for a sample whose logits hold a NaN or ``+inf``.
    """
    check_tensor("rough_logits", rough_logits, ndim=2, floating=True)
    return F.softmax(rough_logits.detach().float(), dim=1).amax(dim=1)


def exit_mask(confidence: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """The exit rule on rough confidences: ``confidence >= threshold`` (``None``: no sample exits).

    A ``NaN`` confidence never exits, whatever the threshold (``NaN >= t`` is false), ``0`` included.

    Args:
        confidence: ``Tensor[B]``, from :func:`rough_confidence`.
        threshold: in [0, 1], or ``None``.

    Returns:
        ``BoolTensor[B]``, ``True`` for the samples that exit (take the rough prediction).
    """
    check_tensor("confidence", confidence, ndim=1)
    threshold = check_probability("threshold", threshold, allow_none=True)
    if threshold is None:
        return torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
    return confidence >= threshold


def exit_decision(
    rough_logits: torch.Tensor | None,
    threshold: float | None,
    batch: int,
    device: torch.device,
    source: str = "the first stage",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples exit, and the confidence that decided it (:func:`rough_confidence`, :func:`exit_mask`).

    Args:
        rough_logits: ``Tensor[B, C]``, or ``None`` when the first stage has no rough head.
        threshold: in [0, 1], or ``None`` (no sample exits).
        batch: B (used when ``rough_logits`` is ``None``).
        device: device of the results when ``rough_logits`` is ``None``.
        source: names the first stage, for the error message.

    Returns:
        ``(confidence Tensor[B], exited BoolTensor[B])``; the confidence is ``NaN`` without rough logits.

    Raises:
        ValueError: a threshold is given but there are no rough logits.
    """
    if rough_logits is None:
        if threshold is not None:
            raise ValueError(f"exit_threshold needs a rough prediction, but {source} returned rough_logits=None")
        confidence = torch.full((batch,), float("nan"), device=device)
    else:
        confidence = rough_confidence(rough_logits)
    return confidence, exit_mask(confidence, threshold)
