"""Data for the CoE example: Fashion-MNIST (IDX files), a synthetic set, and ImageNet-style image folders.

Fashion-MNIST and the synthetic set are held in memory as ``uint8`` tensors ``[N, C, H, W]`` and are batched,
augmented (random crop with zero padding, horizontal flip) and normalised on tensors, a whole batch at a time,
which is far faster on a CPU than a per-image ``DataLoader``. ImageFolder data goes through a regular
``DataLoader`` with the usual ImageNet transforms.

Every loader takes its sample order from a :class:`torch.utils.data.DistributedSampler` (with one replica when
not distributed), whose order depends only on ``(seed, epoch)``; the augmentation draws come from a generator
seeded by ``(seed, epoch, rank)``. So an epoch is fully determined by the seed and its number, which is what
lets ``--resume`` reproduce an uninterrupted run exactly.

Shapes: B batch, C channels, H/W height/width, N dataset size.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "DataUnavailableError",
    "InMemoryDataset",
    "TensorBatches",
    "read_idx",
    "write_idx",
    "load_fashion_mnist",
    "make_synthetic",
    "build_imagefolder",
    "ImageFolderBatches",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX data-type codes (third byte of the magic number) -> (torch dtype, bytes per item)
_IDX_TYPES = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}


class DataUnavailableError(RuntimeError):
    """Raised when a dataset cannot be found locally nor downloaded."""


# ---------------------------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------------------------
def _open_maybe_gz(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or not) into a tensor.

    The IDX format: a big-endian 4-byte magic ``0x00 0x00 TYPE NDIM``, then one big-endian ``uint32`` per
    dimension, then the data in C order (big-endian for multi-byte types).

    Args:
        path: the file; gzip is detected from its first bytes, not from its name.

    Returns:
        Tensor of the stored dtype and shape (``uint8`` ``[N, 28, 28]`` for Fashion-MNIST images).
    """
    path = Path(path)
    with _open_maybe_gz(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{type_code:02x}")
    dtype, itemsize = _IDX_TYPES[type_code]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for d in dims:
        count *= d
    if len(raw) - header != count * itemsize:
        raise ValueError(f"{path}: header says {count * itemsize} data bytes, file has {len(raw) - header}")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    if itemsize > 1:  # stored big-endian: reverse the bytes of every item, then reinterpret
        data = data.view(-1, itemsize).flip(1).reshape(-1).view(dtype)
    else:
        data = data.view(dtype)
    return data.reshape(dims).clone()


def write_idx(path: str | os.PathLike, tensor: torch.Tensor, compress: bool | None = None) -> None:
    """Write a ``uint8`` tensor as an IDX file (gzip-compressed when the name ends in ``.gz``)."""
    path = Path(path)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"tensor must be uint8, got {tensor.dtype}")
    compress = path.suffix == ".gz" if compress is None else compress
    header = bytes([0, 0, 0x08, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    payload = header + tensor.contiguous().numpy().tobytes()
    with gzip.open(path, "wb") if compress else open(path, "wb") as f:
        f.write(payload)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_split(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    images_stem, labels_stem = _FMNIST_FILES[split]
    ip, lp = _find_idx(directory, images_stem), _find_idx(directory, labels_stem)
    if ip is None or lp is None:
        return None
    images, labels = read_idx(ip), read_idx(lp)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: unexpected IDX shapes {tuple(images.shape)} and {tuple(labels.shape)}")
    return images.unsqueeze(1), labels.long()


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


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = True
) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Load Fashion-MNIST (train, test) as uint8 tensors.

    Looks, in order, at: ``data_dir`` itself (IDX files, gz or not), ``data_dir/FashionMNIST/raw`` (a
    torchvision root), the Debian package's ``/usr/share/datasets/fashion-mnist``; then downloads with
    torchvision into ``data_dir`` (or ``~/.cache/pycoe``) when the network allows it.

    Raises:
        DataUnavailableError: with the command that installs the Debian package.
    """
    candidates: list[Path] = []
    if data_dir is not None:
        d = Path(data_dir)
        candidates += [d, d / "FashionMNIST" / "raw", d / "fashion-mnist"]
    candidates.append(DEBIAN_FASHION_MNIST)
    for d in candidates:
        if d.is_dir():
            train, test = _read_split(d, "train"), _read_split(d, "test")
            if train is not None and test is not None:
                return _fmnist(train, str(d)), _fmnist(test, str(d))
    errors = ""
    if download:
        root = Path(data_dir) if data_dir is not None else Path.home() / ".cache" / "pycoe"
        try:
            from torchvision.datasets import FashionMNIST

            tr = FashionMNIST(str(root), train=True, download=True)
            te = FashionMNIST(str(root), train=False, download=True)
            return (
                _fmnist((tr.data.unsqueeze(1), tr.targets.long()), f"download:{root}"),
                _fmnist((te.data.unsqueeze(1), te.targets.long()), f"download:{root}"),
            )
        except Exception as exc:  # no network, no torchvision, ...
            errors = f" (download failed: {type(exc).__name__}: {exc})"
    raise DataUnavailableError(
        "Fashion-MNIST not found in " + ", ".join(str(c) for c in candidates) + errors + ".\n"
        "Install it offline with:  apt-get install -y --no-install-recommends dataset-fashion-mnist\n"
        "or pass --data-dir pointing at a directory with the four IDX files (or a torchvision root)."
    )


def _fmnist(pair, source: str) -> InMemoryDataset:
    images, labels = pair
    return InMemoryDataset(images.contiguous(), labels, FASHION_MNIST_CLASSES, (0.2860,), (0.3530,), source)


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
