import json
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from dfkd_deploy.validate import gate
from dfkd_deploy.cli import cli
from dfkd_deploy.core.errors import DataError, UsageError


def _validate(deploy_run, recipe, *args):
    return CliRunner().invoke(cli, ["validate", str(deploy_run.run_dir / "student.onnx"), "--teacher",
                                    deploy_run.report["teacher"]["source"], "--recipe", str(recipe),
                                    "--probes", "32", *map(str, args)])


def _cases(path):
    suite = ET.parse(path).getroot().find("testsuite")
    return suite, {c.get("name"): c for c in suite.findall("testcase")}


def test_exit_0_all_thresholds_hold(deploy_run, quick_recipe_file, digits_eval_npz, tmp_path):
    junit = tmp_path / "gate.xml"
    base = deploy_run.run_dir / "report.json"
    r = _validate(deploy_run, quick_recipe_file, "--eval-data", digits_eval_npz, "--min-agreement", 0,
                  "--min-accuracy", 0, "--baseline", base, "--max-drop", 100, "--junit", junit)
    assert r.exit_code == 0, r.output
    suite, cases = _cases(junit)
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    assert {"min_agreement", "min_accuracy", "max_drop.student_accuracy", "max_drop.eval_agreement"} == set(cases)


def test_exit_1_names_the_failed_threshold(deploy_run, quick_recipe_file, digits_eval_npz, tmp_path):
    junit = tmp_path / "gate.xml"
    r = _validate(deploy_run, quick_recipe_file, "--eval-data", digits_eval_npz, "--min-agreement", 0,
                  "--min-accuracy", 1.0, "--junit", junit)
    assert r.exit_code == 1, r.output
    assert "FAIL min_accuracy" in r.output and "by" in r.output and "PASS min_agreement" in r.output
    suite, cases = _cases(junit)
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    assert cases["min_accuracy"].find("failure") is not None and cases["min_agreement"].find("failure") is None


@pytest.mark.parametrize("args", [["--min-accuracy", "0.5"],                 # accuracy without eval data
                                  ["--min-agreement", "1.5"],                 # not a fraction
                                  ["--baseline", "missing.json", "--max-drop", "1"]])
def test_exit_2_usage_errors(deploy_run, quick_recipe_file, tmp_path, args):
    junit = tmp_path / "gate.xml"
    r = _validate(deploy_run, quick_recipe_file, *args, "--junit", junit)
    assert r.exit_code == 2, r.output
    if junit.exists():   # our own input errors leave an errored JUnit case; click's option errors cannot
        suite, cases = _cases(junit)
        assert suite.get("errors") == "1" and cases["inputs"].find("error") is not None


def test_run_gate_baseline_units(tmp_path):
    # No eval data: --min-agreement holds the estimate's lower bound, never raw probe agreement;
    # a baseline compares estimate with estimate.
    m = {"probe_agreement": 0.95, "estimated_agreement": 0.80, "estimated_agreement_low": 0.70,
         "estimated_agreement_high": 0.90, "eval_agreement": None, "student_accuracy": None}
    checks = gate.run_gate(m, min_agreement=0.75, baseline={"estimated_agreement": 0.83}, max_drop=2.0)
    assert [c.passed for c in checks] == [False, False]
    assert checks[0].metric == "estimated_agreement_low" and "by 5.00 pts" in checks[0].message
    assert "drop 3.00 pts" in checks[1].message
    assert gate.run_gate(m, min_agreement=0.65)[0].passed
    assert gate.run_gate(m, baseline={"estimated_agreement": 0.81}, max_drop=2.0)[0].passed
    with pytest.raises(DataError):   # nothing comparable
        gate.run_gate(m, baseline={"student_accuracy": 0.9}, max_drop=1.0)
    with pytest.raises(UsageError):
        gate.check_options(eval_data=None, min_accuracy=None, baseline="x.json", max_drop=None)
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"probe_agreement": 0.9}))
    assert gate.load_baseline(p)["probe_agreement"] == 0.9
