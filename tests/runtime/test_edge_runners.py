"""OpenVINO and ExecuTorch: export of one tiny model, runner predictions agreeing with torch, the
timing path, and one clear line where a runtime is absent. Skipped (with the reason) where the
optional extra is not installed."""
import numpy as np
import pytest
import torch
from torch import nn

from dfkd_deploy.core.errors import ExportError
from dfkd_deploy.runtime import TorchRunner
from dfkd_deploy.runtime import executorch as et_runtime
from dfkd_deploy.runtime import openvino as ov_runtime
from exporters.onnx_export import export_student_onnx

CHW = (2, 5, 7)   # non-square, so a permute that swaps H and W cannot pass by accident

needs_openvino = pytest.mark.skipif(ov_runtime.openvino_module() is None,
                                    reason="openvino not installed (pip install 'dfkd-deploy[openvino]')")
needs_executorch = pytest.mark.skipif(et_runtime.executorch_runtime() is None,
                                      reason="executorch not installed (pip install 'dfkd-deploy[executorch]')")


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 7, 3)).eval()


def _inputs(n, seed):
    return np.random.default_rng(seed).standard_normal((n, *CHW), dtype=np.float32)


@pytest.fixture(scope="module")
def openvino_files(tmp_path_factory):
    from exporters.openvino import convert_openvino

    if ov_runtime.openvino_module() is None:
        pytest.skip("openvino not installed")
    model, out = _tiny(), tmp_path_factory.mktemp("ov")
    onnx = export_student_onnx(model, out / "nhwc.onnx", input_shape=CHW, layout="NHWC").path
    return model, out, convert_openvino(onnx, out, calibration=_inputs(48, 1), layout="NHWC")


@needs_openvino
def test_openvino_ir_of_each_precision_agrees_with_torch(openvino_files):
    from dfkd_deploy.runtime.openvino import OpenVinoRunner

    model, out, res = openvino_files
    assert res.errors == {} and set(res.files) == {"fp32", "fp16", "int8"} and res.calibration_images == 48
    assert all((out / f).is_file() for f in res.all_files()) and len(res.all_files()) == 6
    x = _inputs(20, 2)
    want = TorchRunner(model).predict(x)
    for precision, tol in (("fp32", 1e-5), ("fp16", 1e-2)):
        runner = OpenVinoRunner(out / res.files[precision], layout="NHWC", precision=precision, batch_size=8)
        assert runner.input_shape == CHW          # read from the IR's (N, H, W, C) input
        np.testing.assert_allclose(runner.predict(x), want, atol=tol, rtol=tol)
    int8 = OpenVinoRunner(out / res.files["int8"], layout="NHWC", precision="int8").predict(x)
    assert int8.shape == want.shape and (int8.argmax(1) == want.argmax(1)).mean() >= 0.8


@needs_openvino
def test_openvino_timing_and_threads(openvino_files):
    from dfkd_deploy.deploy.latency import time_backend
    from dfkd_deploy.runtime.openvino import OpenVinoRunner

    _, out, res = openvino_files
    runner = OpenVinoRunner(out / res.files["int8"], layout="NHWC", precision="int8", threads=1)
    assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    row = time_backend(runner, batches=(1, 3), warmup=1, repeats=2)
    assert row["error"] is None and row["batch_1_ms"] > 0 and row["batch_3_ms"] > 0
    # the IR's size counts its weights file
    assert row["bytes"] == sum((out / f).stat().st_size for f in ("student.int8.xml", "student.int8.bin"))


def test_openvino_int8_needs_synthetic_calibration(tmp_path):
    from exporters.openvino import convert_openvino

    if ov_runtime.openvino_module() is None:
        pytest.skip("openvino not installed")
    onnx = export_student_onnx(_tiny(), tmp_path / "m.onnx", input_shape=CHW).path
    res = convert_openvino(onnx, tmp_path, calibration=None, precisions=("fp32", "int8"))
    assert set(res.files) == {"fp32"} and "calibration" in res.errors["int8"]


def test_missing_runtimes_are_one_line(monkeypatch, tmp_path):
    from exporters import executorch as et_export
    from exporters import openvino as ov_export

    monkeypatch.setattr(ov_runtime, "openvino_module", lambda: None)
    monkeypatch.setattr(ov_export, "openvino_module", lambda: None)
    monkeypatch.setattr(et_runtime, "executorch_runtime", lambda: None)
    monkeypatch.setattr(et_export, "executorch_version", lambda: None)
    for make, match in ((lambda: ov_runtime.OpenVinoRunner(tmp_path / "m.xml"), "OpenVINO is not installed"),
                        (lambda: et_runtime.ExecuTorchRunner(tmp_path / "m.pte"), "ExecuTorch is not installed"),
                        (lambda: ov_export.convert_openvino(tmp_path / "m.onnx", tmp_path), "OpenVINO is not installed"),
                        (lambda: et_export.export_executorch(_tiny(), tmp_path, input_shape=CHW),
                         "ExecuTorch is not installed")):
        with pytest.raises(ExportError, match=match) as info:
            make()
        assert "\n" not in str(info.value)


@needs_openvino
def test_openvino_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<net>")
    with pytest.raises(ExportError, match="OpenVINO cannot load bad.xml") as info:
        ov_runtime.OpenVinoRunner(bad)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def executorch_files(tmp_path_factory):
    from exporters.executorch import export_executorch

    if et_runtime.executorch_runtime() is None:
        pytest.skip("executorch not installed")
    model, out = _tiny(), tmp_path_factory.mktemp("et")
    return model, out, export_executorch(model, out, input_shape=CHW, calibration=_inputs(48, 1), max_batch=8)


@needs_executorch
def test_executorch_programs_agree_with_torch(executorch_files):
    from dfkd_deploy.runtime.executorch import ExecuTorchRunner

    model, out, res = executorch_files
    assert res.errors == {} and res.files == {"fp32": "student.pte", "int8": "student.int8.pte"}
    x = _inputs(20, 2)                             # more than max_batch: predict splits it
    want = TorchRunner(model).predict(x)
    fp32 = ExecuTorchRunner(out / res.files["fp32"])
    assert fp32.batch_size == 8 and fp32.input_shape == CHW   # read from the program's planned input
    np.testing.assert_allclose(fp32.predict(x), want, atol=1e-4, rtol=1e-4)
    int8 = ExecuTorchRunner(out / res.files["int8"], precision="int8").predict(x)
    assert int8.shape == want.shape and (int8.argmax(1) == want.argmax(1)).mean() >= 0.8


@needs_executorch
def test_executorch_timing(executorch_files):
    from dfkd_deploy.runtime.executorch import ExecuTorchRunner

    _, out, res = executorch_files
    stats = ExecuTorchRunner(out / res.files["int8"], precision="int8").time(4, repeats=2, warmup=1)
    assert stats.batch == 4 and stats.median_ms > 0
