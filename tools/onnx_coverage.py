"""The ONNX coverage matrix behind ``docs/teachers.md``: which producers, opsets and
architectures the teacher loader reads, measured rather than claimed.

Each case writes one ONNX file the way a real producer does and loads it with
:func:`dfkd_deploy.teachers.load_teacher` (conversion + the onnxruntime parity check), then
records what happened: converted (with the parity max abs diff, BN layers found, layout,
value range and output kind it detected) or refused (with the one-line reason, which names
the op and node for an op nothing converts).

Producers covered:

- torch's **dynamo** exporter (torch's default): as a user calls it (fixed batch, weights in an
  external ``.onnx.data`` file, BN folded into the convs) at opsets 18-23, and through
  ``dfkd-deploy export-teacher --exporter dynamo`` (dynamic batch, metadata);
- torch's **legacy** exporter at opsets 9-20, with BN kept (no constant folding) and folded;
- **TensorFlow/Keras through tf2onnx**: TensorFlow is not a dependency, so two stand-ins: the
  zoo models behind an NHWC input with a Softmax head (legacy exporter, opsets 9-13), and graphs
  built node by node in tf2onnx's own pattern (NHWC input, Keras ``Rescaling`` as a ``Mul``,
  ``Transpose`` to NCHW around the convs, ``auto_pad=SAME_UPPER``, ``MatMul``+``Add`` dense
  layer, ``Softmax``; a float and a uint8 input);
- the real architectures in the ``onnx`` package's bundled light models
  (``onnx/backend/test/data/light``: caffe2 zoo graphs at opset 9 whose weights are constants
  made by ``ConstantOfShape``); the weights are replaced by seeded random ones, so the parity
  check compares real computations rather than constant outputs;
- hand-built graphs that must be *refused* in one line (a quantized op nothing dequantizes, an
  op nobody converts, control flow);
- **int8** files (a second table): the zoo ResNet-8 quantized by onnxruntime's own quantizer in
  both formats (QOperator, QDQ) and both weight granularities (per tensor, per channel), and the
  real int8 files in ``--shared`` when given; each row records what the loader found (format,
  weights) and its int8 parity: top-1 agreement with onnxruntime running the int8 file, and how
  many classes onnxruntime predicted on those inputs (the random ResNet-8's last layer is
  re-centred first, ``spread_logits``: as initialised it gives every input the same class).

    python tools/onnx_coverage.py --shared ../shared --out docs/teachers.md   # rewrite both tables
    python tools/onnx_coverage.py --int8-only --shared ../shared --out docs/teachers.md
    python tools/onnx_coverage.py --quick                  # the subset the tests use
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's dfkd_deploy and its test fixtures

from dfkd_deploy.core.errors import DfkdError  # noqa: E402
from dfkd_deploy.recipe import TeacherOptions  # noqa: E402
from tests.teachers.onnx_fixtures import BNFree, NHWCSoftmax, spread_logits, zoo_model  # noqa: E402

TABLE_BEGIN = "<!-- coverage-table:begin (python tools/onnx_coverage.py --out docs/teachers.md) -->"
TABLE_END = "<!-- coverage-table:end -->"
INT8_BEGIN = "<!-- int8-table:begin (python tools/onnx_coverage.py --int8-only --shared ../shared --out docs/teachers.md) -->"
INT8_END = "<!-- int8-table:end -->"

ZOO = {"cifar_resnet8": (3, 32, 32), "tiny_cnn": (3, 32, 32), "small_cnn": (3, 32, 32),
       "mobilenet_v2": (3, 64, 64), "resnet18": (3, 64, 64)}
LIGHT = ("light_bvlc_alexnet", "light_densenet121", "light_inception_v1", "light_inception_v2",
         "light_resnet50", "light_shufflenet", "light_squeezenet", "light_vgg19", "light_zfnet512")


@dataclass
class Case:
    model: str
    producer: str
    opset: Optional[int]
    write: Callable[[Path], Path]          # writes the file into a directory, returns its path
    options: TeacherOptions = field(default_factory=TeacherOptions)
    expect_refusal: bool = False


@dataclass
class Row:
    model: str
    producer: str
    opset: Optional[int]
    converted: bool
    bn_nodes: Optional[int] = None         # BatchNormalization nodes in the file
    bn_layers: Optional[int] = None        # BN layers the loaded teacher offers to the BN loss
    max_abs_diff: Optional[float] = None
    layout: Optional[str] = None
    value_range: Optional[float] = None
    output: Optional[str] = None
    input_shape: Optional[tuple] = None
    message: str = ""                      # the refusal (op, node, opset) or the detection notes
    expect_refusal: bool = False
    seconds: float = 0.0
    not_written: bool = False              # the producer itself could not write this file
    int8: Optional[dict] = None            # int8 files: TeacherSpec.int8 (format, weights, parity figures)

    @property
    def as_expected(self) -> bool:
        return self.not_written or self.converted != self.expect_refusal


@contextlib.contextmanager
def _quiet():
    """No warnings, and nothing on stdout/stderr, including what torch's C++ side prints (the
    legacy exporter dumps whole graphs when it fails)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def write_dynamo_default(model: nn.Module, shape, opset: int, path: Path, nhwc: bool = False) -> Path:
    """torch.onnx.export as a user calls it: dynamo, fixed example batch, external data."""
    x = torch.randn(2, *(shape[1], shape[2], shape[0]) if nhwc else shape)
    with _quiet():
        torch.onnx.export(model, (x,), str(path), opset_version=opset)
    return path


def write_legacy(model: nn.Module, shape, opset: int, path: Path, fold: bool, nhwc: bool = False) -> Path:
    x = torch.randn(1, *(shape[1], shape[2], shape[0]) if nhwc else shape)
    with _quiet():
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, do_constant_folding=fold,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def write_export_teacher(model: nn.Module, shape, path: Path, exporter: str, opset: Optional[int] = None) -> Path:
    from exporters.onnx_export import export_teacher_onnx

    with _quiet():
        return export_teacher_onnx(model, path, input_shape=shape, exporter=exporter, opset=opset,
                                   mean=(0.5,) * shape[0], std=(0.25,) * shape[0])


def tf2onnx_graph(opset: int, *, uint8: bool = False, size=(28, 36), channels: int = 1, classes: int = 6,
                  seed: int = 0):
    """A Keras-style classifier in tf2onnx's pattern, built node by node (see the module doc)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    h, w = size

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)

    nodes, inits = [], []
    x = "input_1"
    if uint8:
        nodes.append(helper.make_node("Cast", [x], ["input_1_float"], to=TensorProto.FLOAT, name="Cast__5"))
        x = "input_1_float"
    inits.append(init("rescaling/Cast/x:0", np.float32(1 / 255)))
    nodes.append(helper.make_node("Mul", [x, "rescaling/Cast/x:0"], ["rescaling/mul:0"], name="rescaling/mul"))
    nodes.append(helper.make_node("Transpose", ["rescaling/mul:0"], ["conv2d/Conv2D__6:0"], perm=[0, 3, 1, 2],
                                  name="conv2d/Conv2D__6"))
    inits += [init("conv2d/Conv2D/ReadVariableOp:0", rng.normal(0, 0.3, (8, channels, 3, 3))),
              init("conv2d/BiasAdd/ReadVariableOp:0", rng.normal(0, 0.1, 8))]
    nodes.append(helper.make_node("Conv", ["conv2d/Conv2D__6:0", "conv2d/Conv2D/ReadVariableOp:0",
                                           "conv2d/BiasAdd/ReadVariableOp:0"], ["conv2d/BiasAdd:0"],
                                  kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", name="conv2d/BiasAdd"))
    nodes.append(helper.make_node("Relu", ["conv2d/BiasAdd:0"], ["conv2d/Relu:0"], name="conv2d/Relu"))
    nodes.append(helper.make_node("MaxPool", ["conv2d/Relu:0"], ["max_pooling2d/MaxPool:0"], kernel_shape=[2, 2],
                                  strides=[2, 2], name="max_pooling2d/MaxPool"))
    nodes.append(helper.make_node("Transpose", ["max_pooling2d/MaxPool:0"], ["max_pooling2d/MaxPool__12:0"],
                                  perm=[0, 2, 3, 1], name="max_pooling2d/MaxPool__12"))
    nodes.append(helper.make_node("ReduceMean", ["max_pooling2d/MaxPool__12:0"], ["gap/Mean:0"], axes=[1, 2],
                                  keepdims=0, name="global_average_pooling2d/Mean"))
    inits += [init("dense/MatMul/ReadVariableOp:0", rng.normal(0, 0.5, (8, classes))),
              init("dense/BiasAdd/ReadVariableOp:0", rng.normal(0, 0.1, classes))]
    nodes.append(helper.make_node("MatMul", ["gap/Mean:0", "dense/MatMul/ReadVariableOp:0"], ["dense/MatMul:0"],
                                  name="dense/MatMul"))
    nodes.append(helper.make_node("Add", ["dense/MatMul:0", "dense/BiasAdd/ReadVariableOp:0"], ["dense/BiasAdd:0"],
                                  name="dense/BiasAdd"))
    nodes.append(helper.make_node("Softmax", ["dense/BiasAdd:0"], ["dense/Softmax:0"],
                                  name="dense/Softmax", **({} if opset >= 13 else {"axis": 1})))
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("input_1", TensorProto.UINT8 if uint8 else TensorProto.FLOAT,
                                       ["unk__17", h, w, channels])],
        [helper.make_tensor_value_info("dense/Softmax:0", TensorProto.FLOAT, ["unk__18", classes])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx",
                              producer_version="1.16.1 15c810")
    model.ir_version = 7 if opset < 15 else 8
    return model


def refusal_graph(kind: str):
    """Graphs that must be refused in one line: 'qint' (a quantized op nothing dequantizes,
    ConvInteger), 'op' (Shrink), 'loop' (If)."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(np.full((4, 3, 8, 8), 0.01, np.float32), "w")
    head = [helper.make_node("Conv", ["h", "w"], ["c"], name="conv"),
            helper.make_node("Flatten", ["c"], ["y"], name="flatten")]
    inits = [w]
    if kind == "qint":
        inits += [numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z"),
                  numpy_helper.from_array(np.ones((3, 3, 1, 1), np.uint8), "wq")]
        body = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="input_quant"),
                helper.make_node("ConvInteger", ["q", "wq", "z"], ["ci"], name="conv_integer"),
                helper.make_node("Cast", ["ci"], ["h"], to=TensorProto.FLOAT, name="cast")]
    elif kind == "op":
        body = [helper.make_node("Shrink", ["x"], ["h"], lambd=0.5, name="shrink_0")]
    elif kind == "loop":
        then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                                 [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
        other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                                  [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        body = [helper.make_node("If", ["cond"], ["h"], then_branch=then, else_branch=other, name="branch")]
    else:
        raise ValueError(kind)
    graph = helper.make_graph(body + head, kind, [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def randomised_light(name: str, seed: int = 0):
    """A bundled light model with its constant weights folded and replaced by seeded random
    ones (He-scaled for conv/dense weights; BN statistics in sensible ranges)."""
    import onnx
    from onnx import numpy_helper

    from dfkd_deploy.teachers.converters import fold_constants

    model = onnx.load(str(light_dir() / f"{name}.onnx"))
    fold_constants(model)
    rng = np.random.default_rng(seed)
    role: dict[str, tuple[str, int, object]] = {}
    for node in model.graph.node:
        for i, name_in in enumerate(node.input):
            role.setdefault(name_in, (node.op_type, i, node))
    for k, t in enumerate(model.graph.initializer):
        if t.data_type != onnx.TensorProto.FLOAT or t.name not in role:
            continue
        op, i, node = role[t.name]
        dims = list(t.dims)
        if op in ("Conv", "ConvTranspose") and i == 1:
            value = rng.normal(0, np.sqrt(2 / max(1, int(np.prod(dims[1:])))), dims)
        elif op == "Gemm" and i == 1:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            value = rng.normal(0, np.sqrt(2 / max(1, dims[1] if trans_b else dims[0])), dims)
        elif op == "BatchNormalization" and i in (1, 4):      # scale, variance
            value = rng.uniform(0.5, 1.5, dims)
        elif op in ("Mul", "Div"):
            value = rng.uniform(0.5, 1.5, dims)
        else:                                               # biases, BN shift and mean, ...
            value = rng.normal(0, 0.1, dims)
        model.graph.initializer[k].CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
    _rescale_logits(model, target_std=3.0, seed=seed)
    return model


_HOMOGENEOUS = {"Relu", "GlobalAveragePool", "AveragePool", "MaxPool", "Reshape", "Flatten", "Dropout", "Identity",
                "Squeeze"}


def _rescale_logits(model, target_std: float, seed: int) -> None:
    """Scale the last Gemm/Conv so the logits have a moderate spread: random weights through
    50 layers can make them huge, and a saturated Softmax would hide converter errors."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(model.graph.output[0].name)
    logits = model.graph.output[0].name
    if node is not None and node.op_type == "Softmax":
        logits = node.input[0]
        node = producers.get(logits)
    while node is not None and node.op_type in _HOMOGENEOUS:   # positively homogeneous: scaling passes through
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Gemm", "Conv"):
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(logits))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    x = np.random.default_rng(seed).standard_normal([d if isinstance(d, int) else 1 for d in inp.shape])
    std = float(np.std(session.run(None, {inp.name: x.astype(np.float32)})[0]))
    if not np.isfinite(std) or std == 0:
        return
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    for name in node.input[1:3]:
        if name in inits:
            t = model.graph.initializer[inits[name]]
            scaled = numpy_helper.to_array(t) * (target_std / std)
            t.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), name))


# --------------------------------------------------------------------------- the matrix


def zoo_cases(quick: bool = False) -> list[Case]:
    models = {"cifar_resnet8": ZOO["cifar_resnet8"]} if quick else ZOO
    dynamo_opsets = (18,) if quick else (18, 20, 23)
    legacy_opsets = (17,) if quick else (9, 13, 17, 20)
    nhwc_opsets = (11,) if quick else (9, 11, 13)
    cases: list[Case] = []
    for name, shape in models.items():
        def m(name=name, shape=shape):
            return zoo_model(name, shape)
        for op in dynamo_opsets:
            cases.append(Case(name, "dynamo, as torch.onnx.export writes it (BN folded, fixed batch, external data)",
                              op, lambda d, m=m, s=shape, op=op: write_dynamo_default(m(), s, op, d / "t.onnx")))
        cases.append(Case(name, "dynamo via `export-teacher --exporter dynamo` (dynamic batch, metadata)", 18,
                          lambda d, m=m, s=shape: write_export_teacher(m(), s, d / "t.onnx", "dynamo")))
        for op in legacy_opsets:
            cases.append(Case(name, "legacy, BN kept (no constant folding)", op,
                              lambda d, m=m, s=shape, op=op: write_legacy(m(), s, op, d / "t.onnx", fold=False)))
            cases.append(Case(name, "legacy, constant folding (BN folded)", op,
                              lambda d, m=m, s=shape, op=op: write_legacy(m(), s, op, d / "t.onnx", fold=True)))
        for op in nhwc_opsets:
            cases.append(Case(name, "tf2onnx-like: NHWC input + Softmax head (legacy, folded)", op,
                              lambda d, m=m, s=shape, op=op: write_legacy(NHWCSoftmax(m()), s, op, d / "t.onnx",
                                                                          fold=True, nhwc=True)))
    return cases


def extra_cases(quick: bool = False) -> list[Case]:
    import onnx

    def save(model, d):
        onnx.save(model, str(d / "t.onnx"))
        return d / "t.onnx"

    def bnfree():
        torch.manual_seed(0)
        return BNFree().eval()

    shape = (1, 24, 40)
    cases = []
    if not quick:     # (the tests export this one themselves: tests/teachers/test_onnx_conventions.py)
        cases += [Case("BN-free CNN (GroupNorm, GELU, LayerNorm), grey 24x40", "dynamo, dynamic batch", op,
                       lambda d, op=op: write_export_teacher(bnfree(), shape, d / "t.onnx", "dynamo", opset=op))
                  for op in (18, 20, 23)]
        cases.append(Case("BN-free CNN (GroupNorm, GELU, LayerNorm), grey 24x40", "legacy", 17,
                          lambda d: write_legacy(bnfree(), shape, 17, d / "t.onnx", fold=True)))
    for op in ((13,) if quick else (9, 11, 13)):
        cases.append(Case("Keras-style CNN, grey 28x36", "tf2onnx pattern, hand-built (float input)", op,
                          lambda d, op=op: save(tf2onnx_graph(op), d)))
    cases.append(Case("Keras-style CNN, grey 28x36", "tf2onnx pattern, hand-built (uint8 input)", 13,
                      lambda d: save(tf2onnx_graph(13, uint8=True), d)))
    for kind, what in (("qint", "quantized conv net (ConvInteger)"), ("op", "Shrink op"), ("loop", "If (control flow)")):
        cases.append(Case(f"hand-built: {what}", "onnx.helper", 17, lambda d, k=kind: save(refusal_graph(k), d),
                          expect_refusal=True))
    return cases


def light_cases(names=LIGHT) -> list[Case]:
    import onnx

    def write(d, n):
        path = d / f"{n}.onnx"
        onnx.save(randomised_light(n), str(path))
        return path

    return [Case(n.replace("light_", ""), "onnx model zoo (caffe2), bundled `light_*` file, random weights", 9,
                 lambda d, n=n: write(d, n)) for n in names]


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over seeded Gaussian batches."""

    def __init__(self, name: str, shape, batches: int = 8, seed: int = 0):
        gen = np.random.default_rng(seed)
        self.name = name
        self.batches = iter([gen.standard_normal((4, *shape)).astype(np.float32) for _ in range(batches)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}


def write_ort_int8(model: nn.Module, shape, path: Path, fmt: str, per_channel: bool, reduce_range: bool) -> Path:
    """A float legacy export (BN folded), quantized statically by onnxruntime's own quantizer."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    float_path = write_legacy(model, shape, 13, path.with_name("float.onnx"), fold=True)
    with _quiet():
        quantize_static(str(float_path), str(path), _Calibration("input", shape),
                        quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
                        per_channel=per_channel, reduce_range=reduce_range)
    return path


# The real int8 files in ../shared, with the normalisation ../shared/README.md gives for each.
SHARED_INT8 = {
    "cifar10-resnet8-mlperftiny-int8.onnx": ("MLPerf Tiny ResNet-8 (Intel Neural Compressor)",
                                             (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet-mobilenetv2-12-int8.onnx": ("ONNX model zoo MobileNetV2-12 int8, 224 px",
                                          (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def int8_cases(shared: Optional[Path] = None, quick: bool = False) -> list[Case]:
    name, shape = "cifar_resnet8", ZOO["cifar_resnet8"]
    grid = [("QOperator", True, True), ("QDQ", False, True)] if quick else \
        [(f, pc, True) for f in ("QOperator", "QDQ") for pc in (False, True)] + [("QOperator", True, False)]
    cases = []
    for fmt, per_channel, reduce_range in grid:
        what = f"onnxruntime quantize_static, {fmt}, {'per-channel' if per_channel else 'per-tensor'}" + \
            ("" if reduce_range else ", reduce_range off (u8s8 saturation on CPUs without VNNI)")
        cases.append(Case(name, what, 13, lambda d, fmt=fmt, pc=per_channel, rr=reduce_range:
                          write_ort_int8(spread_logits(zoo_model(name, shape), shape), shape, d / "t.onnx",
                                         fmt, pc, rr)))
    for file, (what, mean, std) in SHARED_INT8.items():
        path = None if shared is None else Path(shared) / "teachers" / file
        if path is not None and path.is_file():
            cases.append(Case(f"`{file}`", what, None, lambda d, p=path: p,
                              options=TeacherOptions(mean=mean, std=std)))
    return cases


def run_case(case: Case, workdir: Path) -> Row:
    import onnx

    from dfkd_deploy.teachers import load_teacher

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            path = case.write(workdir)
    except Exception as exc:  # noqa: BLE001 - the exporter's limitation, not the loader's: recorded
        from dfkd_deploy.core.errors import one_line

        return Row(case.model, case.producer, case.opset, converted=False, not_written=True,
                   message=f"the producer cannot write it: {type(exc).__name__}: "
                           f"{one_line(exc, 400).split(' [Caused by')[0]}",
                   seconds=time.perf_counter() - t0)
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), case.opset)
    bn_nodes = sum(1 for n in proto.graph.node if n.op_type == "BatchNormalization")
    row = Row(case.model, case.producer, opset, converted=False, bn_nodes=bn_nodes, expect_refusal=case.expect_refusal)
    try:
        with _quiet():
            teacher = load_teacher(path, case.options)
    except DfkdError as exc:
        row.message = str(exc).replace(f"{path.name}: ", "", 1)
    else:
        s = teacher.spec
        row.converted = True
        row.bn_layers, row.max_abs_diff, row.layout = s.bn_layers, s.converter_max_abs_diff, s.layout
        row.value_range, row.output, row.input_shape = s.value_range, s.output, s.input_shape
        row.int8 = s.int8
    row.seconds = time.perf_counter() - t0
    return row


def run(cases: list[Case], progress: bool = False) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            row = run_case(case, Path(tmp) / f"case{i}")
            rows.append(row)
            if progress:
                state = f"{row.max_abs_diff:.1e}" if row.converted else row.message
                print(f"[{i + 1}/{len(cases)}] {row.model} | {row.producer} | opset {row.opset}: {state} "
                      f"({row.seconds:.1f}s)", flush=True)
    return rows


def markdown_table(rows: list[Row]) -> str:
    head = ("| model | producer | opset | BN nodes in file | result | BN layers used | parity max abs diff | "
            "input seen as | output | notes |\n|---|---|---:|---:|---|---:|---:|---|---|---|\n")
    lines = []
    for r in rows:
        if r.converted:
            c = r.input_shape
            seen = f"{r.layout} {c[0]}x{c[1]}x{c[2]}, [0,{r.value_range:g}]"
            lines.append(f"| {r.model} | {r.producer} | {r.opset} | {r.bn_nodes} | converted | {r.bn_layers} | "
                         f"{r.max_abs_diff:.1e} | {seen} | {r.output} | |")
        elif r.not_written:
            lines.append(f"| {r.model} | {r.producer} | {r.opset} | | not written | | | | | "
                         f"{r.message.replace('|', '/')} |")
        else:
            verdict = "refused (expected)" if r.expect_refusal else "**refused**"
            lines.append(f"| {r.model} | {r.producer} | {r.opset} | {r.bn_nodes} | {verdict} | | | | | "
                         f"{r.message.replace('|', '/')} |")
    return head + "\n".join(lines) + "\n"


def int8_table(rows: list[Row]) -> str:
    head = ("| file | producer | opset | result | format | weight scales | top-1 agreement with onnxruntime "
            "(random probes / smooth images) | max abs logit diff | notes |\n|---|---|---:|---|---|---|---|---:|---|\n")
    lines = []
    for r in rows:
        q = r.int8 or {}
        if r.converted and q:
            agree = (f"{q['agreement_probes']:.1%} / {q['agreement_smooth']:.1%} ({q['images']} each; onnxruntime "
                     f"predicted {q['classes_probes']} / {q['classes_smooth']} classes)")
            lines.append(f"| {r.model} | {r.producer} | {r.opset} | converted | {q['format']} | "
                         f"{'per channel' if q['per_channel'] else 'per tensor'} | {agree} | {r.max_abs_diff:.3g} | "
                         f"surrogate activations: {q['activations']} |")
        else:
            verdict = "not written" if r.not_written else ("refused (expected)" if r.expect_refusal else "**refused**")
            lines.append(f"| {r.model} | {r.producer} | {r.opset or ''} | {verdict} | | | | | "
                         f"{r.message.replace('|', '/')} |")
    return head + "\n".join(lines) + "\n"


def write_into(doc: Path, table: str, footer: str, begin: str = TABLE_BEGIN, end: str = TABLE_END) -> None:
    """Replace the text between the table markers in ``doc`` (appending them if absent)."""
    from dfkd_deploy.core.io import write_text

    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{table}\n{footer}\n{end}"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(doc, text)


def _footer(command: str, seconds: float, rows: list[Row]) -> str:
    import onnx
    import onnxruntime

    from importlib.metadata import version

    return (f"Generated by `{command}` in {seconds:.0f} s (load average {os.getloadavg()[0]:.1f}): torch "
            f"{torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, onnx2torch "
            f"{version('onnx2torch')}. {sum(r.converted for r in rows)} of {len(rows)} files converted; "
            f"{sum(not r.as_expected for r in rows)} unexpected results.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/onnx_coverage.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the subset the tests run")
    parser.add_argument("--no-light", action="store_true", help="skip the onnx package's light models")
    parser.add_argument("--int8-only", action="store_true", help="only the int8 table")
    parser.add_argument("--shared", type=Path, help="../shared: adds its real int8 files to the int8 table")
    parser.add_argument("--out", type=Path, help="markdown file whose coverage tables to rewrite")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    flags = "".join(f" {f}" for f, on in (("--quick", args.quick), ("--no-light", args.no_light)) if on)
    tables = []
    if not args.int8_only:
        cases = zoo_cases(args.quick) + extra_cases(args.quick)
        if not args.no_light:
            cases += light_cases(LIGHT if not args.quick else ("light_squeezenet", "light_shufflenet"))
        t0 = time.perf_counter()
        rows = run(cases, progress=True)
        tables.append((markdown_table(rows), _footer(f"python tools/onnx_coverage.py{flags}",
                                                     time.perf_counter() - t0, rows), TABLE_BEGIN, TABLE_END, rows))
    t0 = time.perf_counter()
    rows = run(int8_cases(args.shared, args.quick), progress=True)
    shared = " --shared ../shared" if args.shared else ""
    tables.append((int8_table(rows), _footer(f"python tools/onnx_coverage.py --int8-only{flags}{shared}",
                                             time.perf_counter() - t0, rows), INT8_BEGIN, INT8_END, rows))
    for table, footer, begin, end, _ in tables:
        if args.out:
            write_into(args.out, table, footer, begin, end)
        else:
            print(table + "\n" + footer)
    if args.out:
        print(f"tables written into {args.out}")
    return 0 if all(r.as_expected for *_, rows in tables for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
