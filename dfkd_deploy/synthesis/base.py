"""What every synthesizer shares: the round's statistics, precision and memory-format choices,
and the interface the Distiller, the probes and checkpoints use.

A synthesizer offers ``synthesize(student, adversarial=, meta_update=, batch_size=)`` returning
pixel-space images ([0, 1], NCHW) and a :class:`RoundStats`; ``state_dict()`` /
``load_state_dict()``; and ``reset_l0()`` (the generator re-initialisation of FastDFKD, a no-op
where there is no generator).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from dfkd_deploy.synthesis.losses import InversionLoss, resolve_priors


@dataclass
class RoundStats:
    loss: float
    bn: float
    ce: float
    adv: float
    confidence: float   # teacher's mean probability of the sampled labels, best batch
    prior: float = 0.0  # weighted sum of the BN-free prior terms, best batch


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


@contextlib.contextmanager
def frozen(module: nn.Module | None):
    """The student during synthesis: eval mode, and no parameter gradients (the synthesis loss
    needs the gradient to the student's input only; its weight gradients would be wasted work)."""
    if module is None:
        yield
        return
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


class Synthesizer:
    """Common set-up: device, precision, the shared :class:`InversionLoss`."""

    method = "base"

    def __init__(self, teacher: nn.Module, normalizer: nn.Module, input_shape: tuple[int, int, int],
                 num_classes: int, opts, device: torch.device | str = "cpu", use_bn_statistics: bool = True,
                 priors: dict[str, float] | None = None, explicit_activation: bool = False):
        self.teacher = teacher
        self.device = torch.device(device)
        self.normalizer = normalizer.to(self.device)
        self.opts = opts
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.precision = resolve_precision(opts.precision, self.device)
        self.autocast = autocast_factory(self.precision, self.device)
        self.channels_last = bool(opts.channels_last) and len(self.input_shape) == 3
        if priors is None:
            priors = resolve_priors(opts.priors, use_bn_statistics)
        self.loss = InversionLoss(teacher, self.normalizer, opts, priors, use_bn_statistics=use_bn_statistics,
                                  autocast=self.autocast, channels_last=self.channels_last,
                                  explicit_activation=explicit_activation)
        self._setup()

    def _setup(self) -> None:
        """What a method builds beyond the common set-up (a generator, a pixel parametrisation)."""

    @property
    def bn_stats(self):
        return self.loss.bn_stats

    def reset_l0(self) -> None:
        """Re-initialise the generator's input layers (FastDFKD); nothing to do without a generator."""

    def synthesize(self, student: nn.Module | None = None, *, adversarial: bool = False,
                   meta_update: bool = True, batch_size: int | None = None) -> tuple[torch.Tensor, RoundStats]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def _check_finite(self, terms) -> None:
        if not torch.isfinite(terms.total):
            from dfkd_deploy.core.errors import TrainingError

            raise TrainingError(f"synthesis loss is {terms.total.item()} (bn={terms.bn.item():.4g}, "
                                f"ce={terms.ce.item():.4g}, adv={terms.adv.item():.4g}); lower synthesis.lr_g")
