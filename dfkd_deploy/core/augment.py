"""Differentiable batch augmentation of pixel-space images: random crop after zero padding, and
horizontal flip. Synthesis (the inversion loss) and KD (the student's batches) both use it; KD can
also mix its batches (mixup / cutmix, ``distillation.mix``).

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


MIX_KINDS = ("none", "mixup", "cutmix")


def mix_batch(x: torch.Tensor, kind: str = "none", alpha: float = 1.0) -> torch.Tensor:
    """Mix each image of the batch with another of the same batch (a random pairing), with one
    weight lam ~ Beta(alpha, alpha) per batch: ``mixup`` blends them (lam x + (1 - lam) x'),
    ``cutmix`` pastes a box of x' covering about 1 - lam of the image into x. For KD no labels are
    mixed: the teacher labels the mixed image. Draws from torch's global generator."""
    if kind == "none" or x.shape[0] < 2:
        return x
    if kind not in MIX_KINDS:
        raise ValueError(f"mix {kind!r}: choose one of {', '.join(MIX_KINDS)}")
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    other = x[torch.randperm(x.shape[0]).to(x.device)]
    if kind == "mixup":
        return lam * x + (1 - lam) * other
    h, w = x.shape[-2:]
    ch, cw = int(round(h * (1 - lam) ** 0.5)), int(round(w * (1 - lam) ** 0.5))
    if ch == 0 or cw == 0:
        return x
    cy, cx = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
    out = x.clone()
    out[..., cy:cy + ch, cx:cx + cw] = other[..., cy:cy + ch, cx:cx + cw]
    return out
