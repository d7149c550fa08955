"""CoE model: training/eval forwards against per-sample references, torchvision/user/seq2seq models, evaluation."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pycoe.coe.experts import ExpertPool
from pycoe.coe.loss import CoELoss
from pycoe.coe.model import CoE, CoEOutput, CoETrainOutput
from pycoe.flops import count_flops
from pycoe.routing.labels import LabelGenerator
from pycoe.routing.weighting import BalancedTransportWeighter
from pycoe.twostage.delegator import Delegator, DelegatorOutput
from pycoe.twostage.evaluate import predict, threshold_sweep

D_IN, C = 12, 5


def mlp(d_in=D_IN, d_out=C, hidden=10):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def make_coe(k=3, exit_threshold=None, rough=True):
    backbone = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh())
    delegator = Delegator(
        backbone, k, num_classes=C if rough else None, feature_dim=16, classifier=None, zero_init_selection=False
    )
    experts = ExpertPool.from_template(mlp(), k, init="reinit")
    return CoE(delegator, experts, exit_threshold=exit_threshold)


def loop_eval(model, x, threshold):
    """Obviously-correct reference: one sample at a time, exit or call the argmax expert."""
    outs, index, exited = [], [], []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        d = model.delegate(xi)
        conf = F.softmax(d.rough_logits, dim=1).max() if d.rough_logits is not None else None
        if threshold is not None and conf >= threshold:
            outs.append(d.rough_logits)
            index.append(-1)
            exited.append(True)
        else:
            k = int(d.selection_logits.argmax())
            outs.append(model.experts[k](xi))
            index.append(k)
            exited.append(False)
    return torch.cat(outs), torch.tensor(index), torch.tensor(exited)


def midpoint_threshold(model, x, quantile=0.5):
    """A threshold between two observed confidences, so that batch/loop rounding cannot flip a decision."""
    with torch.no_grad():
        conf = F.softmax(model.delegate(x).rough_logits, dim=1).amax(1).sort().values
    i = int(quantile * (len(conf) - 1))
    return float((conf[i] + conf[i + 1]) / 2)


# ---------------------------------------------------------------- training forward
def test_train_forward_is_delegator_plus_every_expert():
    model = make_coe(k=3).train()
    x = torch.randn(6, D_IN)
    out = model(x)
    assert isinstance(out, CoETrainOutput)
    d = model.delegator(x)
    torch.testing.assert_close(out.selection_logits, d.selection_logits)
    torch.testing.assert_close(out.rough_logits, d.rough_logits)
    assert out.expert_outputs.shape == (3, 6, C)
    for k in range(3):
        torch.testing.assert_close(out.expert_outputs[k], model.experts[k](x))


# ---------------------------------------------------------------- eval forward
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", ["none", "mixed", "all", "one"])
def test_routed_eval_equals_per_sample_loop(k, mode):
    model = make_coe(k=k).eval()
    x = torch.randn(11, D_IN)
    threshold = {"none": None, "mixed": midpoint_threshold(model, x), "all": 0.0, "one": 1.0}[mode]
    model.exit_threshold = threshold
    with torch.no_grad():
        out = model(x)
        ref_out, ref_index, ref_exited = loop_eval(model, x, threshold)
    assert isinstance(out, CoEOutput)
    torch.testing.assert_close(out.output, ref_out)
    assert torch.equal(out.expert_index, ref_index)
    assert torch.equal(out.exited, ref_exited)
    torch.testing.assert_close(out.confidence, F.softmax(model.delegator(x).rough_logits, 1).amax(1))
    if mode == "mixed":
        assert 0 < int(out.exited.sum()) < 11
    if mode == "all":
        assert bool(out.exited.all())


def test_eval_with_empty_experts_calls_only_the_chosen_ones():
    model = make_coe(k=4).eval()
    with torch.no_grad():  # the delegator only ever picks experts 1 and 3
        model.delegator.selection_head.bias.copy_(torch.tensor([-50.0, 0.0, -50.0, 0.0]))
    calls = []
    for j, e in enumerate(model.experts):
        e.register_forward_hook(lambda m, i, o, j=j: calls.append(j))
    x = torch.randn(16, D_IN)
    with torch.no_grad():
        out = model(x)
        ref, ref_index, _ = loop_eval(model, x, None)
    assert set(out.expert_index.tolist()) <= {1, 3}
    calls_batched = calls[: len(set(out.expert_index.tolist()))]
    assert sorted(calls_batched) == sorted(set(out.expert_index.tolist()))
    torch.testing.assert_close(out.output, ref)
    assert torch.equal(out.expert_index, ref_index)


def test_eval_without_rough_head_never_exits():
    model = make_coe(k=2, rough=False).eval()
    x = torch.randn(5, D_IN)
    out = model(x)
    assert not out.exited.any() and torch.isnan(out.confidence).all()
    torch.testing.assert_close(out.output, loop_eval(model, x, None)[0])


def test_forward_eval_threshold_override_and_train_mode_methods():
    model = make_coe(k=2, exit_threshold=0.0).train()
    x = torch.randn(4, D_IN)
    out = model.forward_eval(x, exit_threshold=None)  # works in train mode too
    assert not out.exited.any()
    assert model.forward_eval(x).exited.all()
    assert isinstance(model.eval().forward_train(x), CoETrainOutput)


# ---------------------------------------------------------------- boundaries: ties, exact thresholds, empty experts
class ExactDelegator(nn.Module):
    """Reads its outputs off the input: selection logits x[:, :K], rough logits x[:, K:K + C] (exact values)."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.num_experts, self.num_classes = k, C

    def forward(self, x):
        return DelegatorOutput(x[:, : self.k], x[:, self.k : self.k + C])


def exact_coe(k=3, exit_threshold=None):
    torch.manual_seed(0)
    return CoE(ExactDelegator(k), [nn.Linear(k + C, C) for _ in range(k)], exit_threshold=exit_threshold).eval()


def test_tied_selection_logits_go_to_the_lowest_expert_index():
    model = exact_coe(k=3)
    sel = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0], [0.0, 0.0, 5.0], [-1.0, -1.0, -1.0]])
    x = torch.cat([sel, torch.randn(5, C)], dim=1)
    with torch.no_grad():
        out = model(x)
    assert out.expert_index.tolist() == [0, 1, 0, 2, 0]
    with torch.no_grad():
        expected = torch.stack([model.experts[int(k)](x[i]) for i, k in enumerate(out.expert_index)])
    torch.testing.assert_close(out.output, expected)


def test_untrained_zero_init_delegator_ties_every_sample_to_expert_zero():
    delegator = Delegator(
        nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh()), 3, num_classes=C, feature_dim=16, classifier=None
    )  # zero_init_selection=True: every selection logit is 0
    model = CoE(delegator, ExpertPool.from_template(mlp(), 3, init="reinit")).eval()
    x = torch.randn(9, D_IN)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.delegate(x).selection_logits, torch.zeros(9, 3))
        torch.testing.assert_close(out.output, model.experts[0](x))
    assert out.expert_index.tolist() == [0] * 9


def test_a_confidence_exactly_on_the_threshold_exits():
    # four equal rough logits and one at -inf: the confidence is exactly 1/4; one sample more confident
    sel = torch.zeros(4, 3)
    rough = torch.zeros(4, C)
    rough[:, 4] = -math.inf
    rough[3, 0] = 1.0  # confidence e / (e + 3) = 0.475...
    x = torch.cat([sel, rough], dim=1)
    above = float(torch.nextafter(torch.tensor(0.25), torch.tensor(1.0)))
    with torch.no_grad():
        assert exact_coe(exit_threshold=0.25)(x).exited.tolist() == [True] * 4
        assert exact_coe(exit_threshold=above)(x).exited.tolist() == [False, False, False, True]
        out = exact_coe().forward_eval(x, exit_threshold=0.25)
    torch.testing.assert_close(out.confidence[:3], torch.full((3,), 0.25), rtol=0, atol=0)
    torch.testing.assert_close(out.output, rough)
    # the sweep applies the same rule to the same confidences
    model = exact_coe()
    loader = [(x, torch.tensor([0, 1, 2, 0]))]
    results = threshold_sweep(model, loader, [0.25, above, None], flops={"delegator": 1.0, "experts": [5.0] * 3})
    assert [r["exit_rate"] for r in results] == [1.0, 0.25, 0.0]
    assert [r["flops_per_sample"] for r in results] == [1.0, 1.0 + 5.0 * 3 / 4, 1.0 + 5.0]
    # rough logits [0, 0, 0, 0, -inf] predict class 0 (argmax ties to the first class): 2 of 4 correct at threshold 0.25
    assert results[0]["accuracy"] == 0.5


def test_sweep_counts_experts_that_receive_no_sample_and_skips_empty_batches():
    model = exact_coe(k=3)
    sel = torch.tensor([[0.0, 1.0, 0.0]] * 4)  # every sample to expert 1; experts 0 and 2 get none
    x = torch.cat([sel, torch.randn(4, C)], dim=1)
    y = torch.randint(0, C, (4,))
    empty = (x[:0], y[:0])
    results = threshold_sweep(model, [empty, (x, y), empty], [None], flops={"delegator": 2.0, "experts": [1, 10, 100]})
    assert results[0]["expert_load"] == [0, 4, 0] and results[0]["num_samples"] == 4
    assert results[0]["flops_per_sample"] == 12.0
    with torch.no_grad():
        expected = float((model.experts[1](x).argmax(1) == y).float().mean())
    assert results[0]["accuracy"] == expected
    # counted FLOPs come from the first non-empty batch (an empty one would count 0)
    counted = threshold_sweep(model, [empty, (x, y)], [None])[0]
    assert counted["flops_per_sample"] == count_flops(model.delegator, x[:1]) + count_flops(model.experts[1], x[:1])


# ---------------------------------------------------------------- batches of 0 samples
def test_a_batch_of_zero_samples_in_training_and_eval():
    model = make_coe(k=3, exit_threshold=0.5)
    x = torch.randn(0, D_IN)
    out = model.train()(x)
    assert out.selection_logits.shape == (0, 3) and out.rough_logits.shape == (0, C)
    assert out.expert_outputs.shape == (3, 0, C)
    loss, info = CoELoss(BalancedTransportWeighter(3), LabelGenerator())(out, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and info["per_sample_losses"].shape == (0, 3) and info["load"].tolist() == [0, 0, 0]
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    pred = model.eval()(x)
    assert pred.output.shape == (0, C) and pred.expert_index.shape == (0,) and pred.exited.shape == (0,)
    assert predict(model, [(x, torch.zeros(0, dtype=torch.long))]).output.shape == (0, C)


def test_first_eval_forward_learns_the_experts_output_shape_once():
    model = make_coe(k=2, exit_threshold=0.0).eval()  # every sample exits
    sizes = []
    for e in model.experts:
        e.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        model(x)
        assert sizes == [1]  # one sample through expert 0, to check its output against the rough head
        model(x)
        assert sizes == [1]
    trained = make_coe(k=2, exit_threshold=0.0)
    trained.train()(x)  # a training forward shows the shape too
    sizes.clear()
    for e in trained.experts:
        e.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        trained.eval()(x)
    assert sizes == []


# ---------------------------------------------------------------- real and user-defined models
@pytest.fixture
def one_thread():
    """Small convolutions gain nothing from a second thread, and on a loaded 2-core CI machine it costs a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_torchvision_mobilenet_delegator_resnet_experts(one_thread):
    k, classes = 2, 7
    delegator = Delegator(
        torchvision.models.mobilenet_v3_small(weights=None),
        num_experts=k,
        num_classes=classes,
        zero_init_selection=False,
    )
    experts = ExpertPool.from_template(torchvision.models.resnet18(weights=None, num_classes=classes), k, init="reinit")
    model = CoE(delegator, experts)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([1, 5])
    out = model.train()(x)
    assert out.expert_outputs.shape == (k, 2, classes) and out.rough_logits.shape == (2, classes)
    criterion = CoELoss(BalancedTransportWeighter(k), LabelGenerator())
    loss, _info = criterion(out, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert delegator.backbone.features[0][0].weight.grad.abs().sum() > 0
    assert all(e.conv1.weight.grad.abs().sum() > 0 for e in experts)

    # A freshly initialised MobileNetV3 in eval mode returns near-zero features (its BatchNorm statistics are
    # the defaults): calibrate them on the batch, and spread the selection, so that routing is not trivial.
    for m in delegator.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the batch statistics
    with torch.no_grad():
        delegator.train()(x)
        delegator.selection_head.weight.mul_(100.0)
    model.eval()
    model.exit_threshold = midpoint_threshold(model, x)  # one sample exits, the other goes to its expert
    with torch.no_grad():
        pred = model(x)
        ref, ref_index, _ref_exited = loop_eval(model, x, model.exit_threshold)
    assert int(pred.exited.sum()) == 1
    torch.testing.assert_close(pred.output, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(pred.expert_index, ref_index)


class TupleDelegator(nn.Module):
    """A user-written delegator returning a (selection_logits, rough_logits) pair."""

    def __init__(self, k):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 8), nn.ReLU())
        self.sel = nn.Linear(8, k)
        self.rough = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        return self.sel(h), self.rough(h)


class TinyCNN(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(2, width, 3, padding=1)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_user_defined_delegator_and_heterogeneous_experts():
    model = CoE(TupleDelegator(3), [TinyCNN(4), TinyCNN(6), nn.Sequential(nn.Flatten(), nn.Linear(32, 3))])
    x = torch.randn(10, 2, 4, 4)
    out = model.train()(x)
    assert out.expert_outputs.shape == (3, 10, 3)
    model.eval()
    model.exit_threshold = midpoint_threshold(model, x)
    with torch.no_grad():
        pred = model(x)
        ref, ref_index, _ = loop_eval(model, x, model.exit_threshold)
    torch.testing.assert_close(pred.output, ref)
    assert torch.equal(pred.expert_index, ref_index)


# ---------------------------------------------------------------- sequence-to-sequence
VOCAB, SRC_LEN, TGT_LEN = 11, 6, 5


class TinySeq2Seq(nn.Module):
    """GRU encoder-decoder: (src LongTensor[B, S], tgt_in LongTensor[B, T]) -> logits Tensor[B, T, V]."""

    def __init__(self, hidden=12):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, hidden)
        self.enc = nn.GRU(hidden, hidden, batch_first=True)
        self.dec = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, src, tgt_in):
        _, h = self.enc(self.emb(src))
        y, _ = self.dec(self.emb(tgt_in), h)
        return self.out(y)


class MeanEmbedding(nn.Module):
    """Source-sentence features for the delegator: mean of token embeddings, Tensor[B, D]."""

    def __init__(self, dim=8):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)

    def forward(self, src):
        return self.emb(src).mean(1)


def token_ce(logits, target):
    """Per-sample loss for sequences: token cross-entropy averaged over T -> Tensor[B]."""
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)


def test_seq2seq_training_and_routed_eval():
    k = 3
    delegator = Delegator(MeanEmbedding(), k, num_classes=4, feature_dim=8, classifier=None, zero_init_selection=False)
    model = CoE(delegator, ExpertPool.from_template(TinySeq2Seq(), k, init="reinit"), delegator_inputs=[0])
    src = torch.randint(0, VOCAB, (7, SRC_LEN))
    tgt = torch.randint(0, VOCAB, (7, TGT_LEN + 1))
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    out = model.train()(src, tgt_in)
    assert out.expert_outputs.shape == (k, 7, TGT_LEN, VOCAB)
    criterion = CoELoss(BalancedTransportWeighter(k), LabelGenerator(), per_sample_loss=token_ce)
    rough_target = torch.randint(0, 4, (7,))  # e.g. a sentence-level auxiliary label for the rough head
    loss, info = criterion(out, tgt_out, rough_target=rough_target)
    loss.backward()
    assert all(e.out.weight.grad.abs().sum() > 0 for e in model.experts)
    assert "oracle_accuracy" not in info  # only for class labels
    torch.testing.assert_close(info["per_sample_losses"][:, 1], token_ce(out.expert_outputs[1], tgt_out).detach())

    model.eval()
    with torch.no_grad():
        pred = model(src, tgt_in)
        d = model.delegator(src)
        ref = torch.cat(
            [model.experts[int(d.selection_logits[i].argmax())](src[i : i + 1], tgt_in[i : i + 1]) for i in range(7)]
        )
    torch.testing.assert_close(pred.output, ref)
    # early exit cannot mix rough logits [B, 4] with token logits [B, T, V]
    model.exit_threshold = midpoint_threshold(model, src)
    with pytest.raises(ValueError, match="early exit"):
        model(src, tgt_in)


# ---------------------------------------------------------------- bad input
def test_bad_construction_and_threshold():
    delegator = Delegator(nn.Linear(D_IN, 8), 3, num_classes=C, feature_dim=8, classifier=None)
    with pytest.raises(ValueError, match="num_experts=3.*holds 2"):
        CoE(delegator, ExpertPool.from_template(mlp(), 2))
    for bad in (-0.1, 1.5, float("nan"), "high"):
        with pytest.raises(TypeError if isinstance(bad, str) else ValueError, match="exit_threshold"):
            CoE(delegator, ExpertPool.from_template(mlp(), 3), exit_threshold=bad)
    model = CoE(delegator, ExpertPool.from_template(mlp(), 3))
    with pytest.raises(ValueError, match="exit_threshold"):
        model.exit_threshold = 2
    no_rough = Delegator(nn.Linear(D_IN, 8), 3, feature_dim=8, classifier=None)
    with pytest.raises(ValueError, match="rough head"):
        CoE(no_rough, ExpertPool.from_template(mlp(), 3), exit_threshold=0.5)
    with pytest.raises(TypeError, match="delegator"):
        CoE("delegator", ExpertPool.from_template(mlp(), 3))


def test_bad_forward_input():
    model = make_coe(k=2)
    with pytest.raises(ValueError, match="same batch size"):
        model(torch.randn(4, D_IN), torch.randn(5, 3))
    with pytest.raises(ValueError, match="same batch size"):
        model.eval()(torch.randn(4, D_IN), torch.randn(5, 3))
    with pytest.raises(TypeError, match="CoE needs a batch"):
        model()
    with pytest.raises(TypeError, match="batch-first tensor"):
        model([1.0, 2.0])
    # a user delegator whose K disagrees with the pool is caught at the first forward
    bad = CoE(TupleDelegator(4), [TinyCNN(2), TinyCNN(2)])
    with pytest.raises(ValueError, match=r"\[B=3, K=2\]"):
        bad(torch.randn(3, 2, 4, 4))

    class Weird(nn.Module):
        def forward(self, x):
            return {"sel": x}

    with pytest.raises(TypeError, match="DelegatorOutput"):
        CoE(Weird(), [TinyCNN(2)])(torch.randn(3, 2, 4, 4))


# ---------------------------------------------------------------- evaluation helpers
def _loader(n_batches=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, D_IN, generator=g), torch.randint(0, C, (batch,), generator=g)) for _ in range(n_batches)
    ]


def test_predict_concatenates_eval_batches_and_restores_mode():
    model = make_coe(k=3).train()
    loader = _loader()
    model.exit_threshold = midpoint_threshold(model, loader[0][0])
    out = predict(model, loader)
    assert model.training and model.experts[0].training
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        ref, ref_index, ref_exited = loop_eval(model, x, model.exit_threshold)
    torch.testing.assert_close(out.output, ref)
    assert torch.equal(out.expert_index, ref_index) and torch.equal(out.exited, ref_exited)


def test_threshold_sweep_matches_predict_and_counts_flops():
    # heterogeneous experts: their FLOPs differ, and the average must follow the actual routing
    backbone = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh())
    delegator = Delegator(backbone, 3, num_classes=C, feature_dim=16, classifier=None, zero_init_selection=False)
    model = CoE(delegator, [mlp(hidden=4), mlp(hidden=32), nn.Linear(D_IN, C)])
    loader = _loader(n_batches=4)
    calls = []
    model.delegator.register_forward_hook(lambda *a: calls.append(1))
    x_all = torch.cat([b[0] for b in loader])
    y_all = torch.cat([b[1] for b in loader])
    mid = midpoint_threshold(model, x_all)
    thresholds = [None, 0.0, mid, 1.0]
    calls.clear()
    results = threshold_sweep(model, loader, thresholds)
    assert len(calls) == len(loader) + 1  # one pass per batch, plus one to count the delegator's FLOPs
    f_del = count_flops(model.delegator, x_all[:1])
    f_exp = [count_flops(e, x_all[:1]) for e in model.experts]
    assert f_exp[0] != f_exp[1]
    for t, r in zip(thresholds, results):
        pred = predict(model, loader, exit_threshold=t)
        assert r["threshold"] == t and r["num_samples"] == len(y_all)
        assert r["accuracy"] == pytest.approx(float((pred.output.argmax(1) == y_all).float().mean()))
        assert r["exit_rate"] == pytest.approx(float(pred.exited.float().mean()))
        routed = pred.expert_index[pred.expert_index >= 0]
        expected = f_del + sum(f_exp[int(k)] for k in routed) / len(y_all)
        assert r["flops_per_sample"] == pytest.approx(expected)
        assert r["expert_load"] == torch.bincount(routed, minlength=3).tolist()
    assert results[1]["exit_rate"] == 1.0 and results[1]["flops_per_sample"] == pytest.approx(f_del)
    assert 0 < results[2]["exit_rate"] < 1
    given = threshold_sweep(model, loader, [None], flops={"delegator": 1.0, "experts": [10.0, 20.0, 30.0]})
    load = given[0]["expert_load"]
    assert given[0]["flops_per_sample"] == pytest.approx(1.0 + (10 * load[0] + 20 * load[1] + 30 * load[2]) / 32)
    assert threshold_sweep(model, loader, [0.5], flops=False)[0]["flops_per_sample"] is None


def test_evaluation_bad_input():
    model = make_coe(k=2)
    loader = _loader(1)
    with pytest.raises(ValueError, match=r"thresholds\[1\]"):
        threshold_sweep(model, loader, [0.5, 1.2])
    with pytest.raises(TypeError, match="sequence"):
        threshold_sweep(model, loader, 0.5)
    with pytest.raises(ValueError, match="one entry per expert"):
        threshold_sweep(model, loader, [0.5], flops={"delegator": 1.0, "experts": [1.0]})
    with pytest.raises(ValueError, match="class-index targets"):
        threshold_sweep(model, [(torch.randn(4, D_IN), torch.randn(4))], [0.5])
    with pytest.raises(TypeError, match="CoE"):
        predict(nn.Linear(2, 2), loader)
    with pytest.raises(ValueError, match="no batch"):
        predict(model, [])
    with pytest.raises(ValueError, match="rough head"):
        threshold_sweep(make_coe(k=2, rough=False), loader, [0.5])


def test_delegator_output_dataclass_is_accepted_as_is():
    class DataclassDelegator(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D_IN, 2)

        def forward(self, x):
            return DelegatorOutput(self.lin(x), None)

    model = CoE(DataclassDelegator(), ExpertPool.from_template(mlp(), 2)).eval()
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(model(x).output, loop_eval(model, x, None)[0])
