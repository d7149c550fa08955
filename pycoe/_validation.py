"""Argument checks shared by every pycoe module: each check is written here once, with one behaviour.

**Errors.** A wrong type raises :class:`ArgumentTypeError` (a ``TypeError``), a wrong value ``ValueError``. The
message names the argument, says what was expected and what was received:
``"<name> must be <what>, got <type> <value>"`` (the value is shown for numbers, strings and bools).

**Numbers: one rule for every number check** (:func:`check_int`, :func:`check_positive_int`,
:func:`check_nonnegative_int`, :func:`check_number` and the float checks built on it, :func:`check_int_pair`):

* a number may be a Python number, a NumPy scalar (``numpy.float32(0.5)``, ``numpy.int64(3)``) or a 0-d tensor of
  a real dtype (``torch.tensor(0.5)``); the check returns a Python ``int`` or ``float``;
* a ``bool`` is never a number: Python's ``True``, ``numpy.bool_`` and bool tensors raise ``TypeError``;
* a tensor or array with one or more dimensions is not a number, even with one element (``TypeError``);
  so is a complex number;
* the integer checks take integers only: a float, even ``2.0`` (and a floating 0-d tensor), is a ``TypeError``;
  the float checks take integers too and return them as floats.

**Factory keywords.** ``device`` and ``dtype`` arguments that are only passed on to torch's factories
(``torch.empty``, ``nn.Linear``) are not checked here: torch checks them (as in timm's layers). :func:`check_device`
and :func:`check_dtype` are for arguments that pycoe uses itself (e.g. the device to move a batch to).

**Tensor values.** Checks that read a tensor's data (:func:`check_finite`, :func:`check_data`) raise ``ValueError``
eagerly; under ``torch.compile`` / ``torch.export`` they become ``torch._assert_async`` nodes, so they do not break
the graph, and a violation raises ``RuntimeError`` with the same message when the compiled code runs (on CUDA: a
device-side assert).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
from torch import nn

__all__ = [
    "ArgumentTypeError",
    "check_tensor",
    "check_int",
    "check_positive_int",
    "check_nonnegative_int",
    "check_number",
    "check_finite_float",
    "check_positive_float",
    "check_nonnegative_float",
    "check_probability",
    "check_int_pair",
    "check_conv_padding",
    "check_choice",
    "check_bool",
    "check_callable",
    "check_module",
    "check_dtype",
    "check_device",
    "check_generator",
    "check_path",
    "check_finite",
    "check_data",
    "check_expert_index",
    "check_class_targets",
    "describe",
]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class ArgumentTypeError(TypeError):
    """An argument of the wrong type (e.g. a string or a float where an int is expected): a ``TypeError``.

    A wrong *value* of the right type (a negative count, a probability above 1) raises ``ValueError``.
    """


def describe(value: Any) -> str:
    """What was received, for a message: the type's name, and the value itself for a number, str or bool."""
    kind = type(value).__name__
    if isinstance(value, (numbers.Number, str)) or type(value).__name__ == "bool_":
        text = repr(value)
        return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"
    if isinstance(value, torch.Tensor):
        return f"{kind} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return kind


# ----------------------------------------------------------------------------------------------------------------
# numbers (the rule is in the module docstring)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _as_int(name: str, value: Any, want: str) -> int:
    """``value`` as an int under the number rule, or :class:`ArgumentTypeError` saying ``want``."""
    if type(value) is int:
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.dtype in _INTEGER_DTYPES:
            return int(value.item())
    elif isinstance(value, numbers.Integral) and not _is_bool(value):
        return int(value)
    raise ArgumentTypeError(f"{name} must be {want}, got {describe(value)}")


def _as_real(name: str, value: Any, want: str) -> float:
    """``value`` as a float under the number rule (not checked for finiteness), or :class:`ArgumentTypeError`."""
    if type(value) is float or type(value) is int:
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
            return float(value.item())
    elif isinstance(value, numbers.Real) and not _is_bool(value):
        return float(value)
    raise ArgumentTypeError(f"{name} must be {want}, got {describe(value)}")


def check_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise ``TypeError`` unless it is an integer (see the number rule)."""
    return _as_int(name, value, "an int")


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= 1."""
    result = _as_int(name, value, "a positive integer")
    if result < 1:
        raise ValueError(f"{name} must be a positive integer, got {result!r}")
    return result


def check_nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= 0."""
    result = _as_int(name, value, "a non-negative integer")
    if result < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {result!r}")
    return result


def _bounds_phrase(minimum: float | None, strict: bool, maximum: float | None) -> str:
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if strict else '>='} {minimum:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    return "a finite number" + (" " + " and ".join(bounds) if bounds else "")


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    expected: str | None = None,
) -> float:
    """Return ``value`` as a float: ``TypeError`` unless a real number (see the number rule), ``ValueError``
    unless finite and within the bounds (``> minimum`` if ``strict``, else ``>= minimum``; ``<= maximum``).

    ``expected`` words what was expected in both messages; by default the ``TypeError`` says "a real number" and
    the ``ValueError`` states the bounds ("a finite number >= 0 and <= 1").
    :func:`check_finite_float`, :func:`check_positive_float`, :func:`check_nonnegative_float` and
    :func:`check_probability` are this check with common bounds.
    """
    want = expected or _bounds_phrase(minimum, strict, maximum)
    real = _as_real(name, value, expected or "a real number")
    shown = value if isinstance(value, (int, float)) and not isinstance(value, bool) else real
    if not -math.inf < real < math.inf:  # (NaN compares False) comparisons only: real may be traced (SymFloat)
        raise ValueError(f"{name} must be {want}, got {shown!r}")
    if minimum is not None and (real <= minimum if strict else real < minimum):
        raise ValueError(f"{name} must be {want}, got {shown!r}")
    if maximum is not None and real > maximum:
        raise ValueError(f"{name} must be {want}, got {shown!r}")
    return real


def check_finite_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is a finite real number."""
    return check_number(name, value, expected="a finite number")


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is a finite number > 0."""
    return check_number(name, value, minimum=0, strict=True, expected="a finite number > 0")


def check_nonnegative_float(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise unless it is a finite number >= 0."""
    return check_number(name, value, minimum=0, expected="a finite number >= 0")


@overload
def check_probability(name: str, value: Any, *, allow_none: Literal[False] = False) -> float: ...


@overload
def check_probability(name: str, value: Any, *, allow_none: bool) -> float | None: ...


def check_probability(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float in [0, 1] (or ``None`` when ``allow_none``), or raise."""
    if value is None and allow_none:
        return None
    return check_number(name, value, minimum=0, maximum=1, expected="a number in [0, 1]")


def check_int_pair(name: str, value: Any, *, minimum: int = 0) -> tuple[int, int]:
    """Return an int (repeated) or a pair of ints as a pair of ints >= ``minimum``, or raise.

    ``TypeError`` for anything but an integer or a length-2 sequence of integers (see the number rule),
    ``ValueError`` for a value below ``minimum``.
    """
    pair: tuple[int, int]
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        pair = value  # the common case first: this check runs on every forward of a convolution layer
    else:
        want = "an int or a pair of ints"
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != 2:
                raise ArgumentTypeError(f"{name} must be {want}, got {value!r}")
            pair = (_as_int(name, value[0], want), _as_int(name, value[1], want))
        else:
            single = _as_int(name, value, want)
            pair = (single, single)
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def check_conv_padding(name: str, value: Any) -> tuple[int, int] | str:
    """Return a convolution padding as ``"same"``, ``"valid"`` or a pair of ints >= 0, or raise."""
    if isinstance(value, str):
        return check_choice(name, value, ("same", "valid"))
    return check_int_pair(name, value, minimum=0)


# ----------------------------------------------------------------------------------------------------------------
# choices, flags, callables, modules, torch objects


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, or raise listing them (``ArgumentTypeError`` for a non-str)."""
    if type(value) is str and value in choices:
        return value
    listed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be one of {listed} (a str), got {describe(value)}")
    raise ValueError(f"{name} must be one of {listed}, got {value!r}")


def check_bool(name: str, value: Any) -> bool:
    """Return ``value``, or raise ``TypeError`` unless it is a Python ``bool`` (``0``/``1`` are not)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool, got {describe(value)}")
    return value


def check_callable(name: str, value: Any, *, allow_none: bool = False, expected: str = "") -> Any:
    """Return ``value`` if it is callable (or ``None`` when allowed), or raise ``TypeError``.

    ``expected`` describes the call in the message, e.g. ``"(name, module) -> bool"``.
    """
    if value is None and allow_none:
        return None
    if not callable(value):
        what = f" ({expected})" if expected else ""
        none = " or None" if allow_none else ""
        raise ArgumentTypeError(f"{name} must be callable{what}{none}, got {describe(value)}")
    return value


@overload
def check_module(name: str, value: Any, *, allow_none: Literal[False] = False) -> nn.Module: ...


@overload
def check_module(name: str, value: Any, *, allow_none: bool) -> nn.Module | None: ...


def check_module(name: str, value: Any, *, allow_none: bool = False) -> nn.Module | None:
    """Return ``value`` if it is an ``nn.Module`` (or ``None`` when allowed), or raise ``TypeError``."""
    if isinstance(value, nn.Module) or (value is None and allow_none):
        return value
    none = " or None" if allow_none else ""
    raise ArgumentTypeError(f"{name} must be an nn.Module{none}, got {describe(value)}")


def check_dtype(name: str, value: Any, *, floating: bool = True, allow_none: bool = True) -> torch.dtype | None:
    """Return ``value`` if it is a ``torch.dtype`` (floating point when ``floating``), or ``None`` when allowed.

    Not for factory keywords passed on to torch (see the module docstring).
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, torch.dtype):
        raise ArgumentTypeError(f"{name} must be a torch.dtype (e.g. torch.float32), got {describe(value)}")
    if floating and not value.is_floating_point:
        raise ArgumentTypeError(f"{name} must be a floating-point torch.dtype (e.g. torch.float32), got {value}")
    return value


def check_device(name: str, value: Any, *, allow_none: bool = True) -> torch.device | None:
    """Return ``value`` as a ``torch.device`` (from a device or a string such as ``"cuda:0"``), or ``None``.

    Not for factory keywords passed on to torch (see the module docstring).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise ArgumentTypeError(
            f"{name} must be a torch.device or a string such as 'cpu' or 'cuda:0', got {describe(value)}"
        )
    try:
        return torch.device(value)
    except RuntimeError:
        raise ValueError(f"{name} must be a valid device such as 'cpu' or 'cuda:0', got {value!r}") from None


def check_generator(name: str, value: Any) -> torch.Generator | None:
    """Return ``value`` if it is a ``torch.Generator`` or ``None``, or raise ``TypeError``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise ArgumentTypeError(f"{name} must be a torch.Generator or None, got {describe(value)}")
    return value


def check_path(name: str, value: Any, *, what: str = "a file") -> str:
    """Return a file path (a ``str`` or ``os.PathLike``) as a ``str``, or raise: ``TypeError`` for another type,
    ``ValueError`` for an empty path. ``what`` says which file, e.g. ``"the .onnx file to write"``."""
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a str or os.PathLike ({what}), got {describe(value)}")
    path = os.fspath(value)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"{name} must name {what}, got an empty string")
    return path


# ----------------------------------------------------------------------------------------------------------------
# tensors


def check_tensor(
    name: str,
    value: Any,
    *,
    ndim: int | Sequence[int] | None = None,
    floating: bool = False,
    shape: Sequence[int | None] | None = None,
    batch_first: bool = False,
    batch: int | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of the expected rank, shape and kind, and return it.

    ``shape`` may hold ``None`` for a free dimension. ``batch_first`` asks for a batch dimension (dim 0; a 0-d
    tensor is refused), ``batch`` for a batch dimension of that size.
    """
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {describe(value)}")
    if ndim is not None and value.dim() != ndim:  # the common case first: layers check inputs on every call
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if shape is not None:
        if value.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, value.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    if (batch_first or batch is not None) and (value.dim() == 0 or (batch is not None and value.shape[0] != batch)):
        size = "" if batch is None else f" with B={batch}"
        raise ValueError(f"{name} must be batch-first{size}, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
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
        raise ArgumentTypeError(f"{name} must be an integer tensor (expert ids), got dtype {index.dtype}")
    low = -1 if allow_exited else 0
    lo = "-1 (exited)" if allow_exited else "0"
    check_data(
        ((index >= low) & (index < num_experts)).all(),
        f"{name} entries must lie in [{lo}, {num_experts}) ({size_name}={num_experts})",
        lambda: f", got range [{int(index.min())}, {int(index.max())}]",
    )
    return index.long()


def check_class_targets(
    name: str, target: Any, batch: int, num_classes: int, *, probabilities: bool = False
) -> torch.Tensor:
    """Check classification targets for logits ``[B, C]``: class indices ``LongTensor[B]`` in ``[0, C)``, or, when
    ``probabilities``, class probabilities ``Tensor[B, C]`` (floating point). Returns ``target``.

    The range check reads the data: under ``torch.compile`` it is a ``torch._assert_async`` (see :func:`check_data`).
    """
    if not isinstance(target, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor of class indices, got {describe(target)}")
    check_tensor(name, target, batch=batch)
    if target.is_floating_point() or target.is_complex():
        if probabilities and target.is_floating_point() and tuple(target.shape) == (batch, num_classes):
            return target
        want = f"class indices LongTensor[B={batch}]"
        if probabilities:
            want += f" or class probabilities Tensor[B={batch}, C={num_classes}]"
        raise ArgumentTypeError(f"{name} must be {want}, got shape {tuple(target.shape)} and dtype {target.dtype}")
    if target.dtype == torch.bool or target.dim() != 1:
        raise ArgumentTypeError(
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
