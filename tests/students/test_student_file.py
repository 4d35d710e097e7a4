"""Derived students round-trip through student.pt without pickle (weights_only=True), and the
stage commands (export) take them."""
from __future__ import annotations

import pytest
import torch

from dfkd_deploy.students import build
from dfkd_deploy.students.student_file import ARCH_ATTR, DERIVED_ATTR, load_student, save_student
from dfkd_deploy.recipe import load_recipe


def _saved(tmp_path, built, teacher):
    setattr(built.module, ARCH_ATTR, built.arch)
    setattr(built.module, DERIVED_ATTR, built.description)
    spec = teacher.spec
    return save_student(tmp_path / "student.pt", built.module, arch=None, num_classes=spec.num_classes,
                        input_shape=spec.input_shape, teacher_spec=spec.to_dict())


@pytest.mark.parametrize("which", ["zoo", "onnx_bn", "onnx_fused", "onnx_fused_resnet"])
def test_pruned_student_round_trip(tmp_path, which, request):
    fixture = {"zoo": "zoo_teacher", "onnx_bn": "digits_teacher", "onnx_fused": "digits_teacher_fused",
               "onnx_fused_resnet": "zoo_teacher_fused"}[which]   # the last prunes inside its blocks only
    teacher = request.getfixturevalue(fixture)
    r = load_recipe(None, {"student.init": "prune", "student.target": "params=0.4"})
    built = build(r, teacher, measure_latency=False)
    path = _saved(tmp_path, built, teacher)
    blob = torch.load(path, map_location="cpu", weights_only=True)      # no pickle
    assert blob["derived"]["base"]["kind"] == ("zoo" if which == "zoo" else "onnx")
    model, meta = load_student(path)
    assert meta["arch"] == built.arch
    x = torch.rand(4, *teacher.spec.input_shape)
    with torch.no_grad():
        assert torch.equal(model(x), built.module.eval()(x))
    if which != "zoo":   # the graph travels with its weights zeroed: far smaller than the teacher file
        from pathlib import Path
        assert blob["derived"]["base"]["onnx_zlib"].numel() < Path(teacher.spec.source).stat().st_size


def test_depth_student_round_trip_and_export(tmp_path, zoo_teacher):
    from dfkd_deploy import stages

    r = load_recipe(None, {"student.init": "depth", "student.arch": "cifar_resnet8",
                           "student.derived.recalibrate_bn": False})
    built = build(r, zoo_teacher, measure_latency=False)
    path = _saved(tmp_path, built, zoo_teacher)
    model, meta = load_student(path)
    assert meta["arch"] == "cifar_resnet8"
    result = stages.export(path, tmp_path / "student.onnx")
    assert result.max_abs_diff < 1e-3


def test_pruned_student_exports(tmp_path, digits_teacher):
    from dfkd_deploy import stages

    built = build(load_recipe(None, {"student.init": "prune", "student.target": "params=0.3"}), digits_teacher,
                  measure_latency=False)
    result = stages.export(_saved(tmp_path, built, digits_teacher), tmp_path / "student.onnx")
    assert result.max_abs_diff < 1e-3
