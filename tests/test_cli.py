"""The command line: every subcommand, exit codes (0 ok, 2 usage/input error), one-line errors."""
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from dfkd_deploy.cli import cli
from dfkd_deploy.report.report import REQUIRED_KEYS, get_path
from dfkd_deploy.report.manifest import verify_manifest

from .conftest import quick_recipe


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "quick.yaml"
    path.write_text(quick_recipe().resolved_yaml())
    return path


@pytest.fixture(scope="module")
def compressed(digits_teacher_onnx, digits_eval_npz, recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    result = run("compress", digits_teacher_onnx, "--recipe", recipe_file, "--eval-data", digits_eval_npz,
                 "--out", out, "--quiet", "--device", "cpu", "--bundle", out.parent / "handoff")
    assert result.exit_code == 0, result.output
    return out, result


def test_compress_writes_every_artifact_and_report_key(compressed):
    out, result = compressed
    for name in ("student.onnx", "student.pt", "recipe.resolved.yaml", "report.md", "manifest.json", "report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    for key in REQUIRED_KEYS:
        get_path(report, key)                      # present (KeyError otherwise)
    assert report["teacher"]["format"] == "onnx" and report["teacher"]["bn_layers"] == 3
    assert 0.5 < report["teacher"]["accuracy"] <= 1.0 and report["student"]["accuracy"] is not None
    assert report["fidelity"]["onnx_max_abs_diff"] < 1e-3 and report["fidelity"]["onnx_top1_agreement"] > 0.99
    assert report["synthesis"]["images"] == 4 * 32 and report["distillation"]["epochs"] == 4
    assert verify_manifest(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["versions"]["torch"]
    assert yaml.safe_load((out / "recipe.resolved.yaml").read_text())["distillation"]["epochs"] == 4
    assert "teacher accuracy" in result.output
    assert (out.parent / "handoff" / "manifest.json").is_file() and not (out / "bundle").exists()
    assert run("bundle", "verify", out.parent / "handoff").exit_code == 0


def test_compress_refuses_to_overwrite_a_run_and_resume_needs_one(compressed, digits_teacher_onnx, recipe_file, tmp_path):
    out, _ = compressed
    r = run("compress", digits_teacher_onnx, "--recipe", recipe_file, "--out", out, "--quiet")
    assert r.exit_code == 2 and "already holds a run" in r.output and "Traceback" not in r.output
    r = run("compress", digits_teacher_onnx, "--recipe", recipe_file, "--out", tmp_path / "new", "--resume")
    assert r.exit_code == 2 and "no checkpoint" in r.output


def test_same_seed_same_student(compressed, digits_teacher_onnx, recipe_file, tmp_path):
    out, _ = compressed
    r = run("compress", digits_teacher_onnx, "--recipe", recipe_file, "--out", tmp_path / "again", "--quiet",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    a = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "again" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_prints_plan_and_writes_nothing(digits_teacher_onnx, recipe_file, tmp_path):
    r = run("compress", digits_teacher_onnx, "--recipe", recipe_file, "--out", tmp_path / "dry", "--dry-run")
    assert r.exit_code == 0, r.output
    plan = yaml.safe_load(r.output)["plan"]
    assert plan["synthesis"]["images"] == 4 * 32 and plan["teacher"]["num_classes"] == 10
    assert not (tmp_path / "dry").exists()


def test_stage_commands(compressed, digits_teacher_onnx, digits_eval_npz, recipe_file, tmp_path):
    out, _ = compressed
    r = run("synthesize", digits_teacher_onnx, "--recipe", recipe_file, "--out", tmp_path / "pool", "--rounds", 2,
            "--quiet")
    assert r.exit_code == 0, r.output
    assert "64 images" in r.output
    r = run("distill", digits_teacher_onnx, "--recipe", recipe_file, "--pool", tmp_path / "pool",
            "--out", tmp_path / "kd", "--quiet", "--set", "distillation.epochs=2")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "kd" / "student.pt").is_file()
    r = run("export", tmp_path / "kd" / "student.pt", "--out", tmp_path / "s.onnx")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.onnx").is_file()
    for student in (out / "student.pt", out / "student.onnx"):
        r = run("validate", student, "--teacher", digits_teacher_onnx, "--recipe", recipe_file,
                "--eval-data", digits_eval_npz, "--probes", 32, "--json")
        assert r.exit_code == 0, r.output
        metrics = json.loads(r.output[r.output.index("{"):])
        assert 0 <= metrics["probe_agreement"] <= 1 and metrics["teacher_accuracy"] > 0.5


def test_inspect_and_list(digits_teacher_onnx):
    r = run("inspect", digits_teacher_onnx, "--json")
    assert r.exit_code == 0, r.output
    spec = json.loads(r.output)
    assert spec["format"] == "onnx" and spec["input_shape"] == [1, 8, 8] and spec["bn_layers"] == 3
    r = run("list", "students")
    assert r.exit_code == 0 and "cifar_resnet20" in r.output and "mobilenet_v2" in r.output


def test_export_teacher_keeps_bn_and_normalisation(tmp_path):
    from dfkd_deploy.models import build_model

    model = build_model("cifar_resnet8", num_classes=10)
    src = tmp_path / "t.pth"
    torch.save({"state_dict": model.state_dict()}, src)
    r = run("export-teacher", src, "--teacher-arch", "cifar_resnet8", "--out", tmp_path / "t.onnx")
    assert r.exit_code == 0, r.output
    r = run("inspect", tmp_path / "t.onnx", "--json")
    spec = json.loads(r.output)
    assert spec["bn_layers"] == 7 and spec["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.parametrize("args, message", [
    (["compress", "missing.onnx", "--dry-run"], "not found"),
    (["inspect", "{empty}"], "empty"),
    (["compress", "{teacher}", "--set", "synthesis.gsteps=3", "--dry-run"], "unknown key 'synthesis.gsteps'"),
    (["compress", "{teacher}", "--set", "student.arch=resnet9000", "--dry-run"], "unknown architecture"),
    (["compress", "{teacher}", "--recipe", "{missing_recipe}"], "recipe not found"),
    (["compress", "{teacher}", "--device", "cuda", "--out", "{tmp}/x"], None),
    (["validate", "{tmp}/nothing.pt", "--teacher", "{teacher}"], "student file not found"),
    (["distill", "{teacher}", "--pool", "{tmp}", "--out", "{tmp}/kd"], "not an image pool"),
    (["spline", "fit", "{tmp}/none.csv", "--target", "y"], "no such file"),
])
def test_input_errors_exit_2_with_one_line(args, message, digits_teacher_onnx, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    subst = {"{teacher}": str(digits_teacher_onnx), "{empty}": str(tmp_path / "empty.onnx"),
             "{missing_recipe}": str(tmp_path / "nope.yaml"), "{tmp}": str(tmp_path)}
    args = [next((a.replace(k, v) for k, v in subst.items() if k in a), a) for a in args]
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.strip().count("\n") == 0
    assert r.output.startswith("error: ")
    if message:
        assert message in r.output


def test_click_usage_error_exits_2():
    r = run("compress")
    assert r.exit_code == 2 and "Missing argument" in r.output


def test_debug_shows_the_traceback(tmp_path):
    r = CliRunner().invoke(cli, ["--debug", "inspect", str(tmp_path / "none.onnx")])
    assert r.exit_code != 0 and r.exception is not None   # raised, not swallowed
