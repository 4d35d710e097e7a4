"""The edge runtimes in the hand-off: OpenVINO IR and ExecuTorch programs in the bundle (hashed,
versioned, named in the README), in the back-end comparison and latency tables, and rerun by
``bundle verify`` (one line per runtime that is not installed). Runtimes that are not installed
here are skipped with the reason."""
import json
import shutil

import pytest

from dfkd_deploy.deploy import edge
from dfkd_deploy.deploy.bundle import verify_bundle

OV_FILES = ["student.xml", "student.bin", "student.fp16.xml", "student.fp16.bin", "student.int8.xml",
            "student.int8.bin"]
ET_FILES = ["student.pte", "student.int8.pte"]


def _needs(runtime):
    if not edge.installed(runtime):
        pytest.skip(f"{runtime} not installed (pip install 'dfkd-deploy[{runtime}]')")


def _manifest(run):
    return json.loads((run.run_dir / "bundle" / "manifest.json").read_text())


@pytest.mark.parametrize("runtime,files", [("openvino", OV_FILES), ("executorch", ET_FILES)])
def test_bundle_carries_each_runtime(deploy_run, runtime, files):
    _needs(runtime)
    m = _manifest(deploy_run)
    for f in files:
        assert len(m["artifacts"][f]["sha256"]) == 64
    section = m["runtimes"]
    assert section["versions"][runtime] and runtime not in section["skipped"]
    entries = [f for f in section["files"] if f["runtime"] == runtime]
    assert {f["precision"] for f in entries} == ({"fp32", "fp16", "int8"} if runtime == "openvino" else {"fp32", "int8"})
    for f in entries:
        assert f["probe_agreement_vs_fp32"] >= (0.99 if f["precision"] != "int8" else 0.8)
    readme = (deploy_run.run_dir / "bundle" / "README.md").read_text()
    assert all(f"`{f}`" in readme for f in files)


@pytest.mark.parametrize("runtime", ["openvino", "executorch"])
def test_runtime_in_comparison_and_latency(deploy_run, runtime):
    _needs(runtime)
    report = json.loads((deploy_run.run_dir / "report.json").read_text())
    rows = [r for r in report["comparison"]["rows"] if r["backend"] == runtime]
    assert {r["data"].split(" (")[0] for r in rows} == {"synthetic probes", "eval data"}
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    assert fp32 and all(r["passed"] for r in fp32)
    assert all(r["accuracy"] is not None for r in rows if r["data"].startswith("eval"))
    timed = [b for b in report["latency"]["backends"] if b["backend"] == runtime]
    assert timed and all(b["error"] is None and b["batch_1_ms"] > 0 and b["bytes"] > 0 for b in timed)
    md = (deploy_run.run_dir / "report.md").read_text()
    assert f"{runtime} int8" in md


@pytest.mark.parametrize("runtime", ["openvino", "executorch"])
def test_verify_reruns_each_runtime(deploy_run, tmp_path, runtime):
    _needs(runtime)
    res = verify_bundle(deploy_run.run_dir / "bundle")
    assert res.ok, res.problems
    files = [f["file"] for f in _manifest(deploy_run)["runtimes"]["files"] if f["runtime"] == runtime]
    assert all(f"{f} top-1 agreement" in res.checks for f in files)


def test_verify_catches_a_runtime_file_that_no_longer_agrees(deploy_run, tmp_path):
    """The recorded agreement is rechecked, not just the hash: a manifest claiming more fails."""
    m = _manifest(deploy_run)
    present = [f for f in m["runtimes"]["files"] if edge.installed(f["runtime"])]
    if not present:
        pytest.skip("no edge runtime installed")
    b = tmp_path / "bundle"
    shutil.copytree(deploy_run.run_dir / "bundle", b)
    # A wrong logit reference: every fp32 runtime file must then fail its elementwise check.
    import numpy as np

    from dfkd_deploy.images import uint8_to_model

    with np.load(b / "calibration.npz") as npz:
        probes = uint8_to_model(npz["probes"], npz["mean"], npz["std"], float(npz["value_range"]))
        recorded = npz["probe_logits_fp32"]
    problems, checks, _ = edge.rerun_runtimes(b, m, probes, recorded + 1.0)
    fp32_files = {f["file"] for f in present if f["precision"] == "fp32"}
    assert fp32_files and all(any(f in p and "differ" in p for p in problems) for f in fp32_files)
    assert set(checks) == {f["file"] for f in present}


def test_verify_skips_runtimes_not_installed(deploy_run, monkeypatch):
    monkeypatch.setattr(edge, "installed", lambda runtime: False)
    res = verify_bundle(deploy_run.run_dir / "bundle")
    assert res.ok, res.problems
    for f in _manifest(deploy_run)["runtimes"]["files"]:
        assert "not installed here" in res.checks[f"{f['file']} skipped"]


def test_runtime_not_installed_is_skipped_with_a_line(monkeypatch, tmp_path):
    """build_edge without the packages: nothing built, one line per runtime, no error."""
    import numpy as np
    from torch import nn

    from dfkd_deploy.runtime import executorch as et_runtime
    from exporters import openvino as ov_export

    monkeypatch.setattr(ov_export, "openvino_module", lambda: None)
    monkeypatch.setattr(edge, "executorch_runtime", lambda: None)
    monkeypatch.setattr(et_runtime, "executorch_runtime", lambda: None)

    class Spec:
        layout, input_shape = "NCHW", (1, 4, 4)

    x = np.zeros((2, 1, 4, 4), np.float32)
    built = edge.build_edge(tmp_path, student=nn.Flatten(), student_onnx=tmp_path / "none.onnx", calibration=x,
                            probes=x, probe_logits_fp32=np.zeros((2, 16), np.float32), spec=Spec())
    assert built.files == [] and built.runners == []
    assert "OpenVINO is not installed" in built.skipped["openvino"]
    assert "ExecuTorch is not installed" in built.skipped["executorch"]
    assert all("\n" not in line for line in built.skipped.values())
