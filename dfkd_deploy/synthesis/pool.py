"""The growing pool of synthesized images, on disk in shards.

Each synthesized batch becomes one shard (uint8, NCHW, ``shard_000042.npy``, as the reference
keeps PNGs), written atomically; ``index.json`` lists the complete shards, so a crash mid-write
never leaves a shard the pool would read. Shards are memory-mapped when read back, so sampling
does not hold the whole pool in memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_path, write_json


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


class ImagePool:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.json"
        self.shards: list[dict] = []
        if self.index_path.exists():
            self.shards = json.loads(self.index_path.read_text())["shards"]
        self._arrays: list[np.ndarray] = []
        self._offsets = np.zeros(1, dtype=np.int64)
        self._reload()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _reload(self) -> None:
        self._arrays = [np.load(self.root / s["file"], mmap_mode="r") for s in self.shards]
        self._offsets = np.concatenate([[0], np.cumsum([s["count"] for s in self.shards])]).astype(np.int64)

    def add(self, pixels: torch.Tensor) -> None:
        """Append a batch of pixel-space images ([0,1], NCHW)."""
        arr = to_uint8(pixels)
        name = f"shard_{len(self.shards):06d}.npy"
        with atomic_path(self.root / name) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
        self.shards.append({"file": name, "count": int(arr.shape[0])})
        write_json(self.index_path, {"shards": self.shards, "images": len(self) + int(arr.shape[0])})
        self._arrays.append(np.load(self.root / name, mmap_mode="r"))
        self._offsets = np.append(self._offsets, self._offsets[-1] + arr.shape[0])

    def truncate(self, num_shards: int) -> None:
        """Forget shards beyond ``num_shards`` (used when resuming from an earlier checkpoint)."""
        self.shards = self.shards[:num_shards]
        write_json(self.index_path, {"shards": self.shards, "images": int(sum(s["count"] for s in self.shards))})
        self._reload()

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """Images at the given global indices as float pixels in [0,1]."""
        shard = np.searchsorted(self._offsets, indices, side="right") - 1
        out = np.empty((len(indices),) + self._arrays[0].shape[1:], dtype=np.uint8)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._arrays[s][indices[sel] - self._offsets[s]]
        return torch.from_numpy(out).float().div_(255)

    def sample(self, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        return self.get(rng.integers(0, len(self), size=batch_size))
