"""Regularisation scaling and the co-training weight schedule of Divide-and-Co-training.

Zhao et al., *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*, IEEE TIP 2022
(arXiv 2011.14660). When one network is divided into S smaller ones, the paper also divides its
"regularisation components":

- weight decay becomes :math:`\\mathrm{wd} \\cdot e^{1/S - 1}` (the paper's Eq. 6; its Table IV applies it to
  the wide ResNets only): :func:`scale_weight_decay`;
- dropout: the authors' public code divides the dropout probability by S for ResNets and by
  :math:`\\sqrt S` for SE-ResNets and EfficientNets. That is what their code does, not a general rule
  stated in the paper, so the rule is an argument: :func:`scale_dropout` gives the scaled probability (for a
  factory's dropout argument or a functional dropout), :func:`scale_dropout_modules` scales the dropout modules
  of a model in place (after :func:`~pycoe.cotrain.divide_module`).

The co-training loss weight is warmed up linearly (the reference code: weight 0.5 reached after 40 epochs,
floor 0.005); :class:`LinearWarmup` is pycoe's formulation of that ramp.
"""

from __future__ import annotations

import math

from torch import nn

from .._validation import check_choice, check_module, check_nonnegative_int, check_number, check_positive_int

__all__ = ["scale_weight_decay", "scale_dropout", "scale_dropout_modules", "LinearWarmup"]


_RULES = ("linear", "sqrt", "none")


def scale_weight_decay(weight_decay: float, num_splits: int) -> float:
    r"""The paper's weight decay for one of S divided networks: :math:`\mathrm{wd}\cdot e^{1/S-1}`.

    This is Eq. 6 of Zhao et al. (TIP 2022). ``S = 1`` returns ``weight_decay`` unchanged; ``S = 2`` gives
    about ``0.61 * weight_decay``; ``S = 4`` about ``0.47 * weight_decay``.

    Args:
        weight_decay: the weight decay tuned for the undivided network (>= 0).
        num_splits: S >= 1.

    Returns:
        The scaled weight decay.
    """
    wd = check_number("weight_decay", weight_decay, minimum=0)
    s = check_positive_int("num_splits", num_splits)
    return wd * math.exp(1.0 / s - 1.0)


def scale_dropout(p: float, num_splits: int, rule: str = "linear") -> float:
    r"""Dropout probability for one of S divided networks (a number; :func:`scale_dropout_modules` edits a model).

    ``rule="linear"`` gives :math:`p/S` (what the authors' code does for ResNets); ``rule="sqrt"`` gives
    :math:`p/\sqrt S` (their code's choice for SE-ResNeXt and EfficientNet); ``rule="none"`` keeps ``p``.

    Args:
        p: the dropout probability of the undivided network, in [0, 1].
        num_splits: S >= 1.
        rule: ``"linear"``, ``"sqrt"`` or ``"none"``.

    Returns:
        The scaled probability.
    """
    prob = check_number("p", p, minimum=0, maximum=1)
    s = check_positive_int("num_splits", num_splits)
    check_choice("rule", rule, _RULES)
    if rule == "linear":
        return prob / s
    if rule == "sqrt":
        return prob / math.sqrt(s)
    return prob


def scale_dropout_modules(model: nn.Module, num_splits: int, rule: str = "linear") -> int:
    """Scale, in place, the ``p`` of every dropout module of ``model`` with :func:`scale_dropout`.

    Covers ``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout`` and ``nn.FeatureAlphaDropout``.
    Functional dropout called inside a ``forward`` (timm's ``drop_rate``, for instance) cannot be reached and is
    left alone: pass ``scale_dropout(p, num_splits)`` to the model's constructor instead.

    Args:
        model: the (divided) network to edit.
        num_splits: S >= 1.
        rule: see :func:`scale_dropout`.

    Returns:
        The number of dropout modules changed.
    """
    check_module("model", model)
    check_positive_int("num_splits", num_splits)
    check_choice("rule", rule, _RULES)
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = scale_dropout(module.p, num_splits, rule)
            count += 1
    return count


class LinearWarmup:
    r"""A linear ramp of a loss weight from ``min_weight`` at step 0 to ``max_weight`` at ``warmup_steps``.

    .. math::
        w(t) = w_{\min} + (w_{\max} - w_{\min}) \cdot \min(t / T, 1),

    with :math:`w(t) = w_{\max}` for every step if :math:`T = 0`. This is pycoe's formulation of the paper's
    linear warm-up of the co-training weight (the reference code warms 0.5 up over 40 epochs with a floor
    of 0.005; whether the floor is added or clamped there is not reproduced here). Pass it as
    ``CoTrainingLoss(weight=...)``, or call it: ``LinearWarmup(T, 0.5)(step)`` is the weight at ``step``.

    Args:
        warmup_steps: T >= 0, the step (or epoch) at which ``max_weight`` is reached.
        max_weight: the final weight (a finite number >= 0).
        min_weight: the weight at step 0 (a finite number >= 0, <= ``max_weight``).

    Example:
        >>> schedule = LinearWarmup(warmup_steps=100, max_weight=0.5, min_weight=0.005)
        >>> schedule(0), schedule(50), schedule(1000)
        (0.005, 0.2525, 0.5)
    """

    def __init__(self, warmup_steps: int, max_weight: float, min_weight: float = 0.0) -> None:
        self.warmup_steps = check_nonnegative_int("warmup_steps", warmup_steps)
        self.max_weight = check_number("max_weight", max_weight, minimum=0)
        self.min_weight = check_number("min_weight", min_weight, minimum=0)
        if self.min_weight > self.max_weight:
            raise ValueError(
                f"min_weight must be <= max_weight, got min_weight={self.min_weight} > max_weight={self.max_weight}"
            )

    def __call__(self, step: int) -> float:
        """The weight at ``step`` (an int >= 0), a Python float."""
        t = check_nonnegative_int("step", step)
        if self.warmup_steps == 0:
            return self.max_weight
        return self.min_weight + (self.max_weight - self.min_weight) * min(t / self.warmup_steps, 1.0)

    def __repr__(self) -> str:
        return (
            f"LinearWarmup(warmup_steps={self.warmup_steps}, max_weight={self.max_weight}, "
            f"min_weight={self.min_weight})"
        )
