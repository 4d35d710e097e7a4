"""A whole compress run on a pruned student: export, INT8, bundle, validate and student.pt."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
def test_compress_with_a_pruned_student(tmp_path, digits_teacher_onnx, digits_eval_npz):
    from dfkd_deploy import stages
    from dfkd_deploy.students.student_file import load_student
    from dfkd_deploy.run import compress
    from tests.conftest import quick_recipe

    recipe = quick_recipe(**{"student.arch": None, "student.init": "prune", "student.target": "params=0.3",
                             "student.derived.images": 32})
    result = compress(digits_teacher_onnx, recipe, tmp_path / "run", eval_data=digits_eval_npz, show_progress=False)
    s = result.report["student"]
    assert s["init"] == "prune" and s["target_met"] is True and s["arch"] == "teacher-pruned"
    assert s["params"] <= 0.3 * s["teacher_params"]
    assert (tmp_path / "run" / "student.int8.onnx").is_file() or result.report["int8"].get("error")
    assert (tmp_path / "run" / "bundle").is_dir()
    model, meta = load_student(tmp_path / "run" / "student.pt")
    assert meta["arch"] == "teacher-pruned"
    blob = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert blob["derived"]["base"]["kind"] == "onnx"
    metrics = stages.validate(tmp_path / "run" / "student.pt", digits_teacher_onnx, recipe, probes=32)
    assert 0 <= metrics["probe_agreement"] <= 1
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| Initialisation | prune |" in md and "params=0.3 (met)" in md
    assert json.loads((tmp_path / "run" / "report.json").read_text())["student"]["prune"]["mode"] == "all"


@pytest.mark.slow
def test_compress_with_auto_init_on_a_residual_teacher(tmp_path):
    """``student.init: auto`` on a zoo ResNet state_dict: the run takes depth, says why, and its
    report and recipe.resolved.yaml hold depth (so KD ran at the derived students' lr scale)."""
    import yaml

    from dfkd_deploy.models import build_model
    from dfkd_deploy.run import compress
    from tests.conftest import quick_recipe

    torch.manual_seed(0)
    path = tmp_path / "resnet14.pt"
    torch.save(build_model("cifar_resnet14", num_classes=10, in_channels=3, input_size=(16, 16)).state_dict(), path)
    recipe = quick_recipe(**{"teacher.arch": "cifar_resnet14", "teacher.input_shape": [3, 16, 16],
                             "teacher.mean": None, "teacher.std": None,
                             "student.init": "auto", "student.arch": "cifar_resnet8", "student.derived.images": 32})
    result = compress(path, recipe, tmp_path / "run", show_progress=False)
    s = result.report["student"]
    assert s["init"] == "depth" and s["arch"] == "cifar_resnet8"
    assert s["depth"]["teacher_arch"] == "cifar_resnet14"
    assert s["init_choice"].startswith("student.init auto -> depth")
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert resolved["student"]["init"] == "depth"
    assert "| Initialisation | depth |" in (tmp_path / "run" / "report.md").read_text()
