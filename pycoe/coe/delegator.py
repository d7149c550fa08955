"""The CoE delegator: a backbone with an expert-selection head and a rough-prediction head.

Collaboration of Experts (Zhang, Chen and Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on
ImageNet with 100M FLOPs", ICML 2022, arXiv:2107.03815) routes each sample to one of K expert networks. A small
*delegator* chooses the expert and, at the same time, outputs a rough class prediction that can end inference
early (both outputs are stated in the paper's abstract). How the two outputs are produced is not public:
:class:`Delegator` implements pycoe's formulation, a shared backbone followed by two linear heads.

Shapes (Einstein legend): ``b`` batch, ``d`` feature dimension of the backbone, ``k`` experts, ``c`` classes.

* ``features``: ``Tensor[b, d]``
* ``selection_logits``: ``Tensor[b, k]``
* ``rough_logits``: ``Tensor[b, c]``
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pycoe._modules import explain_input_mismatch, floating_reference
from pycoe._validation import check_bool, check_device, check_dtype, check_positive_int, check_probability
from pycoe.utils import eval_mode

__all__ = ["Delegator", "DelegatorOutput"]

# Attribute names under which torchvision (and many user models) keep their final classifier.
_CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")


@dataclass
class DelegatorOutput:
    """What :class:`Delegator` returns.

    Attributes:
        selection_logits: ``Tensor[B, K]``, unnormalised scores of the K experts for each sample.
        rough_logits: ``Tensor[B, C]``, the rough class logits used for early termination, or ``None``
            when the delegator was built without ``num_classes``.
    """

    selection_logits: torch.Tensor
    rough_logits: torch.Tensor | None = None


@dataclass
class _Surgery:
    """A classifier found in a backbone, and how to remove it (nothing is modified until ``apply``)."""

    path: str  # qualified name of the final nn.Linear (or of the timm classifier)
    linear: nn.Module | None  # the final nn.Linear, when there is one
    feature_dim: int | None
    parent: nn.Module | None = None  # the module that holds the final Linear (generic path)
    child_name: str | None = None
    timm: bool = False

    def apply(self, backbone: nn.Module) -> None:
        """Strip the classifier in place, remembering how to undo it."""
        self._undo: tuple[nn.Module, str, nn.Module, Any] | None = None
        timm_model: Any = backbone  # timm's classifier API, duck-typed
        if self.timm:
            head = timm_model.get_classifier()
            for _name, mod in backbone.named_modules():
                for child_name, child in mod.named_children():
                    if child is head:
                        self._undo = (mod, child_name, head, getattr(backbone, "num_classes", None))
                        break
                if self._undo is not None:
                    break
            timm_model.reset_classifier(0)
        else:
            assert self.parent is not None and self.child_name is not None
            self._undo = (self.parent, self.child_name, getattr(self.parent, self.child_name), None)
            setattr(self.parent, self.child_name, nn.Identity())

    def undo(self, backbone: nn.Module) -> None:
        """Best-effort restoration of the classifier (used when construction fails after ``apply``)."""
        undo = getattr(self, "_undo", None)
        if undo is None:
            return
        parent, child_name, module, num_classes = undo
        setattr(parent, child_name, module)
        if self.timm and num_classes is not None:
            backbone.num_classes = num_classes


def _last_linear(module: nn.Module, path: str) -> tuple[nn.Module | None, str, nn.Linear] | str:
    """Find the final ``nn.Linear`` of a classifier module.

    Returns ``(parent, child_name, linear)``, or a string explaining why the classifier is not supported.
    """
    if isinstance(module, nn.Linear):
        return None, path, module  # parent filled in by the caller
    if isinstance(module, nn.Sequential):
        if len(module) == 0:
            return f"'{path}' is an empty nn.Sequential"
        parent: nn.Module = module
        last: nn.Module = module[-1]
        while isinstance(last, nn.Sequential) and len(last) > 0:
            parent, last = last, last[-1]
        child_name = list(parent._modules.keys())[-1]
        if isinstance(last, nn.Linear):
            return parent, child_name, last
        reason = f"the classifier '{path}' ends with {type(last).__name__}, not nn.Linear"
        if any(isinstance(m, nn.Conv2d) for m in module.modules()):
            reason += (
                " (a convolutional classifier, as in torchvision's SqueezeNet, is not supported automatically: "
                "pass a feature extractor such as nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), "
                "nn.Flatten()) with classifier=None)"
            )
        return reason
    return f"'{path}' is a {type(module).__name__}, neither nn.Linear nor an nn.Sequential ending with one"


def _resolve(backbone: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """Return ``(parent, child_name, module)`` for a dotted submodule path."""
    parts = path.split(".")
    parent = backbone
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            raise ValueError(f"classifier={path!r}: {type(backbone).__name__} has no submodule {path!r}")
        parent = child
    module = parent._modules.get(parts[-1])
    if module is None:
        raise ValueError(f"classifier={path!r}: {type(backbone).__name__} has no submodule {path!r}")
    return parent, parts[-1], module


def _is_timm_model(backbone: nn.Module) -> bool:
    """Duck-typed test for timm's classifier API (timm is never imported)."""
    return (
        callable(getattr(backbone, "reset_classifier", None))
        and callable(getattr(backbone, "get_classifier", None))
        and isinstance(getattr(backbone, "num_features", None), int)
    )


def _find_classifier(backbone: nn.Module, classifier: str) -> _Surgery | str:
    """Locate the classifier to strip. Returns a :class:`_Surgery` or the reason nothing was found."""
    if classifier != "auto":
        parent, name, module = _resolve(backbone, classifier)
        found = _last_linear(module, classifier)
        if isinstance(found, str):
            raise ValueError(f"classifier={classifier!r} cannot be stripped: {found}")
        sub_parent, sub_name, linear = found
        if sub_parent is None:
            sub_parent, sub_name = parent, name
        return _Surgery(_name_of(backbone, linear), linear, linear.in_features, sub_parent, sub_name)

    if _is_timm_model(backbone):
        timm_model: Any = backbone  # timm's classifier API, duck-typed
        head = timm_model.get_classifier()
        path = next((n for n, m in backbone.named_modules() if m is head and n), "<timm classifier>")  # for messages
        dim = getattr(backbone, "head_hidden_size", None) or timm_model.num_features
        return _Surgery(path, head if isinstance(head, nn.Linear) else None, int(dim), timm=True)

    # Generic search: among the known attribute names, prefer the one registered last (the classifier is
    # normally the last child of a torchvision model).
    children = list(backbone._modules.keys())
    candidates = [a for a in _CLASSIFIER_ATTRS if isinstance(backbone._modules.get(a), nn.Module)]
    candidates = [a for a in candidates if not isinstance(backbone._modules[a], nn.Identity)]
    if not candidates:
        return (
            f"{type(backbone).__name__} has no classifier under any of the attributes "
            f"{', '.join(_CLASSIFIER_ATTRS)} and does not offer timm's reset_classifier()/num_features API"
        )
    candidates.sort(key=children.index, reverse=True)
    reasons = []
    for attr in candidates:
        candidate = backbone._modules[attr]
        assert candidate is not None
        found = _last_linear(candidate, attr)
        if isinstance(found, str):
            reasons.append(found)
            continue
        holder, holder_name, linear = found
        if holder is None:
            holder, holder_name = backbone, attr
        return _Surgery(_name_of(backbone, linear), linear, linear.in_features, holder, holder_name)
    return "; ".join(reasons)


def _name_of(root: nn.Module, module: nn.Module) -> str:
    """Qualified name of ``module`` inside ``root``."""
    return next(name for name, mod in root.named_modules() if mod is module)


def _as_input_tuple(example_input: Any) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input:
        return tuple(example_input)
    raise TypeError(
        "example_input must be a torch.Tensor (one batch) or a non-empty tuple of the backbone's inputs, "
        f"got {type(example_input).__name__}"
    )


def _dry_run(backbone: nn.Module, example_input: Any) -> Any:
    """One forward pass in eval mode under ``no_grad``; every submodule's mode is restored afterwards."""
    inputs = _as_input_tuple(example_input)
    with eval_mode(backbone):
        try:
            return backbone(*inputs)
        except Exception as err:
            shapes = ", ".join(
                f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__ for v in inputs
            )
            raise ValueError(
                f"example_input: the backbone failed on it ({type(err).__name__}: {err}); example_input must be a "
                f"batch the backbone accepts (got {shapes})"
            ) from err


def _check_factory_kwargs(backbone: nn.Module, device: Any, dtype: Any) -> None:
    """``device`` and ``dtype`` of the new heads must be those of the backbone's features, when the backbone has
    floating-point parameters (its output then has their dtype and device)."""
    ref = floating_reference(backbone)
    if ref is None:
        return
    if dtype is not None and dtype != ref.dtype:
        raise ValueError(
            f"dtype={dtype} disagrees with the backbone's parameters ({ref.dtype}): the heads would receive "
            f"{ref.dtype} features; convert the backbone first (backbone.to({dtype})) or leave dtype=None"
        )
    if device is not None and (
        device.type != ref.device.type or (device.index is not None and device.index != ref.device.index)
    ):
        raise ValueError(
            f"device={device} disagrees with the backbone's parameters (on {ref.device}): the heads would receive "
            f"features on {ref.device}; move the backbone first (backbone.to({str(device)!r})) or leave device=None"
        )


def _factory_kwargs(backbone: nn.Module, device, dtype) -> dict:
    ref = floating_reference(backbone)
    if device is None and ref is not None:
        device = ref.device
    if dtype is None and ref is not None:
        dtype = ref.dtype
    return {"device": device, "dtype": dtype}


class Delegator(nn.Module):
    """A backbone with two heads: expert selection (``Tensor[B, K]``) and rough class prediction (``Tensor[B, C]``).

    The delegator of Collaboration of Experts (Zhang et al., ICML 2022) selects one expert per sample and
    outputs a rough prediction that supports early termination. The paper does not publish how; this class
    is pycoe's formulation: ``features = backbone(x)`` (``Tensor[B, D]``), optional dropout, then
    ``selection_logits = selection_head(features)`` and ``rough_logits = rough_head(features)``, both linear.

    **Finding the features.** With ``classifier="auto"`` (default) the backbone's classifier is located and
    replaced by ``nn.Identity`` *in place*, so the backbone outputs the features that fed it:

    * timm models (detected by duck typing: ``reset_classifier``, ``get_classifier``, ``num_features``;
      timm is never imported) use timm's own API, ``reset_classifier(0)``; ``D`` is ``head_hidden_size``
      when the model has one, else ``num_features``.
    * Other models: the first of the attributes ``fc``, ``classifier``, ``heads``, ``head`` (the one
      registered last if several exist) that is an ``nn.Linear`` or an ``nn.Sequential`` ending with one.
      Only that final ``nn.Linear`` is replaced, so dropout, pooling, normalisation and hidden layers before
      it are kept (e.g. ConvNeXt's ``LayerNorm2d``/``Flatten``, MobileNetV3's hidden ``Linear``); ``D`` is
      its ``in_features``. This covers torchvision's ResNet/ResNeXt/Wide-ResNet, RegNet, ShuffleNetV2,
      GoogLeNet, Inception-v3 (build it with ``aux_logits=False``), MobileNetV2/V3, EfficientNet(V2),
      MNASNet, ConvNeXt, DenseNet, VGG, AlexNet, MaxViT, VisionTransformer and Swin. SqueezeNet (a
      convolutional classifier) is not supported automatically: pass a feature extractor instead.

    ``classifier="<qualified name>"`` names the classifier to strip explicitly (an ``nn.Linear`` or an
    ``nn.Sequential`` ending with one). ``classifier=None`` means the backbone already returns features
    ``Tensor[B, D]``: give ``feature_dim``, or ``example_input`` to infer ``D`` with one dry run (eval mode,
    no gradient; every submodule's train/eval mode is restored). When ``classifier="auto"`` finds nothing,
    the backbone is treated the same way, and without ``feature_dim`` or ``example_input`` a ``ValueError``
    says what to pass. When ``example_input`` is given it is always used to check the feature shape.

    **Initialisation.** By default (``zero_init_selection=True``, pycoe's choice) the selection head's weight
    and bias start at zero, so the first selection is uniform over the experts and no expert is favoured by
    random initialisation; its gradient is not zero, so it leaves the uniform point at the first step. With
    ``reuse_classifier=True`` the backbone's original final ``nn.Linear`` becomes the rough head (it must
    have ``out_features == num_classes``; ``num_classes`` defaults to it), so a pretrained classifier gives
    pretrained rough predictions from the start; otherwise the rough head is a fresh ``nn.Linear(D, C)``.

    Args:
        backbone: any ``nn.Module``; modified in place when its classifier is stripped.
        num_experts: K, the number of experts to choose from.
        num_classes: C, the number of classes of the rough prediction; ``None`` for no rough head.
        feature_dim: D, the size of the backbone's features; inferred when possible.
        example_input: a batch for the backbone (a tensor, or a tuple of its inputs), used to infer or check
            ``feature_dim`` with one dry run.
        dropout: dropout probability on the features before both heads.
        classifier: ``"auto"``, the qualified name of the classifier to strip, or ``None`` (no stripping).
        reuse_classifier: use the stripped final ``nn.Linear`` as the rough head.
        zero_init_selection: start the selection head at zero (uniform selection).
        device: device of the new heads (default: that of the backbone's parameters).
        dtype: dtype of the new heads (default: that of the backbone's parameters).

    Attributes:
        backbone (nn.Module): the (stripped) backbone, returning ``Tensor[B, D]``.
        selection_head (nn.Linear): ``D -> K``.
        rough_head (nn.Linear | None): ``D -> C``.
        feature_dim (int): D.
        classifier_path (str | None): qualified name of the module that was replaced, or ``None``.

    Example:
        >>> import torchvision
        >>> d = Delegator(torchvision.models.resnet18(), num_experts=4, num_classes=10)
        >>> out = d(torch.randn(2, 3, 64, 64))
        >>> out.selection_logits.shape, out.rough_logits.shape
        (torch.Size([2, 4]), torch.Size([2, 10]))
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_experts: int,
        num_classes: int | None = None,
        feature_dim: int | None = None,
        example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
        dropout: float = 0.0,
        classifier: str | None = "auto",
        reuse_classifier: bool = False,
        zero_init_selection: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        num_experts = check_positive_int("num_experts", num_experts)
        if num_classes is not None:
            num_classes = check_positive_int("num_classes", num_classes)
        if feature_dim is not None:
            feature_dim = check_positive_int("feature_dim", feature_dim)
        dropout = check_probability("dropout", dropout)
        if dropout == 1.0:
            raise ValueError("dropout must be in [0, 1), got 1.0 (it would zero every feature)")
        if classifier is not None and not isinstance(classifier, str):
            raise TypeError(f"classifier must be 'auto', a submodule name or None, got {type(classifier).__name__}")
        check_bool("reuse_classifier", reuse_classifier)
        check_bool("zero_init_selection", zero_init_selection)
        device = check_device("device", device)
        dtype = check_dtype("dtype", dtype)
        _check_factory_kwargs(backbone, device, dtype)
        if example_input is not None:
            _as_input_tuple(example_input)  # type check before anything else

        # 1. Find the classifier (nothing is modified yet).
        surgery: _Surgery | None = None
        not_found = "classifier=None was given"
        if classifier is not None:
            found = _find_classifier(backbone, classifier)
            if isinstance(found, str):
                not_found = found
            else:
                surgery = found

        if surgery is not None and feature_dim is not None and surgery.feature_dim != feature_dim:
            raise ValueError(
                f"feature_dim={feature_dim} disagrees with the classifier found at '{surgery.path}', whose input "
                f"has {surgery.feature_dim} features; pass classifier=None if the backbone already returns "
                "features, or drop feature_dim"
            )

        # 2. The rough head, possibly reusing the original classifier.
        rough_head: nn.Module | None = None
        if reuse_classifier:
            linear = surgery.linear if surgery is not None else None
            if not isinstance(linear, nn.Linear):
                raise ValueError(
                    "reuse_classifier=True needs a backbone whose classifier ends with an nn.Linear that pycoe can "
                    f"find ({not_found if surgery is None else f'the classifier at {surgery.path!r} is not one'})"
                )
            assert surgery is not None
            if num_classes is None:
                num_classes = linear.out_features
            elif linear.out_features != num_classes:
                raise ValueError(
                    f"reuse_classifier=True needs the classifier's out_features ({linear.out_features}, at "
                    f"'{surgery.path}') to equal num_classes ({num_classes})"
                )
            rough_head = linear

        # 3. Strip, then infer or check the feature dimension.
        if surgery is not None:
            surgery.apply(backbone)
            feature_dim = surgery.feature_dim
        if example_input is not None:
            try:
                features = _dry_run(backbone, example_input)
                inputs = _as_input_tuple(example_input)
                feature_dim = self._check_features(features, inputs[0], feature_dim, context="example_input")
            except Exception:
                if surgery is not None:
                    surgery.undo(backbone)
                raise
        if feature_dim is None:
            raise ValueError(
                f"cannot find the features of {type(backbone).__name__}: {not_found}. Pass feature_dim=<D> if the "
                "backbone already returns features Tensor[B, D] (or example_input=<a batch> to infer D with one "
                "dry run), or classifier='<qualified name of its final nn.Linear>' to strip it"
            )

        self.backbone = backbone
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.feature_dim = int(feature_dim)
        self.classifier_path = surgery.path if surgery is not None else None
        self.zero_init_selection = bool(zero_init_selection)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        fk = _factory_kwargs(backbone, device, dtype)
        self.selection_head = nn.Linear(self.feature_dim, num_experts, **fk)
        if rough_head is None and num_classes is not None:
            rough_head = nn.Linear(self.feature_dim, num_classes, **fk)
        self.rough_head = rough_head
        self.reset_selection_head()

    def reset_selection_head(self) -> None:
        """Re-initialise the selection head: zeros when ``zero_init_selection``, else ``nn.Linear``'s default."""
        if self.zero_init_selection:
            nn.init.zeros_(self.selection_head.weight)
            nn.init.zeros_(self.selection_head.bias)
        else:
            self.selection_head.reset_parameters()

    def _check_features(self, features: Any, x: torch.Tensor, feature_dim: int | None, context: str) -> int:
        if not isinstance(features, torch.Tensor):
            hint = ""
            if hasattr(features, "logits"):
                hint = (
                    " (torchvision's GoogLeNet/Inception-v3 return a tuple in training mode: "
                    "build them with aux_logits=False)"
                )
            raise TypeError(
                f"the backbone must return a Tensor[B, D] of features, but on {context} it returned "
                f"{type(features).__name__}{hint}"
            )
        if features.dim() != 2:
            raise ValueError(
                f"the backbone must return features of shape [B, D], but on {context} it returned shape "
                f"{tuple(features.shape)}; pool and flatten them first, e.g. nn.Sequential(backbone, "
                "nn.AdaptiveAvgPool2d(1), nn.Flatten()) for a convolutional feature map"
            )
        if isinstance(x, torch.Tensor) and x.dim() > 0 and features.shape[0] != x.shape[0]:
            raise ValueError(
                f"the backbone returned {features.shape[0]} feature rows for a batch of {x.shape[0]} on {context}; "
                "the delegator expects batch-first inputs and features Tensor[B, D]"
            )
        if feature_dim is not None and features.shape[1] != feature_dim:
            raise ValueError(
                f"the backbone returned features of size {features.shape[1]} on {context}, but feature_dim is "
                f"{feature_dim}; "
                + (
                    "leave feature_dim=None to infer it from example_input"
                    if context == "example_input"
                    else "pass the right feature_dim (or example_input to infer it)"
                )
            )
        return int(features.shape[1])

    def features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The backbone's features, ``Tensor[B, D]`` (before dropout). Extra arguments go to the backbone."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        try:
            features = self.backbone(x, *args, **kwargs)
        except (RuntimeError, TypeError) as err:
            mismatch = explain_input_mismatch(err, "the delegator's backbone", self.backbone, x)
            if mismatch is None:
                raise
            raise mismatch from err
        self._check_features(features, x, self.feature_dim, context="this input")
        return features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> DelegatorOutput:
        """Run the backbone once and both heads.

        Args:
            x: the batch, batch-first (e.g. ``Tensor[B, 3, H, W]`` for images). Extra positional and keyword
                arguments are passed to the backbone.

        Returns:
            :class:`DelegatorOutput` with ``selection_logits`` ``Tensor[B, K]`` and ``rough_logits``
            ``Tensor[B, C]`` (``None`` without ``num_classes``).
        """
        features = self.dropout(self.features(x, *args, **kwargs))
        selection = self.selection_head(features)
        rough = self.rough_head(features) if self.rough_head is not None else None
        return DelegatorOutput(selection_logits=selection, rough_logits=rough)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
            f"classifier_path={self.classifier_path!r}"
        )
