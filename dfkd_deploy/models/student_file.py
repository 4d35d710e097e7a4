"""``student.pt``: a student's weights plus what is needed to rebuild it without the recipe."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.core.io import save_torch
from dfkd_deploy.models.heads import apply_head_config, head_config
from dfkd_deploy.models.registry import build_model

FORMAT = "dfkd-deploy/student/v1"


def save_student(path: str | Path, student: nn.Module, *, arch: str, num_classes: int,
                 input_shape: tuple[int, int, int], teacher_spec: dict, extra: dict | None = None) -> Path:
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    return save_torch(path, {"format": FORMAT, "arch": arch, "num_classes": num_classes,
                             "input_shape": list(input_shape), "state_dict": state,
                             "head": head_config(student, num_classes),
                             "teacher_spec": teacher_spec, **(extra or {})})


def load_student(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a student saved by :func:`save_student`; returns (module in eval mode, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"student file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or not one of ours
        raise UsageError(f"{path}: not a dfkd-deploy student file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UsageError(f"{path}: not a dfkd-deploy student file (expected format {FORMAT})")
    c, h, w = blob["input_shape"]
    model = build_model(blob["arch"], num_classes=blob["num_classes"], in_channels=c, input_size=(h, w))
    apply_head_config(model, blob["num_classes"], blob.get("head"))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, meta
