"""Input conventions read off ONNX graphs (normalisation baked in, value range, layout, output
kind), where each came from (spec.sources), `inspect` printing them, and BN-free teachers
(grey, non-square) going through synthesis."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dfkd_deploy.cli import cli
from dfkd_deploy.recipe import TeacherOptions
from dfkd_deploy.teachers import load_teacher
from dfkd_deploy.teachers.conventions import pick_value_range
from tests.teachers.onnx_fixtures import BNFree, randomise_bn
from dfkd_deploy.models import build_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def export(model: nn.Module, path: Path, shape, fold: bool = True) -> Path:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, *shape),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=fold, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return path


class Normalised(nn.Module):
    """A deployed file with its preprocessing inside: scale to [0,1] by `divide`, then mean/std."""

    def __init__(self, model, mean, std, divide=None, nhwc=False):
        super().__init__()
        self.model, self.divide, self.nhwc = model, divide, nhwc
        view = (1, 1, 1, -1) if nhwc else (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(mean).view(view))
        self.register_buffer("std", torch.tensor(std).view(view))

    def forward(self, x):
        if self.divide:
            x = x / self.divide
        x = (x - self.mean) / self.std
        return self.model(x.permute(0, 3, 1, 2) if self.nhwc else x)


class LogSoftmaxed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.log_softmax(self.model(x), dim=1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomise_bn(build_model("tiny_cnn", num_classes=5))


@pytest.mark.parametrize("scale, shift, expected", [
    (1 / np.array(IMAGENET_STD), -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD), 1.0),   # torchvision
    (np.array([1 / 255] * 3), np.zeros(3), 255.0),                                          # Keras Rescaling
    (np.ones(3), -np.array([103.9, 116.8, 123.7]), 255.0),                                  # caffe mean subtraction
    (np.array([1 / 127.5]), np.array([-1.0]), 255.0),                                       # x / 127.5 - 1
    (np.array([2.0]), np.array([-1.0]), 1.0),                                               # x * 2 - 1
    (1 / (255 * np.array(IMAGENET_STD)), -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD), 255.0),
    (np.array([1e-6]), np.array([0.0]), None),                                              # no sensible range
])
def test_pick_value_range(scale, shift, expected):
    assert pick_value_range(np.asarray(scale, float), np.asarray(shift, float)) == expected


def test_normalisation_inside_the_graph_is_detected(tiny, tmp_path):
    wrapped = Normalised(tiny, IMAGENET_MEAN, IMAGENET_STD)
    teacher = load_teacher(export(wrapped, tmp_path / "norm.onnx", (3, 32, 32)))
    spec = teacher.spec
    assert spec.mean is None and spec.std is None and spec.value_range == 1.0
    assert spec.sources["normalisation"].startswith("detected: the graph normalises its input itself (Sub -> Div")
    assert "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]" in spec.sources["normalisation"]
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():   # pixel space -> the file, with nothing applied outside it
        torch.testing.assert_close(teacher.module(teacher.normalizer()(pixels)), wrapped(pixels), atol=1e-4, rtol=1e-4)


def test_uint8_scale_normalisation_nhwc(tiny, tmp_path):
    wrapped = Normalised(tiny, IMAGENET_MEAN, IMAGENET_STD, divide=255.0, nhwc=True).eval()
    spec = load_teacher(export(wrapped, tmp_path / "raw255.onnx", (32, 32, 3))).spec
    assert spec.layout == "NHWC" and spec.value_range == 255.0 and spec.mean is None
    assert "[0, 255]" in spec.sources["value_range"] and spec.sources["layout"].startswith("detected")


def test_metadata_and_recipe_take_precedence(tiny, tmp_path):
    from exporters.onnx_export import export_teacher_onnx

    wrapped = Normalised(tiny, IMAGENET_MEAN, IMAGENET_STD)
    path = export_teacher_onnx(wrapped, tmp_path / "meta.onnx", input_shape=(3, 32, 32), mean=(0.5,) * 3,
                               std=(0.25,) * 3, value_range=1.0)
    spec = load_teacher(path).spec
    assert spec.mean == (0.5,) * 3 and spec.sources["normalisation"].startswith("file metadata")
    assert any("metadata takes precedence" in n for n in spec.notes)

    plain = export(wrapped, tmp_path / "plain.onnx", (3, 32, 32))
    spec = load_teacher(plain, TeacherOptions(mean=[0.1, 0.2, 0.3], std=[1, 1, 1], value_range=255)).spec
    assert spec.mean == (0.1, 0.2, 0.3) and spec.value_range == 255.0
    assert spec.sources["normalisation"] == "recipe (teacher.mean/std)"
    assert spec.sources["value_range"] == "recipe (teacher.value_range)"
    assert any("already normalises its input" in n for n in spec.notes)


def test_defaults_are_reported_as_assumptions(tiny, tmp_path):
    spec = load_teacher(export(LogSoftmaxed(tiny), tmp_path / "logsm.onnx", (3, 32, 32), fold=False)).spec
    assert spec.output == "logits" and "LogSoftmax" in spec.sources["output"]
    assert spec.sources["normalisation"].startswith("default:") and spec.sources["value_range"].startswith("default:")
    assert spec.bn_layers == 3 and spec.sources["bn_statistics"].startswith("3 BatchNorm layers")


def test_grey_non_square_nhwc(tmp_path):
    torch.manual_seed(0)
    model = randomise_bn(build_model("tiny_cnn", num_classes=4, in_channels=1, input_size=(24, 40)))

    class Grey(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x.permute(0, 3, 1, 2))

    teacher = load_teacher(export(Grey().eval(), tmp_path / "grey.onnx", (24, 40, 1)))
    assert teacher.spec.layout == "NHWC" and teacher.spec.input_shape == (1, 24, 40)
    x = torch.randn(3, 1, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(teacher.module(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def bn_free_dynamo(tmp_path_factory):
    """A BN-free, grey, non-square classifier through the dynamo exporter (export-teacher's path)."""
    from exporters.onnx_export import export_teacher_onnx

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dyn") / "bnfree.onnx"
    return export_teacher_onnx(BNFree().eval(), path, input_shape=(1, 24, 40), exporter="dynamo")


def test_bn_free_teacher_inspect_and_synthesis(bn_free_dynamo):
    from dfkd_deploy import run as api
    from tests.conftest import quick_recipe

    r = CliRunner().invoke(cli, ["inspect", str(bn_free_dynamo)])
    assert r.exit_code == 0, r.output
    assert "bn_statistics   none (BN-free priors)" in r.output
    assert "synthesis losses: BN-statistics matching off; BN-free priors:" in r.output
    assert "value_range     [0, 1]" in r.output and "layout          NCHW" in r.output
    js = json.loads(CliRunner().invoke(cli, ["inspect", str(bn_free_dynamo), "--json"]).output)
    assert js["bn_layers"] == 0 and js["synthesis_losses"]["bn_statistics"] is False
    assert js["synthesis_losses"]["priors"] and set(js["sources"]) >= {"layout", "value_range", "normalisation",
                                                                        "output", "bn_statistics", "input_shape"}

    teacher = load_teacher(bn_free_dynamo)
    assert teacher.spec.bn_layers == 0 and teacher.spec.input_shape == (1, 24, 40)
    assert teacher.spec.converter_max_abs_diff < 1e-4
    synth = api.make_synthesizer(teacher, quick_recipe(), torch.device("cpu"))
    images, _ = synth.synthesize(None, adversarial=False, batch_size=4)
    assert tuple(images.shape) == (4, 1, 24, 40) and torch.isfinite(images).all()
    assert 0 <= float(images.min()) and float(images.max()) <= 1
