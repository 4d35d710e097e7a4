"""ExecuTorchRunner: a .pte program run by ExecuTorch's Python runtime (its portable + XNNPACK
kernels, the same runtime the phone links), CPU.

ExecuTorch is optional and imported only when a runner is made; without it the runner raises
:class:`ExportError` with :data:`MISSING_RUNTIME`. Programs take NCHW with a batch bounded by
the export (``max_batch``); predict splits larger inputs (the bound is read from the program's planned input).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dfkd_deploy.core.errors import ExportError, one_line
from dfkd_deploy.runtime.base import Runner

MISSING_RUNTIME = "ExecuTorch is not installed here (pip install 'dfkd-deploy[executorch]')"
MAX_BATCH = 32


def executorch_runtime():
    """ExecuTorch's ``Runtime`` singleton, or None when the runtime is absent or does not load."""
    try:
        from executorch.runtime import Runtime

        return Runtime.get()
    except Exception:  # noqa: BLE001 - ImportError, or a runtime built for another torch
        return None


class ExecuTorchRunner(Runner):
    """Runs the ``forward`` method of the program at ``path``; inputs NCHW float32."""

    def __init__(self, path: str | Path, *, name: str = "executorch", precision: str = "fp32",
                 input_shape: Optional[Sequence[int]] = None, max_batch: int = MAX_BATCH):
        runtime = executorch_runtime()
        if runtime is None:
            raise ExportError(MISSING_RUNTIME)
        self.path, self.name, self.precision, self.batch_size = Path(path), name, precision, max_batch
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape else None
        try:
            self.method = runtime.load_program(self.path).load_method("forward")
            planned = tuple(self.method.metadata.input_tensor_meta(0).sizes())
        except Exception as exc:  # noqa: BLE001 - the runtime raises RuntimeError/ValueError
            raise ExportError(f"ExecuTorch cannot load {self.path.name}: {one_line(exc)}") from None
        # The program's planned input is its upper bound: never feed it a larger batch.
        self.batch_size = min(int(max_batch), int(planned[0])) if planned else int(max_batch)
        self.input_shape = self.input_shape or (tuple(int(v) for v in planned[1:]) if len(planned) == 4 else None)

    def prepare(self, x_nchw: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x_nchw, dtype=np.float32))

    def run(self, prepared: torch.Tensor) -> np.ndarray:
        out = self.method.execute([prepared])
        return np.asarray(out[0].numpy() if hasattr(out[0], "numpy") else out[0], dtype=np.float32).copy()
