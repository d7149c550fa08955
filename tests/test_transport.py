"""Tests for pycoe.routing.transport (balanced transportation solver)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.transport import lp_objective, sequential_greedy
from scipy.optimize import linear_sum_assignment

from pycoe.routing.transport import (
    TransportInfeasibleError,
    _solve_balanced_transport,
    approximate,
    balanced_assignment,
    check_solver_options,
    exact,
    near_equal_capacities,
    repair,
)
from pycoe.routing.transport.common import TransportResult

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def objective(scores: np.ndarray, a) -> float:
    a = np.asarray(a)
    return float(np.asarray(scores, dtype=np.float64)[np.arange(len(a)), a].sum())


def assert_feasible(a: torch.Tensor, caps, n: int, k: int) -> None:
    assert a.dtype == torch.long and a.shape == (n,)
    assert int(a.min()) >= 0 and int(a.max()) < k
    np.testing.assert_array_equal(torch.bincount(a.cpu(), minlength=k).numpy(), np.asarray(caps))


def assert_certificate(scores: np.ndarray, res: TransportResult) -> None:
    """Complementary slackness with the returned prices (the optimality certificate)."""
    s = np.asarray(scores, dtype=np.float64)
    p = res.prices.cpu().numpy()
    a = res.assignment.cpu().numpy()
    v = s - p[None, :]
    own = v[np.arange(len(a)), a]
    scale = 1.0 + np.abs(s[np.isfinite(s)]).max() + np.abs(p).max()
    assert (v.max(axis=1) - own).max() <= 1e-9 * scale


@st.composite
def instances(draw, max_n=24, max_k=6, ties=None):
    """(scores [N, K] float64, capacities int64[K]) covering ties, duplicate rows, N < K, zeros."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["continuous", "ties"])) if ties is None else ("ties" if ties else "continuous")
    if kind == "ties":
        s = rng.integers(0, draw(st.integers(1, 3)) + 1, size=(n, k)).astype(np.float64)
    else:
        s = rng.standard_normal((n, k)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if draw(st.booleans()) and n > 1:  # duplicate rows
        rows = rng.integers(0, n, size=n // 2)
        s[rng.permutation(n)[: rows.size]] = s[rows]
    cap_kind = draw(st.sampled_from(["near_equal", "random"]))
    if cap_kind == "near_equal":
        caps = near_equal_capacities(n, k).numpy()
    else:
        caps = rng.multinomial(n, rng.dirichlet(np.ones(k))).astype(np.int64)
    return s, caps


# --------------------------------------------------------------------------------------------------
# near_equal_capacities
# --------------------------------------------------------------------------------------------------


def test_near_equal_capacities_rule():
    assert near_equal_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert near_equal_capacities(8, 4).tolist() == [2, 2, 2, 2]
    assert near_equal_capacities(2, 5).tolist() == [1, 1, 0, 0, 0]
    assert near_equal_capacities(0, 3).tolist() == [0, 0, 0]
    c = near_equal_capacities(1_281_167, 16)
    assert c.dtype == torch.long and int(c.sum()) == 1_281_167 and int(c.max() - c.min()) == 1


@pytest.mark.parametrize("n,k", [(-1, 2), (3, 0)])
def test_near_equal_capacities_bad(n, k):
    with pytest.raises(ValueError, match="^(n|k) must"):
        near_equal_capacities(n, k)


@pytest.mark.parametrize("n,k", [(2.0, 2), (3, 1.5), (True, 2), ("3", 2), (3, None)])
def test_near_equal_capacities_wrong_types(n, k):
    with pytest.raises(TypeError, match="^(n|k) must"):
        near_equal_capacities(n, k)


# --------------------------------------------------------------------------------------------------
# exactness (property tests against the HiGHS LP)
# --------------------------------------------------------------------------------------------------


# The exact method has two routes: an assignment problem on replicated columns for small problems with many
# experts (see exact._assignment_route) and the warm-start + flow-repair route otherwise.
# The property tests run both on the same instances by moving the switch.
ROUTES = {"lsa": (10**9, 10**9), "flow": (0, 0)}


class exact_route:
    def __init__(self, route: str) -> None:
        self.limits = ROUTES[route]

    def __enter__(self) -> None:
        self.saved = (exact._LSA_MAX_N, exact._LSA_SAMPLES_PER_EXPERT)
        exact._LSA_MAX_N, exact._LSA_SAMPLES_PER_EXPERT = self.limits

    def __exit__(self, *exc) -> None:
        exact._LSA_MAX_N, exact._LSA_SAMPLES_PER_EXPERT = self.saved


@pytest.mark.parametrize("route", sorted(ROUTES))
@given(inst=instances())
def test_exact_is_feasible_and_optimal(route, inst):
    s, caps = inst
    n, k = s.shape
    with exact_route(route):
        res = _solve_balanced_transport(s, caps)
    assert_feasible(res.assignment, caps, n, k)
    ref = lp_objective(s, caps)
    assert res.objective == pytest.approx(ref, rel=1e-9, abs=1e-9 * (1 + np.abs(s).max()))
    assert res.objective == pytest.approx(objective(s, res.assignment), rel=1e-12, abs=1e-12)
    assert_certificate(s, res)
    assert res.method == "exact"
    np.testing.assert_array_equal(res.capacities.numpy(), caps)


@pytest.mark.parametrize("route", sorted(ROUTES))
@given(inst=instances(ties=True, max_n=40, max_k=5))
def test_exact_optimal_with_many_ties(route, inst):
    s, caps = inst
    with exact_route(route):
        res = _solve_balanced_transport(s, caps)
    assert_feasible(res.assignment, caps, *s.shape)
    assert res.objective == pytest.approx(lp_objective(s, caps), abs=1e-9)
    assert_certificate(s, res)


def test_default_route_switch():
    rng = np.random.default_rng(0)
    calls = []
    original = exact._lsa_assignment

    def spy(S, caps):
        calls.append(S.shape)
        return original(S, caps)

    exact._lsa_assignment = spy
    try:
        for n, k in [(256, 64), (256, 4), (1100, 64)]:
            s = rng.standard_normal((n, k))
            res = _solve_balanced_transport(s)
            assert_feasible(res.assignment, near_equal_capacities(n, k).numpy(), n, k)
            assert_certificate(s, res)  # feasibility + complementary slackness = optimality
    finally:
        exact._lsa_assignment = original
    assert calls == [(64, 256)]  # only the 256 x 64 problem takes the assignment route


@given(st.integers(1, 7), st.integers(2, 9), st.integers(0, 10_000))
def test_fewer_samples_than_experts(n, k, seed):
    if n >= k:
        n = k - 1 if k > 1 else 1
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, k))
    res = _solve_balanced_transport(s)
    caps = near_equal_capacities(n, k)
    assert_feasible(res.assignment, caps, n, k)
    assert res.objective == pytest.approx(lp_objective(s, caps.numpy()), abs=1e-9)


def test_single_expert_and_single_sample():
    s = torch.randn(7, 1)
    res = _solve_balanced_transport(s)
    assert res.assignment.tolist() == [0] * 7
    assert res.objective == pytest.approx(float(s.double().sum()))
    assert balanced_assignment(np.array([[0.1, 0.5, -2.0]]), [0, 1, 0]).tolist() == [1]
    assert balanced_assignment(np.array([[0.1, 0.5, -2.0]])).tolist() == [0]  # capacities (1, 0, 0)


def test_small_hand_example():
    s = torch.tensor([[3.0, 1.0], [2.0, 0.0], [0.0, 5.0], [1.0, 0.5]])
    res = _solve_balanced_transport(s)
    assert res.assignment.tolist() == [0, 0, 1, 1]
    assert res.objective == pytest.approx(10.5)


# --------------------------------------------------------------------------------------------------
# invariances, determinism
# --------------------------------------------------------------------------------------------------


@given(instances(ties=False), st.integers(0, 10_000))
def test_row_constant_invariance(inst, seed):
    s, caps = inst
    shift = np.random.default_rng(seed).standard_normal(s.shape[0])[:, None] * 10
    a0 = _solve_balanced_transport(s, caps)
    a1 = _solve_balanced_transport(s + shift, caps)
    assert a1.objective == pytest.approx(a0.objective + shift.sum(), rel=1e-9, abs=1e-6)
    if _unique_optimum(s, caps, a0):
        assert torch.equal(a0.assignment, a1.assignment)


@given(instances(ties=False), st.integers(0, 10_000))
def test_column_constant_shifts_objective(inst, seed):
    s, caps = inst
    shift = np.random.default_rng(seed).standard_normal(s.shape[1])[None, :] * 10
    a0 = _solve_balanced_transport(s, caps)
    a1 = _solve_balanced_transport(s + shift, caps)
    assert a1.objective == pytest.approx(a0.objective + float((caps * shift[0]).sum()), rel=1e-9, abs=1e-6)
    if _unique_optimum(s, caps, a0):
        assert torch.equal(a0.assignment, a1.assignment)


@given(instances(), st.integers(0, 10_000))
def test_permutation_equivariance(inst, seed):
    s, caps = inst
    perm = np.random.default_rng(seed).permutation(s.shape[0])
    r0 = _solve_balanced_transport(s, caps)
    r1 = _solve_balanced_transport(s[perm], caps)
    assert r1.objective == pytest.approx(r0.objective, rel=1e-9, abs=1e-9)
    if _unique_optimum(s, caps, r0):
        assert torch.equal(r1.assignment, r0.assignment[torch.from_numpy(perm)])


def _unique_optimum(s, caps, res) -> bool:
    """True when the LP optimum is unique: every other vertex is worse (checked by LP with one cut).

    The optimum is unique iff the best assignment differing from ``res`` in at least one pair is worse;
    on continuous random scores this holds almost surely, so the check only guards degenerate draws.
    """
    n, k = s.shape
    if n == 1 or k == 1:
        return True
    x = np.zeros((n, k))
    x[np.arange(n), res.assignment.numpy()] = 1
    # maximise s.x subject to the transport constraints and sum_{assigned pairs} x <= n - 1
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, vstack

    rows = np.concatenate([np.repeat(np.arange(n), k), n + np.tile(np.arange(k), n)])
    cols = np.concatenate([np.arange(n * k), np.arange(n * k)])
    A = coo_matrix((np.ones(2 * n * k), (rows, cols)), shape=(n + k, n * k))
    b = np.concatenate([np.ones(n), caps.astype(float)])
    cut = coo_matrix(x.reshape(1, -1))
    out = linprog(-s.reshape(-1), A_ub=vstack([cut]), b_ub=[n - 1], A_eq=A, b_eq=b, bounds=(0, None), method="highs")
    if out.status != 0:  # no other feasible vertex
        return True
    return -out.fun < res.objective - 1e-7 * (1 + np.abs(s).max())


@given(instances())
def test_deterministic(inst):
    s, caps = inst
    r0 = _solve_balanced_transport(s, caps)
    r1 = _solve_balanced_transport(s.copy(), caps.copy())
    assert torch.equal(r0.assignment, r1.assignment)
    assert torch.equal(r0.prices, r1.prices)


def test_deterministic_identical_rows_large():
    s = np.tile(np.array([[0.3, 0.1, 0.2, 0.0]]), (5000, 1))
    r0 = _solve_balanced_transport(s)
    r1 = _solve_balanced_transport(s)
    assert torch.equal(r0.assignment, r1.assignment)
    assert_feasible(r0.assignment, near_equal_capacities(5000, 4), 5000, 4)
    assert r0.objective == pytest.approx(1250 * 0.6)


def test_heavy_ties_medium_matches_lp():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 2, size=(1500, 4)).astype(np.float64)
    caps = np.array([600, 500, 300, 100])
    res = _solve_balanced_transport(s, caps)
    assert_feasible(res.assignment, caps, 1500, 4)
    assert res.objective == pytest.approx(lp_objective(s, caps), abs=1e-9)
    assert_certificate(s, res)


# --------------------------------------------------------------------------------------------------
# internals: multi-level warm start, exchange-graph rebuilds, cold start
# --------------------------------------------------------------------------------------------------


def test_multilevel_warm_start_and_rebuilds(monkeypatch):
    """Force the subsample levels and tiny candidate lists (every edge rebuild path runs)."""
    monkeypatch.setattr(exact, "_SUBSAMPLE", 64)
    monkeypatch.setattr(repair, "_CANDIDATES_PER_EXPERT", 1)
    monkeypatch.setattr(repair, "_CANDIDATES_PER_EXCESS", 0)
    monkeypatch.setattr(exact, "_SWEEP_PER_AUGMENTATION", 1)  # stop the sweeps early: more repair work
    rng = np.random.default_rng(0)
    s = np.log(rng.dirichlet(np.ones(5) * 0.5, size=1200))
    caps = np.array([360, 280, 240, 200, 120])
    res = _solve_balanced_transport(s, caps)
    assert_feasible(res.assignment, caps, 1200, 5)
    assert res.objective == pytest.approx(lp_objective(s, caps), rel=1e-10)


@given(instances(max_n=30))
def test_repair_from_cold_start(inst):
    """The successive-shortest-path repair alone (prices 0, plain argmax start) reaches the LP optimum."""
    s, caps = inst
    n, k = s.shape
    if k == 1:
        return
    S = np.ascontiguousarray(s.T)
    p = np.zeros(k)
    a = exact._shifted_argmax(S, p)
    t1, t2 = exact._top2(S, p)
    repair.ssp_repair(S, a, p, caps, t1 - t2)
    assert_feasible(torch.from_numpy(a), caps, n, k)
    assert objective(s, a) == pytest.approx(lp_objective(s, caps), abs=1e-9 * (1 + np.abs(s).max()))


def test_medium_instance_certificate_and_lsa():
    rng = np.random.default_rng(1)
    s = torch.log_softmax(torch.from_numpy(rng.standard_normal((20000, 16)) * 2 + np.linspace(0, 3, 16)), 1)
    res = _solve_balanced_transport(s.float())
    assert_feasible(res.assignment, near_equal_capacities(20000, 16), 20000, 16)
    assert_certificate(s.float().double().numpy(), res)
    # Lower-bound check on a slice small enough for the Hungarian algorithm on replicated columns.
    small = s[:320].numpy()
    caps = near_equal_capacities(320, 16).numpy()
    cols = np.repeat(np.arange(16), caps)
    r, c = linear_sum_assignment(small[:, cols], maximize=True)
    lsa = float(small[r, cols[c]].sum())
    assert _solve_balanced_transport(small).objective == pytest.approx(lsa, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# input kinds, devices, dtypes
# --------------------------------------------------------------------------------------------------


def test_numpy_and_tensor_inputs_agree():
    rng = np.random.default_rng(2)
    s = rng.standard_normal((50, 4))
    a_np = balanced_assignment(s)
    a_t = balanced_assignment(torch.from_numpy(s))
    a_f32 = balanced_assignment(torch.from_numpy(s).float())
    assert torch.equal(a_np, a_t)
    assert a_np.device.type == "cpu" and a_np.dtype == torch.long
    assert_feasible(a_f32, near_equal_capacities(50, 4), 50, 4)
    # float32 input: optimal for the float32 values.
    s32 = torch.from_numpy(s).float()
    assert _solve_balanced_transport(s32).objective == pytest.approx(
        lp_objective(s32.double().numpy(), near_equal_capacities(50, 4).numpy()), rel=1e-12
    )
    # integer scores are accepted (as float64).
    si = rng.integers(-3, 3, size=(12, 3))
    assert _solve_balanced_transport(si).objective == pytest.approx(lp_objective(si, np.array([4, 4, 4])))
    assert _solve_balanced_transport(torch.from_numpy(si)).objective == pytest.approx(
        lp_objective(si, np.array([4, 4, 4]))
    )


def test_result_fields():
    s = torch.randn(9, 3)
    res = _solve_balanced_transport(s, [2, 3, 4])
    assert isinstance(res, TransportResult)
    assert res.capacities.tolist() == [2, 3, 4] and res.capacities.dtype == torch.long
    assert res.prices.shape == (3,) and res.prices.dtype == torch.float64
    assert isinstance(res.objective, float)
    g = _solve_balanced_transport(s, 3, method="greedy")
    assert g.prices is None and g.method == "greedy"
    sk = _solve_balanced_transport(s, (3, 3, 3), method="sinkhorn")
    assert sk.prices.shape == (3,) and sk.method == "sinkhorn"


@pytest.mark.parametrize(
    "caps",
    [None, 5, [5, 5, 5, 5], (4, 6, 5, 5), np.array([0, 10, 5, 5]), torch.tensor([20, 0, 0, 0])],
)
def test_capacity_forms(caps):
    s = torch.randn(20, 4)
    res = _solve_balanced_transport(s, caps)
    expect = (
        near_equal_capacities(20, 4)
        if caps is None
        else torch.as_tensor([caps] * 4 if isinstance(caps, int) else np.asarray(caps))
    )
    assert_feasible(res.assignment, expect.numpy(), 20, 4)


# --------------------------------------------------------------------------------------------------
# approximate methods
# --------------------------------------------------------------------------------------------------


@given(instances())
def test_greedy_matches_sequential_reference(inst):
    s, caps = inst
    a = balanced_assignment(s, caps, method="greedy")
    assert a.tolist() == sequential_greedy(s, caps)


@given(instances(max_n=30))
def test_approximate_methods_feasible_and_not_better(inst):
    s, caps = inst
    n, k = s.shape
    exact = _solve_balanced_transport(s, caps).objective
    for method in ("sinkhorn", "greedy"):
        res = _solve_balanced_transport(s, caps, method=method)
        assert_feasible(res.assignment, caps, n, k)
        assert res.objective <= exact + 1e-9 * (1 + abs(exact))


def test_sinkhorn_plan_marginals_and_float32():
    rng = np.random.default_rng(4)
    s = torch.from_numpy(rng.standard_normal((300, 5)))
    caps = torch.tensor([100, 80, 60, 40, 20])
    log_plan, _prices = approximate.sinkhorn_prices(s, caps, 0.1, 2000, 1e-6)
    plan = log_plan.exp()
    torch.testing.assert_close(plan.sum(1), torch.ones(300, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(0), caps.double(), atol=1e-3, rtol=0)
    res = _solve_balanced_transport(s.float(), caps, method="sinkhorn", entropic_reg=0.01, max_iter=500)
    assert_feasible(res.assignment, caps, 300, 5)
    # small entropic_reg: close to the optimum
    exact = _solve_balanced_transport(s.float(), caps).objective
    assert res.objective <= exact + 1e-6 and res.objective >= exact - 0.05 * abs(exact)


# --------------------------------------------------------------------------------------------------
# forbidden pairs (-inf)
# --------------------------------------------------------------------------------------------------


@given(instances(max_n=20, max_k=5), st.integers(0, 10_000))
def test_forbidden_pairs_match_lp(inst, seed):
    s, caps = inst
    s = s.copy()
    s[np.random.default_rng(seed).random(s.shape) < 0.35] = -np.inf
    try:
        ref = lp_objective(s, caps)
    except TransportInfeasibleError:
        ref = None
    if ref is None:
        with pytest.raises(TransportInfeasibleError, match="scores"):
            _solve_balanced_transport(s, caps)
    else:
        res = _solve_balanced_transport(s, caps)
        assert_feasible(res.assignment, caps, *s.shape)
        assert np.isfinite(s[np.arange(s.shape[0]), res.assignment.numpy()]).all()
        assert res.objective == pytest.approx(ref, abs=1e-9 * (1 + np.abs(s[np.isfinite(s)]).max()))
    for method in ("greedy", "sinkhorn"):
        try:
            res = _solve_balanced_transport(s, caps, method=method)
        except TransportInfeasibleError:
            assert ref is None, f"{method} claimed infeasibility where the LP has a solution"
            continue
        except RuntimeError as err:  # the rounding got stuck: allowed only if it says so honestly
            assert ref is not None and "although an assignment avoiding every forbidden pair exists" in str(err)
            continue
        assert ref is not None
        assert np.isfinite(s[np.arange(s.shape[0]), res.assignment.numpy()]).all()
        assert_feasible(res.assignment, caps, *s.shape)


def test_forbidden_infeasible_messages():
    s = np.array([[0.0, -np.inf], [1.0, -np.inf], [0.5, 0.2]])
    with pytest.raises(TransportInfeasibleError, match="capacities"):
        _solve_balanced_transport(s, [1, 2])
    assert _solve_balanced_transport(s, [2, 1]).assignment.tolist() == [0, 0, 1]
    with pytest.raises(TransportInfeasibleError, match="sample 1 has no finite score"):
        _solve_balanced_transport(np.array([[0.0, 1.0], [-np.inf, -np.inf]]))
    with pytest.raises(TransportInfeasibleError):
        _solve_balanced_transport(np.array([[-np.inf], [1.0]]))
    assert issubclass(TransportInfeasibleError, ValueError)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "greedy", "sinkhorn"])
@pytest.mark.parametrize("bad,match", [(np.nan, "NaN"), (np.inf, r"\+inf")])
def test_nan_inf_scores(method, bad, match):
    s = np.zeros((4, 2))
    s[1, 1] = bad
    with pytest.raises(ValueError, match=f"scores must not contain {match}"):
        _solve_balanced_transport(s, method=method)
    with pytest.raises(ValueError, match="scores"):
        balanced_assignment(torch.from_numpy(s).float(), method=method)


@pytest.mark.parametrize(
    "scores,exc,match",
    [
        (np.zeros(4), ValueError, "2 dimensions"),
        (torch.zeros(2, 3, 4), ValueError, "2 dimensions"),
        (np.zeros((0, 3)), ValueError, "at least one sample"),
        (torch.zeros(3, 0), ValueError, "at least one expert"),
        ([[0.0, 1.0]], TypeError, "torch.Tensor or a numpy.ndarray"),
        (np.zeros((2, 2), dtype=bool), TypeError, "real numbers"),
        (torch.zeros(2, 2, dtype=torch.complex64), TypeError, "real numbers"),
    ],
)
def test_bad_scores(scores, exc, match):
    with pytest.raises(exc, match=f"scores .*{match}|scores must {match}"):
        _solve_balanced_transport(scores)


@pytest.mark.parametrize(
    "caps,exc,match",
    [
        (-1, ValueError, "non-negative"),
        (3, ValueError, "capacities \\* K == N"),
        ([2, 2, -1, 3], ValueError, "non-negative"),
        ([2, 2, 2], ValueError, "length K=4"),
        ([2, 2, 2, 1], ValueError, "sum to N=6"),
        ([1.5, 1.5, 1.5, 1.5], TypeError, "integers"),
        (np.array([1.5, 1.5, 1.5, 1.5]), TypeError, "integers"),
        (torch.tensor([1.0, 2.0, 2.0, 1.0]), TypeError, "integers"),
        (torch.tensor([[3, 3], [0, 0]]), ValueError, "length K=4"),
        ("abcd", TypeError, "capacities must be"),
        (True, TypeError, "bool"),
    ],
)
def test_bad_capacities(caps, exc, match):
    with pytest.raises(exc, match=match):
        _solve_balanced_transport(torch.randn(6, 4), caps)


def test_bad_method_and_options():
    with pytest.raises(ValueError, match="method must be one of"):
        _solve_balanced_transport(torch.randn(4, 2), method="hungarian")
    with pytest.raises(ValueError, match="max_iter"):
        _solve_balanced_transport(torch.randn(4, 2), method="sinkhorn", max_iter=0)
    with pytest.raises(ValueError, match="entropic_reg"):
        _solve_balanced_transport(torch.randn(4, 2), method="sinkhorn", entropic_reg=-1.0)


# --------------------------------------------------------------------------------------------------
# approximate methods: infeasibility only where the LP is infeasible
# --------------------------------------------------------------------------------------------------


def test_greedy_stuck_on_a_feasible_instance_says_so():
    # Greedy takes (0, 0) first (the largest score); sample 1 may then only go to the full expert 0. The LP is
    # feasible (sample 0 -> 1, sample 1 -> 0): greedy must not claim infeasibility.
    s = np.array([[1.0, 0.0], [0.5, -np.inf]])
    assert lp_objective(s, [1, 1]) == pytest.approx(0.5)
    assert _solve_balanced_transport(s, [1, 1]).assignment.tolist() == [1, 0]
    with pytest.raises(RuntimeError, match="although an assignment avoiding every forbidden pair exists"):
        _solve_balanced_transport(s, [1, 1], method="greedy")
    # Sinkhorn's plan puts no mass on forbidden pairs, and here its rounding finds the feasible assignment.
    assert _solve_balanced_transport(s, [1, 1], method="sinkhorn").assignment.tolist() == [1, 0]


@pytest.mark.parametrize("method", ["greedy", "sinkhorn"])
def test_approximate_methods_report_true_infeasibility(method):
    s = np.array([[0.0, -np.inf], [1.0, -np.inf], [0.5, 0.2]])  # two samples may only go to expert 0 (capacity 1)
    with pytest.raises(TransportInfeasibleError):
        lp_objective(s, [1, 2])
    with pytest.raises(TransportInfeasibleError, match="capacities"):
        _solve_balanced_transport(s, [1, 2], method=method)
    with pytest.raises(TransportInfeasibleError, match="sample 1 has no finite score"):
        _solve_balanced_transport(np.array([[0.0, 1.0], [-np.inf, -np.inf]]), method=method)
    # With capacities (2, 1) the LP is feasible (samples 0, 1 -> 0, sample 2 -> 1): never "infeasible".
    if method == "sinkhorn":
        assert _solve_balanced_transport(s, [2, 1], method=method).assignment.tolist() == [0, 0, 1]
    else:  # greedy fills expert 0 with samples 1 and 2 first (the two largest scores), and is then stuck
        with pytest.raises(RuntimeError, match="although an assignment avoiding every forbidden pair exists"):
            _solve_balanced_transport(s, [2, 1], method=method)


# --------------------------------------------------------------------------------------------------
# the exact method's own certificate
# --------------------------------------------------------------------------------------------------


def _certificate_instance():
    rng = np.random.default_rng(5)
    s = rng.standard_normal((12, 3))
    caps = np.array([4, 4, 4])
    res = _solve_balanced_transport(s, caps)
    S = np.ascontiguousarray(s.T)
    return s, S, caps, res.assignment.numpy().copy(), res.prices.numpy().copy(), float(s.max() - s.min())


def test_certificate_accepts_the_optimum():
    _s, S, caps, a, p, spread = _certificate_instance()
    exact.certify(S, a, p, caps, spread)  # no error
    exact.certify(S, a, p + 3.0, caps, spread)  # a common shift of the prices keeps complementary slackness


def test_certificate_rejects_a_feasible_but_suboptimal_assignment():
    s, S, caps, a, p, spread = _certificate_instance()
    # swap two samples of different experts: the loads stay exact, the objective drops
    i, j = next(
        (i, j)
        for i in range(len(a))
        for j in range(len(a))
        if a[i] != a[j] and s[i, a[j]] + s[j, a[i]] < s[i, a[i]] + s[j, a[j]] - 1e-3
    )
    b = a.copy()
    b[i], b[j] = a[j], a[i]
    assert np.array_equal(np.bincount(b, minlength=3), caps)
    # by weak duality no prices can certify a suboptimal assignment: try the optimum's, zeros, and b's own potentials
    for prices in (p, np.zeros(3), exact._potentials(S, b)):
        with pytest.raises(RuntimeError, match="optimality certificate failed"):
            exact.certify(S, b, prices, caps, spread)


def test_certificate_rejects_wrong_loads_and_forbidden_pairs():
    _s, S, caps, a, p, spread = _certificate_instance()
    b = a.copy()
    b[0] = (a[0] + 1) % 3  # one sample moved: loads differ from the capacities
    with pytest.raises(RuntimeError, match="loads .* differ from capacities"):
        exact.certify(S, b, p, caps, spread)
    S2 = S.copy()
    S2[a[0], 0] = -np.inf  # the assigned pair of sample 0 is forbidden
    with pytest.raises(RuntimeError, match="forbidden expert"):
        exact.certify(S2, a, p, caps, spread)


def test_solver_runs_its_certificate(monkeypatch):
    """A wrong result of either route is caught by the certificate inside the solver."""
    rng = np.random.default_rng(6)
    s = rng.standard_normal((8, 4))  # 8 x 4: the assignment route

    def suboptimal(S, caps):  # feasible, but the first samples in expert order (ignores the scores)
        return np.repeat(np.arange(S.shape[0]), caps).astype(np.int64)

    monkeypatch.setattr(exact, "_lsa_assignment", suboptimal)
    assert objective(s, suboptimal(s.T, near_equal_capacities(8, 4).numpy())) < lp_objective(s, [2, 2, 2, 2]) - 1e-6
    with pytest.raises(RuntimeError, match="optimality certificate failed"):
        _solve_balanced_transport(s)
    monkeypatch.undo()

    # flow route with a repair that does nothing: the loads stay unbalanced
    big = np.tile(np.array([[1.0, 0.0, 0.0]]), (600, 1)) + rng.standard_normal((600, 3)) * 1e-3
    monkeypatch.setattr(exact, "_warm_start", lambda S, caps, gap, big: np.zeros(S.shape[0]))
    monkeypatch.setattr(exact, "ssp_repair", lambda S, a, p, caps, slack: p)
    with pytest.raises(RuntimeError, match="loads .* differ from capacities"):
        _solve_balanced_transport(big)


# --------------------------------------------------------------------------------------------------
# boundaries: ties, capacities summing exactly to N, empty experts, N = 1, K = 1
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "greedy", "sinkhorn"])
def test_all_scores_tied(method):
    s = np.zeros((7, 3))
    res = _solve_balanced_transport(s, method=method)
    assert_feasible(res.assignment, [3, 2, 2], 7, 3)
    assert res.objective == 0.0
    again = _solve_balanced_transport(s.copy(), method=method)
    assert torch.equal(res.assignment, again.assignment)  # deterministic under exact ties
    if method == "greedy":  # ties: smaller sample first, then smaller expert
        assert res.assignment.tolist() == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("method", ["exact", "greedy", "sinkhorn"])
def test_expert_with_capacity_zero_gets_no_sample(method):
    s = np.random.default_rng(7).standard_normal((6, 3))
    s[:, 0] += 10.0  # everyone's favourite
    res = _solve_balanced_transport(s, [0, 3, 3], method=method)
    assert_feasible(res.assignment, [0, 3, 3], 6, 3)
    assert (res.assignment != 0).all()
    res = _solve_balanced_transport(s, [6, 0, 0], method=method)  # one expert takes every sample
    assert res.assignment.tolist() == [0] * 6


@pytest.mark.parametrize("caps", [[2, 2, 1], [2, 2, 3], [0, 0, 4]])
def test_capacities_must_sum_exactly_to_n(caps):
    with pytest.raises(ValueError, match="sum to N=6"):
        _solve_balanced_transport(torch.randn(6, 3), caps)
    assert_feasible(balanced_assignment(torch.randn(6, 3), [2, 2, 2]), [2, 2, 2], 6, 3)


@pytest.mark.parametrize("method", ["exact", "greedy", "sinkhorn"])
def test_one_sample_and_one_expert(method):
    assert balanced_assignment(torch.tensor([[0.1, 0.7, 0.3]]), [0, 1, 0], method=method).tolist() == [1]
    assert balanced_assignment(torch.tensor([[0.1, 0.7, 0.3]]), method=method).tolist() == [0]  # capacities (1,0,0)
    assert balanced_assignment(torch.randn(5, 1), method=method).tolist() == [0] * 5
    with pytest.raises(ValueError, match="at least one sample"):
        balanced_assignment(torch.zeros(0, 3), method=method)


# --------------------------------------------------------------------------------------------------
# solver options: only those the method uses, valid values only
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,options",
    [
        ("exact", {"entropic_reg": 0.1}),
        ("exact", {"max_iter": 0}),
        ("exact", {"entropic_reg": -1.0, "max_iter": 0}),
        ("greedy", {"max_iter": 10}),
        ("greedy", {"entropic_reg": 1.0}),
    ],
)
def test_options_the_method_ignores_raise(method, options):
    name = next(iter(options))
    for solve in (_solve_balanced_transport, balanced_assignment):
        with pytest.raises(ValueError, match=f"{name} is used only by method='sinkhorn', not by method='{method}'"):
            solve(torch.randn(4, 2), method=method, **options)
    with pytest.raises(ValueError, match=f"solver_options: {name} is used only by"):
        check_solver_options(method, options)


@pytest.mark.parametrize(
    "options,exc,match",
    [
        ({"entropic_reg": "tight"}, TypeError, "entropic_reg must be a real number, got"),
        ({"entropic_reg": True}, TypeError, "entropic_reg must be a real number, got"),
        ({"entropic_reg": [0.1]}, TypeError, "entropic_reg must be a real number, got"),
        ({"entropic_reg": float("nan")}, ValueError, "entropic_reg must be a finite number > 0"),
        ({"entropic_reg": float("inf")}, ValueError, "entropic_reg must be a finite number > 0"),
        ({"entropic_reg": -1.0}, ValueError, "entropic_reg must be a finite number > 0"),
        ({"entropic_reg": 0}, ValueError, "entropic_reg must be a finite number > 0"),
        ({"max_iter": 0}, ValueError, "max_iter must be a positive integer"),
        ({"max_iter": -3}, ValueError, "max_iter must be a positive integer"),
        ({"max_iter": 2.5}, TypeError, "max_iter must be a positive integer, got"),
        ({"max_iter": 10.0}, TypeError, "max_iter must be a positive integer, got"),
        ({"max_iter": "10"}, TypeError, "max_iter must be a positive integer, got"),
        ({"max_iter": True}, TypeError, "max_iter must be a positive integer, got"),
    ],
)
def test_bad_option_values_raise_even_where_relevant(options, exc, match):
    for solve in (_solve_balanced_transport, balanced_assignment):
        with pytest.raises(exc, match=match):
            solve(torch.randn(4, 2), method="sinkhorn", **options)
    with pytest.raises(exc, match=match):
        check_solver_options("sinkhorn", options)


def test_option_values_of_numpy_types_and_their_effect():
    s = torch.from_numpy(np.random.default_rng(8).standard_normal((40, 4)))
    a = balanced_assignment(s, method="sinkhorn", entropic_reg=np.float32(0.01), max_iter=np.int64(500))
    b = _solve_balanced_transport(s, method="sinkhorn", entropic_reg=0.01, max_iter=500)
    assert torch.equal(a, b.assignment)
    # the options reach Sinkhorn: one iteration leaves the column sums of the plan far from the capacities
    one = _solve_balanced_transport(s, method="sinkhorn", entropic_reg=0.01, max_iter=1)
    assert not torch.allclose(one.prices, b.prices)
    assert check_solver_options("sinkhorn", {"entropic_reg": np.float64(0.5), "max_iter": np.int32(3)}) == {
        "entropic_reg": 0.5,
        "max_iter": 3,
    }
    assert check_solver_options("exact", None) == {} and check_solver_options("greedy", {}) == {}


def test_check_solver_options_bad_containers_and_names():
    with pytest.raises(TypeError, match="solver_options must be a mapping"):
        check_solver_options("sinkhorn", [("max_iter", 3)])
    with pytest.raises(TypeError, match="solver_options keys must be option names"):
        check_solver_options("sinkhorn", {3: 1})
    with pytest.raises(ValueError, match="unknown solver option 'tol'"):
        check_solver_options("sinkhorn", {"tol": 1e-3})
    with pytest.raises(ValueError, match="method must be one of"):
        check_solver_options("lp", None)
    with pytest.raises(TypeError, match="method must be one of"):
        check_solver_options(None, None)


def test_method_of_a_wrong_type():
    with pytest.raises(TypeError, match="method must be one of"):
        _solve_balanced_transport(torch.randn(4, 2), method=0)
    with pytest.raises(TypeError, match="method must be one of"):
        balanced_assignment(torch.randn(4, 2), method=None)


def test_balanced_assignment_checks_tensor_capacities():
    s = torch.randn(6, 3)
    assert balanced_assignment(s, torch.tensor([1, 2, 3])).bincount(minlength=3).tolist() == [1, 2, 3]
    with pytest.raises(TypeError, match="capacities must hold integers"):
        balanced_assignment(s, torch.tensor([2.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="capacities must sum to N=6"):  # checked where the operator runs
        balanced_assignment(s, torch.tensor([2, 2, 1]))
    with pytest.raises(ValueError, match="capacities must have length K=3"):
        balanced_assignment(s, torch.tensor([3, 3]))
    with pytest.raises(TypeError, match="capacities must be None, an int or a length-K sequence"):
        balanced_assignment(s, "222")
