import subprocess

import pytest

from dfkd_deploy.core.errors import ExportError
from exporters import tensorrt as trt_mod


def test_profile_shapes_and_layouts():
    p = trt_mod.make_profile((3, 32, 32), "NCHW", (1, 8, 32))
    assert p.min == (1, 3, 32, 32) and p.opt == (8, 3, 32, 32) and p.max == (32, 3, 32, 32)
    assert trt_mod.make_profile((3, 32, 32), "NHWC", (1, 4, 16)).max == (16, 32, 32, 3)
    with pytest.raises(ExportError):
        trt_mod.make_profile((3, 32, 32), "NCHW", (8, 1, 32))


def test_trtexec_and_polygraphy_commands():
    p = trt_mod.make_profile((1, 8, 8), "NCHW", (1, 8, 32))
    fp32 = trt_mod.trtexec_command("student.onnx", "s.engine", p, "fp32")
    assert "--minShapes=input:1x1x8x8" in fp32 and "--optShapes=input:8x1x8x8" in fp32
    assert "--maxShapes=input:32x1x8x8" in fp32 and "--timingCacheFile=timing.cache" in fp32
    assert "--fp16" not in fp32 and "--int8" not in fp32
    assert "--fp16" in trt_mod.trtexec_command("student.onnx", "s.engine", p, "fp16")
    int8 = trt_mod.trtexec_command("student.onnx", "s.engine", p, "int8", calib_cache="c.cache")
    assert "--int8" in int8 and "--calib=c.cache" in int8
    with pytest.raises(ExportError):
        trt_mod.trtexec_command("a", "b", p, "int4")
    poly = trt_mod.polygraphy_int8_command("student.onnx", "s.engine", p)
    assert poly[:3] == ["polygraphy", "convert", "student.onnx"] and "input:[32,1,8,8]" in poly
    assert "--data-loader-script" in poly and "--int8" in poly


def test_absent_tensorrt_writes_script(tmp_path, monkeypatch, deploy_run):
    monkeypatch.setattr(trt_mod, "tensorrt_module", lambda: None)
    res = trt_mod.build_engines(tmp_path, deploy_run.run_dir / "student.onnx", input_shape=(1, 8, 8),
                                int8_onnx=deploy_run.run_dir / "student.int8.onnx")
    assert not res.available and res.message == trt_mod.MISSING_MESSAGE and not res.engines
    script = tmp_path / "build_engine.sh"
    assert script.is_file() and script.stat().st_mode & 0o111
    text = script.read_text()
    assert "--onnx=student.int8.onnx" in text and "--minShapes=input:1x1x8x8" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    compile((tmp_path / "calib_loader.py").read_text(), "calib_loader.py", "exec")


def test_run_records_absence(deploy_run):
    trt = deploy_run.report["tensorrt"]
    if trt["available"]:
        pytest.skip("TensorRT is installed here")
    assert trt["message"] == trt_mod.MISSING_MESSAGE and trt["script"] == "build_engine.sh"
    assert (deploy_run.run_dir / "bundle" / "build_engine.sh").is_file()
    assert trt_mod.MISSING_MESSAGE in (deploy_run.run_dir / "report.md").read_text()


def test_calib_loader_reads_bundle(deploy_run, monkeypatch):
    import runpy

    import numpy as np

    monkeypatch.chdir(deploy_run.run_dir / "bundle")
    batches = list(runpy.run_path("calib_loader.py")["load_data"]())
    x = np.concatenate([b["input"] for b in batches])
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
