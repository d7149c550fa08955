"""Pick the early-exit threshold on held-out data, for an accuracy or a FLOPs budget.

A :class:`~pycoe.coe.model.CoE` (and a :class:`~pycoe.basisnet.model.BasisNet`) lets a sample exit on the first
stage's rough prediction when its maximum softmax probability reaches ``exit_threshold`` (**pycoe's formulation**
of the exit rule; see :mod:`pycoe.coe.model`). Which threshold to deploy is a choice, and a choice made on the
test set makes the test numbers optimistic. :func:`calibrate_exit_threshold` makes it on data held out from
training (a validation split) under one of two budgets:

- ``max_accuracy_drop=d``: the threshold with the lowest average FLOPs per sample whose accuracy on ``data`` is at
  least the accuracy without exit minus ``d``;
- ``max_flops=f``: the most accurate threshold whose average FLOPs per sample on ``data`` is at most ``f``.

It runs the model once over ``data``: for a CoE through :func:`pycoe.coe.evaluate.threshold_sweep` (the
delegator once, every sample once through its argmax expert, then every candidate threshold only re-decides which
prediction counts); for a BasisNet through the same single pass written here with its public pieces
(``threshold_sweep`` accepts only a CoE). The candidates are a fixed grid (:data:`DEFAULT_THRESHOLDS`), not every
observed confidence: the sweep reports aggregates only, so the observed confidences are not known before the
pass. The grid is fine where confidences crowd (steps of 0.005 on [0, 1], then ``1 - 10^(-e)`` for ``e`` from 2
to 7 in steps of 0.05). ``None`` (never exit) and ``0.0`` (every sample exits: the first stage alone) are always
candidates.

BasisNet is imported lazily inside :func:`calibrate_exit_threshold`: ``pycoe.basisnet`` builds on ``pycoe.coe``,
so a module-level import here would make the two packages import each other.

Einstein legend: ``n`` sample of ``data``, ``b`` sample of a batch, ``c`` class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .._validation import check_nonnegative_float, check_positive_float, check_probability
from ..flops import count_flops
from ..utils import eval_mode
from .early_exit import exit_mask
from .evaluate import default_unpack, threshold_sweep
from .model import CoE

if TYPE_CHECKING:
    from pycoe.basisnet.model import BasisNet

__all__ = ["ExitCalibration", "calibrate_exit_threshold", "DEFAULT_THRESHOLDS"]


def _default_grid() -> tuple[float, ...]:
    linear = [i / 200 for i in range(201)]
    tail = [1.0 - 10.0 ** (-e / 20) for e in range(40, 141)]  # 1 - 1e-2 ... 1 - 1e-7
    return tuple(sorted(set(linear + tail)))


#: The default candidate thresholds of :func:`calibrate_exit_threshold` (301 values in [0, 1]).
DEFAULT_THRESHOLDS: tuple[float, ...] = _default_grid()

Unpack = Callable[[Any], tuple[tuple, Any]]


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
            ``expert_load``: routed samples per expert), as :func:`~pycoe.coe.evaluate.threshold_sweep` returns.
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
            logits ``[B, C]``, or a :class:`~pycoe.basisnet.model.BasisNet` with a rough head. Run in eval mode
            under ``torch.no_grad()``; every submodule's mode is restored.
        data: held-out batches, e.g. a ``DataLoader`` yielding ``(inputs, targets)`` with ``targets``
            ``LongTensor[B]`` class indices in ``[0, C)``; iterated once.
        max_accuracy_drop: ``d >= 0``, a fraction (``0.003`` = 0.3 points).
        max_flops: ``f > 0``, average FLOPs per sample (as counted by :func:`pycoe.flops.count_flops`: a
            multiply-add is 2 FLOPs); at least the first stage's own cost.
        thresholds: the candidate thresholds in [0, 1] (default :data:`DEFAULT_THRESHOLDS`); ``0.0`` and
            ``None`` (never exit) are always added.
        unpack: ``batch -> (inputs tuple, targets)``; default: the target is the last element of a tuple/list
            batch (see :func:`~pycoe.coe.evaluate.default_unpack`). A BasisNet takes one input.
        device: where to run (default: the device of the model's parameters).
        flops: per-sample FLOPs instead of counting them on the first sample: ``{"delegator": float, "experts":
            [float] * K}`` for a CoE, ``{"lightweight": float, "specialist": float}`` for a BasisNet.

    Returns:
        :class:`ExitCalibration`.

    Raises:
        ValueError: both or neither budget; a negative or non-finite ``max_accuracy_drop``; a non-positive
            ``max_flops`` or one below the first stage's cost; a model without a rough head; ``data`` without any
            sample; targets that are not integer class indices, have another length than the batch, or lie
            outside ``[0, C)``; a bad ``thresholds`` or ``flops``.
        TypeError: ``model`` is neither a CoE nor a BasisNet; ``data`` is not an iterable of batches.

    Example:
        >>> result = calibrate_exit_threshold(model, val_loader, max_accuracy_drop=0.003)  # doctest: +SKIP
        >>> model.exit_threshold = result.threshold  # doctest: +SKIP
    """
    from pycoe.basisnet.model import BasisNet  # lazy: see the module docstring

    if (max_accuracy_drop is None) == (max_flops is None):
        raise ValueError(
            "give exactly one budget: max_accuracy_drop=<fraction, e.g. 0.003> or max_flops=<FLOPs per sample>, "
            f"got max_accuracy_drop={max_accuracy_drop!r} and max_flops={max_flops!r}"
        )
    if max_accuracy_drop is not None:
        drop = check_nonnegative_float("max_accuracy_drop", max_accuracy_drop)
        rule = f"max_accuracy_drop={drop:g}"
    else:
        budget = check_positive_float("max_flops", max_flops)
        rule = f"max_flops={budget:g}"
    if isinstance(model, CoE):
        is_coe = True
        num_classes = getattr(model.delegator, "num_classes", None)
        if hasattr(model.delegator, "num_classes") and num_classes is None:
            raise ValueError(
                "calibrate_exit_threshold needs a rough prediction, but the CoE's delegator has no rough head "
                "(num_classes=None); build the Delegator with num_classes=C"
            )
    elif isinstance(model, BasisNet):
        is_coe = False
        num_classes = model.num_classes
        if num_classes is None:
            raise ValueError(
                "calibrate_exit_threshold needs a rough prediction, but the BasisNet's lightweight model has no "
                "rough head (num_classes=None)"
            )
    else:
        raise TypeError(f"model must be a pycoe CoE or BasisNet, got {type(model).__name__}")
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of (inputs, targets) batches, e.g. a DataLoader, got {type(data).__name__}"
        )
    candidates = _candidates(thresholds)
    table = _check_flops(flops, model, is_coe)
    if table is not None and max_flops is not None and budget < table[0]:
        raise ValueError(_budget_message(budget, table[0], is_coe))
    device = _device_of(model) if device is None else torch.device(device)

    counter = [0]
    batches = _checked_batches(data, unpack, num_classes, counter)
    if isinstance(model, CoE):
        flops_arg = None if table is None else {"delegator": table[0], "experts": table[1]}
        curve = threshold_sweep(model, batches, candidates, flops=flops_arg, device=device)
    else:
        curve = _basisnet_sweep(model, batches, candidates, table, device)
    n = counter[0]
    for p in curve:  # the sweep's rates are counts / n in float32: restore the exact fractions
        p["accuracy"] = round(p["accuracy"] * n) / n
        p["exit_rate"] = round(p["exit_rate"] * n) / n

    first = next(p for p in curve if p["threshold"] == 0.0)["flops_per_sample"]
    no_exit = next(p for p in curve if p["threshold"] is None)

    def correct(p: dict[str, Any]) -> int:
        return round(p["accuracy"] * n)

    def threshold_key(p: dict[str, Any]) -> float:
        return math.inf if p["threshold"] is None else p["threshold"]

    if max_accuracy_drop is not None:
        floor = correct(no_exit) - drop * n - 1e-9
        allowed = [p for p in curve if correct(p) >= floor]  # never empty: no exit qualifies
        chosen = min(allowed, key=lambda p: (p["flops_per_sample"], -correct(p), -threshold_key(p)))
    else:
        if budget < first:
            raise ValueError(_budget_message(budget, first, is_coe))
        allowed = [p for p in curve if p["flops_per_sample"] <= budget * (1 + 1e-12)]  # threshold 0 qualifies
        chosen = max(allowed, key=lambda p: (correct(p), -p["flops_per_sample"], threshold_key(p)))
    return ExitCalibration(
        threshold=chosen["threshold"],
        accuracy=chosen["accuracy"],
        exit_rate=chosen["exit_rate"],
        flops_per_sample=chosen["flops_per_sample"],
        no_exit_accuracy=no_exit["accuracy"],
        no_exit_flops_per_sample=no_exit["flops_per_sample"],
        first_stage_flops=first,
        num_samples=n,
        rule=rule,
        curve=curve,
    )


# ------------------------------------------------------------------------------------------------ arguments
def _candidates(thresholds: Sequence[float] | None) -> list[float | None]:
    if thresholds is None:
        values: list[float] = list(DEFAULT_THRESHOLDS)
    else:
        if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
            raise TypeError(
                f"thresholds must be a sequence of numbers in [0, 1] (or None for the default grid), got "
                f"{type(thresholds).__name__}"
            )
        values = []
        for i, t in enumerate(thresholds):
            if t is None:
                continue  # never exit is always a candidate
            value = check_probability(f"thresholds[{i}]", t)
            assert value is not None
            values.append(value)
    out: list[float | None] = [*sorted(set(values) | {0.0}), None]
    return out


def _check_flops(flops: Mapping[str, Any] | None, model: nn.Module, is_coe: bool) -> tuple[float, list[float]] | None:
    """``(first stage, [second stage per expert])`` from a user's FLOPs table, checked; ``None`` to count them."""
    if flops is None:
        return None
    keys = ("delegator", "experts") if is_coe else ("lightweight", "specialist")
    example = (
        '{"delegator": float, "experts": [float] * K}' if is_coe else '{"lightweight": float, "specialist": float}'
    )
    if not isinstance(flops, Mapping) or set(flops) != set(keys):
        raise ValueError(f"flops must be None (count them) or a mapping {example}, got {flops!r}")
    first = _flops_value(f"flops[{keys[0]!r}]", flops[keys[0]])
    if is_coe:
        experts = flops["experts"]
        k = model.num_experts
        if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence) or len(experts) != k:
            raise ValueError(f"flops['experts'] must be a sequence of {k} numbers (one per expert), got {experts!r}")
        second = [_flops_value(f"flops['experts'][{i}]", f) for i, f in enumerate(experts)]
    else:
        second = [_flops_value("flops['specialist']", flops["specialist"])]
    return first, second


def _flops_value(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return check_nonnegative_float(name, value)


def _budget_message(budget: float, first: float, is_coe: bool) -> str:
    stage = "delegator" if is_coe else "lightweight model"
    return (
        f"max_flops={budget:g} is below the {stage}'s own cost of {first:g} FLOPs per sample, which every sample "
        "pays (even when it exits): no threshold meets it"
    )


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ the data
def _checked_batches(
    data: Iterable, unpack: Unpack | None, num_classes: int | None, counter: list[int]
) -> Iterator[tuple[Any, ...]]:
    """Yield every non-empty batch as ``(*inputs, targets)`` after checking its targets; count the samples."""
    unpack = default_unpack if unpack is None else unpack
    for i, batch in enumerate(data):
        unpacked = unpack(batch)
        if not isinstance(unpacked, tuple) or len(unpacked) != 2 or not isinstance(unpacked[0], tuple):
            raise TypeError(f"unpack must return (inputs tuple, targets), got {type(unpacked).__name__} for batch {i}")
        inputs, target = unpacked
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
            raise TypeError(f"the first input of batch {i} must be a batch-first tensor")
        size = int(inputs[0].shape[0])
        if target is None:
            raise ValueError(
                f"batch {i} has no targets: data must yield (inputs, targets) batches (or pass unpack=...)"
            )
        if (
            not isinstance(target, torch.Tensor)
            or target.dim() != 1
            or target.is_floating_point()
            or target.is_complex()
            or target.dtype == torch.bool
        ):
            what = (
                f"{target.dtype} tensor of shape {tuple(target.shape)}"
                if isinstance(target, torch.Tensor)
                else (type(target).__name__)
            )
            raise ValueError(f"the targets of batch {i} must be class indices LongTensor[B], got {what}")
        if target.shape[0] != size:
            raise ValueError(f"the targets of batch {i} have {target.shape[0]} entries, but its inputs hold B={size}")
        if size == 0:
            continue
        if num_classes is not None:
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= num_classes:
                bad = low if low < 0 else high
                raise ValueError(
                    f"the targets of batch {i} must be class indices in [0, {num_classes}) (the rough head's "
                    f"classes), got {bad}"
                )
        counter[0] += size
        yield (*inputs, target)
    if counter[0] == 0:
        raise ValueError("data produced no sample (no batch, or only empty ones): calibration needs held-out data")


# ------------------------------------------------------------------------------------------------ BasisNet
def _basisnet_sweep(
    model: BasisNet,
    batches: Iterable[tuple[Any, ...]],
    thresholds: list[float | None],
    table: tuple[float, list[float]] | None,
    device: torch.device,
) -> list[dict[str, Any]]:
    """:func:`~pycoe.coe.evaluate.threshold_sweep` for a BasisNet: one pass, then every threshold decides.

    Per batch the lightweight model runs once (``forward_eval`` with threshold 0: every sample exits, which gives
    the rough logits, the confidence and the coefficients) and the specialist once on the whole batch with those
    coefficients; every threshold then applies the one exit rule, :func:`pycoe.coe.early_exit.exit_mask`. FLOPs
    per sample at threshold ``t``: lightweight + (fraction not exited) x specialist, both counted on the first
    sample unless ``table`` is given.
    """
    confidences, rough_ok, final_ok = [], [], []
    with eval_mode(model):
        for batch in batches:
            *inputs, target = batch
            if len(inputs) != 1:
                raise ValueError(f"a BasisNet takes one input per batch, but unpack gave {len(inputs)}")
            x, target = inputs[0].to(device), target.to(device)
            first = model.forward_eval(x, exit_threshold=0.0)
            output = model.specialist(x, first.coefficients)
            if output.dim() != 2:
                raise ValueError(
                    f"calibrate_exit_threshold needs a specialist returning class logits [B, C], got "
                    f"{tuple(output.shape)}"
                )
            if table is None:
                x1, c1 = x[:1], first.coefficients[:1]
                preview = cast(nn.Module, model.preview)  # count_flops takes any callable
                table = (float(count_flops(preview, x1)), [float(count_flops(model.specialist, x1, c1))])
            confidences.append(first.confidence.cpu())
            rough_ok.append((first.output.argmax(dim=1) == target).cpu())
            final_ok.append((output.argmax(dim=1) == target).cpu())
    assert table is not None  # _checked_batches raised if there was no sample
    conf, r_ok, s_ok = torch.cat(confidences), torch.cat(rough_ok), torch.cat(final_ok)
    n = conf.numel()
    results = []
    for t in thresholds:
        exited = exit_mask(conf, t)
        correct = torch.where(exited, r_ok, s_ok)
        results.append(
            {
                "threshold": t,
                "accuracy": int(correct.sum()) / n,
                "exit_rate": int(exited.sum()) / n,
                "flops_per_sample": table[0] + float((~exited).sum()) / n * table[1][0],
                "num_samples": n,
            }
        )
    return results
