"""A CoE and its loss as one module, for trainers that expect ``model(**batch)`` to return the loss.

``transformers.Trainer`` (and loops written the same way) call ``outputs = model(**batch)`` and read
``outputs["loss"]`` in training, ``outputs["loss"]`` and the remaining entries (the predictions) in evaluation.
:class:`CoEWithLoss` gives a :class:`~pycoe.coe.model.CoE` that interface; transformers is not imported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..functional.losses import per_sample_cross_entropy
from .loss import CoELoss
from .model import CoE

__all__ = ["CoEWithLoss"]


class CoEWithLoss(nn.Module):
    """``model(*args, labels=..., **kwargs) -> dict`` with the loss, for ``transformers.Trainer``.

    - **Training mode**: the CoE's training forward, then ``criterion(output, labels)``; returns
      ``{"loss": Tensor[], "info": dict}`` (``info`` is the :class:`~pycoe.coe.loss.CoELoss` info dict).
    - **Eval mode**: the CoE's inference (routing and early exit); returns ``{"loss": Tensor[], "logits":
      Tensor[B, ...]}`` where ``logits`` is the final prediction (the chosen expert's output, or the rough logits
      of a sample that exited) and ``loss`` the task loss of that prediction: the mean over samples of
      ``criterion.per_sample_loss`` (default: :func:`~pycoe.functional.per_sample_cross_entropy`, for token
      logits the mean over each sample's real tokens first). Without labels, only ``{"logits": ...}``.

    With ``transformers.Trainer``: ``Trainer(model=CoEWithLoss(coe, criterion), args=TrainingArguments(...,
    remove_unused_columns=False), ...)``. ``remove_unused_columns=False`` is needed because the Trainer keeps only
    the batch columns named in ``forward``'s signature, and this ``forward`` takes any keyword input. The attribute
    ``accepts_loss_kwargs = False`` tells the Trainer not to pass its token count (``num_items_in_batch``): the
    loss is the CoE loss of the batch, averaged as :class:`~pycoe.coe.loss.CoELoss` averages it.

    Args:
        model: the :class:`~pycoe.coe.model.CoE`.
        criterion: its :class:`~pycoe.coe.loss.CoELoss`.

    Attributes:
        model (CoE), criterion (CoELoss).

    Example:
        >>> from pycoe import BalancedTransportWeighter, CoE, CoELoss, Delegator, ExpertPool, LabelGenerator
        >>> coe = CoE(Delegator(nn.Linear(4, 8), 2, num_classes=3, feature_dim=8, classifier=None),
        ...           ExpertPool.from_template(nn.Linear(4, 3), 2))
        >>> model = CoEWithLoss(coe, CoELoss(BalancedTransportWeighter(2), LabelGenerator()))
        >>> out = model(torch.randn(6, 4), labels=torch.randint(0, 3, (6,)))
        >>> out["loss"].backward()
        >>> sorted(model.eval()(torch.randn(6, 4), labels=torch.randint(0, 3, (6,))))
        ['logits', 'loss']
    """

    accepts_loss_kwargs = False  # read by transformers.Trainer: no num_items_in_batch in the inputs

    def __init__(self, model: CoE, criterion: CoELoss) -> None:
        super().__init__()
        if not isinstance(model, CoE):
            raise TypeError(f"model must be a pycoe CoE, got {type(model).__name__}")
        if not isinstance(criterion, CoELoss):
            raise TypeError(f"criterion must be a pycoe CoELoss, got {type(criterion).__name__}")
        self.model = model
        self.criterion = criterion

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> dict[str, Any]:
        """See the class docstring.

        Args:
            *args: the CoE's positional inputs.
            **kwargs: its keyword inputs (``input_ids=..., attention_mask=...``).
            labels: the targets (required in training).
        """
        _check_batch(args, kwargs, labels)
        if self.training:
            if labels is None:
                raise ValueError(
                    "CoEWithLoss needs labels in training (model(**batch) with batch['labels']): the CoE loss is "
                    "computed against them"
                )
            loss, info = self.criterion(self.model.forward_train(*args, **kwargs), labels)
            return {"loss": loss, "info": info}
        output = self.model.forward_eval(*args, **kwargs).output
        if labels is None:
            return {"logits": output}
        per_sample = self.criterion.per_sample_loss or per_sample_cross_entropy
        return {"loss": per_sample(output, labels).mean(), "logits": output}


def _check_batch(args: tuple[Any, ...], kwargs: dict[str, Any], labels: Any) -> None:
    """A clear error for the usual ``transformers.Trainer`` mistake: every column but the labels removed."""
    if args or any(isinstance(v, torch.Tensor) for v in kwargs.values()) or labels is None:
        return
    raise TypeError(
        "CoEWithLoss received labels but no model input: transformers.Trainer removes the batch columns that "
        "forward's signature does not name, and CoEWithLoss.forward takes any keyword input; pass "
        "TrainingArguments(..., remove_unused_columns=False)"
    )
