"""Networks for the CoE example: a small CPU-sized CNN with a width multiplier, or torchvision models by name.

The small CNN (pycoe's example architecture, not from the CoE paper) is five 3x3 conv-BN-ReLU layers
(``c1 -> c2/2 -> c2 -> c3/2 -> c3``; ``/2`` = stride 2), global average pooling and a final ``nn.Linear``
called ``fc``, so :class:`pycoe.coe.delegator.Delegator` finds and strips it like a torchvision ResNet's. At
width 1 the channels are (16, 32, 64), about 11 MFLOPs per 28x28 grey image.

Shapes: B batch, C channels, H/W height/width, D feature size, N classes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pycoe.coe.delegator import Delegator, DelegatorOutput
from pycoe.coe.experts import ExpertPool
from pycoe.coe.model import CoE
from pycoe.flops import count_flops

__all__ = [
    "SmallCNN",
    "build_network",
    "apply_variants",
    "TORCHVISION_HINT",
    "parse_baselines",
    "baseline_key",
    "new_network",
    "matched_width",
    "RoughStage",
    "make_cascade",
    "fit_rough_temperature",
    "scaled_rough_head",
]

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


def parse_baselines(args) -> list[tuple[str, float]]:
    """``[(arch, width)]`` of the extra baselines (the expert itself at width 1 is always a baseline)."""
    out = []
    for item in [s.strip() for s in args.baselines.split(",") if s.strip()]:
        if "@" in item:
            arch, w = item.split("@", 1)
            out.append((arch, float(w)))
        else:
            try:
                out.append(("cnn", float(item)))
            except ValueError:
                out.append((item, 1.0))
    for arch, w in out:
        if (arch, w) == (args.expert, args.expert_width if args.expert == "cnn" else 1.0):
            raise ValueError(f"--baselines: {arch}@{w} is the expert itself, which is always a baseline")
    return out


def baseline_key(arch: str, width: float) -> str:
    return f"{arch}@{width:g}" if arch == "cnn" else arch


def new_network(args, arch: str, width: float, num_classes: int, in_channels: int, role: str) -> nn.Module:
    net = build_network(arch, num_classes, width=width, in_channels=in_channels, dropout=args.dropout)
    apply_variants(
        net, pwlu=args.pwlu, condconv=args.condconv and role != "delegator", condconv_experts=args.condconv_experts
    )
    if not args.no_channels_last:  # only the 4-d weights (CondConv's kernel banks are 5-d)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.to(memory_format=torch.channels_last)
    return net


def matched_width(args, num_classes: int, in_channels: int, target_flops: float) -> float:
    """The CNN width (to 1/64, in [1/16, 4]) whose FLOPs per sample are closest to ``target_flops``."""
    x = torch.zeros(1, in_channels, args.image_size, args.image_size)
    best, best_gap = 1.0, float("inf")
    for i in range(4, 4 * 64 + 1):
        w = i / 64
        net = build_network("cnn", num_classes, width=w, in_channels=in_channels).eval()
        gap = abs(count_flops(net, x) - target_flops)
        if gap < best_gap:
            best, best_gap = w, gap
        elif count_flops(net, x) > target_flops:
            break
    return best


class RoughStage(nn.Module):
    """The first stage of a cascade: a delegator's backbone and rough head, and one (constant) selection column.

    ``forward(x) -> DelegatorOutput(selection_logits=zeros[B, 1], rough_logits=Tensor[B, C])``, so that
    ``CoE(RoughStage(delegator), [network])`` is a two-stage cascade with pycoe's exit rule: the same exit
    decisions as the CoE built on ``delegator`` (same rough logits), then one network for every other sample.
    The selection head is not run (a cascade has nothing to choose).
    """

    def __init__(self, delegator: Delegator) -> None:
        super().__init__()
        if delegator.rough_head is None:
            raise ValueError("a cascade needs a delegator with a rough head (num_classes)")
        self.delegator = delegator
        self.num_classes = delegator.num_classes
        self.num_experts = 1

    def forward(self, x: torch.Tensor) -> DelegatorOutput:
        d = self.delegator
        rough = d.rough_head(d.dropout(d.features(x)))
        return DelegatorOutput(rough.new_zeros(rough.shape[0], 1), rough)


def make_cascade(delegator: Delegator, network: nn.Module) -> CoE:
    """A cascade of ``delegator``'s rough head and ``network``, as a one-expert CoE (modules shared, not copied)."""
    return CoE(RoughStage(delegator), ExpertPool([network]))


@torch.no_grad()
def fit_rough_temperature(rough_logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """Temperature scaling of a rough head (Guo et al., ICML 2017): ``T`` minimising ``CE(rough_logits / T, y)``.

    The cross-entropy is convex in ``1 / T``, so a golden-section search on ``1 / T`` in ``[0.05, 20]`` finds it.

    Args:
        rough_logits: Tensor[N, C] on held-out data.
        labels: LongTensor[N].

    Returns:
        ``(T, cross-entropy at T = 1, cross-entropy at T)``.
    """
    z = rough_logits.double()

    def nll(beta: float) -> float:
        return float(torch.nn.functional.cross_entropy(beta * z, labels))

    lo, hi = 0.05, 20.0
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    beta = (lo + hi) / 2
    return 1.0 / beta, nll(1.0), nll(beta)


@contextlib.contextmanager
def scaled_rough_head(delegator: Delegator, temperature: float) -> Iterator[Delegator]:
    """Divide the rough head's weight and bias by ``temperature`` inside the block (restored afterwards).

    The rough logits become ``rough_logits / T`` exactly (the head is linear), so the rough predictions do not
    change, only the confidences that the exit rule thresholds.
    """
    head = delegator.rough_head
    if not isinstance(head, nn.Linear):
        raise TypeError("temperature scaling needs the delegator's rough head to be an nn.Linear")
    saved = [p.detach().clone() for p in head.parameters()]
    try:
        with torch.no_grad():
            for p in head.parameters():
                p.div_(temperature)
        yield delegator
    finally:
        with torch.no_grad():
            for p, old in zip(head.parameters(), saved):
                p.copy_(old)
