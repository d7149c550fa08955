"""pycoe.export: exported programs (torch.export, ONNX in onnxruntime) against the eager eval forward.

Every exported program is compared with the eager model at several batch sizes, on batches where some, all or
none of the samples exit early and where some experts receive no sample; the traceable paths themselves are
compared, eagerly, with a one-sample-at-a-time reference.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import onnxruntime
import pytest
import torch
from _export_models import (
    RES,
    K,
    assert_same_coe_output,
    conv_net,
    make_coe,
    randomise_batchnorm,
    spread_coe_and_pool,
    spread_heads,
)
from reference.export import coe_eval_per_sample, routed_per_sample
from torch import nn

import pycoe.export
from pycoe._modules import traceable_paths
from pycoe.basisnet import BasisNet, BasisSpecialist
from pycoe.coe import CoE, Delegator, ExpertPool
from pycoe.cotrain import CoTrainingEnsemble, CoTrainingOutput
from pycoe.export import ExportError, export, output_names, prepare_for_export, to_onnx
from pycoe.layers import PWLU, convert_conv2d_to_condconv


@pytest.fixture(scope="module")
def coe_setup():
    model, pool = spread_coe_and_pool()
    return model, pool, export(model, pool.batch("mixed", 8))


PATTERNS = [
    ("mixed", 1),
    ("mixed", 5),
    ("mixed", 64),
    ("all_exit", 1),
    ("all_exit", 5),
    ("none_exit", 1),
    ("none_exit", 64),
    ("one_expert", 5),
    ("one_expert", 33),
]


# ---------------------------------------------------------------------------------------------- traceable paths
@pytest.mark.parametrize(
    "pattern,size", [("mixed", 1), ("mixed", 17), ("all_exit", 5), ("none_exit", 9), ("one_expert", 12)]
)
def test_traceable_coe_path_matches_per_sample_reference(coe_setup, pattern, size):
    model, pool, _ = coe_setup
    x = pool.batch(pattern, size)
    with torch.no_grad():
        with traceable_paths():
            out = model(x)
        output, index, exited = coe_eval_per_sample(model, x)
    torch.testing.assert_close(out.output, output, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.expert_index, index)
    assert torch.equal(out.exited, exited)


def test_traceable_forward_routed_matches_plain_path_and_reference():
    torch.manual_seed(1)
    pool = ExpertPool.from_template(conv_net(), 4, init="reinit")
    randomise_batchnorm(pool)
    pool.eval()
    x = torch.randn(9, 3, RES, RES)
    for index in (torch.tensor([3, 0, 3, 1, 0, 3, 3, 1, 0]), torch.full((9,), 2), torch.tensor([1] * 8 + [2])):
        with torch.no_grad():
            plain = pool.forward_routed(index, x)
            with traceable_paths():
                traced = pool.forward_routed(index, x)
            reference = routed_per_sample(pool.experts, index, x)
        torch.testing.assert_close(traced, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(traced, reference, rtol=1e-4, atol=1e-4)


class PairExpert(nn.Module):
    """Two inputs (like a translation expert reading source and target prefix) and a keyword scale."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(5, 4)

    def forward(self, x, y, scale=None):
        out = self.a(x) + self.b(y)
        return out if scale is None else out * scale


def test_traceable_forward_routed_splits_every_batched_input():
    pool = ExpertPool([PairExpert() for _ in range(3)])
    x, y, scale = torch.randn(6, 3), torch.randn(6, 5), torch.randn(6, 1)
    index = torch.tensor([2, 0, 2, 2, 0, 0])  # expert 1 receives nothing
    with torch.no_grad():
        plain = pool.forward_routed(index, x, y, scale=scale)
        with traceable_paths():
            traced = pool.forward_routed(index, x, y, scale=scale)
        reference = torch.cat(
            [pool[int(k)](x[i : i + 1], y[i : i + 1], scale=scale[i : i + 1]) for i, k in enumerate(index)]
        )
    torch.testing.assert_close(traced, plain)
    torch.testing.assert_close(traced, reference)


# ---------------------------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("pattern,size", PATTERNS)
def test_exported_coe_matches_eager(coe_setup, pattern, size):
    model, pool, program = coe_setup
    x = pool.batch(pattern, size)
    with torch.no_grad():
        assert_same_coe_output(program.module()(x), model(x))


def test_exported_coe_routes_for_real(coe_setup):
    """Each expert appears once in the graph, on a data-dependent sub-batch: no dense run of every expert."""
    _, _, program = coe_setup
    convs = [n for n in program.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 2 * (K + 1)  # two convolutions per network: the delegator and K experts
    batch_norms = [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    assert not batch_norms  # folded
    nonzeros = [n for n in program.graph.nodes if n.target == torch.ops.aten.nonzero.default]
    assert len(nonzeros) == K + 1  # the kept samples, then each expert's rows


def test_exported_coe_round_trips_through_save_and_load(coe_setup, tmp_path):
    model, pool, program = coe_setup
    path = tmp_path / "coe.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    x = pool.batch("mixed", 7)
    with torch.no_grad():
        assert_same_coe_output(loaded.module()(x), model(x))


def test_an_exported_delegator_round_trips_through_save_and_load(tmp_path):
    """A program returning a DelegatorOutput saves and loads; the output type keeps the serialized name it was
    registered under in pycoe.coe (before the Delegator moved to pycoe.twostage), so older saved programs load."""
    from torch.utils._pytree import SUPPORTED_SERIALIZED_TYPES

    from pycoe.twostage.delegator import DelegatorOutput

    assert SUPPORTED_SERIALIZED_TYPES[DelegatorOutput].serialized_type_name == "pycoe.coe.DelegatorOutput"
    torch.manual_seed(3)
    delegator = Delegator(conv_net(), num_experts=K, num_classes=5, classifier="8").eval()
    x = torch.randn(3, 3, RES, RES)
    path = tmp_path / "delegator.pt2"
    torch.export.save(torch.export.export(delegator, (x,)), path)
    out = torch.export.load(path).module()(x)
    with torch.no_grad():
        expected = delegator(x)
    assert isinstance(out, DelegatorOutput)
    torch.testing.assert_close(out.selection_logits, expected.selection_logits)
    torch.testing.assert_close(out.rough_logits, expected.rough_logits)


def test_export_does_not_change_the_model(coe_setup):
    model, pool, _ = coe_setup
    before = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    export(model, pool.batch("mixed", 4))
    assert [type(m) for m in model.modules()] == modules
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_export_without_exit_threshold():
    torch.manual_seed(2)
    model = make_coe(exit_threshold=None)
    x = torch.randn(6, 3, RES, RES)
    program = export(model, x)
    for b in (1, 5, 64):
        xb = torch.randn(b, 3, RES, RES)
        with torch.no_grad():
            assert_same_coe_output(program.module()(xb), model(xb))


def test_export_of_a_coe_with_several_inputs_and_a_keyword_input(tmp_path):
    torch.manual_seed(13)
    delegator = Delegator(
        nn.Sequential(nn.Linear(3, 6), nn.ReLU()),
        num_experts=3,
        num_classes=4,
        feature_dim=6,
        classifier=None,
        zero_init_selection=False,
    )
    model = CoE(
        delegator, ExpertPool([PairExpert() for _ in range(3)]), exit_threshold=0.4, delegator_inputs=[0]
    ).eval()
    example = (torch.randn(6, 3), torch.randn(6, 5))
    program = export(model, example, example_kwargs={"scale": torch.randn(6, 1)})
    path = tmp_path / "pair.onnx"
    to_onnx(model, example, path, example_kwargs={"scale": torch.randn(6, 1)})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_0", "input_1", "scale"]
    exits = 0
    for b in (1, 7, 40):
        x, y, scale = torch.randn(b, 3), torch.randn(b, 5), torch.randn(b, 1)
        with torch.no_grad():
            ref = model(x, y, scale=scale)
            assert_same_coe_output(program.module()(x, y, scale=scale), ref)  # keyword inputs by name
        onnx_out = session.run(None, {"input_0": x.numpy(), "input_1": y.numpy(), "scale": scale.numpy()})
        torch.testing.assert_close(torch.from_numpy(onnx_out[0]), ref.output, rtol=1e-4, atol=1e-5)
        exits += int(ref.exited.sum())
    assert 0 < exits < 48


def test_export_with_a_static_batch():
    torch.manual_seed(3)
    model = make_coe()
    x = torch.randn(4, 3, RES, RES)
    program = export(model, x, dynamic_batch=False)
    with torch.no_grad():
        assert_same_coe_output(program.module()(x), model(x))
        with pytest.raises(Exception, match="shape|size|batch|dim"):
            program.module()(torch.randn(5, 3, RES, RES))


def condconv_pwlu_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        PWLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        PWLU(granularity="channel", num_channels=6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10),
    )
    convert_conv2d_to_condconv(net, 4)  # the default strategy ("auto")
    randomise_batchnorm(net)
    return net.eval()


def test_exported_condconv_pwlu_net_matches_eager():
    torch.manual_seed(4)
    net = condconv_pwlu_net()
    prepared = prepare_for_export(net, torch.randn(4, 3, RES, RES))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())  # after CondConv: an affine map
    program = export(net, torch.randn(4, 3, RES, RES))
    for b in (1, 5, 64):
        x = torch.randn(b, 3, RES, RES)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), net(x), rtol=1e-4, atol=1e-4)


def make_basisnet(exit_threshold: float | None) -> BasisNet:
    light = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    lightweight = Delegator(
        light, num_experts=4, num_classes=10, feature_dim=6, classifier=None, zero_init_selection=False
    )
    specialist = BasisSpecialist(conv_net(), 4, init_noise=0.5)  # the default strategy ("auto")
    net = BasisNet(lightweight, specialist, num_bases=4)
    randomise_batchnorm(net)
    net.eval()
    spread_heads(lightweight)
    if exit_threshold is not None:
        with torch.no_grad():
            net.exit_threshold = float(net(torch.randn(256, 3, RES, RES)).confidence.median())
    return net


def test_exported_basisnet_without_exit_matches_eager():
    torch.manual_seed(5)
    net = make_basisnet(exit_threshold=None)
    program = export(net, torch.randn(4, 3, RES, RES))
    for b in (1, 5, 64):
        x = torch.randn(b, 3, RES, RES)
        with torch.no_grad():
            got, ref = program.module()(x), net(x)
        torch.testing.assert_close(got.output, ref.output, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.coefficients, ref.coefficients)


def test_exported_basisnet_with_early_exit_matches_eager():
    torch.manual_seed(6)
    net = make_basisnet(exit_threshold=0.5)
    program = export(net, torch.randn(16, 3, RES, RES))
    fractions = set()
    for b in (1, 5, 64):
        for _ in range(3):
            x = torch.randn(b, 3, RES, RES)
            with torch.no_grad():
                got, ref = program.module()(x), net(x)
            torch.testing.assert_close(got.output, ref.output, rtol=1e-4, atol=1e-4)
            assert torch.equal(got.exited, ref.exited)
            fractions.add(float(ref.exited.float().mean()))
    assert 0.0 in fractions and 1.0 in fractions and any(0.0 < f < 1.0 for f in fractions)  # none, all, some


def test_exported_cotraining_ensemble_matches_eager():
    torch.manual_seed(12)
    members = [conv_net(), conv_net(width=4)]
    for m in members:
        randomise_batchnorm(m)
    ensemble = CoTrainingEnsemble(members).eval()
    program = export(ensemble, torch.randn(4, 3, RES, RES))
    members_program = export(ensemble, torch.randn(4, 3, RES, RES), example_kwargs={"return_members": True})
    for b in (1, 5, 64):
        x = torch.randn(b, 3, RES, RES)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), ensemble(x), rtol=1e-4, atol=1e-5)
            got, ref = members_program.module()(x, return_members=True), ensemble(x, return_members=True)
        assert isinstance(got, CoTrainingOutput)
        torch.testing.assert_close(got.member_outputs, ref.member_outputs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.ensemble, ref.ensemble, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- preparation
def test_prepare_folds_batchnorm_into_the_preceding_layer():
    torch.manual_seed(7)
    net = nn.Sequential(
        conv_net(),
        nn.Linear(10, 8),
        nn.BatchNorm1d(8),
    )
    randomise_batchnorm(net)
    net.eval()
    x = torch.randn(5, 3, RES, RES)
    prepared = prepare_for_export(net, x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
    assert sum(isinstance(m, nn.Identity) for m in prepared.modules()) == 3  # two conv + BN, one linear + BN
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2  # the model is unchanged
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), net(x), rtol=1e-4, atol=1e-4)


class Residual(nn.Module):
    """The convolution's raw output is read twice: folding the BatchNorm into it would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_prepare_does_not_fold_a_batchnorm_whose_input_is_read_elsewhere():
    torch.manual_seed(8)
    net = nn.Sequential(Residual(), nn.BatchNorm2d(4), nn.ReLU())  # the second BN follows a module that is no conv
    randomise_batchnorm(net)
    net.eval()
    x = torch.randn(3, 4, 6, 6)
    prepared = prepare_for_export(net, x)
    assert isinstance(prepared[0].conv, nn.Conv2d) and not isinstance(prepared[0].bn, (nn.Identity, nn.BatchNorm2d))
    assert not isinstance(prepared[1], (nn.Identity, nn.BatchNorm2d))  # an affine map
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), net(x), rtol=1e-5, atol=1e-6)
    program = export(net, x)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x[:1]), net(x[:1]), rtol=1e-5, atol=1e-6)


def test_prepare_does_not_fold_into_a_shared_convolution():
    torch.manual_seed(9)
    conv = nn.Conv2d(4, 4, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn_a, self.bn_b = conv, nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))

    net = Twice()
    randomise_batchnorm(net)
    net.eval()
    x = torch.randn(2, 4, 5, 5)
    prepared = prepare_for_export(net, x)
    assert isinstance(prepared.conv, nn.Conv2d) and torch.equal(prepared.conv.weight, conv.weight)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), net(x), rtol=1e-5, atol=1e-6)


def test_prepare_checks_the_prepared_copy_against_the_model(monkeypatch):
    def wrong_fold(conv, bn):
        fused = copy.deepcopy(conv)
        with torch.no_grad():
            fused.weight.mul_(2.0)  # a folding gone wrong
        return fused

    monkeypatch.setattr(torch.nn.utils.fusion, "fuse_conv_bn_eval", wrong_fold)
    net = conv_net()
    randomise_batchnorm(net)
    with pytest.raises(ExportError, match="changed the model's outputs"):
        prepare_for_export(net.eval(), torch.randn(3, 3, RES, RES))


def test_prepare_rejects_batchnorm_without_running_statistics():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"'1'.*running statistics"):
        prepare_for_export(net, torch.randn(2, 3, 5, 5))


# ---------------------------------------------------------------------------------------------- errors
def test_export_rejects_a_training_mode_model():
    model = make_coe()
    model.train()
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        export(model, torch.randn(4, 3, RES, RES))
    model.eval()
    model.experts[1][2].train()  # one submodule left in training mode is named
    with pytest.raises(ValueError, match=r"'experts\.experts\.1\.2'"):
        export(model, torch.randn(4, 3, RES, RES))


def test_export_rejects_an_example_batch_of_one():
    with pytest.raises(ValueError, match="batch of at least 2"):
        export(make_coe(), torch.randn(1, 3, RES, RES))


def test_export_rejects_bad_example_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        export(make_coe(), {"x": torch.randn(2, 3, RES, RES)})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export(lambda x: x, torch.randn(2, 3))
    with pytest.raises(TypeError, match="example_kwargs must be None or a mapping"):
        export(make_coe(), torch.randn(2, 3, RES, RES), example_kwargs=[torch.randn(2)])


@pytest.mark.parametrize("name", ["dynamic_batch", "prepare"])
def test_export_flags_must_be_bools(name):
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        export(make_coe(), torch.randn(2, 3, RES, RES), **{name: "yes"})


def test_to_onnx_checks_its_path_and_opset_before_exporting(tmp_path):
    x = torch.randn(2, 3, RES, RES)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        to_onnx(make_coe(), x, 3)
    with pytest.raises(ValueError, match="path's folder .* does not exist"):
        to_onnx(make_coe(), x, tmp_path / "missing" / "model.onnx")
    with pytest.raises(ValueError, match="opset_version must be a positive integer"):
        to_onnx(make_coe(), x, tmp_path / "model.onnx", opset_version=0)
    assert not list(tmp_path.iterdir())


class DataDependentDelegator(nn.Module):
    """A user delegator whose forward takes a Python branch on the input's values."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * RES * RES, K))

    def forward(self, x):
        logits = self.body(x)
        if logits.sum() > 0:  # data-dependent: torch cannot trace this branch
            logits = logits * 2
        return logits


def test_export_error_names_the_data_dependent_submodule():
    model = CoE(DataDependentDelegator(), ExpertPool.from_template(conv_net(), K)).eval()
    with pytest.raises(ExportError, match=r"'delegator' \(DataDependentDelegator\).*\n.*torch\.where") as info:
        export(model, torch.randn(4, 3, RES, RES))
    assert info.value.__cause__ is not None  # torch's own error is chained


def test_output_names(coe_setup):
    _, _, program = coe_setup
    assert output_names(program) == ["output", "expert_index", "exited", "confidence"]
    plain = export(conv_net().eval(), torch.randn(4, 3, RES, RES))
    assert output_names(plain) == ["output"]
    pair = export(nn.Bilinear(3, 3, 2).eval(), (torch.randn(4, 3), torch.randn(4, 3)))
    assert output_names(pair) == ["output"]


# ---------------------------------------------------------------------------------------------- ONNX
def run_onnx(path, x: torch.Tensor) -> list:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_0": x.numpy()})


@pytest.mark.slow
def test_onnx_coe_with_early_exit_matches_eager(coe_setup, tmp_path):
    model, pool, _ = coe_setup
    path = tmp_path / "coe.onnx"
    names = to_onnx(model, pool.batch("mixed", 8), path)
    assert names == ["output", "expert_index", "exited", "confidence"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    for pattern, size in [
        ("mixed", 1),
        ("mixed", 5),
        ("mixed", 64),
        ("all_exit", 5),
        ("none_exit", 5),
        ("one_expert", 64),
    ]:
        x = pool.batch(pattern, size)
        with torch.no_grad():
            ref = model(x)
        output, index, exited, confidence = session.run(None, {"input_0": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(output), ref.output, rtol=1e-4, atol=1e-4)
        assert torch.equal(torch.from_numpy(index), ref.expert_index)
        assert torch.equal(torch.from_numpy(exited), ref.exited)
        torch.testing.assert_close(torch.from_numpy(confidence), ref.confidence, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_onnx_condconv_net_matches_eager(tmp_path):
    torch.manual_seed(10)
    net = condconv_pwlu_net()
    path = tmp_path / "condconv.onnx"
    assert to_onnx(net, torch.randn(4, 3, RES, RES), path) == ["output"]
    for b in (1, 5, 64):
        x = torch.randn(b, 3, RES, RES)
        with torch.no_grad():
            ref = net(x)
        torch.testing.assert_close(torch.from_numpy(run_onnx(path, x)[0]), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("with_exit", [False, True])
def test_onnx_basisnet_matches_eager(tmp_path, with_exit):
    torch.manual_seed(11)
    net = make_basisnet(exit_threshold=0.5 if with_exit else None)
    path = tmp_path / "basisnet.onnx"
    assert to_onnx(net, torch.randn(4, 3, RES, RES), path) == ["output", "exited", "confidence", "coefficients"]
    for b in (1, 5, 64):
        x = torch.randn(b, 3, RES, RES)
        with torch.no_grad():
            ref = net(x)
        output, exited, _, coefficients = run_onnx(path, x)
        torch.testing.assert_close(torch.from_numpy(output), ref.output, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(coefficients), ref.coefficients, rtol=1e-4, atol=1e-6)
        assert torch.equal(torch.from_numpy(exited), ref.exited)
        if not with_exit:
            assert not exited.any()


# ---------------------------------------------------------------------------------------------- no empty expert batch
class RefusesEmpty(nn.Module):
    """Reshapes like a Hugging Face attention layer, ``view(B, -1, 2)``, which cannot infer -1 for B = 0; records the
    batch sizes it computed (eagerly)."""

    def __init__(self, d_in: int = 4, d_out: int = 6):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.seen: list[int] = []

    def forward(self, x):
        out = self.linear(x).view(x.shape[0], -1, 2).sum(-1)
        if not torch.compiler.is_compiling():
            self.seen.append(x.shape[0])
        return out


class AcceptsEmpty(RefusesEmpty):
    """The same network written for any batch (explicit sizes), as convolutional networks are."""

    def forward(self, x):
        out = self.linear(x).view(x.shape[0], 3, 2).sum(-1)
        if not torch.compiler.is_compiling():
            self.seen.append(x.shape[0])
        return out


def refusing_pool(k: int = 3) -> ExpertPool:
    torch.manual_seed(20)
    return ExpertPool([RefusesEmpty() for _ in range(k)]).eval()


def test_the_refusing_expert_really_refuses_an_empty_batch():
    with pytest.raises(RuntimeError, match="0 elements"):
        RefusesEmpty()(torch.randn(0, 4))


def test_eager_routed_batch_of_zero_calls_no_expert_on_an_empty_batch():
    pool = refusing_pool()
    with torch.no_grad():
        out = pool.forward_routed(torch.zeros(0, dtype=torch.long), torch.randn(0, 4))
    assert out.shape == (0, 3) and out.dtype == torch.float32
    assert pool[0].seen == [1]  # one padding row, to learn the per-sample shape
    with torch.no_grad(), traceable_paths():
        out = pool.forward_routed(torch.zeros(0, dtype=torch.long), torch.randn(0, 4))
    assert out.shape == (0, 3)
    assert [expert.seen[-1] for expert in pool] == [1, 1, 1]  # each on its padding row


@pytest.mark.parametrize("traced", [False, True])
def test_routed_dispatch_pads_only_an_expert_without_samples(traced):
    pool = refusing_pool(4)
    x = torch.randn(7, 4)
    index = torch.tensor([3, 0, 3, 0, 0, 3, 3])  # experts 1 and 2 receive no sample
    with torch.no_grad(), traceable_paths() if traced else contextlib.nullcontext():
        out = pool.forward_routed(index, x)
    seen = [expert.seen[-1] if expert.seen else None for expert in pool]
    with torch.no_grad():
        torch.testing.assert_close(out, routed_per_sample(pool.experts, index, x))
    assert seen == ([3, 1, 1, 4] if traced else [3, None, None, 4])  # real rows only, or one padding row


def test_an_expert_that_takes_an_empty_batch_gets_one_and_no_padding_row():
    torch.manual_seed(27)
    pool = ExpertPool([AcceptsEmpty(), RefusesEmpty(), AcceptsEmpty()]).eval()
    x = torch.randn(5, 4)
    index = torch.tensor([1, 1, 1, 1, 1])  # experts 0 and 2 receive no sample
    with torch.no_grad(), traceable_paths():
        out = pool.forward_routed(index, x)
        torch.testing.assert_close(out, pool[1](x))
        assert [expert.seen[-1] for expert in pool] == [0, 5, 0]
        out = pool.forward_routed(torch.tensor([0, 2, 0, 2, 2]), x)
        assert [expert.seen[-1] for expert in pool] == [2, 1, 3]  # only the refusing expert gets a padding row
    torch.testing.assert_close(out, routed_per_sample(pool.experts, torch.tensor([0, 2, 0, 2, 2]), x))


def test_padding_row_is_zeros_of_each_input_and_its_output_is_dropped():
    class Records(nn.Module):
        def __init__(self):
            super().__init__()
            self.inputs = []

        def forward(self, ids, mask=None):
            if ids.shape[0] == 0:
                raise RuntimeError("this expert cannot take an empty batch")
            self.inputs.append((ids.clone(), mask.clone()))
            return ids.float() * 10 + 1  # the padding row gives 1s: they must not reach the result

    pool = ExpertPool([Records(), Records()])
    ids = torch.randint(1, 9, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    index = torch.tensor([0, 0, 0])
    with torch.no_grad(), traceable_paths():
        out = pool.forward_routed(index, ids, mask=mask)
    torch.testing.assert_close(out, ids.float() * 10 + 1)
    pad_ids, pad_mask = pool[1].inputs[-1]
    assert pad_ids.shape == (1, 5) and not pad_ids.any() and pad_ids.dtype == ids.dtype
    assert pad_mask.shape == (1, 5) and not pad_mask.any() and pad_mask.dtype == torch.bool


def refusing_coe() -> CoE:
    torch.manual_seed(21)
    delegator = Delegator(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh()),
        num_experts=3,
        num_classes=3,
        feature_dim=8,
        classifier=None,
        zero_init_selection=False,
    )
    with torch.no_grad():
        delegator.selection_head.weight.mul_(8)
    model = CoE(delegator, ExpertPool([RefusesEmpty() for _ in range(3)])).eval()
    with torch.no_grad():
        model.exit_threshold = float(model(torch.randn(256, 4), exit_threshold=None).confidence.median())
    return model


def test_exported_coe_of_experts_that_refuse_an_empty_batch_matches_eager(tmp_path):
    model = refusing_coe()
    program = export(model, torch.randn(6, 4))
    patterns = set()
    for b in (0, 1, 2, 5, 33):
        for _ in range(3):
            x = torch.randn(b, 4)
            with torch.no_grad():
                ref = model(x)
                got = program.module()(x)
            assert_same_coe_output(got, ref)
            counts = torch.bincount(ref.expert_index + 1, minlength=4)
            patterns.add(tuple((counts[1:] == 0).tolist()))
    assert any(any(p) and not all(p) for p in patterns)  # some batches left some (not all) experts without a sample
    assert (True, True, True) in patterns  # and some left every expert without one (all exited, or b = 0)


@pytest.mark.slow
def test_onnx_coe_of_experts_that_refuse_an_empty_batch_matches_eager(tmp_path):
    model = refusing_coe()
    path = tmp_path / "refusing.onnx"
    to_onnx(model, torch.randn(6, 4), path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (0, 1, 5, 33):
        x = torch.randn(b, 4)
        with torch.no_grad():
            ref = model(x)
        output, index, exited, _ = session.run(None, {"input_0": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(output), ref.output, rtol=1e-4, atol=1e-5)
        assert torch.equal(torch.from_numpy(index), ref.expert_index)
        assert torch.equal(torch.from_numpy(exited), ref.exited)


# ---------------------------------------------------------------------------------------------- keyword inputs, shapes
class TokenModel(nn.Module):
    """A keyword-only text model: embeddings averaged over the real tokens of the mask, a decoder-side input of its
    own length."""

    def __init__(self, vocab: int = 20, d: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, classes)

    def forward(self, *, input_ids, attention_mask, decoder_input_ids=None):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        if decoder_input_ids is not None:
            pooled = pooled + self.embed(decoder_input_ids).mean(1)
        return self.head(pooled)


def token_batch(b: int, length: int, decoder: int | None = None) -> dict[str, torch.Tensor]:
    lengths = torch.randint(1, length + 1, (b,))
    mask = (torch.arange(length) < lengths[:, None]).long()
    batch = {"input_ids": torch.randint(1, 20, (b, length)) * mask, "attention_mask": mask}
    if decoder is not None:
        batch["decoder_input_ids"] = torch.randint(1, 20, (b, decoder))
    return batch


def test_export_of_a_keyword_only_model_has_a_dynamic_batch_and_sequence_length():
    torch.manual_seed(22)
    model = TokenModel().eval()
    program = export(model, (), example_kwargs=token_batch(4, 6, decoder=5))
    for b, length, decoder in [(1, 2, 9), (5, 17, 3), (33, 6, 6), (3, 40, 2)]:
        batch = token_batch(b, length, decoder)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(**batch), model(**batch))


def test_export_with_a_fixed_sequence_length():
    model = TokenModel().eval()
    program = export(model, (), example_kwargs=token_batch(4, 6), dynamic_sequence=False)
    with torch.no_grad():
        batch = token_batch(7, 6)
        torch.testing.assert_close(program.module()(**batch), model(**batch))  # the batch is still dynamic
        with pytest.raises(Exception, match="6|shape|size"):
            program.module()(**token_batch(2, 9))
    # the model ties the mask's length to the ids': fixing one fixes both, and export says so
    with pytest.warns(UserWarning, match="fixed the sequence length of 'attention_mask'"):
        program = export(model, (), example_kwargs=token_batch(4, 6), dynamic_shapes={"input_ids": {1: None}})
    with pytest.raises(Exception, match="6|shape|size"):
        program.module()(**token_batch(2, 9))


def test_export_with_user_dynamic_shapes_for_other_dimensions():
    torch.manual_seed(23)
    net = conv_net().eval()
    randomise_batchnorm(net)
    program = export(
        net, torch.randn(4, 3, RES, RES), dynamic_shapes={0: {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    )
    for size in (RES, 9, 20):
        x = torch.randn(3, 3, size, size + 1)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), net(x), rtol=1e-4, atol=1e-4)
    fixed = export(net, torch.randn(4, 3, RES, RES))  # images: only the batch is dynamic by default
    with pytest.raises(Exception, match=str(RES)):
        fixed.module()(torch.randn(3, 3, 9, 9))


def test_export_rejects_bad_dynamic_shapes():
    model = TokenModel().eval()
    example = token_batch(4, 6)
    with pytest.raises(ValueError, match=r"'input_idz'.*\['input_ids', 'attention_mask'\]"):
        export(model, (), example_kwargs=example, dynamic_shapes={"input_idz": {1: None}})
    with pytest.raises(ValueError, match="dim 2, but that input has 2 dimensions"):
        export(model, (), example_kwargs=example, dynamic_shapes={"input_ids": {2: None}})
    with pytest.raises(TypeError, match=r"dynamic_shapes\['input_ids'\] must be a mapping"):
        export(model, (), example_kwargs=example, dynamic_shapes={"input_ids": [1]})
    with pytest.raises(TypeError, match="dynamic_shapes must be None or a mapping"):
        export(model, (), example_kwargs=example, dynamic_shapes=[{0: None}])
    with pytest.raises(ValueError, match="sequence length of 1"):
        export(model, (), example_kwargs=token_batch(4, 1))
    with pytest.raises(TypeError, match="dynamic_sequence must be a bool"):
        export(model, (), example_kwargs=example, dynamic_sequence=1)


def test_export_warns_when_the_model_fixes_the_sequence_length():
    class FixedLength(nn.Module):
        def forward(self, input_ids):
            return input_ids.reshape(input_ids.shape[0], 2, 3).float().sum(1)  # only works for a length of 6

    with pytest.warns(UserWarning, match=r"fixed the sequence length of 'input_0' \(length 6\)"):
        export(FixedLength().eval(), torch.randint(0, 5, (4, 6)))


@pytest.mark.slow
def test_onnx_inputs_of_a_keyword_only_model_are_named_by_keyword(tmp_path):
    torch.manual_seed(24)
    model = TokenModel().eval()
    path = tmp_path / "tokens.onnx"
    assert to_onnx(model, (), path, example_kwargs=token_batch(4, 6, decoder=5)) == ["output"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "decoder_input_ids"]
    for b, length, decoder in [(1, 2, 9), (5, 17, 3), (33, 6, 6)]:
        batch = token_batch(b, length, decoder)
        with torch.no_grad():
            ref = model(**batch)
        (out,) = session.run(None, {k: v.numpy() for k, v in batch.items()})
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input, early
@pytest.fixture
def export_must_not_run(monkeypatch):
    """Fails the test if the (slow) export starts: the argument must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the export ran before the bad argument was refused")

    monkeypatch.setattr(pycoe.export, "export", refuse)


def test_to_onnx_refuses_an_empty_path_or_a_directory_before_exporting(tmp_path, export_must_not_run):
    x = torch.randn(2, 3, RES, RES)
    with pytest.raises(ValueError, match="path must name the .onnx file to write, got an empty string"):
        to_onnx(conv_net().eval(), x, "")
    with pytest.raises(ValueError, match=r"is a directory; name the \.onnx file"):
        to_onnx(conv_net().eval(), x, tmp_path)


@pytest.mark.parametrize("opset", [7, 13, 17, 99])
def test_to_onnx_refuses_an_opset_it_would_not_write(tmp_path, opset, export_must_not_run):
    with pytest.raises(ValueError, match=f"opset_version must be None .* from 18 to .*, got {opset}"):
        to_onnx(conv_net().eval(), torch.randn(2, 3, RES, RES), tmp_path / "m.onnx", opset_version=opset)


def test_to_onnx_writes_the_opset_asked_for(tmp_path):
    import onnx

    path = tmp_path / "linear.onnx"
    to_onnx(nn.Linear(3, 2).eval(), torch.randn(2, 3), path, opset_version=21)
    assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [21]


def test_to_onnx_names_the_deploy_extra_when_onnxscript_is_missing(tmp_path, monkeypatch, export_must_not_run):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=r"onnxscript.*pip install 'pycoe\[deploy\]'"):
        to_onnx(conv_net().eval(), torch.randn(2, 3, RES, RES), tmp_path / "m.onnx")


def test_export_refuses_an_exported_program_and_its_module():
    program = export(nn.Linear(3, 2).eval(), torch.randn(2, 3))
    with pytest.raises(TypeError, match="already an ExportedProgram"):
        export(program, torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"module of an exported program.*export the original eager model"):
        export(program.module(), torch.randn(2, 3))
    with pytest.raises(TypeError, match="module of an exported program"):
        pycoe.export.compile_inference(program.module(), torch.randn(2, 3))


def test_output_names_needs_a_program():
    with pytest.raises(TypeError, match=r"program must be a torch\.export\.ExportedProgram .* got Linear"):
        output_names(nn.Linear(3, 2))


# ---------------------------------------------------------------------------------------------- the exit threshold
def test_export_accepts_exit_decisions_flipped_by_the_rounding_of_the_folding():
    """A sample whose confidence lies within rounding of the threshold may exit in the model and not in the folded
    copy: that is no folding error, the other samples are compared."""
    torch.manual_seed(25)
    model = make_coe(exit_threshold=None)
    x = torch.randn(64, 3, RES, RES)
    prepared = prepare_for_export(model, x)
    with torch.no_grad():
        eager = model(x, exit_threshold=None).confidence
        folded = prepared(x, exit_threshold=None).confidence
    lower = (folded < eager).nonzero().squeeze(1)
    assert lower.numel() > 0, "the folding must round some confidence down for this test"
    i = int(lower[0])
    model.exit_threshold = float(eager[i])  # sample i exits exactly at the threshold, eagerly only
    with torch.no_grad():
        assert model(x).exited[i] and not prepared(x, exit_threshold=model.exit_threshold).exited[i]
    program = export(model, x)  # no ExportError blaming the BatchNorm folding
    with torch.no_grad():
        got, ref = program.module()(x), model(x)
    agree = got.exited == ref.exited
    assert not agree[i] and agree.sum() == 63
    torch.testing.assert_close(got.output[agree], ref.output[agree], rtol=1e-4, atol=1e-4)


def test_export_still_reports_a_folding_that_changes_every_decision(monkeypatch):
    def wrong_fold(conv, bn):
        fused = copy.deepcopy(conv)
        with torch.no_grad():
            fused.weight.mul_(-3.0)
        return fused

    monkeypatch.setattr(torch.nn.utils.fusion, "fuse_conv_bn_eval", wrong_fold)
    with pytest.raises(ExportError, match="changed the model's outputs"):
        prepare_for_export(make_coe(), torch.randn(32, 3, RES, RES))


def test_the_exit_threshold_is_frozen_into_the_exported_program():
    """As the deploy guide says: changing model.exit_threshold after the export changes eager, not the program."""
    torch.manual_seed(26)
    model = make_coe()
    x = torch.randn(64, 3, RES, RES)
    program = export(model, x)
    with torch.no_grad():
        before = model(x)
        model.exit_threshold = 0.0  # every sample exits eagerly now
        after, exported = model(x), program.module()(x)
    assert after.exited.all() and not before.exited.all()
    assert torch.equal(exported.exited, before.exited)
