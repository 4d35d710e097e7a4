"""A student larger or slower than its teacher is never silent: a warning line in the run output
and in report.md."""
from __future__ import annotations

import pytest
import torch

from dfkd_deploy.core.units import Target, parse_target
from dfkd_deploy.students.targets import meets, size_warnings


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from dfkd_deploy.models import build_model
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy.teachers import load_teacher

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.save(build_model("tiny_cnn", num_classes=10, in_channels=1, input_size=(8, 8)).state_dict(), path)
    return load_teacher(path, TeacherOptions(arch="tiny_cnn", input_shape=(1, 8, 8)))


def test_size_warnings_lines():
    lines = size_warnings({"params": 3.7, "macs": 0.5, "latency_b1": 4.6, "latency_b32": 0.9})
    assert len(lines) == 2
    assert "3.70x the teacher's parameters" in lines[0] and "4.60x slower than the teacher at batch 1" in lines[1]
    assert size_warnings({"params": 0.3, "macs": 0.3, "latency_b1": 0.4, "latency_b32": None}) == []


def test_targets_parse_and_meet():
    assert parse_target("latency=0.5") == Target("latency", 0.5)
    assert meets({"latency_b1": 0.4, "latency_b32": 0.6}, Target("latency", 0.5)) is False
    assert meets({"latency_b1": 0.4, "latency_b32": 0.45}, Target("latency", 0.5)) is True
    assert meets({"params": None}, Target("params", 0.5)) is False


def test_a_larger_student_warns_in_the_output_and_in_report_md(tiny_teacher, capsys):
    from dfkd_deploy.recipe import load_recipe
    from dfkd_deploy.report.report import build_report, render_report_md
    from dfkd_deploy.run import build_student

    from dfkd_deploy.cli import _print_summary

    student = build_student(load_recipe(None, {"student.arch": "small_cnn"}), tiny_teacher, announce=True)
    info = student.dfkd_info
    assert any("parameters: it is not smaller" in w for w in info["warnings"])
    report = build_report(tiny_teacher.spec, student={"params": 1, **info})
    md = render_report_md(report)
    assert "**Warning:** the student has" in md and "| Parameters / teacher's |" in md
    capsys.readouterr()
    _print_summary(report, "RUN")
    assert "warning: the student has" in capsys.readouterr().out


def test_the_default_student_is_smaller_than_the_teacher(zoo_teacher):
    from dfkd_deploy.recipe import load_recipe
    from dfkd_deploy.run import build_student

    student = build_student(load_recipe(None), zoo_teacher)
    r = student.dfkd_info["size"]["ratio"]
    assert r["params"] <= 0.5 and r["macs"] <= 0.5
    assert student.dfkd_info["choice"]   # says which architecture and why


def test_a_fixed_batch_onnx_teacher_is_timed_through_its_converted_module(tmp_path):
    """MLPerf-Tiny's ResNet-8 file runs at batch 16 only: ORT cannot time it at batch 1 or 32 as
    it is, so the converted teacher is timed instead, and the figures say so."""
    from dfkd_deploy.models import build_model
    from dfkd_deploy.students.targets import teacher_figures
    from dfkd_deploy.teachers import load_teacher

    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    path = tmp_path / "fixed16.onnx"
    torch.onnx.export(model, (torch.randn(16, 1, 8, 8),), str(path), input_names=["x"], dynamo=False)
    teacher = load_teacher(path)
    figures = teacher_figures(teacher)
    assert set(figures.latency_ms) == {"batch_1_ms", "batch_32_ms"}
    assert figures.latency_reason is None
    assert "could not be timed as it is" in figures.to_dict()["latency_note"]
    # report.json's latency table times it the same way (one mechanism), and keeps the file's size
    from dfkd_deploy.deploy.latency import time_teacher

    t = time_teacher(teacher, batches=(1, 32))
    assert t.source == "exported" and t.reason is None and set(t.timings) == {"batch_1_ms", "batch_32_ms"}
    assert t.nbytes == path.stat().st_size


def test_a_teacher_without_convolutions_gets_an_mlp_student(tmp_path):
    """The Fashion-MNIST MLP's default student used to be tiny_cnn: 15.8x its MACs and 13.6x slower
    at batch 32. A teacher with no convolution now draws from the MLP family."""
    from torch import nn

    from dfkd_deploy.recipe import load_recipe
    from dfkd_deploy.run import build_student
    from dfkd_deploy.students.build import has_convolution
    from dfkd_deploy.teachers import load_teacher

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10)).eval()
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(mlp, (torch.randn(2, 1, 28, 28),), str(path), input_names=["x"], dynamo=False,
                      dynamic_axes={"x": {0: "n"}})
    teacher = load_teacher(path)
    assert not has_convolution(teacher.module)
    student = build_student(load_recipe(None), teacher)
    info = student.dfkd_info
    assert info["arch"].startswith("mlp_w"), info
    assert not has_convolution(student)
    assert info["size"]["ratio"]["params"] <= 0.5 and info["size"]["ratio"]["macs"] <= 0.5
    assert student(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_a_conv_teacher_keeps_conv_candidates(zoo_teacher):
    from dfkd_deploy.students.build import SCRATCH_CANDIDATES, has_convolution, scratch_candidates

    assert has_convolution(zoo_teacher.module)
    assert scratch_candidates(zoo_teacher) == SCRATCH_CANDIDATES
