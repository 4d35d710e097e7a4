"""Loss-curve figure for the init comparison (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from dfkd_deploy.core.io import atomic_path

COLOURS = {"mars": "tab:red", "he": "tab:blue", "xavier": "tab:green", "random": "tab:blue"}


def plot_curves(path: str | Path, panels: list[tuple[str, dict]], *, ylabel: str = "MSE",
                log: bool = True) -> Path:
    """``panels``: [(title, {init: {series: [...]}})], e.g. series "train_mse" and "test_mse";
    series named train_* are dashed. Log scale by default (the random inits start an order of
    magnitude higher)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        for name, run in runs.items():
            c = COLOURS.get(name)
            for series, curve in run.items():
                train = series.startswith("train")
                ax.plot(curve, color=c, ls="--" if train else "-", alpha=0.6 if train else 1.0,
                        label=f"{name} {series.replace('_mse', '')}")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
