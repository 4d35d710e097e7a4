import numpy as np
import torch

from dfkd_deploy.synthesis.pool import ImagePool


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
