"""Small argument checks shared by every pycoe module.

Each raises ``ValueError`` (or :class:`ArgumentTypeError`, a ``TypeError``, for a wrong type) with a message
that names the argument and says what was expected, so that bad input never surfaces as a deep shape error.

Checks of tensor *values* (:func:`check_finite`, :func:`check_data`) need the data: eagerly they raise
``ValueError``; under ``torch.compile`` / ``torch.export`` they become ``torch._assert_async`` nodes, so they do
not break the graph, and a violation raises ``RuntimeError`` with the same message when the compiled code runs
(on CUDA: a device-side assert).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch

__all__ = [
    "ArgumentTypeError",
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
    "check_data",
    "check_expert_index",
    "check_bool",
    "check_callable",
    "check_dtype",
    "check_device",
    "check_generator",
    "check_class_targets",
    "check_number",
    "check_int_pair",
    "check_conv_padding",
]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class ArgumentTypeError(TypeError):
    """An argument of the wrong type (e.g. a string or a float where an int is expected): a ``TypeError``.

    A wrong *value* of the right type (a negative count, a probability above 1) raises ``ValueError``.
    """


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
    """Raise if ``value`` holds NaN or an infinity (under ``torch.compile``: see the module docstring)."""
    if not value.is_floating_point():
        return value
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(value).all(), f"{name} must be finite, but it contains NaN or inf")
        return value
    if not bool(torch.isfinite(value).all()):
        bad = "NaN" if bool(torch.isnan(value).any()) else "an infinite value"
        raise ValueError(f"{name} must be finite, but it contains {bad}")
    return value


def check_data(condition: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError(message + detail())`` unless the boolean 0-dim tensor ``condition`` is true.

    ``detail`` (optional) computes a data-dependent suffix (e.g. the offending range), called only eagerly
    and only on failure. Under ``torch.compile`` / ``torch.export`` the check is a ``torch._assert_async``
    with ``message`` (see the module docstring).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
        return
    if not bool(condition):
        raise ValueError(message + (detail() if detail is not None else ""))


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise ``TypeError`` unless it is an integer (``bool`` is rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _real(name: str, value: Any, expected: str) -> float:
    """``value`` as a float if it is a real number: a Python or NumPy scalar, or a one-element non-bool tensor
    (``bool`` is not). Raise :class:`ArgumentTypeError` otherwise. Not checked for finiteness."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
            return float(value.item())
    elif not isinstance(value, bool) and isinstance(value, numbers.Real) and type(value).__name__ != "bool_":
        return float(value)
    raise ArgumentTypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def check_finite_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is a finite real number (``bool`` is rejected)."""
    real = _real(name, value, "a finite number")
    if not math.isfinite(real):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return real


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is a finite number > 0."""
    real = _real(name, value, "a finite number > 0")
    if not math.isfinite(real) or real <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return real


def check_nonnegative_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is a finite number >= 0."""
    real = _real(name, value, "a finite number >= 0")
    if not math.isfinite(real) or real < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return real


@overload
def check_probability(name: str, value: Any, *, allow_none: Literal[False] = False) -> float: ...


@overload
def check_probability(name: str, value: Any, *, allow_none: bool) -> float | None: ...


def check_probability(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float in [0, 1], or raise."""
    if value is None and allow_none:
        return None
    real = _real(name, value, "a number in [0, 1]")
    if not 0.0 <= real <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return real


def check_expert_index(
    name: str, index: Any, num_experts: int, *, allow_exited: bool = False, size_name: str = "num_experts"
) -> torch.Tensor:
    """Check a ``LongTensor[B]`` of expert ids in ``[0, num_experts)`` (``-1`` allowed for exited samples when
    ``allow_exited``) and return it as int64.

    ``size_name`` names the bound in the message (e.g. ``"C"`` for class indices). The range check reads the
    data: under ``torch.compile`` it is a ``torch._assert_async`` (see :func:`check_data`).
    """
    check_tensor(name, index, ndim=1)
    if index.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (expert ids), got dtype {index.dtype}")
    low = -1 if allow_exited else 0
    lo = "-1 (exited)" if allow_exited else "0"
    check_data(
        ((index >= low) & (index < num_experts)).all(),
        f"{name} entries must lie in [{lo}, {num_experts}) ({size_name}={num_experts})",
        lambda: f", got range [{int(index.min())}, {int(index.max())}]",
    )
    return index.long()


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, or raise listing them (``ArgumentTypeError`` for a non-str)."""
    listed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be one of {listed} (a str), got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value``, or raise ``TypeError`` unless it is a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
) -> float:
    """Return ``value`` as a float: ``TypeError`` unless a real number (``bool`` rejected), ``ValueError`` unless
    finite and within the bounds (``> minimum`` if ``strict``, else ``>= minimum``; ``<= maximum``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if strict else '>='} {minimum:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    want = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return float(value)


def check_callable(name: str, value: Any, *, allow_none: bool = False, expected: str = "") -> Any:
    """Return ``value`` if it is callable (or ``None`` when allowed), or raise ``TypeError``."""
    if value is None and allow_none:
        return None
    if not callable(value):
        what = f" ({expected})" if expected else ""
        none = " or None" if allow_none else ""
        raise TypeError(f"{name} must be callable{what}{none}, got {type(value).__name__}")
    return value


def check_dtype(name: str, value: Any, *, floating: bool = True, allow_none: bool = True) -> torch.dtype | None:
    """Return ``value`` if it is a ``torch.dtype`` (floating point when ``floating``), or ``None`` when allowed."""
    if value is None and allow_none:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (e.g. torch.float32), got {value!r}")
    if floating and not value.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype (e.g. torch.float32), got {value}")
    return value


def check_device(name: str, value: Any, *, allow_none: bool = True) -> torch.device | None:
    """Return ``value`` as a ``torch.device`` (from a device or a string such as ``"cuda:0"``), or ``None``."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda:0', got {value!r}")
    try:
        return torch.device(value)
    except RuntimeError:
        raise ValueError(f"{name} must be a valid device such as 'cpu' or 'cuda:0', got {value!r}") from None


def check_generator(name: str, value: Any) -> torch.Generator | None:
    """Return ``value`` if it is a ``torch.Generator`` or ``None``, or raise ``TypeError``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def check_class_targets(
    name: str, target: Any, batch: int, num_classes: int, *, probabilities: bool = False
) -> torch.Tensor:
    """Check classification targets for logits ``[B, C]``: class indices ``LongTensor[B]`` in ``[0, C)``, or, when
    ``probabilities``, class probabilities ``Tensor[B, C]`` (floating point). Returns ``target``.

    The range check reads the data: under ``torch.compile`` it is a ``torch._assert_async`` (see :func:`check_data`).
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dim() == 0 or target.shape[0] != batch:
        raise ValueError(f"{name} must be batch-first with B={batch}, got shape {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex():
        if probabilities and target.is_floating_point() and tuple(target.shape) == (batch, num_classes):
            return target
        want = f"class indices LongTensor[B={batch}]"
        if probabilities:
            want += f" or class probabilities Tensor[B={batch}, C={num_classes}]"
        raise TypeError(f"{name} must be {want}, got shape {tuple(target.shape)} and dtype {target.dtype}")
    if target.dtype == torch.bool or target.dim() != 1:
        raise TypeError(
            f"{name} must be class indices LongTensor[B={batch}], got shape {tuple(target.shape)} and dtype "
            f"{target.dtype}"
        )
    if target.numel():
        check_data(
            ((target >= 0) & (target < num_classes)).all(),
            f"{name} must hold class indices in [0, {num_classes}) (C = {num_classes} classes of the logits)",
            lambda: f", got values in [{int(target.min())}, {int(target.max())}]",
        )
    return target


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
