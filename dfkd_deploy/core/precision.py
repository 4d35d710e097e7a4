"""Numeric precision for the teacher and student forward passes, shared by synthesis and KD:
``auto`` resolves to bf16 where the device runs it natively, and the matching autocast context."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch


def bf16_native(device: torch.device) -> bool:
    """Whether the device runs bf16 convolutions natively (AVX-512/AMX CPUs, Ampere+ GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device supports it natively, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def autocast_factory(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    if precision == "bf16" and device.type in ("cpu", "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
