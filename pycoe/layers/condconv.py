"""CondConv: conditionally parameterised convolution, and a helper that converts an existing model.

Yang, Bender, Le, Ngiam, "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
NeurIPS 2019, arXiv:1904.04971. Each layer holds E expert kernels; a router maps each sample to
coefficients :math:`\\alpha = \\sigma(\\mathrm{GAP}(x) R)` and the sample is convolved with
:math:`\\sum_e \\alpha_e W_e`. The convolution itself is :func:`pycoe.functional.mixture_conv2d`.

Einstein legend: b batch, e experts (E), c input channels, o output channels, g groups, h/w spatial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

import torch
from torch import nn

from pycoe._modules import replace_modules
from pycoe._validation import check_choice, check_positive_int, check_tensor
from pycoe.functional.mixture import (
    MIXTURE_STRATEGIES,
    _mixture_forward,
    _normalize_padding,
    _pair,
)

__all__ = ["CondConvRouter", "CondConv2d", "convert_conv2d_to_condconv"]

_NORMALIZE = (None, "sum")


class CondConvRouter(nn.Module):
    """The CondConv routing function: global average pool, Linear, sigmoid.

    ``routing_weights = sigmoid(Linear(mean_{h,w} x))``, as in the CondConv paper (sigmoid, not softmax: the
    weights are not normalised). One router can serve several :class:`CondConv2d` layers: either call it
    once on a block's input and pass the result to each layer as ``routing_weights`` (the paper computes
    the routing weights once per block and shares them between the block's convolutions), or hand the same
    router module to several layers with ``router=`` (shared parameters, each layer routes on its own input).

    Args:
        in_channels: C, channels of the input it routes on.
        num_experts: E.
        normalize: ``None`` (the paper's unnormalised sigmoid) or ``"sum"`` (pycoe's option: divide the
            sigmoids by their sum so each sample's coefficients sum to 1; used by
            :func:`convert_conv2d_to_condconv` to keep a converted model's outputs unchanged).
        bias: whether the Linear layer has a bias.
        device, dtype: factory arguments of the parameters.

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> Tensor[B, E].
    """

    def __init__(
        self,
        in_channels: int,
        num_experts: int,
        normalize: str | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_experts = check_positive_int("num_experts", num_experts)
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be None or 'sum', got {normalize!r}")
        self.normalize = normalize
        self.fc = nn.Linear(in_channels, num_experts, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[B, C, H, W] -> routing weights Tensor[B, E]."""
        check_tensor("x", x, ndim=4, floating=True)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (shape [B, C, H, W]), got {tuple(x.shape)}")
        weights = torch.sigmoid(self.fc(x.mean(dim=(2, 3))))
        if self.normalize == "sum":
            weights = weights / weights.sum(dim=1, keepdim=True)
        return weights

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_experts={self.num_experts}, normalize={self.normalize!r}"


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
        bias: whether each expert has a bias.
        num_experts: E >= 1.
        router: ``None`` or ``"own"``: build its own :class:`CondConvRouter` (GAP, Linear, sigmoid) on this
            layer's input; an ``nn.Module`` mapping ``x`` to Tensor[B, E]: use it (it may be shared with other
            layers; its parameters are then shared too); ``False``: no router, ``routing_weights`` must be
            given to :meth:`forward`.
        strategy: ``"auto"``, ``"weight"``, ``"loop"``, ``"bmm"`` or ``"output"``, passed to
            :func:`~pycoe.functional.mixture_conv2d`.
        device, dtype: factory arguments of the parameters.

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
        num_experts: int = 4,
        router: nn.Module | str | bool | None = None,
        strategy: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.groups = check_positive_int("groups", groups)
        self.num_experts = check_positive_int("num_experts", num_experts)
        if in_channels % groups != 0:
            raise ValueError(f"in_channels={in_channels} must be divisible by groups={groups}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels={out_channels} must be divisible by groups={groups}")
        self.kernel_size = _pair("kernel_size", kernel_size, minimum=1)
        self.stride = _pair("stride", stride, minimum=1)
        self.dilation = _pair("dilation", dilation, minimum=1)
        self.padding = _normalize_padding(padding)
        self.strategy = check_choice("strategy", strategy, MIXTURE_STRATEGIES)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory)) if bias else None
        if router is None or router == "own":
            self.router: nn.Module | None = CondConvRouter(in_channels, num_experts, **factory)
            self._router_kind = "own"
        elif router is False:
            self.router = None
            self._router_kind = "none"
        elif isinstance(router, nn.Module):
            self.router = router
            self._router_kind = "shared"
        else:
            raise TypeError(f"router must be None, 'own', False or an nn.Module, got {router!r}")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every expert independently, exactly as ``nn.Conv2d`` initialises its kernel and bias.

        Kernel: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias:
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with ``fan_in = C/groups * kh * kw``. An own router is reset too
        (a shared router is left alone).
        """
        with torch.no_grad():
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
            if self.bias is not None:
                fan_in = self.weight[0][0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                for e in range(self.num_experts):
                    nn.init.uniform_(self.bias[e], -bound, bound)
        if self._router_kind == "own":
            self.router.fc.reset_parameters()  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve each sample with its mixture of expert kernels.

        Args:
            x: Tensor[B, C, H, W].
            routing_weights: Tensor[B, E], or None to compute them with the layer's router.

        Returns:
            Tensor[B, O, H', W'].
        """
        # O(1) checks, ordered so that the common case costs a few attribute reads; the slow path explains.
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            check_tensor("x", x, ndim=4)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (shape [B, C, H, W]), got {tuple(x.shape)}")
        if routing_weights is None:
            if self.router is None:
                raise ValueError("routing_weights must be given: this CondConv2d was built with router=False")
            routing_weights = self.router(x)
        elif not isinstance(routing_weights, torch.Tensor):
            check_tensor("routing_weights", routing_weights)
        if routing_weights.shape != (x.shape[0], self.num_experts):
            raise ValueError(
                f"routing_weights must have shape [B, E] = [{x.shape[0]}, {self.num_experts}], "
                f"got {tuple(routing_weights.shape)}"
            )
        weight = self.weight
        if x.dtype != weight.dtype or routing_weights.dtype != weight.dtype:
            raise TypeError(
                f"x and routing_weights must have the layer's dtype {weight.dtype}, "
                f"got {x.dtype} and {routing_weights.dtype}"
            )
        return _mixture_forward(
            x, weight, routing_weights, self.bias, self.stride, self.padding, self.dilation, self.groups, self.strategy
        )

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
        return s + f", num_experts={self.num_experts}, router={self._router_kind}, strategy={self.strategy!r}"


def _is_convertible(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and module.padding_mode == "zeros"


def convert_conv2d_to_condconv(
    model: nn.Module,
    num_experts: int = 4,
    predicate: Callable[[str, nn.Module], bool] | Collection[str] | None = None,
    *,
    normalize: str | None = "sum",
    strategy: str = "auto",
    router: bool = True,
) -> list[str]:
    """Replace chosen ``nn.Conv2d`` layers of ``model``, in place, by :class:`CondConv2d` layers.

    Every expert of a new layer starts as the pretrained kernel (and bias), and each new layer gets its own
    :class:`CondConvRouter` on its input, so that right after conversion the model computes the same function
    (up to float rounding). That needs the coefficients of each sample to sum to a constant; two ways:

    * ``normalize="sum"`` (default, pycoe's choice): the router's sigmoids are divided by their sum, so the
      coefficients sum to 1 for any router parameters. The router keeps its random ``nn.Linear`` init, so the
      coefficients differ between samples and experts, and the identical experts receive different gradients
      from the first step on: they can specialise.
    * ``normalize=None``: the paper's unnormalised sigmoid router. A sigmoid router gives a constant sum only
      if it is constant, so its Linear layer is zero-initialised (every coefficient is sigmoid(0) = 1/2) and
      each expert is the pretrained kernel (and bias) scaled by ``2 / E``. Caveat: identical experts under a
      constant router receive identical gradients and the router's rows too, so nothing ever breaks the
      symmetry by itself: the layer keeps behaving like one convolution unless the user perturbs the experts
      or the router (which changes the outputs).

    Args:
        model: the model to edit in place.
        num_experts: E >= 1.
        predicate: ``(qualified_name, conv) -> bool`` choosing among the convertible convolutions (plain
            ``nn.Conv2d`` with ``padding_mode="zeros"``; subclasses are never touched), or a collection of
            qualified names (each must name a convertible convolution). Default: every convertible
            convolution except the first one in ``named_modules`` order (the stem, which sees raw pixels).
        normalize: ``"sum"`` or ``None``, see above.
        strategy: ``strategy`` of the new layers.
        router: ``True`` (default): each new layer gets its own router as described above. ``False``: the new
            layers have no router (``CondConv2d(router=False)``) and every expert is an exact copy of the
            pretrained kernel (and bias), for callers that pass ``routing_weights`` themselves; any
            coefficients summing to 1 then reproduce the original convolution. ``normalize`` must be left at
            ``"sum"`` (it describes a router).

    Returns:
        The qualified names of the replaced convolutions.
    """
    num_experts = check_positive_int("num_experts", num_experts)
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be None or 'sum', got {normalize!r}")
    check_choice("strategy", strategy, MIXTURE_STRATEGIES)
    if not isinstance(router, bool):
        raise TypeError(f"router must be True or False, got {router!r}")
    if not router and normalize != "sum":
        raise ValueError(f"normalize={normalize!r} needs a router: with router=False leave normalize at 'sum'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    convertible = [name for name, m in model.named_modules() if name and _is_convertible(m)]
    if predicate is None:
        chosen = set(convertible[1:])
        select: Callable[[str, nn.Module], bool] = lambda name, m: name in chosen  # noqa: E731
    elif callable(predicate):
        user = predicate
        select = lambda name, m: _is_convertible(m) and bool(user(name, m))  # noqa: E731
    elif isinstance(predicate, Collection) and not isinstance(predicate, str):
        names = set(predicate)
        modules = dict(model.named_modules())
        for name in sorted(names):
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
        factory_kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        new_router: CondConvRouter | bool = False
        scale = 1.0
        if router:
            new_router = CondConvRouter(conv.in_channels, num_experts, normalize=normalize, **factory_kw)
            if normalize is None:
                nn.init.zeros_(new_router.fc.weight)
                nn.init.zeros_(new_router.fc.bias)
                scale = 1.0 / (num_experts * 0.5)  # sum of E coefficients sigmoid(0) = 1/2
        layer = CondConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,  # int pair, or "same"/"valid"
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            num_experts=num_experts,
            router=new_router,
            strategy=strategy,
            **factory_kw,
        )
        if router:
            layer._router_kind = "own"
        with torch.no_grad():
            layer.weight.copy_(conv.weight.unsqueeze(0).expand_as(layer.weight) * scale)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.unsqueeze(0).expand_as(layer.bias) * scale)  # type: ignore[union-attr]
        layer.train(conv.training)
        return layer

    return replace_modules(model, select, factory)
