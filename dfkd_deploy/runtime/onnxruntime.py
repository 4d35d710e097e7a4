"""OrtRunner: one ONNX Runtime CPU session for one ONNX file, NCHW or NHWC input."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnxruntime as ort

from dfkd_deploy.core.errors import ExportError, one_line
from dfkd_deploy.runtime.base import BATCH_SIZE, Runner, chw_from_shape, to_layout

PROVIDER = "CPUExecutionProvider"


class OrtRunner(Runner):
    """Runs the ONNX file at ``path`` on ONNX Runtime CPU; callers speak NCHW whatever the file takes.

    ``layout`` is the file's own input layout (NHWC inputs are permuted here); ``threads`` sets
    ONNX Runtime's intra-op threads (None: its default). The file's first input and first
    output are used. A file that does not load is an :class:`ExportError` in one line.
    """

    def __init__(self, path: str | Path, *, layout: str = "NCHW", name: str = "onnxruntime",
                 precision: str = "fp32", threads: Optional[int] = None,
                 input_shape: Optional[Sequence[int]] = None, batch_size: int = BATCH_SIZE):
        self.path, self.layout, self.threads = Path(path), layout.upper(), threads
        self.name, self.precision, self.batch_size = name, precision, batch_size
        self.session = load_session(self.path, threads=threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = (tuple(int(v) for v in input_shape) if input_shape
                            else chw_from_shape(inp.shape, self.layout))

    def prepare(self, x_nchw: np.ndarray) -> dict:
        return {self.input_name: to_layout(x_nchw, self.layout)}

    def run(self, prepared: dict) -> np.ndarray:
        return self.session.run(None, prepared)[0]


def load_session(path: str | Path, *, threads: Optional[int] = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``path``; ExportError (one line) when it cannot load."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3   # ORT warns about unused initializers etc.; not the user's concern
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), opts, providers=[PROVIDER])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ExportError(f"onnxruntime cannot load {Path(path).name}: {one_line(exc)}") from None
