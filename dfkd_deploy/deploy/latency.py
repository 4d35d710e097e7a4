"""Latency and size of teacher vs student, both on ONNX Runtime CPU, so the numbers compare like
with like (what ships is an ONNX file; torch eager timings would flatter neither).

Timing: a few warm-up runs (allocations, kernel selection), then the median of ``repeats``
runs per batch size. Repeats are small by default so a run stays fast; raise them for a
benchmark. Teachers that are not ONNX files are exported to a temporary ONNX file first
(legacy exporter); when that fails the teacher's latency is null with the reason.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

LATENCY_BATCHES = (1, 32)
WARMUP = 2
REPEATS = 5


def time_onnx(path: str | Path, input_shape: Sequence[int], *, layout: str = "NCHW",
              batches: Sequence[int] = LATENCY_BATCHES, warmup: int = WARMUP, repeats: int = REPEATS,
              threads: Optional[int] = None) -> dict:
    """``{"batch_1_ms": median, ...}`` for the ONNX file at ``path`` on ORT CPU (random inputs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    c, h, w = (int(v) for v in input_shape)
    out = {}
    rng = np.random.default_rng(0)
    for b in batches:
        shape = (b, h, w, c) if layout.upper() == "NHWC" else (b, c, h, w)
        feed = {name: rng.standard_normal(shape, dtype=np.float32)}
        for _ in range(max(0, warmup)):
            sess.run(None, feed)
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        out[f"batch_{b}_ms"] = round(1000 * float(np.median(times)), 4)
    return out


def export_teacher_for_timing(module, input_shape: Sequence[int], path: Path, opset: int = 17) -> Path:
    """A torch teacher (model-space NCHW in) as ONNX with a dynamic batch, for timing only."""
    import copy

    import torch

    c, h, w = (int(v) for v in input_shape)
    module = copy.deepcopy(module)   # a CPU copy: the caller's teacher keeps its device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the legacy exporter's deprecation notes are no news here
        with torch.no_grad():
            torch.onnx.export(module.cpu().eval(), (torch.zeros(1, c, h, w),), str(path), dynamo=False,
                              opset_version=opset, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def latency_and_size(teacher, student_onnx: str | Path, *, student_params: int, teacher_params: int,
                     student_int8_onnx: str | Path | None = None, batches: Sequence[int] = LATENCY_BATCHES,
                     warmup: int = WARMUP, repeats: int = REPEATS, threads: Optional[int] = None) -> dict:
    """``{"latency": {...}, "size": {...}}`` for report.json (keys listed in the module's callers).

    ``teacher`` is a :class:`~dfkd_deploy.teachers.spec.Teacher`. The student files use the
    teacher's layout; a teacher exported here is timed in NCHW (its module speaks NCHW).
    """
    spec = teacher.spec
    kw = dict(batches=batches, warmup=warmup, repeats=repeats, threads=threads)
    latency: dict = {"provider": "CPUExecutionProvider", "warmup": warmup, "repeats": repeats,
                     "batches": list(batches), "teacher": None, "student": None, "student_int8": None,
                     "teacher_source": None, "teacher_reason": None}
    latency["student"] = time_onnx(student_onnx, spec.input_shape, layout=spec.layout, **kw)
    if student_int8_onnx and Path(student_int8_onnx).is_file():
        latency["student_int8"] = time_onnx(student_int8_onnx, spec.input_shape, layout=spec.layout, **kw)

    teacher_bytes = None
    with tempfile.TemporaryDirectory(prefix="dfkd-latency-") as tmp:
        try:
            if spec.format == "onnx" and Path(spec.source).is_file():
                src, layout, latency["teacher_source"] = Path(spec.source), spec.layout, "file"
            else:
                src = export_teacher_for_timing(teacher.module, spec.input_shape, Path(tmp) / "teacher.onnx")
                layout, latency["teacher_source"] = "NCHW", "exported"
            teacher_bytes = src.stat().st_size
            latency["teacher"] = time_onnx(src, spec.input_shape, layout=layout, **kw)
        except Exception as exc:  # noqa: BLE001 - timing the teacher is informative, never fatal
            latency["teacher_source"] = None
            latency["teacher_reason"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]

    for b in batches:   # speed-up of the student over the teacher, per batch size
        t, s = (latency["teacher"] or {}).get(f"batch_{b}_ms"), latency["student"].get(f"batch_{b}_ms")
        latency[f"speedup_batch_{b}"] = round(t / s, 3) if t and s else None

    student_bytes = Path(student_onnx).stat().st_size
    int8_bytes = Path(student_int8_onnx).stat().st_size if student_int8_onnx and Path(student_int8_onnx).is_file() else None
    size = {"teacher_params": teacher_params, "student_params": student_params,
            "teacher_bytes": teacher_bytes, "student_bytes": student_bytes, "student_int8_bytes": int8_bytes,
            "param_ratio": round(teacher_params / student_params, 3) if student_params else None,
            "bytes_ratio": round(teacher_bytes / student_bytes, 3) if teacher_bytes and student_bytes else None}
    return {"latency": latency, "size": size}


def latency_markdown(latency: dict, size: dict) -> str:
    """report.md section: one row per model, one column per batch size."""
    batches = latency.get("batches") or list(LATENCY_BATCHES)
    head = "| Model | Parameters | File size | " + " | ".join(f"batch {b} (ms)" for b in batches) + " |"
    lines = [f"ONNX Runtime CPU, median of {latency.get('repeats')} runs after {latency.get('warmup')} warm-up runs.",
             "", head, "|" + "---|" * (3 + len(batches))]

    def row(label, timings, params, nbytes):
        cells = [_ms((timings or {}).get(f"batch_{b}_ms")) for b in batches]
        return f"| {label} | {_int(params)} | {_bytes(nbytes)} | " + " | ".join(cells) + " |"

    lines.append(row("Teacher", latency.get("teacher"), size.get("teacher_params"), size.get("teacher_bytes")))
    lines.append(row("Student (fp32)", latency.get("student"), size.get("student_params"), size.get("student_bytes")))
    if latency.get("student_int8"):
        lines.append(row("Student (int8)", latency["student_int8"], size.get("student_params"),
                         size.get("student_int8_bytes")))
    if latency.get("teacher_reason"):
        lines += ["", f"Teacher not timed: {latency['teacher_reason']}"]
    elif latency.get("teacher_source") == "exported":
        lines += ["", "The teacher was exported to a temporary ONNX file for timing."]
    return "\n".join(lines)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _int(v) -> str:
    return "-" if v is None else f"{int(v):,}"


def _bytes(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} kB"
