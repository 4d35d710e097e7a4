"""Single stages of the pipeline, for users who run them one at a time (`synthesize`,
`distill`, `export`, `validate` on the command line)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dfkd_deploy.run import distill, make_probes, make_synthesizer
from dfkd_deploy.rundir import prepare_run_dir, release_run_dir
from dfkd_deploy.core.device import resolve_device
from dfkd_deploy.distill.trainer import seed_everything
from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.students.student_file import load_student, save_student
from dfkd_deploy.core.progress import task, warn
from dfkd_deploy.recipe import Recipe, synthesis_batch
from dfkd_deploy.runtime.onnxruntime import OrtRunner
from dfkd_deploy.students.build import resolve_init
from dfkd_deploy.synthesis.pool import ImagePool
from dfkd_deploy.teachers import load_teacher


PROBE_WARMUP_ROUNDS = 5


def synthesize(teacher_path, recipe: Recipe, out, *, device="auto", rounds: int | None = None,
               trust_pickle: bool = False, show_progress: bool = True) -> dict:
    """Teacher-only synthesis (no student, so no adversarial term) into a pool at ``out``."""
    dev = resolve_device(device)
    teacher = load_teacher(teacher_path, recipe.teacher, trust_pickle=trust_pickle)
    teacher.module.to(dev)
    seed_everything(recipe.seed)
    synth = make_synthesizer(teacher, recipe, dev)
    pool = ImagePool(out)
    n = rounds if rounds is not None else max(1, recipe.distillation.warmup) * recipe.synthesis.rounds_per_epoch
    t0 = time.perf_counter()
    with task("synthesize (batches)", n, show_progress) as bar:
        for _ in range(n):
            images, st = synth.synthesize(None)
            pool.add(images)
            bar.advance(1, f"confidence={st.confidence:.3f}")
    return {"pool": str(out), "images": len(pool), "seconds": time.perf_counter() - t0}


def distill_on_pool(teacher_path, recipe: Recipe, pool_dir, out, *, device="auto", trust_pickle=False,
                    show_progress=True) -> Path:
    """KD on an existing pool: every epoch trains (no warm-up, no synthesis)."""
    if not (Path(pool_dir) / "index.json").is_file():
        raise UsageError(f"{pool_dir} is not an image pool (no index.json; run `dfkd-deploy synthesize` first)")
    src = ImagePool(pool_dir)
    if len(src) == 0:
        raise UsageError(f"{pool_dir} holds no synthesized images (run `dfkd-deploy synthesize` first)")
    dev = resolve_device(device)
    teacher = load_teacher(teacher_path, recipe.teacher, trust_pickle=trust_pickle)
    teacher.module.to(dev)
    run_dir = prepare_run_dir(out, resume=False)
    try:   # locked like a compress run, until this stage ends
        recipe = resolve_init(recipe, teacher)[0].model_copy(deep=True)
        recipe.distillation.warmup = 0   # the pool is ready: every epoch trains
        student, _, _ = distill(teacher, recipe, run_dir, dev, show_progress=show_progress,
                                synthesize_more=False, pool=src)
        return save_student(run_dir / "student.pt", student, arch=recipe.student.arch,
                            num_classes=teacher.spec.num_classes, input_shape=teacher.spec.input_shape,
                            teacher_spec=teacher.spec.to_dict())
    finally:
        release_run_dir(run_dir)


def export(student_path, out, *, opset: int = 17):
    from exporters.onnx_export import export_student_onnx

    student, meta = load_student(student_path)
    spec = meta["teacher_spec"]
    return export_student_onnx(student, out, input_shape=tuple(meta["input_shape"]),
                               layout=spec.get("layout", "NCHW"), opset=opset)


def validate(student_path, teacher_path, recipe: Recipe, *, eval_data=None, probes: int = 256,
             probe_data=None, estimator=None, trust_pickle: bool = False, device="auto",
             show_progress: bool = True) -> dict:
    """Teacher vs student (student.pt, or an exported .onnx) on synthetic probes and real data.

    Without ``eval_data`` the student's real agreement is estimated (with an interval) from
    probes it never trained on (:mod:`dfkd_deploy.validate.probes`, plus the unlabelled images of
    ``probe_data``) by ``estimator`` (default: the one shipped with the package)."""
    from dfkd_deploy.validate.data import load_eval_data, to_pixels
    from dfkd_deploy.validate.metrics import TOP_K, predict, top1_accuracy, top1_agreement, topk_accuracy

    dev = resolve_device(device)
    teacher = load_teacher(teacher_path, recipe.teacher, trust_pickle=trust_pickle)
    teacher.module.to(dev)
    norm = teacher.normalizer().to(dev)
    student_path = Path(student_path)
    check_contract(student_path, teacher.spec)
    if student_path.suffix == ".onnx":
        runner = OrtRunner(student_path, layout=teacher.spec.layout)

        def student_logits(pixels):
            with torch.no_grad():
                return torch.from_numpy(runner.predict(norm(pixels.to(dev)).cpu().numpy()))
    else:
        student, _ = load_student(student_path)
        student.to(dev)

        def student_logits(pixels):
            return predict(student, pixels, normalizer=norm, device=dev)

    seed_everything(recipe.seed)
    synth = make_synthesizer(teacher, recipe, dev)
    with task("validate: probe generator warm-up (batches)", PROBE_WARMUP_ROUNDS, show_progress) as bar:
        for _ in range(PROBE_WARMUP_ROUNDS):   # a fresh generator first learns what the teacher likes
            synth.synthesize(None)
            bar.advance()
    probe_pixels = make_probes(synth, probes, synthesis_batch(recipe.synthesis), recipe.seed)
    t = predict(teacher.module, probe_pixels, normalizer=norm, device=dev)
    out = {"probe_images": probes, "probe_agreement": top1_agreement(t, student_logits(probe_pixels))}
    if eval_data is None:
        from dfkd_deploy.validate.estimate import estimate_agreement
        from dfkd_deploy.validate.probes import ProbeBudget

        out.update(estimate_agreement(teacher, student_logits, recipe.synthesis, dev, seed=recipe.seed,
                                      held_out=(probe_pixels, t), probe_data=probe_data, estimator=estimator,
                                      budget=ProbeBudget.for_probes(probes), show_progress=show_progress))
        if recipe.teacher.accuracy is not None and out.get("estimated_agreement") is not None:
            from dfkd_deploy.validate.estimate import estimate_accuracy

            out.update(estimate_accuracy(recipe.teacher.accuracy, out["estimated_agreement"],
                                         out["estimated_agreement_low"], out["estimated_agreement_high"],
                                         teacher.spec.num_classes))
    if eval_data is not None:
        data = load_eval_data(eval_data, input_shape=teacher.spec.input_shape, num_classes=teacher.spec.num_classes,
                              channel_order=teacher.spec.channel_order)
        pixels = to_pixels(data.images)
        t_real = predict(teacher.module, pixels, normalizer=norm, device=dev)
        s_real = student_logits(pixels)
        labels = torch.from_numpy(data.labels)
        out.update({"eval_images": len(data), "teacher_accuracy": top1_accuracy(t_real, labels),
                    "teacher_top5": topk_accuracy(t_real, labels, TOP_K),
                    "student_accuracy": top1_accuracy(s_real, labels),
                    "student_top5": topk_accuracy(s_real, labels, TOP_K),
                    "eval_agreement": top1_agreement(t_real, s_real)})
    return out


_OVERRIDABLE = ("mean", "std", "value_range", "channel_order", "layout")


def check_contract(student_path: Path, spec) -> list[str]:
    """Warn in one line when the teacher's resolved conventions differ from those the student
    recorded (student.onnx metadata, or student.pt's teacher spec); returns the differences."""
    from exporters.metadata import StudentContract, contract_differences, read_contract

    if student_path.suffix == ".onnx":
        recorded = read_contract(student_path)
    else:
        recorded = StudentContract.from_spec(load_student(student_path)[1].get("teacher_spec") or {"layout": None})
    if recorded is None or recorded.layout is None:
        return []
    diffs = contract_differences(recorded, StudentContract.from_spec(spec.to_dict()))
    if diffs:
        fixes = " ".join(f"--set teacher.{k}={json.dumps(getattr(recorded, k)).replace(' ', '')}"
                         for k in _OVERRIDABLE if any(d.startswith(k + ":") for d in diffs))
        warn(f"{student_path.name} was made for {recorded.describe()}, but the teacher resolves differently "
             f"({'; '.join(diffs)}): the figures below compare them on different inputs"
             + (f"; pass {fixes}" if fixes else ""))
    return diffs


def export_teacher(teacher_path, recipe: Recipe, out, *, trust_pickle: bool = False, opset: int | None = None,
                   exporter: str = "legacy", fold: bool = False, external_data: bool | None = None) -> Path:
    """Any teacher `compress` takes -> ONNX with its normalisation in metadata, for runtimes (or
    users) that want the teacher as ONNX too. The legacy exporter keeps BatchNorm (unless
    ``fold``); the dynamo exporter folds it into the convolutions, as torch's default export does,
    which makes a BN-free teacher (see ``exporters.onnx_export.export_teacher_onnx``)."""
    from exporters.onnx_export import export_teacher_onnx

    from dfkd_deploy.teachers.spec import TeacherModule

    teacher = load_teacher(teacher_path, recipe.teacher, trust_pickle=trust_pickle)
    spec = teacher.spec
    # The raw output passes through (output="logits" means no log applied), so a probability
    # teacher stays one; the exporter puts the file's layout back on the input.
    raw = TeacherModule(teacher.module.model, layout=spec.layout, output="logits")
    return export_teacher_onnx(raw, out, input_shape=spec.input_shape, layout=spec.layout, opset=opset,
                               mean=spec.mean, std=spec.std, value_range=spec.value_range, exporter=exporter,
                               fold=fold, external_data=external_data)
