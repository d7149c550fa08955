"""Fashion-MNIST offline: the IDX file format and the loader both image examples use.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017; MIT licence) ships with the Debian package
``dataset-fashion-mnist`` as four gzip-compressed IDX files under ``/usr/share/datasets/fashion-mnist/``:
60,000 training and 10,000 test images of 28x28 grey pixels, in 10 classes.

The IDX format: a big-endian 4-byte magic number ``0x00 0x00 TYPE NDIM``, then one big-endian ``uint32`` per
dimension, then the data in C order (big-endian for multi-byte types).

Shapes: N images, H/W height/width.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from examples.common import DataUnavailableError

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "LabelledImages",
    "read_idx",
    "write_idx",
    "load_fashion_mnist",
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
# the mean and standard deviation of the training pixels scaled to [0, 1]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

_FILES = {
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


@dataclass(frozen=True)
class LabelledImages:
    """One split of an image data set.

    Attributes:
        images: uint8 Tensor[N, 1, H, W].
        labels: int64 Tensor[N].
        source: where the data came from (for the logs).
    """

    images: torch.Tensor
    labels: torch.Tensor
    source: str


def _open_maybe_gz(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or not) into a tensor.

    Args:
        path: the file; gzip is detected from its first bytes, not from its name.

    Returns:
        Tensor of the stored dtype and shape (``uint8`` ``[N, 28, 28]`` for Fashion-MNIST images).

    Raises:
        ValueError: not an IDX file, an unknown data type, or a size that disagrees with the header.
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


def _read_split(directory: Path, split: str) -> LabelledImages | None:
    images_stem, labels_stem = _FILES[split]
    ip, lp = _find_idx(directory, images_stem), _find_idx(directory, labels_stem)
    if ip is None or lp is None:
        return None
    images, labels = read_idx(ip), read_idx(lp)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: unexpected IDX shapes {tuple(images.shape)} and {tuple(labels.shape)}")
    return LabelledImages(images.unsqueeze(1).contiguous(), labels.long(), str(directory))


def _download(root: Path) -> tuple[LabelledImages, LabelledImages]:
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(str(root), train=True, download=True)
    test = FashionMNIST(str(root), train=False, download=True)
    source = f"download:{root}"
    return (
        LabelledImages(train.data.unsqueeze(1).contiguous(), train.targets.long(), source),
        LabelledImages(test.data.unsqueeze(1).contiguous(), test.targets.long(), source),
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[LabelledImages, LabelledImages]:
    """Fashion-MNIST's ``(train, test)`` splits as uint8 images ``[N, 1, 28, 28]`` and int64 labels.

    Looks, in order, at: ``data_dir`` itself (the four IDX files, gzip-compressed or not),
    ``data_dir/FashionMNIST/raw`` (a torchvision root), ``data_dir/fashion-mnist``, then the Debian package's
    ``/usr/share/datasets/fashion-mnist``; with ``download=True``, it then downloads with torchvision into
    ``data_dir`` (or ``~/.cache/pycoe``) when the network allows it.

    Raises:
        DataUnavailableError: none of these worked; the message gives the command that installs the Debian
            package.
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
                return train, test
    errors = ""
    if download:
        try:
            return _download(Path(data_dir) if data_dir is not None else Path.home() / ".cache" / "pycoe")
        except Exception as exc:  # no network, no torchvision, ...
            errors = f" (download failed: {type(exc).__name__}: {exc})"
    raise DataUnavailableError(
        "Fashion-MNIST not found in " + ", ".join(str(c) for c in candidates) + errors + ".\n"
        "Install it offline with:  apt-get install -y --no-install-recommends dataset-fashion-mnist\n"
        "or pass --data-dir pointing at a directory with the four IDX files (or a torchvision root)."
    )
