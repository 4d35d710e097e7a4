import numpy as np
import torch

from dfkd_deploy.synthesis.augment import crop_flip
from dfkd_deploy.synthesis.pool import ImagePool


def test_crop_flip_shapes_values_and_gradient():
    x = torch.rand(5, 3, 8, 6, requires_grad=True)
    y = crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(crop_flip(x, padding=0, flip=False), x)


def test_flip_only_mirrors_each_sample_or_leaves_it():
    x = torch.rand(16, 1, 4, 4)
    y = crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(3))
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(16)]
    same = [torch.equal(y[i], x[i]) for i in range(16)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_crop_is_a_translation_with_zero_fill():
    x = torch.ones(4, 1, 5, 5)
    y = crop_flip(x, padding=1, flip=False, generator=torch.Generator().manual_seed(1))
    for img in y[:, 0]:
        zeros = int((img == 0).sum())
        assert zeros in (0, 5, 9)        # no shift, shift along one axis, or both


def test_pool_round_trip_shards_and_truncate(tmp_path):
    pool = ImagePool(tmp_path / "pool")
    a, b = torch.rand(4, 3, 2, 2), torch.rand(3, 3, 2, 2)
    pool.add(a)
    pool.add(b)
    assert len(pool) == 7 and sorted(p.name for p in (tmp_path / "pool").glob("shard_*.npy")) == \
        ["shard_000000.npy", "shard_000001.npy"]
    got = pool.get(np.arange(7))
    assert torch.allclose(got, torch.cat([a, b]), atol=1 / 255)       # uint8 storage
    reopened = ImagePool(tmp_path / "pool")
    assert len(reopened) == 7
    batch = reopened.sample(10, np.random.default_rng(0))
    assert batch.shape == (10, 3, 2, 2)
    reopened.truncate(1)
    assert len(ImagePool(tmp_path / "pool")) == 4


def test_pool_ignores_leftover_temporary_files(tmp_path):
    pool = ImagePool(tmp_path)
    pool.add(torch.rand(2, 1, 3, 3))
    (tmp_path / ".shard_000001.npy.abc.tmp").write_bytes(b"half a file")
    assert len(ImagePool(tmp_path)) == 2
