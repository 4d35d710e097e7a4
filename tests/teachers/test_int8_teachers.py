"""int8 ONNX teachers (teachers/quantized.py): a small model quantized here by onnxruntime's own
quantizer, in both formats and both weight granularities, loads as a float teacher that agrees
with the int8 onnxruntime session and passes gradients to its input; a quantized op nothing
dequantizes is refused by op and node; the two real int8 files in ../shared load with parity."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dfkd_deploy.core.errors import TeacherError
from dfkd_deploy.recipe import TeacherOptions
from dfkd_deploy.teachers import load_teacher, quantized
from tests.conftest import shared_path
from tests.teachers.onnx_fixtures import spread_logits


class SmallNet(nn.Module):
    """Conv-ReLU, a residual Add, average pooling and a Linear head: the ops a quantizer rewrites.
    (A 4x4 average pool, not a global one: pooled over the whole image, iid probes all give the
    same features and so the same class, and agreement on them would mean nothing.)"""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = h + self.c2(h)
        return self.fc(torch.flatten(nn.functional.avg_pool2d(h, 4), 1))


class _Reader:
    def __init__(self, name: str, batches):
        self.name, self.batches = name, iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("int8") / "small.onnx"
    torch.onnx.export(spread_logits(SmallNet(), (3, 12, 12)), (torch.randn(1, 3, 12, 12),), str(path), dynamo=False, opset_version=13,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path


def quantize(float_path, out, fmt: str, per_channel: bool):
    from onnxruntime.quantization import QuantFormat, quantize_static

    gen = np.random.default_rng(0)
    batches = [gen.standard_normal((4, 3, 12, 12)).astype(np.float32) for _ in range(8)]
    quantize_static(str(float_path), str(out), _Reader("x", batches),
                    quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
                    per_channel=per_channel, reduce_range=True)   # reduce_range: no u8s8 saturation on AVX2
    return out


@pytest.mark.parametrize("fmt", ["QOperator", "QDQ"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_by_onnxruntime_loads_and_agrees(float_onnx, tmp_path, fmt, per_channel):
    path = quantize(float_onnx, tmp_path / "q.onnx", fmt, per_channel)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("QLinearConv" in ops) == (fmt == "QOperator") and "DequantizeLinear" in ops
    teacher = load_teacher(path, TeacherOptions(int8_min_agreement=0.95))   # the agreement gate is the check
    summary = next(n for n in teacher.spec.notes if n.startswith("int8 teacher"))
    assert f"({fmt} format" in summary or (fmt == "QOperator" and "QOperator+QDQ format" in summary)
    assert ("per-channel" in summary) == per_channel
    parity = next(n for n in teacher.spec.notes if n.startswith("int8 parity"))
    assert "top-1 agreement" in parity and teacher.spec.converter_max_abs_diff is not None
    record = teacher.spec.int8          # the same facts as plain data, for the coverage table and report.json
    assert record["format"].startswith(fmt) and record["per_channel"] == per_channel
    assert record["agreement_probes"] >= 0.95 and record["agreement_smooth"] >= 0.95
    assert record["classes_probes"] >= 3          # the probes are not all one class: the agreement means something
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    teacher.module(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_fake_quant_rounds_forward_and_passes_gradient():
    fq = quantized.FakeQuant(0.5, 2.0, 0, 255, None, rounding=True)
    x = torch.tensor([0.2, 0.3, 1.1, -5.0], requires_grad=True)
    y = fq(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.5, 1.0, -1.0]))   # -5 clamps to (0 - 2) * 0.5
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))          # identity inside, 0 where clamped
    plain = quantized.FakeQuant(0.5, 2.0, 0, 255, None, rounding=False)
    assert torch.allclose(plain(x).detach(), torch.tensor([0.2, 0.3, 1.1, -1.0]))


def test_activation_modes_both_load(float_onnx, tmp_path):
    path = quantize(float_onnx, tmp_path / "q.onnx", "QOperator", True)
    spec = load_teacher(path, TeacherOptions(int8_activations="float", int8_min_agreement=0.9)).spec
    assert spec.sources["quantization"].endswith("activations float")


def test_quantized_op_nobody_handles_is_refused_by_op_and_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    inits = [numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z"),
             numpy_helper.from_array(np.ones((3, 3, 1, 1), np.uint8), "wq")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant_in"),
             helper.make_node("ConvInteger", ["q", "wq", "z"], ["ci"], name="conv_int"),
             helper.make_node("Cast", ["ci"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path / "qint.onnx"
    onnx.save(model, str(path))
    with pytest.raises(TeacherError) as info:
        load_teacher(path)
    message = str(info.value)
    assert "cannot convert the ConvInteger op (node 'conv_int', opset 13)" in message and "\n" not in message
    assert "not one dfkd_deploy dequantizes" in message


SHARED_INT8 = {
    "cifar10-resnet8-mlperftiny-int8.onnx": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010], 10),
    "imagenet-mobilenetv2-12-int8.onnx": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 1000),
}


@pytest.mark.parametrize("name", sorted(SHARED_INT8))
def test_shared_int8_teachers_load_with_int8_parity(name):
    mean, std, classes = SHARED_INT8[name]
    teacher = load_teacher(shared_path("teachers", name), TeacherOptions(mean=mean, std=std))
    assert teacher.spec.num_classes == classes
    assert any(n.startswith("int8 teacher (QOperator") and "per-channel" in n for n in teacher.spec.notes)
    assert any(n.startswith("int8 parity") for n in teacher.spec.notes)


def test_int8_teacher_records_its_activation_ranges(float_onnx, tmp_path):
    from dfkd_deploy.synthesis.priors import RANGE_PRIOR_AUTO, Priors

    teacher = load_teacher(quantize(float_onnx, tmp_path / "q.onnx", "QOperator", False),
                           TeacherOptions(int8_min_agreement=0.9))
    fakes = [m for m in teacher.module.modules() if isinstance(m, quantized.FakeQuant)]
    assert teacher.spec.activation_ranges == len(fakes) > 0
    assert Priors.for_teacher(teacher.spec, None).weights["ranges"] == RANGE_PRIOR_AUTO > 0   # on for int8 teachers


def test_range_prior_penalises_overshoot_and_unreached_tops(float_onnx, tmp_path):
    """The prior is 0 for a batch that exactly spans each recorded range, grows when the batch
    overshoots or stays short of it, and passes a gradient to the pixels."""
    from dfkd_deploy.synthesis.losses import ActivationRanges

    fq = quantized.FakeQuant(0.1, 0.0, 0, 255, None, rounding=True)     # range [0, 25.5]
    prior = ActivationRanges(nn.Sequential(fq))
    assert prior.available

    def term(x):
        with prior.capture():
            fq(x)
        return prior.loss()

    assert float(term(torch.tensor([0.0, 10.0, 25.5]))) == pytest.approx(0.0, abs=1e-7)
    short, over = term(torch.tensor([0.0, 5.0])), term(torch.tensor([0.0, 40.0]))
    assert float(short) == pytest.approx(((255 - 50) / 255) ** 2, rel=1e-5)
    assert float(over) > 0
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    term(x).backward()
    assert x.grad is not None and float(x.grad[1]) < 0                 # pushes the largest value up
    with prior.capture():
        pass
    assert prior.loss() is None
    prior.remove()
    assert not fq._forward_pre_hooks

    teacher = load_teacher(quantize(float_onnx, tmp_path / "q.onnx", "QDQ", False), TeacherOptions(int8_min_agreement=0.9))
    from dfkd_deploy.recipe import SynthesisOptions
    from dfkd_deploy.synthesis.losses import InversionLoss
    from dfkd_deploy.teachers.spec import Normalizer

    opts = SynthesisOptions()
    loss = InversionLoss(teacher.module, Normalizer(teacher.spec), opts,
                         {"tv": 0.0, "l2": 0.0, "entropy": 0.0, "activation": 0.0, "ranges": 1.0})
    pixels = torch.rand(4, 3, 12, 12, requires_grad=True)
    terms = loss(pixels, torch.zeros(4, dtype=torch.long))
    assert float(terms.prior) > 0
    terms.prior.backward()
    assert pixels.grad.abs().sum() > 0
    loss.remove()


def test_range_prior_asked_of_a_float_teacher_is_refused(float_onnx):
    from dfkd_deploy.core.errors import UsageError
    from dfkd_deploy.recipe import SynthesisOptions
    from dfkd_deploy.synthesis.losses import InversionLoss
    from dfkd_deploy.teachers.spec import Normalizer

    teacher = load_teacher(float_onnx, TeacherOptions())
    weights = {"tv": 0.0, "l2": 0.0, "entropy": 0.0, "activation": 0.0, "ranges": 1.0}
    with pytest.raises(UsageError, match="synthesis.priors.ranges"):
        InversionLoss(teacher.module, Normalizer(teacher.spec), SynthesisOptions(), weights, explicit_ranges=True)
    quiet = InversionLoss(teacher.module, Normalizer(teacher.spec), SynthesisOptions(), weights)
    assert quiet.priors["ranges"] == 0.0 and any("range prior off" in n for n in quiet.notes)
