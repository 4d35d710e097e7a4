"""ONNX export: BN folding, parity, dynamic batch, NHWC wrapping, failure modes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from dfkd_deploy.core.errors import ExportError
from dfkd_deploy.models import build_model
from dfkd_deploy.runtime.onnxruntime import OrtRunner
from exporters import export_student_onnx, fold_conv_bn


def _randomized(arch: str, input_size=(32, 32), seed: int = 0) -> nn.Module:
    """A student whose BN layers are far from identity, so an unfolded or mis-folded BN shows."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, in_channels=3, input_size=input_size)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def _op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("arch", ["tiny_cnn", "cifar_resnet8"])
def test_export_folds_bn_and_matches_torch(tmp_path, arch):
    student = _randomized(arch)
    probes = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "student.onnx"

    res = export_student_onnx(student, path, input_shape=(3, 32, 32), probes=probes)

    assert res.path == path and path.is_file()
    assert (res.input_name, res.output_name, res.opset, res.probes) == ("input", "logits", 17, 24)
    assert res.max_abs_diff < 1e-4 and res.top1_agreement == 1.0
    assert res.bn_nodes_remaining == 0
    ops = _op_types(path)
    assert "BatchNormalization" not in ops and "Conv" in ops
    onnx.checker.check_model(str(path))

    # Dynamic batch on input and output, and numbers that match torch at several batch sizes.
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param
    runner = OrtRunner(path, batch_size=5)
    with torch.no_grad():
        for n in (1, 7, 33):
            out = runner.predict(probes.repeat(2, 1, 1, 1)[:n].numpy())
            assert out.shape == (n, 10)
            np.testing.assert_allclose(out, student(probes.repeat(2, 1, 1, 1)[:n]).numpy(), atol=1e-4)


def test_export_leaves_callers_student_alone(tmp_path):
    student = _randomized("tiny_cnn").train()
    export_student_onnx(student, tmp_path / "s.onnx", input_shape=(3, 32, 32))
    assert student.training
    assert sum(isinstance(m, nn.BatchNorm2d) for m in student.modules()) == 3


def test_nhwc_export_takes_nhwc_input(tmp_path):
    # Non-square, so a permute that swaps H and W cannot pass by accident.
    student = _randomized("tiny_cnn", input_size=(20, 28))
    path = tmp_path / "nhwc.onnx"
    res = export_student_onnx(student, path, input_shape=(3, 20, 28), layout="NHWC")
    assert res.layout == "NHWC" and res.max_abs_diff < 1e-4

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [20, 28, 3]

    x = torch.randn(5, 3, 20, 28, generator=torch.Generator().manual_seed(2))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.permute(0, 2, 3, 1).contiguous().numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, student(x).numpy(), atol=1e-4)
    # The runner speaks NCHW and permutes for NHWC files itself.
    np.testing.assert_allclose(OrtRunner(path, layout="NHWC").predict(x.numpy()), got, atol=1e-6)


def test_parity_failure_raises_and_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "student.onnx"
    path.write_bytes(b"previous good export")
    real_predict = OrtRunner.predict
    # A deterministic disagreement of exactly 0.1 on every logit.
    monkeypatch.setattr(OrtRunner, "predict", lambda *a, **k: real_predict(*a, **k) + 0.1)

    with pytest.raises(ExportError) as err:
        export_student_onnx(_randomized("tiny_cnn"), path, input_shape=(3, 32, 32), tolerance=1e-3)
    msg = str(err.value)
    assert "max abs diff 0.1" in msg and "tolerance 0.001" in msg and "\n" not in msg
    assert path.read_bytes() == b"previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]   # no temp file left


def test_real_float_differences_trip_a_tiny_tolerance(tmp_path):
    # Folding BN reorders float arithmetic, so the diff is small but not exactly zero.
    probes = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = export_student_onnx(_randomized("cifar_resnet8"), tmp_path / "a.onnx", input_shape=(3, 32, 32),
                              probes=probes)
    assert res.max_abs_diff > 0
    with torch.no_grad():
        scale = max(1.0, float(_randomized("cifar_resnet8")(probes).abs().max()))   # the tolerance is relative above 1
    with pytest.raises(ExportError, match="max abs diff"):
        export_student_onnx(_randomized("cifar_resnet8"), tmp_path / "b.onnx", input_shape=(3, 32, 32),
                            probes=probes, tolerance=res.max_abs_diff / (2 * scale))
    assert not (tmp_path / "b.onnx").exists()


def test_parity_tolerance_grows_with_huge_logits(tmp_path):
    """A student whose logits reach 1e7 differs from its ONNX file by far more than 1e-3 in absolute
    terms through float32 rounding alone; the check is relative to the logits' size there, and the
    export says so in its notes."""
    class Loud(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _randomized("tiny_cnn")

        def forward(self, x):
            return self.body(x) * 1e7

    res = export_student_onnx(Loud().eval(), tmp_path / "loud.onnx", input_shape=(3, 32, 32), tolerance=1e-3)
    assert res.top1_agreement == 1.0
    assert any("scaled" in n and "unstable student" in n for n in res.notes)


def test_falls_back_to_torch_folding_when_exporter_keeps_bn(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def export_without_folding(*args, **kwargs):
        kwargs["do_constant_folding"] = False
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_without_folding)
    student = _randomized("tiny_cnn")
    res = export_student_onnx(student, tmp_path / "s.onnx", input_shape=(3, 32, 32))
    assert res.bn_nodes_remaining == 0
    assert "BatchNormalization" not in _op_types(tmp_path / "s.onnx")
    assert any("folded 3" in n for n in res.notes)
    assert res.max_abs_diff < 1e-4


def test_fold_conv_bn_keeps_outputs():
    student = _randomized("cifar_resnet8")
    folded, n = fold_conv_bn(student)
    assert n == 7   # conv1/bn1 + 3 blocks x 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in student.modules()) == 7   # original untouched
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), student(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"layout": "NCWH"}, "unknown layout"),
    ({"probes": torch.zeros(4, 3, 16, 16)}, "probes must be"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ExportError, match=match):
        export_student_onnx(_randomized("tiny_cnn"), tmp_path / "s.onnx", input_shape=(3, 32, 32), **kwargs)


def test_untraceable_student_gives_one_line_error(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, : int(x.sum().abs().item()) % 3 + 1].nonzero()

    with pytest.raises(ExportError) as err:
        export_student_onnx(DataDependent(), tmp_path / "s.onnx", input_shape=(3, 4, 4))
    assert "\n" not in str(err.value)
