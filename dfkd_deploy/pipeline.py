"""The end of every run: export, validate, and write the run directory's reports.

Run directory contents: student.onnx, student.pt, recipe.resolved.yaml, report.json,
report.md, manifest.json (sha256 of every artifact), plus pool/ and checkpoints/; and the
deployment hand-off: student.int8.onnx and bundle/ (see dfkd_deploy/report/bundle.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from exporters.onnx_export import export_student_onnx

from .distill.trainer import DistillResult
from .io import write_text
from .models.student_file import save_student
from .progress import console, task
from .recipe import Recipe
from .report.manifest import write_manifest
from .report.bundle import run_deployment
from .report.report import REPORT_MD, build_report, count_parameters, render_report_md, write_report_json
from .teachers.spec import Teacher
from .validate.data import load_eval_data
from .validate.metrics import evaluate, predict, top1_agreement

ARTIFACTS = ("student.onnx", "student.pt", "recipe.resolved.yaml", "report.json", "report.md")


def probe_agreement(teacher: Teacher, student: nn.Module, probes: torch.Tensor, device) -> dict:
    norm = teacher.normalizer()
    t = predict(teacher.module, probes, normalizer=norm, device=device)
    s = predict(student, probes, normalizer=norm, device=device)
    return {"top1": top1_agreement(t, s), "images": int(probes.shape[0])}


def finish_run(teacher: Teacher, student: nn.Module, recipe: Recipe, run_dir: Path, *, probes: torch.Tensor,
               distill_result: DistillResult | None, eval_data=None, device="cpu", wall_seconds: float | None = None,
               show_progress: bool = True, bundle_dir: Path | None = None) -> dict:
    spec = teacher.spec
    student.eval()
    with task("export + validate", 3, show_progress) as bar:
        model_space_probes = teacher.normalizer()(probes)
        export = export_student_onnx(student, run_dir / "student.onnx", input_shape=spec.input_shape,
                                     layout=spec.layout, opset=recipe.export.opset, probes=model_space_probes,
                                     tolerance=recipe.export.parity_tolerance)
        bar.advance()
        agreement = probe_agreement(teacher, student, probes, device)
        bar.advance()
        evaluation = data = None
        if eval_data is not None:
            data = load_eval_data(eval_data, input_shape=spec.input_shape, num_classes=spec.num_classes)
            evaluation = evaluate(teacher.module, student, teacher.normalizer(), data, device=device,
                                  batch_size=recipe.validation.batch_size, onnx_path=export.path,
                                  onnx_layout=spec.layout)
        bar.advance()
    # Deployment hand-off: int8, bundle (default run_dir/bundle), TensorRT or its script,
    # back-end comparison, latency/size. Appended to report.json/report.md below.
    with task("int8 + bundle + latency", 1, show_progress) as bar:
        deployment = run_deployment(
            teacher, student, run_dir, probes=probes, eval_data=data, seed=recipe.seed, bundle_dir=bundle_dir,
            calibration_images=recipe.deploy.calibration_images, profile_batches=recipe.deploy.batch_profile,
            figures={"student_accuracy": (evaluation or {}).get("student_accuracy"),
                     "teacher_accuracy": (evaluation or {}).get("teacher_accuracy"),
                     "onnx_accuracy": (evaluation or {}).get("onnx_accuracy"),
                     "agreement_top1": (evaluation or {}).get("agreement", agreement["top1"])},
            echo=console.print)
        bar.advance()

    r = distill_result
    report = build_report(
        spec,
        student={"arch": recipe.student.arch, "params": count_parameters(student),
                 "teacher_params": count_parameters(teacher.module)},
        evaluation=evaluation, probe_agreement=agreement, export=export,
        synthesis={"method": recipe.synthesis.method, "g_steps": recipe.synthesis.g_steps,
                   "images": r.images if r else None, "seconds": round(r.synthesis_seconds, 2) if r else None,
                   "images_per_second": round(r.images / r.synthesis_seconds, 2) if r and r.synthesis_seconds else None},
        distillation={"epochs": r.epochs if r else None,
                      "seconds": round(r.distillation_seconds, 2) if r else None,
                      "final": r.history[-1] if r and r.history else None},
        extra={"seed": recipe.seed, "device": str(device),
               "wall_seconds": round(wall_seconds, 2) if wall_seconds is not None else None,
               **deployment.sections},
    )
    save_student(run_dir / "student.pt", student, arch=recipe.student.arch, num_classes=spec.num_classes,
                 input_shape=spec.input_shape, teacher_spec=spec.to_dict())
    write_text(run_dir / "recipe.resolved.yaml", recipe.resolved_yaml())
    write_report_json(run_dir, report)
    write_text(run_dir / REPORT_MD, render_report_md(report) + deployment.markdown)
    write_manifest(run_dir, seed=recipe.seed, artifacts=list(ARTIFACTS) + deployment.artifacts)
    return report
