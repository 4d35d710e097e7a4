"""The knowledge-distillation loss: KL(teacher || student) at temperature T, scaled by T^2
(Hinton et al.), averaged over the batch."""
from __future__ import annotations

import torch

from dfkd_deploy.synthesis.losses import kl_per_sample


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    return kl_per_sample(student_logits, teacher_logits, T).mean() * (T * T)
