"""Small models with known routing for the export and compile tests (BatchNorm to fold, spread routing, exits)."""

from __future__ import annotations

import torch
from torch import nn

from pycoe.coe import CoE, CoEOutput, Delegator, ExpertPool

K = 3
RES = 12


def conv_net(classes: int = 10, width: int = 6) -> nn.Sequential:
    """A small CNN with BatchNorm (foldable into the convolutions)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


def randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so that folding them is tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)


def spread_heads(delegator: Delegator, scale: float = 2.0) -> None:
    """Heads on standardised features: the argmax expert and the confidence vary from sample to sample."""
    with torch.no_grad():
        features = delegator.features(torch.randn(256, 3, RES, RES))
        mean, std = features.mean(0), features.std(0) + 1e-6
        for head in (delegator.selection_head, delegator.rough_head):
            weight = torch.randn(head.out_features, features.shape[1]) / std * scale
            head.weight.copy_(weight)
            head.bias.copy_(-(weight @ mean))


def make_coe(exit_threshold: float | None = 0.5) -> CoE:
    delegator = Delegator(conv_net(), num_experts=K, num_classes=10, classifier="8", zero_init_selection=False)
    model = CoE(delegator, ExpertPool.from_template(conv_net(), K, init="reinit"))
    randomise_batchnorm(model)
    model.eval()
    spread_heads(delegator)
    if exit_threshold is not None:
        # the median confidence of a calibration batch: about half of the samples exit
        with torch.no_grad():
            conf = model(torch.randn(256, 3, RES, RES), exit_threshold=None).confidence
        model.exit_threshold = float(conf.median())
    return model


class SamplePool:
    """Inputs with known routing, to build batches of a given exit / expert pattern."""

    def __init__(self, model: CoE, n: int = 512) -> None:
        self.x = torch.randn(n, 3, RES, RES)
        with torch.no_grad():
            out = model(self.x)
        self.exited = out.exited
        self.expert = out.expert_index

    def batch(self, pattern: str, size: int) -> torch.Tensor:
        if pattern == "mixed":
            rows = torch.arange(size)
        elif pattern == "all_exit":
            rows = self.exited.nonzero().squeeze(1)[:size]
        elif pattern == "none_exit":
            rows = (~self.exited).nonzero().squeeze(1)[:size]
        elif pattern == "one_expert":  # expert 0 and exits only: experts 1.. receive no sample
            rows = ((self.expert == 0) | self.exited).nonzero().squeeze(1)[:size]
        else:
            raise AssertionError(pattern)
        assert rows.numel() == size, f"the sample pool has too few samples of pattern {pattern!r}"
        return self.x[rows]


def spread_coe_and_pool() -> tuple[CoE, SamplePool]:
    """A CoE whose samples spread over early exit and every expert, with its sample pool."""
    torch.manual_seed(0)
    model = make_coe()
    pool = SamplePool(model)
    counts = torch.bincount(pool.expert + 1, minlength=K + 1)
    assert counts.min() > 20, f"the test CoE must spread its samples over exit and every expert, got {counts}"
    return model, pool


def assert_same_coe_output(got: CoEOutput, ref: CoEOutput) -> None:
    assert isinstance(got, CoEOutput)
    torch.testing.assert_close(got.output, ref.output, rtol=1e-4, atol=1e-4)  # BatchNorm folding rounds
    assert torch.equal(got.expert_index, ref.expert_index)
    assert torch.equal(got.exited, ref.exited)
    torch.testing.assert_close(got.confidence, ref.confidence, rtol=1e-4, atol=1e-6)
