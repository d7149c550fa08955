"""Dividing one network into S narrower ones with about 1/S of its parameters each.

Zhao, Zhou, Wang, Cai, Lam, Xu, *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*,
IEEE TIP 2022 (arXiv 2011.14660). The paper divides a wide network M into S small networks
M_1..M_S whose parameter counts add up to about M's. Convolution parameters grow with the square of the
width, so the width is divided by about :math:`\\sqrt S`; for ResNeXt the paper divides the cardinality
(the number of groups) by S instead. The authors' code does this with hand-written width tables per
architecture. pycoe offers two generic ways instead:

- :func:`divide_by_factory`: for models built from a width argument (torchvision's ``mobilenet_v2(width_mult=w)``,
  wide ResNets' ``width_per_group``, your own), search the width at which one model has about 1/S of the
  parameters (bisection on the parameter count, counted on the ``meta`` device), then build S models.
- :func:`divide_module`: for an instantiated model made of standard layers, rebuild it with every internal
  channel width scaled by one factor :math:`\\alpha` (about :math:`1/\\sqrt S`, by default adjusted so that
  the parameter count is 1/S; pycoe's generic rule, see :func:`divide_module`).

Einstein legend (comments): S members; c an original channel count; c' a divided one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._modules import replace_modules
from .._modules import tensors_in as _tensors
from .._validation import check_positive_int

__all__ = [
    "DivisionError",
    "WidthSearch",
    "count_parameters",
    "search_width",
    "divide_by_factory",
    "divide_module",
    "round_to_multiple",
]


class DivisionError(ValueError):
    """Raised when a model cannot be divided; the message names the offending module."""


def count_parameters(model: nn.Module) -> int:
    """Number of (distinct) parameter elements of ``model``; works for models on the ``meta`` device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())


def round_to_multiple(value: float, multiple: int) -> int:
    """Round ``value`` to the nearest positive multiple of ``multiple`` (never below ``multiple``)."""
    m = check_positive_int("multiple", multiple)
    return max(m, math.floor(value / m + 0.5) * m)


# ------------------------------------------------------------------------------------------------------
# 1. Division by a width factory
# ------------------------------------------------------------------------------------------------------


@dataclass
class WidthSearch:
    """The result of :func:`search_width`.

    Attributes:
        width: the width chosen for each of the S divided models.
        params: the parameter count of one model at ``width``.
        target: ``reference_params / S``.
        reference_params: the parameter count at ``base_width``.
        evaluations: how many widths were evaluated.
    """

    width: float
    params: int
    target: float
    reference_params: int
    evaluations: int

    @property
    def ratio(self) -> float:
        """``params / target`` (1.0 is an exact match)."""
        return self.params / self.target


def _count_factory(factory: Callable[[Any], nn.Module], width: Any) -> int:
    try:
        with torch.device("meta"):
            model = factory(width)
    except Exception:  # some factories cannot build on the meta device: build for real
        model = factory(width)
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory must return an nn.Module, got {type(model).__name__} for width {width!r}")
    return count_parameters(model)


def search_width(
    factory: Callable[[Any], nn.Module],
    num_splits: int,
    base_width: float = 1.0,
    *,
    integer: bool = False,
    candidates: Iterable[Any] | None = None,
    rel_tol: float = 0.005,
    max_iter: int = 40,
) -> WidthSearch:
    """Find the width at which ``factory(width)`` has about ``1/S`` of the parameters of ``factory(base_width)``.

    The parameter count is assumed non-decreasing in the width. Models are built on the ``meta`` device
    for counting (no memory, no initialisation cost), falling back to the CPU if the factory fails there.

    Args:
        factory: ``width -> nn.Module``.
        num_splits: S >= 1.
        base_width: the width of the undivided model.
        integer: search integer widths in ``[1, base_width]`` (e.g. ``width_per_group``).
        candidates: if given, choose among these widths only (the one whose count is closest to the target).
        rel_tol: continuous search: stop when the count is within this relative distance of the target.
        max_iter: continuous search: at most this many bisection steps.

    Returns:
        A :class:`WidthSearch`; ``width`` is the evaluated width whose count is closest to the target.
    """
    if not callable(factory):
        raise TypeError(f"factory must be callable (width -> nn.Module), got {type(factory).__name__}")
    s = check_positive_int("num_splits", num_splits)
    if isinstance(base_width, bool) or not isinstance(base_width, (int, float)) or not base_width > 0:
        raise ValueError(f"base_width must be a number > 0, got {base_width!r}")
    if integer and int(base_width) != base_width:
        raise ValueError(f"base_width must be an integer when integer=True, got {base_width!r}")
    if not rel_tol > 0:
        raise ValueError(f"rel_tol must be > 0, got {rel_tol!r}")
    check_positive_int("max_iter", max_iter)
    cache: dict[Any, int] = {}

    def count(w: Any) -> int:
        if w not in cache:
            cache[w] = _count_factory(factory, w)
        return cache[w]

    reference = count(int(base_width) if integer else base_width)
    target = reference / s

    def best() -> WidthSearch:
        w = min(cache, key=lambda k: (abs(cache[k] - target), cache[k]))
        return WidthSearch(width=w, params=cache[w], target=target, reference_params=reference, evaluations=len(cache))

    if s == 1:
        cache.clear()
        cache[int(base_width) if integer else base_width] = reference
        return best()
    if candidates is not None:
        cands = list(candidates)
        if not cands:
            raise ValueError("candidates must not be empty")
        cache.clear()
        for w in cands:
            count(w)
        return best()
    if integer:
        lo, hi = 1, int(base_width)  # count(hi) = reference >= target
        if count(lo) >= target:
            return best()
        while hi - lo > 1:  # invariant: count(lo) < target <= count(hi)
            mid = (lo + hi) // 2
            if count(mid) < target:
                lo = mid
            else:
                hi = mid
        return best()
    lo, hi = base_width / s, float(base_width)
    shrink = 0
    while count(lo) > target and shrink < 20:
        lo /= 2
        shrink += 1
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        c = count(mid)
        if abs(c - target) <= rel_tol * target:
            break
        if c < target:
            lo = mid
        else:
            hi = mid
    return best()


def divide_by_factory(
    factory: Callable[[Any], nn.Module],
    num_splits: int,
    base_width: float = 1.0,
    *,
    integer: bool = False,
    candidates: Iterable[Any] | None = None,
    rel_tol: float = 0.005,
    max_iter: int = 40,
    identical_init: bool = False,
) -> list[nn.Module]:
    """Build S models from ``factory`` at the width where each has about 1/S of ``factory(base_width)``'s parameters.

    The width is found by :func:`search_width`; each of the S models is a fresh ``factory(width)`` call
    (independent initialisations unless ``identical_init``).

    Args:
        factory: ``width -> nn.Module``, e.g. ``lambda w: torchvision.models.mobilenet_v2(width_mult=w)`` or
            ``lambda w: torchvision.models.resnet.ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=w)`` with
            ``integer=True``.
        num_splits: S >= 1.
        base_width: the width of the undivided model.
        integer, candidates, rel_tol, max_iter: see :func:`search_width`.
        identical_init: give every model the first model's initial weights (an option of the authors' code).

    Returns:
        A list of S ``nn.Module``.

    Example:
        >>> import torchvision
        >>> nets = divide_by_factory(lambda w: torchvision.models.mobilenet_v2(width_mult=w), 2)
        >>> len(nets)
        2
    """
    result = search_width(
        factory, num_splits, base_width, integer=integer, candidates=candidates, rel_tol=rel_tol, max_iter=max_iter
    )
    models = [factory(result.width) for _ in range(num_splits)]
    for m in models:
        if not isinstance(m, nn.Module):
            raise TypeError(f"factory must return an nn.Module, got {type(m).__name__}")
    if identical_init:
        state = models[0].state_dict()
        for m in models[1:]:
            m.load_state_dict(state)
    return models


# ------------------------------------------------------------------------------------------------------
# 2. Generic division of an instantiated model
# ------------------------------------------------------------------------------------------------------

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MIXING = (*_CONV, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_LAZY = nn.modules.lazy.LazyModuleMixin
_INPUT = 0  # the union-find node of the model's input channels


class _UnionFind:
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
class _LayerRecord:
    name: str
    module: nn.Module
    node: int | None = None  # mixing layers: the node of their output channels
    in_node: int | None = None  # the node of the input's channel dim, if known
    in_channels_dim: int | None = None  # norms: which input dim holds the features
    executed: bool = False
    is_output: bool = False


def _channel_dim(module: nn.Module, ndim: int) -> int:
    """Input/output dim holding the channels of a mixing layer."""
    return 1 if isinstance(module, _CONV) else ndim - 1


class _Tracer(TorchFunctionMode):
    """Records which tensor dims carry which layers' output channels, and the data flow between tensors.

    Channel "tags" (tensor dim -> union-find node) start at the model input and at every Conv/Linear output
    and are propagated through every torch operation whose output keeps the tagged dim's size (element-wise
    ops, activations, pooling, norms, ``flatten`` of ``[B, C, 1, 1]`` ...), through ``permute``/``transpose``,
    and are lost through anything else (``cat`` along channels, ``flatten`` of a spatial map, reshapes).
    When two tags meet on the same dim (``x + f(x)``, ``x * se(x)``), their nodes are united: those widths
    must stay equal.
    """

    def __init__(self, uf: _UnionFind) -> None:
        super().__init__()
        self.uf = uf
        self.tags: dict[int, dict[int, int]] = {}
        self.edges: dict[int, list[int]] = {}
        self.module_outputs: dict[int, str] = {}
        self.keep: list[Tensor] = []  # strong references: ids stay unique during the trace
        self.depth = 0

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
        ins = _tensors((args, kwargs))
        outs = _tensors(out)
        if not outs or not ins:
            return
        name = getattr(func, "__name__", "")
        for o in outs:
            self.keep.append(o)
            self.edges.setdefault(id(o), []).extend(id(i) for i in ins if i is not o)
        src = ins[0]
        if name in ("permute", "transpose", "transpose_", "swapaxes", "movedim", "moveaxis") and len(outs) == 1:
            mapping = self._dim_map(name, src.dim(), args[1:], kwargs)
            if mapping is not None:
                self.copy_tags(src, outs[0], mapping)
                return
        for o in outs:
            for i in ins:
                for d, node in list(self.tags.get(id(i), {}).items()):
                    if d < o.dim() and d < i.dim() and o.shape[d] == i.shape[d]:
                        if o.dim() == i.dim() or tuple(o.shape[: d + 1]) == tuple(i.shape[: d + 1]):
                            self.tag(o, d, node)

    @staticmethod
    def _dim_map(name: str, ndim: int, rest: tuple, kwargs: dict) -> dict[int, int] | None:
        """old dim -> new dim for permute-like ops, or None if the arguments are not understood."""
        try:
            if name == "permute":
                dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
                dims = kwargs.get("dims", dims)
                dims = [int(d) % ndim for d in dims]
                return {old: new for new, old in enumerate(dims)}
            if name in ("transpose", "transpose_", "swapaxes"):
                a, b = (int(rest[0]) % ndim, int(rest[1]) % ndim)
                mapping = {d: d for d in range(ndim)}
                mapping[a], mapping[b] = b, a
                return mapping
            src = rest[0] if isinstance(rest[0], (tuple, list)) else [rest[0]]
            dst = rest[1] if isinstance(rest[1], (tuple, list)) else [rest[1]]
            src = [int(d) % ndim for d in src]
            dst = [int(d) % ndim for d in dst]
            order = [d for d in range(ndim) if d not in src]
            result = [None] * ndim
            for s_, d_ in zip(src, dst):
                result[d_] = s_
            it = iter(order)
            result = [r if r is not None else next(it) for r in result]
            return {old: new for new, old in enumerate(result)}
        except Exception:
            return None


def _is_depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def _unsupported(model: nn.Module) -> list[tuple[str, nn.Module]]:
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, _LAZY):
            bad.append((name, module))
        elif isinstance(module, (*_MIXING, *_NORMS)) or (isinstance(module, nn.PReLU) and module.num_parameters == 1):
            continue
        elif any(True for _ in module.parameters(recurse=False)):
            bad.append((name, module))
    return bad


def _default_example(model: nn.Module) -> Tensor:
    first = next((m for m in model.modules() if isinstance(m, _MIXING)), None)
    if isinstance(first, nn.Conv2d):
        param = first.weight
        return torch.randn(1, first.in_channels, 64, 64, device=param.device, dtype=param.dtype)
    raise DivisionError(
        "example_input is required: the default (a 1x3x64x64 image batch) is only used for models whose first "
        f"layer is an nn.Conv2d, but this model's first layer is {type(first).__name__ if first else 'missing'}"
    )


def _trace(model: nn.Module, example_input: Any, records: dict[int, _LayerRecord], uf: _UnionFind) -> Any:
    tracer = _Tracer(uf)
    handles = []

    def pre_hook(module: nn.Module, args: tuple) -> None:
        rec = records[id(module)]
        rec.executed = True
        inp = _tensors(args)
        if not inp:
            return
        x = inp[0]
        info = tracer.tags.get(id(x), {})
        if isinstance(module, _MIXING):
            rec.in_node = info.get(_channel_dim(module, x.dim()))
            tracer.depth += 1
        else:  # a norm: which input dim carries its features
            if isinstance(module, nn.LayerNorm):
                k = len(module.normalized_shape)
                feat = module.normalized_shape[-1]
                dims = [d for d in range(x.dim()) if x.shape[d] == feat]
                tagged = [d for d in dims if d in info]
                if k == 1 and (tagged or dims):
                    rec.in_channels_dim = (tagged or dims)[-1]
                else:
                    rec.in_channels_dim = x.dim() - 1
            else:
                rec.in_channels_dim = 1
            rec.in_node = info.get(rec.in_channels_dim)
        rec.module_input = x  # type: ignore[attr-defined]

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        rec = records[id(module)]
        outs = _tensors(output)
        if isinstance(module, _MIXING):
            tracer.depth -= 1
            if rec.node is None:
                rec.node = uf.add()
            for o in outs:
                tracer.keep.append(o)
                tracer.module_outputs[id(o)] = rec.name
                tracer.tags[id(o)] = {}
                tracer.tag(o, _channel_dim(module, o.dim()), rec.node)
        else:  # norms keep their input's shape: forward its tags whatever happens inside
            x = getattr(rec, "module_input", None)
            for o in outs:
                if x is not None and o.shape == x.shape:
                    tracer.copy_tags(x, o)
        if hasattr(rec, "module_input"):
            del rec.module_input  # type: ignore[attr-defined]

    for rec in records.values():
        handles.append(rec.module.register_forward_pre_hook(pre_hook))
        handles.append(rec.module.register_forward_hook(post_hook))
    inputs = _tensors(example_input)
    try:
        with torch.no_grad(), tracer:
            for x in inputs:
                tracer.keep.append(x)
                if x.dim() >= 2:
                    tracer.tag(x, 1, _INPUT)
                    tracer.tag(x, x.dim() - 1, _INPUT)
            output = model(example_input) if not isinstance(example_input, tuple) else model(*example_input)
    finally:
        for h in handles:
            h.remove()
    # layers whose outputs reach the model output through non-mixing operations only keep their width
    seen: set[int] = set()
    stack = [id(t) for t in _tensors(output)]
    by_name = {rec.name: rec for rec in records.values()}
    while stack:
        tid = stack.pop()
        if tid in seen:
            continue
        seen.add(tid)
        if tid in tracer.module_outputs:
            by_name[tracer.module_outputs[tid]].is_output = True
            continue
        stack.extend(tracer.edges.get(tid, []))
    return output


class _Placeholder(nn.Module):
    """Stands for a layer of the divided model; builds it from the first input it sees."""

    def __init__(
        self,
        name: str,
        original: nn.Module,
        out_width: int | None,
        groups: int | str | None,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.feature_dim = feature_dim  # norms: the input dim holding the features
        self.original = [original]  # a list: not registered as a submodule
        self.out_width = out_width
        self.groups = groups
        self.built: nn.Module | None = None

    def _build(self, x: Tensor) -> nn.Module:
        m = self.original[0]
        ref = next(iter(m.parameters()), None)
        factory_kwargs = {
            "device": ref.device if ref is not None else x.device,
            "dtype": ref.dtype if ref is not None else x.dtype,
        }
        if isinstance(m, _CONV):
            cin = x.shape[1]
            if self.groups == "depthwise":
                groups = cin
                out = cin * (m.out_channels // m.in_channels)
            else:
                groups = int(self.groups)
                out = int(self.out_width)
            if cin % groups or out % groups:
                raise DivisionError(
                    f"cannot divide {self.name!r} ({type(m).__name__}, groups={m.groups}): its divided input/output "
                    f"channels {cin}/{out} are not divisible by groups={groups}"
                )
            kwargs = dict(
                kernel_size=m.kernel_size,
                stride=m.stride,
                padding=m.padding,
                dilation=m.dilation,
                groups=groups,
                bias=m.bias is not None,
                padding_mode=m.padding_mode,
            )
            args = (cin, out)
        elif isinstance(m, nn.Linear):
            args, kwargs = (x.shape[-1], int(self.out_width)), dict(bias=m.bias is not None)
        elif isinstance(m, nn.GroupNorm):
            c = x.shape[1]
            if c % m.num_groups:
                raise DivisionError(
                    f"cannot divide {self.name!r} (GroupNorm, num_groups={m.num_groups}): the divided width {c} is "
                    "not divisible by num_groups"
                )
            args, kwargs = (m.num_groups, c), dict(eps=m.eps, affine=m.affine)
        elif isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            shape = (x.shape[int(self.feature_dim)],) if k == 1 else tuple(x.shape[-k:])
            args = (shape,)
            kwargs = dict(eps=m.eps, elementwise_affine=m.elementwise_affine)
            if m.elementwise_affine:
                kwargs["bias"] = m.bias is not None
        else:  # batch / instance norms
            args = (x.shape[1],)
            kwargs = dict(eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats)
        try:
            layer = type(m)(*args, **kwargs, **factory_kwargs)
        except TypeError as err:
            raise DivisionError(
                f"cannot divide {self.name!r}: could not re-instantiate {type(m).__name__} with new sizes "
                f"(a subclass with a different constructor?): {err}"
            ) from err
        layer.train(m.training)
        return layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.built is None:
            x = _tensors((args, kwargs))[0]
            self.built = self._build(x)
        return self.built(*args, **kwargs)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def divide_module(
    model: nn.Module,
    num_splits: int,
    *,
    multiple: int = 8,
    divide_groups: bool = False,
    example_input: Any = None,
    width_multiplier: float | str = "match",
    identical_init: bool = False,
    init_fn: Callable[[nn.Module], None] | None = None,
) -> list[nn.Module]:
    r"""Divide an instantiated model into S narrower copies with about 1/S of its parameters each.

    **pycoe's generic rule** (the paper uses per-architecture width tables instead). Every channel count
    :math:`c` inside the model becomes

    .. math:: c' = \operatorname{round\_to\_multiple}(c \cdot \alpha,\; m), \qquad \alpha \approx 1/\sqrt{S},

    where by default :math:`\alpha` is chosen (by bisection) so that the divided model's parameter count is
    closest to the original's divided by S, and :math:`m` = ``multiple`` (raised to the least common
    multiple with the groups of any grouped convolution or ``GroupNorm`` that must divide that width), except

    - the model's input channels and the widths of the layers producing the model's output (e.g. the
      classifier's number of classes), which are kept;
    - depthwise convolutions (``groups == in_channels``), which keep ``groups == channels``;
    - with ``divide_groups=True`` (the paper's choice for ResNeXt), grouped convolutions (``1 < groups <
      in_channels``) keep their width per group and divide their number of groups by S (``groups`` must be
      divisible by S), so their widths become exactly :math:`c / S`.

    Widths that must stay equal (a residual addition, a squeeze-and-excitation product) are found by tracing
    one forward pass of ``example_input`` and are given one common width. Each layer's input size is taken
    from the tensor it actually receives in the rebuilt model, so concatenations and flattened feature maps
    (VGG/AlexNet classifiers) are handled. Supported parametrised layers: ``Conv1d/2d/3d``, ``Linear``,
    ``BatchNorm*``/``SyncBatchNorm``, ``InstanceNorm*``, ``GroupNorm``, ``LayerNorm`` (and subclasses with
    the same constructor, such as torchvision's ``LayerNorm2d``), ``PReLU`` with one parameter. Parameter-free
    modules and functional code in ``forward`` are kept as they are.

    The rebuilt layers are **freshly initialised** with PyTorch's default initialisation (pass ``init_fn``
    to apply your model's own, e.g. torchvision's Kaiming init); dropout probabilities are left alone
    (see :func:`~pycoe.cotrain.apply_dropout_scaling`). ``S = 1`` returns ``[copy.deepcopy(model)]``.

    Args:
        model: the network to divide (left unchanged).
        num_splits: S >= 1.
        multiple: round every divided width to a multiple of this (8 is friendly to vector units and
            tensor cores).
        divide_groups: divide the number of groups of grouped convolutions by S instead of their width.
        example_input: a batch the model accepts (a tensor, or a tuple of positional inputs), used for the
            trace and to check the divided model. Default: ``torch.randn(1, C, 64, 64)`` when the model's first
            layer is an ``nn.Conv2d`` with C input channels; required otherwise.
        width_multiplier: :math:`\alpha`: ``"match"`` (default) picks it so that one divided model has the
            parameter count closest to the original's / S (the fixed input and output layers make the plain
            rule overshoot, e.g. +11% for EfficientNet-B0 at S = 2); ``"sqrt"`` is exactly :math:`1/\sqrt S`;
            a number sets it.
        identical_init: give all S copies the same initial weights (an option of the authors' code).
        init_fn: called as ``member.apply(init_fn)`` on each divided copy after its default initialisation.

    Returns:
        S ``nn.Module``: deep copies of ``model`` with the rebuilt layers, in ``model``'s training mode.

    Raises:
        DivisionError: (a ``ValueError``) naming the module that cannot be divided: an unsupported
            parametrised layer, a layer the example input does not reach, groups that do not divide the new
            width, or a divided model that fails its verification forward pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    s = check_positive_int("num_splits", num_splits)
    multiple = check_positive_int("multiple", multiple)
    if not isinstance(divide_groups, bool):
        raise TypeError(f"divide_groups must be a bool, got {type(divide_groups).__name__}")
    if width_multiplier not in ("match", "sqrt") and (
        isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float)) or not width_multiplier > 0
    ):
        raise ValueError(f"width_multiplier must be 'match', 'sqrt' or a number > 0, got {width_multiplier!r}")
    if init_fn is not None and not callable(init_fn):
        raise TypeError(f"init_fn must be callable or None, got {type(init_fn).__name__}")
    if s == 1:
        return [copy.deepcopy(model)]

    bad = _unsupported(model)
    if bad:
        name, module = bad[0]
        raise DivisionError(
            f"cannot divide module {name or '<root>'!r} ({type(module).__name__}): it holds parameters and is not a "
            "layer divide_module knows how to resize (Conv1d/2d/3d, Linear, BatchNorm, InstanceNorm, GroupNorm, "
            "LayerNorm, single-parameter PReLU); divide the model with divide_by_factory instead"
        )
    if example_input is None:
        example_input = _default_example(model)

    # --- 1. trace a copy of the model to find equal-width classes and output layers --------------------------
    traced = copy.deepcopy(model).eval()
    uf = _UnionFind()
    uf.add()  # _INPUT
    names: dict[int, list[str]] = {}
    for name, module in traced.named_modules(remove_duplicate=False):
        if isinstance(module, (*_MIXING, *_NORMS)):
            names.setdefault(id(module), []).append(name)
    by_id = {id(m): m for m in traced.modules()}
    records = {mid: _LayerRecord(name=ns[0], module=by_id[mid]) for mid, ns in names.items()}
    try:
        reference_output = _trace(traced, example_input, records, uf)
    except DivisionError:
        raise
    except Exception as err:
        raise DivisionError(f"the model failed on example_input during tracing: {type(err).__name__}: {err}") from err
    for rec in records.values():
        if not rec.executed:
            raise DivisionError(
                f"cannot divide module {rec.name!r} ({type(rec.module).__name__}): example_input never reaches it "
                "(pass an example_input that exercises every layer, or remove unused layers)"
            )

    # --- 2. properties of each equal-width class --------------------------------------------------------------
    mixing = [r for r in records.values() if isinstance(r.module, _MIXING)]
    for rec in mixing:
        m = rec.module
        if isinstance(m, _CONV) and _is_depthwise(m) and m.out_channels == m.in_channels and rec.in_node is not None:
            uf.union(rec.node, rec.in_node)  # a depthwise conv's output channels are its input channels
    orig: dict[int, int] = {uf.find(_INPUT): -1}
    fixed: set[int] = {uf.find(_INPUT)}
    mult: dict[int, int] = {}
    group_div: set[int] = set()

    def note_width(node: int, width: int, name: str) -> None:
        root = uf.find(node)
        if root == uf.find(_INPUT):
            return
        if orig.setdefault(root, width) != width:
            raise DivisionError(
                f"cannot divide module {name!r}: tracing coupled it to layers of a different width "
                f"({width} vs {orig[root]}); the model's data flow is not supported"
            )

    for rec in mixing:
        m = rec.module
        out = m.out_channels if isinstance(m, _CONV) else m.out_features
        note_width(rec.node, out, rec.name)
        if rec.is_output:
            fixed.add(uf.find(rec.node))
    for rec in mixing:
        m = rec.module
        if not isinstance(m, _CONV) or m.groups == 1 or _is_depthwise(m):
            continue
        g = m.groups
        if divide_groups:
            if g % s:
                raise DivisionError(
                    f"cannot divide the groups of {rec.name!r} ({type(m).__name__}, groups={g}) by num_splits={s}; "
                    "use divide_groups=False to divide its width instead"
                )
            g //= s
        for node in (rec.node, rec.in_node):
            if node is None:
                continue
            root = uf.find(node)
            mult[root] = _lcm(mult.get(root, multiple), g)
            if divide_groups:
                group_div.add(root)
    for rec in records.values():
        if isinstance(rec.module, nn.GroupNorm) and rec.in_node is not None:
            root = uf.find(rec.in_node)
            mult[root] = _lcm(mult.get(root, multiple), rec.module.num_groups)

    def new_width(node: int | None, own: int, a: float) -> int:
        if node is None:  # not traced to a class (after a concatenation, a flatten): an estimate only
            return max(1, round(own * a))
        root = uf.find(node)
        if root in fixed:
            return own  # the input's channels or the model's outputs
        c = orig[root]
        if root in group_div:
            return c // s
        return round_to_multiple(c * a, mult.get(root, multiple))

    def estimate_params(a: float) -> int:
        """The divided model's parameter count for width multiplier ``a`` (exact for traced widths)."""
        total = 0
        for rec in records.values():
            m = rec.module
            if isinstance(m, _CONV):
                cin = new_width(rec.in_node, m.in_channels, a)
                if _is_depthwise(m):
                    groups, out = cin, cin * (m.out_channels // m.in_channels)
                else:
                    groups = m.groups // s if (divide_groups and m.groups > 1) else m.groups
                    out = new_width(rec.node, m.out_channels, a)
                total += out * (cin // groups) * math.prod(m.kernel_size) + (out if m.bias is not None else 0)
            elif isinstance(m, nn.Linear):
                cin, out = new_width(rec.in_node, m.in_features, a), new_width(rec.node, m.out_features, a)
                total += out * cin + (out if m.bias is not None else 0)
            else:
                feats = (
                    m.num_channels
                    if isinstance(m, nn.GroupNorm)
                    else (m.normalized_shape[-1] if isinstance(m, nn.LayerNorm) else m.num_features)
                )
                rest = count_parameters(m) // max(feats, 1)  # parameters per feature (0, 1 or 2)
                total += rest * new_width(rec.in_node, feats, a)
        return total + sum(
            p.numel() for mod in model.modules() if isinstance(mod, nn.PReLU) for p in mod.parameters(recurse=False)
        )

    if width_multiplier == "sqrt":
        alpha = 1.0 / math.sqrt(s)
    elif width_multiplier == "match":
        target = count_parameters(model) / s
        lo, hi = 1.0 / s, 1.0
        while estimate_params(hi) < target and hi < 64:
            hi *= 2
        candidates = {lo: estimate_params(lo), hi: estimate_params(hi)}
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            candidates[mid] = estimate_params(mid)
            if candidates[mid] < target:
                lo = mid
            else:
                hi = mid
        alpha = min(candidates, key=lambda a: (abs(candidates[a] - target), -a))
    else:
        alpha = float(width_multiplier)

    # --- 3. rebuild: placeholders build each layer from the input it receives ---------------------------------
    template = copy.deepcopy(model)
    placeholders: dict[int, _Placeholder] = {}
    traced_by_name = {rec.name: rec for rec in records.values()}

    def make(name: str, module: nn.Module) -> nn.Module:
        rec = traced_by_name[name]
        if isinstance(module, _CONV):
            if _is_depthwise(module):
                return _Placeholder(name, module, None, "depthwise")
            groups = module.groups // s if (divide_groups and module.groups > 1) else module.groups
            return _Placeholder(name, module, new_width(rec.node, module.out_channels, alpha), groups)
        if isinstance(module, nn.Linear):
            return _Placeholder(name, module, new_width(rec.node, module.out_features, alpha), None)
        return _Placeholder(name, module, None, None, feature_dim=rec.in_channels_dim)

    def predicate(name: str, module: nn.Module) -> bool:
        return isinstance(module, (*_MIXING, *_NORMS)) and name in traced_by_name

    replace_modules(template, predicate, lambda n, m: placeholders.setdefault(id(m), make(n, m)))
    was_training = template.training
    template.eval()
    last: list[str] = ["<before the first layer>"]

    def note(module: nn.Module, args: tuple) -> None:
        last[0] = module.name

    hooks = [p.register_forward_pre_hook(note) for p in placeholders.values()]
    try:
        with torch.no_grad():
            output = template(example_input) if not isinstance(example_input, tuple) else template(*example_input)
    except DivisionError:
        raise
    except Exception as err:
        raise DivisionError(
            f"the divided model failed its verification forward pass after module {last[0]!r}: "
            f"{type(err).__name__}: {err}"
        ) from err
    finally:
        for h in hooks:
            h.remove()
    ref_shapes = [tuple(t.shape) for t in _tensors(reference_output)]
    new_shapes = [tuple(t.shape) for t in _tensors(output)]
    if ref_shapes != new_shapes:
        raise DivisionError(f"the divided model's output shapes {new_shapes} differ from the original's {ref_shapes}")

    def unwrap(name: str, module: nn.Module) -> nn.Module:
        if module.built is None:  # pragma: no cover - every traced layer ran in the verification pass
            raise DivisionError(f"cannot divide module {name!r}: it was not executed by the verification pass")
        return module.built

    replace_modules(template, lambda n, m: isinstance(m, _Placeholder), unwrap)
    template.train(was_training)

    members = []
    for _i in range(s):
        member = copy.deepcopy(template)
        for module in member.modules():
            if isinstance(module, (*_MIXING, *_NORMS)):
                module.reset_parameters()
        if init_fn is not None:
            member.apply(init_fn)
        members.append(member)
    if identical_init:
        state = members[0].state_dict()
        for member in members[1:]:
            member.load_state_dict(state)
    return members
