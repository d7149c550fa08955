"""Per-sample task losses: the contract between a task and the CoE machinery.

:class:`~pycoe.coe.loss.CoELoss` needs every expert's loss on every sample, ``Tensor[B]`` per expert (the WGM
re-weights them, the LGM ranks the experts by them). For classification that is cross-entropy with
``reduction="none"``; for token-level tasks (token classification, sequence-to-sequence and causal language
modelling, where logits are ``Tensor[B, T, V]`` and padding or prompt tokens carry Hugging Face's ignore index
``-100``) it is the **mean cross-entropy over a sample's real tokens**, so that a sample's loss does not depend
on how much padding its batch has. Averaging per sample, then over samples, is pycoe's formulation: Hugging Face's
models average over all the real tokens of the batch instead, which weights long samples more.

Einstein legend: ``b`` sample (B), ``t`` token (T; any number of position dimensions), ``c`` class (C, or the
vocabulary V of token logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pycoe._validation import check_data, check_int

__all__ = ["per_sample_cross_entropy"]


def per_sample_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, shift: bool = False
) -> torch.Tensor:
    """Cross-entropy of each sample, for class logits or token logits (the class dimension is the last).

    * **Class logits** ``Tensor[B, C]`` with class indices ``LongTensor[B]`` (or class probabilities
      ``Tensor[B, C]``): ``F.cross_entropy(logits, target, reduction="none")``. A sample whose target is
      ``ignore_index`` gets 0.
    * **Token logits** ``Tensor[B, T, V]`` (or ``[B, T1, T2, ..., V]``) with token labels ``LongTensor[B, T]``: the
      mean of the token cross-entropies over the sample's real tokens (those whose label is not ``ignore_index``).
      **A sample without any real token gets 0** (it then neither trains an expert nor favours one).
    * ``shift=True``, for causal language models whose labels are the input tokens (``labels = input_ids``, as
      Hugging Face's ``*ForCausalLM`` take them): the prediction at position t is scored against the label at
      t + 1, i.e. ``logits[:, :-1]`` against ``target[:, 1:]`` (Hugging Face's models shift inside their own loss;
      pycoe's loss sees the unshifted logits, so it shifts here). Sequence-to-sequence models
      (``*ForSeq2SeqLM``) need no shift: their labels are already aligned with the decoder's logits.

    Args:
        logits: ``Tensor[B, C]`` or ``Tensor[B, T, V]`` (floating point).
        target: ``LongTensor[B]`` (or ``Tensor[B, C]`` of probabilities) for class logits; ``LongTensor[B, T]``
            for token logits; values in ``[0, C)`` or ``ignore_index``.
        ignore_index: the label of tokens (or samples) that carry no loss (Hugging Face's ``-100``).
        shift: score position t against label t + 1 (causal language models; token logits only).

    Returns:
        ``Tensor[B]``, differentiable with respect to ``logits``.

    Raises:
        TypeError: ``logits`` or ``target`` is not a tensor of the right kind.
        ValueError: the shapes do not fit the task (e.g. token logits ``[B, T, V]`` with one label per sample, or
            labels of another length), or a label is out of ``[0, C)`` and not ``ignore_index``.

    Example:
        >>> logits = torch.randn(2, 4, 10)
        >>> labels = torch.tensor([[1, 2, -100, -100], [3, 4, 5, 6]])
        >>> per_sample_cross_entropy(logits, labels).shape
        torch.Size([2])
    """
    return _per_sample_cross_entropy(logits, target, ignore_index=ignore_index, shift=shift, name="target")


def _check_kinds(logits: torch.Tensor, target: torch.Tensor, shift: bool, name: str) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        what = f"a {logits.dtype} tensor" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a floating-point tensor [B, C] or [B, T, V], got {what}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of labels, got {type(target).__name__}")
    if logits.dim() < 2:
        raise ValueError(
            f"logits must be class logits [B, C] or token logits [B, T, V], got shape {tuple(logits.shape)}"
        )
    if shift and logits.dim() < 3:
        raise ValueError(
            f"shift=True applies to token logits [B, T, V] (causal language models), got logits of shape "
            f"{tuple(logits.shape)}"
        )
    if shift and logits.shape[1] < 2:
        raise ValueError(f"shift=True needs at least 2 positions (T >= 2), got logits of shape {tuple(logits.shape)}")


def _check_token_labels(logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    """Token logits ``[B, T..., V]`` need integer labels ``[B, T...]``."""
    want = tuple(logits.shape[:-1])
    if tuple(target.shape) == want and not target.is_floating_point() and target.dtype != torch.bool:
        return
    if target.dim() == 1 and target.shape[0] == logits.shape[0]:
        raise ValueError(
            f"{name} has one label per sample (shape {tuple(target.shape)}), but the logits are per token, shape "
            f"{tuple(logits.shape)}: token logits [B, T, V] need labels [B, T] (-100 where no loss is wanted); for "
            "sequence classification the experts must return class logits [B, C] (a *ForSequenceClassification model)"
        )
    raise ValueError(
        f"{name} must be integer token labels of shape {list(want)} (one per position of the logits "
        f"{tuple(logits.shape)}, -100 where no loss is wanted), got shape {tuple(target.shape)} and dtype "
        f"{target.dtype}"
    )


def _per_sample_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int, shift: bool, name: str, check_range: bool = True
) -> torch.Tensor:
    """:func:`per_sample_cross_entropy`, naming the labels ``name`` in its errors (e.g. ``"labels"``);
    ``check_range=False`` skips the range check of the labels (for a caller that made it already)."""
    ignore_index = check_int("ignore_index", ignore_index)
    _check_kinds(logits, target, shift, name)
    if shift:
        logits, target = logits[:, :-1], target[:, 1:]
    if logits.dim() == 2:
        if target.is_floating_point() and tuple(target.shape) == tuple(logits.shape):  # class probabilities
            return F.cross_entropy(logits, target.to(logits.dtype), reduction="none")
        if tuple(target.shape) != (logits.shape[0],) or target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(
                f"{name} must be class indices LongTensor[B={logits.shape[0]}] (or class probabilities "
                f"Tensor[B, C={logits.shape[1]}]) for class logits of shape {tuple(logits.shape)}, got shape "
                f"{tuple(target.shape)} and dtype {target.dtype}"
                + ("; token labels [B, T] need token logits [B, T, V]" if target.dim() == 2 else "")
            )
    else:
        _check_token_labels(logits, target, name)
    num_classes = logits.shape[-1]
    if check_range and target.numel():
        check_data(
            ((target == ignore_index) | ((target >= 0) & (target < num_classes))).all(),
            f"{name} must hold class indices in [0, {num_classes}) or ignore_index={ignore_index}",
            lambda: f", got values in [{int(target.min())}, {int(target.max())}]",
        )
    batch, tokens = logits.shape[0], 1
    for size in target.shape[1:]:  # (not reshape(B, -1): B may be 0)
        tokens = tokens * size
    flat = F.cross_entropy(
        logits.reshape(-1, num_classes), target.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).reshape(batch, tokens)  # [B, T] (T = 1 for class logits); 0 where ignored
    real = (target.reshape(batch, tokens) != ignore_index).sum(dim=1)
    return flat.sum(dim=1) / real.clamp_min(1).to(flat.dtype)
