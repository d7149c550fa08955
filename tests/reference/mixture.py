"""Slow, obviously correct mixture convolution: the oracle of :func:`pycoe.functional.mixture_conv2d`.

A Python loop over the samples and the kernels: sample ``b``'s kernel is built as an explicit sum
``sum_e coefficients[b, e] * weight_bank[e]`` and one ``F.conv2d`` runs on ``x[b : b + 1]``. ``"same"`` padding
with stride 1 uses torch's own ``padding="same"``; with a larger stride the TensorFlow rule (output
``ceil(size / stride)``, the odd pixel of padding after) is spelled out here, independently of the library.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["mixture_conv2d_reference"]


def _as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def mixture_conv2d_reference(
    x: torch.Tensor,
    weight_bank: torch.Tensor,
    coefficients: torch.Tensor,
    bias_bank: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Same arguments and result as :func:`pycoe.functional.mixture_conv2d` (no ``strategy``), for valid input."""
    if x.shape[0] == 0:  # an empty batch, as nn.Conv2d answers it: the shape of one sample's output, 0 samples
        one = mixture_conv2d_reference(
            x.new_zeros((1, *x.shape[1:])),
            weight_bank,
            coefficients.new_zeros((1, coefficients.shape[1])),
            bias_bank,
            stride,
            padding,
            dilation,
            groups,
        )
        return one[:0]
    stride_, dilation_ = _as_pair(stride), _as_pair(dilation)
    kh, kw = weight_bank.shape[3], weight_bank.shape[4]
    num_kernels = weight_bank.shape[0]
    outputs = []
    for b in range(x.shape[0]):
        kernel = sum(coefficients[b, e] * weight_bank[e] for e in range(num_kernels))
        bias = None
        if bias_bank is not None:
            bias = sum(coefficients[b, e] * bias_bank[e] for e in range(num_kernels))
        xb = x[b : b + 1]
        pad_arg: tuple[int, int] | str
        if padding == "same" and stride_ != (1, 1):
            pads: list[int] = []
            axes = ((xb.shape[-1], kw, stride_[1], dilation_[1]), (xb.shape[-2], kh, stride_[0], dilation_[0]))
            for size, k, s, d in axes:  # F.pad lists the last axis first
                need = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                pads += [need // 2, need - need // 2]
            xb = F.pad(xb, pads)
            pad_arg = (0, 0)
        elif isinstance(padding, str):
            pad_arg = padding
        else:
            pad_arg = _as_pair(padding)
        with warnings.catch_warnings():  # torch warns that an even kernel's "same" padding copies the input
            warnings.simplefilter("ignore", UserWarning)
            outputs.append(F.conv2d(xb, kernel, bias, stride_, pad_arg, dilation_, groups))  # type: ignore[arg-type]
    return torch.cat(outputs, dim=0)
