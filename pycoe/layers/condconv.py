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

from pycoe._validation import (
    check_bool,
    check_choice,
    check_conv_padding,
    check_int_pair,
    check_positive_int,
    check_tensor,
)
from pycoe.functional.mixture import (
    COEFFICIENT_NORMALIZATIONS,
    MIXTURE_STRATEGIES,
    mixture_coefficients,
    mixture_conv2d,
)
from pycoe.layers._convert import ConversionReport, check_eager_model, convert, is_timm_class, survey

__all__ = ["CondConvRouter", "CondConv2d", "convert_conv2d_to_condconv"]


def _check_input(x: Any, in_channels: int, weight: torch.Tensor, owner: str) -> None:
    """Check a layer's (or router's) input ``x``: Tensor[B, C, H, W] of the parameters' dtype and device."""
    check_tensor("x", x, ndim=4)
    if x.shape[1] != in_channels:
        raise ValueError(f"x must have {in_channels} channels (shape [B, C, H, W]), got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x must have the dtype of the {owner}'s parameters ({weight.dtype}), got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x must be on the device of the {owner}'s parameters ({weight.device}), got {x.device}")


class CondConvRouter(nn.Module):
    """The CondConv routing function: global average pool, Linear, then a normalization into coefficients.

    ``coefficients = mixture_coefficients(Linear(mean_{h,w} x), normalization)``; with the default
    ``"sigmoid"`` that is the CondConv paper's ``sigmoid(Linear(GAP(x)))`` (sigmoid, not softmax: the coefficients
    are not normalised). One router can serve several :class:`CondConv2d` layers: either call it once on a block's
    input and pass the result to each layer as ``coefficients`` (the paper computes the coefficients once per
    block and shares them between the block's convolutions), or hand the same router module to several layers with
    ``router=`` (shared parameters, each layer routes on its own input).

    Args:
        in_channels: C, channels of the input it routes on.
        num_kernels: E, the kernels of the layers it routes.
        normalization: how the logits become coefficients, one of
            :data:`~pycoe.functional.mixture.COEFFICIENT_NORMALIZATIONS` (see
            :func:`~pycoe.functional.mixture.mixture_coefficients`): ``"sigmoid"`` (default, the paper's: each in
            (0, 1), not normalised), ``"normalized_sigmoid"`` (pycoe's option: the sigmoids divided by their sum,
            so that each sample's coefficients sum to 1), ``"softmax"`` or ``"none"`` (the logits).
            :func:`convert_conv2d_to_condconv` defaults to ``"normalized_sigmoid"`` instead, because a converted
            model must keep its outputs.
        bias: whether the Linear layer has a bias.
        device, dtype: factory arguments of the parameters, passed to ``nn.Linear``.

    Shapes:
        forward(x: Tensor[B, C, H, W]) -> coefficients Tensor[B, E].
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
        self.normalization = check_choice("normalization", normalization, COEFFICIENT_NORMALIZATIONS)
        self.fc = nn.Linear(in_channels, num_kernels, bias=check_bool("bias", bias), device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[B, C, H, W] -> coefficients Tensor[B, E]."""
        _check_input(x, self.in_channels, self.fc.weight, "router")
        if x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"x must have a non-empty spatial size to be pooled, got shape {tuple(x.shape)}")
        return mixture_coefficients(self.fc(x.mean(dim=(2, 3))), self.normalization)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_kernels={self.num_kernels}, normalization={self.normalization!r}"


class CondConv2d(nn.Module):
    """A conditionally parameterised 2-D convolution (CondConv).

    Holds a bank of E kernels of an ``nn.Conv2d`` kernel's shape (and E biases). Sample ``b`` is convolved with
    ``sum_e coefficients[b, e] * weight[e]`` (and the biases are mixed the same way), computed by
    :func:`pycoe.functional.mixture_conv2d`.

    Args:
        in_channels: C.
        out_channels: O.
        kernel_size: int or (kh, kw).
        stride, padding, dilation, groups: as for ``nn.Conv2d``; ``padding`` may also be ``"same"`` (TensorFlow
            rule, strided convolutions included) or ``"valid"``. Only zero padding.
        bias: whether each kernel has a bias.
        num_kernels: E >= 1, the kernels of the bank.
        router: what computes the coefficients when :meth:`forward` is not given them. ``True`` (default): the
            layer builds its own :class:`CondConvRouter` (GAP, Linear, sigmoid) on its input; ``False``: no
            router, ``coefficients`` must be given to :meth:`forward`; an ``nn.Module`` mapping ``x`` to
            Tensor[B, E]: that module (it may be shared with other layers; its parameters are then shared too).
            :func:`convert_conv2d_to_condconv` gives ``True`` and ``False`` the same meaning.
        strategy: ``"auto"``, ``"weight"``, ``"bmm"`` or ``"output"``, passed to
            :func:`~pycoe.functional.mixture_conv2d`.
        device, dtype: factory arguments of the parameters, passed to ``torch.empty``.

    Attributes:
        weight: Parameter Tensor[E, O, C/groups, kh, kw]. It keeps its (contiguous) layout under
            ``model.to(memory_format=torch.channels_last)``, which the layer's input may take: the bank is mixed
            by a matrix product, where a memory format buys nothing, and torch's channels_last has no 5-d form.
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
        if self.in_channels % self.groups != 0:
            raise ValueError(f"in_channels={in_channels} must be divisible by groups={groups}")
        if self.out_channels % self.groups != 0:
            raise ValueError(f"out_channels={out_channels} must be divisible by groups={groups}")
        self.kernel_size = check_int_pair("kernel_size", kernel_size, minimum=1)
        self.stride = check_int_pair("stride", stride, minimum=1)
        self.dilation = check_int_pair("dilation", dilation, minimum=1)
        self.padding = check_conv_padding("padding", padding)
        self.strategy = check_choice("strategy", strategy, MIXTURE_STRATEGIES)
        shape = (self.num_kernels, self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.empty(self.num_kernels, self.out_channels, device=device, dtype=dtype))
            if check_bool("bias", bias)
            else None
        )
        self.router: nn.Module | None
        if router is True:
            self.router = CondConvRouter(self.in_channels, self.num_kernels, device=device, dtype=dtype)
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

    def forward(self, x: torch.Tensor, coefficients: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve each sample with its mixture of the bank's kernels.

        Args:
            x: Tensor[B, C, H, W] of the layer's dtype and device (``B = 0`` gives an empty batch).
            coefficients: Tensor[B, E], or None to compute them with the layer's router.

        Returns:
            Tensor[B, O, H', W'].
        """
        weight = self.weight
        # Before the router, so that a wrong input is reported as the layer's, not the router's.
        _check_input(x, self.in_channels, weight, "layer")
        name = "coefficients"
        if coefficients is None:
            if self.router is None:
                raise ValueError("coefficients must be given: this CondConv2d was built with router=False")
            coefficients = self.router(x)
            name = f"the output of the router ({type(self.router).__name__})"
        check_tensor(name, coefficients)
        if coefficients.dim() != 2 or coefficients.shape[0] != x.shape[0] or coefficients.shape[1] != self.num_kernels:
            raise ValueError(
                f"{name} must have shape [B, E] = [{x.shape[0]}, {self.num_kernels}], got {tuple(coefficients.shape)}"
            )
        if coefficients.dtype != weight.dtype:
            raise TypeError(f"{name} must have the layer's dtype {weight.dtype}, got {coefficients.dtype}")
        if coefficients.device != weight.device:
            raise ValueError(f"{name} must be on the layer's device {weight.device}, got {coefficients.device}")
        return mixture_conv2d(
            x,
            weight,
            coefficients,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.strategy,
            validate_args=False,  # the configuration was checked at construction, the inputs just above
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CondConv2d:
        """``nn.Module._apply``, except that the 5-d kernel bank (and its gradient) keeps its layout.

        ``Module.to(memory_format=...)`` converts every 4-d and 5-d tensor to that format, and channels_last has
        no 5-d form: the bank goes through ``fn`` as a 6-d tensor, which ``to`` converts in device and dtype only.
        """
        bank = self.weight
        grad = bank.grad

        def keep_layout(t: torch.Tensor) -> torch.Tensor:
            if t is bank or (grad is not None and t is grad):
                return fn(t.unsqueeze(0)).squeeze(0)
            return fn(t)

        return super()._apply(keep_layout, recurse)

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


# ----------------------------------------------------------------------------------------------------------------
# conversion of an existing model

# timm's convolutions with TensorFlow's "same" padding (computed per input size: CondConv2d's padding="same")
_TIMM_SAME_CONVS = ("Conv2dSame", "Conv2dSameExport")


def _why_not_convertible(conv: nn.Conv2d) -> str | None:
    """None if a CondConv2d can reproduce ``conv``, else why not."""
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: CondConv2d pads with zeros only"
    if type(conv) is nn.Conv2d or is_timm_class(type(conv), _TIMM_SAME_CONVS):
        return None
    return (
        f"{type(conv).__name__} is a subclass of nn.Conv2d whose forward may differ from a convolution of its "
        "weight (e.g. a standardised weight); only nn.Conv2d and timm's Conv2dSame are converted"
    )


def _padding_of(conv: nn.Conv2d) -> tuple[int, int] | str:
    """The CondConv2d padding that reproduces ``conv`` (timm's Conv2dSame pads by TensorFlow's rule)."""
    if is_timm_class(type(conv), _TIMM_SAME_CONVS):
        return "same"
    return conv.padding  # type: ignore[return-value]  # an int pair, or "same"/"valid"


def _classifier(model: nn.Module, predicate: object) -> Callable[[str, nn.Module], bool | str | None]:
    """For :func:`~pycoe.layers._convert.survey`: convert (True) or why not, for every convolution of ``model``."""
    stem = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)

    def verdict(name: str, module: nn.Module, wanted: Callable[[], bool | str]) -> bool | str | None:
        if not isinstance(module, nn.Conv2d):
            return None
        why = _why_not_convertible(module)
        return why if why is not None else wanted()

    if predicate is None:
        stem_reason = "the stem (the first convolution: it sees the raw input); choose it with predicate"
        return lambda name, m: verdict(name, m, lambda: True if name != stem else stem_reason)
    if callable(predicate):
        user = predicate
        return lambda name, m: verdict(name, m, lambda: bool(user(name, m)) or "predicate returned False")
    if not isinstance(predicate, Collection) or isinstance(predicate, str):
        raise TypeError(f"predicate must be None, a callable or a collection of names, got {predicate!r}")
    names = set(predicate)
    modules = dict(model.named_modules())
    for name in sorted(names, key=str):
        if not isinstance(name, str):
            raise TypeError(f"predicate must hold qualified names (str), got {name!r}")
        if name not in modules:
            raise ValueError(f"predicate names {name!r}, which is not a submodule of model")
        module = modules[name]
        why = _why_not_convertible(module) if isinstance(module, nn.Conv2d) else "not an nn.Conv2d"
        if why is not None:
            raise ValueError(f"predicate names {name!r}, a {type(module).__name__}, which cannot be converted: {why}")
    return lambda name, m: verdict(name, m, lambda: name in names or "not named in predicate")


def _condconv_like(conv: nn.Conv2d, num_kernels: int, normalization: str, strategy: str, router: bool) -> CondConv2d:
    """A CondConv2d computing what ``conv`` computes, for every coefficients its router gives (see below)."""
    device, dtype = conv.weight.device, conv.weight.dtype
    new_router: CondConvRouter | bool = False
    scale = 1.0
    if router:
        new_router = CondConvRouter(
            conv.in_channels, num_kernels, normalization=normalization, device=device, dtype=dtype
        )
        if normalization in ("sigmoid", "none"):  # these sum to a constant only when the router is constant
            with torch.no_grad():
                new_router.fc.weight.zero_()
                new_router.fc.bias.fill_(0.0 if normalization == "sigmoid" else 1.0 / num_kernels)
            if normalization == "sigmoid":
                scale = 1.0 / (num_kernels * 0.5)  # the E coefficients sigmoid(0) = 1/2 sum to E/2
    layer = CondConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=_padding_of(conv),
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


def convert_conv2d_to_condconv(
    model: nn.Module,
    num_kernels: int = 4,
    predicate: Callable[[str, nn.Module], bool] | Collection[str] | None = None,
    *,
    normalization: str = "normalized_sigmoid",
    strategy: str = "auto",
    router: bool = True,
) -> ConversionReport:
    """Replace chosen convolutions of ``model``, in place, by :class:`CondConv2d` layers.

    Every kernel of a new layer's bank starts as the pretrained kernel (and bias), and each new layer gets its
    own :class:`CondConvRouter` on its input, so that right after conversion the model computes the same
    function (up to float rounding). That needs the coefficients of each sample to sum to a constant:

    * ``normalization="normalized_sigmoid"`` (default, pycoe's choice) or ``"softmax"``: the coefficients sum to 1
      for any router parameters. The router keeps its random ``nn.Linear`` init, so the coefficients differ
      between samples and kernels, and the identical kernels receive different gradients from the first step on:
      they can specialise. (:class:`CondConvRouter` itself defaults to the paper's ``"sigmoid"``; a conversion
      defaults to ``"normalized_sigmoid"`` because it must keep the model's outputs.)
    * ``normalization="sigmoid"`` (the paper's unnormalised router) or ``"none"``: these give a constant sum only
      if the router is constant, so its Linear weight is zero-initialised (``"sigmoid"``: every coefficient is
      sigmoid(0) = 1/2 and each kernel is the pretrained kernel, and bias, scaled by ``2 / E``; ``"none"``: the
      bias is ``1 / E``). Caveat: identical kernels under a constant router receive identical gradients and the
      router's rows too, so nothing ever breaks the symmetry by itself: the layer keeps behaving like one
      convolution unless the user perturbs the kernels or the router (which changes the outputs).

    Convertible are ``nn.Conv2d`` layers with zero padding and timm's ``Conv2dSame`` (TensorFlow's "same" padding,
    which :class:`CondConv2d` computes the same way); other subclasses of ``nn.Conv2d`` and other padding modes are
    left alone and reported. TorchScript modules are refused (convert before scripting).

    Args:
        model: the model to edit in place (an eager ``nn.Module``).
        num_kernels: E >= 1, the kernels of each new layer's bank.
        predicate: ``(qualified_name, conv) -> bool`` choosing among the convertible convolutions, or a collection
            of qualified names (each must name a convertible convolution). Default: every convertible convolution
            except the stem, the first convolution in ``named_modules`` order (it sees the raw input).
        normalization: the :class:`CondConvRouter` normalization of the new routers, see above.
        strategy: ``strategy`` of the new layers.
        router: :class:`CondConv2d`'s ``router`` for the new layers, restricted to its two boolean values with
            the same meaning: ``True`` (default): each new layer gets its own router as described above.
            ``False``: the new layers have no router and every kernel is an exact copy of the pretrained kernel
            (and bias), for callers that pass ``coefficients`` themselves; any coefficients summing to 1 then
            reproduce the original convolution. ``normalization`` must then be left at its default (it
            describes a router).

    Returns:
        A :class:`~pycoe.layers.ConversionReport`: the list of the qualified names of the replaced convolutions,
        with ``.skipped``, the convolutions left alone and why. A ``UserWarning`` says so when nothing was
        converted.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or is a TorchScript module; an argument of the wrong type.
        ValueError: a bad option, or a ``predicate`` name that is no convertible convolution of ``model``.
    """
    return _convert_conv2d(model, num_kernels, predicate, normalization, strategy, router, warn=True)


def _convert_conv2d(
    model: nn.Module,
    num_kernels: int,
    predicate: Callable[[str, nn.Module], bool] | Collection[str] | None,
    normalization: str,
    strategy: str,
    router: bool,
    *,
    warn: bool,
) -> ConversionReport:
    """:func:`convert_conv2d_to_condconv`; with ``warn=False`` it says nothing when it converts nothing (for callers
    that raise their own error then, such as BasisNet's specialist)."""
    model = check_eager_model(model, "convert_conv2d_to_condconv")
    num_kernels = check_positive_int("num_kernels", num_kernels)
    normalization = check_choice("normalization", normalization, COEFFICIENT_NORMALIZATIONS)
    check_choice("strategy", strategy, MIXTURE_STRATEGIES)
    if not check_bool("router", router) and normalization != "normalized_sigmoid":
        raise ValueError(
            f"normalization={normalization!r} needs a router: with router=False leave normalization at its default"
        )
    chosen, skipped = survey(model, _classifier(model, predicate))

    def factory(name: str, conv: nn.Module) -> nn.Module:
        assert isinstance(conv, nn.Conv2d)
        return _condconv_like(conv, num_kernels, normalization, strategy, router)

    return convert(model, chosen, skipped, factory, "convolution (nn.Conv2d) to convert", warn=warn)
