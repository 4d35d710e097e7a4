"""Loss-curve figure for the init comparison (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_path

COLOURS = {"mars": "tab:red", "he": "tab:blue", "xavier": "tab:green"}


def plot_curves(path: str | Path, panels: list[tuple[str, dict]], *, ylabel: str = "MSE") -> Path:
    """``panels``: [(title, {init: {"train_mse": [...], "test_mse": [...]}})]; test solid,
    train dashed, log scale (the random inits start an order of magnitude higher)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        for name, run in runs.items():
            c = COLOURS.get(name)
            ax.plot(run["test_mse"], color=c, label=f"{name} test")
            ax.plot(run["train_mse"], color=c, ls="--", alpha=0.6, label=f"{name} train")
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
