"""pycoe.export: exported programs (torch.export, ONNX in onnxruntime) against the eager eval forward.

Every exported program is compared with the eager model at several batch sizes, on batches where some, all or
none of the samples exit early and where some experts receive no sample; the traceable paths themselves are
compared, eagerly, with a one-sample-at-a-time reference.
"""

from __future__ import annotations

import copy

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
    assert [i.name for i in session.get_inputs()] == ["input_0", "input_1", "input_2"]
    exits = 0
    for b in (1, 7, 40):
        x, y, scale = torch.randn(b, 3), torch.randn(b, 5), torch.randn(b, 1)
        with torch.no_grad():
            ref = model(x, y, scale=scale)
            # the keyword input comes last, positionally (see export's docstring)
            assert_same_coe_output(program.module()(x, y, scale), ref)
        onnx_out = session.run(None, {"input_0": x.numpy(), "input_1": y.numpy(), "input_2": scale.numpy()})
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
