"""The runner interface: model-space NCHW float32 in, logits out, whatever runs the model.

A runner splits inference in two steps, like Polygraphy's runners: :meth:`Runner.prepare` turns
NCHW numpy inputs into what the back end takes (a permuted array, a tensor on a device) and
:meth:`Runner.run` runs one prepared batch. :meth:`Runner.predict` chains them batch by batch;
:meth:`Runner.time` prepares once and times ``run`` alone, so the figures are the model's.
"""
from __future__ import annotations

import time as _time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from dfkd_deploy.core.errors import ExportError

BATCH_SIZE = 256


@dataclass(frozen=True)
class LatencyStats:
    batch: int
    median_ms: float
    warmup: int
    repeats: int


class Runner(ABC):
    """One model on one back end; ``name`` and ``precision`` say which (e.g. onnxruntime, int8)."""

    name: str = "runner"
    precision: str = "fp32"
    input_shape: Optional[tuple[int, int, int]] = None   # (C, H, W) of one input; needed by time()
    batch_size: int = BATCH_SIZE

    @abstractmethod
    def prepare(self, x_nchw: np.ndarray) -> Any:
        """A model-space NCHW float32 batch as the back end takes it."""

    @abstractmethod
    def run(self, prepared: Any) -> np.ndarray:
        """Logits (numpy) of one prepared batch."""

    def predict(self, x_nchw: np.ndarray) -> np.ndarray:
        """Logits of model-space NCHW float32 inputs, ``batch_size`` at a time."""
        x = np.asarray(x_nchw, dtype=np.float32)
        if x.ndim != 4:
            raise ExportError(f"{self.name} {self.precision}: expects NCHW inputs, got shape {x.shape}")
        step = max(1, self.batch_size)
        outs = [np.asarray(self.run(self.prepare(x[i:i + step]))) for i in range(0, len(x), step)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def time(self, batch: int, *, repeats: int, warmup: int, seed: int = 0) -> LatencyStats:
        """Median wall time of ``run`` on one random batch of ``batch`` inputs, after ``warmup`` runs."""
        if self.input_shape is None:
            raise ExportError(f"{self.name} {self.precision}: no input shape to time with")
        x = np.random.default_rng(seed).standard_normal((int(batch), *self.input_shape), dtype=np.float32)
        prepared = self.prepare(x)
        for _ in range(max(0, warmup)):
            self.run(prepared)
        times = []
        for _ in range(max(1, repeats)):
            t0 = _time.perf_counter()
            self.run(prepared)
            times.append(_time.perf_counter() - t0)
        return LatencyStats(int(batch), 1000 * float(np.median(times)), max(0, warmup), max(1, repeats))


def to_layout(x_nchw: np.ndarray, layout: str) -> np.ndarray:
    """NCHW as the file's own ``layout`` (NCHW or NHWC), contiguous float32."""
    x = np.asarray(x_nchw, dtype=np.float32)
    if layout.upper() == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)


def chw_from_shape(shape: Sequence[Any], layout: str) -> Optional[tuple[int, int, int]]:
    """(C, H, W) from a file's declared input shape (batch first), or None when not all static."""
    dims = list(shape)[1:]
    if len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return (dims[2], dims[0], dims[1]) if layout.upper() == "NHWC" else tuple(dims)


def time_runner(runner: "Runner", *, batches: Sequence[int] = (1, 32), warmup: int = 2,
                repeats: int = 5) -> dict:
    """``{"batch_1_ms": median, ...}`` for ``runner`` on random inputs (report.json's latency form)."""
    return {f"batch_{b}_ms": round(runner.time(b, repeats=repeats, warmup=warmup).median_ms, 4) for b in batches}
