"""``spline`` command group: ``spline fit DATA.csv --target COLUMN`` compares MARS, He and Xavier
initialisation of one FC ReLU net. The lead mounts it with ``cli.add_command(spline)``; errors are
DfkdError subclasses, which the main CLI prints as one line with exit code 2."""
from __future__ import annotations

import time
from pathlib import Path

import click

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.core.io import write_json, write_text


def run_fit(data: str | Path, target: str, *, out: str | Path, epochs: int = 100, seed: int = 0,
            hidden: int = 64, lr: float = 1e-3, batch_size: int = 64, optimizer: str = "adam",
            max_degree: int = 1, max_terms: int | None = None, drop_outliers: float | None = None) -> dict:
    """Library entry behind ``spline fit``; returns the metrics written to ``metrics.json``."""
    from dfkd_deploy.spline.tabular.data import drop_outlier_rows, load_csv, split_standardise
    from dfkd_deploy.spline.mars import terms_csv, terms_markdown
    from dfkd_deploy.spline.tabular.plots import plot_curves
    from dfkd_deploy.spline.tabular.train import INITS, Schedule, compare_inits, epochs_to_reach

    if epochs < 1 or hidden < 1:
        raise UsageError("--epochs and --hidden must be >= 1")
    table = load_csv(data, target)
    dropped = 0
    if drop_outliers is not None:
        table, dropped = drop_outlier_rows(table, drop_outliers)
    split = split_standardise(table)
    schedule = Schedule(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer)
    t0 = time.perf_counter()
    comp = compare_inits(split, hidden=hidden, schedule=schedule, seed=seed, max_degree=max_degree,
                         max_terms=max_terms)
    out = Path(out)
    he_final = comp.runs["he"]["test_mse"][-1]
    metrics = {
        "data": str(data), "target": target, "rows_train": len(split.y_train), "rows_test": len(split.y_test),
        "rows_dropped_as_outliers": dropped, "features": split.feature_names,
        "seed": seed, "epochs": epochs, "hidden_widths": comp.widths,
        "schedule": {"optimizer": optimizer, "lr": lr, "batch_size": batch_size or "full"},
        "mars": {"fit_seconds": comp.mars.fit_seconds, "terms": len(comp.mars.terms),
                 "max_degree": max_degree, "min_substituted": comp.mars.substituted},
        "test": {name: {"mse": comp.runs[name]["test_mse"][-1], "rmse": comp.runs[name]["test_mse"][-1] ** 0.5,
                        "mse_at_init": comp.runs[name]["test_mse"][0],
                        "epochs_to_he_final": epochs_to_reach(comp.runs[name]["test_mse"], he_final)}
                 for name in INITS},
        "curves": {name: {"train_mse": comp.runs[name]["train_mse"], "test_mse": comp.runs[name]["test_mse"]}
                   for name in INITS},
        "seconds": time.perf_counter() - t0,
    }
    write_json(out / "metrics.json", metrics)
    write_text(out / "mars_terms.md", terms_markdown(comp.mars, [target]))
    write_text(out / "mars_terms.csv", terms_csv(comp.mars))
    plot_curves(out / "curves.png", [(f"{Path(data).name}: {target}", metrics["curves"])],
                ylabel=f"MSE ({target} units)")
    return metrics


@click.group("spline")
def spline() -> None:
    """MARS (spline) initialisation of fully connected ReLU networks."""


@spline.command("fit")
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--target", required=True, help="column to predict")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="run directory (default: runs/spline-<csv name>)")
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--hidden", type=int, default=64, show_default=True, help="hidden units (all inits)")
@click.option("--degree", "max_degree", type=click.IntRange(1, 2), default=1, show_default=True,
              help="MARS degree; 2 replaces hinge products by min(h1, h2)")
@click.option("--drop-outliers", type=float, default=None, metavar="K",
              help="drop rows with an input more than K IQRs from its median (e.g. 50)")
def fit_cmd(data, target, out, epochs, seed, hidden, max_degree, drop_outliers) -> None:
    """Train one FC net from MARS, He and Xavier init; write curves.png, metrics.json, mars_terms.*"""
    out = out or str(Path("runs") / f"spline-{Path(data).stem}")
    m = run_fit(data, target, out=out, epochs=epochs, seed=seed, hidden=hidden, max_degree=max_degree,
                drop_outliers=drop_outliers)
    for name, r in m["test"].items():
        click.echo(f"{name:7s} test RMSE {r['rmse']:.4f}  (at init {r['mse_at_init'] ** 0.5:.4f})")
    click.echo(f"MARS: {m['mars']['terms']} terms in {m['mars']['fit_seconds']:.2f} s; wrote {out}")
