"""Benchmark: MARS (spline) vs He vs Xavier initialisation of one FC ReLU net on two UCI
regression sets. Per dataset: one fixed train/test split (80/20, split seed 0), standardised
inputs and target, one MARS fit (deterministic for the split, so shared by all seeds), then for
each seed the three inits trained with the same schedule. Reports epochs for each init to reach
the He net's final test MSE (same seed), final test RMSE (target units), MARS fit seconds.

The shared winequality-red.csv has 11 rows with mangled numbers (volatile_acidity 1185,
alcohol 1e14); rows more than 50 IQRs from a column median are dropped and counted.
KD part (``--part kd``): the shared CIFAR-10 ResNet-56 teacher makes a fixed synthetic pool
(FastDFKD, Fast-5, no student yet); a CIFAR ResNet-8 student with an MLP head (hidden 64) is
distilled on it by the library's Distiller, once with the head MARS-initialised (the same
``init_student_head`` the recipe option ``student.head.init: mars`` calls, fitted on the pool
before the first KD step) and once with the same head randomly initialised; same seeds, same KD
batches. Agreement with the teacher and top-1 are measured on real CIFAR-10 test images (drawn at random: the file is sorted by
class) after every KD epoch (epoch 0: after the fit, before any KD step).

Run: python benchmarks/spline_init.py  (tabular + KD, 4.5 minutes on 2 idle cores);
``--part tabular`` or ``--part kd`` runs one half and keeps the other's stored results.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # runs from a clone without an install too
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"
DATASETS = [("abalone", SHARED / "data/uci/abalone.csv", "rings"),
            ("winequality-red", SHARED / "data/uci/winequality-red.csv", "quality")]
SEEDS = (0, 1, 2)
HIDDEN = 64
KD = {"pool_rounds": 16, "batch": 64, "hidden": 64, "max_terms": 32, "pca_dims": 16, "epochs": 8,
      "kd_steps": 8, "kd_batch": 128, "lr": 0.01, "eval_images": 1000}
# (name, student arch, body weights, seeds): "pretrained" takes the body of the shared CIFAR
# ResNet-20 (trained on real CIFAR-10) and puts a new MLP head on it, so the head's
# initialisation is what differs; "scratch" is a fresh ResNet-8, the data-free case proper.
KD_SETTINGS = [("pretrained body", "cifar_resnet20", "cifar10-resnet20.th", (0, 1)),
               ("scratch", "cifar_resnet8", None, (0,))]


def main() -> int:
    import argparse
    import json

    from dfkd_deploy.core.io import write_json, write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "tabular", "kd"), default="all")
    args = ap.parse_args()
    path = RESULTS / "spline_init.json"
    report = json.loads(path.read_text()) if path.is_file() and args.part != "all" else {}
    if args.part in ("all", "tabular"):
        report.update(tabular())
    if args.part in ("all", "kd"):
        report["kd"] = kd_part()
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    write_text(RESULTS / "spline_init.md", _table(report))
    print(_table(report))
    return 0


def tabular() -> dict:
    from dfkd_deploy.spline.tabular.data import drop_outlier_rows, load_csv, split_standardise
    from dfkd_deploy.spline.mars import fit_mars
    from dfkd_deploy.spline.tabular.plots import plot_curves
    from dfkd_deploy.spline.tabular.train import INITS, Schedule, compare_inits, epochs_to_reach

    schedule = Schedule(epochs=100, lr=1e-3, batch_size=64, optimizer="adam")
    t_all = time.perf_counter()
    report = {"schedule": schedule.__dict__, "hidden": HIDDEN, "seeds": list(SEEDS), "datasets": {}}
    panels = []
    for name, path, target in DATASETS:
        table, dropped = drop_outlier_rows(load_csv(path, target), 50.0)
        split = split_standardise(table, test_fraction=0.2, split_seed=0)
        model = fit_mars(split.X_train, split.y_train, max_degree=1, max_terms=HIDDEN // 2,
                         feature_names=split.feature_names)
        per_seed = []
        for seed in SEEDS:
            comp = compare_inits(split, hidden=HIDDEN, schedule=schedule, seed=seed, model=model)
            he_final = comp.runs["he"]["test_mse"][-1]
            per_seed.append({init: {
                "final_test_rmse": comp.runs[init]["test_mse"][-1] ** 0.5,
                "init_test_rmse": comp.runs[init]["test_mse"][0] ** 0.5,
                "epochs_to_he_final": epochs_to_reach(comp.runs[init]["test_mse"], he_final),
                "test_mse_curve": comp.runs[init]["test_mse"],
                "train_mse_curve": comp.runs[init]["train_mse"]} for init in INITS})
            print(f"{name} seed {seed}: " + ", ".join(
                f"{i} rmse {per_seed[-1][i]['final_test_rmse']:.3f} reach {per_seed[-1][i]['epochs_to_he_final']}"
                for i in INITS), flush=True)
        summary = {}
        for init in INITS:
            reach = [s[init]["epochs_to_he_final"] for s in per_seed]
            rmse = [s[init]["final_test_rmse"] for s in per_seed]
            summary[init] = {"epochs_to_he_final": reach,
                             "epochs_to_he_final_median": statistics.median(
                                 [r if r is not None else float("inf") for r in reach]),
                             "final_test_rmse_mean": statistics.fmean(rmse),
                             "final_test_rmse_std": statistics.pstdev(rmse),
                             "init_test_rmse": per_seed[0][init]["init_test_rmse"]}
        he_med = summary["he"]["epochs_to_he_final_median"]
        report["datasets"][name] = {
            "target": target, "rows_train": len(split.y_train), "rows_test": len(split.y_test),
            "rows_dropped_as_outliers": dropped, "mars_fit_seconds": model.fit_seconds,
            "mars_terms": len(model.terms), "summary": summary,
            "mars_within_third_of_he_epochs": summary["mars"]["epochs_to_he_final_median"] <= he_med / 3,
            "per_seed": per_seed}
        panels.append((f"{name} ({target}), seed 0", {i: {"train_mse": per_seed[0][i]["train_mse_curve"],
                                                          "test_mse": per_seed[0][i]["test_mse_curve"]}
                                                      for i in INITS}))
    report["seconds"] = time.perf_counter() - t_all
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_curves(RESULTS / "spline_init.png", panels, ylabel="MSE (target units)")
    return report


def kd_part() -> dict:
    import tempfile

    import numpy as np
    import torch

    from dfkd_deploy import build_student, make_synthesizer
    from dfkd_deploy.distill.trainer import Distiller, seed_everything
    from dfkd_deploy import load_recipe
    from dfkd_deploy.spline.head import init_student_head
    from dfkd_deploy.spline.tabular.plots import plot_curves
    from dfkd_deploy.synthesis.pool import ImagePool
    from dfkd_deploy import load_teacher
    from dfkd_deploy.validate.data import load_eval_data, to_pixels
    from dfkd_deploy.validate.metrics import predict, top1_accuracy, top1_agreement

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_all = time.perf_counter()
    k = KD
    recipe = load_recipe(REPO / "recipes" / "cifar-resnet20.yaml", {
        "student.head": {"type": "mlp", "hidden": k["hidden"], "init": "random"},
        "synthesis.batch_size": k["batch"], "distillation.epochs": k["epochs"], "distillation.warmup": 0,
        "distillation.kd_steps": k["kd_steps"], "distillation.batch_size": k["kd_batch"],
        "distillation.lr": k["lr"]})
    teacher = load_teacher(SHARED / "teachers" / "cifar10-resnet56.th", recipe.teacher.model_copy(update={"arch": "cifar_resnet56"}))
    norm = teacher.normalizer()
    data = load_eval_data(SHARED / "data" / "cifar10-test-jpeg.npz", input_shape=teacher.spec.input_shape)
    data = data.subset(k["eval_images"])   # the npz is sorted by class: never take its first images
    pixels, labels = to_pixels(data.images), data.labels
    t_logits = predict(teacher.module, pixels, normalizer=norm)
    tmp = Path(tempfile.mkdtemp(prefix="spline-kd-"))
    pool = ImagePool(tmp / "pool")
    seed_everything(0)
    synth = make_synthesizer(teacher, recipe, "cpu")
    t0 = time.perf_counter()
    for _ in range(k["pool_rounds"]):
        pool.add(synth.synthesize(None)[0])
    synth_s = time.perf_counter() - t0
    print(f"kd: pool of {len(pool)} synthetic images in {synth_s:.0f} s", flush=True)

    def load_body(student, weights):
        if weights is None:
            return
        state = torch.load(SHARED / "teachers" / weights, map_location="cpu", weights_only=True)["state_dict"]
        body = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("linear.")}
        missing, unexpected = student.load_state_dict(body, strict=False)
        assert not unexpected and all(m.startswith("linear.") for m in missing), (missing, unexpected)

    def reach(curve, level):
        return next((i for i, v in enumerate(curve) if v >= level - 1e-9), None)

    results = {}
    for setting, arch, weights, seeds in KD_SETTINGS:
        runs: dict = {"mars": [], "random": []}
        for seed in seeds:
            for arm in ("mars", "random"):
                r = recipe.model_copy(update={"seed": seed, "student": recipe.student.model_copy(update={"arch": arch})})
                seed_everything(seed)
                student = build_student(r, teacher)
                load_body(student, weights)
                row = {"seed": seed}
                if arm == "mars":
                    fit = init_student_head(student, teacher.module, norm(pool.get(np.arange(len(pool)))),
                                            num_classes=teacher.spec.num_classes, hidden=k["hidden"],
                                            temperature=r.distillation.temperature, max_terms=k["max_terms"],
                                            pca_dims=k["pca_dims"], seed=seed)
                    row.update(fit_seconds=fit.fit_seconds, terms=fit.terms,
                               synthetic_agreement_before=fit.agreement_before,
                               synthetic_agreement_after=fit.agreement_after)
                dist = Distiller(teacher.module, norm, student, None, pool, r, tmp / f"{arch}-{arm}-{seed}", "cpu",
                                 show_progress=False)
                agree, acc = [], []
                for epoch in range(k["epochs"] + 1):
                    if epoch:
                        dist.run(until_epoch=epoch)
                    s_logits = predict(student, pixels, normalizer=norm)
                    agree.append(top1_agreement(t_logits, s_logits))
                    acc.append(top1_accuracy(s_logits, labels))
                row.update(agreement=agree, accuracy=acc)
                runs[arm].append(row)
                print(f"kd {setting} {arm} seed {seed}: agreement by epoch {[round(a, 3) for a in agree]}", flush=True)
        summary = {}
        for arm in runs:
            curves = np.array([x["agreement"] for x in runs[arm]])
            summary[arm] = {"agreement_mean_by_epoch": curves.mean(0).round(4).tolist(),
                            "final_agreement_mean": float(curves[:, -1].mean()),
                            "final_accuracy_mean": float(np.mean([x["accuracy"][-1] for x in runs[arm]])),
                            "fit_seconds_mean": float(np.mean([x["fit_seconds"] for x in runs[arm]])) if arm == "mars" else None}
        rand_final = summary["random"]["final_agreement_mean"]
        for arm in runs:
            summary[arm]["epochs_to_random_final"] = reach(summary[arm]["agreement_mean_by_epoch"], rand_final)
        results[setting] = {"student": arch, "body": weights or "random init", "seeds": list(seeds),
                            "runs": runs, "summary": summary}
    plot_curves(RESULTS / "spline_init_kd.png",
                [(f"{setting}: {res['student']} (mean of {len(res['seeds'])} seeds)",
                  {arm: {"agreement": sm["agreement_mean_by_epoch"]} for arm, sm in res["summary"].items()})
                 for setting, res in results.items()],
                ylabel="top-1 agreement with the teacher (real test images)", log=False)
    return {"settings": k, "teacher_accuracy": top1_accuracy(t_logits, labels), "pool_images": len(pool),
            "pool_synthesis_seconds": synth_s, "results": results, "seconds": time.perf_counter() - t_all}


def _table(report: dict) -> str:
    lines = _tabular_table(report) if "datasets" in report else []
    if "kd" in report:
        lines += _kd_table(report["kd"])
    return "\n".join(lines) + "\n"


def _kd_table(kd: dict) -> list[str]:
    s = kd["settings"]
    lines = ["", f"KD on the CIFAR-10 ResNet-56 teacher (top-1 {kd['teacher_accuracy']:.4f} on "
             f"{s['eval_images']} real test images drawn at random, seed 0, where agreement is measured): MLP head, hidden {s['hidden']}; "
             f"pool of {kd['pool_images']} Fast-5 images; {s['epochs']} epochs x {s['kd_steps']} steps of "
             f"{s['kd_batch']}, SGD lr {s['lr']}.", "",
             "| student | head init | agreement by epoch (mean over seeds; epoch 0 = before KD) | final agreement "
             "| final top-1 | epochs to the random head's final agreement | MARS fit s |",
             "|---|---|---|---|---|---|---|"]
    for setting, res in kd["results"].items():
        for arm, sm in res["summary"].items():
            fit_s = f"{sm['fit_seconds_mean']:.1f}" if sm.get("fit_seconds_mean") is not None else ""
            lines.append(f"| {setting} ({res['student']}, seeds {res['seeds']}) | {arm} | "
                         f"{sm['agreement_mean_by_epoch']} | {sm['final_agreement_mean']:.4f} | "
                         f"{sm['final_accuracy_mean']:.4f} | {sm['epochs_to_random_final']} | {fit_s} |")
    lines.append(f"- KD part: {kd['seconds']:.0f} s (pool synthesis {kd['pool_synthesis_seconds']:.0f} s)")
    return lines


def _tabular_table(report: dict) -> list[str]:
    lines = ["| dataset | init | epochs to He final test MSE (per seed) | median | final test RMSE (mean ± sd) "
             "| RMSE at init | MARS fit s |", "|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        for init, s in d["summary"].items():
            lines.append(f"| {name} | {init} | {s['epochs_to_he_final']} | {s['epochs_to_he_final_median']} | "
                         f"{s['final_test_rmse_mean']:.4f} ± {s['final_test_rmse_std']:.4f} | "
                         f"{s['init_test_rmse']:.4f} | {d['mars_fit_seconds']:.2f} |")
    lines.append("")
    for name, d in report["datasets"].items():
        lines.append(f"- {name}: MARS median epochs <= 1/3 of He's: {d['mars_within_third_of_he_epochs']} "
                     f"({d['mars_terms']} MARS terms, {d['rows_dropped_as_outliers']} corrupt rows dropped)")
    lines.append(f"- total {report['seconds']:.0f} s; schedule {report['schedule']}, hidden {report['hidden']}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
