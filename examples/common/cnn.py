"""The small CNNs the image examples train on a CPU (pycoe's example architectures, not from any paper).

- :class:`SmallCNN` (the CoE recipe, ``examples.imagenet``): five 3x3 conv-BN-ReLU layers with a width
  multiplier, global average pooling and a final ``nn.Linear`` called ``fc``, so that
  :class:`pycoe.twostage.delegator.Delegator` finds and strips it as it does a torchvision ResNet's.
- :class:`ThreeConvCNN` (Divide-and-Co-training, ``examples.divide_and_cotrain``): three conv-BN-ReLU layers
  whose integer ``width`` is the channel count that :func:`pycoe.cotrain.divide_by_factory` divides.

Shapes: B batch, C channels, H/W height/width, N classes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["conv_bn_relu", "SmallCNN", "ThreeConvCNN"]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> list[nn.Module]:
    """A bias-free convolution with "same" padding, batch normalisation and an in-place ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Five conv-BN-ReLU layers, global average pooling, dropout and a linear classifier ``fc``.

    The layers are ``c1 -> c2/2 -> c2 -> c3/2 -> c3`` (``/2``: stride 2), with channels
    ``(c1, c2, c3) = round(width * (16, 32, 64))``, at least 4 each: about 11 MFLOPs per 28x28 grey image at
    width 1.

    Args:
        num_classes: N.
        width: channel multiplier (> 0).
        in_channels: C of the input images (1 for Fashion-MNIST, 3 for RGB).
        dropout: dropout before ``fc``.

    Shapes:
        input Tensor[B, C, H, W] (any H, W >= 4) -> logits Tensor[B, N].
    """

    BASE_CHANNELS = (16, 32, 64)

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be positive, got {width!r}")
        c1, c2, c3 = (max(4, round(width * c)) for c in self.BASE_CHANNELS)
        self.width = width
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, c1),
            *conv_bn_relu(c1, c2, stride=2),
            *conv_bn_relu(c2, c2),
            *conv_bn_relu(c2, c3, stride=2),
            *conv_bn_relu(c3, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c3, num_classes)
        self.feature_dim = c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


class ThreeConvCNN(nn.Module):
    """Three conv-BN-ReLU layers of ``width``, ``2 width`` and ``4 width`` channels and a linear head.

    The first convolution is 5x5 with stride 2 (28x28 -> 14x14), a 2x2 max-pool comes before the third
    (14x14 -> 7x7), then global average pooling and ``nn.Linear`` in ``head``.

    Args:
        width: the channels of the first layer (an integer, as :func:`pycoe.cotrain.divide_by_factory` with
            ``integer=True`` gives it).
        num_classes: N.

    Shapes:
        input Tensor[B, 1, H, W] -> logits Tensor[B, N].
    """

    def __init__(self, width: int, num_classes: int = 10) -> None:
        super().__init__()
        w = int(width)
        self.features = nn.Sequential(
            *conv_bn_relu(1, w, kernel_size=5, stride=2),
            *conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),
            *conv_bn_relu(2 * w, 4 * w),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
