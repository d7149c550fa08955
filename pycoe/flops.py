r"""Forward FLOPs of any module on an example input, counted by ``torch.utils.flop_counter``.

Collaboration of Experts (Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815) reports its accuracy against
*average* inference FLOPs (80.7% top-1 at 194M FLOPs). A CoE's cost depends on the data (samples that exit
early skip the experts), so pycoe measures it by running the model on real batches: :func:`count_flops`
counts the operations actually dispatched during one forward call.

Convention (check it before comparing with a paper): PyTorch's ``FlopCounterMode`` counts a multiply-add as
**2 FLOPs**, and it counts only the operations it has formulas for: matrix products (``mm``, ``addmm``, ``bmm``,
``baddbmm``), convolutions and the attention kernels. Element-wise work (bias additions, normalisation,
activations, pooling, softmax) is not counted. So torchvision's ResNet-18 at 224x224 counts
3.63 GFLOP per image here, which is the 1.8 G multiply-accumulates (GMACs) usually quoted as "1.8 GFLOPs".
Conventions vary between papers: many mobile-network papers report multiply-adds under the name "FLOPs"
(divide the counts of this module by 2 to compare with them). Which convention the CoE paper uses could not be
confirmed from a public source.

Attention is counted as the computation it performs: while counting, :func:`count_flops` turns off the fused
fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (taken in eval mode under
``no_grad``, and invisible to the counter) and restricts scaled-dot-product attention to its math backend
(whose matrix products are counted), then restores both settings. The outputs are the same; only the
kernels differ. So ``nn.MultiheadAttention`` with sequence length L and width d counts
:math:`2\,(4 L d^2 + 2 L^2 d)` FLOPs, and torchvision's ViT-B/16 counts exactly twice its published
multiply-adds.

Hugging Face models are counted the same way, called with keyword inputs as their users call them
(``count_flops(model, **batch)``), with either attention implementation (``"sdpa"`` through the math kernel,
``"eager"`` as written): a BERT layer of width d, feed-forward width f and sequence length L counts
:math:`2\,(4 L d^2 + 2 L^2 d + 2 L d f)` FLOPs per sample, exactly (tested on a tiny BERT). Two conventions to keep
in mind when comparing with a paper:

- **A padded batch is counted at its padded length.** The attention mask only hides padding tokens from attention;
  every layer still computes them, so a batch padded to length L costs what a batch of L real tokens costs. To
  count the real tokens only, count each sample (or each bucket of similar lengths) at its own length.
- **Causal attention is counted in full.** The math kernel computes all :math:`L^2` scores and then masks the
  upper half, and that is what is counted (a FlashAttention-style kernel on a GPU would skip about half).

Embedding look-ups, layer normalisation and softmax are not counted, as for every model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._inputs import batch_size
from ._validation import check_callable
from .utils import preserve_training_modes

__all__ = ["count_flops", "flops_per_sample"]


@contextlib.contextmanager
def _countable_attention() -> Iterator[None]:
    """Route attention through kernels whose matrix products FlopCounterMode sees; restore the settings after."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_flops(module: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> int:
    """Forward FLOPs of one call ``module(*example_inputs, **example_kwargs)`` on that whole batch.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts 2 FLOPs; only
    matrix products, convolutions and attention are counted, see the module docstring). Fused attention fast
    paths are turned off during the call so that attention is counted (and restored afterwards). Forward only:
    the call runs under ``torch.no_grad()``, so no backward cost is included. The module runs in its
    current train/eval mode (put it in eval mode to count inference FLOPs, e.g. with early exit), and its
    mode and buffers (such as batch-norm running statistics) are left as they were.

    Args:
        module: any ``nn.Module``.
        *example_inputs: positional inputs of the call, e.g. ``Tensor[B, 3, H, W]``.
        **example_kwargs: keyword inputs of the call.

    Returns:
        The total number of FLOPs of the call, as an ``int``.

    Example:
        >>> count_flops(nn.Linear(7, 5), torch.randn(3, 7))  # 2 * 3 * 7 * 5
        210
    """
    check_callable("module", module, expected="an nn.Module or a function")
    # imported here: torch.utils.flop_counter pulls in torch._prims (and triton when installed), which
    # would otherwise dominate ``import pycoe``
    from torch.utils.flop_counter import FlopCounterMode

    is_module = isinstance(module, nn.Module)
    buffers = [(b, b.detach().clone()) for b in module.buffers()] if is_module else []
    with preserve_training_modes(module) if is_module else contextlib.nullcontext():
        try:
            with torch.no_grad(), _countable_attention(), FlopCounterMode(display=False) as counter:
                module(*example_inputs, **example_kwargs)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
    return int(counter.get_total_flops())


def flops_per_sample(module: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> float:
    """:func:`count_flops` divided by the batch size (dim 0 of the first tensor input of dimension >= 1).

    For a data-dependent model such as a CoE in eval mode, this is the average over the samples of that
    batch; run it on representative data (or average over batches) to estimate the average inference cost.

    Args:
        module: any ``nn.Module``.
        *example_inputs: positional inputs; the first tensor among them (then among the keyword inputs)
            of dimension >= 1 is batch-first and gives ``B``.
        **example_kwargs: keyword inputs of the call.

    Returns:
        FLOPs per sample, as a ``float``.
    """
    batch = int(batch_size(example_inputs, example_kwargs, what="flops_per_sample"))
    if batch == 0:
        raise ValueError("the inputs have batch size 0 (dim 0 of the first batch-first tensor): no FLOPs per sample")
    return count_flops(module, *example_inputs, **example_kwargs) / batch
