"""``student.pt``: a student's weights plus what is needed to rebuild it without the recipe.

Zoo students are rebuilt from their architecture name; students derived from the teacher
(pruned, or a depth student of a non-zoo shape) from the architecture description attached to the
module by :mod:`dfkd_deploy.students` (``module.dfkd_derived``): plain data and tensors, so
the file loads with ``weights_only=True`` and unpickles no code.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.core.io import save_torch
from dfkd_deploy.models.heads import apply_head_config, head_config
from dfkd_deploy.models.registry import build_model

FORMAT = "dfkd-deploy/student/v1"
ARCH_ATTR = "dfkd_arch"          # label recorded as the student's arch (set by run.build_student)
DERIVED_ATTR = "dfkd_derived"    # architecture description of a derived student (None for zoo ones)


def save_student(path: str | Path, student: nn.Module, *, arch: str | None, num_classes: int,
                 input_shape: tuple[int, int, int], teacher_spec: dict, extra: dict | None = None) -> Path:
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    arch = getattr(student, ARCH_ATTR, None) or arch
    derived = getattr(student, DERIVED_ATTR, None)
    if arch is None:
        raise UsageError("the student has no architecture name to save")
    blob = {"format": FORMAT, "arch": arch, "num_classes": num_classes, "input_shape": list(input_shape),
            "state_dict": state, "head": head_config(student, num_classes), "teacher_spec": teacher_spec,
            **(extra or {})}
    if derived is not None:
        blob["derived"] = derived
    return save_torch(path, blob)


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
    model = rebuild_student(blob)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    meta = {k: v for k, v in blob.items() if k not in ("state_dict", "derived")}
    return model, meta


def rebuild_student(blob: dict) -> nn.Module:
    """The architecture a student blob names, with its head, weights as built."""
    c, h, w = blob["input_shape"]
    if blob.get("derived") is not None:
        from dfkd_deploy.students.architecture import rebuild

        model = rebuild(blob["derived"], num_classes=blob["num_classes"], input_shape=(c, h, w))
    else:
        model = build_model(blob["arch"], num_classes=blob["num_classes"], in_channels=c, input_size=(h, w))
    apply_head_config(model, blob["num_classes"], blob.get("head"))
    setattr(model, ARCH_ATTR, blob["arch"])
    if blob.get("derived") is not None:
        setattr(model, DERIVED_ATTR, blob["derived"])
    return model
