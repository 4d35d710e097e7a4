"""Metrics on known logits, batched prediction, and evaluate() end to end on tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfkd_deploy.models import build_model
from dfkd_deploy.teachers.spec import Normalizer, TeacherSpec
from dfkd_deploy.validate import EvalData, evaluate, predict, top1_accuracy, top1_agreement
from exporters import export_student_onnx

LOGITS_A = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 9.0]])
LOGITS_B = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 1.0], [9.0, 0.0, 1.0], [0.0, 0.0, 9.0]])


def test_accuracy_and_agreement_on_known_logits():
    assert top1_accuracy(LOGITS_A, torch.tensor([0, 1, 2, 0])) == pytest.approx(0.75)
    assert top1_accuracy(LOGITS_A.numpy(), np.array([1, 1, 1, 1])) == pytest.approx(0.25)
    assert top1_agreement(LOGITS_A, LOGITS_B) == pytest.approx(0.75)
    assert top1_agreement(LOGITS_A, LOGITS_A) == 1.0
    with pytest.raises(ValueError):
        top1_agreement(LOGITS_A, LOGITS_B[:2])


def test_predict_batches_normalizes_and_restores_mode():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=4, input_size=(8, 8)).train()
    spec = TeacherSpec(format="onnx", source="t.onnx", input_shape=(3, 8, 8), mean=(0.5, 0.4, 0.3),
                       std=(0.2, 0.3, 0.4), value_range=1.0)
    norm = Normalizer(spec)
    pixels = torch.rand(10, 3, 8, 8)

    out = predict(model, pixels, normalizer=norm, batch_size=3)
    assert model.training   # given back as it was
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(norm(pixels)))
        torch.testing.assert_close(predict(model, norm(pixels), batch_size=4), out)


def test_evaluate_teacher_student_and_onnx(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("tiny_cnn", num_classes=5, input_size=(8, 8)).eval()
    student = build_model("tiny_cnn", num_classes=5, input_size=(8, 8)).eval()
    spec = TeacherSpec(format="onnx", source="t.onnx", input_shape=(3, 8, 8), num_classes=5,
                       mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    norm = Normalizer(spec)
    images = np.random.default_rng(0).integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    with torch.no_grad():
        pixels = torch.from_numpy(images).float() / 255
        t_pred = teacher(norm(pixels)).argmax(1).numpy()
        s_pred = student(norm(pixels)).argmax(1).numpy()
    labels = t_pred.copy()
    labels[:10] = (labels[:10] + 1) % 5     # teacher wrong on exactly a quarter
    data = EvalData(images=images, labels=labels.astype(np.int64), source="mem")

    onnx_path = tmp_path / "s.onnx"
    export_student_onnx(student, onnx_path, input_shape=(3, 8, 8))
    res = evaluate(teacher, student, norm, data, batch_size=16, onnx_path=onnx_path)

    assert res["images"] == 40 and res["source"] == "mem"
    assert res["teacher_accuracy"] == pytest.approx(0.75)
    assert res["student_accuracy"] == pytest.approx(float((s_pred == labels).mean()))
    assert res["agreement"] == pytest.approx(float((s_pred == t_pred).mean()))
    assert res["onnx_accuracy"] == pytest.approx(res["student_accuracy"])

    alone = evaluate(teacher, None, norm, data)
    assert alone["student_accuracy"] is None and alone["agreement"] is None
    assert alone["teacher_accuracy"] == pytest.approx(0.75)
