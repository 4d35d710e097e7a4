"""Measure, on this machine, what the planner needs: one synthesis round (the second of two: the first
pays for warm-up), one KD step (under the run's precision), an epoch's
bookkeeping, and an estimate of the end of the run (probes, export, INT8, validation, reports)."""
from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dfkd_deploy.budget.planner import Costs
from dfkd_deploy.recipe import synthesis_batch

KD_STEPS_TIMED = 3        # after one untimed warm-up step; the median is taken
LATENCY_RUNS = 7 * 3      # (2 warm-up + 5 timed) runs of teacher, student and INT8 student, per batch size
REPORT_SECONDS = 8.0      # reports (HTML figures), gallery, manifest, bundle copies
# Converting the student for the edge runtimes (both precisions of each, NNCF / XNNPACK
# quantization included), as a multiple of one ONNX export of the student, which the calibration
# times on this machine anyway: benchmarks/edge_convert_cost.py measured, side by side in one
# process, ExecuTorch 142 / 148 / 156x and OpenVINO 13 / 13 / 9x the export for cifar_resnet8 / 20
# / 56 (10.4 / 19.3 / 45.7 s of ExecuTorch on a 2-core Xeon). Fixed seconds per layer, measured on
# a host 2-3x slower (ExecuTorch 22 s + 2.2 s per layer), overestimated a 10-minute run's end by
# 50 s on a faster one.
EDGE_PER_EXPORT = {"executorch": 150.0, "openvino": 13.0}
EDGE_FILES = {"executorch": 2, "openvino": 3}
# A batch of held-out probes costs this fraction of a synthesis round (no adversarial term, no
# meta update).
PROBE_ROUND = 0.7
# In a budgeted run every back end is compared on at most this many real images (run.compare_images).
BUDGET_COMPARE_IMAGES = 2000


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def calibrate(teacher, recipe, student, device, *, eval_images: int = 0) -> Costs:
    """Costs of ``recipe`` with this teacher and (a copy of) this student on ``device``."""
    from dfkd_deploy.synthesis import make_synthesizer
    from dfkd_deploy.core.augment import crop_flip, mix_batch
    from dfkd_deploy.core.precision import autocast_factory, resolve_precision
    from dfkd_deploy.distill.attention import AttentionTransfer
    from dfkd_deploy.distill.kd import kd_kl
    from dfkd_deploy.distill.trainer import feature_weight

    s, d = recipe.synthesis, recipe.distillation
    student = copy.deepcopy(student).to(device)
    # the KD step under the trainer's precision: bf16 autocast where the CPU runs it (AMX) makes a
    # step about 1.7x faster than fp32 here (0.48 against 0.83 s), and a plan made with fp32 steps left budget unused
    autocast = autocast_factory(resolve_precision(d.precision, torch.device(device)), torch.device(device))
    with make_synthesizer(teacher, recipe, device) as synth:   # its hooks leave the teacher afterwards
        # the first round in a process pays for allocator and oneDNN warm-up (1.2-1.4x a later
        # one, measured by benchmarks/calibration_warmup.py): the second is the one planned with
        synth.synthesize(student, adversarial=True)
        round_s = _timed(lambda: synth.synthesize(student, adversarial=True))
        images, _ = synth.synthesize(None, adversarial=False, meta_update=False, batch_size=min(synthesis_batch(s), 8))
    norm = teacher.normalizer().to(device)
    pixels = images.repeat(math.ceil(d.batch_size / len(images)), 1, 1, 1)[:d.batch_size].to(device)
    opt = torch.optim.SGD(student.parameters(), lr=1e-6)

    cached = d.teacher_logits == "cached"
    if cached:   # the teacher labels each pool image once: charged to the round that made it
        with torch.no_grad(), autocast():
            fixed = teacher.module(norm(pixels)).float()

    # the stage-end terms the trainer adds (attention transfer, feature matching) cost hooks and maps
    fw = feature_weight(recipe)
    stage = AttentionTransfer(teacher.module, student, norm(pixels[:2])) if d.attention > 0 or fw > 0 else None
    if stage is not None and not stage.available:
        stage = None

    def kd_step():
        x = norm(mix_batch(crop_flip(pixels, s.augment.crop_padding, s.augment.flip), d.mix, d.mix_alpha))
        with stage.capture() if stage else nullcontext():
            if cached:
                t = fixed
            else:
                with torch.no_grad(), autocast():
                    t = teacher.module(x).float()
            with autocast():
                out = student(x).float()
        loss = kd_kl(out, t, d.temperature)
        for weight, term in (stage.terms(d.attention, fw) if stage else {}).values():
            loss = loss + weight * term
        opt.zero_grad()
        loss.backward()
        opt.step()

    student.train()
    try:
        kd_step()
        kd_s = statistics.median(_timed(kd_step) for _ in range(KD_STEPS_TIMED))
    finally:
        if stage is not None:   # the teacher leaves the calibration without its hooks
            stage.remove()
    teacher_img_s, student_img_s = _forward_seconds(teacher.module, student, norm(pixels))
    # cached logits: each round's images get one teacher forward when KD first draws them
    labelling_s = teacher_img_s * synthesis_batch(s) if cached else 0.0
    overhead_s, export_s = _bookkeeping(student.cpu(), teacher.spec.input_shape)
    kw = dict(round_s=round_s, export_s=export_s, teacher_img_s=teacher_img_s, student_img_s=student_img_s,
              eval_images=eval_images, latency_s=_latency_seconds(student))
    finish = finish_seconds(recipe, **kw)
    without_edge = finish_seconds(recipe.model_copy(update={"deploy": recipe.deploy.model_copy(
        update={"edge_runtimes": []})}), **kw)
    return Costs(round_s + labelling_s, kd_s, overhead_s, finish, edge_s=finish - without_edge,
                 probe_batch_s=round_s * PROBE_ROUND)


def finish_seconds(recipe, *, round_s: float, export_s: float, teacher_img_s: float, student_img_s: float,
                   eval_images: int, latency_s: float, installed=None) -> float:
    """The end of the run, estimated from measured per-image forward costs: held-out probes,
    export and INT8, the evaluation (teacher, torch student, ONNX student on every eval image),
    the back-end comparison (every back end on the probes and up to BUDGET_COMPARE_IMAGES real
    images; ORT INT8 counted twice, it is slower here), the edge runtimes' conversion, latency
    and the reports."""
    s = recipe.synthesis
    probes = recipe.validation.probe_images
    runtimes = [r for r in recipe.deploy.edge_runtimes if (installed or _installed)(r)]
    backends = 3 + sum(EDGE_FILES[r] for r in runtimes)          # ORT fp32, ORT int8 (x2), edge files
    compare = min(eval_images, BUDGET_COMPARE_IMAGES)
    return (math.ceil(probes / synthesis_batch(s)) * round_s * PROBE_ROUND   # probes: no adversarial term, no meta update
            + 4 * export_s                                        # export + parity, INT8 quantisation and checks
            + eval_images * (teacher_img_s + 2 * student_img_s)
            + (recipe.deploy.calibration_images + probes) * student_img_s * 2
            + (compare + probes) * student_img_s * backends
            + sum(EDGE_PER_EXPORT[r] * export_s for r in runtimes)
            + latency_s * (1 + len(runtimes)) + REPORT_SECONDS)


def _installed(runtime: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(runtime) is not None


def _layers(model) -> int:
    from torch import nn

    return sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def _forward_seconds(teacher_module, student, x) -> tuple[float, float]:
    """Seconds per image of one no-grad forward of the teacher and of the student (eval mode)."""
    was_training = student.training
    student.eval()
    with torch.no_grad():
        teacher_module(x)          # warm-up
        t = _timed(lambda: teacher_module(x))
        student(x)
        st = _timed(lambda: student(x))
    student.train(was_training)
    return t / len(x), st / len(x)


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
