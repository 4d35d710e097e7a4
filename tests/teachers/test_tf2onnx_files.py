"""Real tf2onnx output, not stand-ins: two Keras CNNs converted by tf2onnx 1.17.0 from
tensorflow-cpu 2.21.0 (``data/make_tf2onnx_fixtures.py`` regenerates them; CI has no
TensorFlow, so the files are committed). Each must load, detect its conventions from the graph,
and compute what onnxruntime computes on the original file, from pixels in [0, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dfkd_deploy.teachers import load_teacher

DATA = Path(__file__).resolve().parent / "data"

CASES = {
    # file: (input shape C,H,W, classes, value range the graph expects, opset)
    "keras_cnn_tf2onnx_opset13.onnx": ((3, 32, 32), 10, 255.0, 13),
    "keras_cnn_tf2onnx_opset9_gray.onnx": ((1, 20, 28), 4, 1.0, 9),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_tf2onnx_file_loads_with_its_conventions_and_matches_onnxruntime(name):
    shape, classes, value_range, opset = CASES[name]
    path = DATA / name
    import onnx

    model = onnx.load(path)
    assert model.producer_name == "tf2onnx"
    assert {o.domain: o.version for o in model.opset_import}[""] == opset

    teacher = load_teacher(path)
    spec = teacher.spec
    assert spec.layout == "NHWC" and spec.sources["layout"].startswith("detected")
    assert spec.input_shape == shape and spec.num_classes == classes
    assert spec.output == "probabilities" and spec.sources["output"].startswith("detected")
    assert spec.value_range == value_range and spec.mean is None and spec.std is None
    assert spec.bn_layers == 0                       # tf2onnx folds Keras BatchNorm into the convolutions
    assert spec.converter_max_abs_diff < 1e-5

    pixels = torch.rand(5, *shape, generator=torch.Generator().manual_seed(0))   # NCHW in [0, 1]
    with torch.no_grad():
        ours = teacher.module(teacher.normalizer()(pixels)).exp().numpy()      # log-probabilities -> probabilities
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = (pixels.permute(0, 2, 3, 1).numpy() * value_range).astype(np.float32)   # what the file takes
    theirs = sess.run(None, {sess.get_inputs()[0].name: feed})[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(theirs.sum(1), 1.0, atol=1e-5)


def test_real_tf2onnx_teacher_synthesizes_with_the_bn_free_priors():
    from dfkd_deploy import run as api
    from tests.conftest import quick_recipe

    teacher = load_teacher(DATA / "keras_cnn_tf2onnx_opset13.onnx")
    synth = api.make_synthesizer(teacher, quick_recipe(), torch.device("cpu"))
    assert len(synth.bn_stats) == 0 and synth.loss.priors["tv"] > 0
    images, stats = synth.synthesize(None, batch_size=4)
    assert tuple(images.shape) == (4, 3, 32, 32) and torch.isfinite(images).all()
    assert 0 <= float(images.min()) and float(images.max()) <= 1 and stats.prior > 0
