"""Input and output conventions read off an ONNX graph, where the graph shows them.

- *Normalisation inside the graph*: many deployed files start with the preprocessing baked in,
  e.g. ``Sub(mean) -> Div(std)`` (torchvision-style), ``Mul(1/255)`` (Keras ``Rescaling``),
  ``Mul(1/127.5) -> Add(-1)`` or a caffe-style mean subtraction, possibly around the NHWC
  ``Transpose``. :func:`input_normalisation` folds that chain into one per-channel affine map
  ``y = scale * x + shift`` and :func:`pick_value_range` decides whether the raw pixels it expects
  are in [0, 1] or [0, 255]: the range whose image under the map looks like a normalised input
  (covers 0, spans between 0.5 and 300). Such a teacher then takes raw pixels: no mean/std
  outside the graph.
- *Output kind*: a graph ending in Softmax outputs probabilities; LogSoftmax outputs
  log-probabilities, which serve as logits as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

# Ops that only reshape or rename: a Softmax before them still makes the output probabilities.
PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}
_FLOAT_TYPES = {1, 10, 11, 16}          # FLOAT, FLOAT16, DOUBLE, BFLOAT16
_RANGES = (1.0, 255.0)


@dataclass
class GraphNormalisation:
    scale: np.ndarray      # per channel, y = scale * x + shift, x the graph's raw input
    shift: np.ndarray
    ops: list[str]         # the ops that make it up, in order
    value_range: Optional[float] = None   # the raw pixel maximum it implies (None: cannot tell)

    def equivalent(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) on [0, 1] pixels that the map amounts to, given ``value_range``."""
        r = self.value_range or 1.0
        mean = -self.shift / self.scale / r
        std = 1.0 / (self.scale * r)
        return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)

    def describe(self) -> str:
        mean, std = self.equivalent()
        return (f"the graph normalises its input itself ({' -> '.join(self.ops)} on the input: "
                f"mean {list(mean)}, std {list(std)} on [0,1] pixels)")


def output_kind(graph) -> tuple[str, str]:
    """("logits" | "probabilities", why)."""
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(graph.output[0].name)
    while node is not None and node.op_type in PASS_THROUGH and node.input:
        node = producers.get(node.input[0])
    if node is not None and node.op_type == "Softmax":
        return "probabilities", "the graph ends in Softmax"
    if node is not None and node.op_type == "LogSoftmax":
        return "logits", "the graph ends in LogSoftmax: its log-probabilities serve as logits"
    return "logits", "no Softmax at the end of the graph"


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_float", "value_floats"):
                    values[node.output[0]] = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats))
    return values


def _per_channel(value: np.ndarray, axis: int, rank: int, channels: Optional[int]) -> Optional[np.ndarray]:
    """The constant as one value per channel, when it varies along the channel axis only."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > rank:
        return None
    arr = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
    if any(arr.shape[d] != 1 for d in range(rank) if d != axis):
        return None
    vec = arr.reshape(-1)
    if channels is not None and len(vec) not in (1, channels):
        return None
    return np.broadcast_to(vec, (channels or len(vec),)).astype(np.float64)


def input_normalisation(model, input_name: str, layout: str, channels: Optional[int]) -> Optional[GraphNormalisation]:
    """The per-channel affine map the graph applies to its input before anything else, if any."""
    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    consts = _constants(model)
    cur, axis, rank = input_name, (3 if layout == "NHWC" else 1), 4
    scale, shift = np.ones(channels or 1), np.zeros(channels or 1)
    ops: list[str] = []
    while True:
        users = [n for n in consumers.get(cur, []) if n.op_type != "Shape"]
        if len(users) != 1:
            break
        node = users[0]
        op = node.op_type
        if op == "Identity" or (op == "Cast" and any(a.name == "to" and a.i in _FLOAT_TYPES for a in node.attribute)):
            cur = node.output[0]
            continue
        if op == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(rank))[::-1])
            axis = perm.index(axis)
            cur = node.output[0]
            continue
        if op not in ("Add", "Sub", "Mul", "Div") or len(node.input) != 2:
            break
        first = node.input[0] == cur
        other = node.input[1] if first else node.input[0]
        if other not in consts:
            break
        vec = _per_channel(consts[other], axis, rank, channels)
        if vec is None:
            break
        if len(scale) != len(vec):            # channels unknown until now
            scale, shift = np.broadcast_to(scale, vec.shape).copy(), np.broadcast_to(shift, vec.shape).copy()
        if op == "Add":
            shift = shift + vec
        elif op == "Sub":
            scale, shift = (scale, shift - vec) if first else (-scale, vec - shift)
        elif op == "Mul":
            scale, shift = scale * vec, shift * vec
        elif first and np.all(vec != 0):      # Div by a constant; c / x is not affine
            scale, shift = scale / vec, shift / vec
        else:
            break
        ops.append(op)
        cur = node.output[0]
    if not ops or (np.allclose(scale, 1) and np.allclose(shift, 0)) or np.any(scale == 0):
        return None
    norm = GraphNormalisation(scale=scale, shift=shift, ops=ops)
    norm.value_range = pick_value_range(scale, shift)
    return norm


def pick_value_range(scale: np.ndarray, shift: np.ndarray) -> Optional[float]:
    """1 or 255: the raw pixel range whose image under the map looks normalised, else None."""
    best, best_score = None, None
    for r in _RANGES:
        lo = np.minimum(shift, shift + scale * r)
        hi = np.maximum(shift, shift + scale * r)
        span = hi - lo
        tol = 0.01 * span + 1e-6
        if not (np.all(lo <= tol) and np.all(hi >= -tol) and np.all(span >= 0.5) and np.all(span <= 300)):
            continue
        score = float(np.mean(np.abs((lo + hi) / 2) / span))   # 0: centred on 0; 0.5: starts at 0
        if best_score is None or score < best_score - 1e-9:
            best, best_score = r, score
    return best


# --- colour channel order -------------------------------------------------------------------------

# The ImageNet mean on [0, 1] pixels in RGB order. Caffe-style files (and Keras' "caffe"
# preprocessing) subtract it in BGR order, [103.939, 116.779, 123.68] on [0, 255] pixels.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_MEAN_TOLERANCE = 0.01


def order_from_mean(mean_01) -> Optional[tuple[str, str]]:
    """("RGB" | "BGR", why) when a 3-channel mean on [0, 1] pixels is ImageNet's in one order, else None."""
    if mean_01 is None or len(mean_01) != 3:
        return None
    m = np.asarray(mean_01, dtype=np.float64)
    rgb = np.asarray(IMAGENET_MEAN_RGB)
    shown = [round(float(v), 3) for v in m]
    if np.max(np.abs(m - rgb[::-1])) <= _MEAN_TOLERANCE:
        return "BGR", f"the mean {shown} is ImageNet's in BGR order (caffe-style)"
    if np.max(np.abs(m - rgb)) <= _MEAN_TOLERANCE:
        return "RGB", f"the mean {shown} is ImageNet's in RGB order"
    return None


def resolve_channel_order(option: Optional[str], graph_norm: Optional[GraphNormalisation], mean,
                          channels: int, notes: list[str]) -> tuple[str, str]:
    """(channel order, where it came from): the recipe, else the graph's own normalisation or the
    resolved mean when either is ImageNet's in one order, else RGB by default."""
    detected = None
    if channels == 3:
        if graph_norm is not None and graph_norm.value_range is not None:
            detected = order_from_mean(graph_norm.equivalent()[0])
            where = "in-graph normalisation"
        if detected is None:
            detected = order_from_mean(mean)
            where = "normalisation"
    if option:
        if detected and detected[0] != option:
            notes.append(f"channel order {option} from the recipe, but {detected[1]}: check teacher.channel_order")
        return option, "recipe (teacher.channel_order)"
    if detected:
        if detected[0] == "BGR":
            notes.append(f"channel order BGR: {detected[1]}")
        return detected[0], f"detected: {detected[1]} ({where})"
    if channels != 3:
        return "RGB", f"default: {channels} channel(s), no colour order"
    return "RGB", "default: RGB (nothing in the file says; set teacher.channel_order: BGR for a caffe-style model)"
