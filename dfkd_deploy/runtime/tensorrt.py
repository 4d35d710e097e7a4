"""TrtRunner: a serialized TensorRT engine, where TensorRT and a GPU are present.

TensorRT is optional and imported only when a runner is made: most machines that run
dfkd-deploy have none. Without it, :class:`TrtRunner` raises :class:`ExportError` with
:data:`MISSING_RUNTIME` (one line). Buffers are torch CUDA tensors; the engine uses TensorRT's
named-tensor API (TensorRT >= 8.5).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dfkd_deploy.core.errors import ExportError
from dfkd_deploy.runtime.base import Runner, to_layout

MISSING_RUNTIME = "TensorRT is not installed here (pip install tensorrt, on a machine with an NVIDIA GPU)"
MAX_BATCH = 32


def tensorrt_module():
    """The ``tensorrt`` module, or None when it is not installed (or not loadable here)."""
    try:
        import tensorrt  # noqa: F401 - optional heavy back end, imported only when asked for
    except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA install raising OSError
        return None
    return tensorrt


class TrtRunner(Runner):
    """Runs the engine at ``engine_path``; ``layout`` is the engine's input layout, ``max_batch``
    the largest batch its optimisation profile takes (predict splits larger inputs)."""

    def __init__(self, engine_path: str | Path, *, layout: str = "NCHW", precision: str = "fp32",
                 name: str = "tensorrt", max_batch: int = MAX_BATCH,
                 input_shape: Optional[Sequence[int]] = None):
        trt = tensorrt_module()
        if trt is None:
            raise ExportError(MISSING_RUNTIME)
        self.path, self.layout = Path(engine_path), layout.upper()
        self.name, self.precision, self.batch_size = name, precision, max_batch
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape else None
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT cannot load the engine {self.path.name} (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        self.input_name = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
        self.stream = torch.cuda.Stream()

    def prepare(self, x_nchw: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(to_layout(x_nchw, self.layout)).cuda()

    def run(self, prepared: torch.Tensor) -> np.ndarray:
        ctx, x = self.context, prepared
        ctx.set_input_shape(self.input_name, tuple(x.shape))
        y = torch.empty(tuple(ctx.get_tensor_shape(self.output_name)), dtype=torch.float32, device="cuda")
        ctx.set_tensor_address(self.input_name, int(x.data_ptr()))
        ctx.set_tensor_address(self.output_name, int(y.data_ptr()))
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise ExportError(f"TensorRT engine {self.path.name} failed to run")
        self.stream.synchronize()
        return y.cpu().numpy()
