"""The Divide-and-Co-training example runs on synthetic data, writes its report, and resumes exactly."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "divide_and_cotrain" / "train.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("divide_and_cotrain_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(out, *extra):
    return [
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "96",
        "48",
        "--splits",
        "1",
        "2",
        "--base-width",
        "8",
        "--batch-size",
        "32",
        "--eval-batch-size",
        "48",
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]


def test_runs_and_writes_the_report(train, tmp_path):
    summary = train.main(_argv(tmp_path, "--epochs", "1"))
    assert [r["S"] for r in summary["results"]] == [1, 2]
    for r in summary["results"]:
        assert len(r["member_accs"]) == r["S"] and 0.0 <= r["ensemble_acc"] <= 1.0
    two = summary["results"][1]
    assert two["params_total"] == 2 * two["params_per_member"]
    assert abs(two["params_total"] / summary["results"][0]["params_total"] - 1) < 0.2  # about equal totals
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"][1]["member_accs"] == two["member_accs"]
    assert "| S |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy_vs_splits.png").stat().st_size > 0


def test_resume_continues_exactly(train, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train.main(_argv(straight, "--epochs", "2", "--splits", "2"))
    stopped = train.main(_argv(interrupted, "--epochs", "2", "--splits", "2", "--stop-after-epoch", "1"))
    assert stopped["stopped"] and not (interrupted / "S2" / "result.json").exists()
    # a second invocation with --resume picks up after epoch 1
    resumed = train.main(_argv(interrupted, "--epochs", "2", "--splits", "2", "--resume"))
    a = torch.load(straight / "S2" / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "S2" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    ref = json.loads((straight / "S2" / "result.json").read_text())
    assert resumed["results"][0]["member_accs"] == ref["member_accs"]
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]


def test_idx_reader_and_bad_splits(train, tmp_path):
    import gzip
    import struct

    import numpy as np

    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 2, 3, 4) + data.tobytes())
    assert np.array_equal(train.read_idx(path), data)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        train.read_idx(bad)
    with pytest.raises(SystemExit):
        train.main(_argv(tmp_path, "--splits", "0"))
