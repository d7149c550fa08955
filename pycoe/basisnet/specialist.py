"""BasisNet's specialist: a model whose convolutions are banks of N basis kernels mixed by one coefficient vector.

Zhang, Chu, Zhmoginov, Howard, Jou, Zhu, Zhang, Hwa and Kovashka, "BasisNet: Two-Stage Model Synthesis for
Efficient Inference", CVPR 2021 ECV workshop, arXiv:2105.03014. Confirmed by the paper's public text: a
lightweight model previews the input and produces input-dependent combination coefficients, which control
the synthesis of a *specialist* model from basis models. The synthesis rule implemented here,

.. math::

    W_l(x) = \\sum_{n=1}^{N} \\alpha_n(x)\\, W_l^{(n)} \\quad \\text{for every converted convolution } l,

with **one** coefficient vector :math:`\\alpha(x) \\in \\mathbb{R}^N` per sample shared by all layers, is the
commonly described form of the method but is *not confirmed* from the paper's text (see the guide); it is
pycoe's formulation. Each converted layer is a :class:`~pycoe.layers.condconv.CondConv2d` without a router
(``router=False``) whose ``coefficients`` are the shared coefficients, so the convolution itself is
:func:`pycoe.functional.mixture_conv2d`.

How the coefficients reach the layers: :meth:`BasisSpecialist.forward` publishes them, for the duration of the
call, in a :class:`contextvars.ContextVar` keyed by the identity of its own basis layers; a forward pre-hook on
each basis layer (a module-level function, so the model still pickles and deep-copies) passes them to the
layer as ``coefficients``. A context variable is private to each thread (and each asyncio task), so
concurrent calls from several threads do not see each other's coefficients; nothing is stored on the modules.

Einstein legend: ``b`` batch (B), ``n`` bases (N), ``o``/``c`` output/input channels, ``kh``/``kw`` kernel size.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pycoe._modules import replace_modules
from pycoe._validation import (
    check_choice,
    check_generator,
    check_module,
    check_nonnegative_float,
    check_positive_int,
    check_tensor,
)
from pycoe.functional.mixture import MIXTURE_STRATEGIES, _resolve_padding
from pycoe.layers._convert import why_nothing
from pycoe.layers.condconv import CondConv2d, _convert_conv2d

__all__ = ["BasisSpecialist"]

# id(basis layer) -> Tensor[B, N] coefficients, for the basis layers of the specialist calls in progress in the
# current thread/task. Set and reset only by BasisSpecialist.forward.
_NO_COEFFICIENTS: Mapping[int, torch.Tensor] = MappingProxyType({})
_ACTIVE_COEFFICIENTS: contextvars.ContextVar[Mapping[int, torch.Tensor]] = contextvars.ContextVar(
    "pycoe_basis_coefficients", default=_NO_COEFFICIENTS
)


def _inject_coefficients(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a basis layer: add the specialist's coefficients as ``coefficients``."""
    if len(args) > 1 or "coefficients" in kwargs:
        return None  # explicit coefficients: a direct call of the layer, leave it alone
    coefficients = _ACTIVE_COEFFICIENTS.get().get(id(module))
    if coefficients is None:
        raise RuntimeError(
            "this CondConv2d is a basis layer of a BasisSpecialist: call the specialist as "
            "specialist(x, coefficients) (or pass coefficients=Tensor[B, N] to the layer directly)"
        )
    return args, {**kwargs, "coefficients": coefficients}


class BasisSpecialist(nn.Module):
    """Turn a model into a BasisNet specialist: chosen convolutions become banks of N basis kernels.

    Every chosen convolution of ``model`` (a plain ``nn.Conv2d`` with zero padding, or timm's ``Conv2dSame``) is
    replaced, in place, by a router-less
    :class:`~pycoe.layers.condconv.CondConv2d` holding ``num_bases`` kernels (and biases). Calling
    ``specialist(x, coefficients)`` convolves sample ``b`` at *every* basis layer with
    ``sum_n coefficients[b, n] * W^{(n)}``: one coefficient vector per sample, shared by all layers. Everything
    else in the model (batch norm, activations, linear layers) is shared between the bases and not mixed.
    The conversion is :func:`~pycoe.layers.condconv.convert_conv2d_to_condconv` with ``router=False``.

    **Initialisation from the pretrained model.** Every basis starts as a copy of the original kernel and bias,
    so for any coefficients that sum to 1 per sample the specialist computes the original model's function
    (exactly in real arithmetic; up to float rounding in practice). Caveat: identical bases with coefficients
    that sum to 1 make the output independent of the coefficients, so a softmax coefficient generator gets
    *zero* gradient and every basis gets the same gradient under uniform coefficients: the symmetry never
    breaks by itself. ``init_noise > 0`` adds, per layer, Gaussian noise of standard deviation
    ``init_noise * std(original kernel)`` to the bases, **centred across the bases** (the N noise tensors sum
    to zero; pycoe's choice), so uniform coefficients ``1/N`` still reproduce the original model exactly while
    any other coefficients do not. Basis dropout in :class:`~pycoe.basisnet.model.BasisNet` also breaks the
    symmetry. How the paper initialised and perturbed its bases is not confirmed.

    Args:
        model: the model to convert, modified in place (keep a copy if you need the original).
        num_bases: N >= 1.
        predicate: which convolutions become basis layers: ``None`` (default, pycoe's choice: every convertible
            convolution, the stem included), a callable ``(qualified_name, conv) -> bool`` or a collection of
            qualified names, as for :func:`~pycoe.layers.condconv.convert_conv2d_to_condconv`. A ``ValueError``
            says why when it chooses none.
        init_noise: relative scale of the symmetry-breaking noise (>= 0; ``0`` gives exact copies).
        generator: optional ``torch.Generator`` for the noise.
        strategy: the mixture strategy of the basis layers (one of
                :data:`~pycoe.functional.mixture.MIXTURE_STRATEGIES`, default ``"auto"``).

    Attributes:
        model (nn.Module): the converted model.
        num_bases (int): N.
        basis_layer_names (list[str]): qualified names (inside ``model``) of the basis layers.

    Example:
        >>> import torchvision
        >>> spec = BasisSpecialist(torchvision.models.resnet18(num_classes=10), num_bases=4).eval()
        >>> coefficients = torch.softmax(torch.randn(2, 4), dim=1)
        >>> spec(torch.randn(2, 3, 64, 64), coefficients).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        num_bases: int,
        predicate: Callable[[str, nn.Module], bool] | Collection[str] | None = None,
        init_noise: float = 0.0,
        generator: torch.Generator | None = None,
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        check_module("model", model)
        num_bases = check_positive_int("num_bases", num_bases)
        check_nonnegative_float("init_noise", init_noise)
        check_choice("strategy", strategy, MIXTURE_STRATEGIES)
        check_generator("generator", generator)
        if predicate is None:
            predicate = _every_conv
        # convert_conv2d_to_condconv(router=False), without its warning when nothing is chosen: the error below says it
        names = _convert_conv2d(
            model, num_bases, predicate, normalization="normalized_sigmoid", strategy=strategy, router=False, warn=False
        )
        if not names:
            raise _no_basis_layer(names.skipped)
        self.model = model
        self.num_bases = num_bases
        self.basis_layer_names = list(dict.fromkeys(names))  # a shared conv is listed once per name
        self.init_noise = float(init_noise)
        for layer in self.basis_layers():
            layer.register_forward_pre_hook(_inject_coefficients, with_kwargs=True)
        if init_noise > 0:
            self.perturb_bases(init_noise, generator=generator)

    # ------------------------------------------------------------------ helpers
    def basis_layers(self) -> list[CondConv2d]:
        """The basis layers (each module once, in ``basis_layer_names`` order)."""
        layers: dict[int, CondConv2d] = {}
        for name in self.basis_layer_names:
            layer = self.model.get_submodule(name)
            layers.setdefault(id(layer), layer)  # type: ignore[arg-type]
        return list(layers.values())

    @torch.no_grad()
    def perturb_bases(self, scale: float, generator: torch.Generator | None = None) -> None:
        """Add centred Gaussian noise to every basis layer's bank (see the class docstring).

        For each layer, noise of standard deviation ``scale * std(mean kernel)`` is drawn per basis, its mean
        over the bases is subtracted (so the bank's mean over the bases is unchanged) and it is added to the
        kernels; biases are not perturbed. With N = 1 the centred noise is zero.

        Args:
            scale: relative noise scale, >= 0.
            generator: optional ``torch.Generator``.
        """
        check_nonnegative_float("scale", scale)
        check_generator("generator", generator)
        for layer in self.basis_layers():
            bank = layer.weight  # Tensor[N, O, C/g, kh, kw]
            mean_kernel = bank.mean(dim=0)
            std = mean_kernel.std() if mean_kernel.numel() > 1 else mean_kernel.abs().reshape(())
            noise = torch.randn(bank.shape, generator=generator, device="cpu", dtype=torch.float64)
            noise = (noise - noise.mean(dim=0, keepdim=True)).to(device=bank.device, dtype=bank.dtype)
            bank.add_(noise * (scale * std))

    def _check_coefficients(self, x: Any, coefficients: Any, layers: list[CondConv2d]) -> None:
        check_tensor("x", x, batch_first=True)
        check_tensor("coefficients", coefficients, ndim=2, floating=True)
        if coefficients.shape != (x.shape[0], self.num_bases):
            raise ValueError(
                f"coefficients must have shape [B, N] = [{x.shape[0]}, {self.num_bases}] (B = batch of x, "
                f"N = num_bases), got {tuple(coefficients.shape)}"
            )
        ref = layers[0].weight
        if x.is_floating_point() and x.dtype != ref.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the specialist's basis kernels are {ref.dtype}; pass x.to({ref.dtype}) "
                f"or convert the specialist (specialist.to({x.dtype}))"
            )
        if coefficients.dtype != ref.dtype:
            raise TypeError(
                f"coefficients must have the dtype of the basis kernels ({ref.dtype}), got {coefficients.dtype}"
            )
        if coefficients.device != ref.device:
            raise ValueError(
                f"coefficients must be on the device of the model ({ref.device}), got {coefficients.device}"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, coefficients: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the model with every basis layer mixed by ``coefficients``.

        Args:
            x: the batch, ``Tensor[B, ...]`` (e.g. ``Tensor[B, 3, H, W]``); passed to the model.
            coefficients: ``Tensor[B, N]``, each sample's mixing coefficients, shared by all basis layers
                (any real numbers; they sum to 1 per sample when they come from a softmax).
            *args: further positional inputs of the model.
            **kwargs: keyword inputs of the model.

        Returns:
            Whatever the model returns (e.g. logits ``Tensor[B, C]``).
        """
        layers = self.basis_layers()
        self._check_coefficients(x, coefficients, layers)
        active = dict(_ACTIVE_COEFFICIENTS.get())  # keep outer specialists' entries (nested specialists)
        for layer in layers:
            active[id(layer)] = coefficients
        token = _ACTIVE_COEFFICIENTS.set(active)
        try:
            return self.model(x, *args, **kwargs)
        finally:
            _ACTIVE_COEFFICIENTS.reset(token)

    @torch.no_grad()
    def synthesize(self, coefficients: torch.Tensor) -> nn.Module:
        """Build the plain model of one coefficient vector: every basis layer becomes an ``nn.Conv2d``.

        A basis layer with TensorFlow's "same" padding (a converted timm ``Conv2dSame``) becomes an ``nn.Conv2d``
        with the equivalent fixed padding where there is one (stride 1, the same padding on both sides), else an
        ``nn.Conv2d`` subclass that pads each input as TensorFlow does (the odd pixel after), as timm's
        ``Conv2dSame`` does: torch's ``padding="same"`` refuses strides.

        Sample-independent deployment (e.g. batch-1 inference: synthesise once, then run an ordinary model at
        the original model's cost), and the slow, obviously correct reference of :meth:`forward` (each kernel is
        built as an explicit sum over the bases). The result is a deep copy without gradient history.

        Args:
            coefficients: ``Tensor[N]``, one sample's coefficients.

        Returns:
            A copy of ``model`` (``nn.Module``) in the specialist's train/eval mode.
        """
        check_tensor("coefficients", coefficients, shape=(self.num_bases,), floating=True)
        model = copy.deepcopy(self.model)
        names = set(self.basis_layer_names)

        def factory(name: str, layer: nn.Module) -> nn.Module:
            assert isinstance(layer, CondConv2d)
            w = layer.weight
            padding = _fixed_padding(layer)
            conv = (nn.Conv2d if padding is not None else _Conv2dSame)(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                stride=layer.stride,
                padding=0 if padding is None else padding,
                dilation=layer.dilation,
                groups=layer.groups,
                bias=layer.bias is not None,
                device=w.device,
                dtype=w.dtype,
            )
            c = coefficients.to(device=w.device, dtype=w.dtype)
            kernel = torch.zeros_like(w[0])
            for n in range(self.num_bases):
                kernel = kernel + c[n] * w[n]
            conv.weight.copy_(kernel)
            if layer.bias is not None and conv.bias is not None:
                bias = torch.zeros_like(layer.bias[0])
                for n in range(self.num_bases):
                    bias = bias + c[n] * layer.bias[n]
                conv.bias.copy_(bias)
            conv.train(layer.training)
            return conv

        replace_modules(model, lambda name, m: name in names, factory)
        return model

    def extra_repr(self) -> str:
        return f"num_bases={self.num_bases}, basis_layers={len(self.basis_layers())}"


def _every_conv(name: str, module: nn.Module) -> bool:
    return True  # the conversion offers only the convolutions it can convert (zero padding, timm's Conv2dSame)


def _fixed_padding(layer: CondConv2d) -> tuple[int, int] | str | None:
    """The ``nn.Conv2d`` padding that reproduces a basis layer's, or ``None`` where only a padding computed for each
    input does ("same" with a stride, or with an odd total padding, which goes after)."""
    if layer.padding != "same":
        return layer.padding
    if layer.stride != (1, 1):
        return None
    totals = [(k - 1) * d for k, d in zip(layer.kernel_size, layer.dilation)]
    if any(total % 2 for total in totals):
        return None
    return totals[0] // 2, totals[1] // 2


def _no_basis_layer(skipped: dict[str, str]) -> ValueError:
    """The error of a conversion that chose no convolution, with what it skipped and why."""
    return ValueError(
        "the predicate chose no convolution of the model: a BasisSpecialist needs at least one nn.Conv2d (zero "
        "padding) or timm Conv2dSame to turn into a basis layer; " + why_nothing(skipped, "convolution")
    )


class _Conv2dSame(nn.Conv2d):
    """An ``nn.Conv2d`` with TensorFlow's "same" padding computed for each input (the odd pixel after), as timm's
    ``Conv2dSame``: what :meth:`BasisSpecialist.synthesize` builds for a strided basis layer with ``padding="same"``,
    which ``nn.Conv2d(padding="same")`` refuses. Built with ``padding=0``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (self.kernel_size[0], self.kernel_size[1])
        stride = (self.stride[0], self.stride[1])
        dilation = (self.dilation[0], self.dilation[1])
        x, padding = _resolve_padding(x, "same", kernel, stride, dilation)
        return F.conv2d(x, self.weight, self.bias, stride, padding, dilation, self.groups)
