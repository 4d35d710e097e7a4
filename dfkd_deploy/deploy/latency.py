"""Latency and size of teacher vs student, both on ONNX Runtime CPU, so the numbers compare like
with like (what ships is an ONNX file; torch eager timings would flatter neither).

Timing: a few warm-up runs (allocations, kernel selection), then the median of ``repeats``
runs per batch size (:meth:`dfkd_deploy.runtime.base.Runner.time`). Repeats are small by
default so a run stays fast; raise them for a benchmark. Teachers that are not ONNX files are
exported to a temporary ONNX file first (the teacher exporter, legacy, constant folding on);
when that fails the teacher's latency is null with the reason.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from exporters.onnx_export import export_teacher_onnx

from dfkd_deploy.runtime.base import Runner, time_runner
from dfkd_deploy.runtime.onnxruntime import PROVIDER, OrtRunner

LATENCY_BATCHES = (1, 32)
WARMUP = 2
REPEATS = 5

Timings = dict   # {"batch_1_ms": median, ...}


@dataclass
class Latency:
    """report.json ``latency``: median milliseconds per batch size, per model."""

    batches: list[int]
    warmup: int
    repeats: int
    student: Timings
    student_int8: Optional[Timings] = None
    teacher: Optional[Timings] = None
    teacher_source: Optional[str] = None     # "file" (the teacher's ONNX), "exported", None (not timed)
    teacher_reason: Optional[str] = None     # why the teacher was not timed
    provider: str = PROVIDER
    backends: list = field(default_factory=list)   # edge runtimes: {"backend", "precision", "file", "bytes", timings}

    def speedups(self) -> dict:
        """Speed-up of the student over the teacher, per batch size."""
        out = {}
        for b in self.batches:
            t, s = (self.teacher or {}).get(f"batch_{b}_ms"), self.student.get(f"batch_{b}_ms")
            out[f"speedup_batch_{b}"] = round(t / s, 3) if t and s else None
        return out

    def to_dict(self) -> dict:
        return {"provider": self.provider, "warmup": self.warmup, "repeats": self.repeats,
                "batches": list(self.batches), "teacher": self.teacher, "student": self.student,
                "student_int8": self.student_int8, "teacher_source": self.teacher_source,
                "teacher_reason": self.teacher_reason, "backends": list(self.backends), **self.speedups()}


@dataclass
class Size:
    """report.json ``size``: parameters and file bytes, with the teacher/student ratios."""

    teacher_params: int
    student_params: int
    student_bytes: int
    teacher_bytes: Optional[int] = None
    student_int8_bytes: Optional[int] = None

    def to_dict(self) -> dict:
        return {"teacher_params": self.teacher_params, "student_params": self.student_params,
                "teacher_bytes": self.teacher_bytes, "student_bytes": self.student_bytes,
                "student_int8_bytes": self.student_int8_bytes,
                "param_ratio": round(self.teacher_params / self.student_params, 3) if self.student_params else None,
                "bytes_ratio": (round(self.teacher_bytes / self.student_bytes, 3)
                                if self.teacher_bytes and self.student_bytes else None)}


@dataclass
class TeacherTiming:
    timings: Optional[Timings] = None
    source: Optional[str] = None
    reason: Optional[str] = None
    nbytes: Optional[int] = None
    note: Optional[str] = None     # how it was timed, where not the usual way


@dataclass
class LatencyAndSize:
    latency: Latency
    size: Size


def time_teacher(teacher, *, threads: Optional[int] = None, **kw) -> TeacherTiming:
    """The teacher on ORT CPU: its own ONNX file, or one exported here; never fatal. A file that
    cannot be timed as it is (a batch fixed at 16, as MLPerf-Tiny's ResNet-8, cannot run at
    batch 1 or 32) is timed through its converted module, exported with a dynamic batch."""
    spec = teacher.spec
    file_error, nbytes = None, None
    if spec.format == "onnx" and Path(spec.source).is_file():
        src = Path(spec.source)
        nbytes = src.stat().st_size
        try:
            runner = OrtRunner(src, layout=spec.layout, threads=threads, input_shape=spec.input_shape)
            return TeacherTiming(time_runner(runner, **kw), "file", None, nbytes)
        except Exception as exc:  # noqa: BLE001 - timed through the converted module below
            file_error = _reason(exc)
    with tempfile.TemporaryDirectory(prefix="dfkd-latency-") as tmp:
        try:
            module, shape = _exportable(teacher)
            src = export_teacher_onnx(module, Path(tmp) / "teacher.onnx", input_shape=shape, fold=True)
            runner = OrtRunner(src, layout="NCHW", threads=threads, input_shape=shape)
            note = (f"the file could not be timed as it is ({file_error}); timed the converted teacher exported "
                    "with a dynamic batch") if file_error else None
            return TeacherTiming(time_runner(runner, **kw), "exported", None, nbytes or src.stat().st_size, note)
        except Exception as exc:  # noqa: BLE001 - timing the teacher is informative, never fatal
            return TeacherTiming(reason=file_error or _reason(exc))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _exportable(teacher) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """What to export for timing, and the shape of one input it takes.

    The teacher's module speaks NCHW whatever its file did. A TorchScript model cannot be traced
    inside that Python wrapper, so it is exported as it is, taking its file's own layout (the
    wrapper's permute and flatten cost nothing worth timing).
    """
    spec, inner = teacher.spec, getattr(teacher.module, "model", None)
    if isinstance(inner, torch.jit.ScriptModule):
        c, h, w = spec.input_shape
        return inner, ((h, w, c) if spec.layout.upper() == "NHWC" else (c, h, w))
    return teacher.module, tuple(spec.input_shape)


def latency_and_size(teacher, student: OrtRunner, *, student_params: int, teacher_params: int,
                     student_int8: Optional[OrtRunner] = None, others: Sequence[Runner] = (), batches: Sequence[int] = LATENCY_BATCHES,
                     warmup: int = WARMUP, repeats: int = REPEATS) -> LatencyAndSize:
    """Teacher, student and int8 student timed alike (the teacher with the student's ORT threads).

    ``teacher`` is a :class:`~dfkd_deploy.teachers.spec.Teacher`; ``student``/``student_int8``
    run the student files (in the teacher's layout); ``others`` are the edge runtimes' runners
    (OpenVINO, ExecuTorch), timed alike into ``latency.backends``.
    """
    kw = dict(batches=batches, warmup=warmup, repeats=repeats)
    t = time_teacher(teacher, threads=student.threads, **kw)
    latency = Latency(batches=list(batches), warmup=warmup, repeats=repeats, student=time_runner(student, **kw),
                      student_int8=time_runner(student_int8, **kw) if student_int8 else None,
                      teacher=t.timings, teacher_source=t.source, teacher_reason=t.reason,
                      backends=[time_backend(r, **kw) for r in others])
    size = Size(teacher_params=teacher_params, student_params=student_params, teacher_bytes=t.nbytes,
                student_bytes=student.path.stat().st_size,
                student_int8_bytes=student_int8.path.stat().st_size if student_int8 else None)
    return LatencyAndSize(latency, size)



def time_backend(runner: Runner, **kw) -> dict:
    """One edge runtime's row: which file, its bytes (with the weights beside it), and its timings."""
    path = getattr(runner, "path", None)
    nbytes = None
    if path is not None and Path(path).is_file():
        weights = Path(path).with_suffix(".bin") if Path(path).suffix == ".xml" else None
        nbytes = Path(path).stat().st_size + (weights.stat().st_size if weights and weights.is_file() else 0)
    try:
        timings, error = time_runner(runner, **kw), None
    except Exception as exc:  # noqa: BLE001 - one runtime failing to time must not hide the others
        timings, error = {}, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return {"backend": runner.name, "precision": runner.precision, "file": Path(path).name if path else None,
            "bytes": nbytes, **timings, "error": error}
