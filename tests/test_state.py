"""Plain state_dicts: a whole CoE (with PWLU and CondConv2d inside) round-trips through a weights-only checkpoint."""

import copy
import pickle

import torch
from torch import nn

import pycoe


def _expert() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def _coe(num_experts: int = 3) -> pycoe.CoE:
    template = _expert()
    pycoe.convert_activations_to_pwlu(template)
    pycoe.convert_conv2d_to_condconv(template, num_kernels=2)  # every conv but the stem
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    delegator = pycoe.Delegator(backbone, num_experts=num_experts, num_classes=5, feature_dim=4)
    return pycoe.CoE(delegator, pycoe.ExpertPool.from_template(template, num_experts), exit_threshold=0.5)


def test_coe_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = _coe()
    x = torch.randn(6, 3, 8, 8)
    model.train()
    model(x)  # PWLUs collect statistics
    pycoe.realign_pwlu(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # move away from the initialisation
    model.eval()
    expected = model(x)

    path = tmp_path / "coe.pt"
    pycoe.save_checkpoint({"model": model.state_dict(), "step": 3}, path)
    state = pycoe.load_checkpoint(path)  # torch.load(weights_only=True)
    torch.manual_seed(1)
    fresh = _coe()  # different random parameters, PWLUs still collecting
    fresh.load_state_dict(state["model"])
    fresh.eval()
    got = fresh(x)
    assert state["step"] == 3
    assert not any(m.collecting for m in fresh.modules() if isinstance(m, pycoe.PWLU))
    torch.testing.assert_close(got.output, expected.output, rtol=0, atol=0)
    assert torch.equal(got.expert_index, expected.expert_index)
    assert torch.equal(got.exited, expected.exited)


def test_modules_deepcopy_and_pickle():
    torch.manual_seed(0)
    model = _coe().eval()
    x = torch.randn(4, 3, 8, 8)
    expected = model(x).output
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x).output, expected, rtol=0, atol=0)
