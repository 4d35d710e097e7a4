"""A small conv net: the cheapest student, and the demo's teacher on 8x8 digits."""
from __future__ import annotations

import torch
from torch import nn

from dfkd_deploy.models.registry import register_model


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, w * 2, 3, padding=1, bias=False), nn.BatchNorm2d(w * 2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(w * 2, w * 4, 3, padding=1, bias=False), nn.BatchNorm2d(w * 4), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.linear = nn.Linear(w * 4, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)

    def forward(self, x):
        return self.linear(self.features(x))


@register_model("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 3, input_size=(32, 32)):
    """Three-conv BN/ReLU net, width 32 (about 0.1M params)"""
    return SmallCNN(num_classes, in_channels, width=32)


@register_model("tiny_cnn")
def tiny_cnn(num_classes: int, in_channels: int = 3, input_size=(32, 32)):
    """Three-conv BN/ReLU net, width 8 (a few thousand params)"""
    return SmallCNN(num_classes, in_channels, width=8)
