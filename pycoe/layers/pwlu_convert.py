"""Put PWLUs into an existing model: replace its activation modules by collecting PWLUs that reproduce them.

Module surgery (the way timm's ``create_act_layer`` or fastmoe's ``fmoefy`` spare users from rewriting a
model): every activation module of the listed types becomes a :class:`~pycoe.layers.pwlu.PWLU` whose init
function is that activation, so the model's outputs are unchanged until :func:`~pycoe.layers.pwlu.realign_pwlu`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pycoe._modules import floating_reference, replace_modules
from pycoe._validation import (
    check_choice,
    check_device,
    check_dtype,
    check_int,
    check_positive_float,
    check_positive_int,
    check_probability,
)
from pycoe.layers._pwlu_inits import CONVERTIBLE_ACTIVATIONS, init_of_activation
from pycoe.layers.pwlu import PWLU
from pycoe.utils import eval_mode

__all__ = ["convert_activations_to_pwlu", "DEFAULT_PWLU_ACTIVATIONS"]

DEFAULT_PWLU_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Hardswish,
    nn.GELU,
)
"""Activation types that :func:`convert_activations_to_pwlu` replaces by default (the feature
activations; gates such as ``nn.Hardsigmoid``/``nn.Sigmoid`` are left alone unless asked for)."""


class _DryRunError(ValueError):
    """An error of pycoe's own hook during the dry run (passed through, not wrapped)."""


def convert_activations_to_pwlu(
    model: nn.Module,
    activations: Sequence[type[nn.Module]] | type[nn.Module] = DEFAULT_PWLU_ACTIVATIONS,
    granularity: str = "layer",
    num_intervals: int = 16,
    channel_dim: int = 1,
    example_inputs: Tensor | Sequence[Any] | None = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
    bound_std: float = 3.0,
    momentum: float = 0.9,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace, in place, the activation modules of ``model`` by collecting PWLUs that reproduce them.

    Each new PWLU's init function is the replaced activation (``nn.LeakyReLU`` keeps its negative
    slope, ``nn.GELU`` its approximation), so the model's outputs are unchanged right after the
    conversion; it then collects statistics in training mode until :func:`~pycoe.layers.pwlu.realign_pwlu`.
    Every module instance of the listed types is converted, wherever it sits (e.g. the ReLU inside
    torchvision's ``SqueezeExcitation`` too; its ``nn.Hardsigmoid`` gate is not in the default list). Pass
    ``predicate`` to skip some.

    Limits of module surgery: activations applied functionally in ``forward`` (``F.relu(x)``) are not
    seen; a module called at several places (torchvision's ResNet blocks call one ``self.relu`` twice)
    becomes one PWLU shared by those places; ``inplace=True`` is dropped (PWLU is never in-place), which
    only matters for code that ignores an activation's return value. The new modules take the
    training/eval mode of the modules they replace.

    Args:
        model: the model to edit in place.
        activations: the activation types to replace (each must be one that a PWLU init reproduces:
            ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, Hardsigmoid, GELU, Tanh, Sigmoid, Identity).
        granularity: ``"layer"`` or ``"channel"``.
        num_intervals: N for every new PWLU.
        channel_dim: the channel dimension of the activations' inputs (1 for CNNs, -1 for
            transformers).
        example_inputs: required for ``"channel"`` (ignored for ``"layer"``): one input tensor, or a tuple
            or list of positional inputs, for a dry run of ``model`` in eval mode under ``torch.no_grad()``
            that records each activation's channel count.
        predicate: optional ``(qualified_name, module) -> bool``; only modules for which it holds are
            converted.
        bound_std: passed to every PWLU.
        momentum: passed to every PWLU.
        device: of the new parameters; default: that of the model's first floating parameter or buffer (CPU
            if none).
        dtype: of the new parameters; default: that of the model's first floating parameter or buffer
            (float32 if none).

    Returns:
        The qualified names of the replaced modules.

    Raises:
        TypeError: a bad ``model``, ``activations`` entry, ``example_inputs``, ``predicate``, ``channel_dim``
            or ``dtype``.
        ValueError: a bad option; channel granularity without ``example_inputs``; a dry run that fails
            (the model's own error is chained) or that does not reach an activation, or reaches one with
            different channel counts.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(activations, type):
        activations = (activations,)
    if not isinstance(activations, Sequence):
        raise TypeError(f"activations must be a sequence of activation module types, got {activations!r}")
    types = tuple(activations)
    if not types:
        raise ValueError("activations must name at least one activation type")
    for a in types:
        if not (isinstance(a, type) and issubclass(a, CONVERTIBLE_ACTIVATIONS)):
            raise TypeError(
                "activations must be activation module types among "
                f"{', '.join(c.__name__ for c in CONVERTIBLE_ACTIVATIONS)}, got {a!r}"
            )
    check_choice("granularity", granularity, ("layer", "channel"))
    check_positive_int("num_intervals", num_intervals)
    check_int("channel_dim", channel_dim)
    check_positive_float("bound_std", bound_std)
    check_probability("momentum", momentum)
    check_device("device", device)
    check_dtype("dtype", dtype)
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate must be callable or None, got {type(predicate).__name__}")
    inputs = _as_inputs(example_inputs)

    def selected(name: str, module: nn.Module) -> bool:
        return isinstance(module, types) and (predicate is None or bool(predicate(name, module)))

    reference = floating_reference(model)
    if reference is not None:
        device = reference.device if device is None else device
        dtype = reference.dtype if dtype is None else dtype

    channels: dict[int, int] = {}
    if granularity == "channel":
        if inputs is None:
            raise ValueError(
                "granularity='channel' needs example_inputs: a dry run records every activation's channel "
                "count (or use granularity='layer')"
            )
        channels = _record_channels(model, selected, inputs, channel_dim)

    def factory(name: str, module: nn.Module) -> nn.Module:
        init, negative_slope = init_of_activation(module)
        num_channels = None
        if granularity == "channel":
            if id(module) not in channels:
                raise ValueError(f"the dry run with example_inputs did not reach activation {name!r}")
            num_channels = channels[id(module)]
        new = PWLU(
            num_intervals=num_intervals,
            init=init,
            granularity=granularity,
            num_channels=num_channels,
            channel_dim=channel_dim,
            bound_std=bound_std,
            momentum=momentum,
            negative_slope=negative_slope,
            device=device,
            dtype=dtype,
        )
        new.train(module.training)
        return new

    return replace_modules(model, selected, factory)


def _as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    """``example_inputs`` as a tuple of positional inputs (None stays None)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor, or a tuple or list of the model's positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def _record_channels(
    model: nn.Module,
    selected: Callable[[str, nn.Module], bool],
    inputs: tuple[Any, ...],
    channel_dim: int,
) -> dict[int, int]:
    """Run ``model`` once (eval, no grad) and return ``{id(activation): channel count}``."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False) if n and selected(n, m)}
    seen: dict[int, int] = {}
    conflicts: dict[int, set[int]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        if not args or not isinstance(args[0], Tensor):
            return
        x = args[0]
        if not -x.dim() <= channel_dim < x.dim():
            raise _DryRunError(
                f"channel_dim={channel_dim} is out of range for the input of {names[id(module)]!r} "
                f"(shape {tuple(x.shape)})"
            )
        c = int(x.shape[channel_dim])
        if seen.setdefault(id(module), c) != c:
            conflicts.setdefault(id(module), {seen[id(module)]}).add(c)

    modules = {id(m): m for n, m in model.named_modules(remove_duplicate=False) if id(m) in names}
    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        with eval_mode(model):
            model(*inputs)
    except _DryRunError:
        raise
    except Exception as err:
        shapes = ", ".join(str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__ for t in inputs)
        raise ValueError(
            f"example_inputs do not fit the model: the dry run model(*example_inputs) with inputs of shape "
            f"{shapes} failed with {type(err).__name__}: {err}"
        ) from err
    finally:
        for h in handles:
            h.remove()
    if conflicts:
        desc = "; ".join(f"{names[i]!r}: {sorted(cs)}" for i, cs in conflicts.items())
        raise ValueError(
            "granularity='channel' needs one channel count per activation module, but these are called "
            f"with several (shared modules): {desc}. Use granularity='layer' or exclude them with predicate"
        )
    return seen
