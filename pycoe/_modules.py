"""Private module helpers shared by pycoe's modules: module surgery and small look-ups.

The conversion helpers (activations to :class:`~pycoe.PWLU`, convolutions to :class:`~pycoe.CondConv2d`)
are built on :func:`replace_modules`. The public mode helpers (``eval_mode``, ``preserve_training_modes``) live in
:mod:`pycoe.utils`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pycoe._inputs import UnexpectedInputError, explain_unexpected_keyword
from pycoe._validation import check_module

__all__ = [
    "replace_modules",
    "module_device",
    "floating_reference",
    "tensors_in",
    "InputMismatchError",
    "explain_input_mismatch",
    "explain_call_error",
    "check_same_dtype_and_device",
    "traceable",
    "traceable_paths",
]

_TRACEABLE_PATHS = contextvars.ContextVar("pycoe_traceable_paths", default=False)


def traceable() -> bool:
    """Whether pycoe's forward passes take their traceable paths (no Python branch on a data-dependent count).

    True under ``torch.compile`` and ``torch.export`` (:func:`torch.compiler.is_compiling`), and eagerly inside
    :func:`traceable_paths` (which lets the export preparation and the tests run those paths eagerly).
    """
    return torch.compiler.is_compiling() or _TRACEABLE_PATHS.get()


@contextlib.contextmanager
def traceable_paths() -> Iterator[None]:
    """Make :func:`traceable` true in this thread for the duration of the block."""
    token = _TRACEABLE_PATHS.set(True)
    try:
        yield
    finally:
        _TRACEABLE_PATHS.reset(token)


def module_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter, else of its first buffer; ``None`` for a module without tensors."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return None


def floating_reference(module: nn.Module) -> torch.Tensor | None:
    """``module``'s first floating-point parameter or buffer (the dtype and device new layers should follow)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter
    for buffer in module.buffers():
        if buffer.is_floating_point():
            return buffer
    return None


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside a (nested) structure of tuples, lists and dicts, in ``torch.utils._pytree`` order."""
    flat, _ = torch.utils._pytree.tree_flatten(obj)
    return [t for t in flat if isinstance(t, torch.Tensor)]


class InputMismatchError(TypeError):
    """A module failed because its input's dtype or device disagrees with its parameters (see
    :func:`explain_input_mismatch`); ``dtype`` and ``device`` are the input's."""

    def __init__(self, message: str, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(message)
        self.dtype = dtype
        self.device = device


# Words in torch's messages about mismatched dtypes or devices (e.g. "mat1 and mat2 must have the same dtype",
# "Input type (double) and bias type (float) should be the same", "Expected all tensors to be on the same device").
_MISMATCH_PHRASES = ("dtype", "scalar type", "input type", "device")  # compared case-insensitively
_TYPE_NAMES = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Byte", "Char", "Bool")


def _mentions_dtype_or_device(err: BaseException) -> bool:
    message = str(err)
    lower = message.lower()
    return any(p in lower for p in _MISMATCH_PHRASES) or any(name in message for name in _TYPE_NAMES)


def explain_input_mismatch(err: BaseException, component: str, module: nn.Module, x: Any) -> InputMismatchError | None:
    """An :class:`InputMismatchError` naming ``component`` when ``module`` failed with ``err`` on input ``x`` whose
    dtype or device disagrees with the module's parameters; ``None`` when that is not the explanation.

    Meant for use after a failure only (``except ...: raise explain(...) from err``), so that modules which convert
    their inputs themselves are never refused up front.
    """
    if isinstance(err, InputMismatchError):  # a nested component already diagnosed it: rename the component
        dtype, device = err.dtype, err.device
    elif isinstance(x, torch.Tensor) and _mentions_dtype_or_device(err):
        dtype, device = x.dtype, x.device
    else:
        return None
    ref = floating_reference(module)
    if ref is None:
        return None
    if device != ref.device:
        message = (
            f"{component} got an input on device {device}, but its parameters are on {ref.device}; move the input "
            f"(x.to({str(ref.device)!r})) or the model to one device"
        )
    elif dtype != ref.dtype:
        message = f"{component} got an input of dtype {dtype}, but its parameters are {ref.dtype}; "
        if dtype.is_floating_point:
            message += f"pass x.to({ref.dtype}) or convert the model (model.to({dtype}))"
        else:
            message += "pass a floating-point input"
    else:
        return None
    return InputMismatchError(message, dtype, device)


def explain_call_error(
    err: BaseException, component: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> TypeError | None:
    """A clearer error when ``module`` (named ``component``) failed with ``err`` on ``module(*args, **kwargs)``: a
    keyword input it does not take (labels among them), or an input of another dtype or device than its parameters;
    ``None`` when neither explains it (or ``err`` is already an explanation from a nested component)."""
    if isinstance(err, UnexpectedInputError):
        return None
    explained = explain_unexpected_keyword(err, component, kwargs)
    if explained is not None:
        return explained
    x = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    return explain_input_mismatch(err, component, module, x)


def check_same_dtype_and_device(components: list[tuple[str, nn.Module]]) -> None:
    """Raise if the floating-point parameters of the named modules disagree in dtype or device (the first module
    that has such parameters is the reference)."""
    reference: tuple[str, torch.Tensor] | None = None
    for name, module in components:
        ref = floating_reference(module)
        if ref is None:
            continue
        if reference is None:
            reference = (name, ref)
            continue
        first, first_ref = reference
        if ref.dtype != first_ref.dtype:
            raise TypeError(
                f"{first}'s parameters are {first_ref.dtype} but {name}'s are {ref.dtype}; convert them to one dtype "
                "(module.to(dtype)) before combining them"
            )
        if ref.device != first_ref.device:
            raise ValueError(
                f"{first}'s parameters are on {first_ref.device} but {name}'s are on {ref.device}; move them to one "
                "device before combining them"
            )


def replace_modules(
    model: nn.Module,
    predicate: Callable[[str, nn.Module], bool],
    factory: Callable[[str, nn.Module], nn.Module],
) -> list[str]:
    """Replace, in place, every submodule for which ``predicate(name, module)`` holds.

    Args:
        model: the model to edit; it is modified in place (``model`` itself is never replaced).
        predicate: ``(qualified_name, module) -> bool`` selects the modules to replace.
        factory: ``(qualified_name, module) -> nn.Module`` builds the replacement.

    Returns:
        The qualified names of the replaced modules, in ``named_modules`` order.

    A replaced module's children are not visited. Modules shared under several names are replaced
    at every name by the same new module, so sharing is preserved.
    """
    check_module("model", model)
    replaced: list[str] = []
    memo: dict[int, nn.Module] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if id(child) in memo:
                setattr(parent, child_name, memo[id(child)])
                replaced.append(name)
            elif predicate(name, child):
                new = factory(name, child)
                if not isinstance(new, nn.Module):
                    raise TypeError(f"factory must return an nn.Module for {name!r}, got {type(new).__name__}")
                memo[id(child)] = new
                setattr(parent, child_name, new)
                replaced.append(name)
            else:
                visit(child, name)

    visit(model, "")
    return replaced
