"""CondConv: conditionally parameterised convolution, and a helper that converts an existing model.

Yang, Bender, Le, Ngiam, "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
NeurIPS 2019, arXiv:1904.04971. Each layer holds a bank of E kernels; a router maps each sample to
coefficients :math:`\\alpha = \\sigma(\\mathrm{GAP}(x) R)` and the sample is convolved with
:math:`\\sum_e \\alpha_e W_e`. The convolution itself is :func:`pycoe.functional.mixture_conv2d`.

Einstein legend: b batch, e kernels of the bank (E), c input channels, o output channels, g groups, h/w spatial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from pycoe._modules import replace_modules
from pycoe._validation import (
    check_bool,
    check_choice,
    check_conv_padding,
    check_device,
    check_dtype,
    check_int_pair,
    check_positive_int,
    check_tensor,
)
from pycoe.functional.mixture import MIXTURE_STRATEGIES, mixture_conv2d

__all__ = ["CondConvRouter", "CondConv2d", "convert_conv2d_to_condconv"]

# How CondConvRouter turns its logits into routing weights: the paper's sigmoid, or pycoe's sum-normalised sigmoid.
_NORMALIZATIONS = ("sigmoid", "normalized_sigmoid")


def _check_strategy(strategy: Any) -> str:
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str, got {type(strategy).__name__}")
    return check_choice("strategy", strategy, MIXTURE_STRATEGIES)


def _check_normalization(normalization: Any) -> str:
    if not isinstance(normalization, str):
        raise TypeError(f"normalization must be a str, got {type(normalization).__name__}")
    return check_choice("normalization", normalization, _NORMALIZATIONS)


def _explain_input(x: Any, in_channels: int, dtype: torch.dtype, device: torch.device, owner: str) -> None:
    """Raise the error that says why ``x`` is not a valid input of a layer with these channels, dtype, device."""
    check_tensor("x", x, ndim=4)
    if x.shape[1] != in_channels:
        raise ValueError(f"x must have {in_channels} channels (shape [B, C, H, W]), got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"x must have the dtype of the {owner}'s parameters ({dtype}), got {x.dtype}")
    raise ValueError(f"x must be on the device of the {owner}'s parameters ({device}), got {x.device}")


def _check_input(x: Any, in_channels: int, weight: torch.Tensor, owner: str) -> None:
    """O(1) checks of a layer's input (every call); the slow path explains a failure."""
    if (
        not isinstance(x, torch.Tensor)
        or x.dim() != 4
        or x.shape[1] != in_channels
        or x.dtype != weight.dtype
        or x.device != weight.device
    ):
        _explain_input(x, in_channels, weight.dtype, weight.device, owner)


class CondConvRouter(nn.Module):
    """The CondConv routing function: global average pool, Linear, sigmoid.

    ``routing_weights = sigmoid(Linear(mean_{h,w} x))``, as in the CondConv paper (sigmoid, not softmax: the
    weights are not normalised). One router can serve several :class:`CondConv2d` layers: either call it
    once on a block's input and pass the result to each layer as ``routing_weights`` (the paper computes
    the routing weights once per block and shares them between the block's convolutions), or hand the same
    router module to several layers with ``router=`` (shared parameters, each layer routes on its own input).

    Args:
        in_channels: C, channels of the input it routes on.
        num_kernels: E, the kernels of the layers it routes.
        normalization: how the logits become routing weights: ``"sigmoid"`` (default, the paper's: each in
            (0, 1), not normalised) or ``"normalized_sigmoid"`` (pycoe's option: the sigmoids divided by their
            sum, so that each sample's weights sum to 1; used by :func:`convert_conv2d_to_condconv` to keep a
            converted model's outputs unchanged). The word is BasisNet's for the same step (coefficients from
            logits).
        bias: whether the Linear layer has a bias.
        device, dtype: factory arguments of the parameters (``dtype`` floating point).

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> Tensor[B, E].
    """

    def __init__(
        self,
        in_channels: int,
        num_kernels: int,
        normalization: str = "sigmoid",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_kernels = check_positive_int("num_kernels", num_kernels)
        self.normalization = _check_normalization(normalization)
        check_bool("bias", bias)
        check_device("device", device)
        check_dtype("dtype", dtype)
        self.fc = nn.Linear(in_channels, num_kernels, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[B, C, H, W] -> routing weights Tensor[B, E]."""
        _check_input(x, self.in_channels, self.fc.weight, "router")
        if x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"x must have a non-empty spatial size to be pooled, got shape {tuple(x.shape)}")
        weights = torch.sigmoid(self.fc(x.mean(dim=(2, 3))))
        if self.normalization == "normalized_sigmoid":
            weights = weights / weights.sum(dim=1, keepdim=True)
        return weights

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_kernels={self.num_kernels}, normalization={self.normalization!r}"


class CondConv2d(nn.Module):
    """A conditionally parameterised 2-D convolution (CondConv).

    Holds a bank of E kernels of an ``nn.Conv2d`` kernel's shape (and E biases). Sample ``b`` is convolved with
    ``sum_e routing_weights[b, e] * weight[e]`` (and the biases are mixed the same way), computed by
    :func:`pycoe.functional.mixture_conv2d`.

    Args:
        in_channels: C.
        out_channels: O.
        kernel_size: int or (kh, kw).
        stride, padding, dilation, groups: as for ``nn.Conv2d``; ``padding`` may also be ``"same"`` (TensorFlow
            rule, strided convolutions included) or ``"valid"``. Only zero padding.
        bias: whether each kernel has a bias.
        num_kernels: E >= 1, the kernels of the bank.
        router: what computes the routing weights when :meth:`forward` is not given them. ``True`` (default):
            the layer builds its own :class:`CondConvRouter` (GAP, Linear, sigmoid) on its input; ``False``: no
            router, ``routing_weights`` must be given to :meth:`forward`; an ``nn.Module`` mapping ``x`` to
            Tensor[B, E]: that module (it may be shared with other layers; its parameters are then shared too).
            :func:`convert_conv2d_to_condconv` gives ``True`` and ``False`` the same meaning.
        strategy: ``"auto"``, ``"weight"``, ``"bmm"`` or ``"output"``, passed to
            :func:`~pycoe.functional.mixture_conv2d`.
        device, dtype: factory arguments of the parameters (``dtype`` floating point).

    Attributes:
        weight: Parameter Tensor[E, O, C/groups, kh, kw].
        bias: Parameter Tensor[E, O] or None.
        router: the router module, or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_kernels: int = 4,
        router: bool | nn.Module = True,
        strategy: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.groups = check_positive_int("groups", groups)
        self.num_kernels = check_positive_int("num_kernels", num_kernels)
        if in_channels % groups != 0:
            raise ValueError(f"in_channels={in_channels} must be divisible by groups={groups}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels={out_channels} must be divisible by groups={groups}")
        self.kernel_size = check_int_pair("kernel_size", kernel_size, minimum=1)
        self.stride = check_int_pair("stride", stride, minimum=1)
        self.dilation = check_int_pair("dilation", dilation, minimum=1)
        self.padding = check_conv_padding("padding", padding)
        self.strategy = _check_strategy(strategy)
        check_bool("bias", bias)
        check_device("device", device)
        check_dtype("dtype", dtype)
        shape = (num_kernels, out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, device=device, dtype=dtype)) if bias else None
        self.router: nn.Module | None
        if router is True:
            self.router = CondConvRouter(in_channels, num_kernels, device=device, dtype=dtype)
            self._router_kind = "own"
        elif router is False:
            self.router = None
            self._router_kind = "none"
        elif isinstance(router, nn.Module):
            self.router = router
            self._router_kind = "given"
        else:
            raise TypeError(f"router must be True, False or an nn.Module, got {router!r}")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every kernel independently, exactly as ``nn.Conv2d`` initialises its kernel and bias.

        Kernel: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias:
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with ``fan_in = C/groups * kh * kw``. The layer's own router is reset
        too (a router given as a module is left alone).
        """
        with torch.no_grad():
            for e in range(self.num_kernels):
                nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
            if self.bias is not None:
                fan_in = self.weight[0][0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                for e in range(self.num_kernels):
                    nn.init.uniform_(self.bias[e], -bound, bound)
        if self._router_kind == "own" and isinstance(self.router, CondConvRouter):
            self.router.fc.reset_parameters()

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve each sample with its mixture of the bank's kernels.

        Args:
            x: Tensor[B, C, H, W] of the layer's dtype and device (``B = 0`` gives an empty batch).
            routing_weights: Tensor[B, E], or None to compute them with the layer's router.

        Returns:
            Tensor[B, O, H', W'].
        """
        weight = self.weight
        # Before the router, so that a wrong input is reported as the layer's, not the router's.
        _check_input(x, self.in_channels, weight, "layer")
        given = routing_weights is not None
        if routing_weights is None:
            if self.router is None:
                raise ValueError("routing_weights must be given: this CondConv2d was built with router=False")
            routing_weights = self.router(x)
        if (
            not isinstance(routing_weights, torch.Tensor)
            or routing_weights.dim() != 2
            or routing_weights.shape[0] != x.shape[0]
            or routing_weights.shape[1] != self.num_kernels
            or routing_weights.dtype != weight.dtype
            or routing_weights.device != weight.device
        ):
            self._explain_routing_weights(x, routing_weights, given)
        return mixture_conv2d(
            x,
            weight,
            routing_weights,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.strategy,
            validate_args=False,  # the configuration was checked at construction, the inputs just above
        )

    def _explain_routing_weights(self, x: torch.Tensor, routing_weights: Any, given: bool) -> None:
        name = "routing_weights" if given else f"the output of the router ({type(self.router).__name__})"
        if not isinstance(routing_weights, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(routing_weights).__name__}")
        if routing_weights.dim() != 2 or tuple(routing_weights.shape) != (x.shape[0], self.num_kernels):
            raise ValueError(
                f"{name} must have shape [B, E] = [{x.shape[0]}, {self.num_kernels}], "
                f"got {tuple(routing_weights.shape)}"
            )
        if routing_weights.dtype != self.weight.dtype:
            raise TypeError(f"{name} must have the layer's dtype {self.weight.dtype}, got {routing_weights.dtype}")
        raise ValueError(f"{name} must be on the layer's device {self.weight.device}, got {routing_weights.device}")

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", num_kernels={self.num_kernels}, router={self._router_kind}, strategy={self.strategy!r}"


def _is_convertible(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and module.padding_mode == "zeros"


def convert_conv2d_to_condconv(
    model: nn.Module,
    num_kernels: int = 4,
    predicate: Callable[[str, nn.Module], bool] | Collection[str] | None = None,
    *,
    normalization: str = "normalized_sigmoid",
    strategy: str = "auto",
    router: bool = True,
) -> list[str]:
    """Replace chosen ``nn.Conv2d`` layers of ``model``, in place, by :class:`CondConv2d` layers.

    Every kernel of a new layer's bank starts as the pretrained kernel (and bias), and each new layer gets its
    own :class:`CondConvRouter` on its input, so that right after conversion the model computes the same
    function (up to float rounding). That needs the coefficients of each sample to sum to a constant; two ways:

    * ``normalization="normalized_sigmoid"`` (default, pycoe's choice): the router's sigmoids are divided by
      their sum, so the coefficients sum to 1 for any router parameters. The router keeps its random
      ``nn.Linear`` init, so the coefficients differ between samples and kernels, and the identical kernels
      receive different gradients from the first step on: they can specialise.
    * ``normalization="sigmoid"``: the paper's unnormalised sigmoid router. A sigmoid router gives a constant
      sum only if it is constant, so its Linear layer is zero-initialised (every coefficient is
      sigmoid(0) = 1/2) and each kernel is the pretrained kernel (and bias) scaled by ``2 / E``. Caveat:
      identical kernels under a constant router receive identical gradients and the router's rows too, so
      nothing ever breaks the symmetry by itself: the layer keeps behaving like one convolution unless the
      user perturbs the kernels or the router (which changes the outputs).

    Args:
        model: the model to edit in place.
        num_kernels: E >= 1, the kernels of each new layer's bank.
        predicate: ``(qualified_name, conv) -> bool`` choosing among the convertible convolutions (plain
            ``nn.Conv2d`` with ``padding_mode="zeros"``; subclasses are never touched), or a collection of
            qualified names (each must name a convertible convolution). Default: every convertible
            convolution except the first one in ``named_modules`` order (the stem, which sees raw pixels).
        normalization: the :class:`CondConvRouter` normalization of the new routers, see above.
        strategy: ``strategy`` of the new layers.
        router: :class:`CondConv2d`'s ``router`` for the new layers, restricted to its two boolean values with
            the same meaning: ``True`` (default): each new layer gets its own router as described above.
            ``False``: the new layers have no router and every kernel is an exact copy of the pretrained kernel
            (and bias), for callers that pass ``routing_weights`` themselves; any coefficients summing to 1 then
            reproduce the original convolution. ``normalization`` must then be left at its default (it
            describes a router).

    Returns:
        The qualified names of the replaced convolutions.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    num_kernels = check_positive_int("num_kernels", num_kernels)
    normalization = _check_normalization(normalization)
    _check_strategy(strategy)
    if not isinstance(router, bool):
        raise TypeError(f"router must be True or False, got {router!r}")
    if not router and normalization != "normalized_sigmoid":
        raise ValueError(
            f"normalization={normalization!r} needs a router: with router=False leave normalization at its default"
        )
    convertible = [name for name, m in model.named_modules() if name and _is_convertible(m)]
    select: Callable[[str, nn.Module], bool]
    if predicate is None:
        chosen = set(convertible[1:])
        select = lambda name, m: name in chosen  # noqa: E731
    elif callable(predicate):
        user = predicate
        select = lambda name, m: _is_convertible(m) and bool(user(name, m))  # noqa: E731
    elif isinstance(predicate, Collection) and not isinstance(predicate, str):
        names = set(predicate)
        modules = dict(model.named_modules())
        for name in sorted(names, key=str):
            if not isinstance(name, str):
                raise TypeError(f"predicate must hold qualified names (str), got {name!r}")
            if name not in modules:
                raise ValueError(f"predicate names {name!r}, which is not a submodule of model")
            if not _is_convertible(modules[name]):
                raise ValueError(
                    f"predicate names {name!r}, which is a {type(modules[name]).__name__}, not a plain nn.Conv2d "
                    "with zero padding"
                )
        select = lambda name, m: name in names  # noqa: E731
    else:
        raise TypeError(f"predicate must be None, a callable or a collection of names, got {predicate!r}")

    def factory(name: str, conv: nn.Module) -> nn.Module:
        assert isinstance(conv, nn.Conv2d)
        device, dtype = conv.weight.device, conv.weight.dtype
        new_router: CondConvRouter | bool = False
        scale = 1.0
        if router:
            new_router = CondConvRouter(
                conv.in_channels, num_kernels, normalization=normalization, device=device, dtype=dtype
            )
            if normalization == "sigmoid":
                nn.init.zeros_(new_router.fc.weight)
                nn.init.zeros_(new_router.fc.bias)
                scale = 1.0 / (num_kernels * 0.5)  # the E coefficients sigmoid(0) = 1/2 sum to E/2
        layer = CondConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,  # int pair, or "same"/"valid"
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            num_kernels=num_kernels,
            router=new_router,
            strategy=strategy,
            device=device,
            dtype=dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight.unsqueeze(0).expand_as(layer.weight) * scale)
            if conv.bias is not None and layer.bias is not None:
                layer.bias.copy_(conv.bias.unsqueeze(0).expand_as(layer.bias) * scale)
        layer.train(conv.training)
        return layer

    return replace_modules(model, select, factory)
