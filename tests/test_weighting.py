"""BalancedTransportWeighter (pycoe's WGM): assignment vs independent brute force, weights, transforms, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.transport import enumerate_optimum, lsa_optimum, near_equal

from pycoe.routing.weighting import BalancedTransportWeighter, WeightingOutput


# ---------------------------------------------------------------- independent references
def transformed(logits, score):
    x = logits.double()
    if score == "log_softmax":
        return x - torch.logsumexp(x, dim=1, keepdim=True)
    if score == "softmax":
        e = torch.exp(x - x.max(dim=1, keepdim=True).values)
        return e / e.sum(dim=1, keepdim=True)
    return x


def objective(scores, assignment):
    s = torch.as_tensor(scores).double()
    return float(s[torch.arange(s.shape[0]), assignment.cpu()].sum())


# ---------------------------------------------------------------- correctness
@pytest.mark.parametrize("score", ["log_softmax", "softmax", "logits"])
@pytest.mark.parametrize("n,k", [(6, 3), (7, 2), (5, 5), (3, 4), (6, 1)])
def test_assignment_matches_enumeration_on_tiny_instances(score, n, k):
    g = torch.Generator().manual_seed(n * 10 + k)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    out = BalancedTransportWeighter(k, score=score)(logits)
    s = transformed(logits, score)
    assert objective(s, out.assignment) == pytest.approx(enumerate_optimum(s), abs=1e-9)
    assert out.load.tolist() == near_equal(n, k)
    assert torch.equal(torch.bincount(out.assignment, minlength=k), out.load)


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 40),
    k=st.integers(1, 6),
    ties=st.booleans(),
    score=st.sampled_from(["log_softmax", "softmax", "logits"]),
    eps=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
)
def test_weighter_matches_hungarian_brute_force(seed, n, k, ties, score, eps):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many tied optima, the objective must still be optimal
        logits = torch.randint(-2, 3, (n, k), generator=g).float()
    else:
        logits = torch.randn(n, k, generator=g) * 3
    out = BalancedTransportWeighter(k, epsilon=eps, score=score)(logits)
    assert isinstance(out, WeightingOutput)
    assert out.assignment.dtype == torch.long and out.assignment.shape == (n,)
    s = transformed(logits, score)
    best, _ = lsa_optimum(s)
    assert objective(s, out.assignment) == pytest.approx(best, rel=1e-5, abs=1e-4)
    assert out.load.tolist() == near_equal(n, k)
    expected_w = torch.full((n, k), eps)
    expected_w[torch.arange(n), out.assignment] = 1.0
    assert torch.equal(out.weights, expected_w)
    assert out.mean_score.item() == pytest.approx(best / n, rel=1e-4, abs=1e-4)


def test_epsilon_weights_and_dtype_device():
    logits = torch.randn(9, 3, dtype=torch.float64)
    hard = BalancedTransportWeighter(3, epsilon=0.0)(logits)
    assert hard.weights.dtype == torch.float64
    assert set(hard.weights.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hard.weights.sum(1), torch.ones(9, dtype=torch.float64))
    soft = BalancedTransportWeighter(3, epsilon=0.25)(logits)
    assert torch.equal(soft.assignment, hard.assignment)
    assert torch.allclose(soft.weights, hard.weights * 0.75 + 0.25)
    flat = BalancedTransportWeighter(3, epsilon=1)(logits)
    assert torch.equal(flat.weights, torch.ones(9, 3, dtype=torch.float64))


def test_no_gradient_through_weights():
    logits = torch.randn(8, 4, requires_grad=True)
    out = BalancedTransportWeighter(4, epsilon=0.1)(logits)
    assert not out.weights.requires_grad and not out.mean_score.requires_grad
    # If the weights carried history, d/dlogits of sum(w * logits) would differ from w.
    (out.weights * logits).sum().backward()
    assert torch.equal(logits.grad, out.weights)


def test_log_softmax_and_logits_give_the_same_assignment_softmax_may_not():
    # log_softmax(z) = z - logsumexp(z) per row: a row constant does not change which assignment is optimal.
    for seed in range(5):
        z = torch.randn(30, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
        a = BalancedTransportWeighter(4, score="log_softmax")(z)
        b = BalancedTransportWeighter(4, score="logits")(z)
        assert torch.equal(a.assignment, b.assignment)
        assert a.mean_score.item() != pytest.approx(b.mean_score.item())
    # Probabilities are a different objective: find an instance where the two optima differ, and check
    # that each setting returns the optimum of its own objective there.
    g = torch.Generator().manual_seed(123)
    found = False
    for _ in range(300):
        z = torch.randn(6, 3, generator=g, dtype=torch.float64) * 3
        lp, pr = transformed(z, "log_softmax"), transformed(z, "softmax")
        _, a_lp = lsa_optimum(lp)
        _, _a_pr = lsa_optimum(pr)
        if objective(pr, torch.from_numpy(a_lp)) < enumerate_optimum(pr) - 1e-6:
            found = True
            break
    assert found, "no instance where probability and log-probability objectives disagree"
    w_sm = BalancedTransportWeighter(3, score="softmax")(z)
    w_lsm = BalancedTransportWeighter(3, score="log_softmax")(z)
    assert objective(pr, w_sm.assignment) == pytest.approx(enumerate_optimum(pr), abs=1e-9)
    assert objective(lp, w_lsm.assignment) == pytest.approx(enumerate_optimum(lp), abs=1e-9)
    assert not torch.equal(w_sm.assignment, w_lsm.assignment)


def test_collapsed_delegator_is_still_balanced():
    # Every sample prefers expert 0: the balanced problem must still spread them evenly.
    logits = torch.zeros(10, 3)
    logits[:, 0] = 5.0
    logits[:, 1] = torch.linspace(0, 1, 10)
    out = BalancedTransportWeighter(3)(logits)
    assert out.load.tolist() == [4, 3, 3]
    assert (out.weights.sum(0) == out.load.float()).all()


def test_batch_smaller_than_experts_and_single_expert():
    out = BalancedTransportWeighter(5)(torch.randn(3, 5))
    assert out.load.tolist() == [1, 1, 1, 0, 0]
    one = BalancedTransportWeighter(1, epsilon=0.3)(torch.randn(4, 1))
    assert torch.equal(one.assignment, torch.zeros(4, dtype=torch.long))
    assert torch.equal(one.weights, torch.ones(4, 1))


def test_global_scope_without_process_group_is_batch_scope():
    z = torch.randn(11, 3)
    a = BalancedTransportWeighter(3, scope="global")(z)
    b = BalancedTransportWeighter(3, scope="batch")(z)
    assert torch.equal(a.assignment, b.assignment) and torch.equal(a.load, b.load)


def test_half_precision_logits():
    z = torch.randn(8, 4).to(torch.bfloat16)
    out = BalancedTransportWeighter(4, epsilon=0.1)(z)
    assert out.weights.dtype == torch.bfloat16
    assert out.load.tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "greedy"])
def test_every_method_is_feasible(method):
    z = torch.randn(37, 4)
    out = BalancedTransportWeighter(4, method=method)(z)
    assert out.load.tolist() == near_equal(37, 4)
    if method == "exact":
        assert objective(transformed(z, "log_softmax"), out.assignment) == pytest.approx(
            lsa_optimum(transformed(z, "log_softmax"))[0], rel=1e-5
        )


# ---------------------------------------------------------------- dataset scale
@pytest.mark.parametrize("score", ["log_softmax", "softmax", "logits"])
def test_partition_dataset_tensor_and_numpy(score):
    z = torch.randn(90, 3, dtype=torch.float64)
    w = BalancedTransportWeighter(3, score=score)
    a_t = w.partition_dataset(z)
    a_n = w.partition_dataset(z.numpy())
    assert a_t.dtype == torch.long and a_t.shape == (90,)
    assert torch.equal(a_t.cpu(), a_n.cpu())
    s = transformed(z, score)
    assert objective(s, a_t) == pytest.approx(lsa_optimum(s)[0], rel=1e-9)
    assert torch.bincount(a_t, minlength=3).tolist() == [30, 30, 30]
    # The dataset solve of a batch equals the per-batch forward on it.
    assert objective(s, w(z).assignment) == pytest.approx(objective(s, a_t), rel=1e-9)


def test_partition_dataset_custom_capacities():
    z = np.random.default_rng(0).normal(size=(40, 4))
    caps = [10, 20, 5, 5]
    a = BalancedTransportWeighter(4, score="logits").partition_dataset(z, capacities=caps)
    assert torch.bincount(a, minlength=4).tolist() == caps
    assert objective(z, a) == pytest.approx(lsa_optimum(z, caps)[0], rel=1e-9)


def test_weights_for_matches_forward_and_per_epoch_lookup():
    w = BalancedTransportWeighter(3, epsilon=0.2)
    z = torch.randn(12, 3, dtype=torch.float64)
    out = w(z)
    assert torch.equal(w.weights_for(out.assignment, dtype=torch.float64), out.weights)
    partition = w.partition_dataset(torch.randn(50, 3))
    idx = torch.tensor([3, 17, 42])
    lookup = w.weights_for(partition[idx])
    assert lookup.dtype == torch.get_default_dtype()
    for row, i in enumerate(idx.tolist()):
        expected = [1.0 if j == partition[i].item() else 0.2 for j in range(3)]
        assert lookup[row].tolist() == pytest.approx(expected)
    assert w.weights_for(torch.zeros(0, dtype=torch.long)).shape == (0, 3)


def test_weights_for_bad_input():
    w = BalancedTransportWeighter(3)
    with pytest.raises(ValueError, match="assignment entries"):
        w.weights_for(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="assignment entries"):
        w.weights_for(torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="int64"):
        w.weights_for(torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="1 dimensions"):
        w.weights_for(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        w.weights_for(torch.tensor([0, 1]), dtype=torch.long)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        w.weights_for(torch.tensor([0, 1]), dtype="float32")
    with pytest.raises(TypeError, match="assignment must be a torch.Tensor"):
        w.weights_for([0, 1])
    with pytest.raises(
        ValueError, match=r"assignment entries must lie in \[0, 3\) \(num_experts=3\), got range \[0, 3\]"
    ):
        w.weights_for(torch.tensor([0, 3]))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": -2}, "num_experts"),
        ({"num_experts": 3, "epsilon": -0.1}, "epsilon"),
        ({"num_experts": 3, "epsilon": 1.5}, "epsilon"),
        ({"num_experts": 3, "epsilon": float("nan")}, "epsilon"),
        ({"num_experts": 3, "score": "prob"}, "score"),
        ({"num_experts": 3, "scope": "world"}, "scope"),
        ({"num_experts": 3, "method": "hungarian"}, "method"),
        ({"num_experts": 3, "solver_options": {"max_iter": 10}}, "max_iter is used only by method='sinkhorn'"),
        ({"num_experts": 3, "method": "greedy", "solver_options": {"entropic_reg": 0.1}}, "entropic_reg is used only"),
        ({"num_experts": 3, "method": "sinkhorn", "solver_options": {"entropic_reg": -1}}, "entropic_reg must be"),
        ({"num_experts": 3, "method": "sinkhorn", "solver_options": {"max_iter": 0}}, "max_iter must be"),
        ({"num_experts": 3, "method": "sinkhorn", "solver_options": {"tol": 0.1}}, "unknown solver option 'tol'"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedTransportWeighter(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": 2.0}, "num_experts"),
        ({"num_experts": "4"}, "num_experts"),
        ({"num_experts": None}, "num_experts"),
        ({"num_experts": 3, "epsilon": True}, "epsilon"),
        ({"num_experts": 3, "epsilon": "0.1"}, "epsilon"),
        ({"num_experts": 3, "epsilon": None}, "epsilon"),
        ({"num_experts": 3, "score": 1}, "score"),
        ({"num_experts": 3, "method": None}, "method"),
        ({"num_experts": 3, "scope": True}, "scope"),
        ({"num_experts": 3, "method": "sinkhorn", "solver_options": [("max_iter", 5)]}, "solver_options"),
        ({"num_experts": 3, "method": "sinkhorn", "solver_options": {"entropic_reg": "tight"}}, "entropic_reg"),
        ({"num_experts": 3, "method": "sinkhorn", "solver_options": {"max_iter": 2.5}}, "max_iter"),
    ],
)
def test_constructor_arguments_of_wrong_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        BalancedTransportWeighter(**kwargs)


def test_solver_options_reach_the_solver(monkeypatch):
    import pycoe.routing.weighting as weighting

    calls = []
    original = weighting.balanced_assignment

    def spy(*args, **kwargs):
        calls.append((args[1:], kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(weighting, "balanced_assignment", spy)
    w = BalancedTransportWeighter(3, method="sinkhorn", solver_options={"entropic_reg": 0.02, "max_iter": 7})
    assert "solver_options={'entropic_reg': 0.02, 'max_iter': 7}" in repr(w)
    z = torch.randn(9, 3, dtype=torch.float64)
    out = w(z)
    w.partition_dataset(z)
    assert calls == [((None, "sinkhorn"), {"entropic_reg": 0.02, "max_iter": 7})] * 2
    expected = original(transformed(z, "log_softmax"), None, "sinkhorn", entropic_reg=0.02, max_iter=7)
    assert torch.equal(out.assignment, expected)
    assert BalancedTransportWeighter(3).solver_options == {}


def test_bad_logits():
    w = BalancedTransportWeighter(3)
    with pytest.raises(TypeError, match="selection_logits"):
        w(np.zeros((4, 3)))
    with pytest.raises(TypeError, match="floating"):
        w(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 dimensions"):
        w(torch.zeros(4, 3, 1))
    with pytest.raises(ValueError, match="num_experts=3"):
        w(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        w(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="infinite"):
        w(torch.tensor([[0.0, float("-inf"), 1.0]]))
    with pytest.raises(ValueError, match="at least one sample"):
        w(torch.zeros(0, 3))


def test_bad_partition_dataset_input():
    w = BalancedTransportWeighter(3)
    with pytest.raises(TypeError, match="scores"):
        w.partition_dataset([[0.0, 1.0, 2.0]])
    with pytest.raises(TypeError, match="floating"):
        w.partition_dataset(np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="num_experts=3"):
        w.partition_dataset(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="finite"):
        w.partition_dataset(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="at least one sample"):
        w.partition_dataset(np.zeros((0, 3)))


def test_partition_dataset_bad_capacities_are_reported():
    w = BalancedTransportWeighter(3)
    with pytest.raises(ValueError, match="capacities"):
        w.partition_dataset(np.zeros((6, 3)), capacities=[1, 2, 2])
    with pytest.raises(ValueError, match="capacities"):
        w.partition_dataset(np.zeros((6, 3)), capacities=[-1, 4, 3])


# ---------------------------------------------------------------- boundaries
def test_tied_logits_still_give_exact_capacities():
    z = torch.zeros(7, 3)  # every assignment is optimal
    out = BalancedTransportWeighter(3)(z)
    assert out.load.tolist() == [3, 2, 2]
    assert torch.equal(out.assignment, BalancedTransportWeighter(3)(z.clone()).assignment)  # deterministic
    assert out.mean_score.item() == pytest.approx(-np.log(3))


def test_one_sample_many_experts():
    out = BalancedTransportWeighter(4, epsilon=0.5)(torch.tensor([[0.0, 3.0, 1.0, 2.0]]))
    assert out.assignment.tolist() == [0]  # near-equal capacities for B=1 are (1, 0, 0, 0)
    assert out.load.tolist() == [1, 0, 0, 0]
    assert out.weights.tolist() == [[1.0, 0.5, 0.5, 0.5]]


@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_epsilon_at_its_bounds(eps):
    out = BalancedTransportWeighter(2, epsilon=eps)(torch.randn(4, 2))
    assert set(out.weights.flatten().tolist()) == ({0.0, 1.0} if eps == 0.0 else {1.0})


def test_transform_checks_its_input():
    w = BalancedTransportWeighter(3, score="softmax")
    assert torch.allclose(w.transform(torch.zeros(2, 3)), torch.full((2, 3), 1 / 3))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        w.transform([[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match=r"logits must have shape \[B, num_experts=3\]"):
        w.transform(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits must be finite"):
        w.transform(torch.tensor([[0.0, float("inf"), 1.0]]))
    with pytest.raises(TypeError, match="capacities must be None, an int or a length-K sequence"):
        w.partition_dataset(torch.zeros(6, 3), capacities="abc")
