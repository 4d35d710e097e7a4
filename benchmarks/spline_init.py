"""Benchmark: MARS (spline) vs He vs Xavier initialisation of one FC ReLU net on two UCI
regression sets. Per dataset: one fixed train/test split (80/20, split seed 0), standardised
inputs and target, one MARS fit (deterministic for the split, so shared by all seeds), then for
each seed the three inits trained with the same schedule. Reports epochs for each init to reach
the He net's final test MSE (same seed), final test RMSE (target units), MARS fit seconds.

The shared winequality-red.csv has 11 rows with mangled numbers (volatile_acidity 1185,
alcohol 1e14); rows more than 50 IQRs from a column median are dropped and counted.
Run: python benchmarks/spline_init.py  (about 2-4 minutes on 2 busy cores). The optional KD
part (MARS head on the CIFAR teacher) is not run here.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"
DATASETS = [("abalone", SHARED / "data/uci/abalone.csv", "rings"),
            ("winequality-red", SHARED / "data/uci/winequality-red.csv", "quality")]
SEEDS = (0, 1, 2)
HIDDEN = 64


def main() -> int:
    from dfkd_deploy.io import write_json, write_text
    from dfkd_deploy.spline.data import drop_outlier_rows, load_csv, split_standardise
    from dfkd_deploy.spline.mars import fit_mars
    from dfkd_deploy.spline.plots import plot_curves
    from dfkd_deploy.spline.train import INITS, Schedule, compare_inits, epochs_to_reach

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
    write_json(RESULTS / "spline_init.json", report)
    plot_curves(RESULTS / "spline_init.png", panels, ylabel="MSE (target units)")
    write_text(RESULTS / "spline_init.md", _table(report))
    print(_table(report))
    return 0


def _table(report: dict) -> str:
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
