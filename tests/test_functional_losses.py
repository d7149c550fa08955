"""pycoe.functional.per_sample_cross_entropy against the slow reference, and its errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference.losses import per_sample_cross_entropy as reference
from reference.losses import per_sample_soft_cross_entropy as reference_soft

from pycoe.functional import per_sample_cross_entropy


@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 5),
    classes=st.integers(2, 6),
    shift=st.booleans(),
    ignored=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_token_logits_agree_with_the_reference(batch, tokens, classes, shift, ignored, seed):
    if shift and tokens < 2:
        tokens = 2
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, tokens, classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, classes, (batch, tokens), generator=gen)
    target[torch.rand(batch, tokens, generator=gen) < ignored] = -100
    got = per_sample_cross_entropy(logits, target, shift=shift)
    torch.testing.assert_close(got, reference(logits, target, shift=shift))


def test_class_logits_agree_with_the_reference_and_with_torch():
    logits, target = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    got = per_sample_cross_entropy(logits, target)
    torch.testing.assert_close(got, reference(logits, target))
    torch.testing.assert_close(got, F.cross_entropy(logits, target, reduction="none"))
    probs = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=1)
    torch.testing.assert_close(per_sample_cross_entropy(logits, probs), reference_soft(logits, probs))


def test_more_position_dimensions_and_a_custom_ignore_index():
    logits, target = torch.randn(3, 2, 4, 7, dtype=torch.float64), torch.randint(0, 7, (3, 2, 4))
    target[0, 1] = 9
    got = per_sample_cross_entropy(logits, target, ignore_index=9)
    torch.testing.assert_close(got, reference(logits, target, ignore_index=9))


def test_a_sample_without_real_tokens_gets_zero_and_no_gradient():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    target = torch.tensor([[-100, -100, -100, -100], [1, 2, 3, -100]])
    loss = per_sample_cross_entropy(logits, target)
    assert loss[0].item() == 0.0 and loss[1].item() > 0
    loss.sum().backward()
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1, :3].abs().sum() > 0
    assert logits.grad[1, 3].abs().sum() == 0  # an ignored token gets no gradient


def test_padding_does_not_change_a_samples_loss():
    logits = torch.randn(2, 3, 6, dtype=torch.float64)
    target = torch.randint(0, 6, (2, 3))
    padded_logits = torch.cat([logits, torch.randn(2, 4, 6, dtype=torch.float64)], dim=1)
    padded_target = torch.cat([target, torch.full((2, 4), -100)], dim=1)
    torch.testing.assert_close(
        per_sample_cross_entropy(padded_logits, padded_target), per_sample_cross_entropy(logits, target)
    )


def test_shift_matches_what_a_causal_lm_scores():
    """Position t predicts token t + 1: the same as scoring logits[:, :-1] against labels[:, 1:] by hand."""
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    by_hand = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").mean(1)
    torch.testing.assert_close(per_sample_cross_entropy(logits, labels, shift=True), by_hand)


def test_gradient_agrees_with_a_loop_of_torch_losses():
    logits = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0, 1, -100, 2], [3, -100, -100, -100], [4, 4, 4, 4]])
    (grad,) = torch.autograd.grad(per_sample_cross_entropy(logits, target).sum(), logits)
    loop = sum(F.cross_entropy(logits[b], target[b], ignore_index=-100) for b in range(3))
    (expected,) = torch.autograd.grad(loop, logits)
    torch.testing.assert_close(grad, expected)


def test_empty_batch():
    assert per_sample_cross_entropy(torch.randn(0, 3, 5), torch.zeros(0, 3, dtype=torch.long)).shape == (0,)
    assert per_sample_cross_entropy(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize(
    "logits,target,kwargs,error,message",
    [
        (torch.randn(4, 3, 5), torch.randint(0, 5, (4,)), {}, ValueError, r"target has one label per sample"),
        (
            torch.randn(4, 3, 5),
            torch.randint(0, 5, (4, 2)),
            {},
            ValueError,
            r"target must be integer token labels of shape \[4, 3\]",
        ),
        (torch.randn(4, 3, 5), torch.rand(4, 3), {}, ValueError, r"target must be integer token labels"),
        (
            torch.randn(4, 5),
            torch.randint(0, 5, (4, 3)),
            {},
            ValueError,
            r"target must be class indices.*token labels \[B, T\] need token logits",
        ),
        (
            torch.randn(4, 5),
            torch.randint(0, 5, (3,)),
            {},
            ValueError,
            r"target must be class indices LongTensor\[B=4\]",
        ),
        (
            torch.randn(4, 5),
            torch.randint(0, 5, (4,)),
            {"shift": True},
            ValueError,
            "shift=True applies to token logits",
        ),
        (
            torch.randn(4, 1, 5),
            torch.randint(0, 5, (4, 1)),
            {"shift": True},
            ValueError,
            r"shift=True needs at least 2",
        ),
        (
            torch.randn(4, 3, 5),
            torch.full((4, 3), 5),
            {},
            ValueError,
            r"target must hold class indices in \[0, 5\) or ignore_index=-100",
        ),
        (torch.randn(4, 3, 5), torch.full((4, 3), -1), {}, ValueError, r"got values in \[-1, -1\]"),
        (
            torch.randint(0, 5, (4, 5)),
            torch.randint(0, 5, (4,)),
            {},
            TypeError,
            "logits must be a floating-point tensor",
        ),
        (torch.randn(4), torch.randint(0, 5, (4,)), {}, ValueError, r"logits must be class logits \[B, C\]"),
        (torch.randn(4, 5), [0, 1, 2, 3], {}, TypeError, "target must be a torch.Tensor"),
        (torch.randn(4, 5), torch.randint(0, 5, (4,)), {"ignore_index": 1.5}, TypeError, "ignore_index"),
    ],
)
def test_bad_input_names_the_argument(logits, target, kwargs, error, message):
    with pytest.raises(error, match=message):
        per_sample_cross_entropy(logits, target, **kwargs)
