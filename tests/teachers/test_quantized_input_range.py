"""An int8 file's input quantizer tells the normalisation the file does not record."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfkd_deploy.teachers.quantized import input_range, match_normalisation
from tests.conftest import shared_path


def _quantized_input(scale: float, zero_point: int):
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zero_point, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_imagenet_range_is_recognised():
    # [0,1] pixels under the ImageNet mean/std span [-2.118, 2.640]; this quantizer covers [-2.13, 2.63]
    lo, hi = input_range(_quantized_input(0.018658, 114), "input")
    assert (lo, hi) == pytest.approx((-2.127, 2.631), abs=1e-3)
    name, mean, std = match_normalisation(lo, hi, 3)
    assert name == "ImageNet" and mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))


def test_other_ranges_are_not_guessed():
    assert match_normalisation(*input_range(_quantized_input(1 / 255, 0), "input"), 3) is None       # [0, 1]
    assert match_normalisation(-1.0, 1.0, 3)[1] == (0.5, 0.5, 0.5)
    assert match_normalisation(-3.0, 1.0, 3) is None
    assert input_range(_quantized_input(0.02, 114), "other") is None


def test_shared_int8_mobilenet_input_reads_as_imagenet():
    model = onnx.load(str(shared_path("teachers", "imagenet-mobilenetv2-12-int8.onnx")))
    assert match_normalisation(*input_range(model, model.graph.input[0].name), 3)[0] == "ImageNet"
