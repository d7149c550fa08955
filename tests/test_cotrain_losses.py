"""Co-training losses (pycoe.functional.cotrain): JS divergence and pairwise KL against references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.cotrain import js_divergence_reference, pairwise_kl_reference

from pycoe.functional.cotrain import js_divergence, pairwise_kl


@settings(max_examples=30)  # small integer shapes: 30 examples cover them; keeps the file fast
@given(
    s=st.integers(1, 5), b=st.integers(1, 4), c=st.integers(2, 7), seed=st.integers(0, 2**16), scale=st.floats(0.1, 8.0)
)
def test_js_matches_naive_reference(s, b, c, seed, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, c, generator=g, dtype=torch.float64) * scale
    got = js_divergence(logits, reduction="none")
    torch.testing.assert_close(got, js_divergence_reference(logits), atol=1e-10, rtol=1e-8)
    assert torch.all(got >= -1e-12)
    assert js_divergence(logits) == pytest.approx(float(got.mean()), abs=1e-12)
    assert js_divergence(logits, reduction="sum") == pytest.approx(float(got.sum()), abs=1e-12)


@settings(max_examples=30)  # small integer shapes: 30 examples cover them; keeps the file fast
@given(s=st.integers(2, 5), b=st.integers(1, 4), c=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_pairwise_kl_matches_naive_reference(s, b, c, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, c, generator=g, dtype=torch.float64) * 3
    got = pairwise_kl(logits, reduction="none")
    assert got.shape == (s, b)
    torch.testing.assert_close(got, pairwise_kl_reference(logits), atol=1e-10, rtol=1e-8)
    assert pairwise_kl(logits) == pytest.approx(float(got.mean(1).sum()), abs=1e-12)
    assert pairwise_kl(logits, reduction="sum") == pytest.approx(float(got.sum()), abs=1e-12)
    torch.testing.assert_close(pairwise_kl(logits, detach_peers=False, reduction="none"), got)


def test_zero_for_identical_and_positive_otherwise():
    z = torch.randn(4, 10)
    same = torch.stack([z, z, z])
    assert js_divergence(same).abs() < 1e-6
    assert pairwise_kl(same).abs() < 1e-6
    # shifting logits by a constant does not change the distribution
    assert js_divergence(torch.stack([z, z + 5.0])).abs() < 1e-5
    different = torch.stack([z, torch.randn(4, 10)])
    assert js_divergence(different) > 1e-3
    assert pairwise_kl(different) > 1e-3
    assert torch.all(js_divergence(different, reduction="none") > 0)


def test_symmetric_under_member_permutation():
    logits = torch.randn(4, 6, 9, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(js_divergence(logits[perm], reduction="none"), js_divergence(logits, reduction="none"))
    per = pairwise_kl(logits, reduction="none")
    torch.testing.assert_close(pairwise_kl(logits[perm], reduction="none"), per[perm])
    torch.testing.assert_close(pairwise_kl(logits[perm]), pairwise_kl(logits))


def test_list_input_equals_stacked_and_extra_batch_dims():
    items = [torch.randn(3, 2, 5) for _ in range(3)]
    torch.testing.assert_close(js_divergence(items), js_divergence(torch.stack(items)))
    assert js_divergence(items, reduction="none").shape == (3, 2)
    assert pairwise_kl(items, reduction="none").shape == (3, 3, 2)


def test_js_bounded_by_log_s():
    # JS of S members is at most log S (disjoint one-hot predictions reach it)
    logits = torch.full((3, 1, 3), -1e4)
    for i in range(3):
        logits[i, 0, i] = 1e4
    assert js_divergence(logits).item() == pytest.approx(math.log(3), rel=1e-5)


@pytest.mark.parametrize("fn", [js_divergence, pairwise_kl])
def test_finite_gradients_near_one_hot(fn):
    logits = torch.full((3, 4, 5), -1e4)
    logits[0, :, 0] = 1e4
    logits[1, :, 1] = 1e4
    logits[2, :, 0] = 1e4
    logits.requires_grad_(True)
    loss = fn(logits)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # also when all members agree (the minimum)
    agree = torch.full((2, 4, 5), -1e4)
    agree[:, :, 2] = 1e4
    agree.requires_grad_(True)
    fn(agree).backward()
    assert torch.isfinite(agree.grad).all()


def test_gradient_flow():
    logits = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: js_divergence(z), (logits,))
    # pairwise KL: member i is only pulled by its own term (peers detached)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    per = pairwise_kl(logits, reduction="none")
    (grad,) = torch.autograd.grad(per[0].sum(), logits)
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0
    (grad,) = torch.autograd.grad(pairwise_kl(logits, detach_peers=False, reduction="none")[0].sum(), logits)
    assert grad[1].abs().max() > 0


def test_single_member_gives_zero():
    z = torch.randn(1, 3, 4, requires_grad=True)
    assert js_divergence(z).item() == 0.0
    loss = pairwise_kl(z)
    assert loss.item() == 0.0
    loss.backward()


def test_bad_input():
    with pytest.raises(ValueError, match="reduction"):
        js_divergence(torch.randn(2, 3, 4), reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        pairwise_kl(torch.randn(2, 3, 4), reduction="batchmean")
    with pytest.raises(ValueError, match=r"logits must have shape \[S, B..., C\]"):
        js_divergence(torch.randn(5))
    with pytest.raises(ValueError, match="same shape"):
        js_divergence([torch.randn(2, 3), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="at least one prediction"):
        pairwise_kl([])
    with pytest.raises(TypeError, match="floating-point"):
        js_divergence(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be"):
        js_divergence("logits")
    with pytest.raises(TypeError, match="detach_peers"):
        pairwise_kl(torch.randn(2, 3, 4), detach_peers="yes")
    with pytest.raises(TypeError, match="reduction must be one of .*, got int"):
        js_divergence(torch.randn(2, 3, 4), reduction=1)
    with pytest.raises(TypeError, match="reduction must be one of .*, got NoneType"):
        pairwise_kl(torch.randn(2, 3, 4), reduction=None)
    with pytest.raises(ValueError, match=r"at least one prediction \(S >= 1\)"):
        js_divergence(torch.randn(0, 3, 4))
    with pytest.raises(ValueError, match="at least one class"):
        pairwise_kl(torch.randn(2, 3, 0))
    with pytest.raises(TypeError, match=r"logits\[1\] must be a torch.Tensor"):
        js_divergence([torch.randn(3, 4), "z"])


@pytest.mark.parametrize("fn", [js_divergence, pairwise_kl])
def test_empty_batch(fn):
    empty = torch.randn(3, 0, 5)
    with pytest.raises(ValueError, match="hold no sample: the mean over the batch is undefined"):
        fn(empty)
    assert fn(empty, reduction="sum").item() == 0.0
    assert fn(empty, reduction="none").numel() == 0
