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
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._inputs import batched_names, map_batched
from .._modules import explain_input_mismatch, traceable
from .._validation import check_choice, check_expert_index, check_positive_int

__all__ = ["ExpertPool"]


class ExpertPool(nn.Module):
    """K expert networks, run densely (training) or routed one expert per sample (inference).

    The experts may be any :class:`~torch.nn.Module` (heterogeneous architectures are allowed) as long as, for
    the same inputs, they all return one tensor of the same shape ``[B, ...]``. They may take several inputs,
    for example a translation expert ``expert(src, tgt_in) -> Tensor[B, T, V]``.

    Args:
        experts: the K expert networks (K >= 1), registered as ``self.experts`` (an :class:`~torch.nn.ModuleList`).

    Attributes:
        experts (nn.ModuleList): the experts.

    Example:
        >>> pool = ExpertPool.from_template(nn.Linear(8, 3), num_experts=4)
        >>> pool(torch.randn(5, 8)).shape
        torch.Size([4, 5, 3])
        >>> pool.forward_routed(torch.tensor([0, 3, 3, 1, 0]), torch.randn(5, 8)).shape
        torch.Size([5, 3])
    """

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
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
            if not isinstance(e, nn.Module):
                raise TypeError(f"experts[{i}] must be an nn.Module, got {type(e).__name__}")
        if len({id(e) for e in experts}) != len(experts):
            raise ValueError(
                "experts must be distinct module objects (the same module appears twice); "
                "use ExpertPool.from_template to make independent copies"
            )
        self.experts = nn.ModuleList(experts)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_template(cls, model: nn.Module, num_experts: int, init: str = "copy") -> ExpertPool:
        """K independent deep copies of ``model``.

        Args:
            model: the template (left untouched); typically a "universal" network pretrained on all the data.
            num_experts: K >= 1.
            init: ``"copy"`` keeps the template's weights in every expert (the usual start from a pretrained
                model); ``"reinit"`` calls ``reset_parameters()`` on every submodule of every copy that has it,
                so each expert gets its own random initialisation (modules without ``reset_parameters`` keep
                the template's values).

        Returns:
            ExpertPool: the pool, on the template's device and dtype.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        num_experts = check_positive_int("num_experts", num_experts)
        check_choice("init", init, ("copy", "reinit"))
        experts = [copy.deepcopy(model) for _ in range(num_experts)]
        if init == "reinit":
            for expert in experts:
                for m in expert.modules():
                    reset = getattr(m, "reset_parameters", None)
                    if callable(reset):
                        reset()
        return cls(experts)

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
        return f"num_experts={self.num_experts}"

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
        try:
            out = self.experts[k](*inputs, **kwargs)
        except (RuntimeError, TypeError) as err:
            x = inputs[0] if inputs else None
            mismatch = explain_input_mismatch(
                err, f"experts[{k}] ({type(self.experts[k]).__name__})", self.experts[k], x
            )
            if mismatch is None:
                raise
            raise mismatch from err
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"expert {k} ({type(self.experts[k]).__name__}) returned {type(out).__name__}; "
                "experts must return a single tensor (wrap the model to select its main output)"
            )
        return out

    # ------------------------------------------------------------------ routed path
    def forward_routed(self, index: torch.Tensor, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample through its own expert: one forward per non-empty expert on its sub-batch.

        Every tensor input (positional or keyword) whose first dimension is B is split by ``index``; other
        arguments are passed unchanged to every called expert. The first tensor input (positional inputs first,
        then keyword inputs) must be such a batched tensor; keyword inputs alone are fine
        (``pool.forward_routed(index, input_ids=ids, attention_mask=mask)``).

        No expert is ever called on an empty batch (many are not written for one: a Hugging Face attention
        layer reshapes with ``view(B, L, -1, d)``, which cannot infer ``-1`` for ``B = 0``). Eagerly, an expert
        that receives no sample is not called; under ``torch.compile`` / ``torch.export`` every expert is in the
        graph, and one that receives no sample runs on one padding row of zeros instead, whose output is
        dropped (see :meth:`_forward_routed_traceable`). A batch of 0 returns expert 0's output on such a
        padding row, cut to 0 rows: the empty result has the experts' per-sample shape and dtype.

        Args:
            index: LongTensor[B], the expert of each sample, values in ``[0, K)``.
            *inputs: the experts' positional inputs, batched on dim 0.
            **kwargs: keyword inputs.

        Returns:
            Tensor[B, ...]: sample i's output from expert ``index[i]``, in the input order.
        """
        index = check_expert_index("index", index, self.num_experts)
        batch = index.shape[0]
        given = next((v.shape[0] for v in (*inputs, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
        if given is None:
            raise TypeError(
                "forward_routed needs at least one positional tensor input or keyword tensor input batched on dim 0"
            )
        if given != batch:
            raise ValueError(f"index has {batch} entries but the first input has batch size {given}; they must match")
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

        Every batched input gets one padding row of zeros at index B (zeros of its dtype: token id 0, an
        all-zero attention mask, a black image). Expert k runs on the rows ``nonzero(index == k)``, a sub-batch
        whose size ``n_k`` is only known at run time (an unbacked size when traced); when ``n_k`` is 0 it runs on
        the padding row instead (its rows are the first ``max(n_k, 1)`` of ``[rows, B]``), so no expert is handed
        an empty batch. Outputs are written with ``index_copy`` into a result of B + 1 rows whose last row
        collects (and the final slice drops) the padding rows' outputs. Every expert is in the traced graph; at
        run time each one computes only its own samples, or the one padding row. Rows never mix in an eval-mode
        network (BatchNorm is folded for export), so the padding changes no real sample's output.
        """
        batch = index.shape[0]
        padded_inputs, padded_kwargs = map_batched(inputs, kwargs, _append_zero_row, names)
        parts = []
        for k in range(self.num_experts):
            rows = (index == k).nonzero().squeeze(1)  # LongTensor[n_k]
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
