"""DeepInversion (Yin et al., CVPR 2020): every batch is optimised from noise, pixels directly.

No generator: a batch starts as Gaussian noise and takes ``g_steps`` Adam steps (lr ``lr_g``,
betas 0.5, 0.99 as the reference) on the same :class:`~dfkd_deploy.synthesis.losses.InversionLoss`
as FastDFKD (BN statistics, CE to sampled labels, masked adversarial KL, BN-free priors), and is
projected back into the valid pixel range after every step. The paper's setting, DeepInversion-2k,
is 2000 steps per batch at lr 0.1 (``recipes/cifar-resnet20-deepinversion.yaml``).

The optimised variable lives in normalised units: pixel = centre + scale * u with the teacher's
mean/std (in pixel units), as the reference optimises the normalised image; so ``lr_g`` means the
same step for every teacher. A teacher that declares no mean/std gets centre 0.5, scale 0.25.
Nothing carries over between batches except the BN moving average when ``bn_mmt`` > 0 (off by
default for this method, as in the reference), so ``state_dict`` holds only that.
"""
from __future__ import annotations

import torch
from torch import nn

from dfkd_deploy.synthesis.base import RoundStats, Synthesizer, frozen
from dfkd_deploy.synthesis.losses import target_confidence
from dfkd_deploy.synthesis.registry import register_synthesizer


@register_synthesizer("deepinversion")
class DeepInversionSynthesizer(Synthesizer):

    def _setup(self) -> None:
        c = self.input_shape[0]
        vr = float(getattr(self.normalizer, "value_range", 1.0))
        mean = getattr(self.normalizer, "mean", None)
        std = getattr(self.normalizer, "std", None)
        declared = mean is not None and std is not None and bool((mean != 0).any() or (std != 1).any())
        if declared:
            centre, scale = mean.reshape(1, -1, 1, 1).float() / vr, std.reshape(1, -1, 1, 1).float() / vr
            centre, scale = centre.expand(1, c, 1, 1), scale.expand(1, c, 1, 1)
        else:
            centre, scale = torch.full((1, c, 1, 1), 0.5), torch.full((1, c, 1, 1), 0.25)
        self.centre = centre.to(self.device).clone()
        self.scale = scale.to(self.device).clone()
        # u is kept where centre + scale * u stays inside [0, 1]
        self.u_min = (0 - self.centre) / self.scale
        self.u_max = (1 - self.centre) / self.scale

    def _pixels(self, u: torch.Tensor) -> torch.Tensor:
        return self.centre + self.scale * u

    def synthesize(self, student: nn.Module | None = None, *, adversarial: bool = False,
                   meta_update: bool = True, batch_size: int | None = None) -> tuple[torch.Tensor, RoundStats]:
        """One batch optimised from noise. ``meta_update=False`` (probes) only keeps the batch out
        of the BN moving average: there is no generator to update."""
        o = self.opts
        bs = batch_size or o.batch_size
        c, h, w = self.input_shape
        adv_student = student if (adversarial and self.adv > 0 and student is not None) else None
        u = torch.randn(bs, c, h, w, device=self.device).clamp_(self.u_min, self.u_max)
        if self.channels_last:
            u = u.contiguous(memory_format=torch.channels_last)
        u.requires_grad_(True)
        targets = torch.randint(0, self.num_classes, (bs,), device=self.device)
        opt = torch.optim.Adam([u], lr=o.lr_g, betas=(0.5, 0.99))

        best_loss, best_x, best_stats = float("inf"), None, None
        with frozen(student):
            for _ in range(o.g_steps):
                x = self._pixels(u)
                terms = self.loss(x, targets, adv_student)
                self._check_finite(terms)
                loss = terms.total.item()
                if best_x is None or loss < best_loss:
                    best_loss, best_x = loss, x.detach().clone()
                    best_stats = RoundStats(loss, terms.bn.item(), terms.ce.item(), terms.adv.item(),
                                            target_confidence(terms.teacher_logits, targets).item(),
                                            terms.prior.item())
                opt.zero_grad(set_to_none=True)
                terms.total.backward()
                opt.step()
                with torch.no_grad():
                    u.clamp_(self.u_min, self.u_max)
        if meta_update:
            self.bn_stats.update_ema()
        return best_x.clamp(0, 1).contiguous(), best_stats

    def state_dict(self) -> dict:
        return {"bn_ema": self.bn_stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.bn_stats.load_state_dict(state.get("bn_ema", {}))
