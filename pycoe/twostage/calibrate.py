"""Pick the early-exit threshold on held-out data, for an accuracy or a FLOPs budget.

A two-stage model (:class:`~pycoe.coe.model.CoE`, :class:`~pycoe.basisnet.model.BasisNet`, the cascade) lets a
sample exit on the first stage's rough prediction when its maximum softmax probability reaches ``exit_threshold``
(**pycoe's formulation** of the exit rule; see :mod:`pycoe.twostage.rule`). Which threshold to deploy is a choice,
and a choice made on the test set makes the test numbers optimistic. :func:`calibrate_exit_threshold` makes it on
data held out from training (a validation split) under one of two budgets:

- ``max_accuracy_drop=d``: the threshold with the lowest average FLOPs per sample whose accuracy on ``data`` is at
  least the accuracy without exit minus ``d`` (a fraction: ``0.003`` is 0.3 points);
- ``max_flops=f``: the most accurate threshold whose average FLOPs per sample on ``data`` is at most ``f``.

It runs the model once over ``data``, through the one sweep of :func:`~pycoe.twostage.evaluate.threshold_sweep`
(the first stage once, every sample once through its second stage, then every candidate threshold only re-decides
which prediction counts). The candidates are a fixed grid (:data:`DEFAULT_THRESHOLDS`), not every observed
confidence: the sweep reports aggregates only, so the observed confidences are not known before the pass. The grid
is fine where confidences crowd (steps of 0.005 on [0, 1], then ``1 - 10^(-e)`` for ``e`` from 2 to 7 in steps of
0.05). ``None`` (never exit) and ``0.0`` (every sample whose confidence is a number exits: the first stage alone)
are always candidates.

Einstein legend: ``n`` sample of ``data``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pycoe._validation import check_nonnegative_float, check_positive_float
from pycoe.twostage.evaluate import (
    SweepPoint,
    check_flops_table,
    check_thresholds,
    check_two_stage_model,
    resolve_device,
    sweep_points,
)

__all__ = ["ExitCalibration", "calibrate_exit_threshold", "DEFAULT_THRESHOLDS"]


def _default_grid() -> tuple[float, ...]:
    linear = [i / 200 for i in range(201)]
    tail = [1.0 - 10.0 ** (-e / 20) for e in range(40, 141)]  # 1 - 1e-2 ... 1 - 1e-7
    return tuple(sorted(set(linear + tail)))


#: The default candidate thresholds of :func:`calibrate_exit_threshold` (301 values in [0, 1]).
DEFAULT_THRESHOLDS: tuple[float, ...] = _default_grid()

Unpack = Callable[[Any], tuple[Any, Any]]


@dataclass(frozen=True)
class ExitCalibration:
    """What :func:`calibrate_exit_threshold` returns: the chosen threshold and its numbers on ``data``.

    Attributes:
        threshold: the chosen threshold in [0, 1], or ``None`` (never exit). Set it with
            ``model.exit_threshold = result.threshold``.
        accuracy: accuracy on ``data`` at that threshold.
        exit_rate: fraction of ``data`` that exits at the first stage.
        flops_per_sample: average FLOPs per sample on ``data`` at that threshold.
        no_exit_accuracy: accuracy on ``data`` without exit.
        no_exit_flops_per_sample: average FLOPs per sample without exit.
        first_stage_flops: FLOPs per sample of the first stage alone (the delegator, or BasisNet's lightweight
            model): the cost when every sample exits, the least any threshold can cost.
        num_samples: number of samples in ``data``.
        rule: the budget that chose the threshold, e.g. ``"max_accuracy_drop=0.003"``.
        curve: one dict per candidate threshold, ascending, ``None`` (no exit) last, with keys
            ``threshold``, ``accuracy``, ``exit_rate``, ``flops_per_sample`` and ``num_samples`` (and, for a CoE,
            ``expert_load``: routed samples per expert), as :func:`~pycoe.twostage.evaluate.threshold_sweep` returns.
    """

    threshold: float | None
    accuracy: float
    exit_rate: float
    flops_per_sample: float
    no_exit_accuracy: float
    no_exit_flops_per_sample: float
    first_stage_flops: float
    num_samples: int
    rule: str
    curve: list[dict[str, Any]] = field(repr=False)

    @property
    def accuracy_drop(self) -> float:
        """``no_exit_accuracy - accuracy`` (negative when exiting helps)."""
        return self.no_exit_accuracy - self.accuracy

    @property
    def flops_saving(self) -> float:
        """Fraction of the no-exit FLOPs saved: ``1 - flops_per_sample / no_exit_flops_per_sample``."""
        return 1.0 - self.flops_per_sample / self.no_exit_flops_per_sample if self.no_exit_flops_per_sample else 0.0


def calibrate_exit_threshold(
    model: nn.Module,
    data: Iterable,
    *,
    max_accuracy_drop: float | None = None,
    max_flops: float | None = None,
    thresholds: Sequence[float] | None = None,
    unpack: Unpack | None = None,
    device: torch.device | str | None = None,
    flops: Mapping[str, Any] | None = None,
) -> ExitCalibration:
    """Choose the early-exit threshold on held-out ``data`` for an accuracy or a FLOPs budget (one pass).

    Give exactly one budget:

    - ``max_accuracy_drop=d``: among the candidates whose accuracy on ``data`` is at least the no-exit accuracy
      minus ``d``, the one with the lowest average FLOPs per sample (``d=0``: never lose a correct answer on
      ``data``, in total);
    - ``max_flops=f``: among the candidates whose average FLOPs per sample on ``data`` is at most ``f``, the most
      accurate one.

    Ties go to the candidate with fewer FLOPs, then to the larger threshold (``None``, never exit, counting as the
    largest): thresholds between the same two observed confidences give the same numbers on ``data``, and the
    larger one lets fewer unseen samples exit. The model's own ``exit_threshold`` is not changed.

    Args:
        model: a :class:`~pycoe.coe.model.CoE` whose delegator has a rough head and whose experts return class
            logits ``[B, C]``, a :class:`~pycoe.basisnet.model.BasisNet` with a rough head, or another
            :class:`~pycoe.twostage.model.TwoStageModel`. Run in eval mode under ``torch.no_grad()``; every
            submodule's mode is restored.
        data: held-out batches, e.g. a ``DataLoader`` yielding ``(inputs, targets)`` with ``targets``
            ``LongTensor[B]`` class indices in ``[0, C)``, or mappings of keyword inputs with ``labels`` (see
            :mod:`pycoe.twostage.evaluate`); iterated once.
        max_accuracy_drop: ``d`` in [0, 1], a fraction of the samples (``0.003`` = 0.3 points; a value above 1,
            which would allow any drop, is refused as a likely unit mistake).
        max_flops: ``f > 0``, average FLOPs per sample (as counted by :func:`pycoe.flops.count_flops`: a
            multiply-add is 2 FLOPs); at least the first stage's own cost.
        thresholds: the candidate thresholds in [0, 1] (default :data:`DEFAULT_THRESHOLDS`); ``0.0`` and
            ``None`` (never exit) are always added.
        unpack: ``batch -> (inputs, targets)``, ``inputs`` a tuple (positional) or a mapping (keyword inputs);
            default: the target is the last element of a tuple/list batch, or the ``labels`` of a mapping.
        device: where to run (default: the device of the model's parameters).
        flops: per-sample FLOPs instead of counting them on the first sample: ``{"delegator": float, "experts":
            [float] * K}`` for a CoE, ``{"lightweight": float, "specialist": float}`` for a BasisNet.

    Returns:
        :class:`ExitCalibration`.

    Raises:
        ValueError: both or neither budget; a ``max_accuracy_drop`` that is negative, non-finite or above 1; a
            non-positive ``max_flops`` or one below the first stage's cost; a model without a rough head; ``data``
            without any sample; targets that are not integer class indices, have another length than the batch, or
            lie outside ``[0, C)``; a bad ``thresholds`` or ``flops``.
        TypeError: ``model`` is not a two-stage model; ``data`` is not an iterable of batches.

    Example:
        >>> result = calibrate_exit_threshold(model, val_loader, max_accuracy_drop=0.003)  # doctest: +SKIP
        >>> model.exit_threshold = result.threshold  # doctest: +SKIP
    """
    drop, budget, rule = _check_budget(max_accuracy_drop, max_flops)
    net = check_two_stage_model(model)
    if not net.has_rough_head:
        raise ValueError(
            f"calibrate_exit_threshold needs a rough prediction, but {net.first_stage_name} has no rough head "
            "(num_classes=None); build it with num_classes=C"
        )
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of (inputs, targets) batches, e.g. a DataLoader, got {type(data).__name__}"
        )
    candidates = _candidates(thresholds)
    table = None if flops is None else check_flops_table(net, flops, allow_false=False)
    if table is not None and budget is not None:
        _check_reachable(net, budget, table[0])
    device = resolve_device(net, device, unpack)
    points, table = sweep_points(net, data, candidates, table, True, unpack, device, name="data")
    assert table is not None  # counted when not given
    if budget is not None:
        _check_reachable(net, budget, table[0])
    chosen = _choose(points, drop, budget)
    no_exit = points[-1]
    curve = [p.as_dict(net.path_name) for p in points]
    n = no_exit.num_samples
    assert chosen.flops_per_sample is not None and no_exit.flops_per_sample is not None
    return ExitCalibration(
        threshold=chosen.threshold,
        accuracy=chosen.correct / n,
        exit_rate=chosen.exited / n,
        flops_per_sample=chosen.flops_per_sample,
        no_exit_accuracy=no_exit.correct / n,
        no_exit_flops_per_sample=no_exit.flops_per_sample,
        first_stage_flops=table[0],
        num_samples=n,
        rule=rule,
        curve=curve,
    )


# ------------------------------------------------------------------------------------------------ arguments
def _check_budget(max_accuracy_drop: Any, max_flops: Any) -> tuple[float | None, float | None, str]:
    """``(drop, budget, rule)``: exactly one budget, checked (a drop is a fraction in [0, 1])."""
    if (max_accuracy_drop is None) == (max_flops is None):
        raise ValueError(
            "give exactly one budget: max_accuracy_drop=<fraction, e.g. 0.003> or max_flops=<FLOPs per sample>, "
            f"got max_accuracy_drop={max_accuracy_drop!r} and max_flops={max_flops!r}"
        )
    if max_flops is not None:
        budget = check_positive_float("max_flops", max_flops)
        return None, budget, f"max_flops={budget:g}"
    drop = check_nonnegative_float("max_accuracy_drop", max_accuracy_drop)
    if drop > 1:
        raise ValueError(
            f"max_accuracy_drop is a fraction of the samples in [0, 1] (0.003 = 0.3 points), got {drop:g}: a drop "
            f"above 1 allows any loss and would exit every sample; for {drop:g} points pass {drop / 100:g}"
        )
    return drop, None, f"max_accuracy_drop={drop:g}"


def _candidates(thresholds: Sequence[float] | None) -> list[float | None]:
    """The sorted distinct candidates with ``0.0``, then ``None`` (never exit) last."""
    values = list(DEFAULT_THRESHOLDS) if thresholds is None else check_thresholds(thresholds)
    return [*sorted({t for t in values if t is not None} | {0.0}), None]


def _check_reachable(model: Any, budget: float, first_stage_flops: float) -> None:
    if budget < first_stage_flops:
        raise ValueError(
            f"max_flops={budget:g} is below {model.first_stage_name}'s own cost of {first_stage_flops:g} FLOPs per "
            "sample, which every sample pays (even when it exits): no threshold meets it"
        )


# ------------------------------------------------------------------------------------------------ the choice
def _choose(points: list[SweepPoint], drop: float | None, budget: float | None) -> SweepPoint:
    """The budget rule on the sweep's exact counts; ties: fewer FLOPs, then the larger threshold (``None`` largest)."""
    no_exit = points[-1]

    def larger(p: SweepPoint) -> float:
        return math.inf if p.threshold is None else p.threshold

    def flops(p: SweepPoint) -> float:
        assert p.flops_per_sample is not None
        return p.flops_per_sample

    if drop is not None:
        floor = no_exit.correct - drop * no_exit.num_samples - 1e-9
        allowed = [p for p in points if p.correct >= floor]  # never empty: no exit qualifies
        return min(allowed, key=lambda p: (flops(p), -p.correct, -larger(p)))
    assert budget is not None
    allowed = [p for p in points if flops(p) <= budget * (1 + 1e-12)]
    if not allowed:  # threshold 0 qualifies unless some confidences are NaN (such samples never exit)
        cheapest = min(flops(p) for p in points)
        raise ValueError(
            f"max_flops={budget:g} is below the cheapest candidate's {cheapest:g} FLOPs per sample: samples whose "
            "rough confidence is NaN never exit, so even threshold 0 sends them to the second stage"
        )
    return max(allowed, key=lambda p: (p.correct, -flops(p), larger(p)))
