"""Shared helpers: argument checks, mode handling (pycoe.utils), the early-exit rule, the import structure and the
public API's layout."""

import ast
import math
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import pycoe
from pycoe._modules import floating_reference, module_device, tensors_in
from pycoe._validation import (
    check_bool,
    check_choice,
    check_expert_index,
    check_finite_float,
    check_int,
    check_int_pair,
    check_module,
    check_nonnegative_float,
    check_nonnegative_int,
    check_number,
    check_positive_float,
    check_positive_int,
    check_probability,
)
from pycoe.twostage.model import _merge_early_exit
from pycoe.twostage.rule import exit_decision, exit_mask, resolve_exit_threshold, rough_confidence
from pycoe.utils import eval_mode, preserve_training_modes

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- validation


def test_float_checks_accept_and_convert():
    assert check_finite_float("a", -2) == -2.0 and isinstance(check_finite_float("a", -2), float)
    assert check_positive_float("a", 0.5) == 0.5
    assert check_nonnegative_float("a", 0) == 0.0
    assert check_int("a", -3) == -3


@pytest.mark.parametrize(
    "check,value,error,message",
    [
        (check_finite_float, math.inf, ValueError, "a must be a finite number"),
        (check_finite_float, True, TypeError, "a must be a finite number"),
        (check_finite_float, "1", TypeError, "a must be a finite number"),
        (check_positive_float, 0, ValueError, "a must be a finite number > 0"),
        (check_positive_float, math.nan, ValueError, "a must be a finite number > 0"),
        (check_nonnegative_float, -1e-9, ValueError, "a must be a finite number >= 0"),
        (check_nonnegative_float, math.inf, ValueError, "a must be a finite number >= 0"),
    ],
)
def test_float_checks_reject_with_the_argument_name(check, value, error, message):
    with pytest.raises(error, match=message):
        check("a", value)


@pytest.mark.parametrize("value", [1.0, True, "1", None])
def test_int_check_rejects_non_integers(value):
    with pytest.raises(TypeError, match="a must be an int"):
        check_int("a", value)


FLOAT_CHECKS = [
    check_finite_float,
    check_positive_float,
    check_nonnegative_float,
    check_probability,
    lambda name, value: check_number(name, value, minimum=0, maximum=2),
]
INT_CHECKS = [check_int, check_positive_int, check_nonnegative_int, lambda name, value: check_int_pair(name, value)[0]]


@pytest.mark.parametrize("check", FLOAT_CHECKS + INT_CHECKS)
@pytest.mark.parametrize(
    "value", [1, np.int64(1), np.uint8(1), torch.tensor(1), torch.tensor(1, dtype=torch.int32)], ids=repr
)
def test_every_number_check_takes_python_numpy_and_0d_tensor_integers(check, value):
    result = check("a", value)
    assert result == 1 and type(result) in (int, float)


@pytest.mark.parametrize("check", FLOAT_CHECKS)
@pytest.mark.parametrize(
    "value", [0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)]
)
def test_every_float_check_takes_python_numpy_and_0d_tensor_reals(check, value):
    result = check("a", value)
    assert result == 0.5 and type(result) is float


BOOLS = [True, np.bool_(True), torch.tensor(True)]
NOT_NUMBERS = ["1", None, 1j, torch.tensor([1.0]), torch.tensor([1]), np.array([1.0]), [1.0], torch.tensor(1j)]


@pytest.mark.parametrize("check", FLOAT_CHECKS + INT_CHECKS)
@pytest.mark.parametrize("value", BOOLS + NOT_NUMBERS, ids=repr)
def test_no_number_check_takes_bools_arrays_or_non_numbers(check, value):
    if value is None and check is check_probability:
        value = "none"  # check_probability(allow_none=True) is the only one that may take None
    with pytest.raises(TypeError, match="^a must be "):
        check("a", value)


@pytest.mark.parametrize("check", INT_CHECKS)
@pytest.mark.parametrize("value", [2.0, np.float64(2.0), torch.tensor(2.0), 2.5])
def test_integer_checks_take_no_float_even_an_integral_one(check, value):
    with pytest.raises(TypeError, match="^a must be "):
        check("a", value)


def test_type_errors_say_what_was_received():
    with pytest.raises(TypeError, match="a must be a positive integer, got float 2.0$"):
        check_positive_int("a", 2.0)
    with pytest.raises(TypeError, match=r"a must be a number in \[0, 1\], got str '0.5'$"):
        check_probability("a", "0.5")
    with pytest.raises(TypeError, match="a must be a finite number >= 0, got Tensor of shape"):
        check_nonnegative_float("a", torch.ones(2))
    with pytest.raises(TypeError, match="a must be a real number, got NoneType$"):
        check_number("a", None, minimum=0)
    with pytest.raises(ValueError, match=r"a must be a finite number > 0 and <= 2, got 0\.0$"):
        check_number("a", torch.tensor(0.0), minimum=0, strict=True, maximum=2)
    with pytest.raises(ValueError, match=r"a must be a number in \[0, 1\], got 1\.5$"):
        check_probability("a", np.float32(1.5))


def test_int_pairs_flags_choices_and_modules():
    assert check_int_pair("k", (np.int64(3), torch.tensor(1)), minimum=1) == (3, 1)
    assert check_int_pair("k", [2, 2]) == (2, 2)
    with pytest.raises(TypeError, match="k must be an int or a pair of ints"):
        check_int_pair("k", (1, 1, 1))
    with pytest.raises(ValueError, match="k must be >= 1"):
        check_int_pair("k", (1, 0), minimum=1)
    assert check_bool("b", False) is False
    with pytest.raises(TypeError, match="b must be a bool, got int 1$"):
        check_bool("b", 1)
    with pytest.raises(TypeError, match="c must be one of 'x', 'y' \\(a str\\), got NoneType$"):
        check_choice("c", None, ("x", "y"))
    with pytest.raises(ValueError, match="c must be one of 'x', 'y', got 'z'$"):
        check_choice("c", "z", ("x", "y"))
    layer = nn.Linear(1, 1)
    assert check_module("m", layer) is layer and check_module("m", None, allow_none=True) is None
    with pytest.raises(TypeError, match="m must be an nn.Module, got str 'resnet'$"):
        check_module("m", "resnet")
    with pytest.raises(TypeError, match="m must be an nn.Module or None, got type$"):
        check_module("m", nn.Linear, allow_none=True)


# The shared checks' type messages ("<name> must be an nn.Module, got ...", "... or None, got ..."). The same words
# followed by another alternative ("must be a torch.Tensor or a numpy.ndarray") are a different check, which the
# shared ones do not offer, and may be written where it is made.
_GENERIC_TYPE_MESSAGE = re.compile(r" must be (an nn\.Module|a bool|callable|a torch\.Tensor)(?! or (?!None))")


def _checks_written_in(path: pathlib.Path) -> list[str]:
    """Functions of ``path`` named like a shared check, and generic type messages raised inline."""
    import pycoe._validation as validation

    shared = {n for n in validation.__all__ if n.startswith("check_")} | {"check_flag"}
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in shared:
            found.append(f"def {node.name}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _GENERIC_TYPE_MESSAGE.search(node.value):
            found.append(repr(node.value))
    return found


LIBRARY_MODULES = sorted(p for p in (ROOT / "pycoe").rglob("*.py") if p.name != "_validation.py")


@pytest.mark.parametrize("path", LIBRARY_MODULES, ids=lambda p: str(p.relative_to(ROOT / "pycoe")))
def test_every_module_uses_the_shared_checks(path):
    """No module-local copy of a check of pycoe._validation, no generic type message written inline, in every
    module of the library."""
    assert not _checks_written_in(path), f"{path.relative_to(ROOT)}: {_checks_written_in(path)}"


def test_the_check_guard_sees_the_library_and_finds_what_it_looks_for(tmp_path):
    assert len(LIBRARY_MODULES) > 50
    planted = tmp_path / "planted.py"
    planted.write_text(
        "def _check_bool(name, value):\n    pass\n"
        "def f(m):\n    raise TypeError(f'm must be an nn.Module, got {m}')\n"
        "def g(m):\n    raise TypeError(f'm must be callable or None, got {m}')\n"
        "def h(m):\n    raise TypeError(f'm must be a torch.Tensor or a numpy.ndarray, got {m}')\n"  # specific
    )
    assert len(_checks_written_in(planted)) == 3


# ---------------------------------------------------------------------------------------------- modes


def _mixed_mode_model():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a BatchNorm deliberately frozen inside a model in training mode
    return model


def test_eval_mode_restores_every_submodule_and_disables_grad():
    model = _mixed_mode_model()
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == before == [True, True, False, True]
    assert torch.is_grad_enabled()


def test_modes_restored_after_an_exception():
    model = _mixed_mode_model()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"), preserve_training_modes(model):
        model.eval()
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before


# ---------------------------------------------------------------------------------------------- early exit


def test_exit_decision_matches_the_softmax_rule():
    rough = torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 9.0]], dtype=torch.float64)
    confidence, exited = exit_decision(rough, 0.9, 3, rough.device)
    expected = torch.softmax(rough.float(), dim=1).amax(dim=1)
    torch.testing.assert_close(confidence, expected)
    torch.testing.assert_close(rough_confidence(rough), expected)
    assert exited.tolist() == [True, False, True]
    # threshold 0 exits every sample, None none; without rough logits the confidence is NaN
    assert exit_decision(rough, 0.0, 3, rough.device)[1].all()
    assert not exit_decision(rough, None, 3, rough.device)[1].any()
    assert torch.isnan(exit_decision(None, None, 2, torch.device("cpu"))[0]).all()
    with pytest.raises(ValueError, match="the delegator returned rough_logits=None"):
        exit_decision(None, 0.5, 3, rough.device, source="the delegator")


def test_exit_mask_is_inclusive_at_the_threshold():
    """The rule is ``confidence >= threshold``: a confidence exactly on the threshold exits."""
    confidence = torch.tensor([0.25, 0.5, 0.75, 1.0])
    assert exit_mask(confidence, 0.5).tolist() == [False, True, True, True]
    assert exit_mask(confidence, 1.0).tolist() == [False, False, False, True]
    assert exit_mask(confidence, 0.0).all() and not exit_mask(confidence, None).any()
    # through the logits: two equal logits give confidence exactly 0.5
    rough = torch.zeros(2, 2)
    assert exit_decision(rough, 0.5, 2, rough.device)[1].tolist() == [True, True]
    assert exit_decision(rough, 0.5 + 1e-6, 2, rough.device)[1].tolist() == [False, False]
    with pytest.raises(ValueError, match="threshold"):
        exit_mask(confidence, 1.5)
    with pytest.raises(ValueError, match="confidence must have 1"):
        exit_mask(confidence[:, None], 0.5)
    with pytest.raises(TypeError, match="rough_logits must be a floating-point"):
        rough_confidence(torch.zeros(2, 3, dtype=torch.long))


def test_resolve_exit_threshold():
    assert resolve_exit_threshold("default", 0.3) == 0.3
    assert resolve_exit_threshold(None, 0.3) is None
    assert resolve_exit_threshold(1, None) == 1.0
    for bad in (1.5, "high", -0.1):
        with pytest.raises(TypeError if isinstance(bad, str) else ValueError, match="exit_threshold"):
            resolve_exit_threshold(bad, None)


def test_merge_early_exit_against_a_per_sample_loop():
    rough = torch.randn(5, 3)
    exited = torch.tensor([True, False, True, False, False])
    full = torch.randn(5, 3, dtype=torch.float64)
    calls = []

    def run(keep):
        calls.append(keep)
        return full if keep is None else full.index_select(0, keep)

    out = _merge_early_exit(rough, exited, run, what="the experts")
    expected = torch.stack([rough[i].double() if exited[i] else full[i] for i in range(5)])
    assert torch.equal(out, expected) and out.dtype == torch.float64
    assert calls[0].tolist() == [1, 3, 4]
    # nobody exits: one call on the whole batch; everybody exits: no call
    calls.clear()
    assert torch.equal(_merge_early_exit(rough, torch.zeros(5, dtype=torch.bool), run, "the experts"), full)
    assert calls == [None]
    calls.clear()
    assert _merge_early_exit(rough, torch.ones(5, dtype=torch.bool), run, "the experts") is rough and calls == []
    with pytest.raises(ValueError, match="early exit mixes .* outputs of the specialist"):
        _merge_early_exit(rough, exited, lambda keep: torch.zeros(len(keep), 7), "the specialist")


# ---------------------------------------------------------------------------------------------- small helpers


def test_module_lookups_and_tensor_flattening():
    assert module_device(nn.ReLU()) is None and floating_reference(nn.ReLU()) is None
    bn = nn.BatchNorm1d(2, affine=False)  # buffers only; the first one (running_mean) is floating point
    assert module_device(bn) == torch.device("cpu") and floating_reference(bn) is bn.running_mean
    lin = nn.Linear(2, 2, dtype=torch.float64)
    assert floating_reference(lin) is lin.weight
    a, b = torch.zeros(1), torch.ones(2)
    assert [t is u for t, u in zip(tensors_in({"x": (a, 3, [b])}), (a, b))] == [True, True]


def test_expert_index_check():
    assert check_expert_index("i", torch.tensor([0, 2], dtype=torch.int32), 3).dtype == torch.int64
    assert check_expert_index("i", torch.tensor([-1, 2]), 3, allow_exited=True).tolist() == [-1, 2]
    with pytest.raises(ValueError, match=r"i entries must lie in \[0, 3\)"):
        check_expert_index("i", torch.tensor([-1, 2]), 3)
    with pytest.raises(ValueError, match=r"i entries must lie in \[-1 \(exited\), 3\)"):
        check_expert_index("i", torch.tensor([3]), 3, allow_exited=True)
    with pytest.raises(TypeError, match="i must be an integer tensor"):
        check_expert_index("i", torch.tensor([0.0]), 3)
    with pytest.raises(TypeError, match="i must be a torch.Tensor"):
        check_expert_index("i", [0], 3)
    with pytest.raises(ValueError, match="i must have 1 dimensions"):
        check_expert_index("i", torch.zeros(2, 1, dtype=torch.long), 3)


# ---------------------------------------------------------------------------------------------- imports


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of the modules a pycoe source file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_functional_and_routing_know_nothing_of_coe():
    for sub in ("functional", "routing"):
        files = sorted((ROOT / "pycoe" / sub).glob("*.py"))
        assert files
        for path in files:
            imported = _imported_modules(path)
            bad = sorted(m for m in imported if m.split(".")[:2] in (["pycoe", "coe"], ["pycoe", "basisnet"]))
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _package_imports(sub: str, of: tuple[str, ...]) -> dict[str, list[str]]:
    """For each source file of ``pycoe/<sub>`` (recursively), the modules it imports from the packages ``of``
    (module-level and function-level imports alike: ``ast.walk`` sees both)."""
    found = {}
    files = sorted((ROOT / "pycoe" / sub).rglob("*.py"))
    assert files
    for path in files:
        imported = _imported_modules(path)
        hits = sorted(m for m in imported if any(m == f"pycoe.{p}" or m.startswith(f"pycoe.{p}.") for p in of))
        if hits:
            found[str(path.relative_to(ROOT))] = hits
    return found


def test_coe_and_basisnet_meet_only_in_twostage():
    """The two-stage package knows neither model; CoE and BasisNet import nothing of each other. The first stage
    they share (the Delegator), the exit rule, the sweep, prediction and calibration come to both from
    pycoe.twostage."""
    assert _package_imports("twostage", ("coe", "basisnet")) == {}
    assert _package_imports("coe", ("basisnet",)) == {}
    assert _package_imports("basisnet", ("coe",)) == {}
    for sub in ("coe", "basisnet"):
        uses = _package_imports(sub, ("twostage",))
        assert any(path.endswith("model.py") for path in uses), f"pycoe.{sub} does not build on pycoe.twostage"
        assert any("pycoe.twostage.delegator" in modules for modules in uses.values()), f"pycoe.{sub}: no Delegator"


def test_import_pycoe_is_light():
    """A fresh ``import pycoe`` loads neither torchvision, timm, transformers, accelerate nor torch's FLOP counter
    (``count_flops`` imports it lazily; it pulls in torch._prims and triton)."""
    code = textwrap.dedent(
        """
        import sys
        import pycoe
        optional = ("torchvision", "timm", "transformers", "accelerate", "triton", "scipy", "ot")
        heavy = [m for m in sys.modules if m.split(".")[0] in optional]
        heavy += [m for m in sys.modules if m == "torch.utils.flop_counter"]
        print(sorted(heavy)[:20])
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- public API


def _public_modules():
    for path in sorted((ROOT / "pycoe").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if any(part.startswith("_") for part in rel.parts[1:]):
            continue  # private modules and __init__ files
        yield ".".join(rel.parts)


def test_every_public_name_is_listed_in_exactly_one_module_all():
    import importlib

    owners: dict[str, list[str]] = {}
    for name in _public_modules():
        module = importlib.import_module(name)
        for item in getattr(module, "__all__", []):
            obj = getattr(module, item)
            if isinstance(obj, type) or callable(obj):
                assert obj.__module__ == name, f"{name}.__all__ lists {item}, defined in {obj.__module__}"
            owners.setdefault(item, []).append(name)
    duplicates = {k: v for k, v in owners.items() if len(v) > 1}
    assert not duplicates, duplicates
    # a subpackage's __all__ is composed of its modules' (the root's curated list is the one exception)
    for sub in ("coe", "basisnet", "twostage"):
        package = importlib.import_module(f"pycoe.{sub}")
        composed = [
            item
            for name in _public_modules()
            if name.startswith(f"pycoe.{sub}.")
            for item in importlib.import_module(name).__all__
        ]
        assert sorted(package.__all__) == sorted(composed)


def test_the_root_api_is_small():
    names = [n for n in pycoe.__all__ if not isinstance(getattr(pycoe, n), type(pycoe))]
    expected = [
        "Delegator",
        "ExpertPool",
        "CoE",
        "CoELoss",
        "BalancedTransportWeighter",
        "LabelGenerator",
        "balanced_assignment",
        "threshold_sweep",
        "calibrate_exit_threshold",
        "count_flops",
        "PWLU",
        "CondConv2d",
        "convert_activations_to_pwlu",
        "convert_conv2d_to_condconv",
        "realign_pwlu",
        "save_checkpoint",
        "load_checkpoint",
    ]
    assert sorted(names) == sorted(expected)
    modules = {n for n in pycoe.__all__ if n not in names}
    subpackages = {"basisnet", "coe", "cotrain", "functional", "layers", "routing", "twostage"}
    utilities = {"checkpoint", "distributed", "export", "flops", "utils"}
    assert modules == subpackages | utilities


# ---------------------------------------------------------------------------------------------- function size


def _code_lines(lines: list[str], node: ast.AST) -> int:
    """Lines of ``node`` that hold code: blank lines, comments and docstrings (its own and its nested
    functions' and classes') are not counted."""
    docstrings: set[int] = set()
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if (
            isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(
        1
        for i in range(node.lineno, node.end_lineno + 1)
        if i not in docstrings and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")
    )


def test_no_library_function_is_longer_than_80_lines_of_code():
    """Functions read as their steps: at most 80 lines of code each (docstrings, comments and blank lines aside)."""
    too_long = []
    for path in sorted((ROOT / "pycoe").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(lines, node) > 80:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({_code_lines(lines, node)})")
    assert not too_long, too_long


def test_the_function_size_count_skips_docstrings_and_comments():
    source = 'def f(x):\n    """Doc.\n\n    More.\n    """\n    # a comment\n\n    y = x\n    return y\n'
    node = ast.parse(source).body[0]
    assert _code_lines(source.splitlines(), node) == 3  # def, y = x, return y
