"""Routing metrics on hand-computed examples, a gradcheck of the regulariser, and bad input."""

import math

import pytest
import torch

from pycoe.routing.metrics import (
    agreement,
    assignment_entropy,
    expert_load,
    load_balance_cv2,
    mean_selection_entropy,
    oracle_accuracy,
)


def test_expert_load_counts_and_fractions_ignore_exited():
    index = torch.tensor([0, 2, 2, -1, 1, 2])
    assert expert_load(index, 4).tolist() == [1, 1, 3, 0]
    assert expert_load(index, 4).dtype == torch.long
    assert expert_load(index, 4, normalize=True).tolist() == pytest.approx([0.2, 0.2, 0.6, 0.0])
    assert expert_load(torch.tensor([-1, -1]), 2, normalize=True).tolist() == [0.0, 0.0]
    assert expert_load(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_assignment_entropy_hand_computed():
    assert assignment_entropy(torch.tensor([0, 1, 2, 3]), 4).item() == pytest.approx(math.log(4))
    assert assignment_entropy(torch.tensor([1, 1, 1]), 4).item() == pytest.approx(0.0)
    assert assignment_entropy(torch.tensor([0, 0, 1, 1]), 4).item() == pytest.approx(math.log(2))
    assert assignment_entropy(torch.tensor([0, 0, 1, 1]), 4, normalize=True).item() == pytest.approx(0.5)
    # loads [3, 1] -> -(3/4 log 3/4 + 1/4 log 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert assignment_entropy(torch.tensor([0, 0, 0, 1, -1]), 2).item() == pytest.approx(h)
    assert assignment_entropy(torch.tensor([0, 0]), 1, normalize=True).item() == 1.0


def test_mean_selection_entropy_hand_computed():
    assert mean_selection_entropy(torch.zeros(5, 3)).item() == pytest.approx(math.log(3))
    # each sample confident, but on different experts: mean probs (1/2, 1/2, 0) -> log 2
    z = torch.tensor([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0]], dtype=torch.float64)
    assert mean_selection_entropy(z).item() == pytest.approx(math.log(2), abs=1e-12)
    assert mean_selection_entropy(z, normalize=True).item() == pytest.approx(math.log(2) / math.log(3), abs=1e-12)
    all_zero = torch.tensor([[60.0, 0.0], [60.0, 0.0]], dtype=torch.float64)
    assert mean_selection_entropy(all_zero).item() == pytest.approx(0.0, abs=1e-20)


def test_agreement_hand_computed():
    z = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 1.0]])
    assert agreement(z, torch.tensor([1, 0, 0, 2])).item() == pytest.approx(0.5)
    assert agreement(z, torch.tensor([1, 0, 2, 1])).item() == 1.0


def test_oracle_accuracy_hand_computed():
    # K=2 experts, B=4 samples, C=3 classes. Expert 0 predicts [0, 1, 2, 0]; expert 1 predicts [1, 1, 0, 2].
    e0 = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]])
    e1 = torch.tensor([[0.0, 5, 0], [0, 5, 0], [5, 0, 0], [0, 0, 5]])
    logits = torch.stack([e0, e1])
    # targets [1, 1, 1, 2]: sample 0 right by e1, 1 right by both, 2 by none, 3 by e1 -> 3/4
    assert oracle_accuracy(logits, torch.tensor([1, 1, 1, 2])).item() == pytest.approx(0.75)
    assert oracle_accuracy(logits[:1], torch.tensor([1, 1, 1, 2])).item() == pytest.approx(0.25)


def test_load_balance_cv2_hand_computed():
    # importance = column sums of probs = [1.5, 0.5]; mean 1, population variance 0.25 -> 0.25
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert load_balance_cv2(p, is_probs=True).item() == pytest.approx(0.25)
    # uniform -> 0; everything on one of K experts -> K - 1
    assert load_balance_cv2(torch.zeros(6, 4)).item() == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.zeros(6, 4)
    one_hot[:, 2] = 1.0
    assert load_balance_cv2(one_hot, is_probs=True).item() == pytest.approx(3.0)
    # logits path equals the probs path on the softmax
    z = torch.randn(7, 3, dtype=torch.float64)
    assert load_balance_cv2(z).item() == pytest.approx(load_balance_cv2(z.softmax(1), is_probs=True).item())
    assert load_balance_cv2(torch.randn(5, 1)).item() == 0.0


def test_load_balance_cv2_gradcheck_and_descent():
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(load_balance_cv2, (z,))
    # a gradient step on the regulariser makes the importance more even
    z0 = torch.zeros(8, 3, dtype=torch.float64)
    z0[:, 0] = 3.0
    z0.requires_grad_(True)
    before = load_balance_cv2(z0)
    before.backward()
    after = load_balance_cv2((z0 - 1.0 * z0.grad).detach())
    assert after.item() < before.item()


def test_mean_selection_entropy_is_differentiable():
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mean_selection_entropy, (z,))


def test_bad_inputs():
    with pytest.raises(ValueError, match="index entries"):
        expert_load(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="index entries"):
        expert_load(torch.tensor([0, -2]), 3)
    with pytest.raises(TypeError, match="integer"):
        expert_load(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="1 dimensions"):
        expert_load(torch.zeros(2, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_experts"):
        expert_load(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="num_experts"):
        assignment_entropy(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="selection_logits"):
        mean_selection_entropy(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        mean_selection_entropy(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="label_index must have shape"):
        agreement(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label_index entries"):
        agreement(torch.zeros(2, 2), torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="floating"):
        agreement(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="expert_logits must have 3"):
        oracle_accuracy(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target must have shape"):
        oracle_accuracy(torch.zeros(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target entries"):
        oracle_accuracy(torch.zeros(2, 3, 4), torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="sizes >= 1"):
        oracle_accuracy(torch.zeros(0, 3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="non-negative"):
        load_balance_cv2(torch.tensor([[0.5, -0.5]]), is_probs=True)
    with pytest.raises(ValueError, match="positive total"):
        load_balance_cv2(torch.zeros(2, 2), is_probs=True)
    with pytest.raises(ValueError, match="infinite"):
        load_balance_cv2(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(TypeError, match="selection"):
        load_balance_cv2([[0.0, 1.0]])


def test_bad_input_types_and_values():
    z = torch.zeros(3, 2)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        expert_load(torch.tensor([0, 1]), 2, normalize="yes")
    with pytest.raises(TypeError, match="normalize must be a bool"):
        assignment_entropy(torch.tensor([0, 1]), 2, normalize=1)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        mean_selection_entropy(z, normalize=None)
    with pytest.raises(TypeError, match="is_probs must be a bool"):
        load_balance_cv2(z, is_probs="no")
    with pytest.raises(TypeError, match="num_experts"):
        expert_load(torch.tensor([0, 1]), 2.0)
    with pytest.raises(TypeError, match="num_experts"):
        assignment_entropy(torch.tensor([0, 1]), "2")
    with pytest.raises(TypeError, match="index must be a torch.Tensor"):
        expert_load([0, 1], 2)
    with pytest.raises(TypeError, match="integer"):
        assignment_entropy(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(TypeError, match="target must be an integer"):
        oracle_accuracy(torch.zeros(2, 3, 4), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"target entries must lie in \[0, 4\) \(C=4\), got range \[-1, 2\]"):
        oracle_accuracy(torch.zeros(2, 3, 4), torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="expert_logits must be finite, but it contains NaN"):
        oracle_accuracy(torch.full((2, 3, 4), float("nan")), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="floating"):
        oracle_accuracy(torch.zeros(2, 3, 4, dtype=torch.long), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="label_index must be a torch.Tensor"):
        agreement(z, [0, 1, 1])
    with pytest.raises(ValueError, match=r"index entries must lie in \[-1 \(exited\), 3\) \(num_experts=3\), got"):
        expert_load(torch.tensor([0, 5]), 3)


def test_boundaries():
    # ties in the logits: the lowest expert index is the top-1 choice
    z = torch.zeros(2, 3)
    assert agreement(z, torch.tensor([0, 1])).item() == 0.5
    # a single sample, a single expert
    assert expert_load(torch.tensor([0]), 1).tolist() == [1]
    assert assignment_entropy(torch.tensor([0]), 1).item() == 0.0
    assert mean_selection_entropy(torch.zeros(1, 1)).item() == 0.0
    assert mean_selection_entropy(torch.zeros(1, 1), normalize=True).item() == 1.0
    # every sample exited: nothing routed, entropy 0
    assert assignment_entropy(torch.tensor([-1, -1]), 3).item() == 0.0
    # the highest valid index and -1 are accepted, one past is not
    assert expert_load(torch.tensor([-1, 2]), 3).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="index entries"):
        expert_load(torch.tensor([3]), 3)
    # load_balance_cv2 with probabilities exactly 0 somewhere is fine; a zero total mass is not
    assert load_balance_cv2(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), is_probs=True).item() == 0.0
