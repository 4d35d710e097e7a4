"""Models the ONNX tests (and ``tools/onnx_coverage.py``) export: the zoo with random BN
statistics, a Keras-like NHWC/Softmax wrapper, and a small BN-free classifier."""
from __future__ import annotations

import torch
from torch import nn


def randomise_bn(model: nn.Module, seed: int = 0, mean_scale: float = 0.2) -> nn.Module:
    """Fresh BN layers are the identity in eval mode; random statistics make folding matter
    (running means drawn with standard deviation ``mean_scale``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * mean_scale)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def spread_logits(model: nn.Module, shape, seed: int = 0, spread: float = 3.0) -> nn.Module:
    """A random network predicts one class for nearly every input (64 of 64 Gaussian probes for
    a random ResNet-8), so any other model "agrees" with it. Re-centre and re-scale its last
    Linear so that each class logit has mean 0 and standard deviation ``spread`` within Gaussian,
    uniform and smooth [0,1] inputs: the predictions then spread over the classes, and agreement
    means something."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    gen = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.rand(128, c, max(2, h // 8), max(2, w // 8), generator=gen)    # smooth image-like inputs,
    smooth = nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)   # as parity's
    kinds = [torch.randn(128, *shape, generator=gen), torch.rand(128, *shape, generator=gen), smooth]
    with torch.no_grad():   # statistics within each kind of input, averaged: each kind gets spread out
        ys = [model.eval()(x) for x in kinds]
        mean = torch.stack([y.mean(0) for y in ys]).mean(0)
        std = torch.stack([y.std(0) for y in ys]).mean(0).clamp_min(1e-6)
        last.weight.mul_((spread / std)[:, None])
        last.bias.copy_((last.bias - mean) * spread / std)
    return model


def zoo_model(name: str, shape, seed: int = 0) -> nn.Module:
    from dfkd_deploy.models import build_model

    torch.manual_seed(seed)
    return randomise_bn(build_model(name, num_classes=10, in_channels=shape[0], input_size=shape[1:]), seed)


class NHWCSoftmax(nn.Module):
    """What a Keras classifier looks like after tf2onnx: NHWC in, probabilities out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x.permute(0, 3, 1, 2)), dim=1)


class BNFree(nn.Module):
    """A small BN-free classifier (GroupNorm, GELU, HardSwish, LayerNorm) for 1x24x40 images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 5):
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.gn(self.c1(x)))
        x = torch.nn.functional.hardswish(self.c2(x))
        x = torch.nn.functional.adaptive_max_pool2d(x, 1) + x.mean((2, 3), keepdim=True)
        return self.fc(self.ln(x.reshape(x.shape[0], -1)))
