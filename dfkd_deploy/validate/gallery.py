"""What report.html shows that only the teacher can tell: which class each synthesized image is
(the teacher's argmax), and where teacher and student disagree on real data (their confusion).

:func:`write_gallery` samples the pool and the held-out probes at random, labels them with the
teacher and writes them (uint8, the teacher's channel order) to ``report_gallery.npz`` in the run
directory; :func:`confusion` counts teacher class (rows) against student class (columns) on the
eval data. The HTML renderer reads both from the run directory and report.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dfkd_deploy.core.io import atomic_path
from dfkd_deploy.images import pixels_to_uint8
from dfkd_deploy.synthesis.pool import ImagePool
from dfkd_deploy.validate.data import EvalData, to_pixels
from dfkd_deploy.validate.metrics import predict

PER_CLASS = 8            # pool images shown per class
MAX_CLASSES = 20         # classes shown (the ones the teacher found most often)
PROBES_SHOWN = 32
SAMPLE_FACTOR = 6        # pool images labelled per image shown
CONFUSION_MAX_CLASSES = 50

GALLERY_FILE = "report_gallery.npz"   # pool and probe images by the teacher's class, for report.html


def _teacher_labels(teacher, pixels: torch.Tensor, device) -> np.ndarray:
    return predict(teacher.module, pixels, normalizer=teacher.normalizer(), device=device).argmax(1).numpy()


def sample_pool(pool: ImagePool, teacher, *, seed: int, device="cpu", per_class: int = PER_CLASS,
                max_classes: int = MAX_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` random pool images for each of up to ``max_classes`` classes, as
    (uint8 NCHW, teacher class); the classes the teacher assigned most often come first."""
    k = teacher.spec.num_classes or 1
    n = min(len(pool), SAMPLE_FACTOR * per_class * min(k, max_classes))
    if n == 0:
        return np.zeros((0, *teacher.spec.input_shape), np.uint8), np.zeros(0, np.int64)
    idx = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
    pixels = pool.get(idx)
    labels = _teacher_labels(teacher, pixels, device)
    counts = np.bincount(labels, minlength=k)
    classes = [c for c in np.argsort(-counts, kind="stable")[:max_classes] if counts[c]]
    keep = np.concatenate([np.nonzero(labels == c)[0][:per_class] for c in sorted(classes)]).astype(np.int64)
    return pixels_to_uint8(pixels[keep]), labels[keep]


def write_gallery(run_dir: str | Path, teacher, probes: torch.Tensor, *, seed: int, device="cpu") -> Path:
    """Sample, label and write ``report_gallery.npz``; returns its path."""
    run_dir = Path(run_dir)
    pool_images, pool_labels = sample_pool(ImagePool(run_dir / "pool"), teacher, seed=seed, device=device)
    rng = np.random.default_rng(seed + 1)
    shown = np.sort(rng.choice(len(probes), min(PROBES_SHOWN, len(probes)), replace=False)) if len(probes) else []
    probe_pixels = probes[torch.as_tensor(np.asarray(shown, np.int64))]
    probe_labels = (_teacher_labels(teacher, probe_pixels, device) if len(probe_pixels)
                    else np.zeros(0, np.int64))
    path = run_dir / GALLERY_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, pool_images=pool_images, pool_labels=pool_labels,
                                probe_images=pixels_to_uint8(probe_pixels), probe_labels=probe_labels,
                                probes_total=np.int64(len(probes)), pool_total=np.int64(len(ImagePool(run_dir / "pool"))))
    return path


@torch.no_grad()
def confusion(teacher, student, data: Optional[EvalData], *, device="cpu", batch_size: int = 256,
              measured_on: Optional[str] = None, predictions=None) -> Optional[dict]:
    """Teacher class (rows) x student class (columns) counts on ``data``; None without data, and a
    reason instead of the matrix for more than :data:`CONFUSION_MAX_CLASSES` classes.
    ``predictions``: (teacher, student) top-1 classes already computed on ``data`` (the run's
    evaluation), so the models need not run again."""
    if data is None or not len(data):
        return None
    k = teacher.spec.num_classes
    if k > CONFUSION_MAX_CLASSES:
        return {"matrix": None, "measured_on": measured_on,
                "reason": f"{k} classes: more than {CONFUSION_MAX_CLASSES}, not tabulated"}
    if predictions is not None and predictions[1] is not None and len(predictions[0]) == len(data):
        t, s = np.asarray(predictions[0]), np.asarray(predictions[1])
    else:
        norm = teacher.normalizer()
        t_all, s_all = [], []
        for i in range(0, len(data), batch_size):
            pixels = to_pixels(data.images[i:i + batch_size])
            t_all.append(predict(teacher.module, pixels, normalizer=norm, device=device).argmax(1))
            s_all.append(predict(student, pixels, normalizer=norm, device=device).argmax(1))
        t, s = torch.cat(t_all).numpy(), torch.cat(s_all).numpy()
    matrix = np.zeros((k, k), np.int64)
    np.add.at(matrix, (t, s), 1)
    return {"matrix": matrix.tolist(), "rows": "teacher class", "columns": "student class",
            "class_names": data.class_names, "measured_on": measured_on}


# A student that gives one class to at least this share of the eval images, where the teacher
# gives it to less than half of what the student does, has collapsed: say so (report and run output).
ONE_CLASS_SHARE = 0.9


def one_class_warning(conf: Optional[dict]) -> Optional[str]:
    """A warning line when the student of :func:`confusion`'s matrix puts at least
    :data:`ONE_CLASS_SHARE` of the eval images in one class the teacher gives far fewer of them;
    None otherwise (also without a matrix)."""
    matrix = (conf or {}).get("matrix")
    if not matrix:
        return None
    m = np.asarray(matrix, dtype=np.int64)
    total = int(m.sum())
    if total == 0 or m.shape[0] < 2:
        return None
    student_share = m.sum(0) / total
    j = int(student_share.argmax())
    teacher_share = float(m[j].sum()) / total
    if student_share[j] < ONE_CLASS_SHARE or teacher_share >= 0.5 * student_share[j]:
        return None
    names = conf.get("class_names")
    label = f"class {j}" + (f" ({names[j]})" if names and len(names) == m.shape[0] else "")
    return (f"the student predicts {label} for {100 * student_share[j]:.1f}% of the {total:,} eval images "
            f"(the teacher for {100 * teacher_share:.1f}%): it has collapsed to one class and is not usable")
