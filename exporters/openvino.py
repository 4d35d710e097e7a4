"""OpenVINO IR of the student: FP32, FP16-compressed weights, and INT8 by NNCF post-training
quantization calibrated on the run's synthetic images (never real data).

OpenVINO and NNCF are an optional extra (``pip install dfkd-deploy[openvino]``); they are imported
only when a conversion is asked for, and their absence is one :class:`ExportError` line.
The IR keeps the ONNX file's input (name, layout, dynamic batch), so every file takes the same
tensor as ``student.onnx``.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dfkd_deploy.core.errors import ExportError, one_line

from exporters.runtime_files import RuntimeFiles

MISSING = "OpenVINO is not installed here (pip install 'dfkd-deploy[openvino]')"
MISSING_NNCF = "NNCF is not installed here (pip install 'dfkd-deploy[openvino]'); no OpenVINO INT8"
FILES = {"fp32": "student.xml", "fp16": "student.fp16.xml", "int8": "student.int8.xml"}
CALIBRATION_BATCH = 32


@dataclass
class OpenVinoResult(RuntimeFiles):
    """The IR files written (precision -> xml name; each has a .bin beside it) and why any is missing."""

    nncf_version: Optional[str] = None

    def all_files(self) -> list[str]:
        """Every file written: the .xml and its .bin, per precision."""
        return [n for xml in self.files.values() for n in (xml, weights_of(xml))]


def openvino_module():
    """The ``openvino`` module, or None when it is not installed."""
    try:
        import openvino
    except Exception:  # noqa: BLE001 - ImportError, or a wheel that does not load on this CPU
        return None
    return openvino


def weights_of(xml_name: str) -> str:
    return str(Path(xml_name).with_suffix(".bin"))


def convert_openvino(onnx_path: str | Path, out_dir: str | Path, *, calibration: Optional[np.ndarray] = None,
                     layout: str = "NCHW", precisions=("fp32", "fp16", "int8")) -> OpenVinoResult:
    """Write the IR of ``onnx_path`` into ``out_dir`` for each of ``precisions``.

    ``calibration`` is the model-space NCHW float32 synthetic calibration set (needed for int8).
    A precision that fails is recorded in ``errors`` and the others still go ahead; OpenVINO
    itself missing is an :class:`ExportError`.
    """
    ov = openvino_module()
    if ov is None:
        raise ExportError(MISSING)
    out, t0 = Path(out_dir), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    result = OpenVinoResult(version=ov.get_version())
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise ExportError(f"OpenVINO cannot convert {Path(onnx_path).name}: {one_line(exc)}") from None
    for precision in precisions:
        try:
            if precision == "int8":
                model_p = _quantize(model, calibration, layout, result)
            elif precision in ("fp32", "fp16"):
                model_p = model
            else:
                raise ExportError(f"unknown OpenVINO precision {precision!r}")
            _save(ov, model_p, out / FILES[precision], compress_to_fp16=precision == "fp16")
            result.files[precision] = FILES[precision]
        except Exception as exc:  # noqa: BLE001 - one precision failing keeps the others
            result.errors[precision] = one_line(exc)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _quantize(model, calibration: Optional[np.ndarray], layout: str, result: OpenVinoResult):
    """NNCF post-training quantization (performance preset: symmetric activations) on synthetic images."""
    try:
        import nncf
    except Exception:  # noqa: BLE001
        raise ExportError(MISSING_NNCF) from None
    if calibration is None or len(calibration) == 0:
        raise ExportError("OpenVINO INT8 needs synthetic calibration images; none given")
    x = np.asarray(calibration, np.float32)
    x = x.transpose(0, 2, 3, 1) if layout.upper() == "NHWC" else x
    batches = [np.ascontiguousarray(x[i:i + CALIBRATION_BATCH]) for i in range(0, len(x), CALIBRATION_BATCH)]
    result.nncf_version, result.calibration_images = nncf.__version__, len(x)
    return nncf.quantize(model, nncf.Dataset(batches), preset=nncf.QuantizationPreset.PERFORMANCE,
                         subset_size=len(batches))


def _save(ov, model, xml: Path, *, compress_to_fp16: bool) -> None:
    """The .xml and its .bin, written in a scratch folder beside them and moved in (.bin first),
    so a crash leaves no half-written IR under the final names."""
    with tempfile.TemporaryDirectory(prefix=".ov-", dir=xml.parent) as work:
        tmp_xml = Path(work) / xml.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=compress_to_fp16)
        os.replace(tmp_xml.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp_xml, xml)
