"""The growing pool of synthesized images, on disk in shards.

Each synthesized batch becomes one shard (uint8, NCHW, ``shard_000042.npy``, as the reference
keeps PNGs), written atomically; an index file lists the complete shards, so a crash mid-write
never leaves a shard the pool would read.

Reading streams from disk: ``get``/``sample`` read just the requested images (one seek and read
each) and keep no file open, so a run's memory does not grow with the number of synthesized
images, and a pool of thousands of shards needs no thousands of open files.

Under torch.distributed each rank writes its own shards and its own index
(``shard_r001_000042.npy``, ``index.r001.json``); :meth:`refresh` (after a barrier) makes every
rank see the union, in the same order everywhere: rank 0's shards, then rank 1's, and so on. A
single process (or a later ``distill --pool``) reads the union of every index it finds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dfkd_deploy.core.faults import reached
from dfkd_deploy.core.errors import DataError, UsageError
from dfkd_deploy.core.io import atomic_path, write_json
from dfkd_deploy.images import pixels_to_uint8, uint8_to_pixels

SINGLE_INDEX = "index.json"


def _npy_layout(path: Path) -> tuple[int, tuple[int, ...]]:
    """Byte offset of the data and the array shape of a C-ordered uint8 ``.npy`` file."""
    fmt = np.lib.format
    with open(path, "rb") as fh:
        version = fmt.read_magic(fh)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
    if fortran or np.dtype(dtype) != np.uint8:
        raise DataError(f"{path}: not a pool shard (expected C-ordered uint8, got {dtype}, fortran={fortran})")
    return offset, tuple(shape)


def _check_shard_name(index: Path, name) -> None:
    """A shard named by an index is a plain file name in the index's folder (no path, no link out)."""
    root = index.parent
    plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name
    if plain and (root / name).is_symlink():
        target = (root / name).resolve()
        plain = target.parent == root.resolve()
    if not plain:
        shown = repr(name)[:120]
        raise DataError(f"{index}: shard {shown} is not a plain file name inside the pool directory (refused)")


class ImagePool:
    def __init__(self, root: str | Path, rank: int = 0, world_size: int = 1):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = rank, world_size
        self.prefix = "shard_" if world_size == 1 else f"shard_r{rank:03d}_"
        self.index_path = self.root / (SINGLE_INDEX if world_size == 1 else f"index.r{rank:03d}.json")
        self.own: list[dict] = self._read_index(self.index_path) if self.index_path.exists() else []
        self.shards: list[dict] = []           # the union every rank samples from
        self._offsets = np.zeros(1, dtype=np.int64)
        self._layouts: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.refresh()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    # -- the index --------------------------------------------------------------------------
    @staticmethod
    def _read_index(path: Path) -> list[dict]:
        try:
            shards = list(json.loads(path.read_text())["shards"])
            for shard in shards:
                _check_shard_name(path, shard["file"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: unreadable pool index ({type(exc).__name__})") from None
        return shards

    def refresh(self, every_rank: bool = False) -> None:
        """Re-read the other ranks' indexes: afterwards the pool is the union of all shards.

        ``every_rank``: each of the ``world_size`` ranks must have written its index by now (a
        missing one means this process cannot see the others' files)."""
        single = self.root / SINGLE_INDEX
        files = ([single] if single.exists() else []) + sorted(self.root.glob("index.r*.json"))
        if every_rank and self.world_size > 1:
            missing = [r for r in range(self.world_size) if not (self.root / f"index.r{r:03d}.json").exists()]
            if missing:
                raise UsageError(f"rank {self.rank} cannot see the pool index of rank(s) {missing} in {self.root}: "
                                 "with several nodes the run directory (--out) must be on a file system they all share")
        if self.own and self.index_path not in files:
            raise DataError(f"{self.index_path} has disappeared while the run was writing the pool")
        shards: list[dict] = []
        for path in files:
            shards += self.own if path == self.index_path else self._read_index(path)
        self.shards = shards
        self._offsets = np.concatenate([[0], np.cumsum([s["count"] for s in shards])]).astype(np.int64)

    def _write_index(self) -> None:
        write_json(self.index_path, {"shards": self.own, "images": int(sum(s["count"] for s in self.own))})

    # -- writing ----------------------------------------------------------------------------
    def add(self, pixels: torch.Tensor) -> None:
        """Append a batch of pixel-space images ([0,1], NCHW) as this rank's next shard."""
        arr = np.ascontiguousarray(pixels_to_uint8(pixels))
        name = f"{self.prefix}{len(self.own):06d}.npy"
        with atomic_path(self.root / name) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
                offset = fh.tell() - arr.nbytes
        entry = {"file": name, "count": int(arr.shape[0]), "offset": int(offset), "shape": list(arr.shape[1:])}
        self.own.append(entry)
        self._write_index()
        self.shards.append(entry)
        self._offsets = np.append(self._offsets, self._offsets[-1] + arr.shape[0])
        reached(f"pool.add:{len(self.own)}")

    def truncate(self, num_shards: int) -> None:
        """Forget this rank's shards beyond ``num_shards`` (used when resuming from an earlier checkpoint)."""
        if num_shards > len(self.own):
            raise DataError(f"{self.index_path} lists {len(self.own)} shards but the checkpoint expects "
                            f"{num_shards}: the pool does not belong to this checkpoint")
        if num_shards < len(self.own):
            self.own = self.own[:num_shards]
            self._write_index()
        self.refresh()

    # -- reading ----------------------------------------------------------------------------
    def _layout(self, shard: dict) -> tuple[int, tuple[int, ...]]:
        name = shard["file"]
        if name not in self._layouts:
            if "offset" in shard and "shape" in shard:
                self._layouts[name] = (int(shard["offset"]), (int(shard["count"]), *shard["shape"]))
            else:   # written before the index recorded it
                self._layouts[name] = _npy_layout(self.root / name)
        return self._layouts[name]

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """Images at the given global indices as float pixels in [0,1], read from disk."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"pool index out of range (pool holds {len(self)} images)")
        shard_of = np.searchsorted(self._offsets, indices, side="right") - 1
        item_shape = self._layout(self.shards[int(shard_of[0])])[1][1:] if len(indices) else ()
        out = np.empty((len(indices), *item_shape), dtype=np.uint8)
        item_bytes = int(np.prod(item_shape)) if len(indices) else 0
        for s in np.unique(shard_of):
            shard = self.shards[int(s)]
            offset, shape = self._layout(shard)
            if tuple(shape[1:]) != tuple(item_shape):
                raise DataError(f"{self.root / shard['file']}: images of shape {list(shape[1:])}, "
                                f"the pool's others are {list(item_shape)}")
            rows = np.nonzero(shard_of == s)[0]
            local = indices[rows] - self._offsets[s]
            order = np.argsort(local, kind="stable")   # read forwards through the file
            with open(self.root / shard["file"], "rb", buffering=0) as fh:
                for row, i in zip(rows[order], local[order]):
                    fh.seek(offset + int(i) * item_bytes)
                    if fh.readinto(memoryview(out[row]).cast("B")) != item_bytes:
                        raise DataError(f"{self.root / shard['file']}: shorter than its index says")
        return uint8_to_pixels(out)

    def locate(self, indices: np.ndarray) -> list[tuple[str, int]]:
        """(shard file, index within it) of each global index: what stays the same for an image
        when other ranks add shards before it in the union (its global index can move)."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self._offsets, indices, side="right") - 1
        return [(self.shards[int(s)]["file"], int(i - self._offsets[s])) for s, i in zip(shard_of, indices)]

    def shard_count(self, name: str) -> int:
        return next(int(s["count"]) for s in self.shards if s["file"] == name)

    def sample(self, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        return self.get(rng.integers(0, len(self), size=batch_size))
