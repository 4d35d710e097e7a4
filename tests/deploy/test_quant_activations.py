"""ORT int8 activation types: s8 (default, symmetric, TensorRT-compatible) and u8 (U8S8, what ORT's
x64 CPU kernels fuse fully); an unknown one is one clear line."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dfkd_deploy.core.errors import ExportError
from exporters.onnx_export import export_student_onnx
from exporters.ort_quant import quantize_student


def _zero_point_types(path):
    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    return {inits[n.input[2]].data_type for n in g.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    return export_student_onnx(model, tmp_path_factory.mktemp("q") / "m.onnx", input_shape=(1, 6, 6)).path


def test_activation_types(fp32, tmp_path):
    calib = np.random.default_rng(0).standard_normal((16, 1, 6, 6), dtype=np.float32)
    probes = np.random.default_rng(1).standard_normal((8, 1, 6, 6), dtype=np.float32)
    s8 = quantize_student(fp32, tmp_path / "s8.onnx", calib, probes=probes)
    u8 = quantize_student(fp32, tmp_path / "u8.onnx", calib, probes=probes, activations="u8")
    assert _zero_point_types(s8.path) == {onnx.TensorProto.INT8}
    assert _zero_point_types(u8.path) == {onnx.TensorProto.UINT8}
    assert u8.top1_agreement_vs_fp32 is not None and u8.max_abs_diff_vs_fp32 is not None
    with pytest.raises(ExportError, match="unknown activation type 'u4'"):
        quantize_student(fp32, tmp_path / "x.onnx", calib, activations="u4")
