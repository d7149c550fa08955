"""MultiViewDataset and multiview_collate."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pycoe.cotrain.views import MultiViewDataset, multiview_collate


def _random_shift(x):
    """A random augmentation: roll by a random offset and add small noise (uses the global generator)."""
    shift = int(torch.randint(-3, 4, ()))
    return torch.roll(x, shifts=shift, dims=-1) + 0.01 * torch.randn_like(x)


def _base(n=10):
    return TensorDataset(torch.randn(n, 1, 6, 6), torch.arange(n) % 3)


def test_views_are_independent_and_share_the_target():
    ds = MultiViewDataset(_base(), _random_shift, num_views=4)
    assert len(ds) == 10
    views, target = ds[2]
    assert isinstance(views, list) and len(views) == 4
    assert int(target) == 2 % 3
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(views[i], views[j])  # each view has its own random draw
    # a deterministic transform gives identical views (only the randomness differs)
    views, _ = MultiViewDataset(_base(), lambda x: x * 2, num_views=3)[1]
    assert all(torch.equal(v, views[0]) for v in views)


def test_views_follow_the_generator():
    ds = MultiViewDataset(_base(), _random_shift, num_views=2)
    torch.manual_seed(5)
    a = ds[0][0]
    torch.manual_seed(5)
    b = ds[0][0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_collate_through_a_dataloader():
    ds = MultiViewDataset(_base(), _random_shift, num_views=3, target_transform=lambda t: t + 10)
    loader = DataLoader(ds, batch_size=4, collate_fn=multiview_collate)
    views, target = next(iter(loader))
    assert len(views) == 3 and all(v.shape == (4, 1, 6, 6) for v in views)
    assert target.tolist() == [10, 11, 12, 10]
    assert not torch.equal(views[0], views[1])


def test_bad_input():
    with pytest.raises(ValueError, match="num_views"):
        MultiViewDataset(_base(), _random_shift, num_views=0)
    with pytest.raises(TypeError, match="num_views must be a positive integer, got float"):
        MultiViewDataset(_base(), _random_shift, num_views=2.0)
    with pytest.raises(TypeError, match=r"target_transform must be callable \(target -> target\) or None"):
        MultiViewDataset(_base(), _random_shift, num_views=2, target_transform=3)
    with pytest.raises(TypeError, match="batch must be a sequence of .* got str"):
        multiview_collate("abc")
    with pytest.raises(TypeError, match="transform must be callable"):
        MultiViewDataset(_base(), "flip", num_views=2)
    with pytest.raises(TypeError, match="map-style"):
        MultiViewDataset(42, _random_shift, num_views=2)
    with pytest.raises(TypeError, match=r"\(sample, target\) pairs"):
        MultiViewDataset([torch.zeros(2)], _random_shift, num_views=2)[0]
    with pytest.raises(ValueError, match="same number of views"):
        multiview_collate([([torch.zeros(2)] * 2, 0), ([torch.zeros(2)] * 3, 1)])
    with pytest.raises(ValueError, match="non-empty"):
        multiview_collate([])
    with pytest.raises(TypeError, match="views a list"):
        multiview_collate([(torch.zeros(2), 0)])
