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
    TransportResult,
    approximate,
    balanced_assignment,
    exact,
    near_equal_capacities,
    repair,
    solve_balanced_transport,
)

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


@pytest.mark.parametrize("n,k", [(-1, 2), (3, 0), (2.0, 2), (3, 1.5), (True, 2)])
def test_near_equal_capacities_bad(n, k):
    with pytest.raises(ValueError, match="^(n|k) must"):
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
        res = solve_balanced_transport(s, caps)
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
        res = solve_balanced_transport(s, caps)
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
            res = solve_balanced_transport(s)
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
    res = solve_balanced_transport(s)
    caps = near_equal_capacities(n, k)
    assert_feasible(res.assignment, caps, n, k)
    assert res.objective == pytest.approx(lp_objective(s, caps.numpy()), abs=1e-9)


def test_single_expert_and_single_sample():
    s = torch.randn(7, 1)
    res = solve_balanced_transport(s)
    assert res.assignment.tolist() == [0] * 7
    assert res.objective == pytest.approx(float(s.double().sum()))
    assert balanced_assignment(np.array([[0.1, 0.5, -2.0]]), [0, 1, 0]).tolist() == [1]
    assert balanced_assignment(np.array([[0.1, 0.5, -2.0]])).tolist() == [0]  # capacities (1, 0, 0)


def test_small_hand_example():
    s = torch.tensor([[3.0, 1.0], [2.0, 0.0], [0.0, 5.0], [1.0, 0.5]])
    res = solve_balanced_transport(s)
    assert res.assignment.tolist() == [0, 0, 1, 1]
    assert res.objective == pytest.approx(10.5)


# --------------------------------------------------------------------------------------------------
# invariances, determinism
# --------------------------------------------------------------------------------------------------


@given(instances(ties=False), st.integers(0, 10_000))
def test_row_constant_invariance(inst, seed):
    s, caps = inst
    shift = np.random.default_rng(seed).standard_normal(s.shape[0])[:, None] * 10
    a0 = solve_balanced_transport(s, caps)
    a1 = solve_balanced_transport(s + shift, caps)
    assert a1.objective == pytest.approx(a0.objective + shift.sum(), rel=1e-9, abs=1e-6)
    if _unique_optimum(s, caps, a0):
        assert torch.equal(a0.assignment, a1.assignment)


@given(instances(ties=False), st.integers(0, 10_000))
def test_column_constant_shifts_objective(inst, seed):
    s, caps = inst
    shift = np.random.default_rng(seed).standard_normal(s.shape[1])[None, :] * 10
    a0 = solve_balanced_transport(s, caps)
    a1 = solve_balanced_transport(s + shift, caps)
    assert a1.objective == pytest.approx(a0.objective + float((caps * shift[0]).sum()), rel=1e-9, abs=1e-6)
    if _unique_optimum(s, caps, a0):
        assert torch.equal(a0.assignment, a1.assignment)


@given(instances(), st.integers(0, 10_000))
def test_permutation_equivariance(inst, seed):
    s, caps = inst
    perm = np.random.default_rng(seed).permutation(s.shape[0])
    r0 = solve_balanced_transport(s, caps)
    r1 = solve_balanced_transport(s[perm], caps)
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
    r0 = solve_balanced_transport(s, caps)
    r1 = solve_balanced_transport(s.copy(), caps.copy())
    assert torch.equal(r0.assignment, r1.assignment)
    assert torch.equal(r0.prices, r1.prices)


def test_deterministic_identical_rows_large():
    s = np.tile(np.array([[0.3, 0.1, 0.2, 0.0]]), (5000, 1))
    r0 = solve_balanced_transport(s)
    r1 = solve_balanced_transport(s)
    assert torch.equal(r0.assignment, r1.assignment)
    assert_feasible(r0.assignment, near_equal_capacities(5000, 4), 5000, 4)
    assert r0.objective == pytest.approx(1250 * 0.6)


def test_heavy_ties_medium_matches_lp():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 2, size=(1500, 4)).astype(np.float64)
    caps = np.array([600, 500, 300, 100])
    res = solve_balanced_transport(s, caps)
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
    res = solve_balanced_transport(s, caps)
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
    res = solve_balanced_transport(s.float())
    assert_feasible(res.assignment, near_equal_capacities(20000, 16), 20000, 16)
    assert_certificate(s.float().double().numpy(), res)
    # Lower-bound check on a slice small enough for the Hungarian algorithm on replicated columns.
    small = s[:320].numpy()
    caps = near_equal_capacities(320, 16).numpy()
    cols = np.repeat(np.arange(16), caps)
    r, c = linear_sum_assignment(small[:, cols], maximize=True)
    lsa = float(small[r, cols[c]].sum())
    assert solve_balanced_transport(small).objective == pytest.approx(lsa, rel=1e-12)


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
    assert solve_balanced_transport(s32).objective == pytest.approx(
        lp_objective(s32.double().numpy(), near_equal_capacities(50, 4).numpy()), rel=1e-12
    )
    # integer scores are accepted (as float64).
    si = rng.integers(-3, 3, size=(12, 3))
    assert solve_balanced_transport(si).objective == pytest.approx(lp_objective(si, np.array([4, 4, 4])))
    assert solve_balanced_transport(torch.from_numpy(si)).objective == pytest.approx(
        lp_objective(si, np.array([4, 4, 4]))
    )


def test_result_fields():
    s = torch.randn(9, 3)
    res = solve_balanced_transport(s, [2, 3, 4])
    assert isinstance(res, TransportResult)
    assert res.capacities.tolist() == [2, 3, 4] and res.capacities.dtype == torch.long
    assert res.prices.shape == (3,) and res.prices.dtype == torch.float64
    assert isinstance(res.objective, float)
    g = solve_balanced_transport(s, 3, method="greedy")
    assert g.prices is None and g.method == "greedy"
    sk = solve_balanced_transport(s, (3, 3, 3), method="sinkhorn")
    assert sk.prices.shape == (3,) and sk.method == "sinkhorn"


@pytest.mark.parametrize(
    "caps",
    [None, 5, [5, 5, 5, 5], (4, 6, 5, 5), np.array([0, 10, 5, 5]), torch.tensor([20, 0, 0, 0])],
)
def test_capacity_forms(caps):
    s = torch.randn(20, 4)
    res = solve_balanced_transport(s, caps)
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
    exact = solve_balanced_transport(s, caps).objective
    for method in ("sinkhorn", "greedy"):
        res = solve_balanced_transport(s, caps, method=method)
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
    res = solve_balanced_transport(s.float(), caps, method="sinkhorn", entropic_reg=0.01, max_iter=500)
    assert_feasible(res.assignment, caps, 300, 5)
    # small entropic_reg: close to the optimum
    exact = solve_balanced_transport(s.float(), caps).objective
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
            solve_balanced_transport(s, caps)
    else:
        res = solve_balanced_transport(s, caps)
        assert_feasible(res.assignment, caps, *s.shape)
        assert np.isfinite(s[np.arange(s.shape[0]), res.assignment.numpy()]).all()
        assert res.objective == pytest.approx(ref, abs=1e-9 * (1 + np.abs(s[np.isfinite(s)]).max()))
    for method in ("greedy", "sinkhorn"):
        try:
            res = solve_balanced_transport(s, caps, method=method)
        except TransportInfeasibleError:
            continue
        assert ref is not None
        assert np.isfinite(s[np.arange(s.shape[0]), res.assignment.numpy()]).all()
        assert_feasible(res.assignment, caps, *s.shape)


def test_forbidden_infeasible_messages():
    s = np.array([[0.0, -np.inf], [1.0, -np.inf], [0.5, 0.2]])
    with pytest.raises(TransportInfeasibleError, match="capacities"):
        solve_balanced_transport(s, [1, 2])
    assert solve_balanced_transport(s, [2, 1]).assignment.tolist() == [0, 0, 1]
    with pytest.raises(TransportInfeasibleError, match="sample 1 has no finite score"):
        solve_balanced_transport(np.array([[0.0, 1.0], [-np.inf, -np.inf]]))
    with pytest.raises(TransportInfeasibleError):
        solve_balanced_transport(np.array([[-np.inf], [1.0]]))
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
        solve_balanced_transport(s, method=method)
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
        solve_balanced_transport(scores)


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
        solve_balanced_transport(torch.randn(6, 4), caps)


def test_bad_method_and_options():
    with pytest.raises(ValueError, match="method must be one of"):
        solve_balanced_transport(torch.randn(4, 2), method="hungarian")
    with pytest.raises(ValueError, match="max_iter"):
        solve_balanced_transport(torch.randn(4, 2), method="sinkhorn", max_iter=0)
    with pytest.raises(ValueError, match="entropic_reg"):
        solve_balanced_transport(torch.randn(4, 2), method="sinkhorn", entropic_reg=-1.0)
