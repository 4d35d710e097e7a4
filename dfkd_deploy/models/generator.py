"""The FastDFKD image generator: z -> image in [0, 1] pixel space.

Same shape of network as in the paper's code (a linear layer to a 1/4-resolution map, two
upsample+conv+BN+LeakyReLU stages, a final conv and a sigmoid), generalised to any channel
count and to non-square sizes that are not multiples of four.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _MixedConv2d(torch.autograd.Function):
    """A stride-1 convolution whose forward and input gradient run in bf16 and whose weight
    gradient runs in fp32. On CPU (oneDNN 3.x here) bf16 weight-gradient convolutions take a slow
    path, about a second per call whatever the size, while bf16 forward and input-gradient
    convolutions are 2-4x faster than fp32 ones; this keeps the fast parts."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        pad = [padding, padding]
        y = torch.ops.aten.convolution(xb, wb, None, [1, 1], pad, [1, 1], False, [0, 0], 1).float()
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight, xb, wb)
        ctx.pad, ctx.has_bias = pad, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, xb, wb = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(gy.to(torch.bfloat16), xb, wb, None, [1, 1], ctx.pad, [1, 1],
                                                     False, [0, 0], 1, [True, False, False])[0].float()
        if ctx.needs_input_grad[1]:
            gw = torch.ops.aten.convolution_backward(gy, x, weight, None, [1, 1], ctx.pad, [1, 1],
                                                     False, [0, 0], 1, [False, True, False])[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None


class Generator(nn.Module):
    def __init__(self, nz: int = 256, ngf: int = 64, img_size: tuple[int, int] = (32, 32), nc: int = 3):
        super().__init__()
        self.nz, self.ngf, self.img_size, self.nc = nz, ngf, tuple(img_size), nc
        self.bf16_convs = False   # set by the synthesizer under bf16 precision (see _MixedConv2d)
        self.init_hw = (math.ceil(self.img_size[0] / 4), math.ceil(self.img_size[1] / 4))
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_hw[0] * self.init_hw[1]))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, 1, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z).view(z.shape[0], self.ngf * 2, *self.init_hw)
        if self.conv_blocks[2].weight.is_contiguous(memory_format=torch.channels_last) and out.shape[-1] > 1:
            # channels-last convolutions: convert the small initial map, not the upsampled one
            out = out.contiguous(memory_format=torch.channels_last)
        if self.bf16_convs:
            for m in self.conv_blocks:
                out = _MixedConv2d.apply(out, m.weight, m.bias, m.padding[0]) if isinstance(m, nn.Conv2d) else m(out)
        else:
            out = self.conv_blocks(out)
        if tuple(out.shape[-2:]) != self.img_size:
            out = F.interpolate(out, size=self.img_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(out)

    def reset_l0(self) -> None:
        """Re-initialise the input layers (the reference does this once, 120 epochs after warm-up)."""
        nn.init.normal_(self.l1[0].weight, 0.0, 0.02)
        nn.init.constant_(self.l1[0].bias, 0.0)
        nn.init.normal_(self.conv_blocks[0].weight, 0.0, 0.02)
        nn.init.constant_(self.conv_blocks[0].bias, 0.0)
