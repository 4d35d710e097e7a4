"""The built-in default run: scikit-learn's bundled 8x8 digits, no downloads.

1. Train a small BN teacher on 70% of the digits (once; cached as ONNX in the cache directory).
2. Export it to ONNX with BatchNorm kept, as a user's deployed model would arrive.
3. Compress that ONNX file data-free (the student never sees a digit) and report teacher and
   student accuracy on the held-out 30%, which neither model was trained on.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_deploy.core.io import atomic_path
from dfkd_deploy.models.small_cnn import SmallCNN
from dfkd_deploy.core.progress import task
from dfkd_deploy.recipe import Recipe

SPLIT_SEED = 0
TEACHER_FILE = "digits-teacher-v1.onnx"


def cache_dir() -> Path:
    root = os.environ.get("DFKD_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dfkd-deploy")
    return Path(root)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (N,8,8) images scaled 0..255 and labels, split 70/30 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return tuple(train_test_split(images, d.target.astype(np.int64), test_size=0.3,
                                  random_state=SPLIT_SEED, stratify=d.target))


def demo_recipe() -> Recipe:
    """Minutes on 2 CPU cores; 8x8 grey images need only a 1-pixel crop padding."""
    return Recipe.model_validate({
        "student": {"arch": "tiny_cnn"},
        "synthesis": {"g_steps": 5, "batch_size": 128, "nz": 64, "ngf": 32, "lr_g": 5e-3, "lr_z": 0.05,
                      "augment": {"crop_padding": 1, "flip": False}, "reset_l0_after": None},
        "distillation": {"epochs": 60, "warmup": 5, "kd_steps": 20, "batch_size": 128, "lr": 0.05,
                         "temperature": 4.0},
        "validation": {"probe_images": 256},
        # The demo shows the pipeline in minutes: ONNX, INT8 and the bundle; the OpenVINO/ExecuTorch
        # builds (tens of seconds where installed) are for real runs (deploy.edge_runtimes).
        "deploy": {"edge_runtimes": []},
        "seed": 0,
    })


def train_digits_teacher(x_train: np.ndarray, y_train: np.ndarray, epochs: int = 40, seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10, in_channels=1, width=32)
    x = torch.from_numpy(x_train).float().div(255).unsqueeze(1)
    y = torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    with task("train digits teacher (epochs)", epochs) as bar:
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=g).split(64):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            bar.advance()
    return model.eval()


def export_teacher_onnx(model: torch.nn.Module, path: Path, input_shape=(1, 8, 8)) -> Path:
    """BatchNorm kept as nodes, as many deployed files have them."""
    from exporters.onnx_export import export_teacher_onnx as export

    return export(model, path, input_shape=input_shape)


def ensure_teacher() -> tuple[Path, Path]:
    """The cached digits teacher (trained on first use) and the held-out split as .npz."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    x_tr, x_te, y_tr, y_te = digits_split()
    test_npz = root / "digits-test.npz"
    if not test_npz.exists():
        with atomic_path(test_npz) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=x_te, labels=y_te)
    teacher = root / TEACHER_FILE
    if not teacher.exists():
        export_teacher_onnx(train_digits_teacher(x_tr, y_tr), teacher)
    return teacher, test_npz


def run_demo(out: str | Path = "runs/demo", show_progress: bool = True) -> dict:
    from dfkd_deploy.run import compress

    teacher_path, test_npz = ensure_teacher()
    out = Path(out)
    ckpt = out / "checkpoints" / "last.pt"
    if ckpt.exists():  # the demo always starts afresh
        ckpt.unlink()
    result = compress(teacher_path, demo_recipe(), out, device="auto", eval_data=test_npz,
                      show_progress=show_progress)
    r = result.report
    return {"run_dir": str(result.run_dir), "teacher_accuracy": r["teacher"]["accuracy"],
            "student_accuracy": r["student"]["accuracy"], "student_params": r["student"]["params"],
            "teacher_params": r["student"].get("teacher_params"), "report": r}
