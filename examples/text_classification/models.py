"""The genre classifier's networks: small random-init BERTs from ``transformers`` configs, the delegator, the cascade,
and FLOPs as a function of a verse's length.

Every network is a ``BertForSequenceClassification`` built from a ``BertConfig`` (no download: the weights are
``transformers``' own initialisation of the config), called ``model(**batch)`` on a tokenizer's ``BatchEncoding``:

- an **expert** (and the single-model baselines): ``--expert-hidden`` wide, ``--expert-layers`` deep;
- the **delegator**: a smaller BERT trained first as a genre classifier, then wrapped by :class:`pycoe.Delegator`,
  which strips its classifier and reuses it as the rough head (``reuse_classifier=True``); its features are the
  BERT pooler's output (the first token's, after attention with the attention mask);
- the **cascade**: the delegator's rough head in front of one network, a one-expert :class:`pycoe.CoE`
  (:func:`make_cascade`), so that it exits by the same rule and is calibrated by the same function.

FLOPs: a BERT's forward FLOPs on one verse of ``L`` tokens are a quadratic polynomial in ``L`` (the projections
and feed-forward layers are linear in ``L``, the attention scores and their product with the values quadratic, the
pooler and the heads constant; embeddings are look-ups). :func:`flops_curve` counts them with
:func:`pycoe.count_flops` at ``L = 1, 2, 3``, solves for the three coefficients and checks the polynomial against a
count at a fourth length, so that the average FLOPs of a split are those of running each verse alone, unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import pycoe
from pycoe.twostage.delegator import DelegatorOutput

__all__ = [
    "bert_config",
    "new_classifier",
    "make_delegator",
    "RoughStage",
    "make_cascade",
    "FlopsCurve",
    "flops_curve",
    "matched_hidden",
]


def bert_config(
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    num_labels: int,
    max_length: int = 128,
    dropout: float = 0.1,
) -> Any:
    """A small ``BertConfig``: feed-forward width ``4 * hidden``, ``max_length`` positions, ``[PAD]`` = 0."""
    from transformers import BertConfig

    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be a multiple of heads={heads}")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_length,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=0,
    )


def new_classifier(config: Any) -> nn.Module:
    """A ``BertForSequenceClassification`` with ``transformers``' initialisation of ``config`` (call
    ``torch.manual_seed`` first for a reproducible draw)."""
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(config)


def make_delegator(classifier: nn.Module, num_experts: int) -> pycoe.Delegator:
    """The delegator: ``classifier``'s final linear layer becomes the rough head (``reuse_classifier=True``), a new
    zero-initialised selection head chooses among ``num_experts`` experts."""
    return pycoe.Delegator(classifier, num_experts=num_experts, reuse_classifier=True)


class RoughStage(nn.Module):
    """The first stage of a cascade: a delegator's backbone and rough head, and one constant selection column.

    ``forward(**batch) -> DelegatorOutput(selection_logits=zeros[B, 1], rough_logits=Tensor[B, C])``: the same
    rough logits, hence the same exit decisions, as the CoE built on that delegator; the selection head is not run.
    """

    def __init__(self, delegator: pycoe.Delegator) -> None:
        super().__init__()
        if delegator.rough_head is None:
            raise ValueError("a cascade needs a delegator with a rough head (num_classes)")
        self.delegator = delegator
        self.num_classes = delegator.num_classes
        self.num_experts = 1

    def forward(self, *args: Any, **kwargs: Any) -> DelegatorOutput:
        d = self.delegator
        assert d.rough_head is not None
        rough = d.rough_head(d.dropout(d.features(*args, **kwargs)))
        return DelegatorOutput(rough.new_zeros(rough.shape[0], 1), rough)


def make_cascade(delegator: pycoe.Delegator, network: nn.Module) -> pycoe.CoE:
    """The delegator's rough head, then ``network`` on the samples that do not exit (modules shared, not copied)."""
    return pycoe.CoE(RoughStage(delegator), pycoe.ExpertPool([network]))


@dataclass(frozen=True)
class FlopsCurve:
    """Forward FLOPs of one verse of ``L`` tokens: ``a + b L + c L^2``."""

    a: float
    b: float
    c: float

    def __call__(self, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """FLOPs per verse, ``Tensor[N]`` (float64), for verses of ``lengths`` tokens."""
        n = torch.as_tensor(lengths, dtype=torch.float64)
        return self.a + self.b * n + self.c * n * n

    def mean(self, lengths: torch.Tensor | Sequence[int]) -> float:
        """Average FLOPs per verse over verses of ``lengths`` tokens, each run alone."""
        return float(self(lengths).mean())


def _count(model: nn.Module, length: int) -> int:
    ids = torch.full((1, length), 4, dtype=torch.long)  # 4: the first non-special token id
    return pycoe.count_flops(model, input_ids=ids, attention_mask=torch.ones_like(ids))


def flops_curve(model: nn.Module, check_length: int = 64) -> FlopsCurve:
    """The quadratic FLOPs curve of ``model`` (counted in eval mode at L = 1, 2, 3, checked at ``check_length``).

    Raises:
        RuntimeError: the count at ``check_length`` is not the polynomial's (the model is not quadratic in L).
    """
    was_training = model.training
    model.eval()
    try:
        f1, f2, f3 = (_count(model, n) for n in (1, 2, 3))
        c = (f3 - 2 * f2 + f1) / 2
        b = f2 - f1 - 3 * c
        curve = FlopsCurve(f1 - b - c, b, c)
        got = _count(model, check_length)
    finally:
        model.train(was_training)
    want = float(curve([check_length])[0])
    if abs(got - want) > 1e-9 * max(1.0, got):
        raise RuntimeError(f"FLOPs at L={check_length}: counted {got}, the quadratic from L = 1, 2, 3 gives {want}")
    return curve


def matched_hidden(
    target: float,
    lengths: Sequence[int],
    vocab_size: int,
    layers: int,
    heads: int,
    num_labels: int,
    start: int,
    max_length: int = 128,
) -> tuple[int, float]:
    """The hidden size (a multiple of ``heads``, from ``start`` up) whose BERT's average FLOPs over verses of
    ``lengths`` tokens is closest to ``target``; returns ``(hidden, its average FLOPs)``."""
    best: tuple[float, int, float] | None = None
    hidden = start - start % heads
    while True:
        config = bert_config(vocab_size, hidden, layers, heads, num_labels, max_length)
        flops = flops_curve(new_classifier(config)).mean(lengths)
        if best is None or abs(flops - target) < best[0]:
            best = (abs(flops - target), hidden, flops)
        if flops > target:
            return best[1], best[2]
        hidden += heads
