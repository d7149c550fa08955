"""The delegator: a backbone with an expert-selection head and a rough-prediction head, the first stage that CoE and
BasisNet share.

Collaboration of Experts (Zhang, Chen and Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on
ImageNet with 100M FLOPs", ICML 2022, arXiv:2107.03815) routes each sample to one of K expert networks. A small
*delegator* chooses the expert and, at the same time, outputs a rough class prediction that can end inference
early (both outputs are stated in the paper's abstract). How the two outputs are produced is not public:
:class:`Delegator` implements pycoe's formulation, a shared backbone followed by two linear heads.
BasisNet's lightweight model is the same module: its selection head gives the coefficient logits (K = N bases),
its rough head the early-exit prediction.

The backbone may be a torchvision, timm or Hugging Face model, or any module; its output may be a tensor, a tuple
or a mapping (a Hugging Face ``ModelOutput``), from which the features are taken by the rule of
:class:`Delegator` ("Features from any output").

Shapes (Einstein legend): ``b`` batch, ``t`` token, ``d`` feature dimension of the backbone, ``k`` experts,
``c`` classes.

* ``features``: ``Tensor[b, d]`` (pooled from ``Tensor[b, t, d]`` hidden states for text models)
* ``selection_logits``: ``Tensor[b, k]``
* ``rough_logits``: ``Tensor[b, c]``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pycoe._inputs import as_call, batch_size
from pycoe._modules import explain_call_error, floating_reference
from pycoe._validation import (
    check_bool,
    check_choice,
    check_module,
    check_positive_int,
    check_probability,
    describe,
)
from pycoe.utils import eval_mode

__all__ = ["Delegator", "DelegatorOutput"]

# Attribute names under which torchvision, Hugging Face (and many user models) keep their final classifier.
_CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head", "score", "classification_head")

#: The ways to pool hidden states ``Tensor[B, T, D]`` into features (see :class:`Delegator`).
POOLINGS = ("auto", "pooler", "cls", "mean", "last")

# Attribute set on a backbone whose classifier a Delegator stripped (the qualified name of what was replaced), so
# that an expert pool built from that backbone afterwards is refused: it would return features, not predictions.
STRIPPED_MARK = "_pycoe_stripped_classifier"

# Configuration attributes that hold the hidden size of a Hugging Face model (duck-typed).
_HF_WIDTH_ATTRS = ("hidden_size", "d_model", "n_embd")


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


# Exported models return it too. The serialized name is the one programs were saved with before the class moved
# here from pycoe.coe, so that those still load.
torch.export.register_dataclass(DelegatorOutput, serialized_type_name="pycoe.coe.DelegatorOutput")


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
        setattr(backbone, STRIPPED_MARK, self.path)

    def undo(self, backbone: nn.Module) -> None:
        """Best-effort restoration of the classifier (used when construction fails after ``apply``)."""
        undo = getattr(self, "_undo", None)
        if undo is None:
            return
        parent, child_name, module, num_classes = undo
        setattr(parent, child_name, module)
        if hasattr(backbone, STRIPPED_MARK):
            delattr(backbone, STRIPPED_MARK)
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
    children = list(module._modules.items())
    if children and isinstance(children[-1][1], nn.Linear):  # a head module such as RoBERTa's (dense, out_proj)
        return module, children[-1][0], children[-1][1]
    return (
        f"'{path}' is a {type(module).__name__}, neither nn.Linear, nor an nn.Sequential ending with one, nor a "
        "module whose last registered child is one"
    )


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


def is_timm_model(backbone: nn.Module) -> bool:
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

    if is_timm_model(backbone):
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


def _example_call(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example_input`` as ``(args, kwargs)``: a tensor, a non-empty tuple/list of positional inputs, or a mapping of
    keyword inputs (a dict, a tokenizer's ``BatchEncoding``)."""
    if isinstance(example_input, (tuple, list)) and not example_input:
        raise TypeError("example_input must be a non-empty batch the backbone accepts, got an empty sequence")
    try:
        return as_call(example_input, what="example_input")
    except TypeError:
        raise TypeError(
            "example_input must be a torch.Tensor or a non-empty tuple of the backbone's positional inputs or a "
            f"mapping of its keyword inputs (one batch; e.g. a tokenizer's output), got {describe(example_input)}"
        ) from None


def _dry_run(backbone: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """One forward pass in eval mode under ``no_grad``; every submodule's mode is restored afterwards."""
    with eval_mode(backbone):
        try:
            return backbone(*args, **kwargs)
        except Exception as err:
            shapes = ", ".join(
                (f"{name}=" if isinstance(name, str) else "")
                + (f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__)
                for name, v in (*enumerate(args), *kwargs.items())
            )
            raise ValueError(
                f"example_input: the backbone failed on it ({type(err).__name__}: {err}); example_input must be a "
                f"batch the backbone accepts (got {shapes})"
            ) from err


def _hf_feature_dim(backbone: nn.Module) -> int | None:
    """The hidden size in a Hugging Face model's ``config`` (``hidden_size``, ``d_model`` or ``n_embd``), else None."""
    config = getattr(backbone, "config", None)
    for name in _HF_WIDTH_ATTRS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _pick_features(output: Any, pooling: str, stripped: bool) -> tuple[torch.Tensor, bool]:
    """The tensor in the backbone's ``output`` that holds the features, and whether it may hold hidden states
    ``[B, T, D]`` to pool (a field of a mapping, or element 0 of a tuple; a plain tensor must be ``[B, D]``)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], True
    if isinstance(output, torch.Tensor):
        if pooling == "pooler":
            raise ValueError("pooling='pooler' needs a backbone whose output has pooler_output; it returned a tensor")
        return output, False
    if not isinstance(output, Mapping):
        raise TypeError(
            "the backbone must return its features as a Tensor[B, D], a tuple whose element 0 is features or hidden "
            "states Tensor[B, T, D], or a mapping such as a Hugging Face ModelOutput (with the stripped classifier's "
            f"logits, pooler_output or last_hidden_state); it returned {type(output).__name__}"
        )
    if pooling in ("auto", "pooler"):
        order = ["pooler_output", "last_hidden_state"] if pooling == "auto" else ["pooler_output"]
    else:
        order = ["last_hidden_state"]
    if stripped:
        order.insert(0 if pooling == "auto" else len(order), "logits")  # the classifier's input, now its output
    for name in order:
        value = output.get(name)
        if isinstance(value, torch.Tensor):
            return value, True
    present = ", ".join(repr(k) for k, v in output.items() if v is not None) or "none"
    raise ValueError(
        f"pooling={pooling!r} takes the delegator's features from {' or '.join(order)}, but the backbone returned a "
        f"{type(output).__name__} with the fields {present}; use a backbone whose output has one of them (e.g. the "
        "base model, such as BertModel, or a *ForSequenceClassification model whose classifier pycoe strips), or "
        "choose another pooling"
    )


def pool_features(hidden: torch.Tensor, pooling: str, attention_mask: Any) -> torch.Tensor:
    """``Tensor[B, T, D]`` hidden states to ``Tensor[B, D]`` features; padding (``attention_mask == 0``) is ignored.

    ``"cls"`` takes token 0 (the first token under right padding, as BERT's tokenizers pad); ``"mean"`` (and
    ``"auto"``) the mean over the real tokens; ``"last"`` the last real token (right or left padding). Without an
    attention mask every token is real.
    """
    if attention_mask is None:
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "last":
            return hidden[:, -1]
        return hidden.mean(dim=1)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(
            f"attention_mask must be a Tensor[B, T] matching the backbone's hidden states {tuple(hidden.shape)} to "
            f"pool them, got {shape}"
        )
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    if pooling == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * (attention_mask != 0)).amax(dim=1)  # LongTensor[B], 0 for a row without real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    total = (hidden * mask.unsqueeze(-1)).sum(dim=1)
    return total / mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def backbone_features(output: Any, pooling: str, attention_mask: Any, stripped: bool) -> torch.Tensor:
    """The delegator's features from whatever its backbone returned (see :class:`Delegator`)."""
    features, structured = _pick_features(output, pooling, stripped)
    if structured and features.dim() == 3:
        features = pool_features(features, pooling, attention_mask)
    return features


def _head_factory_kwargs(backbone: nn.Module, device: Any, dtype: Any) -> dict[str, Any]:
    """``device`` and ``dtype`` of the new heads: the given ones, else those of the backbone's floating-point
    parameters (or buffers), which its features have.

    Factory keywords are checked by torch, as for any layer (its ``TypeError`` for a wrong type, ``RuntimeError``
    for an unknown device); given ones must then agree with the backbone's parameters, whose dtype and device the
    heads' inputs have.
    """
    torch.empty(0, device=device, dtype=dtype)  # torch's own check of the factory keywords
    ref = floating_reference(backbone)
    if ref is None:
        return {"device": device, "dtype": dtype}
    if dtype is not None and dtype != ref.dtype:
        raise ValueError(
            f"dtype={dtype} disagrees with the backbone's parameters ({ref.dtype}): the heads would receive "
            f"{ref.dtype} features; convert the backbone first (backbone.to({dtype})) or leave dtype=None"
        )
    want = None if device is None else torch.device(device)
    if want is not None and (
        want.type != ref.device.type or (want.index is not None and want.index != ref.device.index)
    ):
        raise ValueError(
            f"device={want} disagrees with the backbone's parameters (on {ref.device}): the heads would receive "
            f"features on {ref.device}; move the backbone first (backbone.to({str(want)!r})) or leave device=None"
        )
    return {"device": ref.device if device is None else device, "dtype": ref.dtype if dtype is None else dtype}


def _check_features(features: torch.Tensor, batch: int, feature_dim: int | None, context: str) -> int:
    """``features`` must be ``Tensor[B, D]`` (with ``D = feature_dim`` when given); returns D."""
    if features.dim() != 2:
        raise ValueError(
            f"the backbone must give features of shape [B, D] (or hidden states [B, T, D], pooled), but on {context} "
            f"it gave shape {tuple(features.shape)}; pool and flatten them first, e.g. nn.Sequential(backbone, "
            "nn.AdaptiveAvgPool2d(1), nn.Flatten()) for a convolutional feature map"
        )
    if features.shape[0] != batch:
        raise ValueError(
            f"the backbone returned {features.shape[0]} feature rows for a batch of {batch} on {context}; "
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


def _check_arguments(
    backbone: Any,
    num_experts: Any,
    num_classes: Any,
    feature_dim: Any,
    dropout: Any,
    classifier: Any,
    flags: dict[str, Any],
    pooling: Any,
) -> tuple[int, int | None, int | None, float]:
    """Step 0 of :class:`Delegator`: the arguments' types and values; returns them normalised."""
    check_module("backbone", backbone)
    num_experts = check_positive_int("num_experts", num_experts)
    if num_classes is not None:
        num_classes = check_positive_int("num_classes", num_classes)
    if feature_dim is not None:
        feature_dim = check_positive_int("feature_dim", feature_dim)
    dropout = check_probability("dropout", dropout)
    if dropout == 1.0:
        raise ValueError("dropout must be in [0, 1), got 1.0 (it would zero every feature)")
    if classifier is not None and not isinstance(classifier, str):
        raise TypeError(f"classifier must be 'auto', a submodule name or None, got {describe(classifier)}")
    for name, value in flags.items():
        check_bool(name, value)
    check_choice("pooling", pooling, POOLINGS)
    return num_experts, num_classes, feature_dim, dropout


def _locate_classifier(
    backbone: nn.Module, classifier: str | None, feature_dim: int | None
) -> tuple[_Surgery | None, str]:
    """Step 1: the classifier to strip (nothing is modified yet), or the reason none was found."""
    if classifier is None:
        return None, "classifier=None was given"
    found = _find_classifier(backbone, classifier)
    if isinstance(found, str):
        return None, found
    if feature_dim is not None and found.feature_dim != feature_dim:
        raise ValueError(
            f"feature_dim={feature_dim} disagrees with the classifier found at '{found.path}', whose input "
            f"has {found.feature_dim} features; pass classifier=None if the backbone already returns "
            "features, or drop feature_dim"
        )
    return found, ""


def _reused_classifier(
    surgery: _Surgery | None, not_found: str, reuse: bool, num_classes: int | None
) -> tuple[nn.Module | None, int | None]:
    """Step 2: with ``reuse_classifier``, the classifier's final ``nn.Linear`` as the rough head (and C from it)."""
    if not reuse:
        return None, num_classes
    linear = surgery.linear if surgery is not None else None
    if surgery is None or not isinstance(linear, nn.Linear):
        raise ValueError(
            "reuse_classifier=True needs a backbone whose classifier ends with an nn.Linear that pycoe can "
            f"find ({not_found if surgery is None else f'the classifier at {surgery.path!r} is not one'})"
        )
    if num_classes is None:
        num_classes = linear.out_features
    elif linear.out_features != num_classes:
        raise ValueError(
            f"reuse_classifier=True needs the classifier's out_features ({linear.out_features}, at "
            f"'{surgery.path}') to equal num_classes ({num_classes})"
        )
    return linear, num_classes


def _strip_and_measure(
    backbone: nn.Module,
    surgery: _Surgery | None,
    example: tuple[tuple[Any, ...], dict[str, Any]] | None,
    feature_dim: int | None,
    not_found: str,
    pooling: str,
) -> int:
    """Step 3: strip the classifier, then find D: the stripped classifier's input, else one dry run on the example
    input (which also checks D when it is known), else a Hugging Face config's hidden size."""
    if surgery is not None:
        surgery.apply(backbone)
        feature_dim = surgery.feature_dim
    if example is not None:
        args, kwargs = example
        try:
            raw = _dry_run(backbone, args, kwargs)
            features = backbone_features(raw, pooling, kwargs.get("attention_mask"), stripped=surgery is not None)
            batch = batch_size(args, kwargs, what="example_input")
            feature_dim = _check_features(features, batch, feature_dim, context="example_input")
        except Exception:
            if surgery is not None:
                surgery.undo(backbone)
            raise
    if feature_dim is None:
        feature_dim = _hf_feature_dim(backbone)
    if feature_dim is None:
        raise ValueError(
            f"cannot find the features of {type(backbone).__name__}: {not_found}. Pass feature_dim=<D> if the "
            "backbone already returns features Tensor[B, D] (or hidden states Tensor[B, T, D], or a Hugging Face "
            "output), or example_input=<a batch> to infer D with one dry run, or classifier='<qualified name of its "
            "final nn.Linear>' to strip it"
        )
    return int(feature_dim)


class Delegator(nn.Module):
    """A backbone with two heads: expert selection (``Tensor[B, K]``) and rough class prediction (``Tensor[B, C]``).

    The delegator of Collaboration of Experts (Zhang et al., ICML 2022) selects one expert per sample and
    outputs a rough prediction that supports early termination. The paper does not publish how; this class
    is pycoe's formulation: ``features = backbone(*inputs)`` (``Tensor[B, D]``), optional dropout, then
    ``selection_logits = selection_head(features)`` and ``rough_logits = rough_head(features)``, both linear.

    **Finding the features.** With ``classifier="auto"`` (default) the backbone's classifier is located and
    replaced by ``nn.Identity`` *in place*, so the backbone outputs the features that fed it:

    * timm models (detected by duck typing: ``reset_classifier``, ``get_classifier``, ``num_features``;
      timm is never imported) use timm's own API, ``reset_classifier(0)``; ``D`` is ``head_hidden_size``
      when the model has one, else ``num_features``.
    * Other models: the first of the attributes ``fc``, ``classifier``, ``heads``, ``head``, ``score``,
      ``classification_head`` (the one registered last if several exist) that is an ``nn.Linear``, an
      ``nn.Sequential`` ending with one, or a head module whose last registered child is one (the
      ``out_proj`` of RoBERTa's and BART's classification heads). Only that final ``nn.Linear`` is replaced, so
      dropout, pooling, normalisation and hidden layers before it are kept (e.g. ConvNeXt's
      ``LayerNorm2d``/``Flatten``, MobileNetV3's hidden ``Linear``, RoBERTa's ``dense`` + tanh); ``D`` is its
      ``in_features``. This covers torchvision's ResNet/ResNeXt/Wide-ResNet, RegNet, ShuffleNetV2, GoogLeNet,
      Inception-v3, MobileNetV2/V3, EfficientNet(V2), MNASNet, ConvNeXt, DenseNet, VGG, AlexNet, MaxViT,
      VisionTransformer and Swin, and Hugging Face's ``*ForSequenceClassification`` models (BERT, RoBERTa, BART,
      GPT-2, ...). SqueezeNet (a convolutional classifier) is not supported automatically: pass a feature
      extractor instead. The stripped backbone is marked, so that an :class:`~pycoe.coe.experts.ExpertPool` built
      from it afterwards (experts that would return features) is refused.

    ``classifier="<qualified name>"`` names the classifier to strip explicitly. ``classifier=None`` means the
    backbone already returns features. Without a classifier, ``D`` is ``feature_dim``, else inferred with one dry
    run on ``example_input`` (eval mode, no gradient; every submodule's train/eval mode is restored), else read
    from a Hugging Face model's ``config`` (``hidden_size``, ``d_model`` or ``n_embd``); otherwise a
    ``ValueError`` says what to pass. When ``example_input`` is given it is always used to check the features.

    **Features from any output.** The backbone may return a tensor, a tuple or list (element 0 is used: e.g.
    torchvision's GoogLeNet in training mode, or a Hugging Face model called with ``return_dict=False``), or a
    mapping such as a Hugging Face ``ModelOutput``. From a mapping, ``pooling`` picks the field:

    * ``"auto"`` (default): the stripped classifier's output (``logits``, which is now the classifier's input),
      else ``pooler_output``, else ``last_hidden_state``;
    * ``"pooler"``: ``pooler_output`` (BERT's tanh layer on the first token);
    * ``"cls"``, ``"mean"``, ``"last"``: ``last_hidden_state``.

    Hidden states ``Tensor[B, T, D]`` (from that field, or a tensor output) are pooled over the tokens with the
    ``attention_mask`` keyword input the delegator received: ``"mean"`` and ``"auto"`` average the real tokens,
    ``"cls"`` takes token 0, ``"last"`` the last real token (for decoder-only models such as GPT-2). Padding
    therefore never changes the features (a model without a mask, or called without ``attention_mask``, has every
    token real). Features ``Tensor[B, D]`` are used as they are.

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
        example_input: a batch for the backbone (a tensor, a tuple of its positional inputs, or a mapping of its
            keyword inputs such as a tokenizer's output), used to infer or check ``feature_dim`` with one dry run.
        dropout: dropout probability on the features before both heads.
        classifier: ``"auto"``, the qualified name of the classifier to strip, or ``None`` (no stripping).
        reuse_classifier: use the stripped final ``nn.Linear`` as the rough head.
        zero_init_selection: start the selection head at zero (uniform selection).
        pooling: how features are taken from a mapping output and pooled over tokens: ``"auto"``, ``"pooler"``,
            ``"cls"``, ``"mean"`` or ``"last"`` (see above).
        device: device of the new heads (default: that of the backbone's parameters, which it must match when
            given). A factory keyword, checked by torch as for any layer.
        dtype: dtype of the new heads (default: that of the backbone's parameters, which it must match when
            given). A factory keyword, checked by torch as for any layer.

    Attributes:
        backbone (nn.Module): the (stripped) backbone.
        selection_head (nn.Linear): ``D -> K``.
        rough_head (nn.Linear | None): ``D -> C``.
        feature_dim (int): D.
        classifier_path (str | None): qualified name of the module that was replaced, or ``None``.
        pooling (str): the ``pooling`` option.

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
        example_input: Any = None,
        dropout: float = 0.0,
        classifier: str | None = "auto",
        reuse_classifier: bool = False,
        zero_init_selection: bool = True,
        pooling: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        flags = {"reuse_classifier": reuse_classifier, "zero_init_selection": zero_init_selection}
        num_experts, num_classes, feature_dim, dropout = _check_arguments(
            backbone, num_experts, num_classes, feature_dim, dropout, classifier, flags, pooling
        )
        fk = _head_factory_kwargs(backbone, device, dtype)
        example = None if example_input is None else _example_call(example_input)  # type check before anything else

        surgery, not_found = _locate_classifier(backbone, classifier, feature_dim)
        rough_head, num_classes = _reused_classifier(surgery, not_found, reuse_classifier, num_classes)
        feature_dim = _strip_and_measure(backbone, surgery, example, feature_dim, not_found, pooling)

        self.backbone = backbone
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.classifier_path = surgery.path if surgery is not None else None
        self.pooling = pooling
        self.zero_init_selection = bool(zero_init_selection)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
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

    def features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The backbone's features, ``Tensor[B, D]`` (before dropout).

        Args:
            *args: the backbone's positional inputs, batch-first (e.g. ``x``).
            **kwargs: its keyword inputs (e.g. ``input_ids=..., attention_mask=...``).
        """
        batch = batch_size(args, kwargs, what="the delegator")
        try:
            raw = self.backbone(*args, **kwargs)
        except (RuntimeError, TypeError) as err:
            explained = explain_call_error(err, "the delegator's backbone", self.backbone, args, kwargs)
            if explained is None:
                raise
            raise explained from err
        stripped = self.classifier_path is not None
        features = backbone_features(raw, self.pooling, kwargs.get("attention_mask"), stripped)
        _check_features(features, batch, self.feature_dim, context="this input")
        return features

    def forward(self, *args: Any, **kwargs: Any) -> DelegatorOutput:
        """Run the backbone once and both heads.

        Args:
            *args: the backbone's positional inputs, batch-first (e.g. ``x: Tensor[B, 3, H, W]`` for images).
            **kwargs: its keyword inputs (e.g. ``input_ids=..., attention_mask=...`` for text).

        Returns:
            :class:`DelegatorOutput` with ``selection_logits`` ``Tensor[B, K]`` and ``rough_logits``
            ``Tensor[B, C]`` (``None`` without ``num_classes``).
        """
        features = self.dropout(self.features(*args, **kwargs))
        selection = self.selection_head(features)
        rough = self.rough_head(features) if self.rough_head is not None else None
        return DelegatorOutput(selection_logits=selection, rough_logits=rough)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
            f"classifier_path={self.classifier_path!r}, pooling={self.pooling!r}"
        )
