"""Mixture convolution: a bank of E convolution kernels mixed per sample.

This is the mechanism under CondConv (Yang, Bender, Le, Ngiam, "CondConv: Conditionally Parameterized
Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971) and under BasisNet's synthesised
specialist models. For one sample with mixing coefficients :math:`\\alpha \\in \\mathbb{R}^E`,

.. math::

    y = \\Big(\\sum_{e} \\alpha_e W_e\\Big) * x + \\sum_e \\alpha_e b_e
      = \\sum_e \\alpha_e \\,(W_e * x + b_e),

because a convolution is linear in its kernel. The two sides give the exact strategies:

* ``"weight"`` (weight mixing, the CondConv paper's form): one matmul builds a kernel per sample, then ONE
  grouped convolution with ``groups = B * g`` runs every sample with its own kernel (the batch is folded into
  the channel axis: ``x`` is reshaped to ``[1, B*C, H, W]``).
* ``"loop"`` (weight mixing too): the same matmul, then one ordinary ``F.conv2d`` per sample with that
  sample's kernel. On CPU a grouped convolution with ``groups = B`` and many channels per group is often
  slower than B separate convolutions.
* ``"bmm"`` (weight mixing too): the same matmul, then the convolution as ONE batched matrix multiply
  ``[B*g, O/g, C/g*kh*kw] @ [B*g, C/g*kh*kw, h*w]``; a 1x1 kernel needs no im2col (the input is the right
  matrix as it is), larger kernels go through ``F.unfold``.
* ``"output"`` (output mixing): one ordinary convolution with ``E * O`` output channels on the whole batch,
  then the coefficient-weighted sum over the E expert outputs.

At batch 1 every weight-mixing strategy is the same computation, so it runs as one ``F.conv2d`` with the
mixed kernel. ``"auto"`` picks one with :func:`choose_mixture_strategy`, a small cost model whose constants
were calibrated with ``benchmarks/bench_condconv.py`` on the development machine (see that function's
docstring).

Einstein legend used in shapes and einops patterns::

    b  batch                 e  experts (E)
    g  convolution groups    o  output channels (per group inside einops patterns)
    c  input channels per group
    kh, kw kernel height/width;  h, w spatial size (of the output where it follows a convolution)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from pycoe._validation import check_choice, check_positive_int, check_tensor

__all__ = [
    "mixture_conv2d",
    "mixture_conv2d_reference",
    "choose_mixture_strategy",
    "MIXTURE_STRATEGIES",
]

#: The strategies accepted by :func:`mixture_conv2d`.
MIXTURE_STRATEGIES = ("auto", "weight", "output", "bmm", "loop")

_PadArg = int | Sequence[int] | str


# ----------------------------------------------------------------------------------------------------------------
# argument handling
# ----------------------------------------------------------------------------------------------------------------
def _pair(name: str, value: int | Sequence[int], *, minimum: int) -> tuple[int, int]:
    """Return ``value`` as a pair of ints >= ``minimum`` (an int is repeated), or raise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        pair = tuple(value)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _normalize_padding(padding: _PadArg) -> tuple[int, int] | str:
    """Return ``padding`` as a pair of ints, or as ``"same"``/``"valid"``."""
    if isinstance(padding, str):
        return check_choice("padding", padding, ("same", "valid"))
    return _pair("padding", padding, minimum=0)


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF-style "same" padding along one axis: output size ceil(size / stride), extra pixel after."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _resolve_padding(
    x: torch.Tensor,
    padding: tuple[int, int] | str,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Turn ``padding`` into a symmetric conv padding, padding ``x`` explicitly when "same" is asymmetric."""
    if padding == "valid":
        return x, (0, 0)
    if padding == "same":
        top, bottom = _same_pads(x.shape[-2], kernel[0], stride[0], dilation[0])
        left, right = _same_pads(x.shape[-1], kernel[1], stride[1], dilation[1])
        if top == bottom and left == right:
            return x, (top, left)
        return F.pad(x, (left, right, top, bottom)), (0, 0)
    return x, padding  # type: ignore[return-value]


def _conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _validate(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    coefficients: torch.Tensor,
    bias_bank: torch.Tensor | None,
    groups: int,
) -> None:
    check_tensor("x", x, ndim=4, floating=True)
    check_tensor("weight_bank", weight_bank, ndim=5, floating=True)
    groups = check_positive_int("groups", groups)
    batch, channels = x.shape[:2]
    experts, out_channels, cpg = weight_bank.shape[:3]
    if experts < 1:
        raise ValueError(f"weight_bank must hold at least one expert (shape[0] >= 1), got {tuple(weight_bank.shape)}")
    check_tensor("coefficients", coefficients, ndim=2, floating=True)
    if coefficients.shape[0] != batch:
        raise ValueError(
            f"coefficients must have shape [B, E] = [{batch}, {experts}] (batch of x), got {tuple(coefficients.shape)}"
        )
    if coefficients.shape[1] != experts:
        raise ValueError(
            f"coefficients must have shape [B, E] = [{batch}, {experts}] (E = weight_bank.shape[0]), "
            f"got {tuple(coefficients.shape)}"
        )
    if channels % groups != 0:
        raise ValueError(f"x has {channels} channels, which is not divisible by groups={groups}")
    if out_channels % groups != 0:
        raise ValueError(f"weight_bank has {out_channels} output channels, which is not divisible by groups={groups}")
    if cpg * groups != channels:
        raise ValueError(
            f"weight_bank must have shape [E, O, C/groups, kh, kw] with C/groups = {channels // groups} "
            f"(x has C={channels}, groups={groups}), got {tuple(weight_bank.shape)}"
        )
    if bias_bank is not None:
        check_tensor("bias_bank", bias_bank, shape=(experts, out_channels), floating=True)
    tensors = [("weight_bank", weight_bank), ("coefficients", coefficients)]
    if bias_bank is not None:
        tensors.append(("bias_bank", bias_bank))
    for name, t in tensors:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


# ----------------------------------------------------------------------------------------------------------------
# the strategies
# ----------------------------------------------------------------------------------------------------------------
def _mixed_bias(coefficients, bias_bank):
    """Tensor[B, O] (or None): every sample's bias, one matmul [B, E] @ [E, O]."""
    return None if bias_bank is None else coefficients @ bias_bank


def _single_sample(x, weight_bank, coefficients, bias_bank, stride, padding, dilation, groups):
    """Batch 1: one ordinary convolution with the mixed kernel (every weight-mixing strategy reduces to this)."""
    experts = weight_bank.shape[0]
    kernel = (coefficients @ weight_bank.reshape(experts, -1)).reshape(weight_bank.shape[1:])
    bias = None if bias_bank is None else (coefficients @ bias_bank).reshape(-1)
    return F.conv2d(x, kernel, bias, stride, padding, dilation, groups)


def _loop_mixing(x, weight_bank, coefficients, bias_bank, stride, padding, dilation, groups):
    batch = x.shape[0]
    experts = weight_bank.shape[0]
    kernels = (coefficients @ weight_bank.reshape(experts, -1)).reshape(batch, *weight_bank.shape[1:])
    biases = _mixed_bias(coefficients, bias_bank)
    bias_list = [None] * batch if biases is None else biases.unbind(0)
    # unbind (not x[b:b+1]): its backward stacks the per-sample gradients once instead of B zero-filled copies
    outs = [
        F.conv2d(xb.unsqueeze(0), kb, bb, stride, padding, dilation, groups)
        for xb, kb, bb in zip(x.unbind(0), kernels.unbind(0), bias_list)
    ]
    return torch.cat(outs, dim=0)


def _bmm_mixing(x, weight_bank, coefficients, bias_bank, stride, padding, dilation, groups):
    batch, _channels = x.shape[:2]
    experts, out_channels, cpg, kh, kw = weight_bank.shape
    # kernels[(b g), o, (c kh kw)]: the flat kernel is (g o c kh kw)-ordered, as F.unfold orders (g c kh kw)
    kernels = (coefficients @ weight_bank.reshape(experts, -1)).reshape(batch * groups, out_channels // groups, -1)
    if kh == 1 and kw == 1:
        if padding != (0, 0):
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        if stride != (1, 1):
            x = x[:, :, :: stride[0], :: stride[1]]
        out_h, out_w = x.shape[-2:]
        cols = x.reshape(batch * groups, cpg, out_h * out_w)  # a view for a contiguous x: no im2col at all
    else:
        out_h = _conv_out_size(x.shape[-2], kh, stride[0], padding[0], dilation[0])
        out_w = _conv_out_size(x.shape[-1], kw, stride[1], padding[1], dilation[1])
        cols = F.unfold(x, (kh, kw), dilation, padding, stride).reshape(batch * groups, cpg * kh * kw, -1)
    if bias_bank is None:
        out = torch.bmm(kernels, cols)
    else:
        bias = (coefficients @ bias_bank).reshape(batch * groups, out_channels // groups, 1)
        out = torch.baddbmm(bias, kernels, cols)
    return out.reshape(batch, out_channels, out_h, out_w)


def _weight_mixing(x, weight_bank, coefficients, bias_bank, stride, padding, dilation, groups):
    batch, channels, height, width = x.shape
    experts, out_channels = weight_bank.shape[:2]
    # One matmul makes every sample's kernel: [B, E] @ [E, O*C/g*kh*kw].
    kernels = (coefficients @ weight_bank.reshape(experts, -1)).reshape(batch * out_channels, *weight_bank.shape[2:])
    bias = None if bias_bank is None else (coefficients @ bias_bank).reshape(batch * out_channels)
    # Fold the batch into the channels: groups (b, g) see only their own sample's channels and kernel.
    # reshape (not view) so that a channels_last x works.
    folded = x.reshape(1, batch * channels, height, width)
    out = F.conv2d(folded, kernels, bias, stride, padding, dilation, groups * batch)
    return out.reshape(batch, out_channels, out.shape[-2], out.shape[-1])


def _output_mixing(x, weight_bank, coefficients, bias_bank, stride, padding, dilation, groups):
    batch = x.shape[0]
    experts = weight_bank.shape[0]
    # Order the E*O output channels group-major so that group j of the big conv holds every expert's
    # output channels of group j (a grouped conv splits its output channels into contiguous blocks).
    kernels = rearrange(weight_bank, "e (g o) c kh kw -> (g e o) c kh kw", g=groups)
    y = F.conv2d(x, kernels, None, stride, padding, dilation, groups)
    h, w = y.shape[-2:]
    if groups == 1:
        y = y.reshape(batch, experts, -1)  # a view for contiguous y: [B, E, O*h*w]
    else:
        y = rearrange(y, "b (g e o) h w -> b e (g o h w)", g=groups, e=experts)
    # Coefficient-weighted sum over the experts as one batched matmul: [B, 1, E] @ [B, E, O*h*w].
    out = torch.bmm(coefficients.unsqueeze(1), y).reshape(batch, -1, h, w)
    if bias_bank is not None:
        out = out + (coefficients @ bias_bank)[:, :, None, None]
    return out


def mixture_conv2d(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    coefficients: torch.Tensor,
    bias_bank: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: _PadArg = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    strategy: str = "auto",
) -> torch.Tensor:
    """Convolve each sample with its own mixture of E kernels.

    For sample ``b`` the result is ``conv2d(x[b], sum_e coefficients[b, e] * weight_bank[e]) +
    sum_e coefficients[b, e] * bias_bank[e]``, computed for the whole batch at once.

    Args:
        x: Tensor[B, C, H, W], floating point; contiguous or channels_last.
        weight_bank: Tensor[E, O, C/groups, kh, kw], one convolution kernel per expert.
        coefficients: Tensor[B, E], the mixing coefficients of each sample (any real numbers; CondConv's
            sigmoid router gives values in (0, 1) that need not sum to 1).
        bias_bank: Tensor[E, O] or None, one bias per expert, mixed with the same coefficients.
        stride: int or (sh, sw).
        padding: int, (ph, pw), ``"valid"`` (no padding) or ``"same"``. ``"same"`` follows TensorFlow's
            rule and so also works for strided convolutions (unlike ``torch.nn.functional.conv2d``): the
            output has ``ceil(H / sh)`` rows, and when the total padding is odd the extra row/column goes at
            the bottom/right. For stride 1 it equals torch's ``padding="same"``.
        dilation: int or (dh, dw).
        groups: convolution groups ``g``: C and O must be divisible by it (``groups=C`` is depthwise).
        strategy: ``"weight"`` (mix kernels, one grouped conv with ``groups = B*g``), ``"loop"`` (mix
            kernels, one conv per sample), ``"bmm"`` (mix kernels, the convolution as one batched matmul,
            through ``F.unfold`` unless the kernel is 1x1), ``"output"`` (one conv with ``E*O`` output
            channels, then the weighted sum) or ``"auto"`` (pick with :func:`choose_mixture_strategy`). All
            are exact; they differ only in float rounding and speed. At batch 1 every strategy but
            ``"output"`` is one ``F.conv2d`` with the mixed kernel.

    Returns:
        Tensor[B, O, H', W'], channels_last if ``x`` was (and is not also contiguous).

    Raises:
        TypeError: a non-tensor or non-floating argument, or mismatched dtypes.
        ValueError: inconsistent shapes (see the message), bad stride/padding/dilation/groups or an unknown
            strategy.
    """
    _validate(x, weight_bank, coefficients, bias_bank, groups)
    check_choice("strategy", strategy, MIXTURE_STRATEGIES)
    stride_ = _pair("stride", stride, minimum=1)
    dilation_ = _pair("dilation", dilation, minimum=1)
    padding_ = _normalize_padding(padding)
    return _mixture_forward(x, weight_bank, coefficients, bias_bank, stride_, padding_, dilation_, groups, strategy)


def _mixture_forward(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    coefficients: torch.Tensor,
    bias_bank: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    groups: int,
    strategy: str,
) -> torch.Tensor:
    """:func:`mixture_conv2d` on already validated and normalised arguments (the layers call this directly)."""
    kh, kw = weight_bank.shape[3], weight_bank.shape[4]
    if padding.__class__ is str:
        x_padded, conv_padding = _resolve_padding(x, padding, (kh, kw), stride, dilation)  # type: ignore[arg-type]
    else:
        x_padded, conv_padding = x, padding
    out_h = (x_padded.shape[-2] + 2 * conv_padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (x_padded.shape[-1] + 2 * conv_padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[-2:])} is too small for kernel {(kh, kw)} with dilation {dilation} "
            f"and padding {padding!r}"
        )
    batch = x.shape[0]
    if batch == 1 and strategy != "output":
        # the lean path: one conv with the mixed kernel; conv2d keeps a channels_last x channels_last
        return _single_sample(x_padded, weight_bank, coefficients, bias_bank, stride, conv_padding, dilation, groups)
    if strategy == "auto":
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or weight_bank.requires_grad
            or coefficients.requires_grad
            or (bias_bank is not None and bias_bank.requires_grad)
        )
        strategy = _cached_choice(
            batch,
            x.shape[1],
            weight_bank.shape[1],
            (kh, kw),
            weight_bank.shape[0],
            (out_h, out_w),
            groups,
            needs_grad,
        )
    out = _IMPLS[strategy](x_padded, weight_bank, coefficients, bias_bank, stride, conv_padding, dilation, groups)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


_IMPLS = {"weight": _weight_mixing, "output": _output_mixing, "bmm": _bmm_mixing, "loop": _loop_mixing}


def mixture_conv2d_reference(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    coefficients: torch.Tensor,
    bias_bank: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: _PadArg = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Slow, obviously correct :func:`mixture_conv2d`: a Python loop over samples and experts.

    Sample ``b``'s kernel is built as an explicit sum over experts and ``F.conv2d`` runs on ``x[b:b+1]``.
    ``"same"`` padding with stride 1 uses torch's own ``padding="same"``; with a larger stride the
    TensorFlow rule is spelled out here independently of the fast path. Same arguments and shapes as
    :func:`mixture_conv2d` (no ``strategy``). Meant for tests.
    """
    _validate(x, weight_bank, coefficients, bias_bank, groups)
    stride_ = _pair("stride", stride, minimum=1)
    dilation_ = _pair("dilation", dilation, minimum=1)
    padding_ = _normalize_padding(padding)
    kh, kw = weight_bank.shape[3], weight_bank.shape[4]
    outputs = []
    for b in range(x.shape[0]):
        kernel = sum(coefficients[b, e] * weight_bank[e] for e in range(weight_bank.shape[0]))
        bias = None
        if bias_bank is not None:
            bias = sum(coefficients[b, e] * bias_bank[e] for e in range(bias_bank.shape[0]))
        xb = x[b : b + 1]
        if padding_ == "same" and stride_ != (1, 1):
            pads = []
            axes = ((xb.shape[-1], kw, stride_[1], dilation_[1]), (xb.shape[-2], kh, stride_[0], dilation_[0]))
            for size, k, s, d in axes:  # F.pad lists the last axis first
                need = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                pads += [need // 2, need - need // 2]
            xb = F.pad(xb, pads)
            pad_arg: tuple[int, int] | str = (0, 0)
        else:
            pad_arg = padding_
        with warnings.catch_warnings():  # torch warns that an even kernel's "same" padding copies the input
            warnings.simplefilter("ignore", UserWarning)
            outputs.append(F.conv2d(xb, kernel, bias, stride_, pad_arg, dilation_, groups))
    return torch.cat(outputs, dim=0)


# ----------------------------------------------------------------------------------------------------------------
# cost model
# ----------------------------------------------------------------------------------------------------------------
# Calibrated constants (see choose_mixture_strategy): nanoseconds per unit of each feature of
# _cost_features, in the same order. Fitted with
#     python benchmarks/bench_condconv.py --quick --threads 1 --repeats 3 --batches 8,64 --calibrate
# on the development machine (2 shared cores, AVX-512, torch 2.14 CPU; cells 3x3 128->128 @14, 1x1 256->256 @14,
# dw3x3 256 @14, SE 1x1 256->64 @1; E=4; B=8, 64) and rounded, with one manual change: the loop's per-group
# constant was raised from the fitted 321 / 941 ns to 2000 / 6000 ns, because the fit underestimates the loop
# on depthwise convolutions (measured 1.8x to 8x timm's time there) and the raise only matters for large g;
# and, forward + backward, the per-multiply-add rates of the loop (fitted 0.096) and of bmm (fitted 0.19, with
# a zero im2col term) were set to 0.080 and 0.070 + 15 per im2col element, so that the model ranks the
# measured cells as measured (loop < weight on dense 3x3, bmm < loop < weight on dense 1x1, unfold+bmm last on
# 3x3): four cells and three or four constants per strategy do not pin these down by themselves.
_COST: dict[bool, dict[str, tuple[float, ...]]] = {
    # forward only
    False: {
        "weight": (0.15, 0.030, 140.0),
        "loop": (0.0, 0.024, 14600.0, 2000.0),
        "bmm": (0.29, 0.028, 1.7, 0.0),
        "output": (0.016, 3.2),
    },
    # forward + backward
    True: {
        "weight": (0.54, 0.089, 547.0),
        "loop": (0.0, 0.080, 61600.0, 6000.0),
        "bmm": (0.50, 0.070, 15.0, 31500.0),
        "output": (0.0048, 56.0),
    },
}


def _cost_features(batch, in_channels, out_channels, kh, kw, num_experts, oh, ow, groups) -> dict[str, tuple]:
    """The terms of each strategy's cost (see :func:`choose_mixture_strategy`); the benchmark fits on them."""
    kernel_params = out_channels * (in_channels // groups) * kh * kw  # P: one expert's kernel
    macs = batch * kernel_params * oh * ow  # M: one ordinary convolution of the batch
    mix = batch * num_experts * kernel_params
    cols = 0 if kh == kw == 1 else batch * in_channels * kh * kw * oh * ow  # im2col elements
    return {
        "weight": (mix, macs, batch * groups),
        "loop": (mix, macs, batch, batch * groups),
        "bmm": (mix, macs, cols, batch * groups),
        "output": (num_experts * macs, num_experts * batch * out_channels * oh * ow),
    }


def mixture_costs(
    batch: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    num_experts: int,
    out_hw: int | Sequence[int],
    groups: int = 1,
    requires_grad: bool = False,
) -> dict[str, float]:
    """Estimated time in nanoseconds of each strategy (keys ``"weight"``, ``"loop"``, ``"bmm"``, ``"output"``).

    Same arguments as :func:`choose_mixture_strategy`.
    """
    kh, kw = _pair("kernel_size", kernel_size, minimum=1)
    oh, ow = _pair("out_hw", out_hw, minimum=1)
    consts = _COST[bool(requires_grad)]
    features = _cost_features(batch, in_channels, out_channels, kh, kw, num_experts, oh, ow, groups)
    return {name: float(sum(c * f for c, f in zip(consts[name], feats))) for name, feats in features.items()}


def choose_mixture_strategy(
    batch: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    num_experts: int,
    out_hw: int | Sequence[int],
    groups: int = 1,
    requires_grad: bool = False,
) -> str:
    """Pick the cheapest exact strategy of :func:`mixture_conv2d` from a cost model.

    Cost model (pycoe's; times in nanoseconds, one set of constants ``a`` with and one without backward)::

        weight = a1 * B*E*P + a2 * M + a3 * B*g
        loop   = a1 * B*E*P + a2 * M + a3 * B + a4 * B*g
        bmm    = a1 * B*E*P + a2 * M + a3 * B*C*kh*kw*h*w [0 for 1x1 kernels] + a4 * B*g
        output = a1 * E*M + a2 * E*B*O*h*w

    where ``P = O*(C/g)*kh*kw`` is one kernel's size, ``M = B*P*h*w`` the multiply-accumulates of one ordinary
    convolution of the batch and ``h, w`` the output size. The three weight-mixing strategies pay for mixing
    the kernels and for the convolution at their own rate per multiply-add, plus: the grouped convolution a
    per-group overhead, the loop a per-call overhead, bmm the im2col copy (none for a 1x1 kernel) and a
    per-matrix overhead; output mixing pays for E convolutions and the weighted sum. Each strategy's
    constants are a non-negative least-squares fit of its measured times (relative error) over the
    benchmark grid: ``python benchmarks/bench_condconv.py --calibrate --threads 1``.

    At batch 1, :func:`mixture_conv2d` does not consult this (it runs one convolution with the mixed kernel).

    Args:
        batch: B.  in_channels: C.  out_channels: O.  kernel_size: k or (kh, kw).
        num_experts: E.  out_hw: output spatial size, int or (h, w).  groups: g.
        requires_grad: whether a backward pass will follow.

    Returns:
        ``"weight"``, ``"loop"``, ``"bmm"`` or ``"output"``.
    """
    costs = mixture_costs(batch, in_channels, out_channels, kernel_size, num_experts, out_hw, groups, requires_grad)
    return min(costs, key=costs.__getitem__)


@functools.lru_cache(maxsize=4096)
def _cached_choice(batch, in_channels, out_channels, kernel, num_experts, out_hw, groups, requires_grad) -> str:
    """choose_mixture_strategy, memoised per shape (``auto`` calls it on every forward)."""
    return choose_mixture_strategy(
        batch=batch,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel,
        num_experts=num_experts,
        out_hw=out_hw,
        groups=groups,
        requires_grad=requires_grad,
    )
