"""LabelGenerator (pycoe's LGM): each mode on hand-made and random losses, ties, balance, errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.transport import lsa_optimum, near_equal

from pycoe.routing.labels import LabelGenerator, LabelOutput, best_expert


def min_total_loss(losses):
    """Minimal total loss over near-equal balanced assignments (Hungarian on replicated columns)."""
    return -lsa_optimum(-np.asarray(losses, dtype=np.float64))[0]


def test_best_picks_argmin_with_ties_to_lowest_index():
    losses = torch.tensor(
        [
            [0.3, 0.1, 0.2],
            [0.5, 0.5, 0.5],  # all tied -> 0
            [0.9, 0.2, 0.2],  # tie between 1 and 2 -> 1
            [0.4, 0.7, 0.4],  # tie between 0 and 2 -> 0
            [2.0, 1.0, -1.0],
        ]
    )
    out = LabelGenerator("best")(losses)
    assert isinstance(out, LabelOutput)
    assert out.index.tolist() == [1, 0, 1, 0, 2]
    assert out.index.dtype == torch.long
    assert torch.equal(out.probs, torch.eye(3)[out.index])


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 20), k=st.integers(1, 6))
def test_best_expert_agrees_with_a_python_loop(seed, n, k):
    g = torch.Generator().manual_seed(seed)
    losses = torch.randint(0, 3, (n, k), generator=g).double()  # many ties
    expected = []
    for row in losses.tolist():
        m = min(row)
        expected.append(next(j for j, v in enumerate(row) if v == m))
    assert best_expert(losses).tolist() == expected
    assert LabelGenerator("best")(losses).index.tolist() == expected


@pytest.mark.parametrize("temperature", [0.1, 1.0, 7.0])
def test_soft_is_softmax_of_negative_loss_over_temperature(temperature):
    losses = torch.tensor([[0.2, 1.0, 3.0], [2.0, 2.0, 0.5]], dtype=torch.float64)
    out = LabelGenerator("soft", temperature=temperature)(losses)
    for b, row in enumerate(losses.tolist()):
        e = [math.exp(-v / temperature) for v in row]
        for k in range(3):
            assert out.probs[b, k].item() == pytest.approx(e[k] / sum(e), rel=1e-12)
    assert out.index.tolist() == [0, 2]
    assert torch.allclose(out.probs.sum(1), torch.ones(2, dtype=torch.float64))


def test_soft_temperature_limits():
    losses = torch.tensor([[0.2, 1.0, 3.0]])
    cold = LabelGenerator("soft", temperature=1e-3)(losses).probs
    hot = LabelGenerator("soft", temperature=1e6)(losses).probs
    assert torch.allclose(cold, torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(hot, torch.full((1, 3), 1 / 3), atol=1e-5)


def test_balanced_cannot_collapse_where_best_does():
    # Expert 0 is the best for every sample: "best" collapses, "balanced" spreads the labels evenly.
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(12, 3, generator=g) + torch.tensor([0.0, 2.0, 2.0])
    best = LabelGenerator("best")(losses)
    bal = LabelGenerator("balanced")(losses)
    assert torch.bincount(best.index, minlength=3).tolist() == [12, 0, 0]
    assert torch.bincount(bal.index, minlength=3).tolist() == [4, 4, 4]
    assert torch.equal(bal.probs, torch.eye(3)[bal.index])
    chosen = losses[torch.arange(12), bal.index].double().sum().item()
    assert chosen == pytest.approx(min_total_loss(losses), rel=1e-6)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 30), k=st.integers(1, 5), ties=st.booleans())
def test_balanced_is_optimal_and_balanced(seed, n, k, ties):
    g = torch.Generator().manual_seed(seed)
    losses = torch.randint(0, 3, (n, k), generator=g).double() if ties else torch.rand(n, k, generator=g).double()
    out = LabelGenerator("balanced")(losses)
    assert torch.bincount(out.index, minlength=k).tolist() == near_equal(n, k)
    chosen = losses[torch.arange(n), out.index].sum().item()
    assert chosen == pytest.approx(min_total_loss(losses), abs=1e-9)


@pytest.mark.parametrize("mode", ["best", "soft", "balanced"])
def test_outputs_are_detached_and_deterministic(mode):
    losses = torch.rand(9, 3, requires_grad=True)
    lgm = LabelGenerator(mode, temperature=0.5) if mode == "soft" else LabelGenerator(mode)
    a, b = lgm(losses), lgm(losses)
    assert not a.probs.requires_grad and not a.index.requires_grad
    assert torch.equal(a.probs, b.probs) and torch.equal(a.index, b.index)
    assert a.probs.shape == (9, 3) and a.index.shape == (9,)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "argmin"}, "mode"),
        ({"mode": "soft", "temperature": 0.0}, "temperature"),
        ({"mode": "soft", "temperature": -1.0}, "temperature"),
        ({"mode": "soft", "temperature": float("inf")}, "temperature"),
        ({"mode": "soft", "temperature": float("nan")}, "temperature"),
        ({"mode": "balanced", "method": "lp"}, "method"),
        ({"mode": "best", "solver_options": {}}, "solver_options is used only by mode='balanced'"),
        ({"mode": "soft", "solver_options": {"max_iter": 3}}, "solver_options is used only by mode='balanced'"),
        ({"mode": "balanced", "solver_options": {"max_iter": 3}}, "max_iter is used only by method='sinkhorn'"),
        ({"mode": "balanced", "method": "sinkhorn", "solver_options": {"max_iter": 0}}, "max_iter must be"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelGenerator(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "soft", "temperature": True}, "temperature"),
        ({"mode": "soft", "temperature": "1"}, "temperature"),
        ({"mode": 1}, "mode"),
        ({"mode": "balanced", "method": "sinkhorn", "solver_options": {"entropic_reg": "x"}}, "entropic_reg"),
        ({"mode": "balanced", "method": "sinkhorn", "solver_options": 0.1}, "solver_options"),
    ],
)
def test_constructor_arguments_of_wrong_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        LabelGenerator(**kwargs)


def test_balanced_solver_options_are_used():
    losses = torch.rand(10, 3, generator=torch.Generator().manual_seed(3)).double()
    lgm = LabelGenerator("balanced", method="sinkhorn", solver_options={"entropic_reg": 0.05, "max_iter": 50})
    from pycoe.routing.transport import balanced_assignment

    expected = balanced_assignment(-losses, None, "sinkhorn", entropic_reg=0.05, max_iter=50)
    assert torch.equal(lgm(losses).index, expected)
    assert "solver_options=" in repr(lgm)


def test_best_expert_bad_input():
    with pytest.raises(TypeError, match="losses must be a torch.Tensor"):
        best_expert([[0.1, 0.2]])
    with pytest.raises(ValueError, match="losses must have 2 dimensions"):
        best_expert(torch.zeros(3))
    with pytest.raises(ValueError, match="K >= 1"):
        best_expert(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="losses must be finite, but it contains NaN"):
        best_expert(torch.tensor([[0.1, float("nan")]]))
    assert best_expert(torch.zeros(0, 3)).shape == (0,)


def test_boundaries_ties_and_single_sample():
    tied = torch.zeros(5, 3)
    assert LabelGenerator("best")(tied).index.tolist() == [0] * 5  # ties: lowest expert index
    soft = LabelGenerator("soft", temperature=0.3)(tied).probs
    assert torch.allclose(soft, torch.full((5, 3), 1 / 3))
    bal = LabelGenerator("balanced")(tied).index
    assert torch.bincount(bal, minlength=3).tolist() == [2, 2, 1]  # exact near-equal loads under full ties
    one = LabelGenerator("balanced")(torch.tensor([[0.5, 0.1, 0.3]]))
    assert one.index.tolist() == [0]  # B=1: capacities (1, 0, 0)
    assert LabelGenerator("best")(torch.tensor([[0.5, 0.1, 0.3]])).index.tolist() == [1]
    k1 = LabelGenerator("soft")(torch.randn(4, 1))
    assert k1.index.tolist() == [0] * 4 and torch.equal(k1.probs, torch.ones(4, 1))


def test_bad_losses():
    lgm = LabelGenerator()
    with pytest.raises(TypeError, match="losses"):
        lgm([[0.1, 0.2]])
    with pytest.raises(TypeError, match="floating"):
        lgm(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="2 dimensions"):
        lgm(torch.zeros(2))
    with pytest.raises(ValueError, match="B >= 1"):
        lgm(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="K >= 1"):
        lgm(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="NaN"):
        lgm(torch.tensor([[0.1, float("nan")]]))
    with pytest.raises(ValueError, match="infinite"):
        lgm(torch.tensor([[0.1, float("inf")]]))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "best", "temperature": 1.0}, "temperature"),
        ({"mode": "balanced", "temperature": 0.5}, "temperature"),
        ({"mode": "best", "method": "exact"}, "method"),
        ({"mode": "soft", "method": "sinkhorn"}, "method"),
    ],
)
def test_an_option_the_mode_ignores_is_an_error(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name} is used only by mode="):
        LabelGenerator(**kwargs)


def test_defaults_and_repr_show_what_the_mode_uses():
    assert LabelGenerator("soft").temperature == 1.0
    assert LabelGenerator("balanced").method == "exact"
    assert repr(LabelGenerator("soft", temperature=2.0)) == "LabelGenerator(mode='soft', temperature=2.0)"
    assert repr(LabelGenerator("balanced", method="greedy")) == "LabelGenerator(mode='balanced', method='greedy')"
    assert repr(LabelGenerator()) == "LabelGenerator(mode='best')"
