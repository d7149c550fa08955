"""Evaluation of a two-stage model over a loader: batched prediction and the early-exit accuracy-FLOPs curve.

Collaboration of Experts (CoE; Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815) reports accuracy against
*average* inference FLOPs, and BasisNet (arXiv:2105.03014) its average cost with early termination.
:func:`threshold_sweep` measures that trade-off on data for any :class:`~pycoe.twostage.model.TwoStageModel` under
**pycoe's formulation** of the exit rule (:mod:`pycoe.twostage.rule`): average FLOPs per sample = first-stage FLOPs
+ the FLOPs of the second-stage path (a CoE's expert) each non-exited sample actually took, averaged over all
samples (counted by :func:`pycoe.flops.count_flops`).

**Batches.** A loader item is a tensor (the only input, no target), a tuple ``(x, y)`` / ``(x1, ..., xm, y)``
(positional inputs, the target last; a single mapping before the target, ``(inputs_dict, y)``, holds keyword
inputs), or a mapping such as a dict or a tokenizer's ``BatchEncoding`` (keyword inputs, the target under
``labels``, Hugging Face style: the model is called ``model(**inputs)``). A custom ``unpack`` returns
``(inputs, target)`` with ``inputs`` a tuple (positional) or a mapping (keyword inputs).

Einstein legend: ``n`` sample of the whole loader, ``b`` sample of a batch, ``p`` second-stage path, ``c`` class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from pycoe._inputs import as_call, batch_size, batched_names, map_batched, split_labels
from pycoe._modules import module_device
from pycoe._validation import check_callable, check_device, check_nonnegative_float, check_probability
from pycoe.twostage.model import FirstStage, TwoStageModel
from pycoe.twostage.rule import exit_mask, resolve_exit_threshold, rough_confidence
from pycoe.utils import eval_mode

__all__ = ["predict", "threshold_sweep"]

Unpack = Callable[[Any], tuple[Any, Any]]
Call = tuple[tuple[Any, ...], dict[str, Any]]


# ------------------------------------------------------------------------------------------------ arguments
def check_two_stage_model(model: Any) -> Any:
    """``model`` if it is a two-stage ``nn.Module`` (a CoE, a BasisNet, ...), else a ``TypeError``."""
    if not isinstance(model, TwoStageModel) or not isinstance(model, nn.Module):
        raise TypeError(
            "model must be a pycoe CoE or BasisNet (an nn.Module implementing pycoe.twostage.TwoStageModel), got "
            f"{type(model).__name__}"
        )
    return model


def resolve_device(model: nn.Module, device: Any, unpack: Any) -> torch.device:
    """The device to run on (checked; default: the model's), after checking ``unpack``."""
    check_callable("unpack", unpack, allow_none=True, expected="batch -> (inputs, target)")
    resolved = check_device("device", device)
    return (module_device(model) or torch.device("cpu")) if resolved is None else resolved


def as_list(value: Any) -> Any:
    """A 1-D tensor or NumPy array as a list (other values unchanged), so that either may stand for a sequence."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.tolist()
    if type(value).__name__ == "ndarray" and getattr(value, "ndim", None) == 1:
        return value.tolist()
    return value


def check_thresholds(thresholds: Any) -> list[float | None]:
    """The candidate thresholds as a list of floats in [0, 1] and ``None``s (a sequence, array or 1-D tensor)."""
    thresholds = as_list(thresholds)
    if not isinstance(thresholds, Sequence) or isinstance(thresholds, (str, bytes)):
        raise TypeError(
            "thresholds must be a sequence of numbers in [0, 1] (or None), e.g. [0.5, 0.9, None], got "
            f"{type(thresholds).__name__}"
        )
    return [check_probability(f"thresholds[{i}]", t, allow_none=True) for i, t in enumerate(thresholds)]


def check_flops_table(model: TwoStageModel, flops: Any, *, allow_false: bool) -> tuple[float, list[float]]:
    """``(first-stage FLOPs, [FLOPs of each second-stage path])`` from a user's table, every entry a number >= 0.

    The keys are the model's :attr:`~pycoe.twostage.model.TwoStageModel.flops_keys`: ``{"delegator": float,
    "experts": [float] * K}`` for a CoE, ``{"lightweight": float, "specialist": float}`` for a BasisNet.
    """
    first, second = model.flops_keys
    paths, per_path = model.num_paths, model.path_name is not None
    example = f'{{"{first}": float, "{second}": ' + (f"[float] * {paths}}}" if per_path else "float}")
    accepted = "None, False or a mapping" if allow_false else "None (count them) or a mapping"
    if not isinstance(flops, Mapping):
        raise TypeError(f"flops must be {accepted} {example}, got {type(flops).__name__}")
    unknown = sorted(str(key) for key in flops if key not in (first, second))
    if unknown:
        raise ValueError(f"flops has unknown keys {unknown}; expected {example}")
    missing = [key for key in (first, second) if key not in flops]
    if missing:
        raise ValueError(f"flops must be {accepted} {example}, got one without {missing}")
    first_flops = check_nonnegative_float(f"flops[{first!r}]", flops[first])
    if not per_path:
        return first_flops, [check_nonnegative_float(f"flops[{second!r}]", flops[second])]
    entries = as_list(flops[second])
    want = f"flops[{second!r}] must be a sequence of {paths} numbers (one entry per {model.path_name})"
    if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)):
        raise TypeError(f"{want}, got {type(entries).__name__}")
    if len(entries) != paths:
        raise ValueError(f"{want}, got {len(entries)}")
    return first_flops, [check_nonnegative_float(f"flops[{second!r}][{p}]", f) for p, f in enumerate(entries)]


# ------------------------------------------------------------------------------------------------ batches
def _default_unpack(item: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a loader item (see the module docstring); ``target`` is ``None`` when absent."""
    if isinstance(item, Mapping):
        return split_labels(item)
    if isinstance(item, torch.Tensor):
        return (item,), None
    if isinstance(item, (tuple, list)) and item:
        positional, target = (tuple(item[:-1]), item[-1]) if len(item) >= 2 else ((item[0],), None)
        if len(positional) == 1 and isinstance(positional[0], Mapping):
            return positional[0], target
        return positional, target
    raise TypeError(
        "each batch must be a tensor, a tuple (x, y) / (x1, ..., xm, y) with the target last, or a mapping of keyword "
        "inputs with the target under 'labels' (a dict, a tokenizer's BatchEncoding); got "
        f"{type(item).__name__}. Pass unpack=lambda batch: (inputs, target) for other layouts"
    )


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def iterate_batches(loader: Any, unpack: Unpack | None, device: torch.device, name: str) -> Iterator[tuple[Any, ...]]:
    """``(index, args, kwargs, target, B)`` for every loader item, on ``device``, the inputs checked."""
    if not isinstance(loader, Iterable) or isinstance(loader, (str, bytes, torch.Tensor)):
        raise TypeError(
            f"{name} must be an iterable of batches (e.g. a DataLoader or a list of (x, y) pairs), got "
            f"{type(loader).__name__}"
        )
    for i, item in enumerate(loader):
        result = _default_unpack(item) if unpack is None else unpack(item)
        if (
            not isinstance(result, (tuple, list))
            or len(result) != 2
            or not isinstance(result[0], (tuple, list, Mapping))
        ):
            raise TypeError(
                "unpack must return (inputs tuple, target) or (inputs mapping, target), e.g. lambda batch: "
                f"((batch[0],), batch[1]); got {type(result).__name__} for batch {i}"
            )
        args, kwargs = as_call(result[0], f"the inputs of batch {i}")
        args, kwargs = tuple(_to(v, device) for v in args), {k: _to(v, device) for k, v in kwargs.items()}
        yield i, args, kwargs, _to(result[1], device), batch_size(args, kwargs, f"batch {i}")


def predict(
    model: nn.Module,
    loader: Iterable,
    exit_threshold: float | str | None = "default",
    unpack: Unpack | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """Run a two-stage model in eval mode (early exit + second stage) over a loader and concatenate the results.

    Args:
        model: a :class:`~pycoe.coe.model.CoE`, a :class:`~pycoe.basisnet.model.BasisNet` or another
            :class:`~pycoe.twostage.model.TwoStageModel`; put in eval mode for the call (every submodule's mode is
            restored afterwards), no gradient. Called ``model.forward_eval(*args, exit_threshold=..., **kwargs)``.
        loader: an iterable of batches (e.g. a ``DataLoader``): tensors, tuples with the target last, or mappings
            of keyword inputs (see the module docstring); targets are ignored here.
        exit_threshold: threshold in [0, 1], ``None`` (no exit), or ``"default"`` (the model's).
        unpack: ``batch -> (inputs, target)`` for other layouts, ``inputs`` a tuple (positional) or a mapping
            (keyword inputs).
        device: where to run (default: the device of the model's parameters).

    Returns:
        The model's eval output over all N samples, on CPU (every field concatenated): for a CoE a
        :class:`~pycoe.coe.model.CoEOutput` (output Tensor[N, ...], expert_index, exited, confidence), for a BasisNet a
        :class:`~pycoe.basisnet.model.BasisNetOutput`.
    """
    net = check_two_stage_model(model)
    device = resolve_device(net, device, unpack)
    resolve_exit_threshold(exit_threshold, None)  # checked before any batch runs
    parts: list[Any] = []
    with eval_mode(net):
        for _, args, kwargs, _, _ in iterate_batches(loader, unpack, device, "loader"):
            parts.append(net.forward_eval(*args, exit_threshold=exit_threshold, **kwargs))
    if not parts:
        raise ValueError("loader produced no batch")
    fields = [f.name for f in dataclasses.fields(parts[0])]
    return type(parts[0])(**{f: torch.cat([getattr(p, f).cpu() for p in parts]) for f in fields})


# ------------------------------------------------------------------------------------------------ the sweep
class _Record(NamedTuple):
    """Per sample of the whole loader: rough confidence, path, and whether each stage's prediction is correct."""

    confidence: torch.Tensor  # Tensor[N]
    path: torch.Tensor  # LongTensor[N]
    rough_ok: torch.Tensor  # BoolTensor[N]
    second_ok: torch.Tensor  # BoolTensor[N]
    table: tuple[float, list[float]] | None  # counted FLOPs, when asked for


class SweepPoint(NamedTuple):
    """One threshold's numbers as counts (exact), before they become the dict :func:`threshold_sweep` returns."""

    threshold: float | None
    correct: int
    exited: int
    flops_per_sample: float | None
    load: list[int]
    num_samples: int

    def as_dict(self, path_name: str | None) -> dict[str, Any]:
        n = self.num_samples
        point: dict[str, Any] = {
            "threshold": self.threshold,
            "accuracy": self.correct / n,
            "exit_rate": self.exited / n,
            "flops_per_sample": self.flops_per_sample,
        }
        if path_name is not None:
            point[f"{path_name}_load"] = self.load
        point["num_samples"] = n
        return point


def _check_targets(i: int, target: Any, batch: int) -> torch.Tensor:
    """The class-index targets of batch ``i`` (``LongTensor[B]``), or a ``ValueError`` naming the batch."""
    if target is None:
        raise ValueError(
            f"batch {i} has no targets: every batch needs class-index targets LongTensor[B] ((inputs, targets) "
            "batches, a mapping with 'labels', or pass unpack=...)"
        )
    if (
        not isinstance(target, torch.Tensor)
        or target.dim() != 1
        or target.is_floating_point()
        or target.is_complex()
        or target.dtype == torch.bool
    ):
        what = f"{target.dtype} tensor of shape {tuple(target.shape)}" if isinstance(target, torch.Tensor) else None
        raise ValueError(
            f"the targets of batch {i} must be class indices LongTensor[B={batch}] (class-index targets), got "
            f"{what or type(target).__name__}"
        )
    if target.shape[0] != batch:
        raise ValueError(
            f"the targets of batch {i} have {target.shape[0]} entries, but its inputs hold B={batch}: one class index "
            f"per sample, shape [B={batch}], got shape {tuple(target.shape)}"
        )
    return target


def _check_second_stage_output(
    model: TwoStageModel, i: int, output: Any, rough: torch.Tensor | None, target: torch.Tensor, exits: bool
) -> None:
    """The second stage gives class logits ``[B, C]`` of the rough head's C, and the targets lie in ``[0, C)``."""
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        noun = model.second_stage_name.removeprefix("the ")
        raise ValueError(f"threshold_sweep needs {noun} returning class logits [B, C], got {shape}")
    num_classes = output.shape[1]
    if exits and rough is not None and rough.shape[1] != num_classes:
        raise ValueError(
            f"early exit mixes the rough head's predictions ({rough.shape[1]} classes) with those of "
            f"{model.second_stage_name} ({num_classes} classes); they must predict the same classes"
        )
    if target.numel():
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"targets must be class indices in [0, {num_classes}) (the {num_classes} classes of the logits of "
                f"{model.second_stage_name}), got {low if low < 0 else high} in the targets of batch {i}"
            )


def _one_sample(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> Call:
    return map_batched(args, kwargs, lambda t: t[:1], batched_names(args, kwargs, batch))


def _run_sweep(model: Any, batches: Iterable[tuple[Any, ...]], exits: bool, count: bool, name: str) -> _Record:
    """One pass: per batch the first stage once and the second stage once on every sample (no exit)."""
    confidences, paths, rough_ok, second_ok = [], [], [], []
    table = None
    with eval_mode(model):
        for i, args, kwargs, target, batch in batches:
            target = _check_targets(i, target, batch)
            if batch == 0:
                continue
            first: FirstStage = model.run_first_stage(args, kwargs)
            rough = first.rough_logits
            if rough is None and exits:
                raise ValueError(
                    f"thresholds other than None need a rough prediction, but {model.first_stage_name} has no rough "
                    "head (num_classes)"
                )
            output = model.run_second_stage(first, args, kwargs, None)
            _check_second_stage_output(model, i, output, rough, target, exits)
            if count and table is None:
                table = model.count_stage_flops(*_one_sample(args, kwargs, batch))
            path = first.path if first.path is not None else torch.zeros(batch, dtype=torch.long)
            correct = (output.argmax(dim=1) == target).cpu()
            if rough is None:  # a NaN confidence never exits
                confidences.append(torch.full((batch,), float("nan")))
                rough_ok.append(torch.zeros_like(correct))
            else:
                confidences.append(rough_confidence(rough).cpu())
                rough_ok.append((rough.argmax(dim=1) == target).cpu())
            second_ok.append(correct)
            paths.append(path.cpu())
    if not paths:
        raise ValueError(f"{name} produced no sample (no batch, or only empty ones): there is nothing to measure")
    cat = torch.cat
    return _Record(cat(confidences), cat(paths), cat(rough_ok), cat(second_ok), table)


def sweep_points(
    model: Any,
    loader: Any,
    thresholds: list[float | None],
    table: tuple[float, list[float]] | None,
    count: bool,
    unpack: Unpack | None,
    device: torch.device,
    name: str = "loader",
) -> tuple[list[SweepPoint], tuple[float, list[float]] | None]:
    """The sweep's numbers per threshold (as counts), after one pass; the FLOPs table used (given or counted)."""
    exits = any(t is not None for t in thresholds)
    if exits and not model.has_rough_head:
        raise ValueError(
            f"thresholds other than None need a rough prediction, but {model.first_stage_name} has no rough head "
            "(num_classes=None)"
        )
    record = _run_sweep(model, iterate_batches(loader, unpack, device, name), exits, count and table is None, name)
    table = table if table is not None else record.table
    n = record.path.numel()
    points = []
    for t in thresholds:
        exited = exit_mask(record.confidence, t)
        correct = int(torch.where(exited, record.rough_ok, record.second_ok).sum())
        n_exited = int(exited.sum())
        if model.num_paths == 1:
            load = [n - n_exited]
        else:
            load = torch.bincount(record.path[~exited], minlength=model.num_paths).tolist()
        flops = None if table is None else table[0] + sum(k * f for k, f in zip(load, table[1])) / n
        points.append(SweepPoint(t, correct, n_exited, flops, load, n))
    return points, table


def threshold_sweep(
    model: nn.Module,
    loader: Iterable,
    thresholds: Sequence[float | None],
    flops: Mapping[str, Any] | bool | None = None,
    unpack: Unpack | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Accuracy, exit rate and average FLOPs per sample for several early-exit thresholds (classification).

    One pass over the data: per batch, the first stage runs once and every sample goes once through its second
    stage (a CoE's argmax expert, routed and batched by expert; a BasisNet's specialist); each threshold then only
    decides, per sample, whether the rough prediction or the second stage's counts. So the sweep costs one no-exit
    evaluation, whatever the number of thresholds, and each threshold's numbers equal those of
    :func:`predict` with that threshold.

    FLOPs per sample at threshold :math:`t`:
    :math:`F_\\text{first} + \\frac1N \\sum_{n:\\,c_n < t} F_{\\text{second}, p_n}`, with :math:`c_n` the rough
    confidence and :math:`p_n` the second-stage path of sample n (a CoE's chosen expert: heterogeneous experts have
    different :math:`F_{\\text{second}, k}`). A sample whose confidence is NaN never exits. By default every
    :math:`F` is counted with :func:`pycoe.flops.count_flops` on the first sample of the first non-empty batch (for
    inputs whose cost depends on their length, such as sequences, this is an approximation: pass your own table).

    Args:
        model: a :class:`~pycoe.coe.model.CoE`, a :class:`~pycoe.basisnet.model.BasisNet` or another
            :class:`~pycoe.twostage.model.TwoStageModel` whose first stage has a rough head (thresholds other than
            ``None``) and whose second stage returns class logits ``[B, C]``.
        loader: iterable of batches ``(x, y)``, ``(x1, ..., xm, y)`` or mappings of keyword inputs with ``labels``
            (see the module docstring), ``y`` LongTensor[B] of class indices in ``[0, C)``. Batches of 0 samples are
            skipped; a loader without any sample raises.
        thresholds: thresholds in [0, 1]; ``None`` means no exit.
        flops: ``None`` (count them), ``False`` (skip: ``flops_per_sample`` is ``None``), or a mapping of per-sample
            FLOPs, finite numbers >= 0: ``{"delegator": float, "experts": [float] * K}`` for a CoE,
            ``{"lightweight": float, "specialist": float}`` for a BasisNet.
        unpack: ``batch -> (inputs, target)``, ``inputs`` a tuple (positional) or a mapping (keyword inputs).
        device: where to run (default: the model's device).

    Returns:
        One dict per threshold, in the given order: ``threshold``, ``accuracy``, ``exit_rate`` (exact fractions of
        the N samples), ``flops_per_sample`` (float or ``None``), for a CoE ``expert_load`` (list of K counts of routed
        samples), and ``num_samples``.
    """
    net = check_two_stage_model(model)
    checked = check_thresholds(thresholds)
    if not checked:
        raise ValueError("thresholds must not be empty")
    table = None if flops is None or flops is False else check_flops_table(net, flops, allow_false=True)
    device = resolve_device(net, device, unpack)
    points, _ = sweep_points(net, loader, checked, table, flops is None, unpack, device)
    return [p.as_dict(net.path_name) for p in points]
