"""The pool of expert networks of a Collaboration of Experts.

Collaboration of Experts (CoE; Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815) pairs a delegator with K
experts, "each an individual network" (abstract). :class:`ExpertPool` holds those K networks and runs them in
the two ways CoE needs:

- **dense** (``pool(*inputs)``): every expert on the whole batch, stacked ``Tensor[K, B, ...]``. Training uses
  it: the WGM weights and the LGM labels need every expert's loss on every sample.
- **routed** (``pool.forward_routed(index, *inputs)``): each sample goes to one expert; one forward per
  non-empty expert on its sub-batch, outputs scattered back in the original order. Inference uses it.

For experts of identical architecture the dense path can be *fused*: the K parameter sets are stacked and one
:func:`torch.func.vmap` over :func:`torch.func.functional_call` runs them all (see ``fused``).

Einstein legend: ``k`` expert (K of them), ``b`` sample (B), ``...`` the experts' own output dimensions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._validation import check_choice, check_positive_int

__all__ = ["ExpertPool"]

_FUSED_CHOICES = ("auto", True, False)


def _architecture_key(module: nn.Module) -> tuple:
    """What must agree between two experts for one to run with the other's parameters.

    Module types and their ``repr`` (which carries hyper-parameters such as stride and padding through
    ``extra_repr``), parameter and buffer names, shapes, dtypes and devices, and every submodule's train flag.
    """
    modules = tuple((name, type(m), m.training) for name, m in module.named_modules())
    params = tuple((n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in module.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype, b.device) for n, b in module.named_buffers())
    return modules, params, buffers, repr(module)


def _batched_inputs(inputs: Sequence[Any], kwargs: dict[str, Any], batch: int) -> tuple[list[int], list[str]]:
    """Positions and keyword names of the tensor inputs whose first dimension is ``batch``."""
    pos = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch]
    keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch]
    return pos, keys


class ExpertPool(nn.Module):
    """K expert networks, run densely (training) or routed one expert per sample (inference).

    The experts may be any :class:`~torch.nn.Module` (heterogeneous architectures are allowed) as long as, for
    the same inputs, they all return one tensor of the same shape ``[B, ...]``. They may take several inputs,
    for example a translation expert ``expert(src, tgt_in) -> Tensor[B, T, V]``.

    Args:
        experts: the K expert networks (K >= 1), registered as ``self.experts`` (an :class:`~torch.nn.ModuleList`).
        fused: how the dense path runs the experts.

            - ``False``: a Python loop, one forward per expert.
            - ``True``: stack the K parameter (and buffer) sets and run one
              :func:`torch.func.vmap` over :func:`torch.func.functional_call`. Requires experts of identical
              architecture (same module types, hyper-parameters, parameter shapes and train flags); a
              ``ValueError`` is raised otherwise. Buffers updated by the forward (BatchNorm running statistics
              in train mode) are written back to every expert. Random layers (dropout) draw independent
              randomness per expert. Expert 0's code runs with every expert's tensors, so experts must not
              differ in state that is neither a parameter, a buffer nor shown in their ``repr`` (true for
              :meth:`from_template` pools). Code that vmap cannot batch (e.g. ``.item()``) raises.
            - ``"auto"`` (default): the loop. In ``benchmarks/bench_coe.py`` (CPU, one thread) a CoE training step
              with the fused path took 1.7x (ResNet-18 experts) and 1.9x (MLP experts) the time of the loop, so
              ``"auto"`` keeps the loop; the name is kept so the default can follow future measurements
              (e.g. on GPUs, not measured).

    Attributes:
        experts (nn.ModuleList): the experts.

    Example:
        >>> pool = ExpertPool.from_template(nn.Linear(8, 3), num_experts=4)
        >>> pool(torch.randn(5, 8)).shape
        torch.Size([4, 5, 3])
        >>> pool.forward_routed(torch.tensor([0, 3, 3, 1, 0]), torch.randn(5, 8)).shape
        torch.Size([5, 3])
    """

    def __init__(self, experts: Sequence[nn.Module], fused: bool | str = "auto") -> None:
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
        self.fused = fused
        # (architecture key, meta-device template); a tuple so that nn.Module does not register the template
        self._fused_cache: tuple[tuple, nn.Module] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_template(
        cls, model: nn.Module, num_experts: int, init: str = "copy", fused: bool | str = "auto"
    ) -> ExpertPool:
        """K independent deep copies of ``model``.

        Args:
            model: the template (left untouched); typically a "universal" network pretrained on all the data.
            num_experts: K >= 1.
            init: ``"copy"`` keeps the template's weights in every expert (the usual start from a pretrained
                model); ``"reinit"`` calls ``reset_parameters()`` on every submodule of every copy that has it,
                so each expert gets its own random initialisation (modules without ``reset_parameters`` keep
                the template's values).
            fused: see :class:`ExpertPool`.

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
        return cls(experts, fused=fused)

    # ------------------------------------------------------------------ container protocol
    @property
    def num_experts(self) -> int:
        """K, the number of experts."""
        return len(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, k: int) -> nn.Module:
        return self.experts[k]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.experts)

    @property
    def fused(self) -> bool | str:
        """The dense-path mode: ``"auto"``, ``True`` or ``False`` (see :class:`ExpertPool`)."""
        return self._fused

    @fused.setter
    def fused(self, value: bool | str) -> None:
        if not any(value is c or (isinstance(c, str) and value == c) for c in _FUSED_CHOICES):
            raise ValueError(f"fused must be one of 'auto', True, False, got {value!r}")
        self._fused = value

    def is_homogeneous(self) -> bool:
        """Whether every expert has the same architecture (the fused path's requirement)."""
        key = _architecture_key(self.experts[0])
        return all(_architecture_key(e) == key for e in self.experts[1:])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, fused={self.fused!r}"

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
        if self._fused is True:
            return self._forward_fused(inputs, kwargs)
        return self._forward_loop(inputs, kwargs)

    def _forward_loop(self, inputs: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        outputs = [self._call_expert(k, inputs, kwargs) for k in range(self.num_experts)]
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) != 1:
            raise ValueError(
                "every expert must return a tensor of the same shape to be stacked [K, B, ...], got shapes "
                + ", ".join(f"expert {k}: {tuple(o.shape)}" for k, o in enumerate(outputs))
            )
        return torch.stack(outputs)

    def _call_expert(self, k: int, inputs: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        out = self.experts[k](*inputs, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"expert {k} ({type(self.experts[k]).__name__}) returned {type(out).__name__}; "
                "experts must return a single tensor (wrap the model to select its main output)"
            )
        return out

    def _template(self) -> nn.Module:
        """A parameter-free (meta-device) copy of expert 0, rebuilt when any expert's modules change."""
        # Cheap per-call key: module and parameter identities, shapes and train flags of every expert. The full
        # architecture comparison (including hyper-parameters through repr) runs only when this key changes.
        quick = tuple(
            (
                tuple((id(m), m.training) for m in e.modules()),
                tuple((id(p), p.shape, p.requires_grad) for p in e.parameters()),
                tuple((id(b), b.shape) for b in e.buffers()),
            )
            for e in self.experts
        )
        if self._fused_cache is None or self._fused_cache[0] != quick:
            key = _architecture_key(self.experts[0])
            for k in range(1, self.num_experts):
                if _architecture_key(self.experts[k]) != key:
                    raise ValueError(
                        f"fused=True requires experts of identical architecture, but expert {k} differs from "
                        "expert 0 (module types, hyper-parameters, parameter/buffer shapes or train/eval flags); "
                        "use fused=False for heterogeneous experts"
                    )
            self._fused_cache = (quick, copy.deepcopy(self.experts[0]).to("meta"))
        template = self._fused_cache[1]
        for m_t, m_0 in zip(template.modules(), self.experts[0].modules()):
            m_t.training = m_0.training
        return template

    def _forward_fused(self, inputs: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        from torch.func import functional_call, vmap

        template = self._template()
        named_params = [dict(e.named_parameters()) for e in self.experts]
        named_buffers = [dict(e.named_buffers()) for e in self.experts]
        # torch.stack (not stack_module_state, whose stacks are detached leaves): gradients flow back to every
        # expert's own parameters, so optimisers, DDP hooks and state_dicts keep working unchanged.
        params = {n: torch.stack([p[n] for p in named_params]) for n in named_params[0]}
        buffers = {n: torch.stack([b[n] for b in named_buffers]) for n in named_buffers[0]}

        def run(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *xs: Any) -> torch.Tensor:
            return functional_call(template, (p, b), xs, kwargs, strict=True)

        in_dims = (0, 0) + (None,) * len(inputs)
        out = vmap(run, in_dims=in_dims, randomness="different")(params, buffers, *inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"experts must return a single tensor, got {type(out).__name__}")
        # Buffers mutated in place inside the call (BatchNorm running statistics) live in the stacked copies:
        # write them back to each expert.
        with torch.no_grad():
            for n, stacked in buffers.items():
                for k, b in enumerate(named_buffers):
                    b[n].copy_(stacked[k])
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
            Tensor[B, ...]: sample i's output from expert ``index[i]``, in the input order. Experts that receive
            no sample are not called.
        """
        index = self._check_index(index)
        batch = index.shape[0]
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
            raise TypeError("forward_routed needs at least one positional tensor input batched on dim 0")
        if inputs[0].shape[0] != batch:
            raise ValueError(
                f"index has {batch} entries but the first input has batch size {inputs[0].shape[0]}; they must match"
            )
        pos, keys = _batched_inputs(inputs, kwargs, batch)
        if batch == 0:
            return self._call_expert(0, inputs, kwargs)  # lets the expert define the empty output's shape
        counts = torch.bincount(index, minlength=self.num_experts).tolist()
        nonempty = [k for k, c in enumerate(counts) if c > 0]
        if len(nonempty) == 1:  # every sample to one expert: no gather or scatter
            return self._call_expert(nonempty[0], inputs, kwargs)
        order = torch.argsort(index, stable=True)
        sorted_inputs = list(inputs)
        for i in pos:
            sorted_inputs[i] = inputs[i].index_select(0, order)
        sorted_kwargs = dict(kwargs)
        for key in keys:
            sorted_kwargs[key] = kwargs[key].index_select(0, order)
        outputs = []
        start = 0
        for k, c in enumerate(counts):
            if c == 0:
                continue
            sub_inputs = list(sorted_inputs)
            for i in pos:
                sub_inputs[i] = sorted_inputs[i][start : start + c]
            sub_kwargs = dict(sorted_kwargs)
            for key in keys:
                sub_kwargs[key] = sorted_kwargs[key][start : start + c]
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

    def _check_index(self, index: Any) -> torch.Tensor:
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a torch.LongTensor of shape [B], got {type(index).__name__}")
        if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"index must be an integer tensor (expert ids), got dtype {index.dtype}")
        if index.dim() != 1:
            raise ValueError(f"index must have shape [B], got {tuple(index.shape)}")
        index = index.long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_experts):
            raise ValueError(
                f"index values must lie in [0, {self.num_experts}) (num_experts={self.num_experts}), "
                f"got min {int(index.min())} and max {int(index.max())}"
            )
        return index
