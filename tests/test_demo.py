"""The built-in default run: the README's first command. It must keep its promise."""
import pytest


@pytest.mark.slow
def test_demo_student_reaches_90_percent_of_teacher(tmp_path, monkeypatch):
    from dfkd_deploy.demo import run_demo

    monkeypatch.setenv("DFKD_DEPLOY_CACHE", str(tmp_path / "cache"))
    res = run_demo(tmp_path / "demo", show_progress=False)
    assert res["teacher_accuracy"] > 0.95
    assert res["student_accuracy"] >= 0.9 * res["teacher_accuracy"]
    assert res["student_params"] < res["teacher_params"] / 10
    assert (tmp_path / "cache" / "digits-teacher-v1.onnx").is_file()   # cached for the next run
    for name in ("student.onnx", "report.json", "manifest.json"):
        assert (tmp_path / "demo" / name).is_file()
