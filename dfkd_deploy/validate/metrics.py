"""Accuracy and teacher-student agreement, batched and without gradients."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from dfkd_deploy.core.errors import DataError
from dfkd_deploy.runtime.onnxruntime import OrtRunner
from dfkd_deploy.validate.data import EvalData, to_pixels

TOP_K = 5   # the second accuracy figure reported beside top-1


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, *, normalizer: Optional[nn.Module] = None,
            batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits (float32, on CPU) of ``model`` for ``inputs``.

    ``inputs`` are pixels when a ``normalizer`` is given (it maps them to model space batch by
    batch), model-space inputs otherwise. The model runs in eval mode and gets its previous
    mode back afterwards, so calling this mid-training does not disturb BatchNorm statistics.
    """
    inputs = torch.as_tensor(inputs)
    was_training = model.training
    model.eval()
    if normalizer is not None:
        normalizer = normalizer.to(device)
    outs = []
    try:
        for i in range(0, len(inputs), batch_size):
            x = inputs[i:i + batch_size].to(device, torch.float32)
            if normalizer is not None:
                x = normalizer(x)
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def top1_accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if len(labels) == 0:
        return float("nan")
    return (logits.argmax(1) == labels.to(logits.device)).float().mean().item()


def topk_accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, k: int = 5) -> Optional[float]:
    """Fraction of labels among each row's ``k`` highest logits; None when there are no more than
    ``k`` classes (every label would count as a hit)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.ndim != 2 or logits.shape[1] <= k:
        return None
    if len(labels) == 0:
        return float("nan")
    top = logits.topk(k, dim=1).indices
    return (top == labels.to(logits.device).view(-1, 1)).any(1).float().mean().item()


def top1_agreement(logits_a: torch.Tensor | np.ndarray, logits_b: torch.Tensor | np.ndarray) -> float:
    """Fraction of inputs on which both models pick the same class."""
    a, b = torch.as_tensor(logits_a), torch.as_tensor(logits_b)
    if len(a) != len(b):
        raise ValueError(f"cannot compare {len(a)} predictions with {len(b)}")
    if len(a) == 0:
        return float("nan")
    return (a.argmax(1) == b.argmax(1).to(a.device)).float().mean().item()


def evaluate(teacher_module: nn.Module, student: Optional[nn.Module], normalizer: nn.Module,
             data: EvalData, *, batch_size: int = 256, device: str | torch.device = "cpu",
             onnx_path: str | Path | None = None, onnx_layout: str = "NCHW", keep_predictions: bool = False) -> dict:
    """Teacher and student accuracy (top-1, and top-5 beside it in ``*_top5``; None for five
    classes or fewer) and their top-1 agreement on real labelled data.

    Images are converted to pixels one batch at a time (a full float copy of a large set would
    not fit in memory). With ``onnx_path`` the exported file is scored too, on ONNX Runtime,
    so the report shows the accuracy of what actually ships.
    """
    if len(data) == 0:
        raise DataError(f"eval data {data.source} is empty")
    runner = OrtRunner(onnx_path, layout=onnx_layout, batch_size=batch_size) if onnx_path is not None else None
    teacher_logits, student_logits, onnx_logits = [], [], []
    for i in range(0, len(data), batch_size):
        pixels = to_pixels(data.images[i:i + batch_size])
        teacher_logits.append(predict(teacher_module, pixels, normalizer=normalizer,
                                      batch_size=batch_size, device=device))
        if student is not None:
            student_logits.append(predict(student, pixels, normalizer=normalizer,
                                          batch_size=batch_size, device=device))
        if runner is not None:
            with torch.no_grad():
                model_space = normalizer(pixels.to(device)).cpu().numpy()
            onnx_logits.append(torch.from_numpy(runner.predict(model_space)))

    labels = torch.from_numpy(data.labels)
    t = torch.cat(teacher_logits)
    result = {
        "source": data.source,
        "images": len(data),
        "teacher_accuracy": top1_accuracy(t, labels),
        "teacher_top5": topk_accuracy(t, labels, TOP_K),
        "student_accuracy": None,
        "student_top5": None,
        "agreement": None,
    }
    if student is not None:
        s = torch.cat(student_logits)
        result["student_accuracy"] = top1_accuracy(s, labels)
        result["student_top5"] = topk_accuracy(s, labels, TOP_K)
        result["agreement"] = top1_agreement(t, s)
    if onnx_path is not None:
        o = torch.cat(onnx_logits)
        result["onnx_accuracy"] = top1_accuracy(o, labels)
        result["onnx_top5"] = topk_accuracy(o, labels, TOP_K)
    if keep_predictions:   # top-1 classes (teacher, student), e.g. for the confusion matrix
        result["predictions"] = (t.argmax(1).numpy(), s.argmax(1).numpy() if student is not None else None)
    return result
