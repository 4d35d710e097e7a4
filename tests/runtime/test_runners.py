"""The runners: torch and ONNX Runtime agree on one tiny model, NHWC files take NCHW inputs,
timing gives figures, and a missing TensorRT is one clear line."""
import numpy as np
import pytest
import torch
from torch import nn

from dfkd_deploy.core.errors import ExportError
from dfkd_deploy.runtime import LatencyStats, OrtRunner, TorchRunner
from dfkd_deploy.runtime import tensorrt as trt_runtime
from exporters.onnx_export import export_student_onnx

CHW = (2, 5, 7)   # non-square, so a permute that swaps H and W cannot pass by accident


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 7, 3)).eval()


def _inputs(n=9, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *CHW), dtype=np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = _tiny()
    out = tmp_path_factory.mktemp("runtime")
    nchw = export_student_onnx(model, out / "nchw.onnx", input_shape=CHW).path
    nhwc = export_student_onnx(model, out / "nhwc.onnx", input_shape=CHW, layout="NHWC").path
    return model, nchw, nhwc


def test_torch_and_onnxruntime_agree(tiny):
    model, nchw, _ = tiny
    x = _inputs()
    torch_runner, ort_runner = TorchRunner(model), OrtRunner(nchw)
    assert (torch_runner.name, torch_runner.precision) == ("torch", "fp32")
    assert (ort_runner.name, ort_runner.precision, ort_runner.input_shape) == ("onnxruntime", "fp32", CHW)
    want = torch_runner.predict(x)
    assert want.shape == (9, 3) and want.dtype == np.float32
    np.testing.assert_allclose(ort_runner.predict(x), want, atol=1e-5)
    # batching is invisible: 9 inputs 4 at a time give the same logits
    np.testing.assert_allclose(OrtRunner(nchw, batch_size=4).predict(x), want, atol=1e-5)


def test_nhwc_file_takes_nchw_inputs(tiny):
    model, _, nhwc = tiny
    runner = OrtRunner(nhwc, layout="NHWC")
    assert runner.input_shape == CHW            # read from the file's (N, H, W, C) input
    x = _inputs(seed=2)
    np.testing.assert_allclose(runner.predict(x), TorchRunner(model).predict(x), atol=1e-5)
    with pytest.raises(Exception):              # the same file told it is NCHW gets the wrong shape
        OrtRunner(nhwc).predict(x)


def test_timing_gives_figures(tiny):
    model, nchw, _ = tiny
    for runner in (TorchRunner(model, input_shape=CHW), OrtRunner(nchw, threads=1)):
        stats = runner.time(3, repeats=2, warmup=1)
        assert isinstance(stats, LatencyStats) and stats.batch == 3 and stats.repeats == 2 and stats.warmup == 1
        assert stats.median_ms > 0
    with pytest.raises(ExportError, match="no input shape"):
        TorchRunner(model).time(1, repeats=1, warmup=0)


def test_threads_reach_the_session(tiny):
    runner = OrtRunner(tiny[1], threads=1)
    assert runner.threads == 1 and runner.session.get_session_options().intra_op_num_threads == 1


def test_torch_runner_keeps_the_modules_mode():
    model = _tiny().train()
    TorchRunner(model).predict(_inputs(2))
    assert model.training


def test_one_line_errors(tmp_path, tiny):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError) as err:
        OrtRunner(bad)
    assert "onnxruntime cannot load bad.onnx" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ExportError, match="expects NCHW"):
        OrtRunner(tiny[1]).predict(np.zeros((2, 5, 7), np.float32))


def test_missing_tensorrt_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_runtime, "tensorrt_module", lambda: None)
    with pytest.raises(ExportError) as err:
        trt_runtime.TrtRunner(tmp_path / "student.fp32.engine")
    assert str(err.value) == trt_runtime.MISSING_RUNTIME and "\n" not in str(err.value)
