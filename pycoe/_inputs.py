"""Model inputs as users pass them: positional and keyword arguments, some of them batch-first tensors.

A vision model is called ``model(x)``; a Hugging Face model ``model(**batch)`` with a tokenizer's ``BatchEncoding``
or a collator's dict (``input_ids``, ``attention_mask``, maybe ``labels``); a translation model ``model(src,
tgt_in)``. pycoe's two-stage models are called the same way their experts are, so everything that splits a batch
(routing, early exit, evaluation) works on ``(args, kwargs)`` pairs through the helpers here:

- the **batch size** is dim 0 of the first tensor of dimension >= 1, positional inputs first, then keyword
  inputs in their order;
- the **batched inputs** are the tensors (positional or keyword) whose dim 0 is that batch size; they are split
  with the samples, every other argument goes unchanged to every call;
- **labels** (``labels`` in a batch) are targets, not model inputs.

This module is a leaf: it imports nothing of pycoe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "LABEL_NAMES",
    "UnexpectedInputError",
    "as_call",
    "batch_size",
    "batched_names",
    "map_batched",
    "select_inputs",
    "split_labels",
    "explain_unexpected_keyword",
]

#: Keyword inputs that hold targets, not model inputs (Hugging Face's convention).
LABEL_NAMES: tuple[str, ...] = ("labels",)

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def _describe(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    parts = [type(v).__name__ for v in args] + [f"{k}={type(v).__name__}" for k, v in kwargs.items()]
    return ", ".join(parts) if parts else "no input"


def batch_size(args: Sequence[Any], kwargs: Mapping[str, Any], what: str = "the model") -> int:
    """B, dim 0 of the first tensor of dimension >= 1 among ``args`` then ``kwargs``.

    Raises:
        TypeError: no such tensor (naming ``what`` and the inputs received).
    """
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]  # not int(): under torch.export / torch.compile it may be a symbolic size
    raise TypeError(
        f"{what} needs a batch: at least one batch-first tensor among its positional or keyword inputs "
        f"(e.g. model(x) or model(**batch) with input_ids), got {_describe(args, kwargs)}"
    )


def batched_names(args: Sequence[Any], kwargs: Mapping[str, Any], batch: int) -> tuple[list[int], list[str]]:
    """Positions and keyword names of the tensor inputs whose dim 0 is ``batch``."""
    pos = [i for i, v in enumerate(args) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch]
    keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch]
    return pos, keys


def map_batched(
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    take: Callable[[torch.Tensor], torch.Tensor],
    names: tuple[list[int], list[str]],
) -> Inputs:
    """``take`` applied to the batched inputs ``names`` (from :func:`batched_names`); the rest passed as is."""
    pos, keys = names
    new_args = list(args)
    for i in pos:
        new_args[i] = take(args[i])
    new_kwargs = dict(kwargs)
    for key in keys:
        new_kwargs[key] = take(kwargs[key])
    return tuple(new_args), new_kwargs


def select_inputs(args: Sequence[Any], kwargs: Mapping[str, Any], which: Sequence[int | str] | None) -> Inputs:
    """The inputs named by ``which`` (positional indices and keyword names, in the caller's order of each kind);
    ``None`` selects everything. A name that is absent is skipped (a batch may lack an optional input, such as
    ``token_type_ids``); an index out of range raises ``IndexError``."""
    if which is None:
        return tuple(args), dict(kwargs)
    new_args = []
    for item in which:
        if isinstance(item, int) and not isinstance(item, bool):
            if not -len(args) <= item < len(args):
                raise IndexError(
                    f"delegator_inputs names positional input {item}, but the call has {len(args)} positional inputs"
                )
            new_args.append(args[item])
    new_kwargs = {item: kwargs[item] for item in which if isinstance(item, str) and item in kwargs}
    return tuple(new_args), new_kwargs


def split_labels(kwargs: Mapping[str, Any], names: Sequence[str] = LABEL_NAMES) -> tuple[dict[str, Any], Any]:
    """``(kwargs without the label entries, the labels or None)``; only the first name present is returned."""
    rest = dict(kwargs)
    labels = None
    for name in names:
        if name in rest:
            value = rest.pop(name)
            if labels is None:
                labels = value
    return rest, labels


def as_call(item: Any, what: str = "the batch") -> Inputs:
    """A batch as ``(args, kwargs)``: a tensor is one positional input, a mapping (a dict, a tokenizer's
    ``BatchEncoding``) keyword inputs, a tuple or list positional inputs."""
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, Mapping):
        if not all(isinstance(k, str) for k in item):
            raise TypeError(f"{what} is a mapping whose keys are not all strings (keyword names)")
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise TypeError(
        f"{what} must be a tensor, a tuple of positional inputs or a mapping of keyword inputs (a dict, a "
        f"tokenizer's BatchEncoding), got {type(item).__name__}"
    )


class UnexpectedInputError(TypeError):
    """A component refused a keyword input it does not take (see :func:`explain_unexpected_keyword`)."""


def explain_unexpected_keyword(
    err: BaseException, component: str, kwargs: Mapping[str, Any]
) -> UnexpectedInputError | None:
    """A clearer ``TypeError`` when ``component`` refused a keyword input it does not take; ``None`` otherwise
    (also when ``err`` is already such an explanation, from a component nested in this one: re-raise it as is).

    Labels get their own message: they are targets, so they go to the loss, not to a model.
    """
    if not isinstance(err, TypeError) or isinstance(err, UnexpectedInputError):
        return None
    message = str(err)
    if "unexpected keyword argument" not in message:
        return None
    name = next((k for k in kwargs if f"'{k}'" in message), None)
    if name is None:
        return None
    if name in LABEL_NAMES:
        return UnexpectedInputError(
            f"{component} does not take the keyword input {name!r}: {name} are the targets of the batch, not a "
            "model input. A CoE takes them out of model(**batch) itself and hands them to its loss; when you call "
            f"a component directly, pop them first (targets = batch.pop({name!r}))"
        )
    return UnexpectedInputError(
        f"{component} does not take the keyword input {name!r} ({message}); pass only the inputs its forward accepts"
        " (for a CoE's delegator, choose them with delegator_inputs=...)"
    )
