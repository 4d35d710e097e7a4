"""What the rest of the pipeline knows about a teacher, whatever file it came from.

Conventions used across the project:
- *pixel space*: NCHW float tensors in [0, 1]. The generator, the image pool, real eval data and
  the probes live here.
- *model space*: what the teacher file itself expects, but always NCHW: ``Normalizer`` maps
  pixel space to it (scale to the value range, subtract mean, divide by std).
  The conversions themselves (and uint8 storage, NHWC) are in :mod:`dfkd_deploy.images`.
- ``Teacher.module`` takes model-space NCHW input and returns logits (log-probabilities for a
  teacher whose output is probabilities). Layout conversion for NHWC teachers lives inside it.
- Students are trained on model-space input, so an exported student is a drop-in replacement
  for the teacher file (the exporter puts the NHWC permute back where the teacher had one).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from dfkd_deploy import images


@dataclass
class TeacherSpec:
    format: str                          # onnx | torchscript | exported | state_dict | pickle
    source: str                          # the file it came from
    input_shape: tuple[int, int, int]    # C, H, W (NCHW view, whatever the file's layout)
    layout: str = "NCHW"                 # the file's own layout: NCHW | NHWC
    num_classes: int = 0
    output: str = "logits"               # logits | probabilities
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    value_range: float = 1.0             # pixel maximum the file expects before mean/std
    channel_order: str = "RGB"           # RGB | BGR: the colour order the file expects (3 channels)
    bn_layers: int = 0
    activation_ranges: int = 0           # int8 teachers: quantized activations whose ranges the file records
    arch: Optional[str] = None
    converter_max_abs_diff: Optional[float] = None   # onnx only: torch vs onnxruntime
    # int8 ONNX only: {"format": QOperator|QDQ|QOperator+QDQ, "per_channel": bool, "ops": {op: count},
    # "activations": fake_quant|float, "images": n, "agreement_probes": f, "agreement_smooth": f,
    # "classes_probes": k, "classes_smooth": k, "max_abs_diff": f}: top-1 agreement with onnxruntime
    # running the int8 file itself, and how many classes onnxruntime predicted on those inputs.
    int8: Optional[dict] = None
    notes: list[str] = field(default_factory=list)    # what was assumed rather than read
    # Where each input/output convention came from, for `inspect` (keys: layout, input_shape,
    # value_range, normalisation, channel_order, output, bn_statistics): "recipe (...)", "file metadata",
    # "detected: ...", "architecture default (...)" or "default: ..." (an assumption).
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


class Normalizer(nn.Module):
    """Pixel space ([0,1], NCHW) -> model space, differentiably: :func:`images.pixels_to_model`
    as a module, its constants as buffers so that it follows ``.to(device)``."""

    def __init__(self, spec: TeacherSpec):
        super().__init__()
        mean, std = images.channel_tensors(spec.mean, spec.std, spec.input_shape[0])
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.value_range = float(spec.value_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return images.pixels_to_model(x, self.mean, self.std, self.value_range)


class TeacherModule(nn.Module):
    """Wraps the raw loaded model: NCHW model-space input -> logits (or log-probabilities)."""

    def __init__(self, model: nn.Module, layout: str = "NCHW", output: str = "logits"):
        super().__init__()
        self.model = model
        self.layout = layout
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.dim() == 4 and out.shape[2] == 1 and out.shape[3] == 1:
            out = out.flatten(1)   # (N, classes, 1, 1): classifiers ending in a 1x1 conv + pooling
        if self.output == "probabilities":
            out = torch.log(out.clamp_min(1e-12))
        return out


@dataclass
class Teacher:
    module: TeacherModule   # frozen, eval mode, gradients flow to its input
    spec: TeacherSpec

    def normalizer(self) -> Normalizer:
        return Normalizer(self.spec)


def has_convolution(module: nn.Module) -> bool:
    """Whether ``module`` has a convolution (an image model, not an MLP)."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients; inputs still receive gradients."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
