"""Top-5 sits beside top-1 in report.json (``top5`` siblings of ``accuracy``) and in report.md."""
from __future__ import annotations

from dfkd_deploy.report import build_report, get_path, render_report_md
from dfkd_deploy.teachers.spec import TeacherSpec


def _spec():
    return TeacherSpec(format="onnx", source="mnv2.onnx", input_shape=(3, 224, 224), num_classes=1000)


def test_top5_keys_next_to_top1():
    ev = {"source": "imagenet-sample-224", "images": 1000, "teacher_accuracy": 0.73, "teacher_top5": 0.91,
          "student_accuracy": 0.002, "student_top5": 0.011, "agreement": 0.003,
          "onnx_accuracy": 0.002, "onnx_top5": 0.012}
    r = build_report(_spec(), evaluation=ev)
    assert (get_path(r, "teacher.accuracy"), get_path(r, "teacher.top5")) == (0.73, 0.91)
    assert (get_path(r, "student.accuracy"), get_path(r, "student.top5")) == (0.002, 0.011)
    assert (get_path(r, "student.onnx_accuracy"), get_path(r, "student.onnx_top5")) == (0.002, 0.012)
    md = render_report_md(r)
    assert "| Model | Top-1 | Top-5 |" in md
    assert "| Teacher | 73.00 % | 91.00 % |" in md
    assert "| Student (exported ONNX) | 0.20 % | 1.20 % |" in md


def test_top5_not_measured_without_eval_data():
    r = build_report(_spec())
    assert get_path(r, "teacher.top5") is None and get_path(r, "student.top5") is None
    assert "| Student | not measured | not measured |" in render_report_md(r)


def test_int8_teacher_parity_is_in_report_json_and_md():
    from dfkd_deploy.teachers.spec import TeacherSpec

    int8 = {"format": "QOperator", "per_channel": True, "ops": {"QLinearConv": 3}, "activations": "fake_quant",
            "images": 64, "agreement_probes": 0.969, "agreement_smooth": 1.0, "max_abs_diff": 0.31}
    spec = TeacherSpec(format="onnx", source="q.onnx", input_shape=(3, 32, 32), num_classes=10, int8=int8)
    report = build_report(spec)
    assert get_path(report, "teacher.int8.agreement_probes") == 0.969
    md = render_report_md(report)
    assert "QOperator, per-channel weights, surrogate activations fake_quant" in md
    assert "96.90 % on random probes, 100.00 % on smooth images (64 each)" in md
    assert "int8" not in render_report_md(build_report(TeacherSpec(format="onnx", source="f.onnx",
                                                                   input_shape=(3, 32, 32))))
