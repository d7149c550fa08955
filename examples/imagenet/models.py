"""Networks of the CoE recipe: experts, delegator backbones and baselines, the cascade, the rough head's temperature.

A network is ``"cnn"``, the example's small CNN with a width multiplier
(:class:`examples.common.cnn.SmallCNN`, about 11 MFLOPs per 28x28 grey image at width 1), or a torchvision
classification model by name (``resnet18``, ``mobilenet_v3_small``, ...), optionally turned into its PWLU
and/or CondConv variant.

Shapes: B batch, C channels, H/W height/width, D feature size, N classes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from examples.common.cnn import SmallCNN
from pycoe.coe.experts import ExpertPool
from pycoe.coe.model import CoE
from pycoe.flops import count_flops
from pycoe.twostage.delegator import Delegator, DelegatorOutput

__all__ = [
    "build_network",
    "apply_variants",
    "TORCHVISION_HINT",
    "parse_baselines",
    "baseline_key",
    "new_network",
    "matched_width",
    "Networks",
    "RoughStage",
    "make_cascade",
    "fit_rough_temperature",
    "scaled_rough_head",
]

TORCHVISION_HINT = "e.g. mobilenet_v3_small, resnet18, resnet50, efficientnet_b0, regnet_y_400mf"


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
    """A network of the run: ``arch`` at ``width`` with ``--dropout``, its ``--pwlu`` / ``--condconv`` variant
    (no CondConv in the delegator) and channels-last convolution weights unless ``--no-channels-last``."""
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


class Networks:
    """The networks of one run, by name, in ``models``: ``universal`` (stage 1; its weights start the K experts),
    ``delegator``, ``coe`` (from the end of stage 1 on; it holds the delegator), ``baseline:expert`` (the expert's
    architecture, which continues the universal expert) and ``baseline:<key>`` (the other single networks of
    ``--baselines`` and ``--match-flops``).

    They are made in a fixed order, so that after seeding the seed alone decides their initial weights.

    Attributes:
        models: the networks by name.
        baselines: ``{key: (arch, width)}`` of the single networks besides the expert's architecture.
        matched_key: the key of the FLOPs-matched single network (``--match-flops``), or None.
    """

    def __init__(self, args, num_classes: int, in_channels: int, device: torch.device) -> None:
        self.args, self.num_classes, self.in_channels, self.device = args, num_classes, in_channels, device
        a = args
        self.models: dict[str, nn.Module] = {}
        self.models["universal"] = self._new(a.expert, a.expert_width, "expert").to(device)
        backbone = self._new(a.delegator, a.delegator_width, "delegator")
        self.models["delegator"] = Delegator(backbone, a.num_experts, num_classes).to(device)
        self.models["baseline:expert"] = self._new(a.expert, a.expert_width, "expert").to(device)
        self.baselines, self.matched_key = self._baseline_widths()
        for key, (arch, w) in self.baselines.items():
            self.models[f"baseline:{key}"] = self._new(arch, w, "expert").to(device)

    def _new(self, arch: str, width: float, role: str) -> nn.Module:
        return new_network(self.args, arch, width, self.num_classes, self.in_channels, role)

    def _baseline_widths(self) -> tuple[dict[str, tuple[str, float]], str | None]:
        """``--baselines`` as ``{key: (arch, width)}``; with ``--match-flops`` also the CNN whose FLOPs match the
        CoE without exit (delegator + one expert), whose key is returned too."""
        a = self.args
        baselines = {baseline_key(arch, w): (arch, w) for arch, w in parse_baselines(a)}
        if not (a.match_flops and a.expert == "cnn"):
            return baselines, None
        x = torch.zeros(2, self.in_channels, a.image_size, a.image_size, device=self.device)
        target = (count_flops(self.models["delegator"], x) + count_flops(self.models["universal"], x)) / 2
        w = matched_width(a, self.num_classes, self.in_channels, target)
        baselines.setdefault(baseline_key("cnn", w), ("cnn", w))
        return baselines, baseline_key("cnn", w)

    def coe(self) -> CoE:
        """The CoE: the delegator and K deep copies of the universal expert (made on the first call)."""
        if "coe" not in self.models:
            pool = ExpertPool.from_template(self.models["universal"], self.args.num_experts)
            self.models["coe"] = CoE(self.models["delegator"], pool).to(self.device)
        return self.models["coe"]

    def baseline_arch(self, name: str) -> tuple[str, float]:
        """``(arch, width)`` of the single network ``baseline:<name>``."""
        return (self.args.expert, self.args.expert_width) if name == "expert" else self.baselines[name]


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
