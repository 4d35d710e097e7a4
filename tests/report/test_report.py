"""report.json has every required key (None when not measured) and renders to markdown."""
from __future__ import annotations

import json

import pytest

from dfkd_deploy.report import (REQUIRED_KEYS, build_report, count_parameters, get_path, missing_keys,
                                render_report_md, write_report_json, write_report_md)
from dfkd_deploy.models import build_model
from dfkd_deploy.teachers.spec import TeacherSpec
from exporters.onnx_export import OnnxExportResult


def _spec():
    return TeacherSpec(format="onnx", source="teacher.onnx", input_shape=(3, 32, 32), layout="NHWC",
                       num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, bn_layers=19,
                       arch="cifar_resnet20", converter_max_abs_diff=2e-6,
                       notes=["mean/std taken from the recipe"])


def _full_report(tmp_path):
    export = OnnxExportResult(path=tmp_path / "student.onnx", opset=17, input_name="input",
                              output_name="logits", max_abs_diff=3e-6, top1_agreement=1.0,
                              bn_nodes_remaining=0, layout="NHWC", probes=512)
    return build_report(
        _spec(),
        student={"arch": "cifar_resnet8", "params": count_parameters(build_model("cifar_resnet8", num_classes=10))},
        evaluation={"source": "cifar10.npz", "images": 10000, "teacher_accuracy": 0.92,
                    "student_accuracy": 0.81, "agreement": 0.84, "onnx_accuracy": 0.81},
        probe_agreement={"top1": 0.9, "images": 512},
        export=export,
        synthesis={"method": "fastdfkd", "g_steps": 5, "images": 51200, "seconds": 812.5, "nz": 256},
        distillation={"epochs": 220, "seconds": 1900.0},
        extra={"run": {"seed": 0}, "synthesis": {"bn_loss_final": 0.3}},
    )


def test_full_report_values(tmp_path):
    report = _full_report(tmp_path)
    assert missing_keys(report) == []
    expected = {
        "teacher.format": "onnx", "teacher.input_shape": [3, 32, 32], "teacher.layout": "NHWC",
        "teacher.num_classes": 10, "teacher.bn_layers": 19, "teacher.accuracy": 0.92,
        "student.arch": "cifar_resnet8", "student.params": 75290, "student.accuracy": 0.81,
        "agreement.top1": 0.84, "fidelity.onnx_max_abs_diff": 3e-6, "fidelity.onnx_top1_agreement": 1.0,
        "synthesis.method": "fastdfkd", "synthesis.g_steps": 5, "synthesis.images": 51200,
        "synthesis.seconds": 812.5, "distillation.epochs": 220, "distillation.seconds": 1900.0,
    }
    assert set(expected) == set(REQUIRED_KEYS)
    for key, value in expected.items():
        assert get_path(report, key) == value, key
    # Extras are kept, and sections given in ``extra`` merge instead of replacing.
    assert get_path(report, "agreement.measured_on") == "eval_data"
    assert get_path(report, "agreement.probe_top1") == 0.9
    assert get_path(report, "synthesis.nz") == 256 and get_path(report, "synthesis.bn_loss_final") == 0.3
    assert get_path(report, "run.seed") == 0
    assert get_path(report, "fidelity.onnx_file") == "student.onnx"


def test_empty_report_has_every_key_as_none():
    report = build_report(TeacherSpec(format="torchscript", source="t.pt", input_shape=(1, 28, 28)))
    assert missing_keys(report) == []
    measured = {"teacher.format", "teacher.input_shape", "teacher.layout", "teacher.num_classes",
                "teacher.bn_layers"}
    for key in set(REQUIRED_KEYS) - measured:
        assert get_path(report, key) is None, key
    assert "not measured" in render_report_md(report)


def test_agreement_falls_back_to_probes():
    report = build_report(_spec(), probe_agreement={"top1": 0.7, "images": 256})
    assert get_path(report, "agreement.top1") == 0.7
    assert get_path(report, "agreement.measured_on") == "probes"


def test_get_path():
    report = {"a": {"b": {"c": 1}}, "x": None}
    assert get_path(report, "a.b.c") == 1
    assert get_path(report, "a.z", default=None) is None
    with pytest.raises(KeyError, match="a.b.z"):
        get_path(report, "a.b.z")
    with pytest.raises(KeyError):
        get_path(report, "x.y")


def test_write_json_and_markdown(tmp_path):
    report = _full_report(tmp_path)
    json_path, md_path = write_report_json(tmp_path, report), write_report_md(tmp_path, report)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report, default=str))
    md = md_path.read_text()
    for text in ("# dfkd-deploy report", "## Teacher", "## Student", "## Accuracy", "## Fidelity",
                 "## Timings", "cifar_resnet8", "92.00 %", "81.00 %", "84.00 %", "3.00e-06",
                 "75,290", "13.5 min", "31.7 min", "mean/std taken from the recipe", "3 x 32 x 32"):
        assert text in md, text
