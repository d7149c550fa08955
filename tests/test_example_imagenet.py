"""Tests of the image-classification CoE example (``python -m examples.imagenet.train_coe``).

The example trains a few steps on a synthetic set, on a tiny gzip IDX dataset and on a tiny ImageFolder that
the tests write; an interrupted and resumed run must end with exactly the parameters of an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from examples.common import DataUnavailableError
from examples.common.cnn import SmallCNN
from examples.common.fashion_mnist import write_idx
from examples.imagenet import data, figures, kmeans, models, report, train_coe
from examples.imagenet.options import build_parser, finalize_args
from examples.imagenet.runtime import Dist

pytestmark = pytest.mark.slow

# A run of every stage that takes a couple of seconds: one epoch per stage, tiny batches, tiny test set.
FAST = [
    "--epochs-universal",
    "1",
    "--epochs-delegator",
    "1",
    "--epochs-joint",
    "1",
    "--batch-size",
    "32",
    "--expert-width",
    "0.5",
    "--delegator-width",
    "0.25",
    "--no-progress",
    "--threads",
    "1",
    "--thresholds",
    "0.3,0.6,0.9",
]


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    return train_coe.main(["--out-dir", str(tmp_path / name), *FAST, *extra])


# ---------------------------------------------------------------------------------------------------------------
# Data and networks
# ---------------------------------------------------------------------------------------------------------------
def test_augmentation_matches_per_sample_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 2, 5, 4), dtype=torch.uint8)
    out = data.augment_crop_flip(x, 2, g)
    g = torch.Generator().manual_seed(3)  # the same draws, replayed one sample at a time
    dy = torch.randint(0, 5, (6,), generator=g)
    dx = torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    for i in range(6):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        ref = padded[:, dy[i] : dy[i] + 5, dx[i] : dx[i] + 4]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_validation_split_is_disjoint_from_training():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1)
    full = data.InMemoryDataset(images, torch.arange(50) % 10, tuple("abcdefghij"), (0.5,), (0.5,))
    train, val = full.split(12, 30, seed=3)
    got_train, got_val = set(train.images.flatten().tolist()), set(val.images.flatten().tolist())
    assert len(got_train) == 30 and len(got_val) == 12 and not got_train & got_val
    assert torch.equal(train.labels, train.images.flatten().long() % 10)  # images and labels stay paired
    again, val2 = full.split(12, 30, seed=3)
    assert torch.equal(again.images, train.images) and torch.equal(val2.images, val.images)
    rest, _ = full.split(12, None, seed=3)
    assert len(rest) == 38 and set(rest.images.flatten().tolist()) == set(range(50)) - got_val
    with pytest.raises(ValueError, match="validation split must hold 1 to 49 samples"):
        full.split(50, None)


def test_small_cnn_is_delegator_ready():
    from pycoe.twostage.delegator import Delegator

    d = Delegator(SmallCNN(10, 0.25), num_experts=3, num_classes=10)
    out = d(torch.randn(2, 1, 28, 28))
    assert out.selection_logits.shape == (2, 3) and out.rough_logits.shape == (2, 10)
    with pytest.raises(ValueError, match="width"):
        SmallCNN(10, 0.0)
    with pytest.raises(ValueError, match="unknown model"):
        models.build_network("no_such_net", 10)


# ---------------------------------------------------------------------------------------------------------------
# End-to-end runs
# ---------------------------------------------------------------------------------------------------------------
SYN = [
    "--dataset",
    "synthetic",
    "--train-subset",
    "256",
    "--test-subset",
    "96",
    "--baselines",
    "0.25",
    "--image-size",
    "16",
    "--match-flops",
]


def test_synthetic_end_to_end(tmp_path):
    s = _run(tmp_path, "syn", *SYN)
    out = tmp_path / "syn"
    for f in ("results.md", "results.json", "accuracy_vs_flops.png", "expert_load.png", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert (out / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_test"] == 96 and saved["num_val"] == 128  # the synthetic default validation split
    assert sum(s["coe"]["load"]) == 96
    assert sum(map(sum, s["coe"]["class_expert_counts"])) == 96
    # oracle >= every single expert; no-exit FLOPs = delegator + one expert
    assert s["coe"]["oracle_accuracy"] >= max(s["coe"]["per_expert_accuracy"]) - 1e-12
    assert s["flops"]["coe_no_exit"] == pytest.approx(s["flops"]["delegator"] + s["flops"]["expert"])
    names = [b["name"] for b in s["baselines"]]
    matched = [b for b in s["baselines"] if b["matched"]]
    assert len(matched) == 1 and names == ["cnn@0.25", "cnn@0.5", matched[0]["name"]]  # sorted by FLOPs
    # the matched width is the CNN whose FLOPs are closest to the CoE's without exit (delegator + expert)
    assert abs(matched[0]["flops"] / s["flops"]["coe_no_exit"] - 1) < 0.1
    assert "| CoE K=4, no exit" in s["table_markdown"] and "| cascade, exit >=" in s["table_markdown"]
    low = min((x for x in s["sweep"] if x["threshold"] is not None), key=lambda x: x["threshold"])
    assert low["flops_per_sample"] >= s["flops"]["delegator"]
    # every sample exits at threshold 0: the accuracy is the rough head's, the cost the delegator's
    zero = s["curves"]["coe"]["test"][0]
    assert zero["threshold"] == 0.0 and zero["exit_rate"] == 1.0
    assert zero["accuracy"] == pytest.approx(s["coe"]["rough_accuracy"])
    assert zero["flops_per_sample"] == pytest.approx(s["flops"]["delegator"])
    # the cascade without exit is the expert-architecture network alone (plus the rough stage's FLOPs)
    expert = next(b for b in s["baselines"] if b["name"] == "cnn@0.5")
    assert s["cascade"]["accuracy"] == pytest.approx(expert["accuracy"])
    assert s["cascade"]["flops_per_sample"] == pytest.approx(s["flops"]["cascade_first_stage"] + expert["flops"])
    # the thresholds were chosen on the validation split by the budget rule ...
    for name, ex in (("coe", s["exit"]), ("cascade", s["cascade"]["exit"])):
        val = s["curves"][name]["val"]
        no_exit = val[-1]
        assert no_exit["threshold"] is None
        ok = [p for p in val if p["accuracy"] >= no_exit["accuracy"] - 0.003 - 1e-12]
        assert ex["threshold"] in [p["threshold"] for p in ok]
        chosen = next(p for p in val if p["threshold"] == ex["threshold"])
        assert chosen["flops_per_sample"] == min(p["flops_per_sample"] for p in ok)
        assert ex["val"]["accuracy"] == chosen["accuracy"]
    # ... stored in the checkpoint, and the test numbers at that threshold are the model's own on the test set
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["calibration"]["exit_threshold"] == s["exit"]["threshold"]
    assert ckpt["calibration"]["cascade_exit_threshold"] == s["cascade"]["exit"]["threshold"]
    assert saved["exit"]["threshold"] == s["exit"]["threshold"]
    from pycoe.twostage.evaluate import predict

    args = finalize_args(build_parser().parse_args(["--out-dir", str(out), *FAST, *SYN]))
    runner = train_coe.Runner(args, Dist(), torch.device("cpu"))
    runner.build()
    runner.load()
    coe = runner.nets.coe()
    batches = data.eval_batches(args, runner.data.test)
    labels = torch.cat([y for _, y in batches])
    out_t = predict(coe, batches, exit_threshold=s["exit"]["threshold"])
    assert float((out_t.output.argmax(1) == labels).float().mean()) == pytest.approx(s["exit"]["test"]["accuracy"])
    assert float(out_t.exited.float().mean()) == pytest.approx(s["exit"]["test"]["exit_rate"])
    # the cascade exits exactly the samples the CoE exits at the same threshold (the same rough head decides)
    same = report.cascade_at_coe_threshold(s)
    assert same["exit_rate"] == s["exit"]["test"]["exit_rate"]
    for p_coe, p_cascade in zip(s["curves"]["coe"]["test"], s["curves"]["cascade"]["test"]):
        assert p_coe["threshold"] == p_cascade["threshold"] and p_coe["exit_rate"] == p_cascade["exit_rate"]
    # the flat entries the multi-seed driver averages
    e = s["entries"]
    assert e["CoE no exit: top-1"] == pytest.approx(100 * s["coe"]["accuracy"])
    assert e["diff: CoE exit - cascade exit (top-1)"] == pytest.approx(
        100 * (s["exit"]["test"]["accuracy"] - s["cascade"]["exit"]["test"]["accuracy"])
    )
    matched_acc = matched[0]["accuracy"]
    assert e["diff: CoE no exit - FLOPs-matched single"] == pytest.approx(100 * (s["coe"]["accuracy"] - matched_acc))


def test_tiny_idx_dataset(tmp_path):
    # a tiny Fashion-MNIST lookalike in gzip IDX files: class k = a bright k-th row band
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "fm"
    root.mkdir()
    for split, n in (("train", 160), ("t10k", 60)):
        y = torch.arange(n) % 10
        x = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i in range(n):
            x[i, 2 * y[i] + 4 : 2 * y[i] + 7] = 250
        write_idx(root / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", y.to(torch.uint8))
    train, test = data.fashion_mnist(root)
    assert train.images.shape == (160, 1, 28, 28) and test.labels.shape == (60,)
    assert train.classes[0] == "T-shirt/top"
    with pytest.raises(ValueError, match=r"--val-size must be in \[1, 159\] for 160 training images"):
        _run(tmp_path, "idx", "--dataset", "fashion-mnist", "--data-dir", str(root), "--baselines", "")
    s = _run(
        tmp_path, "idx", "--dataset", "fashion-mnist", "--data-dir", str(root), "--baselines", "", "--val-size", "40"
    )
    assert s["num_test"] == 60 and s["num_val"] == 40
    assert [b["name"] for b in s["baselines"]] == ["cnn@0.5"]


def test_imagefolder_path(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "imnet"
    colours = {"n01": (220, 30, 30), "n02": (30, 200, 40), "n03": (20, 40, 210)}
    for split, n in (("train", 8), ("val", 3)):
        for cls, rgb in colours.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(-30, 30, (32, 32, 3), generator=g)
                arr = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / split / cls / f"img{i}.png")
    s = _run(
        tmp_path,
        "folder",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(root),
        "--image-size",
        "32",
        "--expert",
        "cnn",
        "--delegator",
        "cnn",
        "--baselines",
        "",
        "-K",
        "2",
        "--batch-size",
        "8",
    )
    assert s["num_test"] == 9
    assert s["classes"] == ["n01", "n02", "n03"]
    assert len(s["coe"]["load"]) == 2
    with pytest.raises(DataUnavailableError, match="train/ and val/"):
        data.build_imagefolder(tmp_path / "nothing")


@pytest.mark.parametrize("variant", [[], ["--pwlu", "--condconv"]], ids=["plain", "pwlu+condconv"])
def test_resume_gives_the_same_parameters(tmp_path, variant):
    common = [
        "--dataset",
        "synthetic",
        "--train-subset",
        "128",
        "--test-subset",
        "32",
        "--image-size",
        "12",
        "--baselines",
        "0.25",
        "--epochs-universal",
        "2",
        "--epochs-joint",
        "2",
        "--no-figures",
        *variant,
    ]
    full = train_coe.main(["--out-dir", str(tmp_path / "full"), *FAST, *common])
    assert not full.get("stopped")
    # interrupted twice: in the middle of stage 1, then in the middle of the joint stage
    first = train_coe.main(["--out-dir", str(tmp_path / "cut"), *FAST, *common, "--stop-after-epochs", "1"])
    assert first == {"stopped": True, "phase": "universal", "epoch": 1}
    second = train_coe.main(
        ["--out-dir", str(tmp_path / "cut"), *FAST, *common, "--resume", "--stop-after-epochs", "3"]
    )
    assert second["stopped"] and second["phase"] == "joint" and second["epoch"] == 1
    train_coe.main(["--out-dir", str(tmp_path / "cut"), *FAST, *common, "--resume"])
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["phase_name"] == b["phase_name"] == "done"
    assert a["models"].keys() == b["models"].keys() and len(a["models"]) >= 4
    for name in a["models"]:
        for key, value in a["models"][name].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b["models"][name][key]), f"{name}.{key}"
            else:  # extra state (PWLU's phase)
                assert value == b["models"][name][key], f"{name}.{key}"
    # and training did move the parameters (so the comparison is not vacuous)
    fresh = train_coe.Runner(
        finalize_args(build_parser().parse_args(["--out-dir", str(tmp_path / "x"), *FAST, *common])),
        Dist(),
        torch.device("cpu"),
    )
    fresh.build()
    w = fresh.models["universal"].state_dict()
    assert any(
        not torch.equal(w[k], a["models"]["universal"][k])
        for k in w
        if torch.is_tensor(w[k]) and w[k].is_floating_point()
    )
    assert (
        json.loads((tmp_path / "cut" / "results.json").read_text())["coe"]
        == json.loads((tmp_path / "full" / "results.json").read_text())["coe"]
    )
    if variant:  # the PWLUs were realigned after the first epoch, and that state survived the resume
        from pycoe.layers.pwlu import PWLU

        coe = train_coe.Runner(
            finalize_args(build_parser().parse_args(["--out-dir", str(tmp_path / "cut"), *FAST, *common, "--resume"])),
            Dist(),
            torch.device("cpu"),
        )
        coe.build()
        coe.load()
        pwlus = [m for m in coe.models["coe"].modules() if isinstance(m, PWLU)]
        assert pwlus and not any(m.collecting for m in pwlus)


def test_resume_refuses_other_options(tmp_path):
    args = [
        "--out-dir",
        str(tmp_path / "r"),
        *FAST,
        "--dataset",
        "synthetic",
        "--train-subset",
        "64",
        "--test-subset",
        "16",
        "--image-size",
        "12",
        "--baselines",
        "",
        "--no-figures",
    ]
    train_coe.main([*args, "--stop-after-epochs", "1"])
    with pytest.raises(ValueError, match="num_experts"):
        train_coe.main([*args, "--resume", "-K", "3"])
    with pytest.raises(ValueError, match="val_size"):
        train_coe.main([*args, "--resume", "--val-size", "20"])


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, capsys):
    args = [*FAST, "--dataset", "synthetic", "--train-subset", "64", "--test-subset", "16", "--image-size", "12"]
    args += ["--baselines", "", "--no-figures", "--stop-after-epochs", "2"]
    first = train_coe.main(["--out-dir", str(tmp_path / "a"), *args, "--resume"])
    log = capsys.readouterr()
    assert "--resume: no checkpoint at" in log.out + log.err and "starting fresh" in log.out + log.err
    plain = train_coe.main(["--out-dir", str(tmp_path / "b"), *args])
    assert first == plain == {"stopped": True, "phase": "joint", "epoch": 0}
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for key, value in a["models"]["universal"].items():
        assert torch.equal(value, b["models"]["universal"][key])


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--epsilon", "1.5", "--epsilon must be in"),
        ("--exit-threshold", "2", "--exit-threshold must be in"),
        ("--num-experts", "0", "--num-experts must be a positive integer"),
        ("--epochs-joint", "-1", "--epochs-joint must be >= 0"),
        ("--thresholds", "0.5,3", "--thresholds must be numbers in"),
        ("--kmeans-samples", "0", "--kmeans-samples must be a positive integer"),
        ("--val-size", "0", "--val-size must be a positive integer"),
        ("--max-accuracy-drop", "-0.1", "--max-accuracy-drop must be in"),
        ("--max-mflops", "0", "--max-mflops must be > 0"),
        ("--thresholds", "0.5,x", "--thresholds must be numbers in"),
    ],
)
def test_bad_options(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        train_coe.main(["--out-dir", str(tmp_path), "--dataset", "synthetic", flag, value])


def test_imagefolder_needs_data_dir(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        train_coe.main(
            [
                "--out-dir",
                str(tmp_path),
                "--dataset",
                "imagefolder",
                "--expert",
                "cnn",
                "--delegator",
                "cnn",
                "--image-size",
                "32",
            ]
        )


# ---------------------------------------------------------------------------------------------------------------
# DDP (two gloo processes, as under torchrun)
# ---------------------------------------------------------------------------------------------------------------
def _ddp_rank(rank, world_size, out_dir, variant):
    import torch.distributed as dist

    from examples.imagenet.runtime import setup_distributed

    argv = [
        "--out-dir",
        out_dir,
        *FAST,
        "--dataset",
        "synthetic",
        "--train-subset",
        "128",
        "--test-subset",
        "32",
        "--image-size",
        "12",
        "--baselines",
        "",
        "--no-figures",
        "--epochs-universal",
        "2",
        *variant,
    ]
    args = finalize_args(build_parser().parse_args(argv))
    args.no_channels_last = True  # as main() does under DDP
    torch.set_num_threads(1)
    runner = train_coe.Runner(args, setup_distributed(torch.device("cpu")), torch.device("cpu"))
    result = runner.run()
    assert dist.is_initialized()  # the example used the existing process group and left it alone
    ckpt = torch.load(Path(out_dir) / "checkpoint.pt", weights_only=True) if rank == 0 else None
    # DDP keeps the parameters identical on every rank (PWLU realignment is broadcast from rank 0)
    params = {k: float(sum(p.double().sum() for p in m.parameters())) for k, m in runner.models.items()}
    return {
        "rank": rank,
        "table": bool(result.get("table_markdown")),
        "phase": ckpt["phase_name"] if ckpt else None,
        "params": params,
    }


@pytest.mark.distributed
@pytest.mark.parametrize("variant", [[], ["--pwlu"]], ids=["plain", "pwlu"])
def test_runs_under_ddp(tmp_path, variant):
    from _distributed import run_distributed

    out = run_distributed(_ddp_rank, world_size=2, args=(str(tmp_path / "ddp"), variant), timeout=240)
    assert out[0]["table"] and out[0]["phase"] == "done"
    assert not out[1]["table"] and out[1]["phase"] is None  # only rank 0 reports and writes
    assert out[0]["params"] == out[1]["params"]
    saved = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert saved["world_size"] == 2 and saved["config"]["wgm_scope"] == "global"


def test_width_only_for_the_cnn(tmp_path):
    with pytest.raises(ValueError, match="--expert-width only applies to the 'cnn' expert"):
        train_coe.main(
            ["--out-dir", str(tmp_path), "--dataset", "synthetic", "--expert", "resnet18", "--expert-width", "2"]
        )


# ---------------------------------------------------------------------------------------------------------------
# --selection-init kmeans
# ---------------------------------------------------------------------------------------------------------------
def test_balanced_kmeans_against_brute_force():
    # 8 points in two tight, unequal groups (6 + 2): the balanced 2-means must split them 4 + 4, and its
    # partition must be the best balanced partition for its own centres (brute force over all 4-subsets)
    import itertools

    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(6, 2, generator=g) * 0.1, torch.randn(2, 2, generator=g) * 0.1 + 5.0])
    centres, assign, iterations = kmeans.balanced_kmeans(z, 2, torch.Generator().manual_seed(1))
    assert torch.bincount(assign, minlength=2).tolist() == [4, 4]
    assert 1 <= iterations <= 30
    d2 = torch.cdist(z, centres).pow(2)
    cost = d2.gather(1, assign[:, None]).sum()
    best = min(
        d2[list(s), 0].sum() + d2[[i for i in range(8) if i not in s], 1].sum()
        for s in itertools.combinations(range(8), 4)
    )
    assert float(cost) == pytest.approx(float(best), abs=1e-5)
    # the centres are the means of their clusters (the iteration converged)
    for j in range(2):
        assert torch.allclose(centres[j], z[assign == j].mean(0), atol=1e-6)


def test_kmeans_selection_head_is_the_nearest_centroid_rule():
    from pycoe.twostage.delegator import Delegator

    args = finalize_args(
        build_parser().parse_args(["--dataset", "synthetic", "-K", "3", "--kmeans-samples", "90", "--no-channels-last"])
    )
    train, _ = data.make_synthetic(num_train=120, num_test=8, image_size=12, seed=0)
    torch.manual_seed(0)
    d = Delegator(SmallCNN(10, 0.25), num_experts=3, num_classes=10).train()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    km = kmeans.kmeans_start(args, d, train, torch.device("cpu"))
    assert d.training  # the modes are restored
    # only the selection head changed (BN running statistics untouched: features ran in eval mode)
    for k, v in d.state_dict().items():
        assert torch.equal(v, before[k]) == (not k.startswith("selection_head")), k
    assert len(km["indices"]) == 90 and torch.bincount(km["assignment"], minlength=3).tolist() == [30, 30, 30]
    # reference: standardise the features, compute (2 z.c - |c|^2) / T directly
    d.eval()
    x = data.TensorBatches(train, 200, False).normalize(train.images[km["indices"]])
    with torch.no_grad():
        f = d.features(x)
        z = (f - km["mean"]) / km["std"]
        ref = (2 * z @ km["centres"].T - (km["centres"] ** 2).sum(1)) / km["temperature"]
        got = d(x).selection_logits
    assert torch.allclose(got, ref, atol=1e-4)
    nearest = torch.cdist(z, km["centres"]).argmin(1)
    assert torch.equal(got.argmax(1), nearest)
    # deterministic given the seed
    d2 = Delegator(SmallCNN(10, 0.25), num_experts=3, num_classes=10)
    d2.load_state_dict(before)
    kmeans.kmeans_start(args, d2, train, torch.device("cpu"))
    assert torch.equal(d2.selection_head.weight, d.selection_head.weight)


def test_kmeans_selection_init_end_to_end(tmp_path):
    s = _run(
        tmp_path,
        "km",
        "--dataset",
        "synthetic",
        "--train-subset",
        "128",
        "--test-subset",
        "32",
        "--image-size",
        "12",
        "--baselines",
        "",
        "--no-figures",
        "--selection-init",
        "kmeans",
    )
    r = s["coe"]["routing"]
    assert 0.0 <= r["routed_correct_given_oracle"] <= 1.0
    assert s["config"]["selection_init"] == "kmeans"


# ---------------------------------------------------------------------------------------------------------------
# Several seeds
# ---------------------------------------------------------------------------------------------------------------
def test_seed_driver_aggregates_every_entry(tmp_path):
    import statistics

    from examples.imagenet import run_seeds

    tiny = [*FAST, "--dataset", "synthetic", "--train-subset", "96", "--test-subset", "32", "--image-size", "12"]
    tiny += ["--no-figures", "--baselines", "", "--match-flops"]
    result = run_seeds.main(["--seeds", "3,4", "--jobs", "2", "--out-dir", str(tmp_path), "--", *tiny])
    runs = [json.loads((tmp_path / f"seed{s}" / "results.json").read_text()) for s in (3, 4)]
    assert [r["config"]["seed"] for r in runs] == [3, 4]
    assert result["seeds"] == [3, 4] and set(result["wall_seconds"]) == {3, 4}
    for name, e in result["entries"].items():
        values = [r["entries"][name] for r in runs]
        assert e["values"] == values and e["n"] == 2
        assert e["mean"] == pytest.approx(statistics.fmean(values))
        assert e["std"] == pytest.approx(statistics.stdev(values))
    assert "diff: CoE no exit - FLOPs-matched single" in result["entries"]
    assert "diff: CoE exit - cascade exit (top-1)" in result["entries"]
    md = (tmp_path / "aggregate.md").read_text()
    assert "Paired differences" in md and "CoE no exit - FLOPs-matched single" in md
    # aggregating again from the files gives the same numbers, wall times included
    again = run_seeds.main(["--out-dir", str(tmp_path), "--aggregate-only"])
    assert again["entries"] == json.loads(json.dumps(result["entries"]))
    assert again["wall_seconds"] == result["wall_seconds"]
    with pytest.raises(SystemExit):
        run_seeds.main(["--seeds", "1,1", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        run_seeds.main(["--out-dir", str(tmp_path), "--", "--seed", "3"])


def test_figure_labels_do_not_collide():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    # crowded points, as the thresholds 0.98 / 0.99 / 0.995 / 0.999 of a trained CoE are
    xs = [1.0, 1.02, 1.04, 1.05, 3.0, 5.0]
    ys = [80.0, 80.05, 80.1, 80.1, 85.0, 86.0]
    ax.plot(xs, ys, "o")
    ax.legend(["points"], loc="lower right")
    items = [
        {"x": x, "y": y, "text": f"0.99{i}", "color": "k", "required": i >= 4} for i, (x, y) in enumerate(zip(xs, ys))
    ]
    placed = figures.place_labels(ax, items, list(zip(xs, ys)))
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in placed]
    texts = [t.get_text() for t in placed]
    assert "0.994" in texts and "0.995" in texts  # required labels are always placed
    for i, a in enumerate(boxes):  # no two labels overlap
        for b in boxes[i + 1 :]:
            assert a.x1 <= b.x0 + 1 or b.x1 <= a.x0 + 1 or a.y1 <= b.y0 + 1 or b.y1 <= a.y0 + 1
    markers = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    for t, box in zip(placed, boxes):  # and no label covers a marker's centre
        for mx, my in markers:
            assert not (box.x0 < mx < box.x1 and box.y0 < my < box.y1), t.get_text()
    plt.close(fig)


def test_rough_temperature_fit_against_a_grid():
    g = torch.Generator().manual_seed(0)
    logits = 4.0 * torch.randn(300, 5, generator=g)  # over-confident logits: the fitted T is > 1
    labels = torch.where(torch.rand(300, generator=g) < 0.6, logits.argmax(1), torch.randint(0, 5, (300,), generator=g))
    t, before, after = models.fit_rough_temperature(logits, labels)
    grid = torch.linspace(0.05, 20, 20000, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits.double() / s, labels) for s in grid])
    assert t == pytest.approx(float(grid[nll.argmin()]), rel=2e-3)
    assert after == pytest.approx(float(nll.min()), abs=1e-7) and after < before
    assert before == pytest.approx(float(torch.nn.functional.cross_entropy(logits.double(), labels)))
    assert t > 1.0


def test_scaled_rough_head_divides_the_logits_and_restores():
    from pycoe.twostage.delegator import Delegator

    d = Delegator(SmallCNN(10, 0.25), num_experts=2, num_classes=10).eval()
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        before = d(x).rough_logits
        with models.scaled_rough_head(d, 2.5):
            scaled = d(x).rough_logits
        after = d(x).rough_logits
    assert torch.allclose(scaled, before / 2.5, atol=1e-6) and torch.equal(after, before)


def test_fit_temperature_end_to_end(tmp_path):
    s = _run(tmp_path, "temp", *SYN[:-1], "--no-figures", "--fit-temperature")
    temp = s["temperature"]
    assert temp["T"] > 0 and temp["val_cross_entropy"][1] <= temp["val_cross_entropy"][0] + 1e-9
    for name in ("coe", "cascade"):
        assert 0.0 <= temp[name]["test"]["accuracy"] <= 1.0
    assert "CoE exit, T-scaled rough head: top-1" in s["entries"]
    assert "temperature T=" in s["table_markdown"]
