"""Private module helpers shared by pycoe's modules: module surgery and small look-ups.

The conversion helpers (activations to :class:`~pycoe.PWLU`, convolutions to :class:`~pycoe.CondConv2d`)
are built on :func:`replace_modules`. The public mode helpers (``eval_mode``, ``preserve_training_modes``) live in
:mod:`pycoe.utils`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["replace_modules", "module_device", "floating_reference", "tensors_in"]


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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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
