import json
import shutil

from click.testing import CliRunner

from dfkd_deploy.cli import cli


def _verify(path):
    return CliRunner().invoke(cli, ["bundle", "verify", str(path)])


def test_bundle_contents(deploy_run):
    b = deploy_run.run_dir / "bundle"
    m = json.loads((b / "manifest.json").read_text())
    assert m["input"]["name"] == "input" and m["input"]["layout"] == "NCHW"
    # the fixture's recipe sets deploy.batch_profile to [2, 4, 16]
    assert m["input"]["shape_range"]["min"] == [2, 1, 8, 8] and m["input"]["shape_range"]["max"][0] == 16
    assert set(m["normalisation"]) >= {"mean", "std", "value_range"}
    assert m["classes"]["count"] == 10
    for f in ("student.onnx", "student.int8.onnx", "calibration.npz", "build_engine.sh", "README.md"):
        assert len(m["artifacts"][f]["sha256"]) == 64
    assert m["versions"]["onnxruntime"] and m["validation"]["int8"]["top1_agreement_vs_fp32"] is not None
    assert "bundle/manifest.json" in json.loads((deploy_run.run_dir / "manifest.json").read_text())["artifacts"]
    assert "Input contract" in (b / "README.md").read_text()


def test_verify_exit_codes(deploy_run, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(deploy_run.run_dir / "bundle", b)
    r = _verify(b)
    assert r.exit_code == 0, r.output
    assert "verified" in r.output
    onnx = b / "student.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    r = _verify(b)
    assert r.exit_code == 1 and "student.onnx" in r.output and "sha256" in r.output
    assert _verify(tmp_path / "nothing").exit_code == 2


def test_verify_reruns_figures(deploy_run, tmp_path):
    """A recorded figure that no longer holds is caught even when the hashes match."""
    from dfkd_deploy.core.io import sha256_file
    from dfkd_deploy.deploy.bundle import verify_bundle

    b = tmp_path / "bundle"
    shutil.copytree(deploy_run.run_dir / "bundle", b)
    m = json.loads((b / "manifest.json").read_text())
    import numpy as np

    with np.load(b / "calibration.npz") as npz:
        arrays = dict(npz)
    arrays["probe_logits_fp32"] = arrays["probe_logits_fp32"] + 1.0
    np.savez_compressed(b / "calibration.npz", **arrays)
    m["artifacts"]["calibration.npz"] = {"sha256": sha256_file(b / "calibration.npz"),
                                         "bytes": (b / "calibration.npz").stat().st_size}
    (b / "manifest.json").write_text(json.dumps(m))
    res = verify_bundle(b)
    assert not res.ok and "logits differ" in res.problems[0]


def test_recipe_batch_profile_and_calibration_reach_the_bundle(deploy_run):
    import json

    bundle = deploy_run.run_dir / "bundle"
    script = (bundle / "build_engine.sh").read_text()
    assert "--minShapes=input:2x1x8x8" in script and "--maxShapes=input:16x1x8x8" in script
    profile = json.loads((bundle / "manifest.json").read_text())["input"]["shape_range"]
    assert [profile["min"][0], profile["opt"][0], profile["max"][0]] == [2, 4, 16]
    assert deploy_run.report["int8"]["calibration_images"] == 48
