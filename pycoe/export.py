"""Deploy a trained model: ``torch.export`` with a dynamic batch, ONNX for onnxruntime.

A Collaboration of Experts is a delegator plus K static networks, which is what makes it cheap to run: this
module takes an eval-mode :class:`~pycoe.coe.model.CoE` (early exit included),
:class:`~pycoe.basisnet.model.BasisNet`, :class:`~pycoe.cotrain.ensemble.CoTrainingEnsemble` or any model with
:class:`~pycoe.layers.condconv.CondConv2d` / :class:`~pycoe.layers.pwlu.PWLU` layers out of Python.

- :func:`export` returns a :class:`torch.export.ExportedProgram` whose module returns what the eager eval forward
  returns (the output dataclasses are registered pytrees), for any batch size. Routing stays real: each sample
  runs only through its own expert, on a sub-batch whose size is data-dependent.
- :func:`to_onnx` writes the same program as an ONNX file (``torch.onnx.export(..., dynamo=True)``) with a dynamic
  batch, for onnxruntime.
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
import os
import traceback
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from pycoe._batchnorm_folding import BATCH_NORMS, BatchNormAffine, foldable_pairs, output_mismatch
from pycoe._modules import replace_modules, traceable_paths
from pycoe._validation import check_bool, check_positive_int

__all__ = ["ExportError", "prepare_for_export", "export", "to_onnx", "output_names", "compile_inference"]


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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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
    model: nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None = None
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
        example_inputs: a tensor or a tuple of the model's positional inputs (one forward is run on them).
        example_kwargs: keyword inputs of that forward.

    Returns:
        nn.Module: the prepared copy, in eval mode.

    Raises:
        ValueError: a module is in training mode, or an eval BatchNorm uses batch statistics
            (``track_running_stats=False``): its output depends on the other samples of the batch.
        ExportError: the model fails on the example when every expert is called (also on an empty batch), or
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
            "Every expert (and BasisNet's specialist) is called, also on an empty batch when it receives no "
            "sample: it must accept one"
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


# ---------------------------------------------------------------------------------------------- export
def _batch_dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, int | None]:
    """Dynamic shapes giving dim 0 of every tensor input with the first tensor input's batch size one shared
    ``batch`` dimension; and that batch size (``None`` without tensor inputs)."""
    tensors = [t for t in pytree.tree_leaves((args, dict(kwargs))) if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        return None, None
    batch = int(tensors[0].shape[0])
    dim = torch.export.Dim("batch")
    shapes = torch.export.ShapesCollection()
    for t in tensors:
        if t.dim() > 0 and t.shape[0] == batch:
            shapes[t] = {0: dim}
    return shapes.dynamic_shapes(model, args, dict(kwargs)), batch


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


class _KeywordInputsLast(nn.Module):
    """``model`` with its keyword inputs given as trailing positional inputs.

    torch 2.14 generates a broken input check (a ``NameError`` when ``ExportedProgram.module()`` is called) for a
    ``forward(*inputs, **kwargs)`` whose keyword tensors share the dynamic batch: such a model is exported through
    this wrapper, and the program takes the keyword inputs positionally, after the positional ones.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *args: Any) -> Any:
        n = len(args) - len(self.names)
        return self.model(*args[:n], **dict(zip(self.names, args[n:])))


def _takes_var_keyword(model: nn.Module) -> bool:
    import inspect

    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())


def export(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    prepare: bool = True,
) -> torch.export.ExportedProgram:
    """``torch.export`` an eval-mode model (a CoE with early exit, BasisNet, a co-training ensemble, any network
    with CondConv2d / PWLU layers), with a dynamic batch size.

    ``export(model, x).module()(x_new)`` returns what ``model(x_new)`` returns (for a :class:`~pycoe.coe.model.CoE`
    a :class:`~pycoe.coe.model.CoEOutput`), for any batch size ``x_new.shape[0]``, up to the float rounding of the
    BatchNorm folding (:func:`prepare_for_export`). Routing is kept: each sample runs through its own expert only,
    the early exit skips the experts, and an expert that receives no sample computes nothing.

    Args:
        model: an ``nn.Module`` in eval mode; not modified.
        example_inputs: a tensor or a tuple of the model's positional inputs, with a batch of at least 2 (torch
            specialises a size of 1).
        example_kwargs: keyword inputs. For a model whose forward takes ``**kwargs`` (such as
            :class:`~pycoe.coe.model.CoE`) with a dynamic batch, the program takes them as trailing positional
            inputs, in this order (``program.module()(x, y, scale)`` for ``model(x, y, scale=s)``): torch 2.14
            cannot check the inputs of such a signature.
        dynamic_batch: ``True`` (default): dim 0 of every tensor input whose size equals the first input's batch
            is one dynamic ``batch`` dimension; ``False``: the program accepts only the example's shapes.
        prepare: ``True`` (default): export :func:`prepare_for_export`'s copy; ``False``: export ``model`` as it is
            (a BatchNorm in an expert will then fail to trace).

    Returns:
        torch.export.ExportedProgram: call ``.module()`` for a runnable module; ``torch.export.save`` stores it.

    Raises:
        TypeError: ``model``, ``example_inputs``, ``example_kwargs``, ``dynamic_batch`` or ``prepare`` of the
            wrong type.
        ValueError: a module is in training mode, or the example batch is smaller than 2.
        ExportError: torch could not trace the model; the message names the innermost submodule involved and
            what to change (the torch error is chained).
    """
    check_bool("dynamic_batch", dynamic_batch)
    check_bool("prepare", prepare)
    _check_eval(model)
    args = _as_args(example_inputs)
    kwargs = _as_kwargs(example_kwargs)
    prepared = prepare_for_export(model, args, kwargs) if prepare else model
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes, batch = _batch_dynamic_shapes(prepared, args, kwargs)
        if batch is not None and batch < 2:
            raise ValueError(
                f"example_inputs must have a batch of at least 2 for a dynamic batch (torch specialises a size of "
                f"{batch}), got batch size {batch}; the exported program still runs on batches of 1 (or pass "
                "dynamic_batch=False)"
            )
    traced: nn.Module = prepared
    if kwargs and dynamic_batch and _takes_var_keyword(prepared):
        traced = _KeywordInputsLast(prepared, list(kwargs))
        args, kwargs = (*args, *kwargs.values()), {}
        dynamic_shapes, _ = _batch_dynamic_shapes(traced, args, kwargs)
    try:
        return torch.export.export(traced, args, kwargs, dynamic_shapes=dynamic_shapes)
    except Exception as error:  # re-raised with the submodule's name, the cause chained
        raise _explain(error, prepared) from error


# ---------------------------------------------------------------------------------------------- ONNX
def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def output_names(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the flattened outputs of an exported program, in order: the output dataclass's field names
    (``["output", "expert_index", "exited", "confidence"]`` for a CoE), ``"output"`` for a single tensor,
    dotted paths for nested structures. :func:`to_onnx` names the ONNX outputs so."""
    spec = program.call_spec.out_spec
    if spec is None:
        return []
    structure = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths, _ = pytree.tree_flatten_with_path(structure)
    names = [".".join(_key_name(k) for k in path) or "output" for path, _ in paths]
    return [n if not n.isdigit() else f"output_{n}" for n in names]


def to_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
) -> list[str]:
    """Write an eval-mode model as an ONNX file with a dynamic batch, through :func:`export` and
    ``torch.onnx.export(..., dynamo=True)``; run it with onnxruntime.

    Inputs are named ``input_0``, ``input_1``, ... (the positional inputs, then the keyword inputs by name).
    Outputs are the flattened outputs of the eval forward, named by :func:`output_names`; the **first output is
    the prediction** (for a :class:`~pycoe.coe.model.CoE`: ``output``, ``expert_index``, ``exited``,
    ``confidence``; for a :class:`~pycoe.basisnet.model.BasisNet`: ``output``, ``exited``, ``confidence``,
    ``coefficients``).

    Args:
        model: an ``nn.Module`` in eval mode; not modified.
        example_inputs: a tensor or a tuple of positional inputs (batch >= 2), as for :func:`export`.
        path: the ``.onnx`` file to write (weights included, one file).
        example_kwargs: keyword inputs.
        dynamic_batch: as for :func:`export`.
        opset_version: the ONNX opset (default: torch's).

    Returns:
        list[str]: the output names, in order.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (the .onnx file to write), got {type(path).__name__}")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise ValueError(f"path's folder {folder!r} does not exist; create it first")
    if opset_version is not None:
        check_positive_int("opset_version", opset_version)
    program = export(model, example_inputs, example_kwargs=example_kwargs, dynamic_batch=dynamic_batch)
    names = output_names(program)
    n_inputs = sum(isinstance(t, torch.Tensor) for t in pytree.tree_leaves((_as_args(example_inputs), example_kwargs)))
    torch.onnx.export(
        program,
        f=os.fspath(path),
        input_names=[f"input_{i}" for i in range(n_inputs)],
        output_names=names,
        opset_version=opset_version,
        dynamo=True,
        external_data=False,
    )
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
    example_inputs: Any,
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
        example_inputs: a tensor or a tuple of positional inputs (one eager forward prepares the copy).
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
