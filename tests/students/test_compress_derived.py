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
