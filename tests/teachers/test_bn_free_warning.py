"""A convolutional teacher without usable BN statistics is named up front and in the report."""
import dataclasses
import json

import torch
from torch import nn

from dfkd_deploy.teachers.batchnorm import missing_statistics_warning


def test_only_convolutional_teachers_without_bn_statistics_get_the_line(digits_teacher):
    from dfkd_deploy.teachers.spec import Teacher

    assert digits_teacher.spec.bn_layers > 0 and missing_statistics_warning(digits_teacher) is None
    bn_free = dataclasses.replace(digits_teacher.spec, bn_layers=0)
    line = missing_statistics_warning(Teacher(digits_teacher.module, bn_free))
    assert line and "no usable BatchNorm statistics" in line and "do_constant_folding=False" in line
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert missing_statistics_warning(Teacher(mlp, bn_free)) is None     # nothing was measured for MLPs


def test_a_run_on_a_bn_folded_export_warns_in_the_output_and_report(tmp_path, digits_data, digits_eval_npz, capsys):
    from dfkd_deploy import run as api
    from dfkd_deploy.demo import train_digits_teacher
    from tests.conftest import quick_recipe

    x_tr, _, y_tr, _ = digits_data
    model = train_digits_teacher(x_tr, y_tr, epochs=2, seed=0).eval()
    path = tmp_path / "folded.onnx"
    # the legacy exporter's constant folding folds BN into the convolutions, as most exports do
    torch.onnx.export(model, torch.zeros(1, 1, 8, 8), path, dynamo=False, do_constant_folding=True,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    out = tmp_path / "run"
    api.compress(path, quick_recipe(), out, device="cpu", eval_data=digits_eval_npz, show_progress=False)
    assert "no usable BatchNorm statistics" in capsys.readouterr().err   # the console writes to stderr
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["bn_layers"] == 0
    assert any("no usable BatchNorm statistics" in w for w in report["student"]["warnings"])
    assert "**Warning:** the teacher has no usable BatchNorm statistics" in (out / "report.md").read_text()


def test_inspect_prints_the_warning_for_a_folded_teacher_and_none_for_a_bn_teacher(tmp_path, digits_teacher_onnx):
    from click.testing import CliRunner

    from dfkd_deploy.cli import cli
    from dfkd_deploy.demo import digits_split, train_digits_teacher

    x_tr, _, y_tr, _ = digits_split()
    path = tmp_path / "folded.onnx"
    torch.onnx.export(train_digits_teacher(x_tr, y_tr, epochs=1, seed=0).eval(), torch.zeros(1, 1, 8, 8), path,
                      dynamo=False, do_constant_folding=True)
    folded = CliRunner().invoke(cli, ["inspect", str(path)])
    assert folded.exit_code == 0, folded.output
    assert "warning: the teacher has no usable BatchNorm statistics" in folded.output
    kept = CliRunner().invoke(cli, ["inspect", str(digits_teacher_onnx), "--json"])
    assert kept.exit_code == 0 and json.loads(kept.output)["warnings"] == []
