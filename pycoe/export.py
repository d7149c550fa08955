"""Deploy a trained model: ``torch.export`` with a dynamic batch, ONNX for onnxruntime.

A Collaboration of Experts is a delegator plus K static networks, which is what makes it cheap to run: this
module takes an eval-mode :class:`~pycoe.coe.model.CoE` (early exit included),
:class:`~pycoe.basisnet.model.BasisNet`, :class:`~pycoe.cotrain.ensemble.CoTrainingEnsemble` or any model with
:class:`~pycoe.layers.condconv.CondConv2d` / :class:`~pycoe.layers.pwlu.PWLU` layers out of Python.

- :func:`export` returns a :class:`torch.export.ExportedProgram` whose module returns what the eager eval forward
  returns (the output dataclasses are registered pytrees), for any batch size and, for token inputs, any
  sequence length; positional and keyword inputs (``model(**batch)`` of a Hugging Face model or a CoE of them)
  keep their kind. Routing stays real: each sample runs only through its own expert, on a sub-batch whose size is
  data-dependent.
- :func:`to_onnx` writes the same program as an ONNX file (``torch.onnx.export(..., dynamo=True)``) with the same
  dynamic dimensions, for onnxruntime; keyword inputs keep their names.
- :func:`compile_inference` compiles the eval forward with ``torch.compile`` into one graph (routing included).
- :func:`prepare_for_export` is the step all three take first, on a deep copy: every eval-mode BatchNorm that directly
  follows a convolution or linear layer is folded into it, every other one becomes a per-channel affine map.
  Tracing cannot run a BatchNorm on a batch of data-dependent size, and folding also saves the work at run time.

The library's own eval forward passes are export-safe (see the "Deploying a CoE" guide): under
:func:`torch.compiler.is_compiling` (true under ``torch.export`` and ``torch.compile``) they take no Python branch
on a data-dependent count.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from pycoe._batchnorm_folding import BATCH_NORMS, BatchNormAffine, foldable_pairs, output_mismatch
from pycoe._modules import replace_modules, traceable_paths
from pycoe._validation import check_bool, check_module, check_path, check_positive_int

__all__ = ["ExportError", "prepare_for_export", "export", "to_onnx", "output_names", "compile_inference", "MIN_OPSET"]


class ExportError(RuntimeError):
    """A model (or one of its submodules) cannot be exported; the message names the submodule and what to do."""


# ---------------------------------------------------------------------------------------------- preparation
def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple of the model's positional inputs, got "
        f"{type(example_inputs).__name__}"
    )


def _as_kwargs(example_kwargs: Any) -> dict[str, Any]:
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, Mapping) or not all(isinstance(k, str) for k in example_kwargs):
        raise TypeError(
            "example_kwargs must be None or a mapping from keyword names to the model's keyword inputs, got "
            f"{type(example_kwargs).__name__}"
        )
    return dict(example_kwargs)


def _check_eval(model: nn.Module) -> None:
    if isinstance(model, torch.export.ExportedProgram):
        raise TypeError(
            "model is already an ExportedProgram: run it with program.module()(...), store it with "
            "torch.export.save, write ONNX with torch.onnx.export(program, f=..., dynamo=True); to export again, "
            "pass the original eager model"
        )
    check_module("model", model)
    if isinstance(model, torch.fx.GraphModule) and hasattr(model, "_in_spec"):
        raise TypeError(
            "model is the module of an exported program (ExportedProgram.module()), which is exported already and "
            "cannot be put in eval mode or traced again: keep the ExportedProgram itself (torch.export.save, "
            "torch.onnx.export(program, ...)), or export the original eager model"
        )
    training = [name or "<the model>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(repr(n) for n in training[:5]) + (
            f" and {len(training) - 5} more" if len(training) > 5 else ""
        )
        raise ValueError(
            f"export traces the inference forward, but these modules are in training mode: {shown}; call model.eval() "
            "first (a training-mode CoE runs every expert on every sample and BatchNorm uses batch statistics)"
        )


def _check_unchanged(reference: Any, prepared: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """The prepared copy must compute the model's outputs on the example, up to the rounding of the folding."""
    with torch.no_grad(), traceable_paths():
        mismatch = output_mismatch(reference, prepared(*args, **kwargs))
    if mismatch is not None:
        raise ExportError(
            f"folding the BatchNorms changed the model's outputs on example_inputs ({mismatch}): a layer or "
            "BatchNorm this preparation does not understand; export with prepare=False, or fold them yourself"
        )


def prepare_for_export(
    model: nn.Module, example_inputs: Any = (), example_kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """A deep copy of an eval-mode model, ready to trace on data-dependent batches (``model`` is not changed).

    Every eval-mode ``nn.BatchNorm{1,2,3}d`` / ``nn.SyncBatchNorm`` whose input is the output of an
    ``nn.Conv{1,2,3}d`` or ``nn.Linear`` that nothing else reads (found by running the copy once on
    ``example_inputs``) is folded into that layer (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`,
    :func:`~torch.nn.utils.fusion.fuse_linear_bn_eval`) and replaced by ``nn.Identity``; every other one becomes
    the per-channel affine map it computes. Both are exact in real arithmetic (the outputs change by float
    rounding only); folding also removes the BatchNorm's work at run time.

    Args:
        model: an ``nn.Module`` in eval mode (every submodule).
        example_inputs: a tensor or a tuple of the model's positional inputs (one forward is run on them; ``()``
            for a model called with keyword inputs only).
        example_kwargs: keyword inputs of that forward.

    Returns:
        nn.Module: the prepared copy, in eval mode.

    Raises:
        ValueError: a module is in training mode, or an eval BatchNorm uses batch statistics
            (``track_running_stats=False``): its output depends on the other samples of the batch.
        ExportError: the model fails on the example when every expert is called (an expert without samples on
            an empty batch if it takes one, else on a padding row; BasisNet's specialist on an empty batch), or
            the prepared copy's outputs on the example differ from the model's by more than rounding (checked).
    """
    _check_eval(model)
    args = _as_args(example_inputs)
    kwargs = _as_kwargs(example_kwargs)
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise ValueError(
                f"the BatchNorm {name!r} has no running statistics (track_running_stats=False), so in eval mode it "
                "normalises with the statistics of the batch it is given: a routed sub-batch would change every "
                "sample's output. Train it with running statistics, or replace it (e.g. by nn.GroupNorm)"
            )
    prepared = copy.deepcopy(model)
    try:
        pairs, reference = foldable_pairs(prepared, args, kwargs)
    except Exception as error:
        raise ExportError(
            f"the model failed on example_inputs when run as it will be exported: {type(error).__name__}: {error}. "
            "Every expert is called, also one that receives no sample (on a padding row of zeros if it cannot take "
            "an empty batch), and BasisNet's specialist also on an empty batch"
        ) from error
    fused: dict[str, nn.Module] = {}
    for bn_name, producer_name in pairs.items():
        producer = prepared.get_submodule(producer_name)
        bn = prepared.get_submodule(bn_name)
        assert isinstance(bn, _BatchNorm)
        if isinstance(producer, nn.Linear):
            fused[producer_name] = torch.nn.utils.fusion.fuse_linear_bn_eval(producer, bn)
        else:
            fused[producer_name] = torch.nn.utils.fusion.fuse_conv_bn_eval(producer, bn)  # type: ignore[type-var]
    replace_modules(prepared, lambda name, m: name in fused, lambda name, m: fused[name])
    replace_modules(prepared, lambda name, m: name in pairs, lambda name, m: nn.Identity())
    replace_modules(
        prepared,
        lambda name, m: type(m) in BATCH_NORMS,
        lambda name, m: BatchNormAffine(m),  # type: ignore[arg-type]
    )
    prepared.eval()
    _check_unchanged(reference, prepared, args, kwargs)
    return prepared


# ---------------------------------------------------------------------------------------------- input shapes
def _is_token_input(t: torch.Tensor, batch: int) -> bool:
    """A ``[B, L]`` tensor of integers or booleans: token ids, an attention mask, token type or position ids."""
    return t.dim() == 2 and t.shape[0] == batch and not (t.is_floating_point() or t.is_complex())


def _top_level_names(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[str]:
    """The names the exported program gives its inputs: ``input_0``, ``input_1``, ... then the keyword names."""
    positional = [f"input_{i}" for i in range(len(args))]
    clash = sorted(set(positional) & set(kwargs))
    if clash:
        raise ValueError(
            f"example_kwargs uses the name {clash[0]!r}, which the exported program gives to a positional input; "
            "rename that keyword input"
        )
    return positional + list(kwargs)


def _default_dims(
    value: Any, batch: int | None, batch_dim: Any, dynamic_sequence: bool, name: str, sequence: list[tuple[str, int]]
) -> Any:
    """Dynamic shapes of one (possibly nested) input by the default rule; appends ``(name, size)`` of every
    dynamic sequence dimension to ``sequence``."""

    def dims(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return None
        found: dict[int, Any] = {}
        if batch_dim is not None and t.dim() > 0 and t.shape[0] == batch:
            found[0] = batch_dim
        if dynamic_sequence and batch is not None and _is_token_input(t, batch):
            found[1] = torch.export.Dim.AUTO
            sequence.append((name, int(t.shape[1])))
        return found or None

    return pytree.tree_map(dims, value)


def _apply_overrides(
    shapes: dict[str, Any], values: Mapping[str, Any], names: list[str], overrides: Any
) -> dict[str, Any]:
    """``overrides`` ({keyword name or position: {dim: Dim, Dim.AUTO, Dim.STATIC or None}}) merged into ``shapes``."""
    if overrides is None:
        return shapes
    if not isinstance(overrides, Mapping):
        raise TypeError(
            "dynamic_shapes must be None or a mapping from input (a keyword name, or the position of a positional "
            f"input) to {{dim: torch.export.Dim | Dim.AUTO | Dim.STATIC | None}}, got {type(overrides).__name__}"
        )
    merged = dict(shapes)
    for key, spec in overrides.items():
        name = f"input_{key}" if isinstance(key, int) and not isinstance(key, bool) else key
        if name not in values or not isinstance(values[name], torch.Tensor):
            raise ValueError(
                f"dynamic_shapes names the input {key!r}, which is not a tensor input of the example; the tensor "
                f"inputs are {[n for n in names if isinstance(values[n], torch.Tensor)]} (positional inputs by "
                "position, keyword inputs by name)"
            )
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"dynamic_shapes[{key!r}] must be a mapping {{dim: torch.export.Dim | Dim.AUTO | Dim.STATIC | None}}, "
                f"got {type(spec).__name__}"
            )
        dims = dict(merged[name] or {})
        rank = values[name].dim()
        for d, dim in spec.items():
            if not isinstance(d, int) or isinstance(d, bool) or not -rank <= d < rank:
                raise ValueError(f"dynamic_shapes[{key!r}] names dim {d!r}, but that input has {rank} dimensions")
            d = d % rank
            if dim is None or dim is torch.export.Dim.STATIC:
                dims.pop(d, None)
            else:
                dims[d] = dim
        merged[name] = dims or None
    return merged


def _dynamic_shapes(
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    dynamic_batch: bool,
    dynamic_sequence: bool,
    overrides: Any,
) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """Dynamic shapes keyed by the program's input names (see :func:`export` for the rule), and the
    ``(input name, dim)`` pairs that the default rule made dynamic with ``Dim.AUTO``."""
    names = _top_level_names(args, kwargs)
    values = dict(zip(names, (*args, *kwargs.values())))
    tensors = [t for t in pytree.tree_leaves((args, dict(kwargs))) if isinstance(t, torch.Tensor) and t.dim() > 0]
    batch = int(tensors[0].shape[0]) if tensors else None
    if dynamic_batch and batch is not None and batch < 2:
        raise ValueError(
            f"the example inputs must have a batch of at least 2 for a dynamic batch (torch specialises a size of "
            f"{batch}), got batch size {batch}; the exported program still runs on batches of 1 (or pass "
            "dynamic_batch=False)"
        )
    batch_dim = torch.export.Dim("batch") if dynamic_batch and batch is not None else None
    sequence: list[tuple[str, int]] = []
    shapes = {n: _default_dims(values[n], batch, batch_dim, dynamic_sequence, n, sequence) for n in names}
    for name, size in sequence:
        if size < 2:
            raise ValueError(
                f"the example's {name!r} has a sequence length of {size}: a dynamic sequence length needs an "
                "example of length 2 or more (torch specialises a size of 1); pad the example, or pass "
                "dynamic_sequence=False"
            )
    shapes = _apply_overrides(shapes, values, names, overrides)
    auto = [(n, 1) for n, _ in sequence if (shapes[n] or {}).get(1) is torch.export.Dim.AUTO]
    return shapes, auto


def _leaf_names(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[str]:
    """Names of the tensor inputs in the program's flattened order (``name_j`` for the j-th tensor inside a nested
    input)."""
    names = []
    for name, value in zip(_top_level_names(args, kwargs), (*args, *kwargs.values())):
        leaves = [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        if isinstance(value, torch.Tensor):
            names.append(name)
        else:
            names.extend(f"{name}_{j}" for j in range(len(leaves)))
    return names


def _warn_specialised(program: torch.export.ExportedProgram, auto: list[tuple[str, int]], names: list[str]) -> None:
    """Warn about sequence dimensions the default rule asked for that the model fixed at the example's size."""
    from torch.export.graph_signature import InputKind, TensorArgument
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = [
        s
        for s in program.graph_signature.input_specs
        if s.kind == InputKind.USER_INPUT and isinstance(s.arg, TensorArgument)
    ]
    shape_of = {name: placeholders[spec.arg.name].meta["val"].shape for name, spec in zip(names, specs)}
    fixed = [
        f"{n!r} (length {int(shape_of[n][d])})" for n, d in auto if n in shape_of and is_concrete_int(shape_of[n][d])
    ]
    if fixed:
        warnings.warn(
            f"the model fixed the sequence length of {', '.join(fixed)} at the example's: the exported program "
            "accepts only that length (its forward depends on it, e.g. a position table sliced to a fixed size). "
            "Pass dynamic_sequence=False to say so, or dynamic_shapes={name: {1: torch.export.Dim(...)}} to see "
            "torch's reason",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------- export
def _innermost_module(error: BaseException, names: Mapping[int, str]) -> tuple[str, nn.Module] | None:
    """The innermost submodule (of the traced model) whose code is on the error's traceback."""
    found = None
    seen: set[int] = set()
    exc: BaseException | None = error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                found = (names[id(owner)], owner)
        exc = exc.__cause__ or exc.__context__
    return found


def _explain(error: Exception, model: nn.Module) -> ExportError:
    names = {id(m): name or "<the model>" for name, m in model.named_modules()}
    where = _innermost_module(error, names)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    data_dependent = "DataDependent" in type(error).__name__ or "data-dependent" in str(error)
    if data_dependent:
        hint = (
            "its forward takes a Python decision on values computed from the input (an `if` on a tensor, .item(), "
            ".tolist(), a count): write it as tensor code (torch.where, a mask, nonzero + index_select), check it "
            "with torch._check, or take another path under torch.compiler.is_exporting()"
        )
    else:
        hint = "see the torch error below; the 'Deploying a CoE' guide lists what export supports"
    module = f"submodule {where[0]!r} ({type(where[1]).__name__})" if where else "the model"
    return ExportError(f"cannot export {module}: {type(error).__name__}: {first_line}\n{hint}")


def _with_named_inputs(model: nn.Module, names: list[str], num_positional: int) -> nn.Module:
    """``model`` behind a forward whose signature names every input: positional ``input_0``, ``input_1``, ...,
    then the keyword inputs as keyword-only parameters.

    The exported program then takes the keyword inputs by name (``program.module()(**batch)``), whatever
    ``model.forward``'s signature is. (torch 2.14 generates a broken input check, a ``NameError`` when
    ``ExportedProgram.module()`` is called, for a ``forward(*inputs, **kwargs)`` whose keyword tensors have
    dynamic sizes; such a signature never reaches it this way.)
    """
    kind = inspect.Parameter
    params = [kind("self", kind.POSITIONAL_OR_KEYWORD)]
    params += [kind(n, kind.POSITIONAL_OR_KEYWORD) for n in names[:num_positional]]
    params += [kind(n, kind.KEYWORD_ONLY) for n in names[num_positional:]]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.get_submodule("model")(*args, **kwargs)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper: nn.Module = type("NamedInputs", (nn.Module,), {"forward": forward})()
    wrapper.add_module("model", model)
    return wrapper.train(model.training)


def export(
    model: nn.Module,
    example_inputs: Any = (),
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = True,
    dynamic_shapes: Mapping[str | int, Mapping[int, Any]] | None = None,
    prepare: bool = True,
) -> torch.export.ExportedProgram:
    """``torch.export`` an eval-mode model (a CoE with early exit, BasisNet, a co-training ensemble, a network
    with CondConv2d / PWLU layers, a Hugging Face model), with a dynamic batch and a dynamic sequence length.

    ``export(model, x).module()(x_new)`` returns what ``model(x_new)`` returns (for a :class:`~pycoe.coe.model.CoE`
    a :class:`~pycoe.coe.model.CoEOutput`), for any batch size, up to the float rounding of the BatchNorm folding
    (:func:`prepare_for_export`); ``export(model, (), example_kwargs=batch).module()(**new_batch)`` likewise for a
    model called with keyword inputs only (``model(**batch)``). Routing is kept: each sample runs through its
    own expert only, and the early exit skips the experts.

    **Which dimensions are dynamic.** The batch B is dim 0 of the first tensor input (positional inputs first,
    nested tensors included). By default:

    - dim 0 of every tensor input whose size there is B is one shared dynamic ``batch`` dimension
      (``dynamic_batch``);
    - dim 1 of every ``[B, L]`` tensor of integers or booleans (token ids, attention masks, token type and
      position ids) is dynamic (``dynamic_sequence``), as ``torch.export.Dim.AUTO``: torch finds which of them
      share one length (the tokens and their mask) and which are independent (an encoder's and a decoder's);
    - every other dimension is the example's (an image's channels and size, a feature width).

    ``dynamic_shapes`` changes single dimensions: ``{input: {dim: spec}}``, where ``input`` is a keyword name
    or the position of a positional input and ``spec`` a ``torch.export.Dim``, ``Dim.AUTO``, or ``None`` /
    ``Dim.STATIC`` (fixed at the example's size), e.g. ``{0: {2: Dim.AUTO, 3: Dim.AUTO}}`` for images of any
    size, or ``{"input_ids": {1: None}, "attention_mask": {1: None}}`` for a fixed length.

    Args:
        model: an ``nn.Module`` in eval mode; not modified.
        example_inputs: a tensor or a tuple of the model's positional inputs (``()`` for none), with a batch of
            at least 2 (torch specialises a size of 1).
        example_kwargs: keyword inputs (a dict, a tokenizer's ``BatchEncoding``). The program takes them by
            name: ``program.module()(x, **kwargs)``.
        dynamic_batch: ``False``: the batch size is fixed at the example's.
        dynamic_sequence: ``False``: sequence lengths are fixed at the example's.
        dynamic_shapes: per-dimension changes to the default rule (see above).
        prepare: ``True`` (default): export :func:`prepare_for_export`'s copy; ``False``: export ``model`` as it is
            (a BatchNorm in an expert will then fail to trace, and experts not yet tried on an empty batch run on a
            padding row when they receive no sample).

    Returns:
        torch.export.ExportedProgram: call ``.module()`` for a runnable module; ``torch.export.save`` stores it.

    Raises:
        TypeError: an argument of the wrong type; ``model`` is an exported program or its ``.module()``.
        ValueError: a module is in training mode, an example batch or sequence length is smaller than 2 where it
            is dynamic, or ``dynamic_shapes`` names an input or dimension the example does not have.
        ExportError: torch could not trace the model; the message names the innermost submodule involved and
            what to change (the torch error is chained).

    Warns:
        UserWarning: the model fixed a sequence length that the default rule made dynamic.
    """
    check_bool("dynamic_batch", dynamic_batch)
    check_bool("dynamic_sequence", dynamic_sequence)
    check_bool("prepare", prepare)
    _check_eval(model)
    args = _as_args(example_inputs)
    kwargs = _as_kwargs(example_kwargs)
    shapes, auto = _dynamic_shapes(args, kwargs, dynamic_batch, dynamic_sequence, dynamic_shapes)
    prepared = prepare_for_export(model, args, kwargs) if prepare else model
    names = _top_level_names(args, kwargs)
    traced = _with_named_inputs(prepared, names, len(args))
    try:
        program = torch.export.export(traced, args, kwargs, dynamic_shapes=shapes)
    except Exception as error:  # re-raised with the submodule's name, the cause chained
        raise _explain(error, prepared) from error
    _warn_specialised(program, auto, _leaf_names(args, kwargs))
    return program


# ---------------------------------------------------------------------------------------------- ONNX
#: The ONNX opsets :func:`to_onnx` writes: torch's exporter implements opset 18 and newer (a lower request falls back
#: to 18 without a word), up to the newest opset of the installed ``onnx``.
MIN_OPSET = 18


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def output_names(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the flattened outputs of an exported program, in order: the output dataclass's field names
    (``["output", "expert_index", "exited", "confidence"]`` for a CoE), ``"output"`` for a single tensor,
    dotted paths for nested structures (``logits`` for a Hugging Face ``ModelOutput``). :func:`to_onnx` names
    the ONNX outputs so.

    Raises:
        TypeError: ``program`` is not a :class:`torch.export.ExportedProgram` (e.g. the model itself).
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(
            "program must be a torch.export.ExportedProgram (what pycoe.export.export returns), got "
            f"{type(program).__name__}; export the model first: output_names(export(model, example_inputs))"
        )
    spec = program.call_spec.out_spec
    if spec is None:
        return []
    structure = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths, _ = pytree.tree_flatten_with_path(structure)
    names = [".".join(_key_name(k) for k in path) or "output" for path, _ in paths]
    return [n if not n.isdigit() else f"output_{n}" for n in names]


def _require_deploy() -> Any:
    """``onnx``, after checking that the ``deploy`` extra (onnx, onnxscript) is installed."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(
            f"to_onnx needs {' and '.join(missing)}, which pycoe installs with its deploy extra: "
            "pip install 'pycoe[deploy]' (onnx, onnxscript and onnxruntime)",
            name=missing[0],
        )
    return importlib.import_module("onnx")


def _check_onnx_path(path: Any) -> str:
    path = check_path("path", path, what="the .onnx file to write")
    if os.path.isdir(path):
        raise ValueError(
            f"path {path!r} is a directory; name the .onnx file to write (e.g. {os.path.join(path, 'model.onnx')!r})"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path's folder {folder!r} does not exist; create it first")
    return path


def _check_opset(opset_version: Any, onnx: Any) -> None:
    if opset_version is None:
        return
    check_positive_int("opset_version", opset_version)
    newest = int(onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= opset_version <= newest:
        raise ValueError(
            f"opset_version must be None (torch's default) or an opset from {MIN_OPSET} to {newest}, got "
            f"{opset_version}: torch's ONNX exporter writes opset {MIN_OPSET} or newer (it would silently write "
            f"{MIN_OPSET} instead of an older one), and the installed onnx knows opsets up to {newest}"
        )


def _onnx_error(error: Exception, model: nn.Module) -> ExportError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    message = (
        f"torch.onnx.export could not convert the exported program: {type(error).__name__}: {first_line}\n"
        "the program itself is fine (pycoe.export.export returns it)"
    )
    sdpa = [
        f"submodule {name!r}" if name else "the model"
        for name, m in model.named_modules()
        if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"
    ]
    if sdpa:
        message += (
            f"; {sdpa[0]} is a Hugging Face model with SDPA attention, which torch 2.14 fails to convert for some "
            "architectures (T5): build it with attn_implementation='eager' (the same weights load into either)"
        )
    return ExportError(message)


def to_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = True,
    dynamic_shapes: Mapping[str | int, Mapping[int, Any]] | None = None,
    opset_version: int | None = None,
) -> list[str]:
    """Write an eval-mode model as an ONNX file with a dynamic batch (and sequence length), through
    :func:`export` and ``torch.onnx.export(..., dynamo=True)``; run it with onnxruntime.

    Inputs are named ``input_0``, ``input_1``, ... (the positional tensor inputs) and by their keyword names
    (``input_ids``, ``attention_mask``, ...): ``to_onnx(model, (), path, example_kwargs=batch)`` gives an ONNX
    model that ``session.run(None, {k: v.numpy() for k, v in batch.items()})`` runs. Outputs are the flattened
    outputs of the eval forward, named by :func:`output_names`; the **first output is the prediction** (for a
    :class:`~pycoe.coe.model.CoE`: ``output``, ``expert_index``, ``exited``, ``confidence``; for a
    :class:`~pycoe.basisnet.model.BasisNet`: ``output``, ``exited``, ``confidence``, ``coefficients``).

    Args:
        model: an ``nn.Module`` in eval mode; not modified.
        example_inputs: a tensor or a tuple of positional inputs (``()`` for none), as for :func:`export`.
        path: the ``.onnx`` file to write (weights included, one file); its folder must exist.
        example_kwargs, dynamic_batch, dynamic_sequence, dynamic_shapes: as for :func:`export`.
        opset_version: the ONNX opset, from 18 to the installed onnx's newest (default: torch's).

    Returns:
        list[str]: the output names, in order.

    Raises:
        ModuleNotFoundError: onnx or onnxscript is missing (``pip install 'pycoe[deploy]'``).
        TypeError, ValueError: a bad argument, checked before the export starts (``path`` empty, a directory or
            in a missing folder; an opset outside the range above); as for :func:`export`.
        ExportError: as for :func:`export`; or torch's ONNX converter failed on the exported program (the message
            says what to try; torch's error is chained).
    """
    onnx = _require_deploy()
    path = _check_onnx_path(path)
    _check_opset(opset_version, onnx)
    program = export(
        model,
        example_inputs,
        example_kwargs=example_kwargs,
        dynamic_batch=dynamic_batch,
        dynamic_sequence=dynamic_sequence,
        dynamic_shapes=dynamic_shapes,
    )
    names = output_names(program)
    try:
        torch.onnx.export(
            program,
            f=path,
            input_names=_leaf_names(_as_args(example_inputs), _as_kwargs(example_kwargs)),
            output_names=names,
            opset_version=opset_version,
            dynamo=True,
            external_data=False,
        )
    except Exception as error:  # re-raised with what to try, the cause chained
        raise _onnx_error(error, model) from error
    if opset_version is not None:
        written = [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")]
        if written != [opset_version]:
            raise ExportError(f"torch's exporter wrote opset {written} instead of opset_version={opset_version}")
    return names


# ---------------------------------------------------------------------------------------------- torch.compile
class _CompiledInference(nn.Module):
    """A compiled eval forward that lets dynamo capture the data-dependent sub-batch sizes of the routing."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config

        # nonzero (which samples exit, which go to expert k) has a data-dependent size: without the first setting
        # dynamo ends the graph there. Inductor's layout optimisation makes convolutions channels-last, which the
        # stride prediction of a convolution on a data-dependent batch does not follow (the compiled code then
        # fails its stride assertion): the second setting keeps inductor's layouts. Both are read when a graph is
        # compiled, i.e. inside this call.
        with (
            torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True),
            torch._inductor.config.patch(layout_optimization=False),
        ):
            return self.compiled(*args, **kwargs)


def compile_inference(
    model: nn.Module,
    example_inputs: Any = (),
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    **compile_kwargs: Any,
) -> nn.Module:
    """``torch.compile`` an eval-mode model's inference forward into **one graph**, routing and early exit included.

    :func:`prepare_for_export`'s copy (BatchNorm folded; ``model`` is not changed) is compiled with
    ``fullgraph=True, dynamic=True`` (override with ``compile_kwargs``), and every call runs with dynamo's
    ``capture_dynamic_output_shape_ops`` on, so that the data-dependent sub-batches (the kept samples, each
    expert's rows) stay in the graph. A plain ``torch.compile(model)`` also works, in several graphs: see the
    "Deploying a CoE" guide.

    Args:
        model: an ``nn.Module`` in eval mode.
        example_inputs: a tensor or a tuple of positional inputs (one eager forward prepares the copy; ``()`` for
            none: ``compile_inference(model, (), example_kwargs=batch)``, then ``fast(**batch)``).
        example_kwargs: keyword inputs of that forward.
        **compile_kwargs: passed to :func:`torch.compile` (e.g. ``backend="aot_eager"``, ``mode="max-autotune"``).

    Returns:
        nn.Module: call it like ``model``; it compiles on its first calls (a batch of 1 and, for convolutions on
        the CPU, batches below 16 get their own compilation).
    """
    prepared = prepare_for_export(model, example_inputs, example_kwargs)
    compile_kwargs.setdefault("fullgraph", True)
    compile_kwargs.setdefault("dynamic", True)
    return _CompiledInference(torch.compile(prepared, **compile_kwargs))  # type: ignore[arg-type]
