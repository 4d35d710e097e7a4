"""The image contract: the one place that converts between the project's image spaces.

- *pixels*: float32 NCHW in [0, 1]. The generator, the image pool's reads, real evaluation data
  and the probes live here.
- *model space*: what the teacher file expects, always NCHW here:
  ``(pixel * value_range - mean) / std`` per channel (no mean/std declared: 0 and 1).
- *uint8 storage*: NCHW uint8, ``round(clamp(pixel, 0, 1) * 255)``: the pool's shards, the
  bundle's calibration and probe arrays, evaluation sets on disk. Back to pixels: ``u8 / 255``.
- *layout*: NCHW everywhere inside the project; a file whose input is NHWC gets the batch
  permuted at its boundary with :func:`to_layout` / :func:`from_layout`.

Every function comes in the array kind it is given (torch tensor or numpy array) where both are
used. Depends on numpy and torch only, so ``exporters/`` may use it too.
"""
from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import numpy as np
import torch

LAYOUTS = ("NCHW", "NHWC")
Array = TypeVar("Array", np.ndarray, torch.Tensor)


# --- normalisation constants ----------------------------------------------------------------

def channel_constants(mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                      channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std as float32 (1, C, 1, 1) arrays; None means 0 and 1."""
    m = np.asarray(mean if mean else [0.0] * channels, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std if std else [1.0] * channels, np.float32).reshape(1, -1, 1, 1)
    return m, s


def channel_tensors(mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                    channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`channel_constants` as float32 torch tensors."""
    m = torch.tensor(mean if mean else [0.0] * channels, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std if std else [1.0] * channels, dtype=torch.float32).view(1, -1, 1, 1)
    return m, s


# --- pixels <-> model space -----------------------------------------------------------------

def pixels_to_model(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    value_range: float) -> torch.Tensor:
    """Pixel space -> model space, differentiably (``mean``/``std`` from :func:`channel_tensors`)."""
    return (pixels * value_range - mean) / std


def uint8_to_model(images_uint8: np.ndarray, mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                   value_range: float) -> np.ndarray:
    """uint8 NCHW storage -> float32 model space, in numpy (what ONNX Runtime is fed)."""
    images_uint8 = np.asarray(images_uint8)
    x = images_uint8.astype(np.float32) / 255.0
    m, s = channel_constants(_floats(mean), _floats(std), x.shape[1])
    return ((x * np.float32(value_range) - m) / s).astype(np.float32)


def _floats(values) -> Optional[list[float]]:
    """A mean/std given as a list, tuple or array (e.g. read back from an .npz), or None."""
    return None if values is None else [float(v) for v in np.asarray(values).ravel()]


# --- pixels <-> uint8 storage ---------------------------------------------------------------

def pixels_to_uint8(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Pixels -> uint8 storage: clamp to [0, 1], scale by 255, round half to even."""
    if isinstance(pixels, torch.Tensor):
        return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.round(np.clip(np.asarray(pixels, np.float32), 0, 1) * np.float32(255)).astype(np.uint8)


def uint8_to_pixels(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 storage -> float32 pixels in [0, 1] (a new tensor; the input is not changed)."""
    return torch.as_tensor(np.asarray(images_uint8)).float().div_(255.0)


# --- layout ---------------------------------------------------------------------------------

def _check_layout(layout: str) -> str:
    layout = layout.upper()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return layout


def to_layout(x: Array, layout: str) -> Array:
    """An NCHW batch in ``layout`` (NHWC: permuted, as a view; NCHW: unchanged)."""
    if _check_layout(layout) == "NCHW":
        return x
    return x.permute(0, 2, 3, 1) if isinstance(x, torch.Tensor) else x.transpose(0, 2, 3, 1)


def from_layout(x: Array, layout: str) -> Array:
    """A batch in ``layout`` as NCHW (the inverse of :func:`to_layout`)."""
    if _check_layout(layout) == "NCHW":
        return x
    return x.permute(0, 3, 1, 2) if isinstance(x, torch.Tensor) else x.transpose(0, 3, 1, 2)
