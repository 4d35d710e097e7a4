"""Differentiable batch augmentation of pixel-space images: random crop after zero padding, and
horizontal flip. Synthesis (the inversion loss) and KD (the student's batches) both use it.

One gather per batch (no per-sample Python loop): each sample's crop offset and flip are folded
into row/column index tensors, and advanced indexing keeps the result differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    if padding == 0 and not flip:
        return x
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    rows = oy[:, None] + torch.arange(h, device=dev)[None, :]              # (B, H)
    cols = torch.arange(w, device=dev)[None, :].expand(b, w)
    if flip:
        flipped = (torch.rand(b, generator=generator) < 0.5).to(dev)
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    cols = ox[:, None] + cols                                             # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
