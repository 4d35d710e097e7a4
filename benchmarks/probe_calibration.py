"""Calibrate the data-free agreement estimate: (teacher, student) pairs of deliberately varied
quality, their real agreement, their probe statistics, and the estimate leave-one-teacher-out.

    PYTHONPATH=. python benchmarks/probe_calibration.py measure --teachers digits,fashion,resnet8,resnet56
    PYTHONPATH=. python benchmarks/probe_calibration.py measure --teachers resnet56,resnet8 --no-kd \
        --user-data ../shared/data/imagenet-sample-224       # the `user` source, added to measured pairs
    PYTHONPATH=. python benchmarks/probe_calibration.py fit      # LOTO estimates, estimator.json, PNG, .md

``measure`` is resumable: a pair already in the JSON is skipped (CPU time is scarce), and every
pair is written as soon as it is measured. Real agreement is measured on a seeded random subset
of the real test set (``--real-images``, default 1000; all 540 held-out digits). ``raw_probe`` is
today's figure, agreement on held-out probes of the generator that trained the student; only
distilled students have one (null elsewhere).

Students: finished ``compress`` runs of the ResNet-56 (``--derived-runs``: scratch, depth and
prune students of benchmarks/time_to_accuracy.py), random-init (near chance), KD snapshots of one short data-free run at several epochs,
students trained on real data (digits: the teacher's train split; Fashion-MNIST: half of the test
set, the other half evaluates), the shared real-data-trained ResNet-20 and ResNet-56 / ResNet-8
as each other's students, and ResNet-20 with Gaussian weight noise (quality between the two).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"   # --shared DIR elsewhere
RESULTS = REPO / "benchmarks" / "results"
OUT_JSON = RESULTS / "probe_calibration.json"
OUT_PNG = RESULTS / "probe_calibration.png"

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

StudentFn = Callable[[torch.Tensor], torch.Tensor]   # pixels -> logits


# --- teachers ------------------------------------------------------------------------------------

def _recipe(base: dict, **synthesis):
    from dfkd_deploy.recipe import Recipe

    data = copy.deepcopy(base)
    data["synthesis"].update(synthesis)
    return Recipe.model_validate(data)


def _small_recipe(crop_padding: int, epochs: int):
    from dfkd_deploy.demo import demo_recipe

    base = demo_recipe().model_dump(mode="json")
    base["synthesis"].update(batch_size=64, g_steps=3, augment={"crop_padding": crop_padding, "flip": False})
    base["distillation"].update(epochs=epochs, warmup=2, kd_steps=20, batch_size=64)
    return _recipe(base)


def _cifar_recipe(epochs: int):
    import yaml

    base = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    base["distillation"].update(epochs=epochs, warmup=1, kd_steps=10, batch_size=64)
    base["synthesis"].update(batch_size=32)
    return _recipe(base)


def load_pair_teacher(name: str):
    """(teacher, real eval pixels, real eval labels, recipe) for one calibration teacher."""
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy.teachers import load_teacher
    from dfkd_deploy.validate.data import load_eval_data, to_pixels

    if name == "digits":
        from dfkd_deploy.demo import ensure_teacher

        path, test = ensure_teacher()
        teacher, recipe = load_teacher(path), _small_recipe(1, 12)
        data = load_eval_data(test, input_shape=(1, 8, 8))
    elif name == "fashion":
        teacher = load_teacher(SHARED / "teachers/fashion-mnist-mlp.onnx", TeacherOptions(mean=[0.5], std=[0.5]))
        recipe = _small_recipe(2, 12)
        data = load_eval_data(SHARED / "data/fashion-mnist-test.npz", input_shape=(1, 28, 28))
        data = _fashion_halves(data)[1]
    elif name == "resnet8":
        teacher = load_teacher(SHARED / "teachers/cifar10-resnet8-mlperftiny.onnx",
                               TeacherOptions(mean=CIFAR_MEAN, std=CIFAR_STD))
        recipe = _cifar_recipe(4)
        data = load_eval_data(SHARED / "data/cifar10-test-jpeg.npz", input_shape=(3, 32, 32))
    elif name == "resnet56":
        teacher = load_teacher(SHARED / "teachers/cifar10-resnet56.th",
                               TeacherOptions(arch="cifar_resnet56", mean=IMAGENET_MEAN, std=IMAGENET_STD))
        recipe = _cifar_recipe(4)
        data = load_eval_data(SHARED / "data/cifar10-test-jpeg.npz", input_shape=(3, 32, 32))
    else:
        raise SystemExit(f"unknown teacher {name}")
    data = data.subset(ARGS.real_images, seed=0)
    return teacher, to_pixels(data.images), torch.from_numpy(data.labels), recipe


def _fashion_halves(data):
    """(train half, eval half) of the Fashion-MNIST test set, split at random with a fixed seed."""
    from dfkd_deploy.validate.data import EvalData

    idx = np.random.default_rng(123).permutation(len(data))
    a, b = np.sort(idx[: len(idx) // 2]), np.sort(idx[len(idx) // 2:])
    return (EvalData(data.images[a], data.labels[a], data.source), EvalData(data.images[b], data.labels[b], data.source))


# --- students ------------------------------------------------------------------------------------

def _module_fn(module, normalizer) -> StudentFn:
    from dfkd_deploy.validate.metrics import predict

    module = module.eval()
    return lambda pixels: predict(module, pixels, normalizer=normalizer)


def _random_student(teacher, recipe, seed: int) -> StudentFn:
    from dfkd_deploy.run import build_student

    torch.manual_seed(seed)
    return _module_fn(build_student(recipe, teacher), teacher.normalizer())


def _real_trained(teacher, recipe, pixels, labels, epochs: int, seed: int = 0) -> StudentFn:
    from dfkd_deploy.run import build_student

    torch.manual_seed(seed)
    model = build_student(recipe, teacher)
    norm = teacher.normalizer()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(pixels), generator=g).split(64):
            loss = F.cross_entropy(model(norm(pixels[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return _module_fn(model, norm)


def _distilled_snapshots(teacher, recipe, snapshot_epochs) -> tuple[dict[str, StudentFn], torch.Tensor, list]:
    """One short data-free run (the project's Distiller); student copies at ``snapshot_epochs``.
    Returns the students, the run's held-out probes (today's figure) and the pool's images."""
    from dfkd_deploy.core import distributed
    from dfkd_deploy.distill.trainer import Distiller, seed_everything
    from dfkd_deploy.run import build_student, make_probes, make_synthesizer
    from dfkd_deploy.synthesis.pool import ImagePool

    run_dir = Path(tempfile.mkdtemp(prefix="probe-cal-"))
    seed_everything(recipe.seed)
    student = build_student(recipe, teacher)
    synth = make_synthesizer(teacher, recipe, torch.device("cpu"))
    pool = ImagePool(run_dir / "pool")
    distiller = Distiller(teacher.module, teacher.normalizer(), student, synth, pool, recipe, run_dir,
                          torch.device("cpu"), True, ctx=distributed.current())
    snaps: dict[str, StudentFn] = {}

    def hook(row, _batch):
        if distiller.epoch in snapshot_epochs:
            snaps[f"kd_epoch{distiller.epoch}"] = _module_fn(copy.deepcopy(student), teacher.normalizer())

    distiller.epoch_hooks.append(hook)
    distiller.run()
    probes = make_probes(synth, recipe.validation.probe_images, recipe.synthesis.batch_size, recipe.seed)
    return snaps, probes, pool


def _run_student(run_dir: Path, teacher) -> StudentFn:
    """The student of a finished ``compress`` run (e.g. a time_to_accuracy run: scratch, depth or
    prune from the shared ResNet-56), loaded from its student.pt without pickle."""
    from dfkd_deploy import load_student

    student, meta = load_student(run_dir / "student.pt")
    spec = meta.get("teacher_spec") or {}
    for key in ("mean", "std"):   # the student takes the teacher's model space: it must be this one
        if spec.get(key) is not None and not np.allclose(spec[key], getattr(teacher.spec, key)):
            raise SystemExit(f"{run_dir}: its teacher's {key} {spec[key]} is not {getattr(teacher.spec, key)}")
    return _module_fn(student.eval(), teacher.normalizer())


def _noisy(module, sigma: float, seed: int):
    noisy = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() > 1:
                p.add_(sigma * p.std() * torch.randn(p.shape, generator=g))
    return noisy


def students_for(name: str, teacher, recipe, real_pixels, real_labels):
    """Yields (student name, fn, raw-probe pixels or None) lazily, so finished pairs cost nothing."""
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy.teachers import load_teacher
    from dfkd_deploy.validate.data import load_eval_data, to_pixels

    yield "random_seed0", lambda: (_random_student(teacher, recipe, 0), None)
    yield "random_seed1", lambda: (_random_student(teacher, recipe, 1), None)
    if name == "digits":
        from dfkd_deploy.demo import digits_split

        x_tr, _, y_tr, _ = digits_split()
        px, lb = torch.from_numpy(x_tr).float().div(255).unsqueeze(1), torch.from_numpy(y_tr)
        yield "real_trained_1ep", lambda: (_real_trained(teacher, recipe, px, lb, 1), None)
        yield "real_trained_10ep", lambda: (_real_trained(teacher, recipe, px, lb, 10), None)
    if name == "fashion":
        data = load_eval_data(SHARED / "data/fashion-mnist-test.npz", input_shape=(1, 28, 28))
        train = _fashion_halves(data)[0]
        px, lb = to_pixels(train.images), torch.from_numpy(train.labels)
        yield "real_trained_1ep", lambda: (_real_trained(teacher, recipe, px, lb, 1), None)
        yield "real_trained_5ep", lambda: (_real_trained(teacher, recipe, px, lb, 5), None)
    if name in ("resnet8", "resnet56"):
        r20 = load_teacher(SHARED / "teachers/cifar10-resnet20.th",
                           TeacherOptions(arch="cifar_resnet20", mean=IMAGENET_MEAN, std=IMAGENET_STD))
        yield "resnet20_pretrained", lambda: (_module_fn(r20.module, r20.normalizer()), None)
        for sigma in (0.3, 0.6, 1.0):
            yield f"resnet20_noise{sigma}", (lambda s=sigma: (_module_fn(_noisy(r20.module, s, 0), r20.normalizer()), None))
        other = (load_teacher(SHARED / "teachers/cifar10-resnet56.th",
                              TeacherOptions(arch="cifar_resnet56", mean=IMAGENET_MEAN, std=IMAGENET_STD))
                 if name == "resnet8" else
                 load_teacher(SHARED / "teachers/cifar10-resnet8-mlperftiny.onnx",
                              TeacherOptions(mean=CIFAR_MEAN, std=CIFAR_STD)))
        yield ("resnet56" if name == "resnet8" else "resnet8"), lambda: (_module_fn(other.module, other.normalizer()), None)
    for run in (ARGS.derived_runs or []) if name == "resnet56" else []:
        yield f"run:{Path(run).name}", (lambda r=run: (_run_student(Path(r), teacher), None))
    if not ARGS.no_kd:
        epochs = recipe.distillation.epochs
        marks = sorted({max(recipe.distillation.warmup + 1, epochs // 3), max(2, 2 * epochs // 3), epochs})
        cache: dict = {}

        def snap(key):
            if not cache:
                cache["snaps"], cache["probes"], _ = _distilled_snapshots(teacher, recipe, set(marks))
            return cache["snaps"][key], cache["probes"]

        for e in marks:
            yield f"kd_epoch{e}", (lambda k=f"kd_epoch{e}": snap(k))


# --- measure -----------------------------------------------------------------------------------

def _load_results() -> dict:
    if OUT_JSON.is_file():
        return json.loads(OUT_JSON.read_text())
    return {"pairs": []}


def _save(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = OUT_JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(OUT_JSON)


def measure(teachers: list[str]) -> None:
    from dfkd_deploy.validate.estimate import probe_statistics
    from dfkd_deploy.validate.metrics import predict, top1_agreement
    from dfkd_deploy.validate.probes import ProbeBudget, independent_sources

    torch.set_num_threads(1)
    results = _load_results()
    done = {(p["teacher"], p["student"]): p for p in results["pairs"]}
    for name in teachers:
        t0 = time.time()
        teacher, real_px, real_lb, recipe = load_pair_teacher(name)
        norm = teacher.normalizer()
        t_real = predict(teacher.module, real_px, normalizer=norm)
        sources = None
        user = _user_source(teacher) if ARGS.user_data else None
        for student_name, make in students_for(name, teacher, recipe, real_px, real_lb):
            if (name, student_name) in done:
                rec = done[(name, student_name)]
                if user is not None and "agree.user" not in rec["stats"]:
                    fn, _ = make()
                    rec["stats"]["agree.user"] = top1_agreement(predict(teacher.module, user.pixels, normalizer=norm),
                                                                fn(user.pixels))
                    rec["stats"]["images.user"] = len(user)
                    _save(results)
                    print(f"[{name}] {student_name}: real {rec['real']:.3f} user {rec['stats']['agree.user']:.3f}",
                          flush=True)
                continue
            if sources is None:   # the probe sets depend on the teacher only: once per teacher
                sources = independent_sources(teacher, recipe.synthesis, "cpu", seed=recipe.seed,
                                              budget=ProbeBudget(images=ARGS.probe_images))
                t_logits = {s.name: predict(teacher.module, s.pixels, normalizer=norm) for s in sources}
                print(f"[{name}] probes: " + ", ".join(f"{s.name} {len(s)}" for s in sources)
                      + f" ({time.time() - t0:.0f} s)", flush=True)
            fn, raw_pixels = make()
            stats = probe_statistics(t_logits, {s.name: fn(s.pixels) for s in sources})
            if user is not None:
                stats["agree.user"] = top1_agreement(predict(teacher.module, user.pixels, normalizer=norm), fn(user.pixels))
                stats["images.user"] = len(user)
            raw = None
            if raw_pixels is not None:
                raw = top1_agreement(predict(teacher.module, raw_pixels, normalizer=norm), fn(raw_pixels))
            rec = {"teacher": name, "student": student_name, "real": top1_agreement(t_real, fn(real_px)),
                   "real_images": int(len(real_px)), "teacher_accuracy": float((t_real.argmax(1) == real_lb).float().mean()),
                   "raw_probe": raw, "stats": stats}
            results["pairs"].append(rec)
            _save(results)
            print(f"[{name}] {student_name}: real {rec['real']:.3f} raw {raw} pooled {stats.get('agree.pooled'):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)


def _user_source(teacher):
    """Unlabelled natural images that are not the teacher's data (``--user-data``, e.g. the ImageNet
    sample folder for the CIFAR teachers), as a user would pass them with ``--probe-data``."""
    from dfkd_deploy.validate.probes import user_images

    return user_images(ARGS.user_data, teacher.spec, limit=1000, seed=0)


# --- fit: leave-one-teacher-out estimates, the shipped estimator, the figure --------------------

def fit() -> None:
    from dfkd_deploy.validate.estimate import DEFAULT_FEATURES, DEFAULT_FILE, USER_FEATURES, USER_FILE, Estimator

    results = _load_results()
    pairs = results["pairs"]
    for p in pairs:   # records measured before the feature existed
        if "kl" in p["stats"]:
            p["stats"].setdefault("exp_neg_kl", float(np.exp(-p["stats"]["kl"])))
    teachers = sorted({p["teacher"] for p in pairs})
    results["feature_sets"] = compare_feature_sets(pairs)
    for row in results["feature_sets"]:
        print(f"{','.join(row['features']):60s} within 0.10: {row['within_0.10']:.2f}  MAE {row['mean_abs_error']:.3f}")
    features = list(ARGS.features.split(",")) if ARGS.features else list(DEFAULT_FEATURES)
    for t in teachers:
        train = [p for p in pairs if p["teacher"] != t]
        est = Estimator.fit([p["stats"] for p in train], [p["real"] for p in train],
                            [p["teacher"] for p in train], features=features, coverage=ARGS.coverage)
        for p in pairs:
            if p["teacher"] == t:
                p["estimate"] = est.predict(p["stats"])
                p["low"], p["high"] = est.interval(p["stats"])
    err = np.array([abs(p["estimate"] - p["real"]) for p in pairs])
    covered = np.array([p["low"] <= p["real"] <= p["high"] for p in pairs])
    raw = [abs(p["raw_probe"] - p["real"]) for p in pairs if p["raw_probe"] is not None]
    pooled_err = np.array([abs(p["stats"]["agree.pooled"] - p["real"]) for p in pairs])
    results["summary"] = {
        "pairs": len(pairs), "teachers": teachers, "features": features, "coverage_nominal": ARGS.coverage,
        "within_0.10": float((err <= 0.10).mean()), "mean_abs_error": float(err.mean()),
        "max_abs_error": float(err.max()), "interval_coverage": float(covered.mean()),
        "mean_interval_width": float(np.mean([p["high"] - p["low"] for p in pairs])),
        "raw_probe_mean_abs_error": float(np.mean(raw)) if raw else None, "raw_probe_pairs": len(raw),
        "pooled_independent_mean_abs_error": float(pooled_err.mean()),
        "targets": {"within_0.10": 0.9, "interval_coverage": 0.9},
        "setting": f"LOTO over {len(teachers)} teachers; real agreement on up to {ARGS.real_images} random "
                   f"real test images; probes: ProbeBudget(images={ARGS.probe_images}); CPU, fp32",
    }
    results["per_source_mean_abs_error"] = {
        k: float(np.nanmean([abs(p["stats"].get(k, np.nan) - p["real"]) for p in pairs]))
        for k in sorted({k for p in pairs for k in p["stats"] if k.startswith("agree.")})}
    results["user_source"] = _user_source_summary(pairs)
    _save(results)
    final = Estimator.fit([p["stats"] for p in pairs], [p["real"] for p in pairs], [p["teacher"] for p in pairs],
                          features=features, coverage=ARGS.coverage)
    final.calibration.update({"within_0.10_loto": results["summary"]["within_0.10"],
                              "coverage_loto": results["summary"]["interval_coverage"],
                              "probe_budget_images": ARGS.probe_images, "source": "benchmarks/probe_calibration.py"})
    final.save(DEFAULT_FILE)
    user_pairs = [p for p in pairs if "agree.user" in p["stats"]]
    if len({p["teacher"] for p in user_pairs}) >= 2:   # the estimator used when --probe-data is given
        user = Estimator.fit([p["stats"] for p in user_pairs], [p["real"] for p in user_pairs],
                             [p["teacher"] for p in user_pairs], features=list(USER_FEATURES), coverage=ARGS.coverage)
        res = np.asarray(user.calibration["loto_abs_residuals"])
        user.calibration.update({"within_0.10_loto": float((res <= 0.10).mean()),
                                 "user_images": "the ImageNet sample folder at the teacher's input size (--user-data)",
                                 "source": "benchmarks/probe_calibration.py"})
        user.save(USER_FILE)
    _plot(pairs)
    _table(results)
    print(json.dumps(results["summary"], indent=1))
    print(json.dumps(results["per_source_mean_abs_error"], indent=1))


CANDIDATE_FEATURE_SETS = (
    ("agree.pooled",),
    ("agree.fresh",),
    ("agree.deepinversion",),
    ("agree.boundary",),
    ("agree.confident",),
    ("exp_neg_kl",),
    ("agree.fresh", "agree.deepinversion", "agree.boundary"),
    ("agree.pooled", "exp_neg_kl"),
    ("agree.conf_low", "agree.conf_mid", "agree.conf_high"),
    ("agree.confident", "agree.boundary", "exp_neg_kl"),
    ("sqrt:agree.pooled",),
    ("sqrt:agree.confident",),
    ("sqrt:agree.confident", "sqrt:agree.pooled"),
    ("sqrt:agree.fresh", "sqrt:agree.deepinversion", "sqrt:agree.boundary"),
)


def compare_feature_sets(pairs) -> list[dict]:
    """Leave-one-teacher-out point error of each candidate feature set (the raw figures of each
    source too, with no model at all, in ``per_source_mean_abs_error``)."""
    from dfkd_deploy.validate.estimate import loo_residuals

    rows = []
    for feats in CANDIDATE_FEATURE_SETS:
        r = loo_residuals([p["stats"] for p in pairs], [p["real"] for p in pairs], [p["teacher"] for p in pairs],
                          features=feats)
        rows.append({"features": list(feats), "within_0.10": float((r <= 0.10).mean()),
                     "mean_abs_error": float(r.mean())})
    return rows


def _user_source_summary(pairs) -> dict | None:
    """Where pairs were also measured on unlabelled natural images (``--user-data``): how well a
    linear map on that agreement alone predicts real agreement, leave-one-teacher-out."""
    from dfkd_deploy.validate.estimate import loo_residuals

    ps = [p for p in pairs if "agree.user" in p["stats"]]
    if len({p["teacher"] for p in ps}) < 2:
        return None
    r = loo_residuals([p["stats"] for p in ps], [p["real"] for p in ps], [p["teacher"] for p in ps],
                      features=["agree.user"])
    raw = np.array([abs(p["stats"]["agree.user"] - p["real"]) for p in ps])
    est = np.array([abs(p["estimate"] - p["real"]) for p in ps])
    return {"pairs": len(ps), "teachers": sorted({p["teacher"] for p in ps}),
            "raw_user_mean_abs_error": float(raw.mean()), "loto_linear_user_mean_abs_error": float(r.mean()),
            "loto_linear_user_within_0.10": float((r <= 0.10).mean()), "loto_linear_user_max_abs_error": float(r.max()),
            "shipped_features_on_same_pairs_mean_abs_error": float(est.mean()),
            "shipped_features_on_same_pairs_within_0.10": float((est <= 0.10).mean())}


def _table(results) -> None:
    """benchmarks/results/probe_calibration.md: every pair, and the summary against the targets."""
    sm = results["summary"]
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"   # noqa: E731
    lines = ["# Data-free agreement estimate vs real agreement (leave-one-teacher-out)", "",
             f"Setting: {sm['setting']}. Features: {', '.join(sm['features'])}.", "",
             "| teacher | student | real % | raw held-out probes % | pooled independent probes % | estimate % | interval % |",
             "|---|---|---|---|---|---|---|"]
    for p in results["pairs"]:
        lines.append(f"| {p['teacher']} | {p['student']} | {pct(p['real'])} | {pct(p['raw_probe'])} | "
                     f"{pct(p['stats'].get('agree.pooled'))} | {pct(p['estimate'])} | {pct(p['low'])}–{pct(p['high'])} |")
    lines += ["", f"|estimate - real| <= 0.10 for {100 * sm['within_0.10']:.0f}% of {sm['pairs']} pairs (target 90%); "
              f"mean abs error {sm['mean_abs_error']:.3f}, max {sm['max_abs_error']:.3f}; interval covers the real value "
              f"for {100 * sm['interval_coverage']:.0f}% (target 90%), mean width {sm['mean_interval_width']:.2f}.", "",
              "Feature sets, leave-one-teacher-out point error:", "", "| features | within 0.10 | mean abs error |", "|---|---|---|"]
    lines += [f"| {', '.join(r['features'])} | {100 * r['within_0.10']:.0f}% | {r['mean_abs_error']:.3f} |"
              for r in results["feature_sets"]]
    us = results.get("user_source")
    if us:
        lines += ["", f"Unlabelled natural images as probes (`--probe-data`; here `--user-data`, the ImageNet sample "
                  f"images resized to the teacher's input) on {us['pairs']} pairs of {', '.join(us['teachers'])} "
                  f"(no distilled students among them): raw agreement on them is off by {us['raw_user_mean_abs_error']:.3f} "
                  f"on average; a linear map on it alone, leave-one-teacher-out, by {us['loto_linear_user_mean_abs_error']:.3f} "
                  f"(within 0.10 for {100 * us['loto_linear_user_within_0.10']:.0f}%, max {us['loto_linear_user_max_abs_error']:.3f}), "
                  f"against {us['shipped_features_on_same_pairs_mean_abs_error']:.3f} for the synthetic-probe estimate on the same pairs."]
    (RESULTS / "probe_calibration.md").write_text("\n".join(lines) + "\n")


def _plot(pairs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for t in sorted({p["teacher"] for p in pairs}):
        ps = [p for p in pairs if p["teacher"] == t]
        real = np.array([p["real"] for p in ps])
        est = np.array([p["estimate"] for p in ps])
        yerr = np.array([[p["estimate"] - p["low"] for p in ps], [p["high"] - p["estimate"] for p in ps]])
        ax.errorbar(real, est, yerr=yerr, fmt="o", capsize=3, label=t, alpha=0.8)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="y = x")
    ax.set_xlabel("real agreement (random real test subset)")
    ax.set_ylabel("estimate (leave-one-teacher-out) and interval")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("data-free agreement estimate vs real")
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=110)


def main(argv=None) -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("measure", "fit"))
    ap.add_argument("--teachers", default="digits,fashion,resnet8,resnet56")
    ap.add_argument("--real-images", type=int, default=1000)
    ap.add_argument("--probe-images", type=int, default=256)
    ap.add_argument("--no-kd", action="store_true", help="skip the distilled snapshots (the slow part)")
    ap.add_argument("--user-data", type=Path, help="unlabelled images (folder or .npz) measured as the `user` source "
                    "(also added to pairs already measured)")
    ap.add_argument("--derived-runs", nargs="*", help="finished compress run directories whose students (of the shared "
                    "ResNet-56) join the resnet56 pairs, e.g. runs/time_to_accuracy/*resnet56-state_dict-*")
    ap.add_argument("--features", default=None, help="comma-separated feature names (default: the estimator's)")
    ap.add_argument("--coverage", type=float, default=0.9)
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared real material (default ../shared)")
    ARGS = ap.parse_args(argv)
    globals()["SHARED"] = ARGS.shared
    if ARGS.command == "measure":
        measure(ARGS.teachers.split(","))
    else:
        fit()


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
