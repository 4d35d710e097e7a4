"""Without eval data the gate holds --min-agreement against the LOWER bound of the estimate's
interval, and the JUnit file carries the estimate and its interval. The estimate is stubbed (a
fixed estimator); the gate, the validate stage and the CLI are the real ones."""
import json
import xml.etree.ElementTree as ET

import pytest
import torch
from click.testing import CliRunner

from dfkd_deploy.cli import cli
from dfkd_deploy.validate import estimate as estimate_mod
from dfkd_deploy.validate.estimate import Estimator
from dfkd_deploy.validate.gate import load_baseline, run_gate

from ..conftest import quick_recipe


def test_run_gate_uses_the_lower_bound():
    metrics = {"probe_agreement": 0.99, "estimated_agreement": 0.85, "estimated_agreement_low": 0.7,
               "estimated_agreement_high": 1.0}
    [c] = run_gate(metrics, min_agreement=0.8)
    assert not c.passed and c.metric == "estimated_agreement_low" and "interval" in c.message
    [c] = run_gate({**metrics, "estimated_agreement_low": 0.81}, min_agreement=0.8)
    assert c.passed


def test_real_data_wins_over_the_estimate():
    [c] = run_gate({"eval_agreement": 0.9, "estimated_agreement_low": 0.1}, min_agreement=0.8)
    assert c.passed and c.metric == "eval_agreement"


def test_no_estimate_fails_rather_than_gating_on_raw_probes():
    [c] = run_gate({"probe_agreement": 0.99}, min_agreement=0.8)
    assert not c.passed and "not measured" in c.message


def test_baseline_from_report_carries_the_estimate(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"agreement": {"estimated_real": 0.7, "probe_top1": 0.9}}))
    base = load_baseline(path)
    checks = run_gate({"estimated_agreement": 0.6, "estimated_agreement_low": 0.5}, baseline=base, max_drop=5)
    assert [c.name for c in checks] == ["max_drop.estimated_agreement"] and not checks[0].passed


@pytest.fixture(scope="module")
def student_and_recipe(digits_teacher, tmp_path_factory):
    from dfkd_deploy.students.student_file import save_student
    from dfkd_deploy.run import build_student

    recipe = quick_recipe()
    root = tmp_path_factory.mktemp("gate")
    torch.manual_seed(0)
    student = build_student(recipe, digits_teacher)
    path = save_student(root / "student.pt", student, arch="tiny_cnn", num_classes=10, input_shape=(1, 8, 8),
                        teacher_spec=digits_teacher.spec.to_dict())
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(recipe.resolved_yaml())
    return path, recipe_file


def _validate(monkeypatch, digits_teacher_onnx, student_and_recipe, tmp_path, value, half_width):
    stub = Estimator(["agree.pooled"], [0.0], value, half_width, calibration={"pairs": 3, "teachers": ["x", "y"]})
    monkeypatch.setattr(estimate_mod, "default_estimator", lambda: stub)
    student, recipe_file = student_and_recipe
    junit = tmp_path / "junit.xml"
    result = CliRunner().invoke(cli, ["validate", str(student), "--teacher", str(digits_teacher_onnx), "--recipe",
                                      str(recipe_file), "--min-agreement", "0.8", "--junit", str(junit)])
    return result, junit


def test_cli_exit_1_when_the_lower_bound_is_under_the_threshold(monkeypatch, digits_teacher_onnx,
                                                                student_and_recipe, tmp_path):
    result, junit = _validate(monkeypatch, digits_teacher_onnx, student_and_recipe, tmp_path, 0.85, 0.1)
    assert result.exit_code == 1, result.output
    assert "estimated real agreement 85.0%" in result.output and "75.0%..95.0%" in result.output
    suite = ET.parse(junit).getroot().find("testsuite")
    props = {p.get("name"): json.loads(p.get("value")) for p in suite.find("properties")}
    assert props["estimated_agreement"] == pytest.approx(0.85)
    assert props["estimated_agreement_low"] == pytest.approx(0.75)
    assert props["estimated_agreement_high"] == pytest.approx(0.95)
    assert props["estimated_agreement.interval"] == pytest.approx([0.75, 0.95])
    assert set(props["probe_sources"]) >= {"fresh", "deepinversion", "confident", "boundary", "held_out"}
    assert suite.get("failures") == "1"


def test_cli_exit_0_when_the_lower_bound_clears_it(monkeypatch, digits_teacher_onnx, student_and_recipe, tmp_path):
    result, junit = _validate(monkeypatch, digits_teacher_onnx, student_and_recipe, tmp_path, 0.9, 0.05)
    assert result.exit_code == 0, result.output
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0"


def test_accuracy_estimate_bounds_hold_for_any_joint_outcome():
    """The bounds are the extreme cases: brute force over every split of 20 images into
    (teacher right?, student agrees?, student right when it disagrees) stays inside them."""
    from dfkd_deploy.validate.estimate import estimate_accuracy

    n = 20
    for t_right in range(n + 1):
        for agree in range(n + 1):
            e = estimate_accuracy(t_right / n, agree / n, agree / n, agree / n, 10)
            for both in range(max(0, t_right + agree - n), min(t_right, agree) + 1):   # agree & teacher right
                wrong_t_disagree = (n - agree) - (t_right - both)        # disagree & teacher wrong
                for s_right in range(0, max(wrong_t_disagree, 0) + 1):
                    acc = (both + s_right) / n
                    assert e["estimated_accuracy_low"] - 1e-9 <= acc <= e["estimated_accuracy_high"] + 1e-9
            assert e["estimated_accuracy_low"] <= e["estimated_accuracy"] <= e["estimated_accuracy_high"]
    wide = estimate_accuracy(0.8, 0.7, 0.5, 0.9, 10)
    assert wide["estimated_accuracy_low"] == pytest.approx(0.3) and wide["estimated_accuracy_high"] == 1.0
    assert wide["estimated_accuracy"] == pytest.approx(0.7 * 0.8 + 0.3 * 0.2 / 9)


def test_min_accuracy_without_data_gates_on_the_estimated_lower_bound():
    from dfkd_deploy.core.errors import UsageError
    from dfkd_deploy.validate.gate import check_options

    metrics = {"estimated_accuracy": 0.7, "estimated_accuracy_low": 0.55, "estimated_accuracy_high": 0.9}
    [c] = run_gate(metrics, min_accuracy=0.6)
    assert not c.passed and c.metric == "estimated_accuracy_low" and "interval" in c.message
    [c] = run_gate(metrics, min_accuracy=0.5)
    assert c.passed
    with pytest.raises(UsageError, match="--teacher-accuracy"):
        check_options(eval_data=None, min_accuracy=0.5, baseline=None, max_drop=None)
    check_options(eval_data=None, min_accuracy=0.5, baseline=None, max_drop=None, teacher_accuracy=0.9)


def test_cli_estimates_accuracy_from_the_teachers_own(monkeypatch, digits_teacher_onnx, student_and_recipe, tmp_path):
    stub = Estimator(["agree.pooled"], [0.0], 0.9, 0.05, calibration={"pairs": 3, "teachers": ["x", "y"]})
    monkeypatch.setattr(estimate_mod, "default_estimator", lambda: stub)
    student, recipe_file = student_and_recipe
    junit = tmp_path / "junit.xml"
    result = CliRunner().invoke(cli, ["validate", str(student), "--teacher", str(digits_teacher_onnx), "--recipe",
                                      str(recipe_file), "--teacher-accuracy", "0.95", "--min-accuracy", "0.9",
                                      "--junit", str(junit)])
    assert result.exit_code == 1, result.output           # lower bound 0.95 + 0.85 - 1 = 0.80 < 0.9
    assert "estimated real accuracy" in result.output and "80.0%" in result.output
    props = {p.get("name"): json.loads(p.get("value"))
             for p in ET.parse(junit).getroot().find("testsuite").find("properties")}
    assert props["estimated_accuracy.interval"] == pytest.approx([0.80, 1.0])
    assert props["estimated_accuracy"] == pytest.approx(0.9 * 0.95 + 0.1 * 0.05 / 9)


def test_unlabelled_user_images_switch_to_their_own_estimator(monkeypatch):
    """With --probe-data the estimate rests on the user images' agreement, through the estimator
    calibrated on them; without, on the synthetic sources."""
    from dfkd_deploy.validate.estimate import USER_FEATURES, default_estimator

    user = default_estimator(user=True)
    assert user is not None and user.features == list(USER_FEATURES) and all(c >= 0 for c in user.coef)
    assert user.half_width < default_estimator().half_width        # measured: far tighter
    seen = []
    monkeypatch.setattr(estimate_mod, "default_estimator", lambda user=False: seen.append(user) or None)
    from dfkd_deploy.validate import probes as probes_mod

    class Src:
        def __init__(self, name):
            self.name, self.pixels = name, torch.rand(4, 1, 8, 8)

        def __len__(self):
            return 4

    monkeypatch.setattr(probes_mod, "independent_sources", lambda *a, **k: [Src("fresh")])
    monkeypatch.setattr(probes_mod, "user_images", lambda *a, **k: Src("user"))

    class T:
        module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        spec = None

        @staticmethod
        def normalizer():
            return torch.nn.Identity()

    fn = lambda px: T.module(px)   # noqa: E731
    estimate_mod.estimate_agreement(T, fn, None, "cpu", seed=0, probe_data="imgs", show_progress=False)
    estimate_mod.estimate_agreement(T, fn, None, "cpu", seed=0, show_progress=False)
    assert seen == [True, False, False]
