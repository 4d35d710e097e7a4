"""What a format loader read off a teacher file (:class:`Detected`), and the resolution of the
conventions it leaves open (layout, input shape) against the recipe. Shared by every format
loader (:mod:`dfkd_deploy.teachers.loaders`, :mod:`dfkd_deploy.teachers.onnx_teacher`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from dfkd_deploy.core.errors import TeacherError
from dfkd_deploy.recipe import TeacherOptions
from dfkd_deploy.teachers.spec import TeacherModule

# Image sizes tried, in order, when a torch module carries no record of its input size.
_PROBE_SIZES = (32, 224, 28, 64, 96, 299)


@dataclass
class Detected:
    """What a format loader read off the file. ``None`` means "not knowable from the file"."""

    model: nn.Module
    format: str
    file_shape: Optional[tuple[Optional[int], ...]] = None  # input dims in the file's layout, no batch
    file_batch: Optional[int] = None        # a static batch size the model is fixed to, if any
    layout: Optional[str] = None            # detected layout (None: decide from file_shape)
    num_classes: Optional[int] = None
    output: str = "logits"
    arch: Optional[str] = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    value_range: Optional[float] = None
    default_size: Optional[int] = None      # H = W to use when nothing else says (state_dict)
    in_channels: Optional[int] = None       # known channels when file_shape is not
    converter_max_abs_diff: Optional[float] = None
    bn_layers: Optional[int] = None         # None: count nn.BatchNorm / OnnxBatchNorm modules
    bn_reason: Optional[str] = None         # why there are none, when the format can tell
    activation_ranges: int = 0              # int8 ONNX: quantized activations (FakeQuant modules) in the surrogate
    int8: Optional[dict] = None             # int8 ONNX: format, weights, surrogate, parity figures (see spec.py)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)   # convention -> where its value came from
    graph_normalisation: Optional[object] = None            # conventions.GraphNormalisation (ONNX)


def guess_layout(file_shape, options: TeacherOptions, notes: list[str], sources: Optional[dict] = None) -> str:
    """NHWC when the recipe says so, or when the last input dim looks like channels (1 or 3)
    and the second does not; NCHW otherwise. The basis is recorded in ``notes`` (and ``sources``)."""
    sources = {} if sources is None else sources
    if options.layout:
        notes.append(f"layout {options.layout} from the recipe")
        sources["layout"] = "recipe (teacher.layout)"
        return options.layout
    if file_shape and len(file_shape) == 3:
        first, last = file_shape[0], file_shape[2]
        if last in (1, 3) and first not in (1, 3):
            notes.append(f"layout NHWC assumed: the input's last dim is {last}, its second is {first}")
            sources["layout"] = f"detected: the input's last dim is {last} (channels), its second is {first}"
            return "NHWC"
        if first in (1, 3) and last not in (1, 3):
            sources["layout"] = f"detected: the input's second dim is {first} (channels)"
        else:
            sources["layout"] = (f"default: the input dims {list(file_shape)} do not say which are channels; "
                                 "NCHW assumed (set teacher.layout if wrong)")
    else:
        sources["layout"] = "default: NCHW assumed (set teacher.layout if wrong)"
    notes.append("layout NCHW assumed")
    return "NCHW"


def resolve_shape(det: Detected, layout: str, options: TeacherOptions, notes: list[str]):
    """C, H, W in NCHW order: the file's static dims, checked against and completed by the recipe."""
    want = tuple(options.input_shape) if options.input_shape else None
    if det.file_shape is not None:
        dims = det.file_shape
        chw = (dims[2], dims[0], dims[1]) if layout == "NHWC" else tuple(dims)
        if want:
            for name, have, asked in zip("CHW", chw, want):
                if have is not None and have != asked:
                    raise TeacherError(f"teacher.input_shape {list(want)} contradicts the file: its input "
                                       f"has {name}={have} (NCHW view {list(chw)})")
            return want
        if any(d is None for d in chw):
            raise TeacherError(f"the teacher's input shape is not fully static (NCHW view "
                               f"{['?' if d is None else d for d in chw]}); set teacher.input_shape: [C, H, W]")
        return chw
    if want:
        if det.in_channels is not None and det.in_channels != want[0]:
            raise TeacherError(f"teacher.input_shape {list(want)} contradicts the file: its first conv takes "
                               f"{det.in_channels} channels")
        return want
    if det.default_size is not None and det.in_channels is not None:
        notes.append(f"input size {det.default_size}x{det.default_size} assumed; set teacher.input_shape if wrong")
        return (det.in_channels, det.default_size, det.default_size)
    return _probe_shape(det, layout, notes)


def _probe_shape(det: Detected, layout: str, notes: list[str]):
    """No recorded input size: try common sizes and keep the first that runs (recorded as a guess)."""
    channels = [det.in_channels] if det.in_channels else [3, 1]
    for size in _PROBE_SIZES:
        for c in channels:
            try:
                with torch.no_grad():
                    TeacherModule(det.model, layout)(torch.zeros(2, c, size, size))
            except Exception:  # noqa: BLE001 - any failure just means "not this shape"
                continue
            notes.append(f"input shape {[c, size, size]} guessed by a trial forward pass (the file does not "
                         "record it); set teacher.input_shape if wrong")
            return (c, size, size)
    raise TeacherError("cannot tell the teacher's input shape (no common size ran); set teacher.input_shape: [C, H, W]")
