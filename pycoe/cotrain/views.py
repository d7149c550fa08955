"""Multi-view data for co-training: S independently augmented views of every sample.

Zhao et al., *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*, IEEE TIP 2022
(arXiv 2011.14660): each of the S small networks is trained on its own random augmentation of the same
image ("different data transformers", the paper's Fig. 2). The authors' code concatenates the views along
the channel dimension; pycoe keeps them as a **list** (one tensor per member), so the views may have any
shape and no model has to split its input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset, default_collate

from .._validation import check_callable, check_positive_int, describe

__all__ = ["MultiViewDataset", "multiview_collate"]


class MultiViewDataset(Dataset):
    """Wrap a ``(sample, target)`` dataset so that each item is ``(views, target)``, with S random views.

    ``transform`` is called ``num_views`` times on the same sample, so each call draws its own random
    parameters (torchvision's random transforms use the global torch generator, which also works in
    ``DataLoader`` workers, each seeded differently by PyTorch).

    Args:
        dataset: a map-style dataset whose items are ``(sample, target)`` pairs (e.g. torchvision's).
        transform: ``sample -> view``, usually random (e.g. crop + flip + ``ToTensor``).
        num_views: S >= 1, the number of views (one per co-trained member).
        target_transform: optional ``target -> target``, applied once.

    Example:
        >>> loader = torch.utils.data.DataLoader(
        ...     MultiViewDataset(train_set, augment, num_views=2), batch_size=64,
        ...     shuffle=True, collate_fn=multiview_collate)
        >>> views, target = next(iter(loader))   # views: list of 2 Tensor[64, C, H, W]
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[Any], Any],
        num_views: int,
        target_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"dataset must be a map-style dataset (with __getitem__ and __len__), got {describe(dataset)}"
            )
        check_callable("transform", transform, expected="sample -> view")
        check_callable("target_transform", target_transform, allow_none=True, expected="target -> target")
        self.dataset = dataset
        self.transform = transform
        self.num_views = check_positive_int("num_views", num_views)
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[list[Any], Any]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(
                f"MultiViewDataset expects the wrapped dataset to return (sample, target) pairs; item {index} is "
                f"a {type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            )
        sample, target = item
        views = [self.transform(sample) for _ in range(self.num_views)]
        if self.target_transform is not None:
            target = self.target_transform(target)
        return views, target


def multiview_collate(batch: Sequence[tuple[Sequence[Any], Any]]) -> tuple[list[Any], Any]:
    """Collate ``(views, target)`` items into ``(list of S batched views, batched targets)``.

    View ``i`` of every item is collated (with ``torch.utils.data.default_collate``) into the i-th
    batched view, so ``views[i]`` is ``Tensor[B, ...]`` for member ``i``.

    Args:
        batch: a list of B items ``(views, target)`` where every ``views`` has the same length S.

    Returns:
        ``(views, targets)``: a list of S collated views and the collated targets (``Tensor[B]``).
    """
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)):
        raise TypeError(f"batch must be a sequence of (views, target) items, got {describe(batch)}")
    if len(batch) == 0:
        raise ValueError("batch must be a non-empty sequence of (views, target) items")
    first = batch[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2 or not isinstance(first[0], (tuple, list)):
        raise TypeError("each batch item must be a (views, target) pair with views a list (see MultiViewDataset)")
    num_views = len(first[0])
    for i, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], (tuple, list)):
            raise TypeError(f"batch item {i} must be a (views, target) pair with views a list")
        if len(item[0]) != num_views:
            raise ValueError(
                f"every item must have the same number of views; item 0 has {num_views} but item {i} has {len(item[0])}"
            )
    views = [default_collate([item[0][v] for item in batch]) for v in range(num_views)]
    targets = default_collate([item[1] for item in batch])
    return views, targets
