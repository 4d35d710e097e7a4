"""int8 ONNX teachers as float torch teachers: one graph rewrite before onnx2torch.

A quantized file computes on integers; distillation needs gradients with respect to the input.
:func:`dequantize` rewrites a *copy* of the graph so that every quantized tensor carries its real
value ``(q - zero_point) * scale`` instead of ``q``:

- weights and biases stored as integers become float initializers, dequantized per tensor or per
  channel (``QLinearConv`` weights along the output channels, ``QLinearMatMul`` / ``QGemm``
  weights along the output columns, ``DequantizeLinear`` along its ``axis``; int32 biases with the
  scale ``x_scale * w_scale``);
- every op that produces a quantized activation (``QuantizeLinear``, ``QLinear*``, ``QGemm``)
  becomes its float op followed by a ``FakeQuant`` node of this project's domain at the file's
  output scale and zero point: the clamp to the integer range is kept (it is where the fused ReLU
  or ReLU6 of a quantized graph lives) and, with ``teacher.int8_activations: fake_quant``, the
  rounding too, with a straight-through gradient; with ``float`` the rounding is dropped;
- ``DequantizeLinear`` of an activation becomes ``Identity`` (the value is already real).

Both formats are covered: QOperator (``QLinearConv``, ``QLinearMatMul``, the com.microsoft
``QLinearAdd``/``Mul``/``GlobalAveragePool``/``AveragePool``/``Sigmoid``/``LeakyRelu``/``Concat``,
``QGemm``) and QDQ (``QuantizeLinear``/``DequantizeLinear`` pairs around float ops). Ops that
pass values through (Reshape, MaxPool, ...) need nothing. A quantized op not listed here stays in
the graph and the loader refuses it by op and node name. The loader checks the result against
onnxruntime running the int8 file itself (``onnx_teacher``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from dfkd_deploy.core.errors import TeacherError

DOMAIN = "dfkd_deploy"      # the same custom domain as converters.DOMAIN
_MS = "com.microsoft"

# (domain, op) -> (float op, index of the first input of each operand (value, scale, zp), output scale/zp index)
_ELEMENTWISE = {"QLinearAdd": "Add", "QLinearMul": "Mul"}
_UNARY = {"QLinearGlobalAveragePool": "GlobalAveragePool", "QLinearAveragePool": "AveragePool",
          "QLinearSigmoid": "Sigmoid", "QLinearLeakyRelu": "LeakyRelu"}
HANDLED = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "QLinearConcat",
           *_ELEMENTWISE, *_UNARY}
# Quantized ops a file may hold that this module does not rewrite (the loader names them).
KNOWN_QUANTIZED = HANDLED | {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearSoftmax",
                             "QLinearWhere", "QLinearReduceMean", "DynamicQuantizeMatMul", "QAttention",
                             "QLinearReduceMean", "MatMulIntegerToFloat", "QuantizeBFP", "DequantizeBFP"}
_QOPERATOR = HANDLED - {"QuantizeLinear", "DequantizeLinear"}
_RANGES = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767)}   # uint8, int8, uint16, int16
ACTIVATION_MODES = ("fake_quant", "float")


@dataclass
class QuantSummary:
    """What the rewrite found, for ``inspect`` and the teacher's notes."""

    format: str                                  # "QOperator", "QDQ" or "QOperator+QDQ"
    ops: dict[str, int] = field(default_factory=dict)
    per_channel: bool = False
    activations: str = "fake_quant"
    activation_ranges: int = 0                   # FakeQuant nodes (quantized activations) in the surrogate

    def describe(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.ops.items()))
        weights = "per-channel" if self.per_channel else "per-tensor"
        acts = ("fake-quantized at the file's scales (round with a straight-through gradient, clamp)"
                if self.activations == "fake_quant" else "in float, clamped to the file's quantized ranges")
        return (f"int8 teacher ({self.format} format, {weights} weight scales; quantized ops: {ops}); surrogate: a "
                f"float torch module with the dequantized weights, {self.activation_ranges} activations {acts} "
                f"(teacher.int8_activations: {self.activations})")


def is_quantized(model) -> bool:
    """True when the graph holds quantized ops and all of them are ones :func:`dequantize`
    rewrites (otherwise the loader refuses the first one it cannot, by op and node)."""
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & HANDLED) and not ops & (KNOWN_QUANTIZED - HANDLED)


class FakeQuant(nn.Module):
    """Quantize-dequantize at a fixed scale and zero point: clamp to the integer range, and round
    with a straight-through gradient (identity) when ``rounding``; per tensor or along ``axis``."""

    def __init__(self, scale, zero_point, qmin: int, qmax: int, axis: Optional[int], rounding: bool):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.float32))
        self.qmin, self.qmax, self.axis, self.rounding = float(qmin), float(qmax), axis, bool(rounding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.scale, self.zero_point
        if scale.ndim and self.axis is not None:
            shape = [1] * x.ndim
            shape[self.axis % x.ndim] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        q = x / scale + zp
        if self.rounding:
            q = q + (torch.round(q) - q).detach()
        return (torch.clamp(q, self.qmin, self.qmax) - zp) * scale


def convert_fake_quant(node, graph):
    """onnx2torch converter for the FakeQuant nodes :func:`dequantize` writes."""
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    a = node.attributes
    axis = a.get("axis", -999)
    module = FakeQuant(list(a["scale"]), list(a["zero_point"]), a["qmin"], a["qmax"],
                       None if axis == -999 else axis, bool(a["rounding"]))
    if len(module.scale) == 1:
        module.scale, module.zero_point = module.scale[0].clone(), module.zero_point[0].clone()
    return OperationConverterResult(torch_module=module,
                                    onnx_mapping=OnnxMapping(inputs=tuple(node.input_values[:1]),
                                                             outputs=node.output_values))


# --------------------------------------------------------------------------- the rewrite


class _Rewriter:
    def __init__(self, model, rounding: bool, name: str):
        from onnx import numpy_helper

        self.name = name
        self.rounding = rounding
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.dtypes: dict[str, int] = {t.name: t.data_type for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and (n.domain or "") in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                        self.dtypes[n.output[0]] = a.t.data_type
        self.new_inits: dict[str, np.ndarray] = {}
        self.per_channel = False
        self.fake_quants = 0
        self.dq_constants = 0
        self.counter = 0

    # ---- helpers
    def const(self, name: str, node) -> np.ndarray:
        if name not in self.consts:
            raise TeacherError(f"{self.name}: the {node.op_type} node '{node.name}' takes its scale or zero point "
                               f"{name!r} from a computed tensor; only constant quantization parameters are supported")
        return self.consts[name]

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}__dfkd_q{self.counter}"

    def qrange(self, zp_name: Optional[str]) -> tuple[int, int]:
        if not zp_name:
            return _RANGES[2]          # no zero point: uint8 (the ONNX default)
        dtype = self.dtypes.get(zp_name)
        if dtype not in _RANGES:
            raise TeacherError(f"{self.name}: zero point {zp_name!r} has an unsupported type {dtype}")
        return _RANGES[dtype]

    def operand(self, value: str, scale: str, zp: Optional[str], node, axis: int) -> str:
        """A float tensor name for a quantized operand: a dequantized initializer when constant."""
        if value not in self.consts:
            return value
        s = self.const(scale, node).astype(np.float64)
        z = self.const(zp, node).astype(np.float64) if zp else np.zeros_like(s)
        q = self.consts[value].astype(np.float64)
        if s.size > 1:
            self.per_channel = True
            shape = [1] * q.ndim
            shape[axis % q.ndim] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        name = self.fresh(value)
        self.new_inits[name] = ((q - z) * s).astype(np.float32)
        return name

    def bias(self, value: str, x_scale: str, w_scale: str, node) -> str:
        s = self.const(x_scale, node).astype(np.float64) * self.const(w_scale, node).astype(np.float64)
        name = self.fresh(value)
        self.new_inits[name] = (self.const(value, node).astype(np.float64) * s.reshape(-1)).astype(np.float32)
        return name

    def fake_quant(self, x: str, out: str, scale: str, zp: Optional[str], node, axis: Optional[int] = None):
        from onnx import helper

        s = np.asarray(self.const(scale, node), np.float64).reshape(-1)
        z = (np.asarray(self.const(zp, node), np.float64).reshape(-1) if zp else np.zeros_like(s))
        qmin, qmax = self.qrange(zp)
        self.fake_quants += 1
        attrs = dict(scale=[float(v) for v in s], zero_point=[float(v) for v in z], qmin=qmin, qmax=qmax,
                     rounding=int(self.rounding))
        if s.size > 1:
            attrs["axis"] = 1 if axis is None else int(axis)
        return helper.make_node("FakeQuant", [x], [out], name=f"{node.name or out}/fake_quant", domain=DOMAIN,
                                **attrs)

    # ---- one node -> replacement nodes
    def rewrite(self, node) -> list:
        from onnx import helper

        op, i, out = node.op_type, list(node.input) + [""] * 9, node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        tmp = self.fresh(out)
        if op == "QuantizeLinear":
            return [self.fake_quant(i[0], out, i[1], i[2], node, attrs.get("axis", 1))]
        if op == "DequantizeLinear":
            if i[0] in self.consts:             # QDQ weights and biases
                self.dq_constants += 1
                self.consts[out] = self.new_inits[self.operand(i[0], i[1], i[2], node, attrs.get("axis", 1))]
                self.new_inits[out] = self.consts[out]
                return []
            return [helper.make_node("Identity", [i[0]], [out], name=node.name)]
        if op == "QLinearConv":
            inputs = [i[0], self.operand(i[3], i[4], i[5], node, axis=0)]
            if i[8]:
                inputs.append(self.bias(i[8], i[1], i[4], node))
            conv = helper.make_node("Conv", inputs, [tmp], name=node.name, **attrs)
            return [conv, self.fake_quant(tmp, out, i[6], i[7], node)]
        if op == "QLinearMatMul":
            a = self.operand(i[0], i[1], i[2], node, axis=-2)
            b = self.operand(i[3], i[4], i[5], node, axis=-1)
            return [helper.make_node("MatMul", [a, b], [tmp], name=node.name),
                    self.fake_quant(tmp, out, i[6], i[7], node)]
        if op == "QGemm":
            trans_b = attrs.get("transB", 0)
            a = self.operand(i[0], i[1], i[2], node, axis=-1 if attrs.get("transA", 0) else -2)
            b = self.operand(i[3], i[4], i[5], node, axis=0 if trans_b else -1)
            inputs = [a, b] + ([self.bias(i[6], i[1], i[4], node)] if i[6] else [])
            if i[6]:
                self.new_inits[inputs[2]] *= np.float32(attrs.get("alpha", 1.0))
            gemm_attrs = {k: v for k, v in attrs.items() if k in ("alpha", "transA", "transB")}
            if not i[7]:                        # no output scale: the result is float
                return [helper.make_node("Gemm", inputs, [out], name=node.name, **gemm_attrs)]
            return [helper.make_node("Gemm", inputs, [tmp], name=node.name, **gemm_attrs),
                    self.fake_quant(tmp, out, i[7], i[8], node)]
        if op in _ELEMENTWISE:
            a = self.operand(i[0], i[1], i[2], node, axis=1)
            b = self.operand(i[3], i[4], i[5], node, axis=1)
            return [helper.make_node(_ELEMENTWISE[op], [a, b], [tmp], name=node.name),
                    self.fake_quant(tmp, out, i[6], i[7], node)]
        if op in _UNARY:
            if attrs.pop("channels_last", 0):
                raise TeacherError(f"{self.name}: the {op} node '{node.name}' is channels_last, which is not "
                                   "supported; give the model with NCHW quantized ops")
            return [helper.make_node(_UNARY[op], [i[0]], [tmp], name=node.name, **attrs),
                    self.fake_quant(tmp, out, i[3], i[4], node)]
        if op == "QLinearConcat":
            values = [self.operand(node.input[k], node.input[k + 1], node.input[k + 2], node, axis=1)
                      for k in range(2, len(node.input), 3)]
            return [helper.make_node("Concat", values, [tmp], name=node.name, axis=attrs["axis"]),
                    self.fake_quant(tmp, out, i[0], i[1], node)]
        return [node]


def dequantize(model, activations: str = "fake_quant", name: str = "teacher"):
    """(a float copy of ``model``, QuantSummary): see the module docstring."""
    import onnx
    from onnx import numpy_helper

    if activations not in ACTIVATION_MODES:
        raise TeacherError(f"teacher.int8_activations must be one of {', '.join(ACTIVATION_MODES)}, not {activations!r}")
    ops = Counter(n.op_type for n in model.graph.node if n.op_type in KNOWN_QUANTIZED)
    rw = _Rewriter(model, rounding=activations == "fake_quant", name=name)
    nodes = []
    for node in model.graph.node:
        handled = node.op_type in HANDLED and (node.domain or "") in ("", "ai.onnx", _MS)
        nodes.extend(rw.rewrite(node) if handled else [node])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used and t.name not in rw.new_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in rw.new_inits.items() if k in used)
    for o in graph.output:
        o.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    _infer_shapes(out)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.add(domain=DOMAIN, version=1)
    qoperator = any(op in _QOPERATOR for op in ops)
    fmt = ("QOperator+QDQ" if rw.dq_constants else "QOperator") if qoperator else "QDQ"
    summary = QuantSummary(format=fmt, ops=dict(ops), per_channel=rw.per_channel, activations=activations,
                           activation_ranges=rw.fake_quants)
    return out, summary


def _infer_shapes(model) -> None:
    """Value shapes for the rewritten graph (onnx2torch's GlobalAveragePool and BatchNorm
    converters read their input's rank from them): inferred on a copy where each FakeQuant is an
    Identity, which has the same shape, since inference cannot see through our domain's ops."""
    import onnx

    del model.graph.value_info[:]            # quantized tensors are float now
    shadow = onnx.ModelProto()
    shadow.CopyFrom(model)
    for node in shadow.graph.node:
        if node.domain == DOMAIN and node.op_type == "FakeQuant":
            node.domain, node.op_type = "", "Identity"
            del node.attribute[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(shadow)
    except Exception:  # noqa: BLE001 - leave it to the converters to say what they miss
        return
    model.graph.value_info.extend(inferred.graph.value_info)


# --- what the input quantizer says about the input ------------------------------------------------

# Normalisations a quantized input range is matched against: (name, mean, std) on [0,1] pixels.
KNOWN_NORMALISATIONS = (("ImageNet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                        ("[-1, 1] (mean 0.5, std 0.5)", (0.5,), (0.5,)))
RANGE_MATCH = 0.02      # each end within 2% of the range's span


def input_range(model, input_name: str) -> Optional[tuple[float, float]]:
    """The float interval the QuantizeLinear applied to the graph's input can represent, or None
    (no such node, or a per-channel input scale)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] != input_name or len(node.input) < 2:
            continue
        if node.input[1] not in inits:
            return None
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
        if scale.size != 1 or (zp is not None and zp.size != 1):
            return None
        qmin, qmax = _RANGES.get(inits[node.input[2]].data_type, (0, 255)) if zp is not None else (0, 255)
        z = float(zp.reshape(-1)[0]) if zp is not None else 0.0
        s = float(scale.reshape(-1)[0])
        return (qmin - z) * s, (qmax - z) * s
    return None


def match_normalisation(lo: float, hi: float, channels: int):
    """(name, mean, std) of the known normalisation that maps [0,1] pixels onto [lo, hi], or None."""
    span = hi - lo
    for name, mean, std in KNOWN_NORMALISATIONS:
        m = np.array(mean * channels if len(mean) == 1 else mean, dtype=np.float64)
        s = np.array(std * channels if len(std) == 1 else std, dtype=np.float64)
        if len(m) != channels or span <= 0:
            continue
        want_lo, want_hi = float(np.min(-m / s)), float(np.max((1 - m) / s))
        if abs(lo - want_lo) <= RANGE_MATCH * span and abs(hi - want_hi) <= RANGE_MATCH * span:
            return name, tuple(m.tolist()), tuple(s.tolist())
    return None
