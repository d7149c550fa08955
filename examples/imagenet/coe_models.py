"""Networks for the CoE example: a small CPU-sized CNN with a width multiplier, or torchvision models by name.

The small CNN (pycoe's example architecture, not from the CoE paper) is five 3x3 conv-BN-ReLU layers
(``c1 -> c2/2 -> c2 -> c3/2 -> c3``; ``/2`` = stride 2), global average pooling and a final ``nn.Linear``
called ``fc``, so :class:`pycoe.coe.delegator.Delegator` finds and strips it like a torchvision ResNet's. At
width 1 the channels are (16, 32, 64), about 11 MFLOPs per 28x28 grey image.

Shapes: B batch, C channels, H/W height/width, D feature size, N classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["SmallCNN", "build_network", "apply_variants", "TORCHVISION_HINT"]

TORCHVISION_HINT = "e.g. mobilenet_v3_small, resnet18, resnet50, efficientnet_b0, regnet_y_400mf"
BASE_CHANNELS = (16, 32, 64)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Five conv-BN-ReLU layers, global average pooling, dropout and a linear classifier ``fc``.

    Args:
        num_classes: N.
        width: channel multiplier (channels ``round(width * (16, 32, 64))``, at least 4).
        in_channels: C of the input images (1 for Fashion-MNIST, 3 for RGB).
        dropout: dropout before ``fc``.

    Shapes:
        input Tensor[B, C, H, W] (any H, W >= 4) -> logits Tensor[B, N].
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be positive, got {width!r}")
        c1, c2, c3 = (max(4, round(width * c)) for c in BASE_CHANNELS)
        self.width = width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1, 1),
            *_conv_bn_relu(c1, c2, 2),
            *_conv_bn_relu(c2, c2, 1),
            *_conv_bn_relu(c2, c3, 2),
            *_conv_bn_relu(c3, c3, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c3, num_classes)
        self.feature_dim = c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


def build_network(
    name: str, num_classes: int, width: float = 1.0, in_channels: int = 1, dropout: float = 0.0
) -> nn.Module:
    """``"cnn"`` -> :class:`SmallCNN`; any other name -> ``torchvision.models.get_model(name)`` (random init).

    ``width`` only applies to the CNN (torchvision models have fixed widths; pass another name instead).
    """
    if name == "cnn":
        return SmallCNN(num_classes, width=width, in_channels=in_channels, dropout=dropout)
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - torchvision is in the [examples] extra
        raise ImportError("torchvision models need torchvision: pip install 'pycoe[examples]'") from exc
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown model {name!r}: use 'cnn' or a torchvision classification model ({TORCHVISION_HINT})"
        )
    if width != 1.0:
        raise ValueError(f"width={width} only applies to the 'cnn' model, not to torchvision's {name}")
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        raise ValueError(f"torchvision model {name} expects RGB input (3 channels), got {in_channels}")
    return model


def _last_stage_convs(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """Predicate picking the non-grouped 3x3+ convolutions in the last third of the model (by order)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size[0] > 1]
    chosen = set(convs[-max(1, len(convs) // 3) :]) if convs else set()
    return lambda name, module: name in chosen


def apply_variants(model: nn.Module, pwlu: bool, condconv: bool, condconv_experts: int = 4) -> list[str]:
    """Turn a network into its PWLU and/or CondConv variant, in place, with pycoe's conversion helpers.

    * ``pwlu``: every ReLU/SiLU/Hardswish/... becomes a :class:`pycoe.layers.pwlu.PWLU` (which starts in its
      statistics-collecting phase; :func:`pycoe.layers.pwlu.realign_pwlu` is called by the training script
      after the first epoch of the network's first stage).
    * ``condconv``: the non-grouped spatial convolutions of the last third of the network become
      :class:`pycoe.layers.condconv.CondConv2d` with ``condconv_experts`` kernels (placement as in
      CondConv-EfficientNet's last stages; which layers CoE's 100M model converted is not public).

    Returns:
        the descriptions of what was converted (for the log).
    """
    done = []
    if condconv:
        from pycoe.layers.condconv import convert_conv2d_to_condconv

        names = convert_conv2d_to_condconv(model, num_kernels=condconv_experts, predicate=_last_stage_convs(model))
        done.append(f"CondConv({condconv_experts}) x{len(names)}")
    if pwlu:
        from pycoe.layers import convert_activations_to_pwlu

        names = convert_activations_to_pwlu(model)
        done.append(f"PWLU x{len(names)}")
    return done
