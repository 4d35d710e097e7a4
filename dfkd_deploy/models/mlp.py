"""Fully connected students for teachers with no convolution (e.g. a Fashion-MNIST MLP): a conv
student replacing an MLP is larger in MACs and slower at every batch size, so the scratch choice
for such a teacher draws from this family instead (``students.build``)."""
from __future__ import annotations

import math

import torch
from torch import nn

from dfkd_deploy.models.registry import register_model

MLP_WIDTHS = (16, 32, 64, 128, 256)


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] x depth -> Linear, like the teachers it replaces: no
    normalisation layer (ONNX Runtime would not fold one into a Gemm), so KD clips its gradient
    (``distillation.grad_clip: auto``)."""

    def __init__(self, num_classes: int, in_features: int, width: int, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d_in = in_features
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.ReLU(inplace=True)]
            d_in = width
        self.body = nn.Sequential(*layers)
        self.linear = nn.Linear(d_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x):
        return self.linear(self.features(x))


def _make(width: int):
    def build(num_classes: int, in_channels: int = 3, input_size=(32, 32)):
        return MLP(num_classes, in_channels * math.prod(input_size), width)

    build.__doc__ = f"MLP, two hidden layers of {width} (no convolution)"
    return build


for _w in MLP_WIDTHS:
    register_model(f"mlp_w{_w}")(_make(_w))

MLP_NAMES = tuple(f"mlp_w{w}" for w in MLP_WIDTHS)
