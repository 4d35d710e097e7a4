"""Per-epoch figures of a run, as they happen: ``metrics.jsonl`` (one JSON object per epoch) and,
when asked, TensorBoard scalars and image grids.

A :class:`MetricsLog` is an epoch hook of :class:`dfkd_deploy.distill.trainer.Distiller`: it is
called with each finished epoch's row (before the checkpoint is written) and the epoch's last
synthesized batch. On resume it first truncates the file to the checkpoint's epoch, so an epoch
logged just before a crash, but never checkpointed, is not listed twice.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from dfkd_deploy.core.io import write_text
from dfkd_deploy.core.progress import warn

METRICS_JSONL = "metrics.jsonl"
GRID_IMAGES = 16


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _clean(row: dict) -> dict:
    """JSON-safe: NaN/inf become null (json.dumps would write invalid JSON for them)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class MetricsLog:
    def __init__(self, run_dir: str | Path, *, start_epoch: int = 0, tensorboard_dir: str | Path | None = None):
        self.path = Path(run_dir) / METRICS_JSONL
        self.started = time.time()
        self.truncate(start_epoch)
        self.writer = _summary_writer(tensorboard_dir) if tensorboard_dir else None

    def truncate(self, epoch: int) -> None:
        """Keep the rows of epochs 1..``epoch`` (0: start afresh)."""
        kept = [r for r in read_metrics(self.path) if int(r.get("epoch", 0)) <= epoch] if epoch else []
        if kept or self.path.exists():
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def __call__(self, row: dict, last_batch: Optional[torch.Tensor] = None) -> None:
        entry = _clean({**row, "time": round(time.time(), 3), "elapsed_s": round(time.time() - self.started, 3)})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
        if self.writer is not None:
            self._tensorboard(row, last_batch)

    def _tensorboard(self, row: dict, last_batch: Optional[torch.Tensor]) -> None:
        step = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), step)
        if last_batch is not None and len(last_batch):
            self.writer.add_images("synthesis/last_batch", last_batch[:GRID_IMAGES].detach().float().clamp(0, 1).cpu(),
                                   step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _summary_writer(log_dir: str | Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("--tensorboard: the tensorboard package is not installed (pip install 'dfkd-deploy[tensorboard]'); "
             "no TensorBoard logs are written")
        return None
    return SummaryWriter(log_dir=str(log_dir))
