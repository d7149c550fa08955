"""Tests of pycoe.twostage.delegator.Delegator."""

import copy
from collections import namedtuple

import pytest
import timm
import torch
import torchvision
from torch import nn

from pycoe.twostage.delegator import Delegator, DelegatorOutput

X64 = (2, 3, 32, 32)


def _tiny_vit():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def _tiny_densenet():
    # Same class and classifier layout as densenet121, at a fraction of the cost.
    return torchvision.models.DenseNet(growth_rate=8, block_config=(1, 1), num_init_features=8, bn_size=2)


def _tiny_convnext():
    # Same class and classifier (LayerNorm2d, Flatten, Linear) as convnext_tiny.
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt(block_setting=[CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)])


def _tiny_swin():
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4]
    )


# (name, constructor, input shape, expected classifier path, expected feature dim)
TORCHVISION_CASES = [
    ("resnet18", lambda: torchvision.models.resnet18(weights=None), X64, "fc", 512),
    ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(weights=None), X64, "classifier.3", 1024),
    ("efficientnet_b0", lambda: torchvision.models.efficientnet_b0(weights=None), X64, "classifier.1", 1280),
    ("regnet_y_400mf", lambda: torchvision.models.regnet_y_400mf(weights=None), X64, "fc", 440),
    ("convnext_tiny_config", _tiny_convnext, X64, "classifier.2", 16),
    ("vit_tiny", _tiny_vit, (2, 3, 32, 32), "heads.head", 32),
    ("swin_tiny_config", _tiny_swin, (2, 3, 32, 32), "head", 32),
    ("densenet_tiny_config", _tiny_densenet, X64, "classifier", 16),
    ("shufflenet_v2_x0_5", lambda: torchvision.models.shufflenet_v2_x0_5(weights=None), X64, "fc", 1024),
    ("mnasnet0_5", lambda: torchvision.models.mnasnet0_5(weights=None), X64, "classifier.1", 1280),
]


@pytest.mark.parametrize("name,make,shape,path,dim", TORCHVISION_CASES, ids=[c[0] for c in TORCHVISION_CASES])
def test_torchvision_backbones(name, make, shape, path, dim):
    model = make().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(*shape)
    d = Delegator(model, num_experts=3, reuse_classifier=True).eval()
    assert d.classifier_path == path and d.feature_dim == dim and d.num_classes == 1000
    with torch.no_grad():
        out = d(x)
        expected = reference(x)
    assert isinstance(out, DelegatorOutput)
    assert out.selection_logits.shape == (2, 3)
    # The rough head is the original classifier and everything before it was kept, so the rough
    # prediction is exactly the original model's output.
    torch.testing.assert_close(out.rough_logits, expected)
    # Zero-initialised selection head: uniform selection at the start.
    assert torch.equal(out.selection_logits, torch.zeros(2, 3))


def test_fresh_rough_head_and_no_rough_head():
    d = Delegator(torchvision.models.resnet18(weights=None), num_experts=4, num_classes=10)
    out = d(torch.randn(*X64))
    assert out.selection_logits.shape == (2, 4) and out.rough_logits.shape == (2, 10)
    assert isinstance(d.backbone.fc, nn.Identity)
    assert d.rough_head.in_features == 512 and d.rough_head.out_features == 10

    d = Delegator(_Extractor(), num_experts=4, feature_dim=8)
    out = d(torch.randn(2, 3, 8, 8))
    assert out.rough_logits is None and d.rough_head is None


def test_reused_classifier_is_not_duplicated_in_state_dict():
    d = Delegator(torchvision.models.resnet18(weights=None), num_experts=2, reuse_classifier=True)
    keys = d.state_dict().keys()
    assert "rough_head.weight" in keys and not any(k.startswith("backbone.fc") for k in keys)
    d2 = Delegator(torchvision.models.resnet18(weights=None), num_experts=2, reuse_classifier=True)
    d2.load_state_dict(d.state_dict())


@pytest.mark.parametrize("name,shape", [("test_efficientnet", X64), ("mobilenetv3_small_050", X64)])
def test_timm_backbones(name, shape):
    model = timm.create_model(name, pretrained=False, num_classes=7).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(*shape)
    d = Delegator(model, num_experts=3, reuse_classifier=True).eval()
    assert d.num_classes == 7
    # timm's own width: head_hidden_size where the model has one (mobilenetv3: 1024, not num_features=288).
    assert d.feature_dim == (getattr(reference, "head_hidden_size", None) or reference.num_features)
    with torch.no_grad():
        out = d(x)
        torch.testing.assert_close(out.rough_logits, reference(x))
    assert out.selection_logits.shape == (2, 3)


def test_timm_fresh_head():
    model = timm.create_model("test_efficientnet", pretrained=False)
    d = Delegator(model, num_experts=2, num_classes=5)
    out = d(torch.randn(*X64))
    assert out.rough_logits.shape == (2, 5) and d.feature_dim == 256


class _Extractor(nn.Module):
    """A user feature extractor: no classifier, returns Tensor[B, 8]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)).relu().mean(dim=(2, 3)))


def test_user_extractor_with_feature_dim():
    d = Delegator(_Extractor(), num_experts=2, num_classes=3, feature_dim=8)
    assert d.classifier_path is None
    out = d(torch.randn(4, 3, 8, 8))
    assert out.selection_logits.shape == (4, 2) and out.rough_logits.shape == (4, 3)


def test_user_extractor_inferred_from_example_input_restores_modes():
    ext = _Extractor().train()
    ext.drop.eval()  # mixed modes must survive the dry run
    before = {k: v.clone() for k, v in ext.state_dict().items()}
    d = Delegator(ext, num_experts=2, example_input=torch.randn(4, 3, 8, 8) + 3)
    assert d.feature_dim == 8
    assert ext.training and ext.bn.training and not ext.drop.training
    for k, v in ext.state_dict().items():  # eval-mode dry run: running statistics unchanged
        assert torch.equal(v, before[k]), k


def test_example_input_tuple_and_extra_forward_args():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)

        def forward(self, tokens, mask):
            e = self.emb(tokens) * mask.unsqueeze(-1)
            return e.sum(1) / mask.sum(1, keepdim=True)

    tokens = torch.randint(0, 10, (3, 5))
    mask = torch.ones(3, 5)
    d = Delegator(TwoInputs(), num_experts=2, num_classes=4, example_input=(tokens, mask))
    assert d.feature_dim == 6
    out = d(tokens, mask)
    assert out.selection_logits.shape == (3, 2) and out.rough_logits.shape == (3, 4)


def test_explicit_classifier_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(5, 6)
            self.out_proj = nn.Sequential(nn.ReLU(), nn.Linear(6, 9))

        def forward(self, x):
            return self.out_proj(self.body(x))

    net = Net()
    d = Delegator(net, num_experts=2, classifier="out_proj", reuse_classifier=True)
    assert d.classifier_path == "out_proj.1" and d.feature_dim == 6 and d.num_classes == 9
    assert isinstance(net.out_proj[0], nn.ReLU) and isinstance(net.out_proj[1], nn.Identity)
    with pytest.raises(ValueError, match="no submodule"):
        Delegator(Net(), num_experts=2, classifier="nope")
    with pytest.raises(ValueError, match="no submodule"):
        Delegator(Net(), num_experts=2, classifier="body.weight")
    with pytest.raises(ValueError, match="cannot be stripped.*ReLU"):
        Delegator(Net(), num_experts=2, classifier="out_proj.0")


def test_classifier_none_keeps_backbone():
    model = torchvision.models.resnet18(weights=None)
    d = Delegator(model, num_experts=2, classifier=None, feature_dim=1000)  # logits used as features
    assert isinstance(model.fc, nn.Linear) and d.classifier_path is None
    assert d(torch.randn(*X64)).selection_logits.shape == (2, 2)


def test_nothing_found_error_says_what_to_pass():
    with pytest.raises(ValueError, match="feature_dim=.*example_input=.*classifier="):
        Delegator(_Extractor(), num_experts=2)
    with pytest.raises(ValueError, match="feature_dim"):
        Delegator(_Extractor(), num_experts=2, classifier=None)


def test_squeezenet_is_reported_unsupported_and_left_untouched():
    model = torchvision.models.squeezenet1_1(weights=None)
    with pytest.raises(ValueError, match="SqueezeNet.*feature extractor"):
        Delegator(model, num_experts=2)
    assert isinstance(model.classifier[1], nn.Conv2d)
    # The suggested workaround works.
    ext = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    d = Delegator(ext, num_experts=2, classifier=None, example_input=torch.randn(*X64))
    assert d.feature_dim == 512


def test_gradients_reach_backbone_through_both_heads():
    def backbone_grad(d, which):
        d.zero_grad()
        out = d(torch.randn(2, 3, 32, 32))
        getattr(out, which).square().sum().backward()
        return d.backbone.features[0][0].weight.grad  # the first convolution

    torch.manual_seed(1)
    d = Delegator(torchvision.models.mobilenet_v3_small(weights=None), 3, 5, zero_init_selection=False).train()
    for which in ("selection_logits", "rough_logits"):
        g = backbone_grad(d, which)
        assert g is not None and g.abs().sum() > 0, which
    # With the default zero init, the selection head itself still receives a gradient.
    d = Delegator(_Extractor(), 3, feature_dim=8)
    out = d(torch.randn(4, 3, 8, 8))
    torch.nn.functional.cross_entropy(out.selection_logits, torch.tensor([0, 1, 2, 0])).backward()
    assert d.selection_head.weight.grad.abs().sum() > 0


def test_dropout_on_features():
    d = Delegator(_Extractor(), 2, 3, feature_dim=8, dropout=0.9)
    d.backbone.drop.p = 0.0
    x = torch.randn(4, 3, 8, 8)
    d.eval()
    assert torch.equal(d(x).rough_logits, d(x).rough_logits)
    d.train()
    assert not torch.equal(d(x).rough_logits, d(x).rough_logits)


def test_heads_follow_backbone_dtype():
    d = Delegator(_Extractor().double(), 2, 3, feature_dim=8)
    assert d.selection_head.weight.dtype == torch.float64 and d.rough_head.weight.dtype == torch.float64
    assert d(torch.randn(2, 3, 8, 8, dtype=torch.float64)).rough_logits.dtype == torch.float64


@pytest.mark.parametrize(
    ("bad", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError)]
)
def test_bad_num_experts(bad, error):
    with pytest.raises(error, match="num_experts"):
        Delegator(_Extractor(), bad, feature_dim=8)


@pytest.mark.parametrize(("bad", "error"), [(0, ValueError), (-3, ValueError), (1.0, TypeError)])
def test_bad_num_classes(bad, error):
    with pytest.raises(error, match="num_classes"):
        Delegator(_Extractor(), 2, bad, feature_dim=8)


def test_bad_arguments():
    with pytest.raises(TypeError, match="backbone"):
        Delegator(lambda x: x, 2, feature_dim=8)
    with pytest.raises(ValueError, match="feature_dim"):
        Delegator(_Extractor(), 2, feature_dim=0)
    with pytest.raises(ValueError, match="dropout"):
        Delegator(_Extractor(), 2, feature_dim=8, dropout=1.5)
    with pytest.raises(ValueError, match="dropout"):
        Delegator(_Extractor(), 2, feature_dim=8, dropout=1.0)
    with pytest.raises(TypeError, match="classifier"):
        Delegator(_Extractor(), 2, feature_dim=8, classifier=3)
    with pytest.raises(TypeError, match="example_input"):
        Delegator(_Extractor(), 2, example_input="not a tensor")


def test_wrong_feature_dim():
    # Feature extractor: caught at the first forward ...
    d = Delegator(_Extractor(), 2, feature_dim=9)
    with pytest.raises(ValueError, match="size 8.*feature_dim is 9"):
        d(torch.randn(2, 3, 8, 8))
    # ... or at construction when example_input is given,
    with pytest.raises(ValueError, match="size 8.*feature_dim is 9"):
        Delegator(_Extractor(), 2, feature_dim=9, example_input=torch.randn(2, 3, 8, 8))
    # ... and at construction when it disagrees with the classifier found (backbone left untouched).
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="feature_dim=256 disagrees.*'fc'.*512"):
        Delegator(model, 2, feature_dim=256)
    assert isinstance(model.fc, nn.Linear)


def test_failed_check_restores_classifier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).unsqueeze(-1)  # not [B, D] once stripped

    net = Net()
    fc = net.fc
    with pytest.raises(ValueError, match=r"shape \[B, D\]"):
        Delegator(net, 2, example_input=torch.randn(2, 4))
    assert net.fc is fc


def test_reuse_classifier_errors_leave_backbone_untouched():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="out_features.*1000.*num_classes.*10"):
        Delegator(model, 2, num_classes=10, reuse_classifier=True)
    assert isinstance(model.fc, nn.Linear)
    with pytest.raises(ValueError, match="reuse_classifier"):
        Delegator(_Extractor(), 2, feature_dim=8, reuse_classifier=True)


def test_bad_forward_input_and_backbone_output():
    d = Delegator(_Extractor(), 2, feature_dim=8)
    with pytest.raises(TypeError, match="the delegator needs a batch.*got list"):
        d([[1.0, 2.0]])
    with pytest.raises(TypeError, match="the delegator needs a batch.*got NoneType"):
        d(None)

    d = Delegator(nn.Conv2d(3, 4, 3), 2, feature_dim=4)
    with pytest.raises(ValueError, match="pool and flatten"):
        d(torch.randn(2, 3, 8, 8))

    Out = namedtuple("Out", ["logits", "aux_logits"])

    class Inceptionish(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 5)

        def forward(self, x):
            return Out(self.body(x), None)

    # a tuple (torchvision's GoogLeNet/Inception-v3 in training mode): element 0 holds the features
    backbone = Inceptionish()
    d = Delegator(backbone, 2, feature_dim=5)
    x = torch.randn(2, 4)
    torch.testing.assert_close(d.features(x), backbone.body(x))

    class Setish(nn.Module):
        def forward(self, x):
            return {x.sum().item()}

    with pytest.raises(TypeError, match="must return its features.*returned set"):
        Delegator(Setish(), 2, feature_dim=5)(x)

    class FirstRowOnly(nn.Module):
        def forward(self, x):
            return x[:1]

    d = Delegator(FirstRowOnly(), 2, feature_dim=3)
    with pytest.raises(ValueError, match="1 feature rows for a batch of 2"):
        d(torch.randn(2, 3))


def test_already_stripped_classifier_falls_back_to_inference():
    model = _tiny_densenet()
    model.classifier = nn.Identity()  # the user removed it already
    with pytest.raises(ValueError, match="feature_dim"):
        Delegator(model, 2)
    d = Delegator(model, 2, num_classes=3, example_input=torch.randn(*X64))
    assert d.classifier_path is None and d.feature_dim == 16
    assert d(torch.randn(*X64)).rough_logits.shape == (2, 3)


def test_deepcopy_and_state_dict_round_trip():
    d = Delegator(_Extractor(), 2, 3, feature_dim=8, zero_init_selection=False)
    d2 = copy.deepcopy(d)
    x = torch.randn(2, 3, 8, 8)
    d.eval(), d2.eval()
    torch.testing.assert_close(d(x).selection_logits, d2(x).selection_logits)
    d3 = Delegator(_Extractor(), 2, 3, feature_dim=8)
    d3.load_state_dict(d.state_dict())
    torch.testing.assert_close(d3.eval()(x).rough_logits, d(x).rough_logits)
