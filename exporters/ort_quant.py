"""Data-free INT8: ONNX Runtime static quantization of the student, calibrated on synthetic images.

The calibration set is drawn from the run's synthetic image pool only (no real data exists in a
data-free run), mapped to model space exactly like the teacher expects, so the activation
ranges ORT records are the ranges the deployed student will see.

The output is a QDQ model with *symmetric* int8 activations and weights: ORT runs it on CPU,
and TensorRT can build an explicitly quantized engine from the very same file (TensorRT only
accepts zero-point-0 Q/DQ pairs), so one calibration serves both back ends.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dfkd_deploy.core.errors import ExportError, one_line
from dfkd_deploy.core.io import atomic_path
from dfkd_deploy.images import pixels_to_uint8, to_layout

from exporters.onnx_export import INPUT_NAME
from dfkd_deploy.runtime.onnxruntime import OrtRunner

CALIBRATION_IMAGES = 256        # default pool images used for calibration (recipe candidate)
CALIBRATION_BATCH = 32          # calibration batch fed to ORT; memory only, not a result
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("s8", "u8")      # s8: TensorRT-compatible Q/DQ; u8: fully fused by ORT's x64 CPU kernels


@dataclass
class QuantResult:
    path: Path
    format: str                       # always "QDQ"
    calibration_images: int
    calibration_method: str
    per_channel: bool
    qdq_nodes: int                    # QuantizeLinear + DequantizeLinear nodes in the graph
    probe_images: int = 0
    top1_agreement_vs_fp32: Optional[float] = None   # on held-out probes
    max_abs_diff_vs_fp32: Optional[float] = None
    seconds: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"file": self.path.name, "format": self.format, "calibration_images": self.calibration_images,
                "calibration_method": self.calibration_method, "per_channel": self.per_channel,
                "qdq_nodes": self.qdq_nodes, "probe_images": self.probe_images,
                "top1_agreement_vs_fp32": self.top1_agreement_vs_fp32,
                "max_abs_diff_vs_fp32": self.max_abs_diff_vs_fp32, "seconds": self.seconds,
                "notes": list(self.notes)}


def sample_calibration(pool, count: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """``count`` distinct pool images (uint8 NCHW pixels), fewer when the pool is smaller.

    Sampled without replacement with a fixed seed so the same run always calibrates the same way.
    """
    n = len(pool)
    if n == 0:
        raise ExportError("INT8 calibration needs synthetic images, but the image pool is empty")
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))
    pixels = pool.get(idx).numpy()   # float [0,1]; back to uint8 exactly (the pool stores uint8)
    return pixels_to_uint8(pixels)


def quantize_student(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray, *,
                     layout: str = "NCHW", method: str = "minmax", per_channel: bool = True,
                     probes: Optional[np.ndarray] = None, batch_size: int = CALIBRATION_BATCH,
                     activations: str = "s8") -> QuantResult:
    """Quantize ``fp32_path`` to a QDQ int8 model at ``out_path``.

    ``calibration`` and ``probes`` are model-space float32 NCHW arrays (see :func:`dfkd_deploy.images.uint8_to_model`);
    the probes must be held out from calibration. With probes, agreement and max abs diff
    against the fp32 model are measured on them.

    ``activations``: "s8" (default) symmetric int8 activations, the Q/DQ file TensorRT can also
    build from; "u8" asymmetric uint8 activations (U8S8), which ONNX Runtime's x64 CPU kernels
    fuse into QLinearConv for every conv (benchmarks/results/ort_int8_study.json: with "s8" 9 of
    cifar_resnet20's 19 convs stay in float between DequantizeLinear/QuantizeLinear pairs, which
    is why that int8 model is slower than fp32 here), but TensorRT rejects (zero point != 0).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if activations not in ACTIVATIONS:
        raise ExportError(f"unknown activation type {activations!r}; expected one of {', '.join(ACTIVATIONS)}")
    if method not in CALIBRATION_METHODS:
        raise ExportError(f"unknown calibration method {method!r}; expected one of {', '.join(CALIBRATION_METHODS)}")
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ExportError(f"calibration data must be a non-empty NCHW array, got shape {calibration.shape}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    notes: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dfkd-quant-") as work, atomic_path(out_path) as tmp:
        source = _preprocess(fp32_path, Path(work) / "pre.onnx", notes)
        reader = calibration_reader(calibration, layout=layout, batch_size=batch_size)
        try:
            quantize_static(
                str(source), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QInt8 if activations == "s8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
                # Symmetric ranges (zero point 0) and float biases: what TensorRT needs to import
                # the same Q/DQ file (it has no int32 DequantizeLinear for biases).
                extra_options={"ActivationSymmetric": activations == "s8", "WeightSymmetric": True,
                               "QuantizeBias": False},
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises many types; the user needs one line
            raise ExportError(f"INT8 quantization failed: {type(exc).__name__}: {one_line(exc)}") from None
        qdq = _check_qdq(tmp)
        result = QuantResult(path=out_path, format="QDQ", calibration_images=len(calibration),
                             calibration_method=method, per_channel=per_channel, qdq_nodes=qdq, notes=notes)
        if probes is not None and len(probes):
            fp32 = OrtRunner(fp32_path, layout=layout).predict(probes)
            int8 = OrtRunner(tmp, layout=layout, precision="int8").predict(probes)
            result.probe_images = len(probes)
            result.top1_agreement_vs_fp32 = float((fp32.argmax(1) == int8.argmax(1)).mean())
            result.max_abs_diff_vs_fp32 = float(np.abs(fp32.astype(np.float64) - int8).max())
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def calibration_reader(data: np.ndarray, *, layout: str = "NCHW", batch_size: int = CALIBRATION_BATCH,
                       input_name: str = INPUT_NAME):
    """An ORT ``CalibrationDataReader`` over an in-memory model-space NCHW array.

    Built in a function so that importing this module does not import ORT's quantization
    package (slow to load) for runs that never quantize.
    """
    from onnxruntime.quantization import CalibrationDataReader

    x = np.asarray(data, np.float32)
    x = to_layout(x, layout)   # the file's own layout
    step = max(1, int(batch_size))

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.pos = 0

        def get_next(self):
            if self.pos >= len(x):
                return None
            batch = np.ascontiguousarray(x[self.pos:self.pos + step])
            self.pos += step
            return {input_name: batch}

        def rewind(self):
            self.pos = 0

    return _Reader()


def qdq_node_count(path: str | Path) -> int:
    import onnx

    graph = onnx.load(str(path)).graph
    return sum(1 for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


# --- internals ---------------------------------------------------------------------------------

def _preprocess(src: Path, dst: Path, notes: list[str]) -> Path:
    """ORT's recommended pre-pass (shape inference + graph cleanup); optional, so failures only note."""
    try:
        from onnxruntime.quantization import quant_pre_process

        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return dst
    except Exception as exc:  # noqa: BLE001 - a missing pre-pass costs accuracy, not correctness
        notes.append(f"quantization pre-processing skipped: {one_line(exc)}")
        return src


def _check_qdq(path: Path) -> int:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"quantized model fails the ONNX checker: {one_line(exc)}") from None
    n = qdq_node_count(path)
    if n == 0:
        raise ExportError("quantization produced no QuantizeLinear/DequantizeLinear nodes")
    return n



