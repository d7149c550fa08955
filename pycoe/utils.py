"""Small public utilities for working with models: train/eval modes that are restored exactly.

``module.train(flag)`` sets one flag on every submodule, so restoring a model's mode that way loses, for example,
a BatchNorm deliberately kept in eval mode inside a model in training mode. The context managers here record
every submodule's own ``training`` flag on entry and restore each one on exit (also after an exception). pycoe's
dry runs, FLOP counts and evaluation loops use them; so can your evaluation code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pycoe._validation import check_module

__all__ = ["preserve_training_modes", "eval_mode"]


@contextlib.contextmanager
def preserve_training_modes(module: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's ``training`` flag on exit, as it was on entry (even if they differed).

    Args:
        module: the model; yielded unchanged.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> model[1].eval()  # a frozen BatchNorm
        >>> with preserve_training_modes(model):
        ...     model.eval()  # anything that changes modes
        >>> model.training, model[1].training
        (True, False)
    """
    check_module("module", module)
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode under ``torch.no_grad()``; restore every submodule's mode on exit.

    Args:
        module: the model; yielded in eval mode.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> with eval_mode(model):
        ...     y = model(torch.randn(3, 2))  # deterministic, no autograd graph
        >>> model.training, y.requires_grad
        (True, False)
    """
    with preserve_training_modes(module), torch.no_grad():
        module.eval()
        yield module
