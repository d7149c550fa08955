"""Evaluation helpers for a CoE: batched prediction and the early-exit accuracy-FLOPs curve.

Collaboration of Experts (CoE; Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815) reports accuracy against
*average* inference FLOPs, and its abstract confirms that the delegator's rough prediction supports early
termination. :func:`threshold_sweep` measures that trade-off on data under **pycoe's formulation** of the exit
rule (max softmax probability of the rough prediction ``>= threshold``): average FLOPs per sample =
delegator FLOPs + the FLOPs of the expert each non-exited sample was actually routed to, averaged over all
samples (FLOPs counted by :func:`pycoe.flops.count_flops`).

Einstein legend: ``n`` sample of the whole loader, ``b`` sample of a batch, ``k`` expert, ``c`` class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .._modules import module_device
from .._validation import check_callable, check_device, check_nonnegative_float, check_probability
from ..flops import count_flops
from ..utils import eval_mode
from .early_exit import exit_mask, resolve_exit_threshold
from .model import CoE, CoEOutput

__all__ = ["predict", "threshold_sweep", "default_unpack"]

Unpack = Callable[[Any], tuple[tuple, Any]]


def default_unpack(batch: Any) -> tuple[tuple, Any]:
    """Split a loader item into ``(inputs tuple, target)``.

    A tensor is one input without target; a tuple or list ``(x, y)`` or ``(x1, ..., xm, y)`` has the target
    last. A dict needs a custom ``unpack``.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return (batch[0],), None
        if len(batch) >= 2:
            return tuple(batch[:-1]), batch[-1]
    raise TypeError(
        "each loader item must be a tensor, or a tuple (x, y) / (x1, ..., xm, y) with the target last; got "
        f"{type(batch).__name__}. Pass unpack=lambda batch: ((inputs...), target) for other layouts"
    )


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _check_model(model: Any) -> CoE:
    if not isinstance(model, CoE):
        raise TypeError(f"model must be a pycoe CoE, got {type(model).__name__}")
    return model


def _batches(loader: Any, unpack: Unpack | None, device: torch.device) -> Iterable[tuple[tuple, Any]]:
    """Iterate over the loader's batches as ``(inputs tuple, target)`` on ``device`` (all arguments checked)."""
    if not isinstance(loader, Iterable) or isinstance(loader, (str, bytes, torch.Tensor)):
        raise TypeError(
            f"loader must be an iterable of batches (e.g. a DataLoader or a list of (x, y) pairs), got "
            f"{type(loader).__name__}"
        )
    unpack = default_unpack if unpack is None else unpack
    for batch in loader:
        result = unpack(batch)
        if not isinstance(result, (tuple, list)) or len(result) != 2 or not isinstance(result[0], (tuple, list)):
            raise TypeError(
                "unpack must return (inputs tuple, target), e.g. lambda batch: ((batch[0],), batch[1]); got "
                f"{type(result).__name__}"
            )
        inputs, target = result
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
            raise TypeError("unpack must return a non-empty inputs tuple whose first item is a batch-first tensor")
        yield tuple(_to(v, device) for v in inputs), _to(target, device)


def _resolve_device(model: CoE, device: Any, unpack: Any) -> torch.device:
    """The device to run on (checked), after checking ``unpack``."""
    check_callable("unpack", unpack, allow_none=True, expected="batch -> (inputs tuple, target)")
    resolved = check_device("device", device)
    return (module_device(model) or torch.device("cpu")) if resolved is None else resolved


def predict(
    model: CoE,
    loader: Iterable,
    exit_threshold: float | str | None = "default",
    unpack: Unpack | None = None,
    device: torch.device | str | None = None,
) -> CoEOutput:
    """Run a CoE in eval mode (early exit + routed experts) over a loader and concatenate the results.

    Args:
        model: the :class:`~pycoe.coe.model.CoE`; put in eval mode for the call (every submodule's mode is
            restored afterwards), no gradient.
        loader: an iterable of batches (e.g. a ``DataLoader``); see ``unpack``.
        exit_threshold: threshold in [0, 1], ``None`` (no exit), or ``"default"`` (the model's).
        unpack: ``batch -> (inputs tuple, target)``; default: a tensor is the only input, a tuple has the target
            last (the target is ignored here).
        device: where to run (default: the device of the model's parameters).

    Returns:
        :class:`~pycoe.coe.model.CoEOutput` over all N samples, on CPU: output Tensor[N, ...],
        expert_index LongTensor[N], exited BoolTensor[N], confidence Tensor[N].
    """
    model = _check_model(model)
    device = _resolve_device(model, device, unpack)
    resolve_exit_threshold(exit_threshold, None)  # checked before any batch runs
    parts: list[CoEOutput] = []
    with eval_mode(model):
        for inputs, _ in _batches(loader, unpack, device):
            out = model.forward_eval(*inputs, exit_threshold=exit_threshold)
            parts.append(CoEOutput(*(t.cpu() for t in (out.output, out.expert_index, out.exited, out.confidence))))
    if not parts:
        raise ValueError("loader produced no batch")
    fields = ("output", "expert_index", "exited", "confidence")
    return CoEOutput(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


def _flops_table(model: CoE, inputs: tuple) -> tuple[float, list[float]]:
    """Per-sample FLOPs of the delegator and of every expert, each counted on the first sample of ``inputs``."""
    batch = inputs[0].shape[0]
    one = tuple(v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v for v in inputs)
    delegator = float(count_flops(model.delegator, one[0]))
    experts = [float(count_flops(e, *one)) for e in model.experts]
    return delegator, experts


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_flops_table(flops: Any, num_experts: int) -> tuple[float, list[float]]:
    """``(delegator FLOPs, [FLOPs of each expert])`` from a user's mapping, every entry a finite number >= 0."""
    if not isinstance(flops, Mapping) or "delegator" not in flops or "experts" not in flops:
        raise TypeError(
            'flops must be None, False or a mapping {"delegator": float, "experts": [float, ...]}, got '
            f"{type(flops).__name__ if not isinstance(flops, Mapping) else sorted(map(str, flops))}"
        )
    unknown = sorted(str(key) for key in flops if key not in ("delegator", "experts"))
    if unknown:
        raise ValueError(f'flops has unknown keys {unknown}; expected {{"delegator": float, "experts": [float, ...]}}')
    experts = _as_list(flops["experts"])
    if not isinstance(experts, Sequence) or isinstance(experts, (str, bytes)):
        raise TypeError(
            f"flops['experts'] must be a sequence of {num_experts} numbers (one per expert), got "
            f"{type(experts).__name__}"
        )
    if len(experts) != num_experts:
        raise ValueError(f"flops['experts'] must have one entry per expert ({num_experts}), got {len(experts)}")

    return check_nonnegative_float("flops['delegator']", flops["delegator"]), [
        check_nonnegative_float(f"flops['experts'][{k}]", f) for k, f in enumerate(experts)
    ]


def _as_list(value: Any) -> Any:
    """A 1-D tensor or NumPy array as a list (other values unchanged), so that either may stand for a sequence."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.tolist()
    if type(value).__name__ == "ndarray" and getattr(value, "ndim", None) == 1:
        return value.tolist()
    return value


def threshold_sweep(
    model: CoE,
    loader: Iterable,
    thresholds: Sequence[float | None],
    flops: Mapping[str, Any] | bool | None = None,
    unpack: Unpack | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Accuracy, exit rate and average FLOPs per sample for several early-exit thresholds (classification).

    One pass over the data: per batch, the delegator runs once and every sample goes once through its argmax
    expert (routed, batched by expert); each threshold then only decides, per sample, whether the rough
    prediction or the expert's prediction counts. So the sweep costs one no-exit evaluation, whatever the number
    of thresholds, and each threshold's numbers equal those of ``predict`` with that threshold.

    FLOPs per sample at threshold :math:`t`:
    :math:`F_\\text{del} + \\frac1N \\sum_{n:\\,c_n < t} F_{\\text{exp}, k_n}`, with :math:`c_n` the rough
    confidence and :math:`k_n` the chosen expert of sample n (heterogeneous experts have different
    :math:`F_{\\text{exp}, k}`). By default every :math:`F` is counted with :func:`pycoe.flops.count_flops` on the
    first sample of the first batch (for inputs whose cost depends on their length, such as sequences, this is
    an approximation: pass your own table).

    Args:
        model: a :class:`~pycoe.coe.model.CoE` whose delegator has a rough head (thresholds other than ``None``)
            and whose experts return class logits ``[B, C]``.
        loader: iterable of batches ``(x, y)`` or ``(x1, ..., xm, y)``, ``y`` LongTensor[B] of class indices in
            ``[0, C)`` with B the batch's size (or see ``unpack``). Batches of 0 samples are skipped; a loader
            without any sample raises.
        thresholds: thresholds in [0, 1]; ``None`` means no exit.
        flops: ``None`` (count them on the first non-empty batch), ``False`` (skip: ``flops_per_sample`` is
            ``None``), or a mapping ``{"delegator": float, "experts": [float] * K}`` of per-sample FLOPs (finite
            numbers >= 0).
        unpack: ``batch -> (inputs tuple, target)``.
        device: where to run (default: the model's device).

    Returns:
        One dict per threshold, in the given order: ``threshold``, ``accuracy``, ``exit_rate``,
        ``flops_per_sample`` (float or ``None``), ``expert_load`` (list of K counts of routed samples) and
        ``num_samples``.
    """
    model = _check_model(model)
    thresholds = _as_list(thresholds)
    if not isinstance(thresholds, Sequence) or isinstance(thresholds, (str, bytes)):
        raise TypeError(
            "thresholds must be a sequence of numbers in [0, 1] (or None), e.g. [0.5, 0.9, None], got "
            f"{type(thresholds).__name__}"
        )
    if not thresholds:
        raise ValueError("thresholds must not be empty")
    thresholds = [check_probability(f"thresholds[{i}]", t, allow_none=True) for i, t in enumerate(thresholds)]
    table = None if flops is None or flops is False else _check_flops_table(flops, model.num_experts)
    device = _resolve_device(model, device, unpack)

    confidences, choices, expert_ok, rough_ok = [], [], [], []
    with eval_mode(model):
        for i, (inputs, target) in enumerate(_batches(loader, unpack, device)):
            batch = inputs[0].shape[0]
            if not isinstance(target, torch.Tensor) or target.dim() != 1 or not _is_integer(target):
                what = (
                    f"shape {tuple(target.shape)}, dtype {target.dtype}"
                    if isinstance(target, torch.Tensor)
                    else (type(target).__name__)
                )
                raise ValueError(
                    f"threshold_sweep needs class-index targets LongTensor[B] in every batch; batch {i} has {what}"
                )
            if target.shape[0] != batch:
                raise ValueError(
                    f"the targets of batch {i} must have one class index per sample, shape [B={batch}], got shape "
                    f"{tuple(target.shape)}"
                )
            d = model.delegate(inputs[0])
            if d.rough_logits is None and any(t is not None for t in thresholds):
                raise ValueError("thresholds other than None need a delegator with a rough head (num_classes)")
            if table is None and flops is None and batch > 0:
                table = _flops_table(model, inputs)
            choice, _, confidence = model.route(d, exit_threshold=None)
            routed = model.experts.forward_routed(choice, *inputs)
            if routed.dim() != 2:
                raise ValueError(
                    f"threshold_sweep needs experts returning class logits [B, C], got {tuple(routed.shape)}"
                )
            num_classes = routed.shape[1]
            if d.rough_logits is not None and any(t is not None for t in thresholds):
                if d.rough_logits.shape[1] != num_classes:
                    raise ValueError(
                        f"early exit mixes the rough head's predictions ({d.rough_logits.shape[1]} classes) with the "
                        f"experts' ({num_classes} classes); they must predict the same classes"
                    )
            if batch and (int(target.min()) < 0 or int(target.max()) >= num_classes):
                raise ValueError(
                    f"targets must be class indices in [0, {num_classes}) (the experts' C = {num_classes} classes); "
                    f"batch {i} has values in [{int(target.min())}, {int(target.max())}]"
                )
            confidences.append(confidence.cpu())
            choices.append(choice.cpu())
            expert_ok.append((routed.argmax(dim=1) == target).cpu())
            if d.rough_logits is not None:
                rough_ok.append((d.rough_logits.argmax(dim=1) == target).cpu())
    if not choices:
        raise ValueError("loader produced no batch")
    if sum(c.numel() for c in choices) == 0:
        raise ValueError("loader produced no sample: every batch was empty, so there is no accuracy to measure")
    conf, choice, e_ok = torch.cat(confidences), torch.cat(choices), torch.cat(expert_ok)
    r_ok = torch.cat(rough_ok) if rough_ok else torch.zeros_like(e_ok)
    n = choice.numel()
    results = []
    for t in thresholds:
        exited = exit_mask(conf, t)
        correct = torch.where(exited, r_ok, e_ok)
        routed_choice = choice[~exited]
        load = torch.bincount(routed_choice, minlength=model.num_experts)
        flops_per_sample = None
        if table is not None:
            per_expert = torch.tensor(table[1], dtype=torch.float64)
            flops_per_sample = table[0] + float((load.double() * per_expert).sum()) / n
        results.append(
            {
                "threshold": t,
                "accuracy": float(correct.float().mean()),
                "exit_rate": float(exited.float().mean()),
                "flops_per_sample": flops_per_sample,
                "expert_load": load.tolist(),
                "num_samples": n,
            }
        )
    return results
