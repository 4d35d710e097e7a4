"""Pool index.json names only plain files inside the pool (issue 14.3): `distill --pool` trained on any file."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd_deploy.cli import cli
from dfkd_deploy.core.errors import DataError
from dfkd_deploy.synthesis.pool import ImagePool


def _pool_naming(tmp_path, name):
    """A real one-shard pool whose index.json is rewritten to name ``name`` instead of its shard."""
    pool_dir = tmp_path / "pool"
    ImagePool(pool_dir).add(torch.rand(2, 1, 4, 4))
    index = json.loads((pool_dir / "index.json").read_text())
    index["shards"][0]["file"] = name
    (pool_dir / "index.json").write_text(json.dumps(index))
    return pool_dir


@pytest.fixture
def outside_shard(tmp_path):
    """A valid uint8 .npy outside the pool: what a rewritten index would make a run train on."""
    path = tmp_path / "elsewhere" / "secret.npy"
    path.parent.mkdir()
    np.save(path, np.zeros((2, 1, 4, 4), np.uint8))
    return path


@pytest.mark.parametrize("name", ["../elsewhere/secret.npy", "ABSOLUTE", "sub/shard.npy", "..", ".", "",
                                  "..\\elsewhere\\secret.npy", 7, None])
def test_index_names_outside_the_pool_are_refused(tmp_path, outside_shard, name):
    pool_dir = _pool_naming(tmp_path, str(outside_shard) if name == "ABSOLUTE" else name)
    with pytest.raises(DataError, match="not a plain file name inside the pool directory") as err:
        ImagePool(pool_dir)
    assert "\n" not in str(err.value)


def test_shard_symlinked_out_of_the_pool_is_refused(tmp_path, outside_shard):
    pool_dir = _pool_naming(tmp_path, "shard_000000.npy")
    (pool_dir / "shard_000000.npy").unlink()
    os.symlink(outside_shard, pool_dir / "shard_000000.npy")
    with pytest.raises(DataError, match="not a plain file name inside the pool directory"):
        ImagePool(pool_dir)


def test_shard_symlinked_inside_the_pool_is_read(tmp_path):
    pool_dir = _pool_naming(tmp_path, "shard_000000.npy")
    (pool_dir / "shard_000000.npy").rename(pool_dir / "moved.npy")
    os.symlink("moved.npy", pool_dir / "shard_000000.npy")
    assert len(ImagePool(pool_dir)) == 2


def test_rank_index_names_are_checked_too(tmp_path, outside_shard):
    pool_dir = tmp_path / "pool"
    ImagePool(pool_dir, rank=1, world_size=2).add(torch.rand(2, 1, 4, 4))
    index = json.loads((pool_dir / "index.r001.json").read_text())
    index["shards"][0]["file"] = str(outside_shard)
    (pool_dir / "index.r001.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="index.r001.json: shard"):
        ImagePool(pool_dir, rank=0, world_size=2)


def test_distill_pool_with_a_traversing_index_exits_2_in_one_line(tmp_path, outside_shard):
    pool_dir = _pool_naming(tmp_path, "../elsewhere/secret.npy")
    r = CliRunner().invoke(cli, ["distill", str(tmp_path / "teacher.onnx"), "--pool", str(pool_dir),
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1 and "plain file name" in r.output
    assert not (tmp_path / "run").exists()
