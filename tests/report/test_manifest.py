"""manifest.json records hashes and versions; verify_manifest catches changed or missing files."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import pytest

from dfkd_deploy.report import verify_manifest, write_manifest


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "student.onnx").write_bytes(b"onnx bytes")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "student.pt").write_bytes(b"weights" * 100)
    return tmp_path


def test_manifest_contents(run_dir):
    manifest = write_manifest(run_dir, seed=7, artifacts=["student.onnx", "ckpt/student.pt"],
                              extra={"recipe": "recipe.yaml"})
    assert json.loads((run_dir / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 7 and manifest["extra"] == {"recipe": "recipe.yaml"}
    assert manifest["artifacts"]["student.onnx"] == {
        "sha256": hashlib.sha256(b"onnx bytes").hexdigest(), "bytes": 10}
    assert manifest["artifacts"]["ckpt/student.pt"]["bytes"] == 700
    versions = manifest["versions"]
    assert set(versions) == {"python", "torch", "torchvision", "onnx", "onnxruntime", "onnx2torch",
                             "numpy", "dfkd_deploy"}
    assert versions["torch"] and versions["numpy"] and versions["dfkd_deploy"] == "0.1.0"
    created = datetime.fromisoformat(manifest["created"])
    assert created.utcoffset() == timezone.utc.utcoffset(None)
    assert manifest["platform"]["system"]
    assert verify_manifest(run_dir) == []


def test_verify_catches_changes(run_dir):
    write_manifest(run_dir, seed=0, artifacts=["student.onnx", "ckpt/student.pt"])
    (run_dir / "student.onnx").write_bytes(b"ONNX bytes")            # same size, other content
    (run_dir / "ckpt" / "student.pt").unlink()
    problems = verify_manifest(run_dir)
    assert len(problems) == 2
    assert any("student.onnx" in p and "sha256" in p for p in problems)
    assert any("ckpt/student.pt" in p and "missing" in p for p in problems)

    (run_dir / "student.onnx").write_bytes(b"longer onnx bytes")
    assert any("size" in p for p in verify_manifest(run_dir))


def test_verify_without_manifest(tmp_path):
    assert verify_manifest(tmp_path) == [f"manifest.json missing in {tmp_path}"]
    (tmp_path / "manifest.json").write_text("{not json")
    assert "unreadable" in verify_manifest(tmp_path)[0]


@pytest.mark.parametrize("name, error", [
    ("absent.bin", FileNotFoundError), ("../outside", ValueError), ("/etc/passwd", ValueError),
    ("manifest.json", ValueError),
])
def test_bad_artifact_names(run_dir, name, error):
    with pytest.raises(error):
        write_manifest(run_dir, seed=0, artifacts=[name])
