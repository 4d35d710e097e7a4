"""What onnx2torch 1.5.15 cannot read on its own, added through its registration API.

Everything the project adds to onnx2torch lives in this one module:

- :func:`register` adds converters with onnx2torch's ``add_converter`` for the op versions newer
  exporters emit (torch's dynamo exporter: opset 18+, ``Reshape(allowzero=1)``, ``Conv``-22, ...)
  and for a few ops onnx2torch lacks (``CastLike``, ``GlobalMaxPool``, ``Gelu``, ...). Most
  new op versions only widened the accepted tensor types; those are *aliases* that hand the node
  to onnx2torch's converter for the previous version, after refusing any attribute whose new
  meaning that converter would ignore. Nothing already registered is replaced.
- :func:`prepare` rewrites a *copy* of the graph into a form onnx2torch accepts without
  changing what it computes: constant subgraphs (weights made by ``Constant`` or
  ``ConstantOfShape`` nodes, as in the ``onnx`` package's model zoo files) become initializers;
  ``auto_pad=SAME_*`` becomes explicit pads; nodes whose onnx2torch converter refuses them or
  misbehaves (``Reshape(allowzero=1)``, ``AveragePool`` with asymmetric pads, ``Slice``, which
  onnx2torch indexes with a list, ``LayerNormalization``, whose normalised shape onnx2torch reads
  from inferred shapes) move to this project's domain, converted below; and, for a
  file with a fixed batch, ``Reshape`` targets that hard-code it copy the batch dim instead.
- :func:`unsupported_nodes` lists the nodes no converter exists for, so a refusal can name the
  op, the node and the opset before conversion starts.

The converted module is always checked against onnxruntime on the *original* file afterwards
(see ``onnx_teacher``), so a converter here that got something wrong is caught, not trusted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_deploy._compat import import_onnx2torch
from dfkd_deploy.teachers import quantized

DOMAIN = "dfkd_deploy"      # custom-domain ops produced by prepare(), converted below
_DOMAIN_VERSION = 1
_ONNX = ""

# --------------------------------------------------------------------------- modules


class Reshape(nn.Module):
    """ONNX Reshape with ``allowzero``: 0 in the target shape copies the input dim unless
    allowzero=1, where it means a literal 0."""

    def __init__(self, allowzero: bool):
        super().__init__()
        self.allowzero = bool(allowzero)

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [int(d) for d in shape.tolist()]
        if not self.allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return torch.reshape(x, dims)


_REDUCERS: dict[str, Callable] = {
    "ReduceMean": lambda x, dims, keep: torch.mean(x, dim=dims, keepdim=keep),
    "ReduceSum": lambda x, dims, keep: torch.sum(x, dim=dims, keepdim=keep),
    "ReduceMax": lambda x, dims, keep: torch.amax(x, dim=dims, keepdim=keep),
    "ReduceMin": lambda x, dims, keep: torch.amin(x, dim=dims, keepdim=keep),
    "ReduceL1": lambda x, dims, keep: torch.sum(x.abs(), dim=dims, keepdim=keep),
    "ReduceL2": lambda x, dims, keep: torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep)),
    "ReduceSumSquare": lambda x, dims, keep: torch.sum(x * x, dim=dims, keepdim=keep),
    "ReduceLogSum": lambda x, dims, keep: torch.log(torch.sum(x, dim=dims, keepdim=keep)),
    "ReduceLogSumExp": lambda x, dims, keep: torch.logsumexp(x, dim=dims, keepdim=keep),
}


def _reduce_prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


_REDUCERS["ReduceProd"] = _reduce_prod


class Reduce(nn.Module):
    """The opset-18 reductions: axes come as an optional second input, not an attribute."""

    def __init__(self, op: str, keepdims: bool, noop_with_empty_axes: bool, axes: Optional[list[int]] = None):
        super().__init__()
        self.op, self.keepdims, self.noop = op, bool(keepdims), bool(noop_with_empty_axes)
        self.axes = axes      # constant axes, read at conversion; None: from the input at run time
        self.fn = _REDUCERS[op]

    def forward(self, x: torch.Tensor, axes: Optional[torch.Tensor] = None) -> torch.Tensor:
        dims = self.axes if self.axes is not None else ([] if axes is None else [int(a) for a in axes.tolist()])
        if not dims:
            if self.noop:
                return x
            dims = list(range(x.dim()))
        dims = sorted(d % x.dim() for d in dims)
        return self.fn(x, dims, self.keepdims)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


class Pad(nn.Module):
    """ONNX Pad from opset 18 on: optional ``axes`` input, ``wrap`` mode (opset 19)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = _PAD_MODES[mode]

    def forward(self, x: torch.Tensor, pads: torch.Tensor, constant_value: Optional[torch.Tensor] = None,
                axes: Optional[torch.Tensor] = None) -> torch.Tensor:
        rank = x.dim()
        axis_list = list(range(rank)) if axes is None else [int(a) % rank for a in axes.tolist()]
        values = [int(p) for p in pads.tolist()]
        begin, end = [0] * rank, [0] * rank
        for i, a in enumerate(axis_list):
            begin[a], end[a] = values[i], values[i + len(axis_list)]
        torch_pads: list[int] = []
        for d in reversed(range(rank)):            # torch: last dim first, (begin, end) pairs
            torch_pads += [begin[d], end[d]]
        if self.mode != "constant":                # non-constant modes take only the inner dims
            while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
                torch_pads = torch_pads[:-2]
            return F.pad(x, torch_pads, mode=self.mode)
        value = 0.0 if constant_value is None or constant_value.numel() == 0 else float(constant_value.reshape(-1)[0])
        return F.pad(x, torch_pads, mode="constant", value=value)


class InferenceDropout(nn.Module):
    """Dropout as ONNX runs it for inference: the identity, plus an all-true mask when the
    node asks for one (onnx2torch's opset-10 converter would index the output instead)."""

    def __init__(self, with_mask: bool):
        super().__init__()
        self.with_mask = with_mask

    def forward(self, x: torch.Tensor):
        return (x, torch.ones_like(x, dtype=torch.bool)) if self.with_mask else x


class CastLike(nn.Module):
    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype)


class GlobalMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


class Gelu(nn.Module):
    def __init__(self, approximate: str):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(x)


class GroupNorm(nn.Module):
    """ONNX GroupNormalization. Opset 18 gives scale/bias per group, opset 21 per channel."""

    def __init__(self, num_groups: int, epsilon: float, per_group_affine: bool):
        super().__init__()
        self.num_groups, self.epsilon, self.per_group = int(num_groups), float(epsilon), per_group_affine

    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        g = x.float().reshape(n, self.num_groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = g.var(-1, unbiased=False, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + self.epsilon)).reshape(x.shape).to(x.dtype)
        if self.per_group:
            scale = scale.repeat_interleave(c // self.num_groups)
            bias = bias.repeat_interleave(c // self.num_groups)
        view = (1, c) + (1,) * (x.dim() - 2)
        return y * scale.reshape(view) + bias.reshape(view)


class LayerNorm(nn.Module):
    """ONNX LayerNormalization with the normalised shape taken from the input at run time
    (onnx2torch's reads it from inferred shapes, which a dynamic Reshape before it leaves unknown)."""

    def __init__(self, axis: int, epsilon: float):
        super().__init__()
        self.axis, self.epsilon = int(axis), float(epsilon)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = tuple(x.shape[self.axis:])
        if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
            return F.layer_norm(x, shape, scale, bias, self.epsilon)
        y = F.layer_norm(x, shape, None, None, self.epsilon) * scale     # scale/bias broadcast to the shape
        return y if bias is None else y + bias


class Size(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


class SpaceToDepth(nn.Module):
    def __init__(self, blocksize: int):
        super().__init__()
        self.b = int(blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b = self.b
        x = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return x.reshape(n, c * b * b, h // b, w // b)


class UpsampleNearest(nn.Module):
    """Upsample (opset 7-9), nearest mode: ONNX's asymmetric floor indexing is torch's 'nearest'."""

    def __init__(self, scales: Optional[list[float]] = None):
        super().__init__()
        self.scales = scales

    def forward(self, x: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.scales if self.scales is not None else [float(v) for v in scales.tolist()]
        if s[0] != 1 or s[1] != 1:
            raise RuntimeError("Upsample cannot scale the batch or channel dimension")
        return F.interpolate(x, scale_factor=tuple(s[2:]), mode="nearest")


class AveragePoolPadded(nn.Module):
    """AveragePool with asymmetric pads (onnx2torch refuses them): pad explicitly, pool, and
    for count_include_pad=0 divide by the pooled count of real (unpadded) elements."""

    def __init__(self, kernel: list[int], strides: list[int], pads: list[int], count_include_pad: bool,
                 ceil_mode: bool):
        super().__init__()
        self.kernel, self.strides, self.ceil_mode = list(kernel), list(strides), bool(ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        n = len(pads) // 2
        self.torch_pads = [p for d in reversed(range(n)) for p in (pads[d], pads[d + n])]

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(self.kernel)]
        return fn(x, self.kernel, self.strides, 0, self.ceil_mode, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self._pool(F.pad(x, self.torch_pads))
        if self.count_include_pad:
            return pooled
        ones = F.pad(torch.ones_like(x[:1, :1]), self.torch_pads)
        return pooled / self._pool(ones)


class Slice(nn.Module):
    """ONNX Slice, both forms (attributes before opset 10, inputs after), negative steps too.

    Replaces onnx2torch's, which indexes with a list (deprecated by torch, with a warning on
    every new call site)."""

    def __init__(self, starts=None, ends=None, axes=None):
        super().__init__()
        self.starts, self.ends, self.axes = starts, ends, axes     # the attribute form

    @staticmethod
    def _ints(t) -> Optional[list[int]]:
        return None if t is None else [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]

    def forward(self, x: torch.Tensor, starts: Optional[torch.Tensor] = None, ends: Optional[torch.Tensor] = None,
                axes: Optional[torch.Tensor] = None, steps: Optional[torch.Tensor] = None) -> torch.Tensor:
        st = self._ints(self.starts if self.starts is not None else starts)
        en = self._ints(self.ends if self.ends is not None else ends)
        ax = self._ints(self.axes if self.axes is not None else axes) or list(range(len(st)))
        sp = self._ints(steps) or [1] * len(st)
        index: list = [slice(None)] * x.dim()
        picks = []
        for s, e, a, k in zip(st, en, ax, sp):
            a %= x.dim()
            n = x.shape[a]
            s = s + n if s < 0 else s
            e = e + n if e < 0 else e
            if k > 0:
                index[a] = slice(min(max(s, 0), n), min(max(e, 0), n), k)
            else:
                s, e = min(max(s, 0), n - 1), min(max(e, -1), n - 1)
                picks.append((a, list(range(s, e, k))))
        out = x[tuple(index)]
        for a, rows in picks:
            out = out.index_select(a, torch.tensor(rows, dtype=torch.long, device=x.device))
        return out


class Split(nn.Module):
    """Split-18: explicit sizes as an input, or ``num_outputs`` chunks (the last one smaller)."""

    def __init__(self, axis: int, num_outputs: int):
        super().__init__()
        self.axis, self.num_outputs = axis, num_outputs

    def forward(self, x: torch.Tensor, split: Optional[torch.Tensor] = None):
        if split is not None:
            return torch.split(x, [int(s) for s in split.tolist()], dim=self.axis)
        return torch.split(x, math.ceil(x.shape[self.axis] / self.num_outputs), dim=self.axis)


# --------------------------------------------------------------------------- converters


def _result(module: nn.Module, node, inputs=None):
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    return OperationConverterResult(torch_module=module,
                                    onnx_mapping=OnnxMapping(inputs=tuple(node.input_values if inputs is None else inputs),
                                                             outputs=node.output_values))


def _const_ints(name: str, graph) -> Optional[list[int]]:
    """The value of a constant input (initializer or Constant node) as ints; None when computed."""
    from onnx2torch.utils.common import get_const_value

    if not name:
        return None
    try:
        value = get_const_value(name, graph)
    except KeyError:
        return None
    return [int(v) for v in torch.as_tensor(value).reshape(-1).tolist()]


def _convert_reshape(node, graph):
    return _result(Reshape(node.attributes.get("allowzero", 0)), node)


def _convert_reduce(node, graph):
    keepdims = node.attributes.get("keepdims", 1)
    noop = node.attributes.get("noop_with_empty_axes", 0)
    if len(node.input_values) > 1 and node.input_values[1]:
        axes = _const_ints(node.input_values[1], graph)
        if axes is not None:
            return _result(Reduce(node.operation_type, keepdims, noop, axes), node, node.input_values[:1])
        return _result(Reduce(node.operation_type, keepdims, noop), node)
    return _result(Reduce(node.operation_type, keepdims, noop, axes=[]), node, node.input_values[:1])


def _convert_pad(node, graph):
    mode = node.attributes.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f'Pad mode "{mode}" is not implemented')
    return _result(Pad(mode), node)


def _convert_dropout7(node, graph):
    return _result(InferenceDropout(len(node.output_values) > 1 and bool(node.output_values[1])), node,
                   node.input_values[:1])


def _convert_castlike(node, graph):
    return _result(CastLike(), node)


def _convert_global_max_pool(node, graph):
    return _result(GlobalMaxPool(), node)


def _convert_gelu(node, graph):
    return _result(Gelu(node.attributes.get("approximate", "none")), node)


def _convert_mish(node, graph):
    return _result(Mish(), node)


def _group_norm(per_group: bool):
    def convert(node, graph):
        return _result(GroupNorm(node.attributes["num_groups"], node.attributes.get("epsilon", 1e-5), per_group), node)
    return convert


def _convert_layer_norm(node, graph):
    if any(node.output_values[1:]):
        raise NotImplementedError("LayerNormalization with its Mean/InvStdDev outputs is not implemented")
    return _result(LayerNorm(node.attributes.get("axis", -1), node.attributes.get("epsilon", 1e-5)), node)


def _convert_size(node, graph):
    return _result(Size(), node)


def _convert_space_to_depth(node, graph):
    return _result(SpaceToDepth(node.attributes["blocksize"]), node)


def _convert_upsample(node, graph):
    mode = node.attributes.get("mode", "nearest")
    if mode != "nearest":
        raise NotImplementedError(f'Upsample mode "{mode}" is not implemented (only "nearest")')
    scales = node.attributes.get("scales")
    if scales is not None:        # opset 7: an attribute
        return _result(UpsampleNearest([float(s) for s in scales]), node, node.input_values[:1])
    return _result(UpsampleNearest(), node)


def _convert_avgpool_padded(node, graph):
    a = node.attributes
    kernel = list(a["kernel_shape"])
    return _result(AveragePoolPadded(kernel, list(a.get("strides", [1] * len(kernel))), list(a["pads"]),
                                     a.get("count_include_pad", 0), a.get("ceil_mode", 0)), node)


def _convert_slice(node, graph):
    a = node.attributes
    if "starts" in a:                        # opset 1-9
        return _result(Slice(list(a["starts"]), list(a["ends"]), list(a["axes"]) if "axes" in a else None), node,
                       node.input_values[:1])
    return _result(Slice(), node)


def _convert_split18(node, graph):
    return _result(Split(node.attributes.get("axis", 0), len(node.output_values)), node)


def _alias(op: str, base: int, check: Optional[Callable] = None):
    """A converter for a newer ``op`` version with the same float semantics as version ``base``."""

    def convert(node, graph):
        from onnx2torch.node_converters.registry import get_converter

        if check is not None:
            check(node)
        return get_converter(op, base)(node, graph)

    return convert


def _no_dilations(node):
    if any(d != 1 for d in node.attributes.get("dilations", [])):
        raise NotImplementedError("AveragePool with dilations is not implemented")


def _plain_resize(node):
    if node.attributes.get("antialias", 0):
        raise NotImplementedError("Resize with antialias=1 is not implemented")
    if node.attributes.get("axes"):
        raise NotImplementedError("Resize with axes is not implemented")
    if node.attributes.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError("Resize with keep_aspect_ratio_policy is not implemented")
    if node.attributes.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        raise NotImplementedError('Resize with coordinate_transformation_mode "half_pixel_symmetric" is not implemented')


def _spatial_bn(node):
    if node.attributes.get("spatial", 1) != 1:
        raise NotImplementedError("BatchNormalization with spatial=0 is not implemented")
    if len(node.output_values) > 1 and any(node.output_values[1:]):
        raise NotImplementedError("BatchNormalization in training mode (extra outputs) is not implemented")


# (op, base version onnx2torch has) -> newer versions that only widened the types (checked
# against the ONNX operator changelog), or whose additions the check refuses.
_ALIASES: dict[tuple[str, int], tuple[tuple[int, ...], Optional[Callable]]] = {
    ("Conv", 11): ((22,), None),
    ("ConvTranspose", 11): ((22,), None),
    ("MaxPool", 12): ((22,), None),
    ("AveragePool", 11): ((19, 22), _no_dilations),
    ("GlobalAveragePool", 1): ((22,), None),
    ("InstanceNormalization", 6): ((22,), None),
    ("Dropout", 13): ((22,), None),
    ("Elu", 6): ((22,), None),
    ("Selu", 6): ((22,), None),
    ("HardSigmoid", 6): ((22,), None),
    ("Softplus", 1): ((22,), None),
    ("Softsign", 1): ((22,), None),
    ("Identity", 16): ((19, 21, 23, 24, 25), None),
    ("Cast", 13): ((19, 21, 23, 24, 25), None),       # 19 adds 'saturate', float8 only
    ("Constant", 13): ((19, 21, 23, 24, 25), None),
    ("Shape", 15): ((19, 21, 23, 24, 25), None),
    ("Flatten", 13): ((21, 23, 24, 25), None),
    ("Squeeze", 21): ((23, 24, 25), None),
    ("Unsqueeze", 13): ((21, 23, 24, 25), None),
    ("Transpose", 13): ((21, 23, 24, 25), None),
    ("Equal", 13): ((19,), None),
    ("TopK", 11): ((24,), None),
    ("Resize", 13): ((18, 19), _plain_resize),
    ("HardSwish", 14): ((22,), None),
    ("Round", 11): ((22,), None),
    ("EyeLike", 9): ((22,), None),
    ("ConstantOfShape", 9): ((20, 21, 23, 24, 25), None),
    ("GreaterOrEqual", 12): ((16,), None),
    ("LessOrEqual", 12): ((16,), None),
    ("IsInf", 10): ((20,), None),
    ("IsNaN", 13): ((20,), None),
    ("BatchNormalization", 9): ((7,), _spatial_bn),        # opset 7-8: 'spatial' must be 1
    ("Gemm", 9): ((7,), None),                            # opset 7-8: broadcasting as in 9
    **{(op, 7): ((22,), None) for op in ("Acos", "Asin", "Atan", "Cos", "Sin", "Tan")},
}

# (domain, op, versions, converter): ops or versions onnx2torch has no converter for.
_NEW: list[tuple[str, str, tuple[int, ...], Callable]] = [
    (_ONNX, "Reshape", (19, 21, 23, 24, 25), _convert_reshape),
    (DOMAIN, "Reshape", (_DOMAIN_VERSION,), _convert_reshape),
    (DOMAIN, "AveragePool", (_DOMAIN_VERSION,), _convert_avgpool_padded),
    (DOMAIN, "Slice", (_DOMAIN_VERSION,), _convert_slice),
    (DOMAIN, "LayerNormalization", (_DOMAIN_VERSION,), _convert_layer_norm),
    *[(_ONNX, op, (18,), _convert_reduce) for op in _REDUCERS if op not in ("ReduceSum", "ReduceMax", "ReduceMin")],
    (_ONNX, "ReduceMax", (18, 20), _convert_reduce),
    (_ONNX, "ReduceMin", (18, 20), _convert_reduce),
    (_ONNX, "Pad", (18, 19, 21, 23, 24, 25), _convert_pad),
    (_ONNX, "Dropout", (7,), _convert_dropout7),
    (_ONNX, "CastLike", (15, 19, 21, 23, 24, 25), _convert_castlike),
    (_ONNX, "GlobalMaxPool", (1, 22), _convert_global_max_pool),
    (_ONNX, "Gelu", (20,), _convert_gelu),
    (_ONNX, "Mish", (18, 22), _convert_mish),
    (_ONNX, "GroupNormalization", (18,), _group_norm(per_group=True)),
    (_ONNX, "GroupNormalization", (21,), _group_norm(per_group=False)),
    (_ONNX, "Size", (1, 13, 19, 21, 23, 24, 25), _convert_size),
    (_ONNX, "SpaceToDepth", (1, 13), _convert_space_to_depth),
    (_ONNX, "Upsample", (7, 9), _convert_upsample),
    (_ONNX, "Split", (18,), _convert_split18),
]

_registered = {"done": False}


def register() -> None:
    """Add the converters above to onnx2torch's registry (once; existing ones are kept)."""
    if _registered["done"]:
        return
    import_onnx2torch()
    from onnx2torch.node_converters.registry import add_converter

    def add(op, version, fn, domain=_ONNX):
        try:
            add_converter(operation_type=op, version=version, domain=domain)(fn)
        except ValueError:   # "already registered": onnx2torch (a newer one) has its own; keep it
            pass

    for (op, base), (versions, check) in _ALIASES.items():
        for v in versions:
            add(op, v, _alias(op, base, check))
    for domain, op, versions, fn in _NEW:
        for v in versions:
            add(op, v, fn, domain)
    add("FakeQuant", 1, quantized.convert_fake_quant, DOMAIN)     # int8 teachers (teachers/quantized.py)
    _registered["done"] = True


# --------------------------------------------------------------------------- graph preparation


@dataclass
class UnsupportedNode:
    op: str
    domain: str
    opset: int
    node: str      # the node's name, or "#index" when it has none

    def describe(self) -> str:
        op = f"{self.domain}.{self.op}" if self.domain not in ("", "ai.onnx") else self.op
        return f"{op} op (node '{self.node}', opset {self.opset})"


def unsupported_nodes(model) -> list[UnsupportedNode]:
    """Every node no registered converter handles, in graph order (one entry per op type)."""
    register()
    from onnx2torch.node_converters.registry import get_converter

    opsets = {(o.domain or ""): o.version for o in model.opset_import}
    found: dict[tuple[str, str], UnsupportedNode] = {}
    for i, node in enumerate(model.graph.node):
        domain = node.domain or ""
        key = (domain, node.op_type)
        if key in found:
            continue
        version = opsets.get("" if domain == "ai.onnx" else domain, 1)
        try:
            get_converter(node.op_type, version, "" if domain == "ai.onnx" else domain)
        except NotImplementedError:
            found[key] = UnsupportedNode(node.op_type, domain, version, node.name or f"#{i}")
    return list(found.values())


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                     "Multinomial"}


def prepare(model, fixed_batch: Optional[int] = None):
    """A copy of ``model`` that onnx2torch can convert, computing the same function.

    Returns (model, notes). See the module docstring for the rewrites. With ``fixed_batch`` (the
    file's static batch size), constant Reshape targets that repeat it as their first dim copy
    the input's batch dim instead (``0``), which is the same at that batch and lets the module
    run whole batches of other sizes; the loader checks that against running in chunks.
    """
    import onnx

    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    notes: list[str] = []
    folded = fold_constants(prepared)
    if folded:
        notes.append(f"{folded} constant-only node(s) folded into initializers before conversion")
    if fixed_batch:
        freed = _free_batch_reshapes(prepared, fixed_batch)
        if freed:
            notes.append(f"{freed} Reshape target(s) with the file's batch size {fixed_batch} hard-coded now copy "
                         "the batch dim")
    resolved = _resolve_auto_pad(prepared)
    if resolved:
        notes.append(f"{resolved} auto_pad=SAME_* node(s) given explicit pads from the inferred input shapes")
    _infer_shapes(prepared)      # before routing: shape inference cannot see through our domain's ops
    moved = _route(prepared)
    if moved:
        notes.append(f"{moved} node(s) converted by dfkd_deploy's own converters (Slice, LayerNormalization, "
                     "Reshape with allowzero=1, AveragePool with asymmetric pads)")
    return prepared, notes


def _infer_shapes(model) -> None:
    """Record inferred value shapes in ``model`` (converters such as onnx2torch's BatchNorm read
    their input's rank from them); leaves the model as it is when inference fails."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001
        return
    known = {v.name for v in model.graph.value_info}
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _is_onnx(node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def _free_batch_reshapes(model, batch: int) -> int:
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    freed = 0
    for node in model.graph.node:
        if (node.op_type != "Reshape" or not _is_onnx(node) or len(node.input) < 2 or _attr(node, "allowzero", 0)
                or node.input[1] not in inits):
            continue
        target = numpy_helper.to_array(inits[node.input[1]])
        if target.ndim != 1 or len(target) < 2 or int(target[0]) != batch:
            continue
        fixed = target.copy()
        fixed[0] = 0
        name = node.input[1] if users.get(node.input[1], 0) == 1 else f"{node.input[1]}__dfkd_batch{freed}"
        tensor = numpy_helper.from_array(fixed, name)
        if name == node.input[1]:
            inits[name].CopyFrom(tensor)
        else:
            model.graph.initializer.append(tensor)
            node.input[1] = name
        freed += 1
    return freed


def _route(model) -> int:
    """Move nodes onnx2torch's converters refuse, but ours handle, to this project's domain."""
    moved = 0
    for node in model.graph.node:
        if not _is_onnx(node):
            continue
        if ((node.op_type == "Reshape" and _attr(node, "allowzero", 0) == 1)
                or node.op_type in ("Slice", "LayerNormalization")):
            node.domain = DOMAIN
            moved += 1
        elif node.op_type == "AveragePool" and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            pads = list(_attr(node, "pads", []) or [])
            if pads and pads[: len(pads) // 2] != pads[len(pads) // 2:] and not any(
                    d != 1 for d in _attr(node, "dilations", []) or []):
                node.domain = DOMAIN
                moved += 1
    if moved and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=_DOMAIN_VERSION)
    return moved


def _resolve_auto_pad(model) -> int:
    """auto_pad=SAME_UPPER/SAME_LOWER (older TensorFlow converters) as explicit pads, where the
    input's spatial size is known: onnx2torch implements only explicit pads."""
    import onnx

    nodes = [n for n in model.graph.node if _is_onnx(n) and n.op_type in ("Conv", "MaxPool", "AveragePool")
             and _attr(n, "auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER")]
    if not nodes:
        return 0
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - leave them; conversion names the node it cannot handle
        return 0
    shapes = {v.name: v.type.tensor_type.shape for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    done = 0
    for node in nodes:
        shape = shapes.get(node.input[0])
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in shape.dim] if shape is not None else []
        spatial = dims[2:]
        kernel = _attr(node, "kernel_shape") or (weights.get(node.input[1], [])[2:] if len(node.input) > 1 else [])
        if not spatial or not all(spatial) or len(kernel) != len(spatial):
            continue
        strides = _attr(node, "strides") or [1] * len(spatial)
        dilations = _attr(node, "dilations") or [1] * len(spatial)
        upper = _attr(node, "auto_pad") in (b"SAME_UPPER", "SAME_UPPER")
        begin, end = [], []
        for size, k, st, dl in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(size / st) - 1) * st + (k - 1) * dl + 1 - size)
            small = total // 2
            begin.append(small if upper else total - small)
            end.append(total - small if upper else small)
        _set_attr(node, "auto_pad", "NOTSET")
        _set_attr(node, "pads", begin + end)
        done += 1
    return done


def fold_constants(model) -> int:
    """Evaluate every node whose inputs are all constant (in place); returns how many were folded.

    Converters such as onnx2torch's Conv read their weights from initializers only; graphs that
    build weights with nodes (``ConstantOfShape``, ``Constant`` + ``Cast``, ...) are otherwise
    refused. onnxruntime computes the values with every optimisation off, so they are exact.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    const = {t.name for t in graph.initializer}
    folded_nodes = []
    for node in graph.node:                  # ONNX graphs are topologically sorted
        if ((node.domain or "") not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            continue
        if all(i in const for i in node.input if i):
            folded_nodes.append(node)
            const.update(o for o in node.output if o)
    if not folded_nodes:
        return 0
    folded_ids = {id(n) for n in folded_nodes}
    kept = [n for n in graph.node if id(n) not in folded_ids]
    needed = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    frontier = [o for n in folded_nodes for o in n.output if o and o in needed]
    values = _evaluate(model, folded_nodes, frontier) if frontier else []
    if values is None:
        return 0
    del graph.node[:]
    graph.node.extend(kept)
    new = [numpy_helper.from_array(np.asarray(v), name) for name, v in zip(frontier, values)]
    graph.initializer.extend(new)
    if model.ir_version < 4:                 # IR < 4: every initializer is also a graph input
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    unused_names = {t.name for t in unused}
    for inp in [i for i in graph.input if i.name in unused_names]:   # IR < 4 lists initializers as inputs
        graph.input.remove(inp)
    return len(folded_nodes)


def _evaluate(model, nodes, outputs):
    """Values of ``outputs`` computed from ``nodes`` and the initializers; None if it fails."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    graph = model.graph
    inputs = {i for n in nodes for i in n.input if i}
    inits = [t for t in graph.initializer if t.name in inputs]
    sub = helper.make_graph(list(nodes), "constants", [],
                            [helper.make_empty_tensor_value_info(o) for o in outputs], initializer=inits)
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(sub_model)
        types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for out in sub_model.graph.output:
            if out.name in types and types[out.name].tensor_type.elem_type:
                out.type.CopyFrom(types[out.name])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(sub_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return session.run(outputs, {})
    except Exception:  # noqa: BLE001 - leave the graph as it is; conversion reports what it cannot do
        return None


def failing_node(model) -> Optional[tuple[str, str, str]]:
    """(op, node name, reason) of the first node whose converter refuses it: onnx2torch's own
    errors do not say which node. Only called after a conversion failed."""
    register()
    from onnx2torch.node_converters.registry import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    try:
        graph = OnnxGraph(safe_shape_inference(model).graph)
    except Exception:  # noqa: BLE001
        return None
    opsets = {(o.domain or ""): o.version for o in model.opset_import}
    for i, node in enumerate(graph.nodes.values()):
        try:
            get_converter(node.operation_type, opsets.get(node.domain or "", 1), node.domain or "")(node, graph)
        except NotImplementedError as exc:
            return node.operation_type, node.name or f"#{i}", str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        except Exception:  # noqa: BLE001 - a different failure: not the one being looked for
            continue
    return None
