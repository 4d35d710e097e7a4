"""export-teacher through torch's legacy and dynamo exporters: what lands on disk, and that the
loader reads it back (the dynamo export of a BN teacher is a BN-free teacher)."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from dfkd_deploy.cli import cli
from dfkd_deploy.core.errors import ExportError
from dfkd_deploy.teachers import load_teacher
from tests.teachers.onnx_fixtures import zoo_model
from exporters.onnx_export import describe_teacher_onnx, export_teacher_onnx


@pytest.fixture(scope="module")
def resnet8():
    return zoo_model("cifar_resnet8", (3, 32, 32))


@pytest.fixture(scope="module")
def state_dict_file(resnet8, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "r8.pth"
    torch.save(resnet8.state_dict(), path)
    return path


def test_dynamo_export_via_cli(state_dict_file, resnet8, tmp_path):
    out = tmp_path / "r8_dynamo.onnx"
    r = CliRunner().invoke(cli, ["export-teacher", str(state_dict_file), "--teacher-arch", "cifar_resnet8",
                                 "--exporter", "dynamo", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "dynamo exporter, opset 18, 0 BatchNormalization nodes, weights in r8_dynamo.onnx.data" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r8_dynamo.onnx", "r8_dynamo.onnx.data"]   # no leftovers
    info = describe_teacher_onnx(out)
    assert info["batchnorm_nodes"] == 0 and info["external_data"] == ["r8_dynamo.onnx.data"]
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["dfkd_deploy.mean"] == [0.485, 0.456, 0.406] and meta["dfkd_deploy.value_range"] == 1.0

    teacher = load_teacher(out)
    spec = teacher.spec
    assert spec.bn_layers == 0 and spec.sources["bn_statistics"].startswith("none usable")
    assert spec.mean is not None and spec.sources["normalisation"].startswith("file metadata")
    assert "dynamic batch dimension" in spec.notes
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():     # BN folded into the convs by the exporter: the same function
        torch.testing.assert_close(teacher.module(x), resnet8(x), atol=1e-4, rtol=1e-4)


def test_legacy_export_keeps_or_folds_bn(resnet8, tmp_path):
    kept = export_teacher_onnx(resnet8, tmp_path / "kept.onnx", input_shape=(3, 32, 32))
    folded = export_teacher_onnx(resnet8, tmp_path / "folded.onnx", input_shape=(3, 32, 32), fold=True, opset=13)
    assert describe_teacher_onnx(kept)["batchnorm_nodes"] == 7
    assert describe_teacher_onnx(folded) == {"opset": 13, "producer": describe_teacher_onnx(folded)["producer"],
                                             "batchnorm_nodes": 0, "external_data": []}
    assert load_teacher(kept).spec.bn_layers == 7 and load_teacher(folded).spec.bn_layers == 0


def test_dynamo_export_inline_weights_nhwc(tmp_path):
    path = export_teacher_onnx(zoo_model("tiny_cnn", (3, 32, 32)), tmp_path / "inline.onnx", input_shape=(3, 32, 32),
                               layout="NHWC", exporter="dynamo", external_data=False, opset=20)
    assert [p.name for p in tmp_path.iterdir()] == ["inline.onnx"]
    spec = load_teacher(path).spec
    assert spec.layout == "NHWC" and spec.bn_layers == 0 and spec.converter_max_abs_diff < 1e-4


def test_export_option_errors(resnet8, tmp_path):
    with pytest.raises(ExportError, match="unknown teacher exporter 'onnxscript'"):
        export_teacher_onnx(resnet8, tmp_path / "x.onnx", input_shape=(3, 32, 32), exporter="onnxscript")
    with pytest.raises(ExportError, match="dynamo exporter only"):
        export_teacher_onnx(resnet8, tmp_path / "x.onnx", input_shape=(3, 32, 32), external_data=True)
    assert not list(tmp_path.iterdir())
