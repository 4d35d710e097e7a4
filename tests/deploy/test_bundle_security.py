"""`bundle verify` against rewritten bundles (issue 14.3): file set, paths, symlinks, signatures."""
from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from dfkd_deploy.cli import cli
from dfkd_deploy.core.io import sha256_file

INTEGRITY_ONLY = "integrity against accidents only, not authenticity"


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def bundle(deploy_run, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(deploy_run.run_dir / "bundle", b)
    return b


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    pytest.importorskip("cryptography", reason="signing needs the sign extra (cryptography)")
    out = tmp_path_factory.mktemp("keys")
    r = _cli("bundle", "keygen", "--out", out)
    assert r.exit_code == 0, r.output
    return out / "private.pem", out / "public.pem"


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory):
    pytest.importorskip("cryptography", reason="signing needs the sign extra (cryptography)")
    from dfkd_deploy.deploy.signing import generate_keys

    pair = generate_keys(tmp_path_factory.mktemp("other-keys"))
    return pair.private, pair.public


@pytest.fixture
def signed(bundle, keys):
    r = _cli("bundle", "sign", bundle, "--key", keys[0])
    assert r.exit_code == 0, r.output
    assert (bundle / "manifest.sig").is_file()
    return bundle


def _manifest(b):
    return json.loads((b / "manifest.json").read_text())


def _write_manifest(b, m):
    (b / "manifest.json").write_text(json.dumps(m, indent=2))


def _rehash(b, *names):
    """What an attacker does after changing files: rewrite their hashes in the manifest."""
    m = _manifest(b)
    for n in names:
        m["artifacts"][n] = {"sha256": sha256_file(b / n), "bytes": (b / n).stat().st_size}
    _write_manifest(b, m)


def _class3_model(path, num_classes=10, features=64):
    """An ONNX model with the student's input/output names that answers class 3 to everything."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((features, num_classes), np.float32), "w")
    bias = np.zeros(num_classes, np.float32)
    bias[3] = 10.0
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["logits"])],
        "class3", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[weight, numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _plant_class3_student(b):
    """Replace both models with the class-3 one and rewrite the recorded logits and hashes to match."""
    from dfkd_deploy.images import uint8_to_model
    from dfkd_deploy.runtime.onnxruntime import OrtRunner

    _class3_model(b / "student.onnx")
    shutil.copy(b / "student.onnx", b / "student.int8.onnx")
    with np.load(b / "calibration.npz") as npz:
        arrays = dict(npz)
    probes = uint8_to_model(arrays["probes"], arrays["mean"], arrays["std"], float(arrays["value_range"]))
    logits = OrtRunner(b / "student.onnx", layout="NCHW").predict(probes)
    assert (logits.argmax(1) == 3).all()
    arrays["probe_logits_fp32"] = logits.astype(np.float32)
    np.savez_compressed(b / "calibration.npz", **arrays)
    _rehash(b, "student.onnx", "student.int8.onnx", "calibration.npz")


# --- the cases of the issue --------------------------------------------------------------------

def test_unsigned_verify_says_it_proves_integrity_only(bundle):
    r = _cli("bundle", "verify", bundle)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if INTEGRITY_ONLY in line]
    assert len(lines) == 1, r.output


def test_class3_model_with_rewritten_hashes_and_logits_fails_against_the_key(signed, keys, monkeypatch):
    from dfkd_deploy.deploy import edge

    # Where OpenVINO/ExecuTorch are installed their untouched files disagree with the planted model,
    # but an attacker rewrites those too: the case that matters is a machine without them.
    monkeypatch.setattr(edge, "installed", lambda runtime: False)
    _plant_class3_student(signed)
    unsigned = _cli("bundle", "verify", signed)   # consistent hashes: all an unsigned check can see
    assert unsigned.exit_code == 0 and INTEGRITY_ONLY in unsigned.output, unsigned.output
    r = _cli("bundle", "verify", signed, "--key", keys[1])
    assert r.exit_code == 1, r.output
    assert "signature does not match" in r.output and "INVALID" in r.output


def test_calib_loader_payload_with_rewritten_hash_fails_against_the_key(signed, keys):
    loader = signed / "calib_loader.py"
    loader.write_text(loader.read_text() + "\nimport os; os.system('touch /tmp/pwned')\n")
    _rehash(signed, "calib_loader.py")
    r = _cli("bundle", "verify", signed, "--key", keys[1])
    assert r.exit_code == 1 and "signature does not match" in r.output, r.output


def test_calib_loader_payload_without_rewritten_hash_fails_without_key(bundle):
    loader = bundle / "calib_loader.py"
    loader.write_text(loader.read_text() + "\nimport os; os.system('touch /tmp/pwned')\n")
    r = _cli("bundle", "verify", bundle)
    assert r.exit_code == 1 and "FAIL calib_loader.py: size" in r.output, r.output


@pytest.mark.parametrize("name", ["calib_loader.py", "build_engine.sh", "student.int8.onnx"])
def test_file_dropped_from_manifest_fails(bundle, name):
    m = _manifest(bundle)
    del m["artifacts"][name]
    _write_manifest(bundle, m)
    r = _cli("bundle", "verify", bundle)
    assert r.exit_code == 1, r.output
    assert f"FAIL {name}: a bundle of version 1 has it" in r.output
    assert f"FAIL {name}: in the bundle but not listed" in r.output


def test_file_dropped_from_manifest_and_disk_fails(bundle):
    m = _manifest(bundle)
    del m["artifacts"]["calib_loader.py"]
    _write_manifest(bundle, m)
    (bundle / "calib_loader.py").unlink()
    r = _cli("bundle", "verify", bundle)
    assert r.exit_code == 1 and "calib_loader.py: a bundle of version 1 has it" in r.output, r.output


def test_unlisted_file_fails(bundle):
    (bundle / "run_me.sh").write_text("#!/bin/sh\necho hi\n")
    (bundle / "sub").mkdir()
    (bundle / "sub" / "x.py").write_text("print(1)\n")
    r = _cli("bundle", "verify", bundle)
    assert r.exit_code == 1, r.output
    assert "run_me.sh: in the bundle but not listed" in r.output
    assert "sub/x.py: in the bundle but not listed" in r.output


def test_unknown_name_listed_with_its_hash_fails(bundle):
    (bundle / "extra.py").write_text("print(1)\n")
    _rehash(bundle, "extra.py")
    r = _cli("bundle", "verify", bundle)
    assert r.exit_code == 1 and "extra.py: listed in manifest.json but not a file a bundle" in r.output, r.output


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "./README.md", "a//b", "..\\x"])
def test_manifest_paths_outside_are_refused_and_not_read(bundle, name):
    m = _manifest(bundle)
    m["artifacts"][name] = {"sha256": "0" * 64, "bytes": 1}
    _write_manifest(bundle, m)
    r = _cli("bundle", "verify", bundle)
    assert r.exit_code == 1, r.output
    assert "refused, not read" in r.output
    assert "size" not in r.output and "bytes" not in r.output   # nothing about the named file is shown


def test_verify_manifest_refuses_traversal_in_a_run_manifest(tmp_path):
    from dfkd_deploy.report.manifest import verify_manifest, write_manifest

    (tmp_path / "a.txt").write_text("a")
    write_manifest(tmp_path, seed=0, artifacts=["a.txt"])
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["artifacts"]["../../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    problems = verify_manifest(tmp_path)
    assert len(problems) == 1 and "refused, not read" in problems[0] and "size" not in problems[0]


def test_listed_symlink_pointing_outside_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.md"
    outside.write_text("# another README\n")
    (bundle / "README.md").unlink()
    os.symlink(outside, bundle / "README.md")
    _rehash(bundle, "README.md")
    r = _cli("bundle", "verify", bundle)
    assert r.exit_code == 1 and "README.md: resolves outside the directory" in r.output, r.output


def test_unlisted_symlinked_folder_is_refused(bundle, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", bundle / "engines")
    r = _cli("bundle", "verify", bundle)
    assert r.exit_code == 1 and "engines: in the bundle but not listed" in r.output, r.output


def test_symlink_inside_the_bundle_to_a_file_inside_is_allowed(bundle):
    from dfkd_deploy.report.manifest import path_problem

    assert path_problem(bundle, "README.md") is None
    (bundle / "README.md").rename(bundle / "readme.txt")
    os.symlink("readme.txt", bundle / "README.md")
    assert path_problem(bundle, "README.md") is None


# --- signing -----------------------------------------------------------------------------------

def test_keygen_modes_and_no_overwrite(keys):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in public.read_bytes()
    r = _cli("bundle", "keygen", "--out", private.parent)
    assert r.exit_code == 2 and "does not overwrite" in r.output


def test_sign_verify_round_trip(signed, keys):
    r = _cli("bundle", "verify", signed, "--key", keys[1])
    assert r.exit_code == 0, r.output
    assert "signature" in r.output and "valid (Ed25519 key" in r.output and INTEGRITY_ONLY not in r.output


def test_tampered_model_after_signing_fails(signed, keys):
    onnx = signed / "student.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    r = _cli("bundle", "verify", signed, "--key", keys[1])
    assert r.exit_code == 1 and "student.onnx: sha256 mismatch" in r.output, r.output
    _rehash(signed, "student.onnx")
    r = _cli("bundle", "verify", signed, "--key", keys[1])
    assert r.exit_code == 1 and "signature does not match" in r.output, r.output


def test_tampered_manifest_after_signing_fails(signed, keys):
    m = _manifest(signed)
    m["validation"]["int8"]["top1_agreement_vs_fp32"] = 0.0   # lower the bar the int8 model must meet
    _write_manifest(signed, m)
    r = _cli("bundle", "verify", signed, "--key", keys[1])
    assert r.exit_code == 1 and "signature does not match" in r.output, r.output


def test_wrong_key_fails(signed, other_keys):
    r = _cli("bundle", "verify", signed, "--key", other_keys[1])
    assert r.exit_code == 1 and "signature does not match" in r.output, r.output


def test_missing_or_malformed_signature_fails_with_key(bundle, keys):
    r = _cli("bundle", "verify", bundle, "--key", keys[1])
    assert r.exit_code == 1 and "manifest.sig missing" in r.output, r.output
    (bundle / "manifest.sig").write_text("not base64 !!\n")
    r = _cli("bundle", "verify", bundle, "--key", keys[1])
    assert r.exit_code == 1 and "malformed" in r.output, r.output


def test_bad_key_files_are_input_errors(signed, keys, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    for args in (("verify", signed, "--key", junk), ("verify", signed, "--key", keys[0]),
                 ("verify", signed, "--key", tmp_path / "absent.pem"), ("sign", signed, "--key", keys[1])):
        r = _cli("bundle", *args)
        assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: "), (args, r.output)


def test_sign_refuses_a_bundle_that_does_not_verify(bundle, keys):
    (bundle / "extra.sh").write_text("echo\n")
    r = _cli("bundle", "sign", bundle, "--key", keys[0])
    assert r.exit_code == 2 and "not signed" in r.output and "extra.sh" in r.output, r.output
    assert not (bundle / "manifest.sig").exists()


def test_resealing_drops_a_stale_signature(signed):
    """A rewritten manifest (a new run into the same bundle) never keeps the old signature."""
    from types import SimpleNamespace

    from dfkd_deploy.deploy.bundle import StagedBundle, seal_bundle
    from exporters.tensorrt import TrtResult

    m = _manifest(signed)
    staged = StagedBundle(signed, [n for n in m["artifacts"] if n != "README.md"], TrtResult(**m["tensorrt"]),
                          has_int8=True)
    norm = m["normalisation"]
    spec = SimpleNamespace(layout=m["input"]["layout"], input_shape=m["input"]["shape"][1:], mean=norm["mean"],
                           std=norm["std"], value_range=norm["value_range"], channel_order=norm["channel_order"],
                           num_classes=m["classes"]["count"], source=m["teacher"]["source"],
                           format=m["teacher"]["format"])
    seal_bundle(staged, spec=spec, validation=m["validation"], seed=m["seed"], runtimes=m.get("runtimes"))
    assert not (signed / "manifest.sig").exists()
    assert _cli("bundle", "verify", signed).exit_code == 0


def test_compress_refuses_a_bad_sign_key_before_running(tmp_path, keys):
    r = _cli("compress", tmp_path / "teacher.onnx", "--out", tmp_path / "run", "--sign-key", keys[1])
    assert r.exit_code == 2 and "not a PEM private key" in r.output, r.output
    assert not (tmp_path / "run").exists()
