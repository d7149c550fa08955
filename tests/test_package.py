"""The package metadata and the PyPI description: what a user sees before cloning anything."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _description() -> Path:
    return ROOT / PYPROJECT["project"]["readme"]["file"]


def test_description_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", _description().read_text(), flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], str(_description()), "exec"), namespace)
    pred = namespace["pred"]
    assert pred.output.shape == (16, 10) and pred.expert_index.shape == (16,)
    assert namespace["loss"].requires_grad


def test_description_has_no_clone_relative_commands_or_links():
    text = _description().read_text()
    assert "-e ." not in text and '-e "' not in text
    assert "](" not in text or all(link.startswith("http") for link in re.findall(r"\]\(([^)]*)\)", text))


def test_license_is_an_spdx_expression_without_classifier():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))


def test_sdist_manifest_carries_what_the_tests_need():
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    for needed in ("tests", "examples", "README.md"):
        assert needed in manifest
