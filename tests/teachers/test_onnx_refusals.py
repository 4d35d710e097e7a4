"""Files that are not usable teachers: one line each (TeacherError, CLI exit 2), naming what is
wrong; no traceback without --debug."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dfkd_deploy.cli import cli
from dfkd_deploy.core.errors import TeacherError
from dfkd_deploy.teachers import load_teacher


def classifier(x_info, *, outputs=1, opset=17, extra_inputs=()):
    """x -> GlobalAveragePool -> Flatten -> y (N, C): a minimal valid classifier graph."""
    nodes = [helper.make_node("GlobalAveragePool", [x_info.name], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
    for i in range(1, outputs):
        nodes.append(helper.make_node("Identity", ["y"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["N", 3]))
    graph = helper.make_graph(nodes, "g", [x_info, *extra_inputs], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def refused(model_or_path, tmp_path, match, name="m.onnx"):
    path = model_or_path
    if not isinstance(model_or_path, type(tmp_path)):
        path = tmp_path / name
        onnx.save(model_or_path, str(path))
    with pytest.raises(TeacherError, match=match) as info:
        load_teacher(path)
    assert "\n" not in str(info.value)
    r = CliRunner().invoke(cli, ["inspect", str(path)])
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.strip().count("\n") == 0, r.output
    assert "Traceback" not in r.output
    return str(info.value)


def image(name="x", dtype=TensorProto.FLOAT, shape=("N", 3, 8, 8)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_valid_baseline_loads(tmp_path):
    path = tmp_path / "ok.onnx"
    onnx.save(classifier(image()), str(path))
    assert load_teacher(path).spec.num_classes == 3


def test_several_outputs(tmp_path):
    msg = refused(classifier(image(), outputs=2), tmp_path, r"2 outputs \(y, y1\).*one output")
    assert "classifier" in msg


def test_several_inputs(tmp_path):
    refused(classifier(image(), extra_inputs=[image("mask")]), tmp_path, r"2 inputs \(x, mask\)")


def test_non_4d_input(tmp_path):
    x = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", 128, 768])
    graph = helper.make_graph([helper.make_node("ReduceMean", ["tokens"], ["y"], axes=[1], keepdims=0)], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 768])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    refused(model, tmp_path, r"rank 3 \(\['\?', 128, 768\]\); expected an image batch")


def test_sequence_input(tmp_path):
    seq = helper.make_tensor_sequence_value_info("frames", TensorProto.FLOAT, ["N", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("SequenceAt", ["frames", "zero"], ["x"]),
                               helper.make_node("GlobalAveragePool", ["x"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["y"])], "g", [seq],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              initializer=[numpy_helper.from_array(np.array(0, np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    refused(model, tmp_path, "the input 'frames' is a sequence, not an image tensor")


@pytest.mark.parametrize("dtype, word", [(TensorProto.INT64, "int64"), (TensorProto.FLOAT16, "float16")])
def test_non_float_input(dtype, word, tmp_path):
    x = image(dtype=dtype)
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
                               helper.make_node("GlobalAveragePool", ["f"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    refused(model, tmp_path, f"the input is {word}; a teacher must take float32")


def test_dense_prediction_output(tmp_path):
    x = image()
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    refused(model, tmp_path, r"output has shape \['N', 3, 8, 8\]; a teacher is an image classifier")


@pytest.fixture()
def external_model(tmp_path):
    """A classifier whose weights live in model.onnx.data, as the dynamo exporter writes them."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                               helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["y"])], "g", [image()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    return d / "model.onnx"


def test_external_data_loads(external_model):
    assert load_teacher(external_model).spec.num_classes == 4


def test_missing_external_data_file(external_model, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(external_model, lone / "model.onnx")
    msg = refused(lone / "model.onnx", tmp_path, "weights are stored in a separate file, model.onnx.data, which is "
                                                 "missing; put it next to model.onnx")
    assert str(lone / "model.onnx.data") in msg


def test_truncated_external_data_file(external_model, tmp_path):
    data = external_model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    refused(external_model, tmp_path, r"external weights file model.onnx.data is truncated \(100 bytes, the model "
                                      r"needs 432\)")


def test_external_data_outside_the_directory_is_refused(external_model, tmp_path):
    model = onnx.load(str(external_model), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere.data"
    onnx.save(model, str(external_model))
    refused(external_model, tmp_path, "point outside its directory")


def test_uint8_input_must_go_through_a_cast(tmp_path):
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["y"])], "g", [image(dtype=TensorProto.UINT8)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    refused(model, tmp_path, "uint8 input does not go straight into a Cast to float")


def test_debug_shows_the_exception(tmp_path):
    onnx.save(classifier(image(), outputs=2), str(tmp_path / "two.onnx"))
    r = CliRunner().invoke(cli, ["--debug", "inspect", str(tmp_path / "two.onnx")])
    assert r.exit_code != 0 and isinstance(r.exception, TeacherError)
