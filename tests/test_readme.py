"""The README's code blocks run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_quickstart_and_the_hugging_face_blocks():
    blocks = _python_blocks()
    assert len(blocks) == 2
    assert "torchvision" in blocks[0] and "transformers" in blocks[1]


def test_readme_quickstart_runs(capsys):
    namespace: dict = {}
    exec(compile(_python_blocks()[0], str(README), "exec"), namespace)
    pred = namespace["pred"]
    assert pred.output.shape == (8, 10)
    assert pred.expert_index.shape == (8,)
    assert "torch.Size([8, 10])" in capsys.readouterr().out


def test_readme_hugging_face_block_runs(capsys):
    namespace: dict = {}
    exec(compile(_python_blocks()[1], str(README), "exec"), namespace)
    assert namespace["loss"].dim() == 0 and namespace["info"]["load"].sum() == 8
    assert all(p.grad is not None for p in namespace["model"].delegator.selection_head.parameters())
    assert "torch.Size([8, 7])" in capsys.readouterr().out


def test_readme_hugging_face_section_names_the_extra_it_needs():
    text = README.read_text()
    section = text[text.index("## Hugging Face models") :]
    assert "`transformers` extra" in section[: section.index("```python")]


def test_readme_commands_are_two_one_liners():
    text = README.read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(bash) == 2
    assert all(block.strip().count("\n") == 0 for block in bash)


@pytest.mark.slow  # a Python process that imports torch: seconds, more on a busy machine
def test_readme_main_command_runs_the_example_module():
    """The main command ends in ``.venv/bin/python -m <module>``, run from the repository root: that module must
    exist and start (``--help``) exactly that way."""
    import subprocess
    import sys

    main_command = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0].strip()
    match = re.search(r"&& \.venv/bin/python -m ([\w.]+)$", main_command)
    assert match, main_command
    done = subprocess.run(
        [sys.executable, "-m", match.group(1), "--help"], cwd=README.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"usage: python -m {match.group(1)}" in done.stdout


def test_readme_quickstart_names_the_extra_it_needs():
    text = README.read_text()
    quickstart = text[text.index("## Quickstart") : text.index("```python")]
    assert "torchvision." in _python_blocks()[0]  # the snippet builds torchvision models
    assert "`vision` extra" in quickstart and '".[vision]"' in quickstart
