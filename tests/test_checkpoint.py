"""Tests of pycoe.checkpoint (atomic save, weights_only load)."""

import os
import pickle
import random

import pytest
import torch
from torch import nn

from pycoe.checkpoint import load_checkpoint, save_checkpoint


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _leftovers(directory):
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


def test_round_trip(tmp_path):
    delegator = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    experts = [nn.Linear(4, 2) for _ in range(3)]
    opt = torch.optim.SGD(delegator.parameters(), lr=0.1, momentum=0.9)
    delegator(torch.randn(5, 3)).sum().backward()
    opt.step()
    obj = {
        "delegator": delegator.state_dict(),
        "experts": {str(i): e.state_dict() for i, e in enumerate(experts)},
        "optimizer": opt.state_dict(),
        "epoch": 7,
        "best_acc": 0.8125,
        "name": "coe",
        "flags": [True, None, (1, 2.5)],
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "dtype": torch.float16,
    }
    path = tmp_path / "ckpt.pt"
    save_checkpoint(obj, path)
    loaded = load_checkpoint(path)
    _assert_same(obj, loaded)
    assert _leftovers(tmp_path) == []

    # The loaded RNG states restore the random streams.
    torch.set_rng_state(obj["torch_rng"])
    random.setstate(obj["python_rng"])
    expected = (torch.rand(4), random.random())
    torch.manual_seed(123)
    random.seed(123)
    torch.set_rng_state(loaded["torch_rng"])
    random.setstate(loaded["python_rng"])
    got = (torch.rand(4), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]

    # Loading into fresh modules reproduces them.
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fresh.load_state_dict(loaded["delegator"])
    _assert_same(fresh.state_dict(), delegator.state_dict())


def test_overwrite_replaces(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path) == {"step": 2}
    assert _leftovers(tmp_path) == []


def test_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"w": torch.arange(3)}, path)
    before = path.read_bytes()

    # 1. An object that cannot be pickled.
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint({"f": lambda: 1}, path)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []

    # 2. torch.save crashing after writing part of the file.
    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _leftovers(tmp_path) == []

    # 3. Picklable, but not loadable with weights_only: rejected at save time by verify.
    with pytest.raises(ValueError, match="weights_only"):
        save_checkpoint({"m": nn.Linear(2, 2)}, path)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))


def test_failure_without_previous_checkpoint_leaves_nothing(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 (whatever pickle raises for a lambda)
        save_checkpoint({"f": lambda: 1}, tmp_path / "new.pt")
    assert os.listdir(tmp_path) == []


class _Arbitrary:
    def __init__(self):
        self.x = 1


def test_load_rejects_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": _Arbitrary()}, path)  # written without pycoe, as a foreign file would be
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_checkpoint(path)
    # With verify=False pycoe can write it, and still refuses to load it.
    path2 = tmp_path / "evil2.pt"
    save_checkpoint({"obj": _Arbitrary()}, path2, verify=False)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path2)


def test_map_location(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"t": torch.ones(2)}, path)
    assert load_checkpoint(path, map_location=torch.device("cpu"))["t"].device.type == "cpu"


def test_bad_input(tmp_path):
    with pytest.raises(TypeError, match="path"):
        save_checkpoint({}, 3)
    with pytest.raises(TypeError, match="path"):
        load_checkpoint(None)
    with pytest.raises(ValueError, match="path must name the checkpoint file, got an empty string"):
        save_checkpoint({}, "")
    with pytest.raises(TypeError, match="verify must be a bool, got str 'no'"):
        save_checkpoint({}, tmp_path / "c.pt", verify="no")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint({}, tmp_path / "missing_dir" / "c.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def _write_zip(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("random.pt", lambda p: p.write_bytes(bytes(range(256)) * 4)),
        ("text.pt", lambda p: p.write_text("hello world\n" * 10)),
        ("empty.pt", lambda p: p.write_bytes(b"")),
        ("other.zip", _write_zip),
        ("pickle.pkl", lambda p: p.write_bytes(pickle.dumps({"a": 1}))),
    ],
)
def test_load_says_not_a_checkpoint_and_never_suggests_unsafe_loading(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match="is not a pycoe/torch checkpoint") as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)
    assert "truncated or corrupt?" in str(info.value)


def test_load_truncated_checkpoint(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"w": torch.arange(1000.0)}, good)
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 10):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a pycoe/torch checkpoint"):
            load_checkpoint(bad)


def test_unsafe_types_are_named(tmp_path):
    path = tmp_path / "module.pt"
    torch.save({"m": nn.Linear(2, 2)}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load_checkpoint(path)
