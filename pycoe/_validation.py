"""Small argument checks shared by every pycoe module.

Each raises ``ValueError`` (or ``TypeError`` for a wrong type) with a message that names the argument
and says what was expected, so that bad input never surfaces as a deep shape error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "check_tensor",
    "check_positive_int",
    "check_nonnegative_int",
    "check_int",
    "check_finite_float",
    "check_positive_float",
    "check_nonnegative_float",
    "check_probability",
    "check_choice",
    "check_finite",
    "check_int_pair",
    "check_conv_padding",
]


def check_tensor(
    name: str,
    value: Any,
    *,
    ndim: int | Sequence[int] | None = None,
    floating: bool = False,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of the expected rank, shape and kind, and return it.

    ``shape`` may hold ``None`` for a free dimension.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if shape is not None:
        if value.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, value.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise if ``value`` holds NaN or an infinity."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = "NaN" if bool(torch.isnan(value).any()) else "an infinite value"
        raise ValueError(f"{name} must be finite, but it contains {bad}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise ``TypeError`` unless it is an integer (``bool`` is rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_finite_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is a finite real number (``bool`` is rejected)."""
    if not _is_real(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is a finite number > 0."""
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is a finite number >= 0."""
    if not _is_real(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_probability(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float in [0, 1], or raise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, or raise listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_int_pair(name: str, value: Any, *, minimum: int = 0) -> tuple[int, int]:
    """Return an int (repeated) or a pair of ints as a pair of ints >= ``minimum``, or raise.

    ``TypeError`` for anything but an int or a length-2 sequence of ints (``bool`` is rejected), ``ValueError``
    for a value below ``minimum``.
    """
    pair: tuple[int, int]
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        pair = value  # the common case first: this check runs on every forward of a convolution layer
    elif type(value) is int:
        pair = (value, value)
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def check_conv_padding(name: str, value: Any) -> tuple[int, int] | str:
    """Return a convolution padding as ``"same"``, ``"valid"`` or a pair of ints >= 0, or raise."""
    if isinstance(value, str):
        return check_choice(name, value, ("same", "valid"))
    return check_int_pair(name, value, minimum=0)
