"""The early-exit rule, defined once for :class:`~pycoe.coe.model.CoE`, :class:`~pycoe.basisnet.model.BasisNet`
and the evaluation helpers.

Both models let a cheap first stage (the delegator, the lightweight model) answer on its own when its rough
prediction is confident, and send only the other samples to the expensive second stage (the experts, the
synthesised specialist). The rule (**pycoe's formulation** for both papers; neither publishes one):

    a sample exits when the maximum softmax probability of its rough logits is ``>= threshold``;
    ``threshold=None`` never exits, ``0`` exits every sample, ``1`` only samples predicted with probability 1.

:func:`rough_confidence` and :func:`exit_mask` are that rule; use them (rather than re-writing it) when you
replay the exit decision on cached predictions, as :func:`~pycoe.coe.evaluate.threshold_sweep` does.

Einstein legend: ``b`` sample (B), ``c`` class (C).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from pycoe._validation import check_probability, check_tensor

__all__ = [
    "check_exit_threshold",
    "resolve_exit_threshold",
    "rough_confidence",
    "exit_mask",
    "exit_decision",
    "merge_early_exit",
    "check_exit_shapes",
    "ExitThresholdMixin",
]


def check_exit_threshold(value: Any, name: str = "exit_threshold") -> float | None:
    """Return ``value`` as a float in [0, 1], or ``None``; raise a ``ValueError`` naming ``name`` otherwise."""
    return check_probability(name, value, allow_none=True)


def resolve_exit_threshold(value: Any, default: float | None) -> float | None:
    """``default`` when ``value`` is the string ``"default"``, else ``value`` checked by :func:`check_exit_threshold`.

    The models' ``forward_eval(..., exit_threshold="default")`` use it for a per-call override.
    """
    if isinstance(value, str) and value == "default":
        return default
    return check_exit_threshold(value)


def rough_confidence(rough_logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability of each sample's rough logits, the quantity the exit rule thresholds.

    Args:
        rough_logits: ``Tensor[B, C]`` (floating point).

    Returns:
        ``Tensor[B]``: float32 (computed in float32 whatever the logits' dtype, so that the rule does not depend on
        the precision the model ran in), detached.
    """
    check_tensor("rough_logits", rough_logits, ndim=2, floating=True)
    return F.softmax(rough_logits.detach().float(), dim=1).amax(dim=1)


def exit_mask(confidence: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """The exit rule on rough confidences: ``confidence >= threshold`` (``None``: no sample exits).

    Args:
        confidence: ``Tensor[B]``, from :func:`rough_confidence`.
        threshold: in [0, 1], or ``None``.

    Returns:
        ``BoolTensor[B]``, ``True`` for the samples that exit (take the rough prediction).
    """
    check_tensor("confidence", confidence, ndim=1)
    threshold = check_exit_threshold(threshold, "threshold")
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
    """Which samples exit early, and the confidence that decided it (:func:`rough_confidence`, :func:`exit_mask`).

    Args:
        rough_logits: ``Tensor[B, C]``, or ``None`` when the first stage has no rough head.
        threshold: in [0, 1], or ``None`` (no sample exits).
        batch: B (used when ``rough_logits`` is ``None``).
        device: device of the results when ``rough_logits`` is ``None``.
        source: names the model that produced ``rough_logits``, for the error message.

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


def merge_early_exit(
    rough_logits: torch.Tensor | None,
    exited: torch.Tensor,
    run: Callable[[torch.Tensor | None], torch.Tensor],
    what: str,
) -> torch.Tensor:
    """Rough logits for the exited samples, the second stage's output for the others, in the input order.

    Args:
        rough_logits: ``Tensor[B, C]`` (may be ``None`` only when no sample exited).
        exited: ``BoolTensor[B]``.
        run: ``keep -> Tensor[B_kept, ...]`` runs the second stage on the samples ``keep`` (``LongTensor[B_kept]``)
            or, when ``keep`` is ``None``, on the whole batch. It is not called when every sample exited.
        what: names the second stage's outputs for the error message (e.g. ``"expert"``).

    Returns:
        ``Tensor[B, ...]``.

    Raises:
        ValueError: some samples exited and the second stage's per-sample shape differs from the rough logits'.
    """
    batch = exited.shape[0]
    n_exit = int(exited.sum())
    if n_exit == 0:
        return run(None)
    if rough_logits is None:
        raise ValueError("merge_early_exit: samples exited but rough_logits is None")
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


def check_exit_shapes(
    rough_logits: torch.Tensor,
    output_shape: tuple[int, ...] | None,
    threshold: float,
    first_stage: str = "the first stage",
    second_stage: str = "the second stage",
) -> None:
    """Raise unless the second stage's per-sample output shape is the rough logits' ``(C,)``.

    Early exit replaces a sample's output by its rough logits, so the two must predict the same classes; a model
    checks this on its first forward with a threshold, whether or not any sample exits (otherwise a batch where
    every sample exits would return the rough head's shape and another batch would fail).

    Args:
        rough_logits: ``Tensor[B, C]``.
        output_shape: the second stage's per-sample output shape, or ``None`` when not known yet (no check).
        threshold: the exit threshold in use (for the message).
        first_stage, second_stage: how the message names the two stages.
    """
    if output_shape is not None and tuple(output_shape) != tuple(rough_logits.shape[1:]):
        raise ValueError(
            f"early exit (exit_threshold={threshold}) replaces a sample's output by {first_stage}'s rough "
            f"prediction, but the rough head predicts {rough_logits.shape[1]} classes (per-sample shape "
            f"{tuple(rough_logits.shape[1:])}) while {second_stage} returns per-sample shape {tuple(output_shape)}; "
            "give the rough head the classes of the second stage (num_classes), or keep exit_threshold=None (e.g. "
            "for sequence outputs)"
        )


class ExitThresholdMixin:
    """The validated ``exit_threshold`` property of a two-stage model with early exit.

    A class using it (``class Model(ExitThresholdMixin, nn.Module)``) defines :attr:`has_rough_head` and sets
    :attr:`first_stage` to name its first stage in error messages. Assigning ``model.exit_threshold = t`` checks
    that ``t`` is ``None`` or a number in [0, 1], and that a threshold other than ``None`` has a rough head to
    act on.
    """

    #: How error messages name the first stage, e.g. ``"the delegator"``.
    first_stage: ClassVar[str] = "the first stage"
    _exit_threshold: float | None

    @property
    def has_rough_head(self) -> bool:
        """Whether the first stage produces rough logits (``True`` when it cannot be known in advance)."""
        return True

    @property
    def exit_threshold(self) -> float | None:
        """The early-exit threshold in [0, 1], or ``None`` (never exit). Settable; validated."""
        return self._exit_threshold

    @exit_threshold.setter
    def exit_threshold(self, value: float | None) -> None:
        threshold = check_exit_threshold(value)
        if threshold is not None and not self.has_rough_head:
            raise ValueError(
                f"exit_threshold needs a rough prediction, but {self.first_stage} has no rough head "
                "(num_classes=None); give it num_classes=C or keep exit_threshold=None"
            )
        self._exit_threshold = threshold
