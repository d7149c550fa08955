"""What the two model conversions share (private to :mod:`pycoe.layers`).

:func:`~pycoe.layers.pwlu_convert.convert_activations_to_pwlu` and
:func:`~pycoe.layers.condconv.convert_conv2d_to_condconv` both survey a model's modules, decide for each candidate
whether to convert it or why not, replace the chosen ones in place and report the outcome in a
:class:`ConversionReport`. They refuse TorchScript modules (whose code no longer calls the Python modules), leave
a scripted submodule alone (and report it), and warn when they convert nothing.

timm's own layer classes (timm stays optional) are recognised by their class name and module, without importing
timm: :func:`is_timm_class`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from pycoe._modules import replace_modules
from pycoe._validation import check_module

__all__ = ["ConversionReport", "check_eager_model", "is_timm_class", "survey", "convert", "why_nothing"]


class ConversionReport(list[str]):
    """What a model conversion did: the qualified names of the converted modules (this list, in ``named_modules``
    order) and, in :attr:`skipped`, the candidates it left alone with the reason for each.

    Attributes:
        skipped: ``{qualified name: why it was not converted}``, in ``named_modules`` order.
    """

    skipped: dict[str, str]

    def __init__(self, converted: Iterable[str] = (), skipped: Mapping[str, str] | None = None) -> None:
        super().__init__(converted)
        self.skipped = dict(skipped or {})

    def __repr__(self) -> str:
        return f"ConversionReport(converted={list(self)!r}, skipped={self.skipped!r})"

    def summary(self) -> str:
        """One line per converted and per skipped module."""
        lines = [f"converted {len(self)}, skipped {len(self.skipped)}"]
        lines += [f"  converted {name}" for name in self]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def is_timm_class(cls: type, names: Iterable[str]) -> str | None:
    """The name of ``cls`` if it is one of timm's classes called ``names``, else None."""
    if cls.__module__.split(".")[0] == "timm" and cls.__name__ in names:
        return cls.__name__
    return None


def check_eager_model(model: object, converter: str) -> nn.Module:
    """``model`` as an ``nn.Module`` that module surgery can edit: refuse anything else, and TorchScript."""
    model = check_module("model", model)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript module ({type(model).__name__}): {converter} replaces Python modules, which a "
            "scripted model no longer calls. Convert the eager model first, then script it"
        )
    return model


# (name, module) -> True to convert, a reason to skip, or None (or False) for a module that is no candidate
Classifier = Callable[[str, nn.Module], "bool | str | None"]


def survey(model: nn.Module, classify: Classifier) -> tuple[list[str], dict[str, str]]:
    """Classify every module of ``model`` (each once, in ``named_modules`` order): the names to convert, and
    ``{name: reason}`` for the candidates to skip. A scripted submodule is skipped as a whole."""
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    scripted: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in scripted):
            continue
        if isinstance(module, torch.jit.ScriptModule):
            scripted.append(name)
            skipped[name] = "a TorchScript module: nothing inside it can be converted (convert before scripting)"
            continue
        verdict = classify(name, module)
        if verdict is True:
            chosen.append(name)
        elif isinstance(verdict, str):
            skipped[name] = verdict
    return chosen, skipped


def convert(
    model: nn.Module,
    chosen: list[str],
    skipped: dict[str, str],
    factory: Callable[[str, nn.Module], nn.Module],
    what: str,
    *,
    warn: bool = True,
) -> ConversionReport:
    """Replace the ``chosen`` modules by ``factory``'s, and report; warn when nothing was converted (unless ``warn``
    is false: a caller that raises its own error then)."""
    names = set(chosen)
    converted = replace_modules(model, lambda name, m: name in names, factory) if names else []
    report = ConversionReport(converted, skipped)
    if not converted and warn:
        warnings.warn(f"nothing was converted: {why_nothing(skipped, what)}", UserWarning, stacklevel=3)
    return report


def why_nothing(skipped: dict[str, str], what: str) -> str:
    """Why a conversion converted nothing: the first modules it skipped and why, or that the model has no ``what``."""
    if not skipped:
        return f"the model has no {what}"
    found = "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:5])
    return f"skipped {found}" + (f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else "")
