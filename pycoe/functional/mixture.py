"""Mixture convolution: a bank of E convolution kernels mixed per sample.

This is the mechanism under CondConv (Yang, Bender, Le, Ngiam, "CondConv: Conditionally Parameterized
Convolutions for Efficient Inference", NeurIPS 2019, arXiv:1904.04971) and under BasisNet's synthesised
specialist models. For one sample with mixing coefficients :math:`\\alpha \\in \\mathbb{R}^E`,

.. math::

    y = \\Big(\\sum_{e} \\alpha_e W_e\\Big) * x + \\sum_e \\alpha_e b_e
      = \\sum_e \\alpha_e \\,(W_e * x + b_e),

because a convolution is linear in its kernel. The two sides give the exact strategies:

* ``"weight"`` (weight mixing, the CondConv paper's form and timm's algorithm): one matmul builds a kernel per
  sample, then ONE grouped convolution with ``groups = B * g`` runs every sample with its own kernel (the batch
  is folded into the channel axis: ``x`` is reshaped to ``[1, B*C, H, W]``).
* ``"bmm"`` (weight mixing too): the same matmul, then the convolution as ONE batched matrix multiply
  ``[B*g, O/g, C/g*kh*kw] @ [B*g, C/g*kh*kw, h*w]``; a 1x1 kernel needs no im2col (the input is the right
  matrix as it is), larger kernels go through ``F.unfold``. No operator attribute depends on the batch, so
  this is also the form that exports with a dynamic batch.
* ``"output"`` (output mixing): one ordinary convolution with ``E * O`` output channels on the whole batch,
  then the coefficient-weighted sum over the E outputs.

At batch 1 every weight-mixing strategy is the same computation, so it runs as one ``F.conv2d`` with the
mixed kernel. ``"auto"`` picks one with :func:`choose_mixture_strategy` (a few comparisons, no state).

Einstein legend used in shapes::

    b  batch                 e  kernels of the bank (E)
    g  convolution groups    o  output channels       c  input channels per group
    kh, kw kernel height/width;  h, w spatial size (of the output where it follows a convolution)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pycoe._validation import (
    check_bool,
    check_choice,
    check_conv_padding,
    check_int_pair,
    check_positive_int,
    check_tensor,
)

__all__ = [
    "mixture_conv2d",
    "choose_mixture_strategy",
    "MIXTURE_STRATEGIES",
    "mixture_coefficients",
    "COEFFICIENT_NORMALIZATIONS",
]

#: The strategies accepted by :func:`mixture_conv2d`.
MIXTURE_STRATEGIES = ("auto", "weight", "bmm", "output")

#: The ways :func:`mixture_coefficients` turns logits into mixing coefficients (the ``normalization`` argument of
#: :class:`~pycoe.layers.condconv.CondConvRouter` and :func:`~pycoe.layers.condconv.convert_conv2d_to_condconv`).
COEFFICIENT_NORMALIZATIONS = ("sigmoid", "normalized_sigmoid", "softmax", "none")

_PadArg = int | Sequence[int] | str
_Pair = tuple[int, int]


# ----------------------------------------------------------------------------------------------------------------
# argument handling
# ----------------------------------------------------------------------------------------------------------------
def _check_arguments(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    coefficients: torch.Tensor,
    bias_bank: torch.Tensor | None,
    groups: int,
) -> None:
    """Raise a clear error for any inconsistency of the tensors of :func:`mixture_conv2d` (runs on every call:
    each test is one attribute read when the arguments are valid)."""
    check_tensor("x", x, ndim=4, floating=True)
    check_tensor("weight_bank", weight_bank, ndim=5, floating=True)
    check_tensor("coefficients", coefficients, ndim=2, floating=True)
    if bias_bank is not None:
        check_tensor("bias_bank", bias_bank, ndim=2, floating=True)
    batch, channels = x.shape[:2]
    num_kernels, out_channels, cpg = weight_bank.shape[:3]
    if num_kernels < 1:
        raise ValueError(f"weight_bank must hold at least one kernel (shape[0] >= 1), got {tuple(weight_bank.shape)}")
    if coefficients.shape[0] != batch or coefficients.shape[1] != num_kernels:
        raise ValueError(
            f"coefficients must have shape [B, E] = [{batch}, {num_kernels}] (B = x.shape[0], "
            f"E = weight_bank.shape[0]), got {tuple(coefficients.shape)}"
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
    if bias_bank is not None and (bias_bank.shape[0] != num_kernels or bias_bank.shape[1] != out_channels):
        raise ValueError(
            f"bias_bank must have shape [E, O] = [{num_kernels}, {out_channels}], got {tuple(bias_bank.shape)}"
        )
    _check_like_x(x, "weight_bank", weight_bank)
    _check_like_x(x, "coefficients", coefficients)
    if bias_bank is not None:
        _check_like_x(x, "bias_bank", bias_bank)


def _check_like_x(x: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF-style "same" padding along one axis: output size ceil(size / stride), the odd pixel after."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    # sym_max: no branch on a traced (symbolic) size; an int for an int size
    total: int = torch.sym_max((out - 1) * stride + effective - size, 0)  # type: ignore[assignment]
    return total // 2, total - total // 2


def _resolve_padding(
    x: torch.Tensor,
    padding: tuple[int, int] | str,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Turn ``padding`` into a symmetric conv padding, padding ``x`` explicitly when "same" is asymmetric."""
    if not isinstance(padding, str):
        return x, padding
    if padding == "valid":
        return x, (0, 0)
    top, bottom = _same_pads(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = _same_pads(x.shape[-1], kernel[1], stride[1], dilation[1])
    # A traced spatial size (a SymInt) takes the explicit pad: whether the padding is symmetric depends on it.
    static = isinstance(top, int) and isinstance(left, int)
    if static and top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# ----------------------------------------------------------------------------------------------------------------
# the strategies: (x, weight_bank, coefficients, bias_bank, stride, padding, dilation, groups) -> Tensor[B, O, h, w]
# ----------------------------------------------------------------------------------------------------------------
def _single_sample(
    x: torch.Tensor,
    bank: torch.Tensor,
    coef: torch.Tensor,
    bias: torch.Tensor | None,
    s: _Pair,
    p: _Pair,
    d: _Pair,
    g: int,
) -> torch.Tensor:
    """Batch 1: one ordinary convolution with the mixed kernel (every weight-mixing strategy reduces to this)."""
    kernel = (coef @ bank.reshape(bank.shape[0], -1)).reshape(bank.shape[1:])
    mixed_bias = None if bias is None else (coef @ bias).reshape(-1)
    return F.conv2d(x, kernel, mixed_bias, s, p, d, g)


def _weight_mixing(
    x: torch.Tensor,
    bank: torch.Tensor,
    coef: torch.Tensor,
    bias: torch.Tensor | None,
    s: _Pair,
    p: _Pair,
    d: _Pair,
    g: int,
) -> torch.Tensor:
    batch, channels, height, width = x.shape
    num_kernels, out_channels = bank.shape[:2]
    # One matmul makes every sample's kernel: [B, E] @ [E, O*C/g*kh*kw].
    kernels = (coef @ bank.reshape(num_kernels, -1)).reshape(batch * out_channels, *bank.shape[2:])
    mixed_bias = None if bias is None else (coef @ bias).reshape(batch * out_channels)
    # Fold the batch into the channels: groups (b, g) see only their own sample's channels and kernel.
    # reshape (not view) so that a channels_last x works.
    folded = x.reshape(1, batch * channels, height, width)
    out = F.conv2d(folded, kernels, mixed_bias, s, p, d, g * batch)
    return out.reshape(batch, out_channels, out.shape[-2], out.shape[-1])


def _bmm_mixing(
    x: torch.Tensor,
    bank: torch.Tensor,
    coef: torch.Tensor,
    bias: torch.Tensor | None,
    s: _Pair,
    p: _Pair,
    d: _Pair,
    g: int,
) -> torch.Tensor:
    batch = x.shape[0]
    num_kernels, out_channels, cpg, kh, kw = bank.shape
    # kernels[(b g), o, (c kh kw)]: the flat kernel is (g o c kh kw)-ordered, as F.unfold orders (g c kh kw)
    kernels = (coef @ bank.reshape(num_kernels, -1)).reshape(batch * g, out_channels // g, cpg * kh * kw)
    if kh == 1 and kw == 1:
        if p != (0, 0):
            x = F.pad(x, (p[1], p[1], p[0], p[0]))
        if s != (1, 1):
            x = x[:, :, :: s[0], :: s[1]]
        out_h, out_w = x.shape[-2], x.shape[-1]
        cols = x.reshape(batch * g, cpg, out_h * out_w)  # a view for a contiguous x: no im2col at all
    else:
        out_h = _conv_out_size(x.shape[-2], kh, s[0], p[0], d[0])
        out_w = _conv_out_size(x.shape[-1], kw, s[1], p[1], d[1])
        cols = F.unfold(x, (kh, kw), d, p, s).reshape(batch * g, cpg * kh * kw, out_h * out_w)
    if bias is None:
        out = torch.bmm(kernels, cols)
    else:
        mixed_bias = (coef @ bias).reshape(batch * g, out_channels // g, 1)
        out = torch.baddbmm(mixed_bias, kernels, cols)
    return out.reshape(batch, out_channels, out_h, out_w)


def _output_mixing(
    x: torch.Tensor,
    bank: torch.Tensor,
    coef: torch.Tensor,
    bias: torch.Tensor | None,
    s: _Pair,
    p: _Pair,
    d: _Pair,
    g: int,
) -> torch.Tensor:
    batch = x.shape[0]
    num_kernels, out_channels, cpg, kh, kw = bank.shape
    # Order the E*O output channels group-major, (g e o), so that group j of the wide convolution holds every
    # kernel's output channels of group j (a grouped conv splits its output channels into contiguous blocks).
    kernels = bank.reshape(num_kernels, g, out_channels // g, cpg, kh, kw).transpose(0, 1)
    y = F.conv2d(x, kernels.reshape(num_kernels * out_channels, cpg, kh, kw), None, s, p, d, g)
    h, w = y.shape[-2], y.shape[-1]
    y = y.reshape(batch, g, num_kernels, (out_channels // g) * h * w)
    if g > 1:
        y = y.transpose(1, 2)
    # Explicit sizes (no -1): they stay valid for an empty batch.
    y = y.reshape(batch, num_kernels, out_channels * h * w)
    # Coefficient-weighted sum over the kernels as one batched matmul: [B, 1, E] @ [B, E, O*h*w].
    out = torch.bmm(coef.unsqueeze(1), y).reshape(batch, out_channels, h, w)
    if bias is not None:
        out = out + (coef @ bias)[:, :, None, None]
    return out


_IMPLS = {"weight": _weight_mixing, "bmm": _bmm_mixing, "output": _output_mixing}


# ----------------------------------------------------------------------------------------------------------------
# the public functions
# ----------------------------------------------------------------------------------------------------------------
def mixture_coefficients(logits: torch.Tensor, normalization: str) -> torch.Tensor:
    """Mixing coefficients Tensor[B, E] from logits Tensor[B, E], one row per sample.

    ``normalization`` (one of :data:`COEFFICIENT_NORMALIZATIONS`):

    * ``"sigmoid"``: ``sigmoid(logits)``, each in (0, 1), not normalised (the CondConv paper's router);
    * ``"normalized_sigmoid"``: the sigmoids divided by their sum, so each row sums to 1 (pycoe's option);
    * ``"softmax"``: ``softmax(logits)`` over the E kernels, each row sums to 1;
    * ``"none"``: the logits themselves.

    Coefficients that sum to 1 keep a bank of identical kernels equal to that one kernel, whatever the logits:
    that is what a converted model's first forward needs.
    """
    check_tensor("logits", logits, ndim=2, floating=True)
    check_choice("normalization", normalization, COEFFICIENT_NORMALIZATIONS)
    if normalization == "softmax":
        return torch.softmax(logits, dim=1)
    if normalization == "none":
        return logits
    coefficients = torch.sigmoid(logits)
    if normalization == "normalized_sigmoid":
        coefficients = coefficients / coefficients.sum(dim=1, keepdim=True)
    return coefficients


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
    *,
    validate_args: bool = True,
) -> torch.Tensor:
    """Convolve each sample with its own mixture of E kernels.

    For sample ``b`` the result is ``conv2d(x[b], sum_e coefficients[b, e] * weight_bank[e]) +
    sum_e coefficients[b, e] * bias_bank[e]``, computed for the whole batch at once.

    Args:
        x: Tensor[B, C, H, W], floating point; contiguous or channels_last. ``B = 0`` gives an empty
            Tensor[0, O, H', W'], as ``nn.Conv2d`` does.
        weight_bank: Tensor[E, O, C/groups, kh, kw], the bank of E convolution kernels.
        coefficients: Tensor[B, E], the mixing coefficients of each sample (any real numbers; CondConv's
            sigmoid router gives values in (0, 1) that need not sum to 1).
        bias_bank: Tensor[E, O] or None, one bias per kernel, mixed with the same coefficients.
        stride: int or (sh, sw).
        padding: int, (ph, pw), ``"valid"`` (no padding) or ``"same"``. ``"same"`` follows TensorFlow's
            rule and so also works for strided convolutions (unlike ``torch.nn.functional.conv2d``): the
            output has ``ceil(H / sh)`` rows, and when the total padding is odd the extra row/column goes at
            the bottom/right. For stride 1 it equals torch's ``padding="same"``.
        dilation: int or (dh, dw).
        groups: convolution groups ``g``: C and O must be divisible by it (``groups=C`` is depthwise).
        strategy: ``"weight"`` (mix kernels, one grouped conv with ``groups = B*g``: timm's algorithm),
            ``"bmm"`` (mix kernels, the convolution as one batched matmul, through ``F.unfold`` unless the
            kernel is 1x1), ``"output"`` (one conv with ``E*O`` output channels, then the weighted sum) or
            ``"auto"`` (pick with :func:`choose_mixture_strategy`). All are exact; they differ only in float
            rounding and speed. At batch 1 every strategy but ``"output"`` is one ``F.conv2d`` with the mixed
            kernel.
        validate_args: ``False`` skips the checks of the arguments' types, shapes, dtypes and devices (as
            ``torch.distributions`` does with the same flag), for callers that have checked them:
            :class:`~pycoe.layers.condconv.CondConv2d` checks its configuration once at construction and its
            inputs on every call, then calls this with ``validate_args=False``, ``stride`` and ``dilation`` as
            pairs and ``padding`` as a pair, ``"same"`` or ``"valid"``. With invalid arguments the result is
            then an error from deep inside torch, or undefined. An input too small for the kernel is reported
            either way.

    Returns:
        Tensor[B, O, H', W'], channels_last if ``x`` was (and is not also contiguous).

    Raises:
        TypeError: an argument of the wrong type (a non-tensor, a non-floating tensor, a non-int stride...) or
            tensors of different dtypes.
        ValueError: inconsistent shapes or devices (see the message), a bad stride/padding/dilation/groups
            value or an unknown strategy.
    """
    stride_: _Pair
    dilation_: _Pair
    padding_: _Pair | str
    if check_bool("validate_args", validate_args):
        stride_ = check_int_pair("stride", stride, minimum=1)
        dilation_ = check_int_pair("dilation", dilation, minimum=1)
        padding_ = check_conv_padding("padding", padding)
        check_choice("strategy", strategy, MIXTURE_STRATEGIES)
        groups = check_positive_int("groups", groups)
        _check_arguments(x, weight_bank, coefficients, bias_bank, groups)
    else:
        stride_, dilation_, padding_ = stride, dilation, padding  # type: ignore[assignment]
    kh, kw = weight_bank.shape[3], weight_bank.shape[4]
    x_padded, conv_padding = _resolve_padding(x, padding_, (kh, kw), stride_, dilation_)
    out_h = _conv_out_size(x_padded.shape[-2], kh, stride_[0], conv_padding[0], dilation_[0])
    out_w = _conv_out_size(x_padded.shape[-1], kw, stride_[1], conv_padding[1], dilation_[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[-2:])} is too small for kernel {(kh, kw)} with dilation "
            f"{dilation_} and padding {padding!r}"
        )
    batch = x.shape[0]
    static_batch = isinstance(batch, int)  # False while exporting/compiling with a dynamic batch (a SymInt)
    if static_batch and batch == 0:
        strategy = "output"  # exact for any batch; the weight-mixing forms need at least one sample
    elif static_batch and batch == 1 and strategy != "output":
        # the lean path: one conv with the mixed kernel; conv2d keeps a channels_last x channels_last
        return _single_sample(x_padded, weight_bank, coefficients, bias_bank, stride_, conv_padding, dilation_, groups)
    elif strategy == "auto":
        strategy = choose_mixture_strategy(batch if static_batch else None, (kh, kw), (out_h, out_w), groups)
    out = _IMPLS[strategy](x_padded, weight_bank, coefficients, bias_bank, stride_, conv_padding, dilation_, groups)
    if static_batch and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _output_size(out_hw: object) -> tuple[int, int]:
    """``out_hw`` as a pair; its entries may be symbolic (a traced spatial size), which are not compared here."""
    if isinstance(out_hw, (int, torch.SymInt)) and not isinstance(out_hw, bool):
        pair = (out_hw, out_hw)
    elif isinstance(out_hw, Sequence) and not isinstance(out_hw, str) and len(out_hw) == 2:
        pair = (out_hw[0], out_hw[1])
    else:
        raise TypeError(f"out_hw must be an int or a pair of ints, got {out_hw!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)) for v in pair):
        raise TypeError(f"out_hw must be an int or a pair of ints, got {out_hw!r}")
    if any(isinstance(v, int) and v < 1 for v in pair):
        raise ValueError(f"out_hw must be >= 1, got {out_hw!r}")
    return pair  # type: ignore[return-value]


def choose_mixture_strategy(
    batch: int | None,
    kernel_size: int | Sequence[int],
    out_hw: int | Sequence[int],
    groups: int = 1,
) -> str:
    """The strategy that ``strategy="auto"`` runs for a batch of B >= 2 samples: a fixed rule, no state.

    1. An output map of one pixel (a squeeze-excitation convolution on a pooled map): ``"output"``. Output
       mixing then does the same multiply-adds as weight mixing (E*B*P against B*E*P to mix the kernels plus
       B*P to convolve, with P the size of one kernel), but as one dense matrix product on the whole batch
       instead of B tiny per-sample convolutions.
    2. The batch is unknown (``batch=None``: tracing with a dynamic batch, under ``torch.export`` or
       ``torch.compile``): ``"bmm"``, the weight mixing whose graph does not depend on the batch (a grouped
       convolution with ``groups = B*g`` cannot export with a symbolic B; ONNX needs a static group count).
    3. A dense (``groups=1``) 1x1 convolution: ``"bmm"``, the convolution as one batched matrix product on
       the input as it lies in memory (no im2col).
    4. Otherwise: ``"weight"``, timm's algorithm (one grouped convolution).

    Rules 1 and 3 are where a strategy measurably beats the grouped convolution on the CPU, forward and forward
    + backward (``benchmarks/bench_condconv.py``; the tables are in the CondConv guide); elsewhere no strategy
    was faster than it.

    Args:
        batch: B, or ``None`` when the batch is not known while tracing.
        kernel_size: k or (kh, kw).
        out_hw: output spatial size, int or (h, w) (symbolic sizes are accepted).
        groups: convolution groups g.

    Returns:
        ``"weight"``, ``"bmm"`` or ``"output"``.
    """
    groups = check_positive_int("groups", groups)
    kh, kw = check_int_pair("kernel_size", kernel_size, minimum=1)
    oh, ow = _output_size(out_hw)
    if oh * ow == 1:
        return "output"
    if batch is None:
        return "bmm"
    if kh == kw == 1 and groups == 1:
        return "bmm"
    return "weight"
