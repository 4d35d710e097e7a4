"""ExecuTorch program (.pte) of the torch student, lowered to the XNNPACK back end: fp32, and
INT8 through the XNNPACK quantizer (PT2E: prepare, calibrate on synthetic images, convert).

ExecuTorch is an optional extra (``pip install 'dfkd-deploy[executorch]'``), imported only here.
The program takes model-space NCHW float32 with a dynamic batch up to :data:`MAX_BATCH` (XNNPACK
plans memory for the upper bound); NHWC teachers' students are exported NCHW-in (the .pte is
called from C++/Java, where the caller permutes), which the bundle README states.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from dfkd_deploy.core.errors import ExportError, one_line
from dfkd_deploy.core.io import write_bytes

from exporters.runtime_files import RuntimeFiles

MISSING = "ExecuTorch is not installed here (pip install 'dfkd-deploy[executorch]')"
FILES = {"fp32": "student.pte", "int8": "student.int8.pte"}
MAX_BATCH = 32
CALIBRATION_BATCH = 32


@dataclass
class ExecuTorchResult(RuntimeFiles):
    max_batch: int = MAX_BATCH
    backend: str = "XNNPACK"
    layout: str = "NCHW"


def executorch_version() -> Optional[str]:
    """The installed ExecuTorch version, or None when it is absent or does not import."""
    try:
        import executorch.exir  # noqa: F401 - the lowering stack, not only the package
        from importlib import metadata

        return metadata.version("executorch")
    except Exception:  # noqa: BLE001 - ImportError, or an ExecuTorch built for another torch
        return None


def export_executorch(module: nn.Module, out_dir: str | Path, *, input_shape: Sequence[int],
                      calibration: Optional[np.ndarray] = None, precisions=("fp32", "int8"),
                      max_batch: int = MAX_BATCH) -> ExecuTorchResult:
    """Write ``student.pte`` (fp32) and ``student.int8.pte`` for ``module`` into ``out_dir``.

    ``input_shape`` is (C, H, W); ``calibration`` the model-space NCHW float32 synthetic
    calibration set (int8 only). A precision that fails is recorded in ``errors``; ExecuTorch
    missing is an :class:`ExportError`.
    """
    version = executorch_version()
    if version is None:
        raise ExportError(MISSING)
    out, t0 = Path(out_dir), time.perf_counter()
    result = ExecuTorchResult(version=version, max_batch=max_batch)
    model = _cpu_copy(module)
    # The example carries the largest batch: ExecuTorch plans the input's memory from it (an
    # example of 2 with Dim max 32 gave a program that takes at most 15 inputs).
    example = (torch.zeros(max_batch, *[int(v) for v in input_shape]),)
    for precision in precisions:
        try:
            if precision == "int8":
                program = _lower(_quantized(model, example, calibration, max_batch, result), example, max_batch)
            elif precision == "fp32":
                program = _lower(model, example, max_batch)
            else:
                raise ExportError(f"unknown ExecuTorch precision {precision!r}")
            write_bytes(out / FILES[precision], program)
            result.files[precision] = FILES[precision]
        except Exception as exc:  # noqa: BLE001 - one precision failing keeps the other
            result.errors[precision] = f"{type(exc).__name__}: {one_line(exc)}"[:300]
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _dynamic(max_batch: int):
    return ({0: torch.export.Dim("batch", min=1, max=max_batch)},)


def _lower(model: nn.Module, example: tuple, max_batch: int) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(model, example, dynamic_shapes=_dynamic(max_batch))
    return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def _quantized(model: nn.Module, example: tuple, calibration: Optional[np.ndarray], max_batch: int,
               result: ExecuTorchResult) -> nn.Module:
    """PT2E static int8 (symmetric, per-channel weights), calibrated on the synthetic images."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calibration is None or len(calibration) == 0:
        raise ExportError("ExecuTorch INT8 needs synthetic calibration images; none given")
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    graph = torch.export.export(model, example, dynamic_shapes=_dynamic(max_batch)).module()
    prepared = prepare_pt2e(graph, quantizer)
    x = torch.from_numpy(np.ascontiguousarray(calibration, np.float32))
    with torch.no_grad():
        for i in range(0, len(x), min(CALIBRATION_BATCH, max_batch)):
            prepared(x[i:i + min(CALIBRATION_BATCH, max_batch)])
    result.calibration_images = len(x)
    return convert_pt2e(prepared)


def _cpu_copy(module: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(module).cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
