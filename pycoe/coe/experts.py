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
        arguments are passed unchanged to every called expert. The first positional input must be such a
        batched tensor.

        Args:
            index: LongTensor[B], the expert of each sample, values in ``[0, K)``.
            *inputs: the experts' positional inputs, batched on dim 0.
            **kwargs: keyword inputs.

        Returns:
            Tensor[B, ...]: sample i's output from expert ``index[i]``, in the input order. Eagerly, experts that
            receive no sample are not called; under ``torch.compile`` / ``torch.export`` (no Python branch on the
            counts) every expert is called on its rows ``nonzero(index == k)``, possibly none, so experts must
            accept an empty batch there.
        """
        index = check_expert_index("index", index, self.num_experts)
        batch = index.shape[0]
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
            raise TypeError("forward_routed needs at least one positional tensor input batched on dim 0")
        if inputs[0].shape[0] != batch:
            raise ValueError(
                f"index has {batch} entries but the first input has batch size {inputs[0].shape[0]}; they must match"
            )
        names = batched_names(inputs, kwargs, batch)
        if traceable():
            return self._forward_routed_traceable(index, inputs, kwargs, names)
        if batch == 0:
            return self._call_expert(0, inputs, kwargs)  # lets the expert define the empty output's shape
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
            outputs.append(out)
            start += c
        shapes = {tuple(o.shape[1:]) for o in outputs}
        if len(shapes) != 1:
            raise ValueError(
                "the experts returned outputs of different per-sample shapes "
                f"{sorted(shapes)}; all experts must agree to be gathered into one [B, ...] tensor"
            )
        dtype = outputs[0].dtype
        for o in outputs[1:]:
            dtype = torch.promote_types(dtype, o.dtype)
        concatenated = torch.cat([o.to(dtype) for o in outputs])
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

        Expert k runs on the rows ``nonzero(index == k)``: a sub-batch whose size is only known at run time (an
        unbacked size when traced), possibly empty; its outputs are written back with ``index_copy``. Every
        expert is in the traced graph; at run time each one still computes only its own samples.
        """
        parts = []
        for k in range(self.num_experts):
            rows = (index == k).nonzero().squeeze(1)  # LongTensor[B_k]
            sub_inputs, sub_kwargs = map_batched(
                inputs,
                kwargs,
                lambda t: t.index_select(0, rows),  # noqa: B023 (called at once)
                names,
            )
            out = self._call_expert(k, sub_inputs, sub_kwargs)
            if out.dim() == 0:
                raise ValueError(f"expert {k} returned a 0-d tensor; expert outputs must be batched on dim 0")
            message = f"expert {k} must return one output row per sample (outputs batched on dim 0)"
            torch._check(out.shape[0] == rows.shape[0], lambda: message)  # noqa: B023 (called at once)
            parts.append((rows, out))
        shapes = {tuple(out.shape[1:]) for _, out in parts}
        if len(shapes) != 1:
            raise ValueError(
                "the experts returned outputs of different per-sample shapes "
                f"{sorted(shapes)}; all experts must agree to be gathered into one [B, ...] tensor"
            )
        dtype = parts[0][1].dtype
        for _, out in parts[1:]:
            if out.dtype != dtype:  # (a traced promote_types would be a graph node)
                dtype = torch.promote_types(dtype, out.dtype)
        first = parts[0][1]
        result = first.new_zeros((index.shape[0], *first.shape[1:]), dtype=dtype)
        for rows, out in parts:
            result = result.index_copy(0, rows, out if out.dtype == dtype else out.to(dtype))
        return result
