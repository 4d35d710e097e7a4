"""OpenVinoRunner: one OpenVINO IR (or ONNX) file compiled for the CPU device.

OpenVINO is optional and imported only when a runner is made; without it the runner raises
:class:`ExportError` with :data:`exporters.openvino.MISSING`-style one line. fp32 and fp16 IRs
run with fp32 inference precision (the CPU plugin would otherwise pick bf16 on CPUs that have
it, which is not what the file's precision says); int8 IRs run their int8 kernels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dfkd_deploy.core.errors import ExportError, one_line
from dfkd_deploy.runtime.base import BATCH_SIZE, Runner, chw_from_shape, to_layout

MISSING_RUNTIME = "OpenVINO is not installed here (pip install 'dfkd-deploy[openvino]')"
DEVICE = "CPU"


def openvino_module():
    """The ``openvino`` module, or None when it is not installed (or does not load here)."""
    try:
        import openvino
    except Exception:  # noqa: BLE001 - ImportError, or a wheel that does not load on this CPU
        return None
    return openvino


class OpenVinoRunner(Runner):
    """Runs the model at ``path`` (IR .xml with its .bin, or .onnx) on OpenVINO's CPU device.

    ``layout`` is the file's own input layout; ``threads`` sets INFERENCE_NUM_THREADS (None:
    OpenVINO's default). Callers speak NCHW.
    """

    def __init__(self, path: str | Path, *, layout: str = "NCHW", name: str = "openvino", precision: str = "fp32",
                 threads: Optional[int] = None, input_shape: Optional[Sequence[int]] = None,
                 batch_size: int = BATCH_SIZE):
        ov = openvino_module()
        if ov is None:
            raise ExportError(MISSING_RUNTIME)
        self.path, self.layout, self.threads = Path(path), layout.upper(), threads
        self.name, self.precision, self.batch_size = name, precision, batch_size
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(self.path), DEVICE, config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with long texts
            raise ExportError(f"OpenVINO cannot load {self.path.name}: {one_line(exc)}") from None
        self.request = self.compiled.create_infer_request()
        shape = self.compiled.input(0).get_partial_shape()
        self.input_shape = (tuple(int(v) for v in input_shape) if input_shape else _chw(shape, self.layout))

    def prepare(self, x_nchw: np.ndarray) -> np.ndarray:
        return to_layout(x_nchw, self.layout)

    def run(self, prepared: np.ndarray) -> np.ndarray:
        self.request.infer({0: prepared})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)


def _chw(partial_shape, layout: str) -> Optional[tuple[int, int, int]]:
    dims = [d.get_length() if d.is_static else None for d in partial_shape]

    return chw_from_shape(dims, layout)
