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


class Generator(nn.Module):
    def __init__(self, nz: int = 256, ngf: int = 64, img_size: tuple[int, int] = (32, 32), nc: int = 3):
        super().__init__()
        self.nz, self.ngf, self.img_size, self.nc = nz, ngf, tuple(img_size), nc
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
