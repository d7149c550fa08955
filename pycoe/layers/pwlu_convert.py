"""Put PWLUs into an existing model: replace its activation modules by collecting PWLUs that reproduce them.

Module surgery (the way timm's ``create_act_layer`` or fastmoe's ``fmoefy`` spare users from rewriting a
model): every activation module of the listed kinds becomes a :class:`~pycoe.layers.pwlu.PWLU` whose init
function is that activation, so the model's outputs are unchanged until :func:`~pycoe.layers.pwlu.realign_pwlu`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pycoe._inputs import as_call
from pycoe._modules import floating_reference
from pycoe._validation import (
    check_callable,
    check_choice,
    check_int,
    check_positive_float,
    check_positive_int,
    check_probability,
)
from pycoe.layers._convert import ConversionReport, check_eager_model, convert, survey
from pycoe.layers._pwlu_inits import (
    CONVERTIBLE_ACTIVATIONS,
    TIMM_ACTIVATIONS,
    activation_kind,
    init_of_activation,
    is_activation,
)
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
"""Activation kinds that :func:`convert_activations_to_pwlu` replaces by default (the feature
activations; gates such as ``nn.Hardsigmoid``/``nn.Sigmoid`` are left alone unless asked for). timm's classes
of the same kinds (``GELU``, ``GELUTanh``, ``Swish``, ``HardSwish``) are converted with them."""


class _DryRunError(ValueError):
    """An error of pycoe's own hook during the dry run (passed through, not wrapped)."""


Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def convert_activations_to_pwlu(
    model: nn.Module,
    activations: Sequence[type[nn.Module]] | type[nn.Module] = DEFAULT_PWLU_ACTIVATIONS,
    granularity: str = "layer",
    num_intervals: int = 16,
    channel_dim: int = 1,
    example_inputs: Any = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
    bound_std: float = 3.0,
    momentum: float = 0.9,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ConversionReport:
    """Replace, in place, the activation modules of ``model`` by collecting PWLUs that reproduce them.

    Each new PWLU's init function is the replaced activation (``nn.LeakyReLU`` keeps its negative
    slope, ``nn.GELU`` its approximation), so the model's outputs are unchanged right after the
    conversion; it then collects statistics in training mode until :func:`~pycoe.layers.pwlu.realign_pwlu`.
    Every module instance of the listed kinds is converted, wherever it sits (e.g. the ReLU inside
    torchvision's ``SqueezeExcitation`` too; its ``nn.Hardsigmoid`` gate is not in the default list). timm's own
    activation classes count as the torch activation they compute (``timm.layers.GELU`` as ``nn.GELU``,
    ``Swish`` as ``nn.SiLU``, ``HardSwish`` as ``nn.Hardswish``, ...). Pass ``predicate`` to skip some.

    Limits of module surgery: activations applied functionally in ``forward`` (``F.relu(x)``) are not
    seen; a module called at several places (torchvision's ResNet blocks call one ``self.relu`` twice)
    becomes one PWLU shared by those places; ``inplace=True`` is dropped (PWLU is never in-place, and its output
    may be modified in place by what follows), which only matters for code that ignores an activation's return
    value. The new modules take the training/eval mode of the modules they replace. TorchScript modules are
    refused (convert before scripting).

    Args:
        model: the model to edit in place (an eager ``nn.Module``).
        activations: the activation kinds to replace (each one that a PWLU init reproduces: ReLU, ReLU6,
            LeakyReLU, SiLU, Hardswish, Hardsigmoid, GELU, Tanh, Sigmoid, Identity, or one of timm's classes of
            these kinds).
        granularity: ``"layer"`` or ``"channel"``.
        num_intervals: N for every new PWLU.
        channel_dim: the channel dimension of the activations' inputs (1 for CNNs, -1 for
            transformers).
        example_inputs: required for ``"channel"`` (ignored for ``"layer"``): the inputs of one batch, for a dry
            run of ``model`` in eval mode under ``torch.no_grad()`` that records each activation's channel count:
            a tensor, a tuple or list of positional inputs, or a mapping of keyword inputs (``model(**batch)``).
        predicate: optional ``(qualified_name, module) -> bool``; only modules for which it holds are
            converted.
        bound_std: passed to every PWLU.
        momentum: passed to every PWLU.
        device: of the new parameters; default: that of the model's first floating parameter or buffer (CPU
            if none).
        dtype: of the new parameters; default: that of the model's first floating parameter or buffer
            (float32 if none).

    Returns:
        A :class:`~pycoe.layers.ConversionReport`: the list of the qualified names of the replaced modules, with
        ``.skipped``, the activation modules left alone and why (a kind not in ``activations``, no PWLU init
        for it, ``predicate``). A ``UserWarning`` says so when nothing was converted.

    Raises:
        TypeError: a bad ``model`` (not an ``nn.Module``, or a TorchScript module), ``activations`` entry,
            ``example_inputs``, ``predicate`` or ``channel_dim``.
        ValueError: a bad option; channel granularity without ``example_inputs``; a dry run that fails
            (the model's own error is chained) or that does not reach an activation, or reaches one with
            different channel counts.
    """
    model = check_eager_model(model, "convert_activations_to_pwlu")
    kinds = _activation_kinds(activations)
    check_choice("granularity", granularity, ("layer", "channel"))
    channel_dim = check_int("channel_dim", channel_dim)
    options: dict[str, Any] = dict(
        num_intervals=check_positive_int("num_intervals", num_intervals),
        granularity=granularity,
        channel_dim=channel_dim,
        bound_std=check_positive_float("bound_std", bound_std),
        momentum=check_probability("momentum", momentum),
    )
    check_callable("predicate", predicate, allow_none=True, expected="(name, module) -> bool")
    inputs = None if example_inputs is None else as_call(example_inputs, "example_inputs")
    reference = floating_reference(model)
    if reference is not None:
        device = reference.device if device is None else device
        dtype = reference.dtype if dtype is None else dtype
    chosen, skipped = survey(model, _classifier(kinds, predicate))
    channels: dict[str, int] = {}
    if granularity == "channel" and chosen:
        if inputs is None:
            raise ValueError(
                "granularity='channel' needs example_inputs: a dry run records every activation's channel "
                "count (or use granularity='layer')"
            )
        channels = _record_channels(model, chosen, inputs, channel_dim)

    def factory(name: str, module: nn.Module) -> nn.Module:
        init = init_of_activation(module)
        assert init is not None  # chosen by _classifier
        new = PWLU(
            init=init[0], negative_slope=init[1], num_channels=channels.get(name), device=device, dtype=dtype, **options
        )
        new.train(module.training)
        return new

    return convert(model, chosen, skipped, factory, "activation module to convert")


def _activation_kinds(activations: Any) -> tuple[type[nn.Module], ...]:
    """The torch activation types named by ``activations`` (a type or a sequence of types)."""
    if isinstance(activations, type):
        activations = (activations,)
    if not isinstance(activations, Sequence) or isinstance(activations, str):
        raise TypeError(f"activations must be a sequence of activation module types, got {activations!r}")
    if not activations:
        raise ValueError("activations must name at least one activation type")
    kinds = []
    for a in activations:
        kind = activation_kind(a) if isinstance(a, type) else None
        if kind is None:
            names = [c.__name__ for c in CONVERTIBLE_ACTIVATIONS] + [f"timm's {n}" for n in TIMM_ACTIVATIONS]
            raise TypeError(f"activations must be activation module types among {', '.join(names)}, got {a!r}")
        kinds.append(kind)
    return tuple(dict.fromkeys(kinds))


def _classifier(
    kinds: tuple[type[nn.Module], ...], predicate: Callable[[str, nn.Module], bool] | None
) -> Callable[[str, nn.Module], bool | str | None]:
    """For :func:`~pycoe.layers._convert.survey`: convert (True) or why not, for every activation module."""

    def classify(name: str, module: nn.Module) -> bool | str | None:
        kind = activation_kind(type(module))
        if kind is None:
            return f"no PWLU init reproduces {type(module).__name__}" if is_activation(module) else None
        if kind not in kinds:
            # nn.Identity is a placeholder more often than an activation: not worth a report line
            return None if kind is nn.Identity else f"{type(module).__name__} is not among activations"
        if predicate is not None and not predicate(name, module):
            return "predicate returned False"
        return True

    return classify


def _record_channels(model: nn.Module, chosen: list[str], inputs: Inputs, channel_dim: int) -> dict[str, int]:
    """Run ``model`` once (eval, no grad) on ``inputs``; return ``{name: channel count}`` for every chosen module
    and every other name it is registered under."""
    modules = dict(model.named_modules(remove_duplicate=False))
    names = {id(modules[n]): n for n in chosen}
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

    _dry_run(model, inputs, [modules[n].register_forward_hook(hook) for n in chosen])
    if conflicts:
        desc = "; ".join(f"{names[i]!r}: {sorted(cs)}" for i, cs in conflicts.items())
        raise ValueError(
            "granularity='channel' needs one channel count per activation module, but these are called "
            f"with several (shared modules): {desc}. Use granularity='layer' or exclude them with predicate"
        )
    missed = [n for n in chosen if id(modules[n]) not in seen]
    if missed:
        raise ValueError(f"the dry run with example_inputs did not reach activation {missed[0]!r}")
    return {n: seen[id(m)] for n, m in modules.items() if id(m) in seen}


def _dry_run(model: nn.Module, inputs: Inputs, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """``model(*args, **kwargs)`` in eval mode without gradients; the hooks ``handles`` are removed afterwards."""
    args, kwargs = inputs
    try:
        with eval_mode(model):
            model(*args, **kwargs)
    except _DryRunError:
        raise
    except Exception as err:
        values = [*args, *kwargs.values()]
        shapes = ", ".join(str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__ for t in values)
        raise ValueError(
            f"example_inputs do not fit the model: the dry run model(*example_inputs) with inputs of shape "
            f"{shapes} failed with {type(err).__name__}: {err}"
        ) from err
    finally:
        for h in handles:
            h.remove()
