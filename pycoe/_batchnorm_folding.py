"""BatchNorm folding for :mod:`pycoe.export` (private): which BatchNorms can be folded, and the affine form of the
others. :func:`pycoe.export.prepare_for_export` is the public entry point.

Einstein legend: ``b`` sample, ``c`` channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from pycoe._modules import traceable_paths

__all__ = ["FOLDABLE_INTO", "BATCH_NORMS", "BatchNormAffine", "foldable_pairs", "output_mismatch"]

# Exactly these types are folded into: a subclass may change what its weight means (e.g. weight standardisation).
FOLDABLE_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Exactly these types are folded or frozen: their eval forward is the affine map of their running statistics.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BatchNormAffine(nn.Module):
    """An eval-mode BatchNorm that cannot be folded, as the affine map it computes: ``x * scale + shift`` per
    channel (dim 1). Same values as the BatchNorm, without its batch-size checks."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)


class _UseCounter(TorchFunctionMode):
    """Counts, for each watched tensor, the torch calls that take it and return a tensor (computational uses;
    metadata queries such as ``.dim()`` or ``.shape`` return no tensor and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.uses and any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(result)):
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and id(t) in self.uses:
                    self.uses[id(t)] += 1
        return result


def foldable_pairs(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[dict[str, str], Any]:
    """``{batchnorm name: producer name}`` for the BatchNorms whose input, in one forward on the example, is the
    output of a convolution / linear layer that nothing else uses (each module called once); and the output of
    that forward."""
    modules = dict(model.named_modules())
    names = {id(m): name for name, m in modules.items()}
    calls: dict[int, int] = {}
    produced: dict[int, tuple[int, torch.Tensor]] = {}  # id(output) -> (id(producer), output kept alive)
    consumed: dict[int, int] = {}  # id(batchnorm) -> id(its input)
    counter = _UseCounter()

    def after_producer(module: nn.Module, inputs: Any, output: Any) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (id(module), output)
            counter.uses[id(output)] = 0

    def before_norm(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        if inputs and isinstance(inputs[0], torch.Tensor):
            consumed[id(module)] = id(inputs[0])

    handles = []
    for m in model.modules():
        if type(m) in FOLDABLE_INTO:
            handles.append(m.register_forward_hook(after_producer))
        elif type(m) in BATCH_NORMS:
            handles.append(m.register_forward_pre_hook(before_norm))
    try:
        # the traceable paths call every expert (also those that receive no sample), as the exported graph does
        with torch.no_grad(), traceable_paths(), counter:
            reference = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    pairs: dict[str, str] = {}
    for bn_id, tensor_id in consumed.items():
        if tensor_id not in produced or calls.get(bn_id) != 1:
            continue
        producer_id, output = produced[tensor_id]
        producer, bn = modules[names[producer_id]], modules[names[bn_id]]
        if calls.get(producer_id) != 1 or counter.uses[tensor_id] != 1:
            continue  # a shared layer, or its raw output is used elsewhere too (e.g. a residual)
        channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        if bn.num_features != channels or (isinstance(producer, nn.Linear) and output.dim() != 2):
            continue
        pairs[names[bn_id]] = names[producer_id]
    return pairs, reference


def _decision_flips(reference: list[Any], outputs: list[Any]) -> torch.Tensor | None:
    """Rows (samples) on which a non-floating output of dim 0 = B (an exit flag, an expert index, a class) differs;
    ``None`` without such outputs. B is dim 0 of the first tensor output."""
    tensors = [a for a in reference if isinstance(a, torch.Tensor) and a.dim() > 0]
    if not tensors:
        return None
    batch = tensors[0].shape[0]
    flipped = None
    for a, b in zip(reference, outputs):
        if not isinstance(a, torch.Tensor) or a.is_floating_point() or a.dim() == 0 or a.shape[0] != batch:
            continue
        if not isinstance(b, torch.Tensor) or b.shape != a.shape:
            continue
        rows = (a != b).reshape(batch, -1).any(1)
        flipped = rows if flipped is None else flipped | rows
    return flipped


def output_mismatch(reference: Any, outputs: Any) -> str | None:
    """``None`` when ``outputs`` equal ``reference`` up to the rounding of the folding, else what differs.

    Only the samples on which the decisions agree are compared: a sample whose exit confidence lies within rounding
    of the threshold (or whose two best experts tie) may take the other branch after folding, and its output then
    differs by design. When every sample's decision differs, that is reported instead.
    """
    ref_leaves, out_leaves = pytree.tree_leaves(reference), pytree.tree_leaves(outputs)
    flipped = _decision_flips(ref_leaves, out_leaves)
    if flipped is not None and flipped.numel() and bool(flipped.all()):
        return f"the decisions (exits, expert indices) differ on all {flipped.numel()} samples of the example"
    for a, b in zip(ref_leaves, out_leaves):
        if flipped is not None and isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == flipped.shape[0]:
            a, b = a[~flipped], b[~flipped]
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel():
            scale = float(a.detach().abs().nan_to_num(0.0, 0.0, 0.0).max())  # NaN: no confidence without a rough head
            if not torch.allclose(b.float(), a.float(), rtol=1e-3, atol=1e-3 * max(scale, 1.0), equal_nan=True):
                return (
                    f"max abs difference {float((b.float() - a.float()).abs().max()):.3g} for values up to {scale:.3g}"
                )
    return None
