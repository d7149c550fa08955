"""CoELoss against a hand-written reference: values, gradients to delegator and experts, metrics, bad input."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from reference.coe import wgm_weights
from torch import nn

from pycoe.coe.experts import ExpertPool
from pycoe.coe.loss import CoELoss, scalar_info
from pycoe.coe.model import CoE, CoETrainOutput
from pycoe.routing.labels import LabelGenerator
from pycoe.routing.metrics import load_balance_cv2
from pycoe.routing.weighting import BalancedTransportWeighter
from pycoe.twostage.delegator import Delegator

D_IN, C = 10, 4


def make_model(k=3):
    backbone = nn.Sequential(nn.Linear(D_IN, 12), nn.Tanh())
    delegator = Delegator(backbone, k, num_classes=C, feature_dim=12, classifier=None, zero_init_selection=False)
    experts = ExpertPool.from_template(nn.Sequential(nn.Linear(D_IN, 8), nn.ReLU(), nn.Linear(8, C)), k, init="reinit")
    return CoE(delegator, experts).train()


def reference_loss(model, x, y, epsilon=0.0, weights=(1.0, 1.0, 1.0), soft_temperature=None):
    """The documented formula, written with per-sample loops."""
    k = model.num_experts
    d = model.delegator(x)
    sel, rough = d.selection_logits, d.rough_logits
    losses = torch.stack(
        [
            torch.stack([F.cross_entropy(model.experts[j](x[i : i + 1]), y[i : i + 1]) for j in range(k)])
            for i in range(len(y))
        ]
    )  # [B, K]
    w = wgm_weights(sel, epsilon)  # brute force, independent of pycoe.routing
    expert = sum((w[:, j] * losses[:, j]).sum() / w[:, j].sum() for j in range(k) if w[:, j].sum() > 0)
    if soft_temperature is None:
        target = losses.detach().argmin(dim=1)
        selection = F.cross_entropy(sel, target)
    else:
        q = F.softmax(-losses.detach() / soft_temperature, dim=1)
        selection = -(q * F.log_softmax(sel, dim=1)).sum(1).mean()
    rough_loss = F.cross_entropy(rough, y)
    return weights[0] * expert + weights[1] * selection + weights[2] * rough_loss, losses


def grads(module):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("lgm", ["best", "soft"])
def test_loss_and_every_gradient_match_the_reference(epsilon, lgm):
    model = make_model()
    ref_model = copy.deepcopy(model)
    x, y = torch.randn(9, D_IN), torch.randint(0, C, (9,))
    lam = (0.7, 1.3, 0.4)
    labeler = LabelGenerator("soft", temperature=0.5) if lgm == "soft" else LabelGenerator("best")
    criterion = CoELoss(
        BalancedTransportWeighter(3, epsilon=epsilon),
        labeler,
        expert_weight=lam[0],
        selection_weight=lam[1],
        rough_weight=lam[2],
    )
    loss, info = criterion(model(x), y)
    loss.backward()
    ref, ref_losses = reference_loss(ref_model, x, y, epsilon, lam, soft_temperature=0.5 if lgm == "soft" else None)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(info["per_sample_losses"], ref_losses.detach())
    info = scalar_info(info)  # the metrics are tensors; scalar_info gives the floats
    assert info["loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    assert info["expert_loss"] + info["selection_loss"] + info["rough_loss"] == pytest.approx(info["loss"], rel=1e-5)
    g, g_ref = grads(model), grads(ref_model)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], msg=n)
    # both heads and the shared backbone get gradient
    for n in ("delegator.selection_head.weight", "delegator.rough_head.weight", "delegator.backbone.0.weight"):
        assert g[n].abs().sum() > 0, n


class GradWeighter(nn.Module):
    """A WGM whose weights carry a gradient (to a parameter of its own): the loss must detach them."""

    def __init__(self, k):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(0.7))
        self.inputs_required_grad = []

    def forward(self, selection_logits):
        self.inputs_required_grad.append(selection_logits.requires_grad)
        return types.SimpleNamespace(weights=torch.softmax(selection_logits / self.temperature, dim=1))


class GradLabeler(nn.Module):
    """An LGM whose targets carry a gradient (to a parameter of its own): the loss must detach them."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(0.5))
        self.inputs_required_grad = []

    def forward(self, losses):
        self.inputs_required_grad.append(losses.requires_grad)
        probs = torch.softmax(-losses / self.temperature, dim=1)
        return types.SimpleNamespace(probs=probs, index=probs.argmax(dim=1))


def test_weights_and_labels_are_detached_even_when_the_modules_could_carry_gradient():
    """With differentiable WGM weights and LGM targets, every gradient still equals that of the formula with the
    weights and targets held constant, and neither module receives gradient or a tensor that requires it."""
    model = make_model()
    ref_model = copy.deepcopy(model)
    x, y = torch.randn(7, D_IN), torch.randint(0, C, (7,))
    weighter, labeler = GradWeighter(3), GradLabeler()
    loss, _ = CoELoss(weighter, labeler)(model(x), y)
    loss.backward()
    assert weighter.inputs_required_grad == [False] and labeler.inputs_required_grad == [False]
    assert weighter.temperature.grad is None and labeler.temperature.grad is None

    # reference: the documented formula with the same weights and targets as constants, written by hand
    d = ref_model.delegator(x)
    outputs = torch.stack([e(x) for e in ref_model.experts])  # [K, B, C]
    losses = torch.stack([F.cross_entropy(outputs[j], y, reduction="none") for j in range(3)], dim=1)  # [B, K]
    with torch.no_grad():
        w = torch.softmax(d.selection_logits / 0.7, dim=1)
        q = torch.softmax(-losses / 0.5, dim=1)
    expert = sum((w[:, j] * losses[:, j]).sum() / w[:, j].sum() for j in range(3))
    selection = -(q * F.log_softmax(d.selection_logits, dim=1)).sum(1).mean()
    ref = expert + selection + F.cross_entropy(d.rough_logits, y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    g, g_ref = grads(model), grads(ref_model)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], msg=n)


def test_hard_partition_expert_gradient_comes_only_from_its_samples():
    model = make_model(k=3)
    x, y = torch.randn(9, D_IN), torch.randint(0, C, (9,))
    weighter = BalancedTransportWeighter(3, epsilon=0.0)
    out = model(x)
    assignment = weighter(out.selection_logits.detach()).assignment
    criterion = CoELoss(weighter, LabelGenerator(), selection_weight=0.0, rough_weight=0.0, expert_weight=2.0)
    loss, _ = criterion(out, y)
    loss.backward()
    for k in range(3):
        alone = copy.deepcopy(model.experts[k])
        alone.zero_grad()
        mine = assignment == k
        (2.0 * F.cross_entropy(alone(x[mine]), y[mine])).backward()
        for p, q in zip(model.experts[k].parameters(), alone.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
    # with only the expert loss, the delegator gets no gradient (the weights are detached)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.delegator.parameters())


def test_expert_with_no_sample_gets_zero_gradient_and_the_loss_stays_finite():
    model = make_model(k=3)
    x, y = torch.randn(2, D_IN), torch.randint(0, C, (2,))  # B = 2 < K = 3: one expert receives nothing
    criterion = CoELoss(BalancedTransportWeighter(3, epsilon=0.0), LabelGenerator())
    loss, info = criterion(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    empty = int((info["wgm_load"] == 0).nonzero()[0])
    assert info["expert_losses"][empty] == 0
    for p in model.experts[empty].parameters():
        assert p.grad is not None and p.grad.abs().sum() == 0  # in the graph, with a zero gradient
    other = 1 - empty if empty < 2 else 0
    assert model.experts[other][0].weight.grad.abs().sum() > 0


def test_selection_loss_gradient_reaches_only_the_delegator():
    model = make_model()
    x, y = torch.randn(6, D_IN), torch.randint(0, C, (6,))
    criterion = CoELoss(BalancedTransportWeighter(3), LabelGenerator(), expert_weight=0.0, rough_weight=0.0)
    loss, _ = criterion(model(x), y)
    loss.backward()
    assert model.delegator.selection_head.weight.grad.abs().sum() > 0
    assert model.delegator.rough_head.weight.grad is None
    assert all(p.grad.abs().sum() == 0 for p in model.experts.parameters())


def test_reduction_balance_and_metrics():
    model = make_model()
    x, y = torch.randn(8, D_IN), torch.randint(0, C, (8,))
    out = model(x)
    base = CoELoss(BalancedTransportWeighter(3), LabelGenerator(), selection_weight=0.0, rough_weight=0.0)
    mean = CoELoss(
        BalancedTransportWeighter(3), LabelGenerator(), selection_weight=0.0, rough_weight=0.0, expert_reduction="mean"
    )
    torch.testing.assert_close(mean(out, y)[0], base(out, y)[0] / 3)
    balanced = CoELoss(BalancedTransportWeighter(3), LabelGenerator(), balance_weight=0.5)
    plain = CoELoss(BalancedTransportWeighter(3), LabelGenerator())
    loss_b, info_b = balanced(out, y)
    torch.testing.assert_close(loss_b, plain(out, y)[0] + 0.5 * load_balance_cv2(out.selection_logits))
    assert info_b["balance_loss"] == pytest.approx(float(0.5 * load_balance_cv2(out.selection_logits.detach())))

    _, info = plain(out, y)
    choice = out.selection_logits.argmax(1)
    assert info["load"].tolist() == torch.bincount(choice, minlength=3).tolist()
    assert info["wgm_load"].sum() == 8 and info["label_load"].sum() == 8
    losses = info["per_sample_losses"]
    assert info["label_load"].tolist() == torch.bincount(losses.argmin(1), minlength=3).tolist()
    assert float(info["agreement"]) == pytest.approx(float((choice == losses.argmin(1)).float().mean()))
    correct = out.expert_outputs.argmax(2) == y  # [K, B]
    assert float(info["oracle_accuracy"]) == pytest.approx(float(correct.any(0).float().mean()))
    assert float(info["routed_accuracy"]) == pytest.approx(float(correct[choice, torch.arange(8)].float().mean()))
    assert 0.0 <= info["assignment_entropy"] <= 1.0


def test_no_rough_head_and_custom_per_sample_loss():
    model = make_model()
    x, y = torch.randn(5, D_IN), torch.randint(0, C, (5,))
    out = model(x)
    no_rough = CoETrainOutput(out.selection_logits, None, out.expert_outputs)
    _, info = CoELoss(BalancedTransportWeighter(3), LabelGenerator())(no_rough, y)
    assert "rough_loss" not in info

    def focal(logits, target):
        p = F.softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
        return -((1 - p) ** 2) * p.log()

    _, info = CoELoss(BalancedTransportWeighter(3), LabelGenerator(), per_sample_loss=focal)(out, y)
    torch.testing.assert_close(info["per_sample_losses"][:, 2], focal(out.expert_outputs[2], y).detach())


def test_bad_input():
    model = make_model()
    x, y = torch.randn(4, D_IN), torch.randint(0, C, (4,))
    out = model(x)
    wgm, lgm = BalancedTransportWeighter(3), LabelGenerator()
    with pytest.raises(ValueError, match="per_sample_loss must return a Tensor\\[B\\]"):
        CoELoss(wgm, lgm, per_sample_loss=lambda o, t: F.cross_entropy(o, t))(out, y)
    with pytest.raises(ValueError, match="per_sample_loss must return"):
        CoELoss(wgm, lgm, per_sample_loss=lambda o, t: torch.zeros(4, 2))(out, y)
    with pytest.raises(ValueError, match="target must be batch-first with B=4"):
        CoELoss(wgm, lgm)(out, y[:3])
    with pytest.raises(TypeError, match="target"):
        CoELoss(wgm, lgm)(out, [0, 1, 2, 3])
    with pytest.raises(TypeError, match="CoETrainOutput"):
        CoELoss(wgm, lgm)(model.eval()(x), y)
    seq = CoETrainOutput(out.selection_logits, out.rough_logits, torch.randn(3, 4, 6, C))
    with pytest.raises(ValueError, match=r"target has one label per sample \(shape \(4,\)\), but the logits are per"):
        CoELoss(wgm, lgm)(seq, y)
    with pytest.raises(ValueError, match="rough_target"):
        CoELoss(wgm, lgm, per_sample_loss=lambda o, t: o.mean((1, 2)))(seq, torch.zeros(4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="rough_target"):
        CoELoss(wgm, lgm)(out, y, rough_target=torch.randn(4))
    with pytest.raises(ValueError, match="expert_outputs"):
        CoELoss(wgm, lgm)(CoETrainOutput(out.selection_logits, None, out.expert_outputs[:2]), y)
    for name in ("expert_weight", "selection_weight", "rough_weight", "balance_weight"):
        with pytest.raises(ValueError, match=name):
            CoELoss(wgm, lgm, **{name: -1.0})
    with pytest.raises(ValueError, match="expert_reduction"):
        CoELoss(wgm, lgm, expert_reduction="max")
    with pytest.raises(ValueError, match="sync"):
        CoELoss(wgm, lgm, sync="always")
    with pytest.raises(TypeError, match="per_sample_loss"):
        CoELoss(wgm, lgm, per_sample_loss="ce")


def test_the_metrics_check_what_no_component_vouched_for():
    """The info metrics re-check nothing that pycoe's WGM and LGM or the default loss checked already (each check
    of a value waits for a GPU), but behind a user's WGM, LGM or per-sample loss they check as before."""
    model = make_model()
    x, y = torch.randn(6, D_IN), torch.randint(0, C, (6,))
    out = model(x)
    wgm, lgm = BalancedTransportWeighter(3), LabelGenerator()
    _, trusted = CoELoss(wgm, lgm, balance_weight=0.5)(out, y)
    _, wrapped = CoELoss(lambda s: wgm(s), lambda losses: lgm(losses), balance_weight=0.5)(out, y)
    assert trusted.keys() == wrapped.keys()
    for name in trusted:
        torch.testing.assert_close(trusted[name], wrapped[name], rtol=0, atol=0, equal_nan=True)

    nan = CoETrainOutput(torch.full((6, 3), float("nan")), out.rough_logits, out.expert_outputs)
    with pytest.raises(ValueError, match="selection_logits must be finite, but it contains NaN"):
        CoELoss(wgm, lgm)(nan, y)  # pycoe's WGM
    uniform = lambda s: types.SimpleNamespace(weights=torch.ones_like(s))  # noqa: E731
    with pytest.raises(ValueError, match="selection_logits must be finite, but it contains NaN"):
        CoELoss(uniform, lgm)(nan, y)  # the metrics, behind a WGM of the user's

    def off_range(losses):
        return types.SimpleNamespace(probs=torch.full_like(losses, 1 / 3), index=torch.full((len(losses),), 3))

    with pytest.raises(ValueError, match=r"index entries must lie in \[-1 \(exited\), 3\)"):
        CoELoss(wgm, off_range)(out, y)

    bad = torch.tensor([0, 1, 2, C, 0, 1])
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 4\)"):
        CoELoss(wgm, lgm)(out, bad)  # the default loss checks the target, for the rough head too
    squares = lambda o, t: o.square().mean(1)  # noqa: E731  (a per-sample loss that never reads the target)
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 4\)"):
        CoELoss(wgm, lgm, per_sample_loss=squares)(out, bad)  # the rough head's check
    no_rough = CoETrainOutput(out.selection_logits, None, out.expert_outputs)
    with pytest.raises(ValueError, match=r"target entries must lie in \[0, 4\)"):
        CoELoss(wgm, lgm, per_sample_loss=squares)(no_rough, bad)  # the oracle accuracy's check


def test_scalar_info_turns_the_scalar_tensors_into_floats():
    info = {"loss": torch.tensor(2.5), "load": torch.tensor([3, 5]), "count": 4, "agreement": torch.tensor([0.25])}
    assert scalar_info(info) == {"loss": 2.5, "count": 4.0, "agreement": 0.25}
    assert all(type(v) is float for v in scalar_info(info).values())
    assert scalar_info({}) == {}
    with pytest.raises(TypeError, match="info must be a mapping"):
        scalar_info([("loss", 1.0)])


def test_balance_term_gradient_reaches_the_selection_logits():
    """Its value alone would not catch a balance term computed on detached selection logits: its gradient does."""
    model = make_model()
    x, y = torch.randn(8, D_IN), torch.randint(0, C, (8,))
    out = model(x)
    sel = out.selection_logits
    only_balance = CoELoss(
        BalancedTransportWeighter(3),
        LabelGenerator(),
        expert_weight=0.0,
        selection_weight=0.0,
        rough_weight=0.0,
        balance_weight=0.5,
    )
    (grad,) = torch.autograd.grad(only_balance(out, y)[0], sel)
    (expected,) = torch.autograd.grad(0.5 * load_balance_cv2(sel), sel)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(grad, expected)


def test_token_logits_default_loss_and_labels_carried_by_the_output():
    """The default per-sample loss is token cross-entropy for [K, B, T, V] outputs (mean over real tokens), and
    criterion(output) takes the target from output.labels."""
    from reference.losses import per_sample_cross_entropy as reference

    k, b, t, v = 3, 5, 4, 6
    sel = torch.randn(b, k, requires_grad=True)
    expert_outputs = torch.randn(k, b, t, v, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    labels[1, 2:] = -100
    out = CoETrainOutput(sel, None, expert_outputs, labels)
    criterion = CoELoss(BalancedTransportWeighter(k), LabelGenerator())
    loss, info = criterion(out)
    expected = torch.stack([reference(expert_outputs[j].detach(), labels) for j in range(k)], dim=1)
    torch.testing.assert_close(info["per_sample_losses"], expected)
    torch.testing.assert_close(loss, criterion(out, labels)[0])
    with pytest.raises(ValueError, match=r"labels has one label per sample \(shape \(5,\)\), but the logits are"):
        criterion(CoETrainOutput(sel, None, expert_outputs, labels[:, 0]))
    class_out = CoETrainOutput(sel, None, expert_outputs[:, :, 0], labels)  # class logits [K, B, V], token labels
    with pytest.raises(ValueError, match=r"labels has shape \(5, 4\) \(labels per token\), but the experts return"):
        criterion(class_out)
    with pytest.raises(ValueError, match=r"CoELoss needs a target: pass it .*batch\['labels'\]"):
        criterion(CoETrainOutput(sel, None, expert_outputs))
    with pytest.raises(ValueError, match=r"the experts return one value per sample \(outputs \(3, 5\)\)"):
        criterion(CoETrainOutput(sel, None, expert_outputs[:, :, 0, 0]), labels)


def test_rough_head_and_experts_must_agree_on_the_classes():
    """A rough head of 5 classes beside experts of 3 would train silently on the same target."""
    backbone = nn.Sequential(nn.Linear(D_IN, 12), nn.Tanh())
    delegator = Delegator(backbone, 2, num_classes=5, feature_dim=12, classifier=None)
    model = CoE(delegator, ExpertPool.from_template(nn.Linear(D_IN, 3), 2)).train()
    x, y = torch.randn(6, D_IN), torch.randint(0, 3, (6,))
    criterion = CoELoss(BalancedTransportWeighter(2), LabelGenerator())
    with pytest.raises(ValueError, match=r"the rough head predicts 5 classes but the experts return 3 values"):
        criterion(model(x), y)
    # with its own target the rough head may have another task
    loss, _ = criterion(model(x), y, rough_target=torch.randint(0, 5, (6,)))
    assert torch.isfinite(loss)


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU())
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def test_experts_copied_from_a_template_the_delegator_stripped_are_refused():
    """ExpertPool.from_template(m) after Delegator(m): the experts would return 16 features, and cross-entropy on
    16 "classes" against 3-class targets would train silently."""
    m = _Classifier()
    Delegator(m, 2, num_classes=3)  # strips m.fc in place
    with pytest.raises(ValueError, match=r"classifier .fc. a Delegator replaced.*Build the experts before the"):
        ExpertPool.from_template(m, 2)
    with pytest.raises(ValueError, match=r"experts\[1\] is \(a copy of\) a model whose classifier 'fc'"):
        ExpertPool([_Classifier(), copy.deepcopy(m)])
    # the right orders work
    m = _Classifier()
    experts = ExpertPool.from_template(m, 2)
    model = CoE(Delegator(m, 2, num_classes=3), experts)
    assert model(torch.randn(4, D_IN)).expert_outputs.shape == (2, 4, 3)
    m = _Classifier()
    CoE(Delegator(copy.deepcopy(m), 2, num_classes=3), ExpertPool.from_template(m, 2))
