"""Tracing one forward pass to find which channel widths of a model must stay equal (private to ``divide``).

:func:`~pycoe.cotrain.divide_module` rebuilds a model with narrower layers. Widths joined by the data flow
(a residual addition, a squeeze-and-excitation product, a depthwise convolution) must get one common width;
:func:`trace_channels` finds them with forward hooks on the parametrised layers and a ``TorchFunctionMode``
that follows channel dimensions through every torch operation.

Einstein legend (comments): B batch; C channels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._modules import tensors_in

__all__ = [
    "CONV_TYPES",
    "MIXING_TYPES",
    "NORM_TYPES",
    "INPUT_NODE",
    "UnionFind",
    "LayerRecord",
    "is_depthwise",
    "out_width",
    "trace_channels",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MIXING_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)
INPUT_NODE = 0  # the union-find node of the model's input channels

_PERMUTES = ("permute", "transpose", "transpose_", "swapaxes", "movedim", "moveaxis")


class UnionFind:
    """Union-find over integer nodes (with path halving); the smaller root wins a union."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class LayerRecord:
    """What the trace learns about one parametrised layer (a mixing layer or a norm)."""

    name: str
    module: nn.Module
    node: int | None = None  # mixing layers: the node of their output channels
    in_node: int | None = None  # the node of the input's channel dim, if known
    in_channels_dim: int | None = None  # norms: which input dim holds the features
    executed: bool = False
    is_output: bool = False  # its output reaches the model's output through non-mixing operations only
    module_input: Tensor | None = None  # during the trace only: the tensor the layer received


def is_depthwise(conv: nn.Module) -> bool:
    """A convolution whose groups equal its input channels."""
    groups, in_channels = getattr(conv, "groups", 1), getattr(conv, "in_channels", 0)
    return isinstance(groups, int) and groups > 1 and groups == in_channels


def out_width(module: nn.Module) -> int:
    """The output channels of a convolution or the output features of a ``Linear``."""
    if isinstance(module, CONV_TYPES):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    raise TypeError(f"expected a convolution or a Linear, got {type(module).__name__}")


def _channel_dim(module: nn.Module, ndim: int) -> int:
    """Input/output dim holding the channels of a mixing layer."""
    return 1 if isinstance(module, CONV_TYPES) else ndim - 1


def _permutation(name: str, ndim: int, rest: tuple, kwargs: dict) -> dict[int, int] | None:
    """old dim -> new dim for permute-like ops, or None if the arguments are not understood."""
    try:
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            dims = kwargs.get("dims", dims)
            return {int(old) % ndim: new for new, old in enumerate(dims)}
        if name in ("transpose", "transpose_", "swapaxes"):
            a, b = int(rest[0]) % ndim, int(rest[1]) % ndim
            mapping = {d: d for d in range(ndim)}
            mapping[a], mapping[b] = b, a
            return mapping
        # movedim / moveaxis (source, destination)
        src = [int(d) % ndim for d in (rest[0] if isinstance(rest[0], (tuple, list)) else [rest[0]])]
        dst = [int(d) % ndim for d in (rest[1] if isinstance(rest[1], (tuple, list)) else [rest[1]])]
        placed: list[int | None] = [None] * ndim
        for s_, d_ in zip(src, dst):
            placed[d_] = s_
        others = iter(d for d in range(ndim) if d not in src)
        order = [p if p is not None else next(others) for p in placed]
        return {old: new for new, old in enumerate(order)}
    except Exception:
        return None


class _Tracer(TorchFunctionMode):
    """Records which tensor dims carry which layers' output channels, and the data flow between tensors.

    Channel "tags" (tensor dim -> union-find node) start at the model input and at every Conv/Linear output
    and are propagated through every torch operation whose output keeps the tagged dim's size (element-wise
    ops, activations, pooling, norms, ``flatten`` of ``[B, C, 1, 1]`` ...), through ``permute``/``transpose``,
    and are lost through anything else (``cat`` along channels, ``flatten`` of a spatial map, reshapes).
    When two tags meet on the same dim (``x + f(x)``, ``x * se(x)``), their nodes are united: those widths
    must stay equal.
    """

    def __init__(self, uf: UnionFind) -> None:
        super().__init__()
        self.uf = uf
        self.tags: dict[int, dict[int, int]] = {}  # id(tensor) -> {dim: node}
        self.edges: dict[int, list[int]] = {}  # id(output) -> ids of the inputs it was computed from
        self.module_outputs: dict[int, str] = {}  # id(tensor) -> name of the mixing layer that produced it
        self.keep: list[Tensor] = []  # strong references: ids stay unique during the trace
        self.depth = 0  # > 0 inside a mixing layer, whose internals are not recorded

    def tag(self, t: Tensor, dim: int, node: int) -> None:
        self.keep.append(t)
        info = self.tags.setdefault(id(t), {})
        if dim in info:
            self.uf.union(info[dim], node)
        else:
            info[dim] = node

    def copy_tags(self, src: Tensor, dst: Tensor, mapping: dict[int, int] | None = None) -> None:
        for d, node in list(self.tags.get(id(src), {}).items()):
            nd = d if mapping is None else mapping.get(d)
            if nd is not None:
                self.tag(dst, nd, node)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            try:
                self._record(func, args, kwargs, out)
            except Exception:  # recording must never break the model's forward
                pass
        return out

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        ins = tensors_in((args, kwargs))
        outs = tensors_in(out)
        if not outs or not ins:
            return
        name = getattr(func, "__name__", "")
        for o in outs:
            self.keep.append(o)
            self.edges.setdefault(id(o), []).extend(id(i) for i in ins if i is not o)
        src = ins[0]
        if name in _PERMUTES and len(outs) == 1:
            mapping = _permutation(name, src.dim(), args[1:], kwargs)
            if mapping is not None:
                self.copy_tags(src, outs[0], mapping)
                return
        for o in outs:
            for i in ins:
                for d, node in list(self.tags.get(id(i), {}).items()):
                    if d < o.dim() and d < i.dim() and o.shape[d] == i.shape[d]:
                        if o.dim() == i.dim() or tuple(o.shape[: d + 1]) == tuple(i.shape[: d + 1]):
                            self.tag(o, d, node)

    # -- forward hooks on the parametrised layers ---------------------------------------------------------
    def pre_hook(self, rec: LayerRecord, args: tuple) -> None:
        rec.executed = True
        inp = tensors_in(args)
        if not inp:
            return
        x = inp[0]
        info = self.tags.get(id(x), {})
        if isinstance(rec.module, MIXING_TYPES):
            rec.in_node = info.get(_channel_dim(rec.module, x.dim()))
            self.depth += 1
        else:
            rec.in_channels_dim = _feature_dim(rec.module, x, info)
            rec.in_node = info.get(rec.in_channels_dim)
        rec.module_input = x

    def post_hook(self, rec: LayerRecord, uf: UnionFind, output: Any) -> None:
        outs = tensors_in(output)
        if isinstance(rec.module, MIXING_TYPES):
            self.depth -= 1
            if rec.node is None:
                rec.node = uf.add()
            for o in outs:
                self.keep.append(o)
                self.module_outputs[id(o)] = rec.name
                self.tags[id(o)] = {}
                self.tag(o, _channel_dim(rec.module, o.dim()), rec.node)
        else:  # norms keep their input's shape: forward its tags whatever happens inside
            x = rec.module_input
            for o in outs:
                if x is not None and o.shape == x.shape:
                    self.copy_tags(x, o)
        rec.module_input = None


def _feature_dim(norm: nn.Module, x: Tensor, info: dict[int, int]) -> int:
    """Which input dim of a norm holds its features."""
    if not isinstance(norm, nn.LayerNorm):
        return 1
    feat = norm.normalized_shape[-1]
    if len(norm.normalized_shape) == 1:
        dims = [d for d in range(x.dim()) if x.shape[d] == feat]
        tagged = [d for d in dims if d in info]
        if tagged or dims:
            return (tagged or dims)[-1]
    return x.dim() - 1


def _mark_output_layers(output: Any, tracer: _Tracer, records: Iterable[LayerRecord]) -> None:
    """Layers whose outputs reach the model output through non-mixing operations only keep their width."""
    by_name = {rec.name: rec for rec in records}
    seen: set[int] = set()
    stack = [id(t) for t in tensors_in(output)]
    while stack:
        tid = stack.pop()
        if tid in seen:
            continue
        seen.add(tid)
        if tid in tracer.module_outputs:
            by_name[tracer.module_outputs[tid]].is_output = True
            continue
        stack.extend(tracer.edges.get(tid, []))


def trace_channels(model: nn.Module, example_input: Any, records: dict[int, LayerRecord], uf: UnionFind) -> Any:
    """Run ``model`` once on ``example_input`` and fill in ``records`` (keyed by ``id(module)``) and ``uf``.

    Afterwards each executed layer's record holds the union-find nodes of its input and output channels and
    whether it is an output layer; ``uf`` unites the nodes whose widths must be equal. Returns the output.
    """
    tracer = _Tracer(uf)
    handles = []
    for rec in records.values():
        handles.append(rec.module.register_forward_pre_hook(lambda m, args, rec=rec: tracer.pre_hook(rec, args)))
        handles.append(rec.module.register_forward_hook(lambda m, args, out, rec=rec: tracer.post_hook(rec, uf, out)))
    try:
        with torch.no_grad(), tracer:
            for x in tensors_in(example_input):
                tracer.keep.append(x)
                if x.dim() >= 2:
                    tracer.tag(x, 1, INPUT_NODE)
                    tracer.tag(x, x.dim() - 1, INPUT_NODE)
            output = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in handles:
            h.remove()
    _mark_output_layers(output, tracer, records.values())
    return output
