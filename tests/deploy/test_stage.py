"""The hand-off stage's typed result: what goes in, what report.json gets, what report.md renders."""
import json

from dfkd_deploy.deploy.results import BundleInfo, Int8Result, RunFigures
from dfkd_deploy.report.deploy_md import deploy_report_md

SECTIONS = ("int8", "comparison", "latency", "size", "tensorrt", "bundle")


def test_run_figures_from_evaluation():
    e = {"student_accuracy": 0.9, "teacher_accuracy": 0.95, "onnx_accuracy": 0.9, "agreement": 0.93}
    assert RunFigures.from_evaluation(e, 0.5).to_dict() == {
        "student_accuracy": 0.9, "teacher_accuracy": 0.95, "onnx_accuracy": 0.9, "agreement_top1": 0.93}
    # no eval data: the agreement on synthetic probes stands in
    assert RunFigures.from_evaluation(None, 0.5).to_dict() == {
        "student_accuracy": None, "teacher_accuracy": None, "onnx_accuracy": None, "agreement_top1": 0.5}


def test_int8_without_a_file_says_why():
    r = Int8Result(error="INT8 quantization failed: boom")
    assert not r.produced and r.validation() is None
    assert r.to_dict() == {"file": None, "error": "INT8 quantization failed: boom"}
    md = deploy_report_md({"int8": r.to_dict()})
    assert "Not produced: INT8 quantization failed: boom" in md


def test_bundle_info_lists_files_sorted(tmp_path):
    assert BundleInfo(tmp_path, ["b", "a"]).to_dict() == {"path": str(tmp_path), "files": ["a", "b"]}


def test_run_sections_and_report_md_render_them(deploy_run):
    report = json.loads((deploy_run.run_dir / "report.json").read_text())
    for key in SECTIONS:
        assert key in report, key
    int8 = report["int8"]
    assert int8["file"] == "student.int8.onnx" and int8["accuracy"] is not None   # from the comparison
    comp = report["comparison"]
    assert comp["reference"] == "torch fp32 (CPU)"
    assert comp["passed"] == all(r["passed"] is not False for r in comp["rows"])
    assert report["bundle"]["files"] == sorted(report["bundle"]["files"]) and "manifest.json" not in report["bundle"]["files"]
    manifest = json.loads((deploy_run.run_dir / "bundle" / "manifest.json").read_text())
    assert manifest["validation"]["int8"]["accuracy"] == int8["accuracy"]
    assert manifest["validation"]["comparison"] == report["comparison"]["rows"]
    # report.md's hand-off part is rendered from report.json's sections alone
    md = (deploy_run.run_dir / "report.md").read_text()
    assert deploy_report_md({k: report[k] for k in SECTIONS}) in md
