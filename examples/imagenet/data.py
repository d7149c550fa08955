"""Data of the CoE recipe: Fashion-MNIST, a synthetic set, ImageNet-style image folders, and their batches.

:func:`load_data` gives the run's training, validation and test sets for ``--dataset``: the validation split is
carved out of the training data (and never trained on), the test set is the data set's own.

Fashion-MNIST (read by :mod:`examples.common.fashion_mnist`) and the synthetic set are held in memory as
``uint8`` tensors ``[N, C, H, W]`` and are batched, augmented (random crop with zero padding, horizontal flip)
and normalised on tensors, a whole batch at a time, which is far faster on a CPU than a per-image
``DataLoader``. ImageFolder data goes through a regular ``DataLoader`` with the usual ImageNet transforms.

Every loader takes its sample order from a :class:`torch.utils.data.DistributedSampler` (with one replica when
not distributed), whose order depends only on ``(seed, epoch)``; the augmentation draws come from a generator
seeded by ``(seed, epoch, rank)``. So an epoch is fully determined by the seed and its number, which is what
lets ``--resume`` reproduce an uninterrupted run exactly.

Shapes: B batch, C channels, H/W height/width, N dataset size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from examples.common import DataUnavailableError
from examples.common.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
)
from examples.imagenet.runtime import Dist

__all__ = [
    "InMemoryDataset",
    "fashion_mnist",
    "make_synthetic",
    "Splits",
    "load_data",
    "augment_crop_flip",
    "TensorBatches",
    "build_imagefolder",
    "ImageFolderBatches",
    "make_batches",
    "eval_batches",
]


@dataclass
class InMemoryDataset:
    """Images and labels in memory.

    Attributes:
        images: uint8 Tensor[N, C, H, W].
        labels: int64 Tensor[N].
        classes: class names.
        mean, std: per-channel normalisation constants (of the [0, 1]-scaled pixels).
        source: where the data came from (for the logs).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int | None, seed: int = 0) -> InMemoryDataset:
        """A class-stratified-by-chance random subset of ``n`` samples (the whole set when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        return self.take(torch.randperm(len(self), generator=g)[:n].sort().values)

    def take(self, indices: torch.Tensor) -> InMemoryDataset:
        """The samples at ``indices`` (LongTensor[n]), in that order."""
        return InMemoryDataset(
            self.images[indices], self.labels[indices], self.classes, self.mean, self.std, self.source
        )

    def split(self, n_val: int, n_train: int | None, seed: int = 0) -> tuple[InMemoryDataset, InMemoryDataset]:
        """Disjoint ``(train, val)``: ``n_val`` random samples for validation, ``n_train`` of the rest for training.

        Args:
            n_val: validation samples (``1 <= n_val < len(self)``).
            n_train: training samples drawn from the rest (``None``: all of the rest).
            seed: the random permutation's seed.
        """
        if not 1 <= n_val < len(self):
            raise ValueError(f"the validation split must hold 1 to {len(self) - 1} samples, got {n_val}")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=g)
        rest = order[n_val:] if n_train is None else order[n_val : n_val + n_train]
        return self.take(rest.sort().values), self.take(order[:n_val].sort().values)


def fashion_mnist(data_dir: str | os.PathLike | None = None) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Fashion-MNIST's ``(train, test)`` in memory (see :func:`examples.common.fashion_mnist.load_fashion_mnist`;
    torchvision downloads it when it is not on the machine and a network is available)."""
    stats = ((FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))
    train, test = load_fashion_mnist(data_dir, download=True)
    return (
        InMemoryDataset(train.images, train.labels, FASHION_MNIST_CLASSES, *stats, source=train.source),
        InMemoryDataset(test.images, test.labels, FASHION_MNIST_CLASSES, *stats, source=test.source),
    )


def make_synthetic(
    num_train: int = 512,
    num_test: int = 256,
    num_classes: int = 10,
    image_size: int = 28,
    channels: int = 1,
    seed: int = 0,
) -> tuple[InMemoryDataset, InMemoryDataset]:
    """A learnable synthetic image set: one random smooth prototype per class plus noise (for tests)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num_classes, channels, 7, 7, generator=g)
    protos = torch.nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = protos[y] + 0.25 * torch.randn(n, channels, image_size, image_size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    classes = tuple(f"class{i}" for i in range(num_classes))
    stats = ((0.5,) * channels, (0.25,) * channels)
    return (
        InMemoryDataset(*draw(num_train), classes, *stats, source="synthetic"),
        InMemoryDataset(*draw(num_test), classes, *stats, source="synthetic"),
    )


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------
def _sampler(n: int, shuffle: bool, seed: int, world_size: int, rank: int, drop_last: bool) -> DistributedSampler:
    return DistributedSampler(
        range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )


def augment_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding plus random horizontal flip, per sample, on a uint8 batch.

    Args:
        images: Tensor[B, C, H, W].
        padding: pixels of zero padding on each side (crop offsets are drawn in [0, 2 * padding]).
        generator: the random source.

    Returns:
        Tensor[B, C, H, W], same dtype.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)[None, :]  # [B, H]
    base = torch.arange(w)[None, :].expand(b, w)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - base, base)  # [B, W]
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class _EpochBatches:
    """What both batch iterators share: a (distributed) sampler, the epoch, its order, its length."""

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, world_size: int, rank: int):
        self.batch_size, self.train, self.seed, self.rank = batch_size, train, seed, rank
        self.sampler = _sampler(n, train, seed, world_size, rank, drop_last=train)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def order(self) -> torch.Tensor:
        """The sample indices of this epoch on this process (LongTensor[n])."""
        return torch.tensor(list(iter(self.sampler)), dtype=torch.long)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def generator(self) -> torch.Generator:
        """The epoch's random generator (order-independent of other processes and epochs)."""
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) % (2**62))


class TensorBatches(_EpochBatches):
    """Mini-batches of an :class:`InMemoryDataset`, normalised ``float32``, optionally augmented.

    Args:
        dataset: the data.
        batch_size: samples per batch on this process.
        train: shuffle, augment and drop the last incomplete batch.
        seed: base seed of the order and of the augmentation.
        world_size, rank: the process group (1, 0 when not distributed).
        padding: crop padding of the augmentation.
    """

    def __init__(
        self,
        dataset: InMemoryDataset,
        batch_size: int,
        train: bool,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        padding: int = 2,
    ):
        super().__init__(len(dataset), batch_size, train, seed, world_size, rank)
        self.dataset, self.padding = dataset, padding
        self.mean = torch.tensor(dataset.mean).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(dataset.std).view(1, -1, 1, 1) * 255.0

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        g = self.generator()
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.dataset.images[idx]
            if self.train and self.padding > 0:
                x = augment_crop_flip(x, self.padding, g)
            yield self.normalize(x), self.dataset.labels[idx]


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout: DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG)
# ---------------------------------------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_imagefolder(data_dir: str | os.PathLike, image_size: int = 224):
    """``(train, train_eval, val)`` ``ImageFolder`` datasets with the usual ImageNet transforms.

    Train: RandomResizedCrop(image_size) + horizontal flip + normalise. Eval: Resize(image_size * 256 / 224)
    + CenterCrop(image_size) + normalise. ``train_eval`` holds the images of ``DIR/train`` with the eval
    transforms (the example's validation split is carved out of it); ``val`` is ``DIR/val`` (the test set).
    """
    from torchvision import datasets, transforms

    root = Path(data_dir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataUnavailableError(
                f"--data-dir {root} must contain train/ and val/ class folders "
                f"(ImageNet layout); {root / split} is missing"
            )
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            norm,
        ]
    )
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    train_eval = datasets.ImageFolder(str(root / "train"), transform=eval_tf)
    val = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    if train.classes != val.classes:
        raise ValueError(f"train/ and val/ under {root} have different class folders")
    return train, train_eval, val


class ImageFolderBatches(_EpochBatches):
    """DataLoader over an ImageFolder with the same ``set_epoch``/``len``/iteration interface as TensorBatches.

    The transforms' random draws come from the workers' torch RNG, seeded per epoch through the loader's
    generator, so an epoch is reproducible given ``(seed, epoch)`` for a fixed number of workers.
    """

    def __init__(
        self, dataset, batch_size: int, train: bool, seed: int = 0, world_size: int = 1, rank: int = 0, workers: int = 0
    ):
        super().__init__(len(dataset), batch_size, train, seed, world_size, rank)
        self.dataset, self.workers = dataset, workers

    def __iter__(self):
        from torch.utils.data import DataLoader

        g = self.generator()
        if self.workers == 0:
            # transforms draw from the global torch RNG in the main process: fork it so the epoch is
            # reproducible and the caller's RNG stream is untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
                yield from DataLoader(
                    self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=self.train, num_workers=0
                )
        else:
            yield from DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self.sampler,
                drop_last=self.train,
                num_workers=self.workers,
                generator=g,
                persistent_workers=False,
            )


# ---------------------------------------------------------------------------------------------------------------
# The run's data: splits and batches for the options of train_coe.py
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Splits:
    """The data of one run: ``train`` (trained on), ``val`` (held out of the training data: the exit thresholds
    are chosen on it), ``test`` (reported once); in-memory sets, or ``Subset``\\ s of ImageFolders."""

    train: InMemoryDataset | torch.utils.data.Dataset
    val: InMemoryDataset | torch.utils.data.Dataset
    test: InMemoryDataset | torch.utils.data.Dataset
    classes: tuple[str, ...]
    in_channels: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_data(args) -> Splits:
    """The splits for ``--dataset``; the validation split is a random ``--val-size`` of the training data (drawn
    with ``--seed``), the training set ``--train-subset`` of the rest."""
    if args.dataset == "imagefolder":
        return _imagefolder_splits(args)
    if args.dataset == "synthetic":
        full, test = make_synthetic(
            num_train=(args.train_subset or 512) + args.val_size,
            num_test=args.test_subset or 256,
            image_size=args.image_size,
            seed=args.seed,
        )
    else:
        full, test = fashion_mnist(args.data_dir)
        test = test.subset(args.test_subset, seed=args.seed + 1)
    if not 1 <= args.val_size < len(full):
        raise ValueError(
            f"--val-size must be in [1, {len(full) - 1}] for {len(full)} training images, got {args.val_size}"
        )
    train, val = full.split(args.val_size, None if args.dataset == "synthetic" else args.train_subset, seed=args.seed)
    return Splits(train, val, test, train.classes, train.images.shape[1])


def _imagefolder_splits(args) -> Splits:
    """``DIR/train`` split into training and validation images (the latter read with the evaluation transforms),
    ``DIR/val`` as the test set. Sets ``args.val_size`` when it was left to its default (10%, at most 10,000)."""
    if args.data_dir is None:
        raise ValueError("--dataset imagefolder needs --data-dir DIR (with DIR/train and DIR/val)")
    train, train_eval, test = build_imagefolder(args.data_dir, args.image_size)
    n = len(train)
    if args.val_size is None:
        args.val_size = max(1, min(10000, n // 10))
    if not 1 <= args.val_size < n:
        raise ValueError(f"--val-size must be in [1, {n - 1}] for {n} training images, got {args.val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    rest = order[args.val_size :]
    if args.train_subset:
        rest = rest[: args.train_subset]
    classes = tuple(test.classes)
    train = torch.utils.data.Subset(train, sorted(rest))
    val = torch.utils.data.Subset(train_eval, sorted(order[: args.val_size]))
    if args.test_subset:
        test = torch.utils.data.Subset(test, range(min(args.test_subset, len(test))))
    return Splits(train, val, test, classes, 3)


def make_batches(args, dataset, train: bool, d: Dist, seed: int) -> TensorBatches | ImageFolderBatches:
    """This process's batches of ``dataset`` (the global ``--batch-size`` split over the DDP ranks)."""
    per_rank = max(1, args.batch_size // d.world_size)
    if args.dataset == "imagefolder":
        return ImageFolderBatches(dataset, per_rank, train, seed, d.world_size, d.rank, args.workers)
    return TensorBatches(dataset, per_rank, train, seed, d.world_size, d.rank)


def eval_batches(args, dataset) -> TensorBatches | ImageFolderBatches:
    """A whole evaluation set, in order, on one process (the final evaluation runs on rank 0)."""
    if args.dataset == "imagefolder":
        return ImageFolderBatches(dataset, args.batch_size, False, 0, 1, 0, args.workers)
    return TensorBatches(dataset, args.batch_size, False, 0, 1, 0)
