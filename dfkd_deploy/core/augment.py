"""Differentiable batch augmentation of pixel-space images: random crop after zero padding, and
horizontal flip. Synthesis (the inversion loss) and KD (the student's batches) both use it; KD can
also mix its batches (mixup / cutmix, ``distillation.mix``); synthesis can also zoom and shift the
colours of its views (``synthesis.augment.zoom`` / ``color_shift``).

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


def zoom(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random zoom: each sample's view is a square window of side ``1 - amount * u`` (u ~ U(0, 1))
    of the image at a random place inside it, resized back to the full size (bilinear, one
    differentiable ``grid_sample`` per batch). ``amount`` 0: unchanged."""
    if amount <= 0:
        return x
    b = x.shape[0]
    side = 1 - amount * torch.rand(b, generator=generator)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_shift(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random per-sample, per-channel affine change of a model-space batch: x * exp(U(-a, a)) +
    U(-a, a) (Plug-In Inversion's ColorShift, Ghiasi et al. 2022). ``amount`` 0: unchanged."""
    if amount <= 0:
        return x
    b, c = x.shape[:2]
    shape = (b, c) + (1,) * (x.dim() - 2)
    scale = torch.exp((torch.rand(shape, generator=generator) * 2 - 1) * amount).to(x)
    offset = ((torch.rand(shape, generator=generator) * 2 - 1) * amount).to(x)
    return x * scale + offset


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
