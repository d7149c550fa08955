"""Slow, obviously-correct references for the routed and early-exit paths: one sample at a time."""

from __future__ import annotations

import torch
from torch import nn


def routed_per_sample(experts: list[nn.Module] | nn.ModuleList, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sample i through expert ``index[i]`` alone, stacked in the input order."""
    return torch.cat([experts[int(k)](x[i : i + 1]) for i, k in enumerate(index.tolist())])


def coe_eval_per_sample(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CoE's eval output sample by sample: ``(output, expert_index, exited)``.

    Sample i exits when the maximum softmax probability of its rough logits reaches the threshold; otherwise it
    goes to the argmax of its selection logits. Every stage runs on that one sample only.
    """
    outputs, index, exited = [], [], []
    for i in range(x.shape[0]):
        d = model.delegator(x[i : i + 1])
        threshold = model.exit_threshold
        confident = threshold is not None and float(torch.softmax(d.rough_logits.float(), 1).max()) >= threshold
        if confident:
            outputs.append(d.rough_logits)
            index.append(-1)
        else:
            k = int(d.selection_logits.argmax(1))
            outputs.append(model.experts[k](x[i : i + 1]))
            index.append(k)
        exited.append(confident)
    return torch.cat(outputs), torch.tensor(index), torch.tensor(exited)
