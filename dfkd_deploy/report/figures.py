"""The pictures in report.html, as PNG bytes: training curves, teacher-vs-student confusion and
latency (matplotlib, headless Agg backend), and image strips of synthesized images (Pillow).

Everything here draws from plain values (metrics rows, report.json's lists, uint8 arrays).
"""
from __future__ import annotations

import io
from typing import Mapping, Optional, Sequence

import numpy as np

# (metrics.jsonl keys, panel title, y label) per panel; a panel without data is left out.
CURVE_PANELS = (
    (("synth_confidence",), "Synthesis: teacher confidence", "mean max softmax"),
    (("synth_bn",), "Synthesis: BN statistics / prior loss", "loss"),
    (("synth_loss",), "Synthesis: total loss", "loss"),
    (("kd_loss",), "KD loss (KL at temperature T)", "loss"),
    (("train_agreement", "new_batch_agreement"), "Teacher-student agreement", "top-1 agreement"),
    (("lr",), "Student learning rate", "lr"),
)
CURVE_LABELS = {"train_agreement": "KD batches (trained on)",
                "new_batch_agreement": "epoch's new synthetic batch (before KD on it)"}
MIN_TILE_PX = 48   # small images are scaled up (nearest) to at least this
STRIP_MAX = 16     # images in one strip


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def curves_png(rows: Sequence[Mapping]) -> Optional[bytes]:
    """One panel per figure logged in ``rows`` (metrics.jsonl), against the epoch; None without any."""
    panels = [(keys, title, ylabel) for keys, title, ylabel in CURVE_PANELS
              if any(r.get(k) is not None for r in rows for k in keys)]
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (keys, title, ylabel) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o", markersize=3, label=CURVE_LABELS.get(key, key))
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def confusion_png(matrix: Sequence[Sequence[int]], class_names: Optional[Sequence[str]] = None) -> bytes:
    """Teacher class (rows) x student class (columns), row-normalised colour, counts written in."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=np.int64)
    k = m.shape[0]
    names = list(class_names) if class_names and len(class_names) == k else [str(i) for i in range(k)]
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = max(4.0, 0.45 * k + 1.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), names, rotation=90 if k > 10 else 0, fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("student's class")
    ax.set_ylabel("teacher's class")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the teacher's class")
    fig.tight_layout()
    return _png(fig)


def latency_png(latency: Mapping) -> Optional[bytes]:
    """Median ONNX Runtime latency per batch size: teacher, student fp32, student int8."""
    models = [(key, label) for key, label in (("teacher", "teacher"), ("student", "student fp32"),
                                              ("student_int8", "student int8")) if latency.get(key)]
    if not models:
        return None
    batches = list(latency.get("batches") or [])
    if not batches:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    width = 0.8 / len(models)
    for i, (key, label) in enumerate(models):
        values = [latency[key].get(f"batch_{b}_ms") for b in batches]
        xs = [j + i * width for j, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("median ms (ONNX Runtime, CPU)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def image_strip_png(images_nchw: np.ndarray, channel_order: str = "RGB") -> bytes:
    """uint8 N x C x H x W images side by side (1 px gaps), shown in RGB, scaled up when small."""
    from PIL import Image

    imgs = np.asarray(images_nchw, dtype=np.uint8)
    n, c, h, w = imgs.shape
    if c == 3 and channel_order == "BGR":
        imgs = imgs[:, ::-1]
    scale = max(1, -(-MIN_TILE_PX // max(h, w)))
    gap = 2
    strip = np.full((h * scale, n * (w * scale + gap) - gap, 3), 255, np.uint8)
    for i, img in enumerate(imgs):
        hwc = np.repeat(img.transpose(1, 2, 0), 3, axis=2) if c == 1 else img[:3].transpose(1, 2, 0)
        tile = hwc.repeat(scale, 0).repeat(scale, 1)
        x = i * (w * scale + gap)
        strip[:, x:x + w * scale] = tile
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return buf.getvalue()
