"""CoTrainingEnsemble, combine rules, concurrent == sequential, and CoTrainingLoss."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pycoe.cotrain.ensemble import CoTrainingEnsemble, CoTrainingLoss, CoTrainingOutput, combine_outputs
from pycoe.cotrain.schedule import LinearWarmup
from pycoe.functional.cotrain import js_divergence, pairwise_kl


def _member(width=8, classes=5):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


def _ensemble(s=3, **kwargs):
    return CoTrainingEnsemble([_member(8 + 4 * i) for i in range(s)], **kwargs)


def test_training_forward_returns_every_member_and_ensemble():
    ens = _ensemble(3).train()
    views = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    out = ens(views)
    assert isinstance(out, CoTrainingOutput) and out.num_members == 3
    assert out.member_outputs.shape == (3, 4, 5) and out.ensemble.shape == (4, 5)
    ens.eval()
    with torch.no_grad():
        expected = torch.stack([m(v) for m, v in zip(ens.members, views)])
        torch.testing.assert_close(ens(views, return_members=True).member_outputs, expected)
        # eval forward with one input returns the ensemble tensor
        x = torch.randn(4, 3, 8, 8)
        y = ens(x)
        assert isinstance(y, torch.Tensor)
        torch.testing.assert_close(y, torch.stack([m(x) for m in ens.members]).mean(0))


def test_combine_rules_against_references():
    z = torch.randn(3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(combine_outputs(z, "mean_logits"), z.mean(0))
    mean_probs = torch.softmax(z, -1).mean(0)
    torch.testing.assert_close(combine_outputs(z, "mean_probs"), mean_probs.log())
    torch.testing.assert_close(torch.softmax(combine_outputs(z, "mean_probs"), -1), mean_probs)
    torch.testing.assert_close(combine_outputs(z, "max"), torch.max(torch.max(z[0], z[1]), z[2]))
    torch.testing.assert_close(combine_outputs(z, lambda t: t[0]), z[0])


@pytest.mark.parametrize("combine", ["mean_logits", "mean_probs", "max"])
@pytest.mark.parametrize("s", [2, 4])
def test_concurrent_equals_sequential_exactly(combine, s):
    ens = _ensemble(s, combine=combine).eval()
    conc = copy.deepcopy(ens)
    conc.concurrent = True
    x = torch.randn(6, 3, 16, 16)
    views = [torch.randn(6, 3, 16, 16) for _ in range(s)]
    with torch.no_grad():
        for _ in range(3):  # several calls reuse the pool
            assert torch.equal(conc(x), ens(x))
            a, b = conc(views, return_members=True), ens(views, return_members=True)
            assert torch.equal(a.member_outputs, b.member_outputs) and torch.equal(a.ensemble, b.ensemble)


def test_concurrent_training_gradients_equal_sequential():
    ens = _ensemble(3).train()
    conc = copy.deepcopy(ens)
    conc.concurrent = True
    views = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    target = torch.randint(0, 5, (4,))
    loss_fn = CoTrainingLoss("js", weight=0.5)
    for model in (ens, conc):
        loss, _ = loss_fn(model(views), target)
        loss.backward()
    for p, q in zip(ens.parameters(), conc.parameters()):
        assert torch.equal(p.grad, q.grad)
    # grad mode of the caller is respected in the worker threads
    with torch.no_grad():
        assert not conc(views).ensemble.requires_grad
    with torch.inference_mode():
        assert conc(views).ensemble.is_inference()


def test_pickle_and_deepcopy_with_a_live_pool():
    ens = _ensemble(2, concurrent=True).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = ens(x)
        clone = pickle.loads(pickle.dumps(ens))
        assert torch.equal(clone(x), y)
        assert torch.equal(copy.deepcopy(ens)(x), y)


def test_cotraining_loss():
    z = torch.randn(3, 4, 5, requires_grad=True)
    target = torch.randint(0, 5, (4,))
    out = CoTrainingOutput(member_outputs=z, ensemble=z.mean(0))
    loss, info = CoTrainingLoss("js", weight=0.5)(out, target)
    expected = sum(F.cross_entropy(z[i], target) for i in range(3)) + 0.5 * js_divergence(z)
    torch.testing.assert_close(loss, expected)
    assert set(info) == {"ce", "cot", "weight"} and info["weight"] == 0.5
    loss, info = CoTrainingLoss("pairwise_kl", weight=LinearWarmup(10, 1.0))(z, target, step=5)
    torch.testing.assert_close(loss, sum(F.cross_entropy(z[i], target) for i in range(3)) + 0.5 * pairwise_kl(z))
    with pytest.raises(ValueError, match="step must be given"):
        CoTrainingLoss(weight=LinearWarmup(10, 1.0))(z, target)
    with pytest.raises(ValueError, match="cotrain"):
        CoTrainingLoss("l2")
    with pytest.raises(ValueError, match="weight"):
        CoTrainingLoss(weight=-1.0)


def test_bad_input():
    ens = _ensemble(3)
    with pytest.raises(ValueError, match="expected 3 views, got 2"):
        ens([torch.randn(2, 3, 8, 8)] * 2)
    with pytest.raises(TypeError, match=r"x\[1\] must be a torch.Tensor"):
        ens([torch.randn(2, 3, 8, 8), "x", torch.randn(2, 3, 8, 8)])
    with pytest.raises(TypeError, match="x must be a list"):
        ens("views")
    with pytest.raises(ValueError, match="at least one member"):
        CoTrainingEnsemble([])
    with pytest.raises(TypeError, match="single nn.Module"):
        CoTrainingEnsemble(_member())
    with pytest.raises(TypeError, match=r"models\[1\]"):
        CoTrainingEnsemble([_member(), "net"])
    with pytest.raises(ValueError, match="combine"):
        CoTrainingEnsemble([_member()], combine="median")
    with pytest.raises(TypeError, match="concurrent"):
        CoTrainingEnsemble([_member()], concurrent="yes")
    mismatched = CoTrainingEnsemble([_member(classes=5), _member(classes=4)])
    with pytest.raises(ValueError, match="outputs of one shape"):
        mismatched(torch.randn(2, 3, 8, 8))
