"""The Divide-and-Co-training example (``python -m examples.divide_and_cotrain.train``) runs on synthetic data,
validates, aggregates seeds, and resumes exactly."""

import json

import pytest
import torch

from examples.divide_and_cotrain import train


def _argv(out, *extra):
    return [
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "128",
        "48",
        "--val-size",
        "32",
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


def test_runs_and_writes_the_report(tmp_path):
    summary = train.main(_argv(tmp_path, "--epochs", "1"))
    results = summary["runs"][0]["results"]
    assert [r["S"] for r in results] == [1, 2]
    for r in results:
        assert len(r["member_accs"]) == r["S"] and 0.0 <= r["ensemble_acc"] <= 1.0
    two = results[1]
    assert two["params_total"] == 2 * two["params_per_member"]
    assert abs(two["params_total"] / results[0]["params_total"] - 1) < 0.2  # about equal totals
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["results"][1]["member_accs"] == two["member_accs"]
    assert "| S |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy_vs_splits.png").stat().st_size > 0
    assert (summary["train_images"], summary["val_images"], summary["test_images"]) == (96, 32, 48)


def test_validation_split_is_disjoint_and_fixed():
    train_idx, val_idx = train.split_train_val(100, 30, split_seed=3)
    assert len(val_idx) == 30 and len(train_idx) == 70
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(100))
    again, _ = train.split_train_val(100, 30, split_seed=3)
    assert torch.equal(again, train_idx)
    with pytest.raises(SystemExit, match="--val-size"):
        train.split_train_val(100, 100, split_seed=0)


def test_seeds_are_aggregated_with_paired_differences(tmp_path):
    summary = train.main(_argv(tmp_path, "--epochs", "2", "--seeds", "0", "1", "--keep", "best"))
    runs = summary["runs"]
    assert [run["seed"] for run in runs] == [0, 1]
    for run in runs:
        for r in run["results"]:
            # the kept epoch is the one with the best validation accuracy (the first of equals)
            val = [h["val_acc"] for h in r["history"]]
            assert r["kept_epoch"] == 1 + val.index(max(val)) and r["val_acc"] == max(val)
    for i, row in enumerate(summary["aggregate"]):
        values = [run["results"][i]["ensemble_acc"] for run in runs]
        mean = sum(values) / 2
        assert row["ensemble_acc"]["mean"] == pytest.approx(mean)
        assert row["ensemble_acc"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    (diff,) = [d for d in summary["paired_differences"] if d["metric"] == "ensemble_acc"]
    for run in runs:
        by_s = {r["S"]: r["ensemble_acc"] for r in run["results"]}
        assert diff["per_seed"][run["seed"]] == pytest.approx(by_s[2] - by_s[1])
    assert "S=2 minus S=1" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "seed1" / "S2" / "result.json").exists()


def test_resume_continues_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train.main(_argv(straight, "--epochs", "2", "--splits", "2"))
    stopped = train.main(_argv(interrupted, "--epochs", "2", "--splits", "2", "--stop-after-epoch", "1"))
    assert stopped["stopped"] and not (interrupted / "seed0" / "S2" / "result.json").exists()
    # a second invocation with --resume picks up after epoch 1
    resumed = train.main(_argv(interrupted, "--epochs", "2", "--splits", "2", "--resume"))
    a = torch.load(straight / "seed0" / "S2" / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "seed0" / "S2" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    ref = json.loads((straight / "seed0" / "S2" / "result.json").read_text())
    assert resumed["runs"][0]["results"][0]["member_accs"] == ref["member_accs"]
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]


def test_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        train.main(_argv(tmp_path, "--splits", "0"))
    with pytest.raises(SystemExit, match="--seeds"):
        train.main(_argv(tmp_path, "--seeds", "1", "1"))
    with pytest.raises(SystemExit, match="--keep best"):
        train.main(_argv(tmp_path, "--val-size", "0"))


def test_fashion_mnist_is_normalised_from_the_shared_reader(tmp_path):
    from examples.common.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, write_idx

    images = torch.randint(0, 256, (6, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", torch.arange(6, dtype=torch.uint8))
    train_set, test_set = train.fashion_mnist(tmp_path)
    assert train_set.images.shape == (6, 1, 28, 28) and train_set.labels.tolist() == list(range(6))
    want = (images.double() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert torch.allclose(test_set.images[:, 0].double(), want, atol=1e-6)
