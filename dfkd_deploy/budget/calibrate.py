"""Measure, on this machine, what the planner needs: one synthesis round, one KD step, an epoch's
bookkeeping, and an estimate of the end of the run (probes, export, INT8, validation, reports)."""
from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dfkd_deploy.budget.planner import Costs

KD_STEPS_TIMED = 3        # after one untimed warm-up step; the median is taken
LATENCY_RUNS = 7 * 3      # (2 warm-up + 5 timed) runs of teacher, student and INT8 student, per batch size
REPORT_SECONDS = 3.0      # reports, manifest, bundle copies: small files


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def calibrate(teacher, recipe, student, device, *, eval_images: int = 0) -> Costs:
    """Costs of ``recipe`` with this teacher and (a copy of) this student on ``device``."""
    from dfkd_deploy.synthesis import make_synthesizer
    from dfkd_deploy.core.augment import crop_flip

    s, d = recipe.synthesis, recipe.distillation
    student = copy.deepcopy(student).to(device)
    with make_synthesizer(teacher, recipe, device) as synth:   # its hooks leave the teacher afterwards
        round_s = _timed(lambda: synth.synthesize(student, adversarial=True))
        images, _ = synth.synthesize(None, adversarial=False, meta_update=False, batch_size=min(s.batch_size, 8))
    norm = teacher.normalizer().to(device)
    pixels = images.repeat(math.ceil(d.batch_size / len(images)), 1, 1, 1)[:d.batch_size].to(device)
    opt = torch.optim.SGD(student.parameters(), lr=1e-6)

    def kd_step():
        x = norm(crop_flip(pixels, s.augment.crop_padding, s.augment.flip))
        with torch.no_grad():
            t = teacher.module(x)
        loss = F.kl_div(F.log_softmax(student(x), 1), F.softmax(t, 1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()

    student.train()
    kd_step()
    kd_s = statistics.median(_timed(kd_step) for _ in range(KD_STEPS_TIMED))
    overhead_s, export_s = _bookkeeping(student.cpu(), teacher.spec.input_shape)
    probe_rounds = math.ceil(recipe.validation.probe_images / s.batch_size)
    forward_s = kd_s / 3                                   # a forward pass is about a third of a step
    finish_s = (probe_rounds * round_s * 0.7              # probes: no adversarial term, no meta update
                + 4 * export_s                            # export + parity, INT8 quantisation and checks
                + forward_s * math.ceil((eval_images + recipe.deploy.calibration_images) / d.batch_size) * 3
                + _latency_seconds(student) + REPORT_SECONDS)
    return Costs(round_s, kd_s, overhead_s, finish_s)


def _bookkeeping(student, input_shape) -> tuple[float, float]:
    """(one checkpoint write of the student + optimizer state, one ONNX export of the student)."""
    from dfkd_deploy.core.io import save_torch
    from exporters.onnx_export import export_teacher_onnx

    state = {"student": student.state_dict(), "optimizer": {k: v.clone() for k, v in student.state_dict().items()}}
    with tempfile.TemporaryDirectory(prefix="dfkd-calibrate-") as tmp:
        ckpt_s = _timed(lambda: save_torch(Path(tmp) / "last.pt", state))
        export_s = _timed(lambda: export_teacher_onnx(student.eval(), Path(tmp) / "s.onnx",
                                                      input_shape=tuple(input_shape), fold=True))
    return 2 * ckpt_s, export_s


def _latency_seconds(student) -> float:
    lat = (getattr(student, "dfkd_info", {}).get("size") or {})
    ms = 0.0
    for who in ("student", "teacher"):
        ms += sum((lat.get(who) or {}).get("latency_ms", {}).values())
    return LATENCY_RUNS * ms / 1000 * 1.5   # teacher + student (+ the INT8 student, about as fast)
