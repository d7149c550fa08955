"""The init functions of :class:`pycoe.layers.pwlu.PWLU`: one table (private to the PWLU modules).

Each row gives an init function (what a collecting PWLU computes, and what realignment re-samples), its
slopes at -inf and +inf (the outer slopes set at realignment), and the activation module it reproduces
exactly (what :func:`pycoe.layers.pwlu_convert.convert_activations_to_pwlu` replaces by it). timm's own
activation classes count as the torch activation they compute (:data:`TIMM_ACTIVATIONS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pycoe.layers._convert import is_timm_class

__all__ = [
    "InitFunction",
    "INIT_NAMES",
    "CONVERTIBLE_ACTIVATIONS",
    "TIMM_ACTIVATIONS",
    "get_init",
    "init_of_activation",
    "activation_kind",
    "is_activation",
]


@dataclass(frozen=True)
class InitFunction:
    """An init function with its asymptotic slopes (the outer slopes set at realignment)."""

    fn: Callable[[Tensor], Tensor]
    left_slope: float
    right_slope: float


class _LeakyReLU:
    """Picklable leaky ReLU with a fixed negative slope."""

    def __init__(self, negative_slope: float):
        self.negative_slope = negative_slope

    def __call__(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope)


def _identity(x: Tensor) -> Tensor:
    return x


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _exact_gelu(m: nn.Module) -> bool:
    return getattr(m, "approximate", "none") != "tanh"


def _tanh_gelu(m: nn.Module) -> bool:
    return getattr(m, "approximate", "none") == "tanh"


def _always(m: nn.Module) -> bool:
    return True


@dataclass(frozen=True)
class _Row:
    fn: Callable[[Tensor], Tensor] | None  # None: built from the negative slope (leaky_relu)
    left_slope: float | None  # None: the negative slope
    right_slope: float
    activation: type[nn.Module] | None  # the module it reproduces (None: an alias)
    matches: Callable[[nn.Module], bool] = _always


_TABLE: dict[str, _Row] = {
    "relu": _Row(F.relu, 0.0, 1.0, nn.ReLU),
    "relu6": _Row(F.relu6, 0.0, 0.0, nn.ReLU6),
    "leaky_relu": _Row(None, None, 1.0, nn.LeakyReLU),
    "identity": _Row(_identity, 1.0, 1.0, nn.Identity),
    "silu": _Row(F.silu, 0.0, 1.0, nn.SiLU),
    "swish": _Row(F.silu, 0.0, 1.0, None),
    "hardswish": _Row(F.hardswish, 0.0, 1.0, nn.Hardswish),
    "hardsigmoid": _Row(F.hardsigmoid, 0.0, 0.0, nn.Hardsigmoid),
    "gelu": _Row(F.gelu, 0.0, 1.0, nn.GELU, _exact_gelu),
    "gelu_tanh": _Row(_gelu_tanh, 0.0, 1.0, nn.GELU, _tanh_gelu),
    "tanh": _Row(torch.tanh, 0.0, 0.0, nn.Tanh),
    "sigmoid": _Row(torch.sigmoid, 0.0, 0.0, nn.Sigmoid),
}

INIT_NAMES: tuple[str, ...] = tuple(sorted(_TABLE))
"""The accepted values of ``PWLU(init=...)``."""

CONVERTIBLE_ACTIVATIONS: tuple[type[nn.Module], ...] = tuple(
    dict.fromkeys(row.activation for row in _TABLE.values() if row.activation is not None)
)
"""The activation module types that some init function reproduces exactly."""


def get_init(name: str, negative_slope: float) -> InitFunction:
    """The init function called ``name`` (one of :data:`INIT_NAMES`)."""
    row = _TABLE[name]
    fn = row.fn if row.fn is not None else _LeakyReLU(negative_slope)
    left = row.left_slope if row.left_slope is not None else negative_slope
    return InitFunction(fn, left, row.right_slope)


TIMM_ACTIVATIONS: dict[str, str] = {
    "GELU": "gelu",
    "GELUTanh": "gelu_tanh",
    "Swish": "silu",
    "SwishMe": "silu",
    "HardSwish": "hardswish",
    "HardSwishMe": "hardswish",
    "HardSigmoid": "hardsigmoid",
    "HardSigmoidMe": "hardsigmoid",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
}
"""timm's activation classes (``timm.layers.activations`` and ``activations_me``) by class name, and the init that
reproduces each: recognised without importing timm."""


def activation_kind(cls: type) -> type[nn.Module] | None:
    """The torch activation type (one of :data:`CONVERTIBLE_ACTIVATIONS`) that instances of ``cls`` compute: the
    type itself or its base for torch's, the equivalent for timm's; None if no init reproduces them."""
    timm_name = is_timm_class(cls, TIMM_ACTIVATIONS)
    if timm_name is not None:
        return _TABLE[TIMM_ACTIVATIONS[timm_name]].activation
    return next((a for a in CONVERTIBLE_ACTIVATIONS if issubclass(cls, a)), None)


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation module of torch or timm (whether or not a PWLU init reproduces it)."""
    cls = type(module)
    if cls.__module__ == "torch.nn.modules.activation":
        return cls is not nn.MultiheadAttention
    return cls.__module__.startswith("timm.") and ".activations" in cls.__module__


def init_of_activation(module: nn.Module) -> tuple[str, float] | None:
    """The ``init`` (and negative slope, 0.01 where unused) that reproduces the activation ``module``, or None."""
    timm_name = is_timm_class(type(module), TIMM_ACTIVATIONS)
    if timm_name is not None:
        return TIMM_ACTIVATIONS[timm_name], 0.01
    for name, row in _TABLE.items():
        if row.activation is not None and isinstance(module, row.activation) and row.matches(module):
            slope = float(module.negative_slope) if isinstance(module, nn.LeakyReLU) else 0.01
            return name, slope
    return None
