"""Architecture descriptions of teacher-derived students, so ``student.pt`` rebuilds them from plain
data (no pickle): a *base* (a zoo architecture, or the teacher's own ONNX graph with its weights
zeroed) plus the shapes of every Conv/BatchNorm/Linear layer that differ from the base's.

A pruned student is its base with thinner layers: rebuilding = build the base, swap each listed
layer for a fresh one of the recorded shape, then ``load_state_dict``.
"""
from __future__ import annotations

import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd_deploy.core.errors import UsageError

DESCRIPTION_FORMAT = "dfkd-deploy/derived/v1"
_ZEROED_MIN_ELEMENTS = 16   # float initializers at least this large are weights: zeroed in the skeleton


def layer_shape(m: nn.Module) -> dict | None:
    """The constructor arguments of a Conv2d / BatchNorm2d / Linear, as plain data."""
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding)
                if not isinstance(m.padding, str) else m.padding, "dilation": list(m.dilation),
                "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode}
    if isinstance(m, nn.BatchNorm2d):
        return {"type": "BatchNorm2d", "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    return None


def make_layer(shape: dict) -> nn.Module:
    kw = {k: v for k, v in shape.items() if k != "type"}
    for key in ("kernel_size", "stride", "padding", "dilation"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    kinds = {"Conv2d": nn.Conv2d, "BatchNorm2d": nn.BatchNorm2d, "Linear": nn.Linear}
    if shape.get("type") not in kinds:
        raise UsageError(f"unknown layer type {shape.get('type')!r} in a derived-student description")
    return kinds[shape["type"]](**kw)


def changed_layers(model: nn.Module, base: nn.Module) -> dict[str, dict]:
    """Layers of ``model`` whose shape differs from the same-named layer of ``base``."""
    base_layers = dict(base.named_modules())
    out = {}
    for name, m in model.named_modules():
        shape = layer_shape(m)
        if shape is not None and (name not in base_layers or layer_shape(base_layers[name]) != shape):
            out[name] = shape
    return out


def apply_layers(model: nn.Module, layers: dict[str, dict]) -> nn.Module:
    for name, shape in layers.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make_layer(shape)
        if leaf.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
            parent[int(leaf)] = new
        else:
            setattr(parent, leaf, new)
    return model


# --- bases ---------------------------------------------------------------------------------------

def zoo_base(arch: str) -> dict:
    return {"kind": "zoo", "arch": arch}


def onnx_base(teacher_spec) -> dict:
    """The teacher's ONNX graph with its weights zeroed and zlib-compressed (a few kB: the trained
    weights live in the student's state_dict), and how the teacher was loaded from it."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(teacher_spec.source), load_external_data=True)
    for i, init in enumerate(model.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.size >= _ZEROED_MIN_ELEMENTS:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.zeros_like(arr), init.name))
    blob = zlib.compress(model.SerializeToString(), 9)
    return {"kind": "onnx", "onnx_zlib": torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone(),
            "layout": teacher_spec.layout, "input_shape": list(teacher_spec.input_shape),
            "output": teacher_spec.output, "value_range": teacher_spec.value_range}


def build_base(base: dict, *, num_classes: int, input_shape) -> nn.Module:
    if base.get("kind") == "zoo":
        from dfkd_deploy.models.registry import build_model

        c, h, w = input_shape
        return build_model(base["arch"], num_classes=num_classes, in_channels=c, input_size=(h, w))
    if base.get("kind") == "onnx":
        return _onnx_module(base)
    raise UsageError(f"unknown derived-student base {base.get('kind')!r}")


def _onnx_module(base: dict) -> nn.Module:
    from dfkd_deploy.recipe import TeacherOptions
    from dfkd_deploy.teachers import load_teacher

    raw = zlib.decompress(base["onnx_zlib"].numpy().tobytes())
    options = TeacherOptions(layout=base["layout"], input_shape=tuple(base["input_shape"]), output=base["output"],
                             value_range=base.get("value_range"))
    with tempfile.TemporaryDirectory(prefix="dfkd-student-") as tmp:
        path = Path(tmp) / "skeleton.onnx"
        path.write_bytes(raw)
        module = load_teacher(path, options).module
    return trainable(module)


def trainable(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(True)
    return module


# --- descriptions --------------------------------------------------------------------------------

def describe(model: nn.Module, base: dict, base_module: nn.Module, **info: Any) -> dict:
    return {"format": DESCRIPTION_FORMAT, "base": base, "layers": changed_layers(model, base_module), **info}


def rebuild(description: dict, *, num_classes: int, input_shape) -> nn.Module:
    """The module a description names (weights as built; load the state_dict afterwards)."""
    if not isinstance(description, dict) or description.get("format") != DESCRIPTION_FORMAT:
        raise UsageError(f"not a derived-student description (expected format {DESCRIPTION_FORMAT})")
    model = build_base(description["base"], num_classes=num_classes, input_shape=input_shape)
    return trainable(apply_layers(model, description.get("layers") or {}))
