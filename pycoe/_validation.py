"""Small argument checks shared by every pycoe module.

Each raises ``ValueError`` (or ``TypeError`` for a wrong type) with a message that names the argument
and says what was expected, so that bad input never surfaces as a deep shape error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, overload

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
    "check_expert_index",
]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


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


@overload
def check_probability(name: str, value: Any, *, allow_none: Literal[False] = False) -> float: ...


@overload
def check_probability(name: str, value: Any, *, allow_none: bool) -> float | None: ...


def check_probability(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float in [0, 1], or raise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_expert_index(name: str, index: Any, num_experts: int, *, allow_exited: bool = False) -> torch.Tensor:
    """Check a ``LongTensor[B]`` of expert ids in ``[0, num_experts)`` (``-1`` allowed for exited samples when
    ``allow_exited``) and return it as int64."""
    check_tensor(name, index, ndim=1)
    if index.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (expert ids), got dtype {index.dtype}")
    low = -1 if allow_exited else 0
    if index.numel() and (int(index.min()) < low or int(index.max()) >= num_experts):
        lo = "-1 (exited)" if allow_exited else "0"
        raise ValueError(
            f"{name} entries must lie in [{lo}, {num_experts}) (num_experts={num_experts}), "
            f"got range [{int(index.min())}, {int(index.max())}]"
        )
    return index.long()


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, or raise listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value
