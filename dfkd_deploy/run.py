"""The library's front door: everything the CLI does is a call here, with the same names.

compress = load teacher -> build student -> synthesize + distill -> held-out probes ->
export ONNX -> validate -> report/manifest.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from exporters.metadata import StudentContract, write_contract
from exporters.onnx_export import export_student_onnx

from dfkd_deploy.core.io import sha256_file, write_text
from dfkd_deploy.distill.metrics_log import MetricsLog
from dfkd_deploy.report.html import REPORT_HTML, write_report_html
from dfkd_deploy.report.provenance import label_measurements, measured_on_markdown
from dfkd_deploy.report.report import get_path
from dfkd_deploy.validate.gallery import GALLERY_FILE, confusion, one_class_warning, write_gallery
from dfkd_deploy.distill.trainer import DistillResult
from dfkd_deploy.students.student_file import save_student
from dfkd_deploy.students.build import resolve_init
from dfkd_deploy.report.manifest import write_manifest
from dfkd_deploy.deploy.results import RunFigures
from dfkd_deploy.deploy.stage import DeployOptions, run_deployment
from dfkd_deploy.report.deploy_md import deploy_report_md
from dfkd_deploy.report.report import REPORT_MD, build_report, render_report_md, write_report_json
from dfkd_deploy.validate.data import load_eval_data
from dfkd_deploy.validate.metrics import evaluate, predict, top1_agreement
from dfkd_deploy.core import distributed
from dfkd_deploy.core.device import resolve_device
from dfkd_deploy.distill.trainer import Distiller, seed_everything
from dfkd_deploy.models import build_model
from dfkd_deploy.models.heads import apply_head_config
from dfkd_deploy.core.progress import console, task, warn
from dfkd_deploy.recipe import Recipe
from dfkd_deploy.report.report import count_parameters
from dfkd_deploy.synthesis import Synthesizer, make_synthesizer
from dfkd_deploy.synthesis.priors import synthesis_weights
from dfkd_deploy.synthesis.pool import ImagePool
from dfkd_deploy.teachers import load_teacher
from dfkd_deploy.teachers.batchnorm import missing_statistics_warning
from dfkd_deploy.teachers.spec import Teacher
from dfkd_deploy.rundir import check_batch_memory, check_paths, prepare_run_dir, release_run_dir

PROBE_SEED_OFFSET = 1_000_003   # probes come from a random stream no training batch used


@dataclass
class CompressResult:
    run_dir: Path
    report: dict


def build_student(recipe: Recipe, teacher: Teacher, *, device: torch.device | str = "cpu",
                  announce: bool = False, synthesize: bool = True, measure_latency: bool = False,
                  show_progress: bool = True) -> nn.Module:
    """The recipe's student (``student.init``/``arch``/``target``; see :mod:`dfkd_deploy.students`).

    The module carries its ``student.arch`` label, its architecture description (derived students,
    for student.pt) and its size figures and warnings (report.json ``student.*``) as attributes.
    Choosing among candidates does not move the caller's random streams: a scratch student's
    initial weights are those of its architecture built right here. ``synthesize=False`` (a
    dry run) skips what needs synthesized images (BN recalibration, Taylor importance). Latency is
    measured (ORT CPU, for the size warnings) with ``measure_latency``, or where a choice needs it
    (no arch given, a latency target)."""
    from dfkd_deploy.students import build as derive
    from dfkd_deploy.students.student_file import ARCH_ATTR, DERIVED_ATTR

    c, h, w = teacher.spec.input_shape
    k = teacher.spec.num_classes
    with torch.random.fork_rng(devices=[]):
        images = (lambda n: derivation_images(teacher, recipe, device, n)) if synthesize else None
        needs = measure_latency or not recipe.student.arch or (recipe.student.target or "").startswith("latency")
        built = derive(recipe, teacher, images=images, measure_latency=needs)
    model = built.module
    if built.init == "scratch":
        model = build_model(built.arch, num_classes=k, in_channels=c, input_size=(h, w))
    head = recipe.student.head
    model = apply_head_config(model, k, {"type": head.type, "hidden": head.hidden})
    setattr(model, ARCH_ATTR, built.arch)
    setattr(model, DERIVED_ATTR, built.description)
    model.dfkd_info = {"arch": built.arch, **built.info}
    if announce and distributed.current().is_main:   # the size warnings print even with --quiet
        if show_progress:
            console.print(f"student: {built.arch} ({built.init}), {count_parameters(model):,} params")
            rec = built.info.get("depth", {}).get("recognised")
            if rec:
                console.print(f"the teacher's graph computes a {rec['arch']} (BN {rec['bn']}; max difference "
                              f"{rec['max_abs_diff']:.1e}): its blocks {built.info['depth']['blocks']} were copied")
        for line in built.info.get("warnings", []):
            console.print(f"[yellow]warning[/yellow]: {line}")
    return model


def derivation_images(teacher: Teacher, recipe: Recipe, device, count: int) -> torch.Tensor:
    """``count`` synthesized model-space images from a fresh synthesizer (a derived student's BN
    recalibration and Taylor importance), in rounds of synthesis.batch_size; never part of the run's pool."""
    norm = teacher.normalizer().to(device)
    out, made = [], 0
    # its hooks leave the teacher afterwards (the run's own synthesizer adds its own)
    with make_synthesizer(teacher, recipe, torch.device(device)) as synth:
        while made < count:
            images, _ = synth.synthesize(None)
            out.append(norm(images.to(device)).detach().cpu())
            made += images.shape[0]
    return torch.cat(out)[:count]


def plan(teacher: Teacher, recipe: Recipe) -> dict:
    """What a run would do, without doing it (``--dry-run``)."""
    t0 = time.time()
    recipe, why = resolve_init(recipe, teacher)
    student = build_student(recipe, teacher, synthesize=False, measure_latency=True)
    info = dict(student.dfkd_info)
    if why:
        info["init_choice"] = why
    info["ratio"] = info.pop("size")["ratio"]   # student / teacher: params, MACs, latency
    budget = None
    if recipe.budget:
        from dfkd_deploy.budget.session import plan_for

        chosen = plan_for(teacher, recipe, student, "cpu", spent_s=time.time() - t0)
        recipe, budget = chosen.apply(recipe), chosen.to_dict()
    s, d = recipe.synthesis, recipe.distillation
    weights = synthesis_weights(teacher, s)   # the priors that are on for this teacher, and adv
    return {
        "teacher": teacher.spec.to_dict(),
        "student": {"params": count_parameters(student), **info},
        "synthesis": {"method": s.method, "g_steps": s.g_steps, "batch_size": s.batch_size,
                      "rounds": d.epochs * s.rounds_per_epoch,
                      "images": d.epochs * s.rounds_per_epoch * s.batch_size,
                      "precision": s.precision, "channels_last": s.channels_last,
                      "priors": weights["priors"], "adversarial_weight": weights["adversarial_weight"]},
        "distillation": {"epochs": d.epochs, "warmup": d.warmup, "kd_steps_per_epoch": d.kd_steps,
                         "batch_size": d.batch_size, "temperature": d.temperature},
        "validation": {"probe_images": recipe.validation.probe_images},
        "budget": budget,
        "seed": recipe.seed,
    }


def make_probes(synth: Synthesizer, count: int, batch_size: int, seed: int) -> torch.Tensor:
    """Held-out synthetic probes: fresh latents from the final generator (DeepInversion: freshly
    optimised batches), never in the pool.

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


def distill(teacher: Teacher, recipe: Recipe, run_dir: Path, device: torch.device, *,
            resume: bool = False, show_progress: bool = True, synthesize_more: bool = True,
            pool: ImagePool | None = None, tensorboard_dir: str | Path | None = None,
            student: nn.Module | None = None, budget=None):
    """Synthesis interleaved with KD; returns (student, synthesizer, distiller result).

    ``budget`` (a :class:`~dfkd_deploy.budget.session.BudgetSession`): the run re-tunes its
    per-epoch counts to the costs it measures (:class:`~dfkd_deploy.budget.session.Retuner`).

    ``pool`` defaults to ``run_dir/pool``; with ``synthesize_more=False`` the student is trained
    on the given pool only. Under torch.distributed (torchrun) every rank calls this; each
    synthesizes its share of every round (see :mod:`dfkd_deploy.core.distributed`)."""
    ctx = distributed.current()
    seed_everything(recipe.seed)   # the same initial student and generator on every rank
    if student is None:   # (a budgeted run built it already, to calibrate with it)
        student = build_student(recipe, teacher, device=device, announce=not resume, measure_latency=True,
                                show_progress=show_progress)
    student = student.to(device)
    synth = make_synthesizer(teacher, distributed.rank_recipe(recipe, ctx), device)
    if pool is None:
        pool = ImagePool(run_dir / "pool", rank=ctx.rank, world_size=ctx.world_size)
    distiller = Distiller(teacher.module, teacher.normalizer(), student, synth if synthesize_more else None,
                          pool, recipe, run_dir, device, show_progress and ctx.is_main, ctx=ctx)
    if resume:
        distiller.resume()
    log = MetricsLog(run_dir, start_epoch=distiller.epoch, tensorboard_dir=tensorboard_dir) if ctx.is_main else None
    if log is not None:
        distiller.epoch_hooks.append(log)
    if budget is not None:
        from dfkd_deploy.budget.session import Retuner

        distiller.epoch_hooks.append(Retuner(budget, distiller, run_dir, ctx))
    try:
        return student, synth, distiller.run()
    finally:
        if log is not None:
            log.close()


def compress(teacher_path: str | Path, recipe: Recipe, out: str | Path, *, device: str = "auto",
             eval_data: str | Path | None = None, trust_pickle: bool = False, resume: bool = False,
             show_progress: bool = True, bundle_dir: str | Path | None = None,
             tensorboard_dir: str | Path | None = None) -> CompressResult:
    # Under torchrun this joins the process group; every rank distills, rank 0 alone finishes
    # (probes, export, validation, reports) while the others wait, and all return its report.
    check_paths(out, eval_data=eval_data, bundle_dir=bundle_dir)
    entered = time.time()   # a budget is the wall time of the whole call
    with distributed.session(resolve_device(device)) as (ctx, dev):
        teacher = load_teacher(teacher_path, recipe.teacher, trust_pickle=trust_pickle)
        recipe, why = resolve_init(recipe, teacher)   # before anything reads student.init (KD's lr scale)
        if why and show_progress and ctx.is_main and not resume:
            console.print(why)
        weak = missing_statistics_warning(teacher)
        if weak and ctx.is_main and not resume:   # before the hours it would take to find out
            console.print(f"[yellow]warning[/yellow]: {weak}")
        check_batch_memory(recipe, teacher.spec.input_shape, dev)
        teacher.module.to(dev)
        run_dir = prepare_run_dir(out, resume, ctx)
        try:   # the run directory stays locked until the run ends, however it ends
            started = time.time()
            budget, student = None, None
            if recipe.budget:
                budget, recipe, student = start_budget(teacher, recipe, run_dir, dev, entered=entered,
                                                       resume=resume, eval_data=eval_data, ctx=ctx)
            student, synth, result = distill(teacher, recipe, run_dir, dev, resume=resume,
                                             show_progress=show_progress, tensorboard_dir=tensorboard_dir,
                                             student=student, budget=budget)
            if budget:   # the per-epoch counts the run ended with (a re-tune changes them)
                recipe = budget.plan.apply(recipe)
            if why:      # report.json student.init_choice: what auto became, and why
                student.dfkd_info = {**getattr(student, "dfkd_info", {}), "init_choice": why}

            def finish() -> dict:
                with task("held-out probes", 1, show_progress) as bar:
                    probes = make_probes(synth, recipe.validation.probe_images, recipe.synthesis.batch_size,
                                         recipe.seed)
                    bar.advance()
                report = finish_run(teacher, student, recipe, run_dir, probes=probes, distill_result=result,
                                    eval_data=eval_data, device=dev, wall_seconds=time.time() - started,
                                    show_progress=show_progress,
                                    bundle_dir=Path(bundle_dir) if bundle_dir else None,
                                    sections=budget.section if budget else None)
                if budget:
                    used = budget.used_s()
                    console.print(f"budget: {used:.0f} s used of {budget.requested_s:.0f} s "
                                  f"({used / budget.requested_s:.0%})")
                console.print(f"[green]done[/green]: {run_dir}")
                return report

            report = ctx.on_main(finish)
        finally:
            release_run_dir(run_dir)   # held by rank 0 only: a no-op elsewhere, no collective
    return CompressResult(run_dir, report)


def start_budget(teacher: Teacher, recipe: Recipe, run_dir: Path, device, *, entered: float, resume: bool,
                 eval_data=None, ctx: distributed.DistContext | None = None):
    """A budgeted run: (session, the recipe with the planned counts, the student built for it).

    The student is built first (as distill would: right after seeding), then a short calibration
    measures one synthesis round and one KD step and the planner fits the run to the budget."""
    from dfkd_deploy.budget.session import start

    ctx = ctx or distributed.current()
    if ctx.enabled:   # the wall time of the whole job: from the first rank's start, as rank 0 saw it
        entered = ctx.broadcast(min(entered, distributed.process_started()))
    seed_everything(recipe.seed)
    student = build_student(recipe, teacher, device=device, announce=not resume and ctx.is_main,
                            measure_latency=True)
    eval_images = 0
    if eval_data is not None:
        eval_images = len(load_eval_data(eval_data, input_shape=teacher.spec.input_shape,
                                         num_classes=teacher.spec.num_classes))
    session = start(teacher, recipe, student, run_dir, device, started=entered, resume=resume,
                    eval_images=eval_images, ctx=ctx)
    planned = session.plan.apply(recipe)
    p = session.plan
    if ctx.is_main:
        for note in session.notes:
            warn(note)
        console.print(f"budget {session.requested_s:.0f} s: {p.epochs} epochs ({p.warmup} warm-up) x "
                      f"{p.rounds_per_epoch} round(s), {p.pool_images:,} pool images, {p.kd_steps} KD steps per "
                      f"epoch; estimated {p.estimated_s:.0f} s")
    return session, planned, student


# --- the end of every run: export, validate, hand off, write the reports ---------------------

ARTIFACTS = ("student.onnx", "student.pt", "recipe.resolved.yaml", "report.json", "report.md", REPORT_HTML,
             GALLERY_FILE)


def probe_agreement(teacher: Teacher, student: nn.Module, probes: torch.Tensor, device) -> dict:
    norm = teacher.normalizer()
    t = predict(teacher.module, probes, normalizer=norm, device=device)
    s = predict(student, probes, normalizer=norm, device=device)
    return {"top1": top1_agreement(t, s), "images": int(probes.shape[0])}


def finish_run(teacher: Teacher, student: nn.Module, recipe: Recipe, run_dir: Path, *, probes: torch.Tensor,
               distill_result: DistillResult | None, eval_data=None, device="cpu", wall_seconds: float | None = None,
               show_progress: bool = True, bundle_dir: Path | None = None, sections=None) -> dict:
    """``sections``: a callable returning further report.json sections, called just before the
    report is assembled (a budget's time used)."""
    spec = teacher.spec
    student.eval()
    with task("export + validate", 3, show_progress) as bar:
        # One eval set for every figure (torch, ONNX, int8, comparison): see eval_subset.
        data, available = eval_subset(eval_data, spec)
        model_space_probes = teacher.normalizer()(probes)
        export = export_student_onnx(student, run_dir / "student.onnx", input_shape=spec.input_shape,
                                     layout=spec.layout, opset=recipe.export.opset, probes=model_space_probes,
                                     tolerance=recipe.export.parity_tolerance)
        write_contract(export.path, student_contract(spec, data.class_names if data is not None else None))
        bar.advance()
        agreement = probe_agreement(teacher, student, probes, device)
        bar.advance()
        evaluation, predictions = None, None
        if data is not None:
            evaluation = evaluate(teacher.module, student, teacher.normalizer(), data, device=device,
                                  batch_size=recipe.validation.batch_size, onnx_path=export.path,
                                  onnx_layout=spec.layout, keep_predictions=True)
            predictions = evaluation.pop("predictions")
        bar.advance()
    # Deployment hand-off: int8, bundle (default run_dir/bundle), TensorRT or its script,
    # back-end comparison, latency/size. Appended to report.json/report.md below.
    with task("int8 + bundle + latency", 1, show_progress) as bar:
        deployment = run_deployment(
            teacher, student, run_dir, probes=probes, eval_data=data,
            figures=RunFigures.from_evaluation(evaluation, agreement["top1"]),
            options=DeployOptions(seed=recipe.seed, bundle_dir=bundle_dir,
                                  calibration_images=recipe.deploy.calibration_images,
                                  profile_batches=recipe.deploy.batch_profile,
                                  edge_runtimes=tuple(recipe.deploy.edge_runtimes),
                                  compare_eval_images=compare_images(recipe, data)),
            echo=console.print)
        bar.advance()

    r = distill_result
    report = build_report(
        spec,
        student={"arch": recipe.student.arch, "params": count_parameters(student),
                 "teacher_params": count_parameters(teacher.module), **getattr(student, "dfkd_info", {})},
        evaluation=evaluation, probe_agreement=agreement, export=export,
        synthesis={"method": recipe.synthesis.method, "g_steps": recipe.synthesis.g_steps,
                   "batch_size": recipe.synthesis.batch_size, "images": r.images if r else None, "seconds": round(r.synthesis_seconds, 2) if r else None,
                   "images_per_second": round(r.images / r.synthesis_seconds, 2) if r and r.synthesis_seconds else None},
        distillation={"epochs": r.epochs if r else None,
                      "seconds": round(r.distillation_seconds, 2) if r else None,
                      "kd_steps": r.kd_steps if r else None,
                      "final": r.history[-1] if r and r.history else None},
        extra={"seed": recipe.seed, "device": str(device),
               "wall_seconds": round(wall_seconds, 2) if wall_seconds is not None else None,
               **deployment.sections(), **(sections() if sections else {})},
    )
    if data is not None:
        report["eval_data"]["available"] = available
    else:   # no real data: estimate the real agreement from probes the student never trained on
        report["agreement"].update(estimated_agreement_section(teacher, student, recipe, probes, device, show_progress))
    label_measurements(report)
    report["confusion"] = confusion(teacher, student, data, device=device, batch_size=recipe.validation.batch_size,
                                    measured_on=get_path(report, "student.accuracy_measured_on", None),
                                    predictions=predictions)
    # report.md and the CLI's summary print the student's warnings
    for line in (missing_statistics_warning(teacher), one_class_warning(report["confusion"])):
        if line:
            report["student"]["warnings"] = [*(report["student"].get("warnings") or []), line]
    write_gallery(run_dir, teacher, probes, seed=recipe.seed, device=device)
    if sections:   # the budget's time used, taken again now that the last measurement is done
        report.update(sections())
    save_student(run_dir / "student.pt", student, arch=recipe.student.arch, num_classes=spec.num_classes,
                 input_shape=spec.input_shape, teacher_spec=spec.to_dict())
    write_text(run_dir / "recipe.resolved.yaml", recipe.resolved_yaml())
    write_report_json(run_dir, report)
    write_text(run_dir / REPORT_MD, render_report_md(report) + deploy_report_md(deployment.sections())
               + measured_on_markdown(report))
    write_report_html(run_dir, report)
    write_manifest(run_dir, seed=recipe.seed, artifacts=list(ARTIFACTS) + deployment.artifacts)
    return report


def compare_images(recipe: Recipe, data) -> int:
    """Real images every back end of the comparison runs on: all of the eval set, except in a
    budgeted run, where a random :data:`BUDGET_COMPARE_IMAGES` of them (the student's own accuracy,
    torch and ONNX, is still measured on all): seven back ends on 10,000 images cost minutes."""
    from dfkd_deploy.budget.calibrate import BUDGET_COMPARE_IMAGES

    if data is None:
        return 0
    return min(len(data), BUDGET_COMPARE_IMAGES) if recipe.budget else len(data)


def estimated_agreement_section(teacher: Teacher, student: nn.Module, recipe: Recipe, probes: torch.Tensor, device,
                                show_progress: bool = True) -> dict:
    """report.json ``agreement.estimated_real`` / ``agreement.interval`` (+ per-source agreement)."""
    from dfkd_deploy.validate.estimate import estimate_agreement
    from dfkd_deploy.validate.probes import ProbeBudget

    norm = teacher.normalizer()
    held_out = (probes, predict(teacher.module, probes, normalizer=norm, device=device))
    est = estimate_agreement(teacher, lambda px: predict(student, px, normalizer=norm, device=device),
                             recipe.synthesis, device, seed=recipe.seed, held_out=held_out,
                             budget=ProbeBudget.for_probes(recipe.validation.probe_images), show_progress=show_progress)
    interval = ([est["estimated_agreement_low"], est["estimated_agreement_high"]]
                if est.get("estimated_agreement") is not None else None)
    out = {"estimated_real": est.get("estimated_agreement"), "interval": interval,
           "interval_coverage": est.get("estimate_coverage"), "estimate_based_on": est.get("estimate_based_on"),
           "probe_sources": est["probe_sources"]}
    if interval is not None and recipe.teacher.accuracy is not None:   # the teacher's own figure, from its owner
        from dfkd_deploy.validate.estimate import estimate_accuracy

        acc = estimate_accuracy(recipe.teacher.accuracy, out["estimated_real"], *interval, teacher.spec.num_classes)
        out["estimated_accuracy"] = {"value": acc["estimated_accuracy"],
                                     "bounds": [acc["estimated_accuracy_low"], acc["estimated_accuracy_high"]],
                                     "based_on": acc["estimated_accuracy_based_on"]}
    return out


# Float copies of the eval images (the back-end comparison holds them all at once) stay under this.
EVAL_FLOAT_BYTES = 1 << 30
MIN_EVAL_IMAGES = 1024


def eval_subset(eval_data, spec) -> tuple:
    """(the eval set every figure of the run is measured on, how many images the file holds):
    all of them when their float copy fits :data:`EVAL_FLOAT_BYTES`, else a seeded random subset."""
    if eval_data is None:
        return None, None
    data = load_eval_data(eval_data, input_shape=spec.input_shape, num_classes=spec.num_classes,
                          channel_order=spec.channel_order)
    c, h, w = spec.input_shape
    cap = max(MIN_EVAL_IMAGES, EVAL_FLOAT_BYTES // (4 * c * h * w))
    return data.subset(cap), len(data)


def student_contract(spec, class_names) -> StudentContract:
    from dfkd_deploy import __version__

    source = Path(spec.source)
    return StudentContract.from_spec(spec.to_dict(), class_names=class_names, version=__version__,
                                     teacher_sha256=sha256_file(source) if source.is_file() else None)
