"""Each converter and graph rewrite of dfkd_deploy.teachers.converters against onnxruntime, on
one-node (or few-node) graphs built with onnx.helper."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dfkd_deploy._compat import import_onnx2torch
from dfkd_deploy.teachers import converters


def make_model(nodes, x_shape, inits=(), opset=18, y_shape=None, x_type=TensorProto.FLOAT):
    x = helper.make_tensor_value_info("x", x_type, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    graph = helper.make_graph(list(nodes), "g", [x], [y], initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset <= 23 else 11     # what this onnxruntime reads
    return model


def ints(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def floats(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def convert(model):
    prepared, _ = converters.prepare(model)
    assert converters.unsupported_nodes(prepared) == []
    converters.register()
    return import_onnx2torch().convert(prepared).eval()


def assert_matches_ort(model, x, atol=1e-5):
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = convert(model)(torch.from_numpy(x))
    got = (got[0] if isinstance(got, (tuple, list)) else got).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=atol, rtol=1e-5)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_register_is_idempotent_and_keeps_onnx2torch_converters():
    from onnx2torch.node_converters.registry import get_converter

    converters.register()
    converters.register()
    before = get_converter("Conv", 11)
    converters.register()
    assert get_converter("Conv", 11) is before            # onnx2torch's own stays in place
    assert get_converter("Conv", 22) is not before        # ours, delegating to it


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare",
                                "ReduceLogSumExp"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_18_axes_as_input(op, keepdims):
    model = make_model([helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)], (2, 3, 4, 5),
                       [ints("axes", [2, -1])], opset=18)
    assert_matches_ort(model, np.abs(rand(2, 3, 4, 5)) + 0.5)


def test_reduce_18_no_axes_and_noop():
    x = rand(2, 3, 4, 5)
    assert_matches_ort(make_model([helper.make_node("ReduceMean", ["x"], ["y"], keepdims=1)], x.shape), x)
    assert_matches_ort(make_model([helper.make_node("ReduceMax", ["x", "axes"], ["y"], noop_with_empty_axes=1)],
                                  x.shape, [ints("axes", [])], opset=20), x)


@pytest.mark.parametrize("opset", [14, 19, 21])
def test_reshape_allowzero(opset):
    # allowzero=1 with a 0-free target is the dynamo exporter's everyday Reshape.
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)], (2, 3, 4, 5),
                       [ints("shape", [2, -1])], opset=opset)
    assert_matches_ort(model, rand(2, 3, 4, 5))
    # allowzero=0 with a 0: copy that input dim.
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])], (2, 3, 4, 5),
                       [ints("shape", [0, 3, -1])], opset=opset)
    assert_matches_ort(model, rand(2, 3, 4, 5))


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_18_with_axes_and_modes(mode):
    nodes = [helper.make_node("Pad", ["x", "pads", "value", "axes"], ["y"], mode=mode)]
    inits = [ints("pads", [1, 2, 2, 1]), floats("value", 0.5), ints("axes", [2, -1])]
    assert_matches_ort(make_model(nodes, (1, 2, 5, 6), inits, opset=19), rand(1, 2, 5, 6))


def test_pad_18_all_axes_negative_crop():
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"])]
    assert_matches_ort(make_model(nodes, (1, 2, 5, 6), [ints("pads", [0, 0, 1, -1, 0, 0, -2, 2])], opset=18),
                       rand(1, 2, 5, 6))


@pytest.mark.parametrize("opset", [11, 22])
def test_conv_and_pooling_aliases(opset):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["m"], ["y"])]
    inits = [floats("w", rand(4, 3, 3, 3, seed=1)), floats("b", rand(4, seed=2))]
    assert_matches_ort(make_model(nodes, (2, 3, 16, 12), inits, opset=opset), rand(2, 3, 16, 12))


@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_same_becomes_explicit(op, auto_pad):
    attrs = dict(kernel_shape=[2, 3], strides=[2, 2], auto_pad=auto_pad)
    inputs, inits = ["x"], []
    if op == "Conv":
        inputs, inits = ["x", "w"], [floats("w", rand(4, 3, 2, 3, seed=3))]
    model = make_model([helper.make_node(op, inputs, ["y"], **attrs)], (1, 3, 9, 10), inits, opset=17)
    assert_matches_ort(model, rand(1, 3, 9, 10))


@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_average_pool_asymmetric_pads(count_include_pad):
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0],
                            count_include_pad=count_include_pad)
    assert_matches_ort(make_model([node], (1, 2, 7, 8), opset=11), rand(1, 2, 7, 8))


def test_slice_steps_negative_and_out_of_range():
    node = helper.make_node("Slice", ["x", "s", "e", "a", "k"], ["y"])
    inits = [ints("s", [-1, 1, 0]), ints("e", [-100, 1000, 7]), ints("a", [3, 1, 2]), ints("k", [-2, 1, 3])]
    assert_matches_ort(make_model([node], (2, 3, 8, 9), inits, opset=13), rand(2, 3, 8, 9))
    old = helper.make_node("Slice", ["x"], ["y"], starts=[1, 0], ends=[3, -1], axes=[2, 3])   # opset 9 form
    assert_matches_ort(make_model([old], (2, 3, 8, 9), opset=9), rand(2, 3, 8, 9))


def test_castlike_gelu_mish_globalmaxpool_size_chain():
    nodes = [helper.make_node("Gelu", ["x"], ["g"], approximate="tanh"),
             helper.make_node("Mish", ["g"], ["m"]),
             helper.make_node("GlobalMaxPool", ["m"], ["p"]),
             helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("CastLike", ["n", "p"], ["nf"]),
             helper.make_node("Div", ["p", "nf"], ["y"])]
    assert_matches_ort(make_model(nodes, (2, 3, 4, 5), opset=20), rand(2, 3, 4, 5))


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization(opset):
    groups = 2
    affine = 2 if opset == 18 else 4              # per group (18) or per channel (21)
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=groups, epsilon=1e-5)
    inits = [floats("scale", rand(affine, seed=4) + 1), floats("bias", rand(affine, seed=5))]
    assert_matches_ort(make_model([node], (2, 4, 3, 5), inits, opset=opset), rand(2, 4, 3, 5), atol=1e-4)


def test_space_to_depth_upsample_split18():
    nodes = [helper.make_node("SpaceToDepth", ["x"], ["s"], blocksize=2),
             helper.make_node("Upsample", ["s", "scales"], ["y"], mode="nearest")]
    up = make_model(nodes, (1, 2, 4, 6), [floats("scales", [1, 1, 2, 2])], opset=9)
    assert_matches_ort(up, rand(1, 2, 4, 6))
    split = make_model([helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3),
                        helper.make_node("Concat", ["c", "a"], ["y"], axis=1)], (1, 8, 4, 6), opset=18)
    assert_matches_ort(split, rand(1, 8, 4, 6))      # 8 channels in 3: 3, 3, 2


def test_dropout7_with_mask_is_identity():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], ratio=0.5), helper.make_node("Relu", ["d"], ["y"])]
    assert_matches_ort(make_model(nodes, (2, 3, 4, 4), opset=9), rand(2, 3, 4, 4))


def test_constant_weights_are_folded_into_initializers():
    # Weights made by nodes (as in the onnx package's light models): onnx2torch's Conv needs initializers.
    nodes = [helper.make_node("ConstantOfShape", ["wshape"], ["w0"],
                              value=numpy_helper.from_array(np.array([0.1], np.float32))),
             helper.make_node("Mul", ["w0", "k"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"])]
    model = make_model(nodes, (1, 3, 6, 6), [ints("wshape", [2, 3, 3, 3]), floats("k", 2.0)], opset=9)
    prepared, notes = converters.prepare(model)
    assert [n.op_type for n in prepared.graph.node] == ["Conv"]
    assert any("folded" in n for n in notes)
    assert_matches_ort(model, rand(1, 3, 6, 6))


def test_fixed_batch_reshape_is_freed():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, (1, 3, 4, 4), [ints("shape", [1, -1])], opset=13)
    prepared, notes = converters.prepare(model, fixed_batch=1)
    assert numpy_helper.to_array(prepared.graph.initializer[0]).tolist() == [0, -1]
    converters.register()
    module = import_onnx2torch().convert(prepared)
    assert tuple(module(torch.zeros(5, 3, 4, 4)).shape) == (5, 48)


def test_unsupported_nodes_named_once_per_op():
    nodes = [helper.make_node("Shrink", ["x"], ["a"], name="first"), helper.make_node("Shrink", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    found = converters.unsupported_nodes(make_model(nodes, (1, 3, 4, 4), opset=17))
    assert [(u.op, u.node, u.opset) for u in found] == [("Shrink", "first", 17)]
    assert found[0].describe() == "Shrink op (node 'first', opset 17)"


def test_failing_node_names_the_node_onnx2torch_refuses():
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", antialias=1, name="aa_resize")
    model = make_model([node], (1, 3, 4, 4), [floats("scales", [1, 1, 2, 2])], opset=18)
    assert converters.unsupported_nodes(model) == []              # a converter exists for Resize-18 ...
    op, name, reason = converters.failing_node(model)             # ... but refuses antialias
    assert (op, name) == ("Resize", "aa_resize") and "antialias" in reason


def test_layer_norm_after_a_dynamic_reshape():
    # The legacy exporter's x.reshape(x.shape[0], -1): the normalised size is unknown to shape inference.
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["f"]),
             helper.make_node("LayerNormalization", ["f", "scale", "bias"], ["y"], epsilon=1e-5)]
    inits = [ints("zero", 0), ints("axes0", [0]), ints("minus1", [-1]), floats("scale", rand(48, seed=6) + 1),
             floats("bias", rand(48, seed=7))]
    assert_matches_ort(make_model(nodes, ("N", 3, 4, 4), inits, opset=17), rand(2, 3, 4, 4), atol=1e-4)
