"""CoTrainingEnsemble, combine rules, concurrent == sequential, and CoTrainingLoss."""

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference.cotrain import smoothed_cross_entropy_reference
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
    with pytest.raises(ValueError, match="divergence"):
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
    with pytest.raises(ValueError, match=r"same batch size; x\[0\] has 2 samples, x\[2\] has 3"):
        ens([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)])
    with pytest.raises(ValueError, match=r"x\[0\] must have a batch dimension"):
        ens([torch.tensor(1.0)] * 3)
    with pytest.raises(TypeError, match="return_members must be a bool"):
        ens(torch.randn(2, 3, 8, 8), return_members="yes")
    with pytest.raises(TypeError, match="models must be a sequence"):
        CoTrainingEnsemble(5)
    with pytest.raises(TypeError, match="combine must be one of .* or a callable, got int"):
        CoTrainingEnsemble([_member()], combine=3)
    with pytest.raises(TypeError, match="max_workers must be a positive integer, got"):
        CoTrainingEnsemble([_member()], max_workers=2.0)
    with pytest.raises(ValueError, match="max_workers must be a positive integer"):
        CoTrainingEnsemble([_member()], max_workers=0)


def test_combine_outputs_bad_input():
    z = torch.randn(3, 4, 6)
    with pytest.raises(TypeError, match="member_outputs must be a torch.Tensor"):
        combine_outputs([z[0], z[1]])
    with pytest.raises(TypeError, match="floating-point"):
        combine_outputs(torch.ones(3, 4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[S, B, ...\]"):
        combine_outputs(torch.randn(5))
    with pytest.raises(ValueError, match="combine must be one of"):
        combine_outputs(z, "median")
    with pytest.raises(TypeError, match="combine must be one of .* or a callable, got float"):
        combine_outputs(z, 0.5)
    with pytest.raises(TypeError, match="combine must return a Tensor, got list"):
        combine_outputs(z, lambda t: [t[0]])
    with pytest.raises(ValueError, match=r"shape \(4, 6\) here, but returned \(6,\)"):
        combine_outputs(z, lambda t: t.mean(dim=(0, 1)))


@pytest.mark.parametrize("concurrent", [False, True])
def test_empty_batch_gives_an_empty_output(concurrent):
    ens = _ensemble(3, concurrent=concurrent).eval()
    x = torch.randn(0, 3, 8, 8)
    with torch.no_grad():
        assert ens(x).shape == (0, 5)
        out = ens([x] * 3, return_members=True)
        assert out.member_outputs.shape == (3, 0, 5) and out.ensemble.shape == (0, 5)
    for combine in ("mean_probs", "max"):
        assert combine_outputs(torch.randn(3, 0, 5), combine).shape == (0, 5)


@pytest.mark.slow
def test_eval_ensemble_exports_with_a_dynamic_batch():
    # concurrent=True on purpose: under torch.export the members run sequentially (a thread pool cannot be traced)
    ens = _ensemble(3, combine="mean_probs", concurrent=True).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(ens, (torch.randn(4, 3, 8, 8),), dynamic_shapes={"x": {0: batch}})
    exported = program.module()
    with torch.no_grad():
        for b in (1, 5, 17):
            x = torch.randn(b, 3, 8, 8)
            torch.testing.assert_close(exported(x), ens(x))
    # with the members' outputs: the exported module returns the same dataclass; one view per member
    views = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    program = torch.export.export(ens, (views, True), dynamic_shapes={"x": [{0: batch}] * 3, "return_members": None})
    views = [torch.randn(6, 3, 8, 8) for _ in range(3)]
    got = program.module()(views, True)
    with torch.no_grad():
        want = ens(views, return_members=True)
    assert isinstance(got, CoTrainingOutput)
    torch.testing.assert_close(got.member_outputs, want.member_outputs)
    torch.testing.assert_close(got.ensemble, want.ensemble)


def test_cotraining_loss_extra_dims_and_probability_targets():
    # [S, B, T, C] logits (e.g. a sequence): the classes are the last dim, as for every pycoe loss
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (3, 4))
    loss, _ = CoTrainingLoss("js", weight=0.0)(z, target)
    expected = sum(F.cross_entropy(z[i].reshape(-1, 5), target.reshape(-1)) for i in range(2))
    torch.testing.assert_close(loss, expected)
    probs = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    z = torch.randn(2, 3, 5, dtype=torch.float64)
    loss, _ = CoTrainingLoss("js", weight=0.0)(z, probs)
    expected = sum(-(probs * torch.log_softmax(z[i], -1)).sum(-1).mean() for i in range(2))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_cotraining_loss_smooths_the_labels(smoothing):
    z = torch.randn(3, 6, 5, dtype=torch.float64)
    for target in (torch.randint(0, 5, (6,)), torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1)):
        loss, info = CoTrainingLoss("js", weight=0.0, label_smoothing=smoothing)(z, target)
        expected = sum(smoothed_cross_entropy_reference(z[i], target, smoothing) for i in range(3))
        torch.testing.assert_close(loss, expected)
        assert info["ce"] == pytest.approx(float(expected))


class _BadSchedule:
    def __init__(self, value):
        self.value = value

    def __call__(self, step):
        return self.value

    def __repr__(self):
        return f"_BadSchedule({self.value})"


def test_cotraining_loss_bad_input():
    z = torch.randn(3, 4, 5)
    target = torch.randint(0, 5, (4,))
    for weight in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
            CoTrainingLoss(weight=weight)
    with pytest.raises(TypeError, match="weight must be a finite number >= 0 or a callable step -> weight, got str"):
        CoTrainingLoss(weight="0.5")
    for value in (-0.1, float("nan"), "high", None):
        with pytest.raises(ValueError, match=r"schedule _BadSchedule\(.*\) returned .* at step 3"):
            CoTrainingLoss(weight=_BadSchedule(value))(z, target, step=3)
    # a weight is a number under the library's one rule: Python, NumPy or a 0-d tensor, never an array
    assert CoTrainingLoss(weight=_BadSchedule(torch.tensor(0.25)))(z, target, step=3)[1]["weight"] == 0.25
    assert CoTrainingLoss(weight=_BadSchedule(np.float32(0.25)))(z, target, step=3)[1]["weight"] == 0.25
    with pytest.raises(ValueError, match=r"schedule _BadSchedule\(tensor\(\[0.2500\]\)\) returned"):
        CoTrainingLoss(weight=_BadSchedule(torch.tensor([0.25])))(z, target, step=3)
    assert CoTrainingLoss(weight=np.float64(0.5))(z, target)[1]["weight"] == 0.5
    with pytest.raises(TypeError, match="step must be an int"):
        CoTrainingLoss(weight=LinearWarmup(10, 1.0))(z, target, step=2.5)
    with pytest.raises(TypeError, match="divergence must be"):
        CoTrainingLoss(divergence=1)
    with pytest.raises(TypeError, match="label_smoothing must be a real number"):
        CoTrainingLoss(label_smoothing="abc")
    with pytest.raises(ValueError, match="label_smoothing must be a finite number >= 0 and <= 1"):
        CoTrainingLoss(label_smoothing=1.5)
    loss_fn = CoTrainingLoss()
    with pytest.raises(TypeError, match="output must be a torch.Tensor"):
        loss_fn([z[0], z[1]], target)
    with pytest.raises(ValueError, match=r"shape \[S, B, ..., C\]"):
        loss_fn(z[0], target)
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\), got values in \[0, 5\]"):
        loss_fn(z, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\), got values in \[-1, 2\]"):
        loss_fn(z, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        loss_fn(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class probabilities must have shape \(4, 5\)"):
        loss_fn(z, torch.rand(4, 3))
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        loss_fn(z, [0, 1, 2, 3])
    with pytest.raises(TypeError, match="dtype torch.bool"):
        loss_fn(z, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch is empty"):
        loss_fn(torch.randn(3, 0, 5), torch.zeros(0, dtype=torch.long))
