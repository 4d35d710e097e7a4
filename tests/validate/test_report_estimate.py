"""report.json / report.md carry the data-free estimate when a run has no real data."""
import pytest
import torch

from dfkd_deploy.report.report import render_report_md
from dfkd_deploy.run import build_student, estimated_agreement_section
from dfkd_deploy.validate import estimate as estimate_mod
from dfkd_deploy.validate.estimate import Estimator

from ..conftest import quick_recipe


def test_section_has_estimate_interval_and_sources(monkeypatch, digits_teacher):
    stub = Estimator(["agree.pooled"], [0.5], 0.2, 0.1, calibration={"pairs": 2, "teachers": ["a", "b"]})
    monkeypatch.setattr(estimate_mod, "default_estimator", lambda: stub)
    recipe = quick_recipe()
    torch.manual_seed(0)
    student = build_student(recipe, digits_teacher)
    probes = torch.rand(16, 1, 8, 8)
    section = estimated_agreement_section(digits_teacher, student, recipe, probes, "cpu", show_progress=False)
    pooled = (section["estimated_real"] - 0.2) / 0.5
    assert 0 <= pooled <= 1
    assert section["interval"] == pytest.approx([max(0, section["estimated_real"] - 0.1),
                                                 min(1, section["estimated_real"] + 0.1)])
    assert set(section["probe_sources"]) == {"fresh", "deepinversion", "confident", "boundary", "held_out"}
    md = render_report_md({"agreement": {"probe_top1": 0.9, **section}})
    assert "Real data, estimated without it" in md and "90% interval" in md
    assert "Independent probes: fresh" in md
    assert "Raw agreement on synthetic probes is not real agreement" in md
    assert "estimated_accuracy" not in section                       # no teacher accuracy given

    known = quick_recipe(**{"teacher.accuracy": 0.95})
    with_acc = estimated_agreement_section(digits_teacher, student, known, probes, "cpu", show_progress=False)
    acc = with_acc["estimated_accuracy"]
    lo, hi = with_acc["interval"]
    assert acc["bounds"][0] == pytest.approx(max(0.0, 0.95 + lo - 1)) and acc["bounds"][0] <= acc["value"] <= acc["bounds"][1]
    assert "Student accuracy, estimated without data" in render_report_md({"agreement": {"probe_top1": 0.9, **with_acc}})
