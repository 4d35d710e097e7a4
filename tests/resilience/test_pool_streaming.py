"""The pool streams from disk: sampling reads the batch, not the pool, and keeps no file open;
ranks write their own shards and see the union."""
from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
import torch

from dfkd_deploy.core.errors import DataError, UsageError
from dfkd_deploy.synthesis.pool import ImagePool

SHAPE = (3, 16, 16)


def _fill(pool: ImagePool, shards: int, per: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    batches = [torch.from_numpy(rng.random((per, *SHAPE), dtype=np.float32)) for _ in range(shards)]
    for b in batches:
        pool.add(b)
    return batches


def test_sampling_reads_the_batch_not_the_pool(tmp_path):
    batches = _fill(ImagePool(tmp_path), shards=30, per=100)
    pool_bytes = 30 * 100 * int(np.prod(SHAPE))                  # 2.3 MB of uint8 on disk
    pool = ImagePool(tmp_path)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    rng = np.random.default_rng(1)
    pool.sample(64, rng)                                         # first-call set-up (lazy imports) not counted
    tracemalloc.start()                                          # numpy reports its buffers to tracemalloc
    try:
        for _ in range(5):
            pool.sample(64, rng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < pool_bytes / 10, peak                          # a 64-image batch, never the 3,000-image pool
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds           # no shard left open
    idx = np.array([0, 2999, 1234, 1234, 57])
    want = torch.cat(batches)[idx]
    assert torch.allclose(pool.get(idx), want, atol=0.5 / 255 + 1e-6)   # uint8 storage, right images


def test_ranks_write_own_shards_and_see_the_same_union(tmp_path):
    r0, r1 = ImagePool(tmp_path, rank=0, world_size=2), ImagePool(tmp_path, rank=1, world_size=2)
    a, b = _fill(r0, 2, 5, seed=0), _fill(r1, 3, 5, seed=1)
    assert sorted(p.name for p in tmp_path.glob("index*.json")) == ["index.r000.json", "index.r001.json"]
    assert len(r0) == 10 and len(r1) == 15                       # before the refresh each sees itself (+ what was there)
    for pool in (r0, r1):
        pool.refresh(every_rank=True)
    union = torch.cat(a + b)
    for pool in (r0, r1, ImagePool(tmp_path)):                    # a one-process reader (distill --pool) too
        assert len(pool) == 25
        assert torch.allclose(pool.get(np.arange(25)), union, atol=0.5 / 255 + 1e-6)
    r1.truncate(1)
    r0.refresh(every_rank=True)
    assert len(r0) == 15


def test_a_rank_that_cannot_see_the_others_says_so(tmp_path):
    pool = ImagePool(tmp_path, rank=0, world_size=2)
    _fill(pool, 1, 2)
    with pytest.raises(UsageError, match=r"rank 0 cannot see the pool index of rank\(s\) \[1\].*all share"):
        pool.refresh(every_rank=True)


def test_shards_indexed_before_offsets_were_recorded_still_read(tmp_path):
    batches = _fill(ImagePool(tmp_path), 2, 4)
    index = json.loads((tmp_path / "index.json").read_text())
    for s in index["shards"]:
        del s["offset"], s["shape"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert torch.allclose(ImagePool(tmp_path).get(np.arange(8)), torch.cat(batches), atol=0.5 / 255 + 1e-6)


def test_damaged_pool_files_are_data_errors(tmp_path):
    _fill(ImagePool(tmp_path), 2, 4)
    with open(tmp_path / "shard_000001.npy", "r+b") as fh:       # cut short
        fh.truncate(200)
    with pytest.raises(DataError, match="shorter than its index says"):
        ImagePool(tmp_path).get(np.arange(8))
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable pool index"):
        ImagePool(tmp_path)
    with pytest.raises(DataError, match="lists 0 shards but the checkpoint expects 3"):
        ImagePool(tmp_path / "empty").truncate(3)
