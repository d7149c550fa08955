"""Dividing an instantiated network into S narrower copies with about 1/S of its parameters each.

Zhao et al., *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*, IEEE TIP 2022
(arXiv 2011.14660); :func:`divide_module` is pycoe's generic rule (the paper uses per-architecture width
tables). It runs in named steps: check the arguments, trace one forward pass for the widths that must stay
equal (``_tracing``), plan the divided widths (:class:`_WidthPlan`), bound S by what the widths allow, choose
the multiplier :math:`\alpha`, rebuild each layer from the input it receives (:class:`_Placeholder`), check that
a member is smaller than the model, and make S members. (About 600 lines: these steps serve one function and
share its errors; the tracing itself lives in ``_tracing``.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._modules import replace_modules, tensors_in
from .._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_module,
    check_number,
    check_positive_int,
    describe,
)
from ._bisection import bisect_width, closest_width
from ._tracing import (
    CONV_TYPES,
    INPUT_NODE,
    MIXING_TYPES,
    NORM_TYPES,
    LayerRecord,
    UnionFind,
    is_depthwise,
    out_width,
    trace_channels,
)
from .width import count_parameters

__all__ = ["DivisionError", "divide_module", "round_to_multiple"]

_RESIZABLE = (*MIXING_TYPES, *NORM_TYPES)
# A member may hold up to this factor times 1/S of the model's parameters ("about 1/S"); see _check_num_splits.
_SLACK = 1.1


class DivisionError(ValueError):
    """Raised when a model cannot be divided; the message names the offending module."""


def round_to_multiple(value: float, multiple: int) -> int:
    """Round ``value`` to the nearest positive multiple of ``multiple`` (never below ``multiple``)."""
    m = check_positive_int("multiple", multiple)
    v = check_number("value", value)
    return max(m, math.floor(v / m + 0.5) * m)


# ------------------------------------------------------------------------------------------------------
# Steps 1-2: arguments, and the trace
# ------------------------------------------------------------------------------------------------------
def _check_arguments(
    model: Any,
    num_splits: Any,
    multiple: Any,
    divide_groups: Any,
    example_input: Any,
    width_multiplier: Any,
    identical_init: Any,
    init_fn: Any,
) -> tuple[int, int]:
    check_module("model", model)
    s = check_positive_int("num_splits", num_splits)
    m = check_positive_int("multiple", multiple)
    check_bool("divide_groups", divide_groups)
    check_bool("identical_init", identical_init)
    check_callable("init_fn", init_fn, allow_none=True, expected="module -> None")
    if isinstance(width_multiplier, str):
        check_choice("width_multiplier", width_multiplier, ("match", "sqrt"))
    else:
        want = "'match', 'sqrt' or a number in (0, 1)"
        if check_number("width_multiplier", width_multiplier, minimum=0, strict=True, expected=want) >= 1:
            raise ValueError(
                f"width_multiplier must be {want} (a multiplier >= 1 does not make the members narrower), got "
                f"{width_multiplier!r}"
            )
    if example_input is not None and not tensors_in(example_input):
        raise TypeError(
            "example_input must be a tensor or a tuple of positional inputs holding at least one tensor, "
            f"got {describe(example_input)}"
        )
    return s, m


def _refuse_unsupported(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _RESIZABLE) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
            continue
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            continue
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) or any(True for _ in module.parameters(recurse=False)):
            raise DivisionError(
                f"cannot divide module {name or '<root>'!r} ({type(module).__name__}): it holds parameters and is "
                "not a layer divide_module knows how to resize (Conv1d/2d/3d, Linear, BatchNorm, InstanceNorm, "
                "GroupNorm, LayerNorm, single-parameter PReLU); divide the model with divide_by_factory instead"
            )


def _default_example(model: nn.Module) -> Tensor:
    first = next((m for m in model.modules() if isinstance(m, MIXING_TYPES)), None)
    if isinstance(first, nn.Conv2d):
        param = first.weight
        return torch.randn(1, first.in_channels, 64, 64, device=param.device, dtype=param.dtype)
    raise DivisionError(
        "example_input is required: the default (a 1x3x64x64 image batch) is only used for models whose first "
        f"layer is an nn.Conv2d, but this model's first layer is {type(first).__name__ if first else 'missing'}"
    )


def _trace(model: nn.Module, example_input: Any) -> tuple[list[LayerRecord], UnionFind, Any]:
    """Trace a copy of ``model``: one record per resizable layer, the equal-width classes, the output."""
    traced = copy.deepcopy(model).eval()
    uf = UnionFind()
    uf.add()  # INPUT_NODE
    records: dict[int, LayerRecord] = {}
    for name, module in traced.named_modules(remove_duplicate=False):
        if isinstance(module, _RESIZABLE) and id(module) not in records:
            records[id(module)] = LayerRecord(name=name, module=module)
    try:
        output = trace_channels(traced, example_input, records, uf)
    except Exception as err:
        raise DivisionError(f"the model failed on example_input during tracing: {type(err).__name__}: {err}") from err
    for rec in records.values():
        if not rec.executed:
            raise DivisionError(
                f"cannot divide module {rec.name!r} ({type(rec.module).__name__}): example_input never reaches it "
                "(pass an example_input that exercises every layer, or remove unused layers)"
            )
    return list(records.values()), uf, output


# ------------------------------------------------------------------------------------------------------
# Steps 3-4: the width of every equal-width class, the bound on S, and the multiplier alpha
# ------------------------------------------------------------------------------------------------------
def _norm_features(norm: nn.Module) -> int:
    if isinstance(norm, nn.GroupNorm):
        return int(norm.num_channels)
    if isinstance(norm, nn.LayerNorm):
        return int(norm.normalized_shape[-1])
    if isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return norm.num_features
    raise TypeError(f"expected a normalisation layer, got {type(norm).__name__}")


class _WidthPlan:
    """The classes of widths that must stay equal, and the width each gets for a multiplier ``alpha``.

    A class is a union-find root. Kept at their width: the input's class and the classes of output layers
    (``fixed``). Grouped convolutions and ``GroupNorm`` need a class's width to be a multiple of their groups
    (``required``, the least common multiple) and raise its rounding multiple to a common multiple with them
    (``multiple_of``); with ``divide_groups`` their classes get exactly c / S (``group_divided``). A divided width
    is never larger than the original: where the rounding multiple exceeds the width, only ``required`` is kept.
    """

    def __init__(
        self, records: list[LayerRecord], uf: UnionFind, num_splits: int, multiple: int, divide_groups: bool
    ) -> None:
        self.records, self.uf, self.num_splits = records, uf, num_splits
        self.multiple, self.divide_groups = multiple, divide_groups
        self.mixing = [r for r in records if isinstance(r.module, MIXING_TYPES)]
        for rec in self.mixing:  # a depthwise conv's output channels are its input channels
            m = rec.module
            if is_depthwise(m) and m.out_channels == m.in_channels and rec.node is not None and rec.in_node is not None:
                uf.union(rec.node, rec.in_node)
        root = uf.find(INPUT_NODE)
        self.width: dict[int, int] = {root: -1}  # class -> its original width c
        self.fixed: set[int] = {root}
        self.multiple_of: dict[int, int] = {}
        self.required: dict[int, int] = {}
        self.group_divided: set[int] = set()
        for rec in self.mixing:
            self._note_width(rec)
        for rec in self.mixing:
            self._note_groups(rec)
        for rec in records:
            if isinstance(rec.module, nn.GroupNorm) and rec.in_node is not None:
                self._raise_multiple(rec.in_node, int(rec.module.num_groups))

    def _note_width(self, rec: LayerRecord) -> None:
        assert rec.node is not None  # every executed mixing layer has an output node
        root, width = self.uf.find(rec.node), out_width(rec.module)
        if rec.is_output:
            self.fixed.add(root)
        if root != self.uf.find(INPUT_NODE) and self.width.setdefault(root, width) != width:
            raise DivisionError(
                f"cannot divide module {rec.name!r}: tracing coupled it to layers of a different width "
                f"({width} vs {self.width[root]}); the model's data flow is not supported"
            )

    def _raise_multiple(self, node: int, groups: int) -> None:
        root = self.uf.find(node)
        self.multiple_of[root] = math.lcm(self.multiple_of.get(root, self.multiple), groups)
        self.required[root] = math.lcm(self.required.get(root, 1), groups)

    def _note_groups(self, rec: LayerRecord) -> None:
        m = rec.module
        if not isinstance(m, CONV_TYPES) or m.groups == 1 or is_depthwise(m):
            return
        groups = self.conv_groups(rec)
        if self.divide_groups and m.groups % self.num_splits:
            raise DivisionError(
                f"cannot divide the groups of {rec.name!r} ({type(m).__name__}, groups={m.groups}) by "
                f"num_splits={self.num_splits}; use divide_groups=False to divide its width instead"
            )
        for node in (rec.node, rec.in_node):
            if node is not None:
                self._raise_multiple(node, groups)
                if self.divide_groups:
                    self.group_divided.add(self.uf.find(node))

    def conv_groups(self, rec: LayerRecord) -> int:
        """The divided groups of a non-depthwise convolution."""
        assert isinstance(rec.module, CONV_TYPES)
        groups = rec.module.groups
        return groups // self.num_splits if (self.divide_groups and groups > 1) else groups

    def new_width(self, node: int | None, own: int, alpha: float) -> int:
        """The divided width c' of a layer's channels in class ``node`` (``own``: the layer's width c)."""
        if node is None:  # not traced to a class (after a concatenation, a flatten): an estimate only
            return max(1, round(own * alpha))
        root = self.uf.find(node)
        if root in self.fixed:
            return own  # the input's channels or the model's outputs
        c = self.width[root]
        if root in self.group_divided:
            return c // self.num_splits
        multiple = self.multiple_of.get(root, self.multiple)
        if multiple > c:  # e.g. a width of 12 under GroupNorm(3, 12) and multiple=8: round to 3, not to 24
            multiple = self.required.get(root, 1)
        return min(c, round_to_multiple(c * alpha, multiple))

    def estimate_params(self, alpha: float) -> int:
        """The divided model's parameter count for multiplier ``alpha`` (exact for traced widths)."""
        total = 0
        for rec in self.records:
            m = rec.module
            if isinstance(m, CONV_TYPES):
                cin = self.new_width(rec.in_node, m.in_channels, alpha)
                if is_depthwise(m):
                    groups, out = cin, cin * (m.out_channels // m.in_channels)
                else:
                    groups, out = self.conv_groups(rec), self.new_width(rec.node, m.out_channels, alpha)
                total += out * (cin // groups) * math.prod(m.kernel_size) + (out if m.bias is not None else 0)
            elif isinstance(m, nn.Linear):
                cin = self.new_width(rec.in_node, m.in_features, alpha)
                out = self.new_width(rec.node, m.out_features, alpha)
                total += out * cin + (out if m.bias is not None else 0)
            else:
                feats = _norm_features(m)
                per_feature = count_parameters(m) // max(feats, 1)  # 0, 1 or 2
                total += per_feature * self.new_width(rec.in_node, feats, alpha)
        return total

    def choose_multiplier(self, width_multiplier: float | str, target: float, constant: int) -> float:
        """alpha: ``1/sqrt(S)``, a given number, or (``"match"``) the one whose count is closest to ``target``."""
        if width_multiplier == "sqrt":
            return 1.0 / math.sqrt(self.num_splits)
        if width_multiplier != "match":
            return float(width_multiplier)
        evaluated = bisect_width(
            lambda a: self.estimate_params(a) + constant, target, 1.0 / self.num_splits, 1.0, max_iter=30, max_expand=6
        )
        return closest_width(evaluated, target)


def _split_limit(plan: _WidthPlan, total: int, constant: int) -> tuple[int, int]:
    """The most splits the widths allow, and the parameter count of the narrowest member (see below)."""
    narrowest = plan.estimate_params(0.0) + constant  # every divided width at its rounding multiple
    return math.floor(_SLACK * total / max(narrowest, 1)), narrowest


def _check_num_splits(plan: _WidthPlan, total: int, constant: int) -> None:
    """Refuse more splits than the widths allow (before any member is built).

    The narrowest member the widths allow has every divided width at its rounding multiple (``plan``'s widths
    for a multiplier of 0). S members of about 1/S of the ``total`` parameters need that member to hold at most
    ``_SLACK / S`` of them, so S may be at most ``floor(_SLACK * total / narrowest)``.
    """
    s = plan.num_splits
    limit, narrowest = _split_limit(plan, total, constant)
    if s <= limit:
        return
    fine = limit
    if plan.multiple > 1:  # what rounding to multiples of 1 (groups permitting) would allow
        fine, _ = _split_limit(_WidthPlan(plan.records, plan.uf, s, 1, plan.divide_groups), total, constant)
    if limit >= 2:
        advice = f"use num_splits <= {limit}" + (f" (<= {fine} with multiple=1)" if fine > limit else "")
    elif fine >= 2:
        advice = f"with multiple=1, num_splits <= {fine} would work"
    else:
        advice = "its widths are too narrow to divide (or fixed by the groups of GroupNorm / grouped convolutions)"
    raise DivisionError(
        f"num_splits={s} is more than this model's widths allow: the narrowest member they allow (every divided "
        f"width at its rounding multiple, multiple={plan.multiple}, raised where grouped convolutions or GroupNorm "
        f"need it) has {narrowest:,} of the model's {total:,} parameters, more than 1/{s} of them (with "
        f"{round(100 * (_SLACK - 1))}% slack); {advice}"
    )


def _check_member(member: nn.Module, total: int, alpha: float) -> None:
    """Refuse a division whose members are not smaller than the original model."""
    params = count_parameters(member)
    if params >= total:
        raise DivisionError(
            f"the divided members would not be smaller than the model: {params:,} parameters each against the "
            f"model's {total:,} (width multiplier {alpha:.3g}; widths at the rounding multiple cannot shrink); "
            "use a smaller width_multiplier or multiple"
        )


# ------------------------------------------------------------------------------------------------------
# Step 5: rebuild each layer from the input it receives
# ------------------------------------------------------------------------------------------------------
class _Placeholder(nn.Module):
    """Stands for a layer of the divided model; builds it from the first input it sees.

    ``groups=None`` marks a depthwise convolution (its groups follow its input channels).
    """

    def __init__(
        self, name: str, original: nn.Module, out_width: int | None, groups: int | None, feature_dim: int | None
    ) -> None:
        super().__init__()
        self.name = name
        self.original = [original]  # a list: not registered as a submodule
        self.out_width = out_width
        self.groups = groups
        self.feature_dim = feature_dim  # norms: the input dim holding the features
        self.built: nn.Module | None = None

    def _conv(self, m: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        cin = int(x.shape[1])
        if self.groups is None:  # depthwise
            groups, out = cin, cin * (m.out_channels // m.in_channels)
        else:
            groups, out = self.groups, int(self.out_width or 0)
        if cin % groups or out % groups:
            raise DivisionError(
                f"cannot divide {self.name!r} ({type(m).__name__}, groups={m.groups}): its divided input/output "
                f"channels {cin}/{out} are not divisible by groups={groups}"
            )
        kwargs = {
            "kernel_size": m.kernel_size,
            "stride": m.stride,
            "padding": m.padding,
            "dilation": m.dilation,
            "groups": groups,
            "bias": m.bias is not None,
            "padding_mode": m.padding_mode,
        }
        return (cin, out), kwargs

    def _norm(self, m: nn.Module, x: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if isinstance(m, nn.GroupNorm):
            c = int(x.shape[1])
            if c % m.num_groups:
                raise DivisionError(
                    f"cannot divide {self.name!r} (GroupNorm, num_groups={m.num_groups}): the divided width {c} is "
                    "not divisible by num_groups"
                )
            return (m.num_groups, c), {"eps": m.eps, "affine": m.affine}
        if isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            dim = x.dim() - 1 if self.feature_dim is None else self.feature_dim
            shape = (int(x.shape[dim]),) if k == 1 else tuple(int(d) for d in x.shape[-k:])
            kwargs: dict[str, Any] = {"eps": m.eps, "elementwise_affine": m.elementwise_affine}
            if m.elementwise_affine:
                kwargs["bias"] = m.bias is not None
            return (shape,), kwargs
        # batch / instance norms
        kwargs = {
            "eps": m.eps,
            "momentum": m.momentum,
            "affine": m.affine,
            "track_running_stats": m.track_running_stats,
        }
        return (int(x.shape[1]),), kwargs

    def _build(self, x: Tensor) -> nn.Module:
        m = self.original[0]
        ref = next(iter(m.parameters()), None)
        factory_kwargs = {
            "device": ref.device if ref is not None else x.device,
            "dtype": ref.dtype if ref is not None else x.dtype,
        }
        if isinstance(m, CONV_TYPES):
            args, kwargs = self._conv(m, x)
        elif isinstance(m, nn.Linear):
            args, kwargs = (int(x.shape[-1]), int(self.out_width or 0)), {"bias": m.bias is not None}
        else:
            args, kwargs = self._norm(m, x)
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
            self.built = self._build(tensors_in((args, kwargs))[0])
        return self.built(*args, **kwargs)


def _placeholder(plan: _WidthPlan, rec: LayerRecord, module: nn.Module, alpha: float) -> _Placeholder:
    if isinstance(module, CONV_TYPES):
        if is_depthwise(module):
            return _Placeholder(rec.name, module, None, None, None)
        return _Placeholder(
            rec.name, module, plan.new_width(rec.node, module.out_channels, alpha), plan.conv_groups(rec), None
        )
    if isinstance(module, nn.Linear):
        return _Placeholder(rec.name, module, plan.new_width(rec.node, module.out_features, alpha), None, None)
    return _Placeholder(rec.name, module, None, None, rec.in_channels_dim)


def _rebuild(model: nn.Module, plan: _WidthPlan, alpha: float, example_input: Any, reference_output: Any) -> nn.Module:
    """A copy of ``model`` with every traced layer rebuilt at its divided width, checked by one forward pass."""
    template = copy.deepcopy(model)
    by_name = {rec.name: rec for rec in plan.records}
    placeholders: list[_Placeholder] = []

    def make(name: str, module: nn.Module) -> nn.Module:
        placeholders.append(_placeholder(plan, by_name[name], module, alpha))
        return placeholders[-1]

    replace_modules(template, lambda n, m: isinstance(m, _RESIZABLE) and n in by_name, make)
    was_training = template.training
    template.eval()
    last = ["<before the first layer>"]
    hooks = [p.register_forward_pre_hook(lambda m, args, p=p: last.__setitem__(0, p.name)) for p in placeholders]
    try:
        with torch.no_grad():
            output = template(*example_input) if isinstance(example_input, tuple) else template(example_input)
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
    ref_shapes = [tuple(t.shape) for t in tensors_in(reference_output)]
    new_shapes = [tuple(t.shape) for t in tensors_in(output)]
    if ref_shapes != new_shapes:
        raise DivisionError(f"the divided model's output shapes {new_shapes} differ from the original's {ref_shapes}")

    def unwrap(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, _Placeholder) and module.built is not None  # every traced layer ran above
        return module.built

    replace_modules(template, lambda n, m: isinstance(m, _Placeholder), unwrap)
    template.train(was_training)
    return template


# ------------------------------------------------------------------------------------------------------
# Step 6: S freshly initialised members
# ------------------------------------------------------------------------------------------------------
def _members(
    template: nn.Module, num_splits: int, init_fn: Callable[[nn.Module], None] | None, identical_init: bool
) -> list[nn.Module]:
    members = []
    for _ in range(num_splits):
        member = copy.deepcopy(template)
        for module in member.modules():
            if isinstance(module, _RESIZABLE):
                module.reset_parameters()
        if init_fn is not None:
            member.apply(init_fn)
        members.append(member)
    if identical_init:
        state = members[0].state_dict()
        for member in members[1:]:
            member.load_state_dict(state)
    return members


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

    .. math:: c' = \min\big(c,\; \operatorname{round\_to\_multiple}(c \cdot \alpha,\; m)\big),
        \qquad \alpha \approx 1/\sqrt{S},

    where by default :math:`\alpha` is chosen (by bisection) so that the divided model's parameter count is
    closest to the original's divided by S, and :math:`m` = ``multiple`` (raised to the least common
    multiple with the groups of any grouped convolution or ``GroupNorm`` that must divide that width; where that
    exceeds :math:`c`, only the groups' multiple is kept), so that no width grows, except

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
    (see :func:`~pycoe.cotrain.scale_dropout_modules`). ``S = 1`` returns ``[copy.deepcopy(model)]``.

    **What the widths allow.** Widths at their rounding multiple cannot shrink, so a member cannot be smaller
    than the *narrowest* one, with every divided width at its rounding multiple (:math:`P_{\min}` parameters,
    counted from the trace before any member is built). Of a model with :math:`P` parameters, S members of about
    :math:`P / S` each need :math:`P_{\min} \le 1.1\, P / S`, so ``num_splits`` may be at most
    :math:`\lfloor 1.1\, P / P_{\min} \rfloor`; a larger S raises :class:`DivisionError` (naming the limit,
    and the one ``multiple=1`` would allow), as does a division whose members would not be smaller than the
    model (an explicit ``width_multiplier`` whose widths round back to the original's).

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
            a number in (0, 1) sets it.
        identical_init: give all S copies the same initial weights (an option of the authors' code).
        init_fn: called as ``member.apply(init_fn)`` on each divided copy after its default initialisation.

    Returns:
        S ``nn.Module``: deep copies of ``model`` with the rebuilt layers, in ``model``'s training mode.

    Raises:
        TypeError: an argument of the wrong type (``model`` not an ``nn.Module``, a non-integer
            ``num_splits``/``multiple``, a non-bool flag, a non-numeric ``width_multiplier``, an
            ``example_input`` without a tensor, a non-callable ``init_fn``).
        ValueError: ``num_splits``/``multiple`` < 1, or a ``width_multiplier`` that is not ``"match"``,
            ``"sqrt"`` or a number in (0, 1).
        DivisionError: (a ``ValueError``) naming the module that cannot be divided: an unsupported
            parametrised layer, a layer the example input does not reach, groups that do not divide the new
            width, or a divided model that fails its verification forward pass; or more splits than the widths
            allow, or members that would not be smaller than the model (see above).
    """
    s, multiple = _check_arguments(
        model, num_splits, multiple, divide_groups, example_input, width_multiplier, identical_init, init_fn
    )
    if s == 1:
        return [copy.deepcopy(model)]
    _refuse_unsupported(model)
    if example_input is None:
        example_input = _default_example(model)
    records, uf, reference_output = _trace(model, example_input)
    plan = _WidthPlan(records, uf, s, multiple, divide_groups)
    prelu = sum(p.numel() for m in model.modules() if isinstance(m, nn.PReLU) for p in m.parameters(recurse=False))
    total = count_parameters(model)
    _check_num_splits(plan, total, prelu)
    alpha = plan.choose_multiplier(width_multiplier, total / s, prelu)
    template = _rebuild(model, plan, alpha, example_input, reference_output)
    _check_member(template, total, alpha)
    return _members(template, s, init_fn, identical_init)
