"""Size targets relative to the teacher (``--target params=0.3``), and the size figures a student is
judged by: parameters, MACs, and ONNX Runtime CPU latency at batch 1 and 32, measured the way
``latency.*`` is measured in report.json (:mod:`dfkd_deploy.deploy.latency`)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dfkd_deploy.core.units import Target

DEFAULT_FRACTION = 0.5    # no arch and no target: at least 2x smaller and faster than the teacher
LATENCY_BATCHES = (1, 32)


@dataclass
class SizeFigures:
    params: int
    macs: Optional[int]
    latency_ms: dict = field(default_factory=dict)   # {"batch_1_ms": .., "batch_32_ms": ..}; {} when not measured
    latency_reason: Optional[str] = None   # why latency_ms is empty
    latency_note: Optional[str] = None     # how it was measured, where not the usual way

    def to_dict(self) -> dict:
        out = {"params": self.params, "macs": self.macs, "latency_ms": dict(self.latency_ms),
               "latency_reason": self.latency_reason}
        if self.latency_note:
            out["latency_note"] = self.latency_note
        return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape) -> Optional[int]:
    """Multiply-accumulates of one image through the model's Conv2d and Linear layers (what
    dominates these nets; element-wise ops are not counted). None when the forward fails."""
    total = [0]

    def conv(m, _inp, out):
        total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, _out):
        total[0] += (inp[0][0].numel() // m.in_features) * m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=device))
        return int(total[0])
    except Exception:  # noqa: BLE001 - a model that does not take this input: MACs not measured
        return None
    finally:
        for h in hooks:
            h.remove()


def measure_latency(model: nn.Module | None, input_shape, *, onnx_path: str | Path | None = None,
                    layout: str = "NCHW") -> tuple[dict, Optional[str]]:
    """ORT CPU median ms per batch size: the ONNX file at ``onnx_path`` as it is, else ``model``
    exported (legacy exporter, dynamic batch) to a temporary file. ({} , reason) on failure."""
    from exporters.onnx_export import export_teacher_onnx

    from dfkd_deploy.runtime.base import time_runner
    from dfkd_deploy.runtime.onnxruntime import OrtRunner

    try:
        with tempfile.TemporaryDirectory(prefix="dfkd-size-") as tmp:
            if onnx_path is None:
                onnx_path = export_teacher_onnx(model, Path(tmp) / "model.onnx", input_shape=tuple(input_shape),
                                                fold=True)
                layout = "NCHW"
            runner = OrtRunner(onnx_path, layout=layout, input_shape=tuple(input_shape))
            return time_runner(runner, batches=LATENCY_BATCHES), None
    except Exception as exc:  # noqa: BLE001 - a model ORT cannot time at these batches: not measured
        return {}, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def measure(model: nn.Module, input_shape, *, latency: bool = True, onnx_path=None, layout="NCHW") -> SizeFigures:
    model.eval()   # (not moved: a teacher keeps its device; the latency export copies it to the CPU)
    lat, reason = measure_latency(model, input_shape, onnx_path=onnx_path, layout=layout) if latency else ({}, None)
    return SizeFigures(count_params(model), count_macs(model, input_shape), lat, reason)


def teacher_figures(teacher, *, latency: bool = True) -> SizeFigures:
    """The teacher's figures, timed as report.json's latency times it (deploy.latency.time_teacher:
    its ONNX file as it is, else exported)."""
    from dfkd_deploy.deploy.latency import time_teacher

    spec = teacher.spec
    teacher.module.eval()
    figures = SizeFigures(count_params(teacher.module), count_macs(teacher.module, spec.input_shape))
    if latency:
        t = time_teacher(teacher, batches=LATENCY_BATCHES)
        figures.latency_ms, figures.latency_reason, figures.latency_note = dict(t.timings or {}), t.reason, t.note
    return figures


def ratios(student: SizeFigures, teacher: SizeFigures) -> dict:
    """Student / teacher for each figure both have (None where either is missing)."""
    def ratio(a, b):
        return round(a / b, 4) if a is not None and b else None

    out = {"params": ratio(student.params, teacher.params), "macs": ratio(student.macs, teacher.macs)}
    for b in LATENCY_BATCHES:
        key = f"batch_{b}_ms"
        out[f"latency_b{b}"] = ratio(student.latency_ms.get(key), teacher.latency_ms.get(key))
    return out


def worst_latency_ratio(r: dict) -> Optional[float]:
    values = [r.get(f"latency_b{b}") for b in LATENCY_BATCHES if r.get(f"latency_b{b}") is not None]
    return max(values) if values else None


def meets(r: dict, target: Target) -> bool:
    """True when the student's ratio for the target's metric is within the fraction (latency: at
    both batch sizes). A figure that could not be measured does not meet a target on it."""
    value = worst_latency_ratio(r) if target.metric == "latency" else r.get(target.metric)
    return value is not None and value <= target.fraction


def size_warnings(r: dict) -> list[str]:
    """One line for each way the student is larger or slower than the teacher it replaces."""
    out = []
    if r.get("params") is not None and r["params"] >= 1:
        out.append(f"the student has {r['params']:.2f}x the teacher's parameters: it is not smaller")
    if r.get("macs") is not None and r["macs"] >= 1:
        out.append(f"the student needs {r['macs']:.2f}x the teacher's MACs")
    for b in LATENCY_BATCHES:
        v = r.get(f"latency_b{b}")
        if v is not None and v > 1:
            out.append(f"the student is {v:.2f}x slower than the teacher at batch {b} (ONNX Runtime CPU): "
                       "it is not faster")
    return out
