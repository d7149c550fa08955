"""The pool of expert networks of a Collaboration of Experts.

Collaboration of Experts (CoE; Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815) pairs a delegator with K
experts, "each an individual network" (abstract). :class:`ExpertPool` holds those K networks and runs them in
the two ways CoE needs:

- **dense** (``pool(*inputs)``): every expert on the whole batch, stacked ``Tensor[K, B, ...]``. Training uses
  it: the WGM weights and the LGM labels need every expert's loss on every sample.
- **routed** (``pool.forward_routed(index, *inputs)``): each sample goes to one expert; one forward per
  non-empty expert on its sub-batch, outputs scattered back in the original order. Inference uses it.

Einstein legend: ``k`` expert (K of them), ``b`` sample (B), ``...`` the experts' own output dimensions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._inputs import batch_size, batched_names, map_batched
from .._modules import explain_call_error, traceable
from .._validation import check_choice, check_expert_index, check_module, check_positive_int
from ..twostage.delegator import STRIPPED_MARK, is_timm_model

__all__ = ["ExpertPool"]


class ExpertPool(nn.Module):
    """K expert networks, run densely (training) or routed one expert per sample (inference).

    The experts may be any :class:`~torch.nn.Module` (heterogeneous architectures are allowed) as long as, for
    the same inputs, their predictions have the same shape ``[B, ...]``. They may take several positional or
    keyword inputs, for example a translation expert ``expert(src, tgt_in) -> Tensor[B, T, V]`` or a Hugging Face
    model ``expert(input_ids=..., attention_mask=...)``.

    **Outputs as they come.** An expert may return a tensor (the prediction), a tuple or list (its element 0: the
    prediction of a Hugging Face model called with ``return_dict=False`` and no labels), or a mapping such as a
    Hugging Face ``ModelOutput``, from which ``output_key`` takes the prediction (``"logits"`` by default).
    ``output_key`` may also be a callable ``output -> Tensor`` for any other structure.

    Args:
        experts: the K expert networks (K >= 1), registered as ``self.experts`` (an :class:`~torch.nn.ModuleList`).
        output_key: the key of the prediction in a mapping output (default ``"logits"``), or a callable
            ``output -> Tensor[B, ...]`` applied to every expert's raw output.

    Attributes:
        experts (nn.ModuleList): the experts.

    Example:
        >>> pool = ExpertPool.from_template(nn.Linear(8, 3), num_experts=4)
        >>> pool(torch.randn(5, 8)).shape
        torch.Size([4, 5, 3])
        >>> pool.forward_routed(torch.tensor([0, 3, 3, 1, 0]), torch.randn(5, 8)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self, experts: Sequence[nn.Module], output_key: str | Callable[[Any], torch.Tensor] = "logits"
    ) -> None:
        super().__init__()
        if not (isinstance(output_key, str) or callable(output_key)):
            raise TypeError(
                "output_key must be the key of the prediction in the experts' mapping outputs (e.g. 'logits') or a "
                f"callable output -> Tensor, got {type(output_key).__name__}"
            )
        if isinstance(experts, nn.Module) and not isinstance(experts, (nn.ModuleList, nn.Sequential)):
            raise TypeError(
                "experts must be a sequence of nn.Module (use ExpertPool.from_template(model, num_experts) to "
                f"copy one model), got a single {type(experts).__name__}"
            )
        try:
            experts = list(experts)
        except TypeError:
            raise TypeError(f"experts must be a sequence of nn.Module, got {type(experts).__name__}") from None
        if len(experts) == 0:
            raise ValueError("experts must hold at least one nn.Module, got an empty sequence")
        for i, e in enumerate(experts):
            check_module(f"experts[{i}]", e)
        if len({id(e) for e in experts}) != len(experts):
            raise ValueError(
                "experts must be distinct module objects (the same module appears twice); "
                "use ExpertPool.from_template to make independent copies"
            )
        for i, e in enumerate(experts):
            _check_not_stripped(f"experts[{i}]", e)
        self.experts = nn.ModuleList(experts)
        self.output_key = output_key

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_template(
        cls,
        model: nn.Module,
        num_experts: int,
        init: str = "copy",
        output_key: str | Callable[[Any], torch.Tensor] = "logits",
    ) -> ExpertPool:
        """K independent deep copies of ``model``.

        Args:
            model: the template (left untouched); typically a "universal" network pretrained on all the data.
            num_experts: K >= 1.
            init: ``"copy"`` keeps the template's weights in every expert (the usual start from a pretrained
                model); ``"reinit"`` gives each copy its own random initialisation, the one its library gives a
                new model:

                * every submodule with a ``reset_parameters()`` method is reset (PyTorch's default init, what a
                  model's layers get when they are built);
                * then each Hugging Face model inside (duck-typed: a ``config`` and ``init_weights()``/
                  ``_init_weights()``, as ``transformers.PreTrainedModel`` has) is re-initialised by its own
                  ``init_weights()``, after clearing the ``_is_hf_initialized`` marks that make it skip modules
                  already initialised: normal weights of std ``config.initializer_range`` (0.02 for BERT), zero
                  biases, unit LayerNorms, tied embeddings re-tied, exactly as ``Model(config)`` does;
                * and each timm model that offers ``init_weights()`` (ResNet, ViT, ...) is re-initialised by it
                  (timm models without it, such as EfficientNet or ConvNeXt, whose init runs only in their
                  constructor, keep PyTorch's default init of the first step).

                Parameters of modules without ``reset_parameters`` that no library init covers keep the template's
                values.
            output_key: passed to :class:`ExpertPool` (where the prediction is in the experts' outputs).

        Returns:
            ExpertPool: the pool, on the template's device and dtype.
        """
        check_module("model", model)
        num_experts = check_positive_int("num_experts", num_experts)
        check_choice("init", init, ("copy", "reinit"))
        _check_not_stripped("model", model)
        experts = [copy.deepcopy(model) for _ in range(num_experts)]
        if init == "reinit":
            for expert in experts:
                _reinitialise(expert)
        return cls(experts, output_key=output_key)

    # ------------------------------------------------------------------ container protocol
    @property
    def num_experts(self) -> int:
        """K, the number of experts."""
        return len(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, k: int) -> nn.Module:
        if isinstance(k, int) and not -self.num_experts <= k < self.num_experts:
            raise IndexError(
                f"expert index {k} is out of range [0, {self.num_experts}) (num_experts={self.num_experts})"
            )
        return self.experts[k]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.experts)

    def extra_repr(self) -> str:
        key = self.output_key if isinstance(self.output_key, str) else getattr(self.output_key, "__name__", "callable")
        return f"num_experts={self.num_experts}, output_key={key!r}"

    # ------------------------------------------------------------------ dense path
    def forward(self, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        """Every expert on the whole batch.

        Args:
            *inputs: the experts' positional inputs (the same for every expert), e.g. ``x: Tensor[B, C, H, W]``
                or ``(src: Tensor[B, S], tgt_in: Tensor[B, T])``.
            **kwargs: keyword inputs passed to every expert.

        Returns:
            Tensor[K, B, ...]: expert k's output at index k.
        """
        outputs = [self._call_expert(k, inputs, kwargs) for k in range(self.num_experts)]
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) != 1:
            raise ValueError(
                "every expert must return a tensor of the same shape to be stacked [K, B, ...], got shapes "
                + ", ".join(f"expert {k}: {tuple(o.shape)}" for k, o in enumerate(outputs))
            )
        return torch.stack(outputs)

    def _call_expert(self, k: int, inputs: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        """Expert k on the inputs; its prediction, taken from its output by :meth:`prediction`."""
        try:
            out = self.experts[k](*inputs, **kwargs)
        except (RuntimeError, TypeError) as err:
            component = f"experts[{k}] ({type(self.experts[k]).__name__})"
            explained = explain_call_error(err, component, self.experts[k], tuple(inputs), kwargs)
            if explained is None:
                raise
            raise explained from err
        return self.prediction(out, k)

    def prediction(self, output: Any, k: int = 0) -> torch.Tensor:
        """The prediction in an expert's raw ``output`` (see "Outputs as they come" in the class docstring).

        Args:
            output: what expert ``k`` returned.
            k: the expert's index (for error messages).

        Returns:
            Tensor[B, ...].
        """
        key = self.output_key
        if callable(key):
            value = key(output)
            where = f"output_key={getattr(key, '__name__', 'callable')}"
        elif isinstance(output, torch.Tensor):
            return output
        elif isinstance(output, Mapping):
            if key not in output or output[key] is None:
                present = ", ".join(repr(n) for n, v in output.items() if v is not None) or "none"
                raise TypeError(
                    f"expert {k} ({type(self.experts[k]).__name__}) returned a {type(output).__name__} without "
                    f"{key!r} (output_key={key!r}); fields present: {present}. Pass ExpertPool(..., output_key=<the "
                    "field that holds the prediction>) or a callable output -> Tensor"
                )
            value, where = output[key], f"output[{key!r}]"
        elif isinstance(output, (tuple, list)) and output:
            value, where = output[0], "output[0] (experts returning a tuple give their prediction first)"
        else:
            value, where = output, "the output"
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"expert {k} ({type(self.experts[k]).__name__}): {where} is a {type(value).__name__}, not a tensor; "
                "an expert must return its prediction as a tensor, a tuple whose element 0 is it, or a mapping "
                "(such as a Hugging Face ModelOutput) that holds it under output_key"
            )
        return value

    # ------------------------------------------------------------------ routed path
    def forward_routed(self, index: torch.Tensor, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample through its own expert: one forward per non-empty expert on its sub-batch.

        Every tensor input (positional or keyword) whose first dimension is B is split by ``index``; other
        arguments are passed unchanged to every called expert. The inputs (positional or keyword) must hold at
        least one such batched tensor; keyword inputs alone are fine
        (``pool.forward_routed(index, input_ids=ids, attention_mask=mask)``).

        No expert is called on an empty batch it cannot take (many are not written for one: a Hugging Face
        attention layer reshapes with ``view(B, L, -1, d)``, which cannot infer ``-1`` for ``B = 0``). Eagerly, an
        expert that receives no sample is not called; under ``torch.compile`` / ``torch.export`` every expert is
        in the graph, and one that receives no sample runs on an empty batch if it takes one (tried once, eagerly),
        else on one padding row of zeros whose output is dropped (see :meth:`_forward_routed_traceable`). A batch
        of 0 returns expert 0's output on such a padding row, cut to 0 rows: the empty result has the experts'
        per-sample shape and dtype.

        Args:
            index: LongTensor[B], the expert of each sample, values in ``[0, K)``.
            *inputs: the experts' positional inputs, batched on dim 0.
            **kwargs: keyword inputs.

        Returns:
            Tensor[B, ...]: sample i's output from expert ``index[i]``, in the input order.
        """
        index = check_expert_index("index", index, self.num_experts)
        batch = index.shape[0]
        if batch_size(inputs, kwargs, what="forward_routed") != batch:
            raise ValueError(
                f"index has {batch} entries but the inputs have batch size {batch_size(inputs, kwargs)} (dim 0 of the "
                "first batch-first tensor); they must match"
            )
        names = batched_names(inputs, kwargs, batch)
        if traceable():
            return self._forward_routed_traceable(index, inputs, kwargs, names)
        if batch == 0:  # the shape of an empty result, without handing an expert an empty batch
            padded_inputs, padded_kwargs = map_batched(inputs, kwargs, _append_zero_row, names)
            return self._call_expert(0, padded_inputs, padded_kwargs)[:0]
        counts = torch.bincount(index, minlength=self.num_experts).tolist()
        nonempty = [k for k, c in enumerate(counts) if c > 0]
        if len(nonempty) == 1:  # every sample to one expert: no gather or scatter
            return self._call_expert(nonempty[0], inputs, kwargs)
        order = torch.argsort(index, stable=True)
        sorted_inputs, sorted_kwargs = map_batched(inputs, kwargs, lambda t: t.index_select(0, order), names)
        outputs = []
        start = 0
        for k, c in enumerate(counts):
            if c == 0:
                continue
            sub_inputs, sub_kwargs = map_batched(
                sorted_inputs,
                sorted_kwargs,
                lambda t: t[start : start + c],  # noqa: B023 (called at once)
                names,
            )
            out = self._call_expert(k, sub_inputs, sub_kwargs)
            if out.dim() == 0 or out.shape[0] != c:
                raise ValueError(
                    f"expert {k} was given {c} samples but returned shape {tuple(out.shape)}; "
                    "expert outputs must be batched on dim 0"
                )
            outputs.append((k, out))
            start += c
        _check_same_sample_shape(outputs)
        dtype = outputs[0][1].dtype
        for _, o in outputs[1:]:
            dtype = torch.promote_types(dtype, o.dtype)
        concatenated = torch.cat([o.to(dtype) for _, o in outputs])
        result = concatenated.new_empty(concatenated.shape)
        # scatter back: row j of the sorted batch is sample order[j]
        return result.index_copy(0, order, concatenated)

    def _forward_routed_traceable(
        self,
        index: torch.Tensor,
        inputs: Sequence[Any],
        kwargs: dict[str, Any],
        names: tuple[list[int], list[str]],
    ) -> torch.Tensor:
        """The routed path without a Python branch on the per-expert counts (``torch.export`` / ``torch.compile``).

        Expert k runs on the rows ``nonzero(index == k)``: a sub-batch whose size ``n_k`` is only known at run time
        (an unbacked size when traced), possibly empty; its outputs are written back with ``index_copy``. Every
        expert is in the traced graph; at run time each one computes only its own samples.

        **No expert is handed an empty batch it cannot take.** When this path runs eagerly (as the export
        preparation does before tracing), each expert is tried once on an empty batch and the answer is kept on
        the pool (for that expert module). Under trace, an expert that failed (or was never tried) gets one
        padding row of zeros at index B of every batched input (zeros of its dtype: token id 0, an all-zero
        attention mask, a black image): its rows are the first ``max(n_k, 1)`` of ``[rows, B]``, so it runs on the
        padding row exactly when it has no sample, and the result (of B + 1 rows, cut to B) drops that row's
        output. Rows never mix in an eval-mode network (BatchNorm is folded for export), so the padding changes
        no real sample's output. An expert that takes an empty batch (a convolutional network, a timm ViT) runs on
        one, at no cost.
        """
        batch = index.shape[0]
        accepts_empty = _accepts_empty_batch(self, inputs, kwargs, names)
        padded_inputs, padded_kwargs = map_batched(inputs, kwargs, _append_zero_row, names)
        parts = []
        for k in range(self.num_experts):
            rows = (index == k).nonzero().squeeze(1)  # LongTensor[n_k]
            if not accepts_empty[k]:
                padded_rows = torch.cat([rows, rows.new_full((1,), batch)])
                rows = padded_rows[: torch.sym_max(rows.shape[0], 1)]  # [rows] if n_k > 0 else [B]
            sub_inputs, sub_kwargs = map_batched(
                padded_inputs,
                padded_kwargs,
                lambda t: t.index_select(0, rows),  # noqa: B023 (called at once)
                names,
            )
            out = self._call_expert(k, sub_inputs, sub_kwargs)
            if out.dim() == 0:
                raise ValueError(f"expert {k} returned a 0-d tensor; expert outputs must be batched on dim 0")
            message = f"expert {k} must return one output row per sample (outputs batched on dim 0)"
            torch._check(out.shape[0] == rows.shape[0], lambda: message)  # noqa: B023 (called at once)
            parts.append((rows, out))
        _check_same_sample_shape([(k, out) for k, (_, out) in enumerate(parts)])
        dtype = parts[0][1].dtype
        for _, out in parts[1:]:
            if out.dtype != dtype:  # (a traced promote_types would be a graph node)
                dtype = torch.promote_types(dtype, out.dtype)
        first = parts[0][1]
        result = first.new_zeros((batch + 1, *first.shape[1:]), dtype=dtype)
        for rows, out in parts:
            result = result.index_copy(0, rows, out if out.dtype == dtype else out.to(dtype))
        return result[:batch]


# ---------------------------------------------------------------------- helpers
def _check_not_stripped(name: str, model: nn.Module) -> None:
    """Refuse a model whose classifier a :class:`~pycoe.twostage.delegator.Delegator` stripped (it returns features)."""
    for module in model.modules():
        path = getattr(module, STRIPPED_MARK, None)
        if isinstance(path, str):
            raise ValueError(
                f"{name} is (a copy of) a model whose classifier {path!r} a Delegator replaced by nn.Identity, so it "
                "returns features instead of predictions: the experts would be trained on features. Build the experts "
                "before the Delegator (ExpertPool.from_template(model, K), then Delegator(model, ...)), or give the "
                "Delegator its own copy (Delegator(copy.deepcopy(model), ...))"
            )


def _is_hf_model(module: nn.Module) -> bool:
    """Duck-typed test for a ``transformers.PreTrainedModel`` (transformers is never imported)."""
    return (
        hasattr(module, "config")
        and callable(getattr(module, "init_weights", None))
        and callable(getattr(module, "_init_weights", None))
    )


def _outermost(model: nn.Module, test: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The submodules of ``model`` (itself included) that pass ``test`` and have no ancestor that does."""
    if test(model):
        return [model]
    return [found for child in model.children() for found in _outermost(child, test)]


def _reinitialise(model: nn.Module) -> None:
    """Re-initialise ``model`` in place the way its library initialises a new model (see
    :meth:`ExpertPool.from_template`, ``init="reinit"``)."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    for hf_model in _outermost(model, _is_hf_model):
        items: list[Any] = [*hf_model.modules(), *hf_model.parameters(), *hf_model.buffers()]
        for item in items:
            if getattr(item, "_is_hf_initialized", False):
                item._is_hf_initialized = False  # else HF's init skips what it initialised once
        hf_model.init_weights()  # type: ignore[operator]
    for timm_model in _outermost(model, lambda m: is_timm_model(m) and callable(getattr(m, "init_weights", None))):
        timm_model.init_weights()  # type: ignore[operator]


def _accepts_empty_batch(
    pool: ExpertPool, inputs: Sequence[Any], kwargs: dict[str, Any], names: tuple[list[int], list[str]]
) -> list[bool]:
    """For each expert of ``pool``, whether it takes an empty batch of these inputs. Learnt eagerly (one try per
    expert module, no gradient, kept on the pool by the expert's ``id``); under trace, the answers learnt so far,
    ``False`` for an expert never tried."""
    known: dict[int, bool] | None = getattr(pool, "_accepts_empty_batch", None)
    if known is None:
        known = {}
        if not torch.compiler.is_compiling():
            setattr(pool, "_accepts_empty_batch", known)  # noqa: B010 (a plain attribute, not declared on the class)
    if not torch.compiler.is_compiling():
        empty_inputs, empty_kwargs = map_batched(inputs, kwargs, lambda t: t[:0], names)
        for k, expert in enumerate(pool.experts):
            if id(expert) in known:
                continue
            try:
                with torch.no_grad():
                    out = pool._call_expert(k, empty_inputs, empty_kwargs)
                known[id(expert)] = out.dim() > 0 and out.shape[0] == 0
            except Exception:  # any failure: that expert gets the padding row
                known[id(expert)] = False
    return [known.get(id(expert), False) for expert in pool.experts]


def _append_zero_row(t: torch.Tensor) -> torch.Tensor:
    """``t`` with one more row of zeros (of its dtype and device) at the end of dim 0."""
    return torch.cat([t, t.new_zeros((1, *t.shape[1:]))])


def _check_same_sample_shape(outputs: Sequence[tuple[int, torch.Tensor]]) -> None:
    """``(expert, output)`` pairs must agree on the per-sample shape (``shape[1:]``)."""
    # compared pairwise, not in a set: traced shapes hold symbolic sizes (a dynamic sequence length), unhashable
    first = tuple(outputs[0][1].shape[1:])
    if any(len(o.shape) - 1 != len(first) or any(a != b for a, b in zip(o.shape[1:], first)) for _, o in outputs[1:]):
        raise ValueError(
            "the experts returned outputs of different per-sample shapes ("
            + ", ".join(f"expert {k}: {tuple(o.shape[1:])}" for k, o in outputs)
            + "); all experts must agree to be gathered into one [B, ...] tensor"
        )
