"""Top-5 beside top-1: known logits, and evaluate() on a tiny model where the two differ."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dfkd_deploy.teachers.spec import Normalizer, TeacherSpec
from dfkd_deploy.validate import EvalData, evaluate
from dfkd_deploy.validate.metrics import topk_accuracy


def test_topk_on_known_logits():
    logits = torch.tensor([[9., 8, 7, 6, 5, 4, 0],     # label 4: 5th highest -> top-5 hit
                           [9., 8, 7, 6, 5, 4, 0],     # label 5: 6th highest -> miss
                           [0., 0, 0, 0, 0, 0, 1]])    # label 6: top-1 hit
    labels = torch.tensor([4, 5, 6])
    assert topk_accuracy(logits, labels, 5) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits[:, :5], torch.tensor([4, 0, 1]), 5) is None   # 5 classes: every label hits


class _Fixed(nn.Module):
    """Ranks the classes the same for every image: 0 first, then 1, 2, ..."""

    def __init__(self, classes: int):
        super().__init__()
        self.register_buffer("scores", -torch.arange(classes, dtype=torch.float32))

    def forward(self, x):
        return self.scores.expand(len(x), -1)


def test_evaluate_reports_top5_where_it_differs_from_top1():
    labels = np.array([0, 1, 4, 5, 9, 2, 3, 7], np.int64)     # hits at rank 1: {0}; ranks 1-5: {0,1,2,3,4}
    images = np.zeros((len(labels), 1, 4, 4), np.uint8)
    data = EvalData(images, labels, "mem")
    norm = Normalizer(TeacherSpec("onnx", "t.onnx", (1, 4, 4), num_classes=10))
    r = evaluate(_Fixed(10), _Fixed(10), norm, data, batch_size=3)
    assert r["teacher_accuracy"] == 1 / 8 and r["teacher_top5"] == 5 / 8
    assert r["student_accuracy"] == 1 / 8 and r["student_top5"] == 5 / 8
    no_student = evaluate(_Fixed(10), None, norm, data)
    assert no_student["student_top5"] is None and no_student["teacher_top5"] == 5 / 8
