"""The README's quickstart code block runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_one_quickstart_block():
    assert len(_python_blocks()) == 1


def test_readme_quickstart_runs(capsys):
    namespace: dict = {}
    exec(compile(_python_blocks()[0], str(README), "exec"), namespace)
    pred = namespace["pred"]
    assert pred.output.shape == (8, 10)
    assert pred.expert_index.shape == (8,)
    assert "torch.Size([8, 10])" in capsys.readouterr().out


def test_readme_commands_are_two_one_liners():
    text = README.read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(bash) == 2
    assert all(block.strip().count("\n") == 0 for block in bash)
