"""Loss terms for model inversion, shared by every synthesis method.

- ``BNStatistics``: forward hooks on every BatchNorm of the teacher; the loss is
  sum_l ||mu_batch - mu_run||_2 + ||var_batch - var_run||_2 (DeepInversion's feature
  regulariser). With ``momentum`` > 0 the batch statistics are blended with an exponential
  moving average of previous batches' statistics (the reference's ``bn_mmt``), which lets a
  small batch match the running statistics without every batch having to cover all classes.
- ``class_ce``: cross-entropy of the teacher's output to the sampled target labels.
- ``adversarial_kl``: minus the student-teacher KL, masked to samples where both agree on the
  top-1 class, so the generator seeks samples on which the student is about to fail.
- ``kd_kl``: the distillation loss, KL(teacher || student) at temperature T, scaled by T^2.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..teachers.batchnorm import find_batchnorms, is_onnx_functional_bn


class _BNHook:
    def __init__(self, name: str, module: nn.Module, owner: "BNStatistics"):
        self.name = name
        self.owner = owner
        self.functional = is_onnx_functional_bn(module)
        self.handle = module.register_forward_hook(self._hook)
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def _hook(self, module, inputs, output):
        if not self.owner.active:
            return
        x = inputs[0]
        if self.functional:  # onnx2torch passes (x, weight, bias, running_mean, running_var)
            run_mean, run_var = inputs[3], inputs[4]
        else:
            run_mean, run_var = module.running_mean, module.running_var
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x.float(), dim=dims, unbiased=False)
        self.last = (mean.detach(), var.detach())
        m = self.owner.momentum
        if self.ema is not None and m > 0:
            mean = (1 - m) * mean + m * self.ema[0]
            var = (1 - m) * var + m * self.ema[1]
        self.owner.terms.append(torch.linalg.vector_norm(run_var.float() - var)
                                + torch.linalg.vector_norm(run_mean.float() - mean))

    def update_ema(self) -> None:
        if self.last is None:
            return
        if self.ema is None:
            self.ema = self.last
        else:
            m = self.owner.momentum
            self.ema = (m * self.ema[0] + (1 - m) * self.last[0], m * self.ema[1] + (1 - m) * self.last[1])

    def remove(self) -> None:
        self.handle.remove()


class BNStatistics:
    """Collects the BN-statistics loss of every teacher forward run inside ``capture()``.

    Hooks stay registered but do nothing outside ``capture()``, so the teacher's forward passes
    for distillation and validation pay nothing for them.
    """

    def __init__(self, teacher: nn.Module, momentum: float = 0.0):
        self.momentum = momentum
        self.active = False
        self.terms: list[torch.Tensor] = []
        self.hooks = [_BNHook(n, m, self) for n, m in find_batchnorms(teacher)]

    def __len__(self) -> int:
        return len(self.hooks)

    @contextmanager
    def capture(self) -> Iterator[None]:
        self.terms = []
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def loss(self) -> torch.Tensor:
        if not self.terms:
            return torch.zeros(())
        return torch.stack(self.terms).sum()

    def update_ema(self) -> None:
        """Fold the last captured batch into the moving statistics (once per synthesized batch)."""
        if self.momentum > 0:
            for h in self.hooks:
                h.update_ema()

    def state_dict(self) -> dict:
        return {h.name: h.ema for h in self.hooks}

    def load_state_dict(self, state: dict) -> None:
        for h in self.hooks:
            h.ema = state.get(h.name)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def class_ce(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(teacher_logits, targets)


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) per sample."""
    log_q = F.log_softmax(student_logits / T, dim=1)
    log_p = F.log_softmax(teacher_logits / T, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def adversarial_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl_per_sample(student_logits, teacher_logits) * agree).mean()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    return kl_per_sample(student_logits, teacher_logits, T).mean() * (T * T)


def target_confidence(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean teacher probability of the sampled labels: how convincing a batch is."""
    return F.softmax(teacher_logits.float(), dim=1).gather(1, targets[:, None]).mean()
