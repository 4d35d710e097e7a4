"""The library's front door: everything the CLI does is a call here, with the same names.

compress = load teacher -> build student -> synthesize + distill -> held-out probes ->
export ONNX -> validate -> report/manifest.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .device import resolve_device
from .distill.trainer import Distiller, seed_everything
from .errors import UsageError
from .models import build_model
from .progress import console, task
from .recipe import Recipe
from .report.report import count_parameters
from .synthesis.fast import FastSynthesizer
from .synthesis.pool import ImagePool
from .teachers import load_teacher
from .teachers.spec import Teacher

PROBE_SEED_OFFSET = 1_000_003   # probes come from a random stream no training batch used


@dataclass
class CompressResult:
    run_dir: Path
    report: dict


def build_student(recipe: Recipe, teacher: Teacher) -> nn.Module:
    c, h, w = teacher.spec.input_shape
    return build_model(recipe.student.arch, num_classes=teacher.spec.num_classes, in_channels=c, input_size=(h, w))


def make_synthesizer(teacher: Teacher, recipe: Recipe, device: torch.device) -> FastSynthesizer:
    return FastSynthesizer(teacher.module, teacher.normalizer(), teacher.spec.input_shape,
                           teacher.spec.num_classes, recipe.synthesis, device,
                           use_bn_statistics=teacher.spec.bn_layers > 0)


def plan(teacher: Teacher, recipe: Recipe) -> dict:
    """What a run would do, without doing it (``--dry-run``)."""
    s, d = recipe.synthesis, recipe.distillation
    student = build_student(recipe, teacher)
    return {
        "teacher": teacher.spec.to_dict(),
        "student": {"arch": recipe.student.arch, "params": count_parameters(student)},
        "synthesis": {"method": s.method, "g_steps": s.g_steps, "batch_size": s.batch_size,
                      "rounds": d.epochs * s.rounds_per_epoch,
                      "images": d.epochs * s.rounds_per_epoch * s.batch_size},
        "distillation": {"epochs": d.epochs, "warmup": d.warmup, "kd_steps_per_epoch": d.kd_steps,
                         "batch_size": d.batch_size, "temperature": d.temperature},
        "validation": {"probe_images": recipe.validation.probe_images},
        "seed": recipe.seed,
    }


def make_probes(synth: FastSynthesizer, count: int, batch_size: int, seed: int) -> torch.Tensor:
    """Held-out synthetic probes: fresh latents from the final generator, never in the pool.

    No adversarial term (probes should be what the teacher recognises, not what the student
    gets wrong) and no meta update (the generator is not changed by making them)."""
    batches, made = [], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + PROBE_SEED_OFFSET)
        while made < count:
            images, _ = synth.synthesize(None, adversarial=False, meta_update=False,
                                         batch_size=max(2, min(batch_size, count - made)))
            batches.append(images.cpu())
            made += images.shape[0]
    return torch.cat(batches)[:count]


def prepare_run_dir(out: str | Path, resume: bool) -> Path:
    run_dir = Path(out)
    ckpt = run_dir / "checkpoints" / "last.pt"
    if resume:
        if not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt}")
    elif ckpt.exists():
        raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    else:
        shutil.rmtree(run_dir / "pool", ignore_errors=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None
    return run_dir


def distill(teacher: Teacher, recipe: Recipe, run_dir: Path, device: torch.device, *,
            resume: bool = False, show_progress: bool = True, synthesize_more: bool = True,
            pool: ImagePool | None = None):
    """Synthesis interleaved with KD; returns (student, synthesizer, distiller result).

    ``pool`` defaults to ``run_dir/pool``; with ``synthesize_more=False`` the student is trained
    on the given pool only."""
    seed_everything(recipe.seed)
    student = build_student(recipe, teacher).to(device)
    synth = make_synthesizer(teacher, recipe, device)
    pool = pool if pool is not None else ImagePool(run_dir / "pool")
    distiller = Distiller(teacher.module, teacher.normalizer(), student, synth if synthesize_more else None,
                          pool, recipe, run_dir, device, show_progress)
    if resume:
        distiller.resume()
    return student, synth, distiller.run()


def compress(teacher_path: str | Path, recipe: Recipe, out: str | Path, *, device: str = "auto",
             eval_data: str | Path | None = None, trust_pickle: bool = False, resume: bool = False,
             show_progress: bool = True, bundle_dir: str | Path | None = None) -> CompressResult:
    from .pipeline import finish_run  # export + validation + reports

    dev = resolve_device(device)
    teacher = load_teacher(teacher_path, recipe.teacher, trust_pickle=trust_pickle)
    teacher.module.to(dev)
    run_dir = prepare_run_dir(out, resume)
    started = time.time()
    student, synth, result = distill(teacher, recipe, run_dir, dev, resume=resume, show_progress=show_progress)
    with task("held-out probes", 1, show_progress) as bar:
        probes = make_probes(synth, recipe.validation.probe_images, recipe.synthesis.batch_size, recipe.seed)
        bar.advance()
    report = finish_run(teacher, student, recipe, run_dir, probes=probes, distill_result=result,
                        eval_data=eval_data, device=dev, wall_seconds=time.time() - started,
                        show_progress=show_progress, bundle_dir=Path(bundle_dir) if bundle_dir else None)
    console.print(f"[green]done[/green]: {run_dir}")
    return CompressResult(run_dir, report)
