"""Module surgery and mode handling shared by pycoe's helpers.

The conversion helpers (activations to :class:`~pycoe.PWLU`, convolutions to :class:`~pycoe.CondConv2d`)
are built on :func:`replace_modules`; the dry runs, FLOP counts and evaluation loops use
:func:`preserve_training_modes` and :func:`eval_mode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["replace_modules", "preserve_training_modes", "eval_mode"]


@contextlib.contextmanager
def preserve_training_modes(module: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's ``training`` flag on exit, as it was on entry (even if they differed).

    ``module.train(flag)`` afterwards would instead force one flag on every submodule, losing e.g. a
    BatchNorm deliberately kept in eval mode inside a model in training mode.
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode under ``torch.no_grad()``; restore every submodule's mode on exit."""
    with preserve_training_modes(module), torch.no_grad():
        module.eval()
        yield module


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
