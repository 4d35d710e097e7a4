"""FastDFKD (Fang et al., AAAI 2022): a meta-learned generator from which a few steps make a batch.

One round (``synthesize``):
1. fresh latent z (learnable) and uniformly sampled target labels;
2. a copy of the generator and z take ``g_steps`` Adam steps on
   bn * BN-statistics + oh * CE(T(x), y) - adv * masked KL(S(x) || T(x))
   (the adversarial term only once distillation has started, i.e. after warm-up);
3. first-order meta update (FOMAML): the copy's gradients at every inner step are summed into
   the meta generator's gradient, and one Adam step with lr = lr_g * g_steps is taken;
4. the inner step with the lowest loss gives the batch that enters the pool.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..models.generator import Generator
from ..recipe import SynthesisOptions
from .augment import crop_flip
from .losses import BNStatistics, adversarial_kl, class_ce, target_confidence


@dataclass
class RoundStats:
    loss: float
    bn: float
    ce: float
    adv: float
    confidence: float   # teacher's mean probability of the sampled labels, best batch


class FastSynthesizer:
    def __init__(self, teacher: nn.Module, normalizer: nn.Module, input_shape: tuple[int, int, int],
                 num_classes: int, opts: SynthesisOptions, device: torch.device | str = "cpu",
                 use_bn_statistics: bool = True):
        self.teacher = teacher
        self.normalizer = normalizer.to(device)
        self.opts = opts
        self.num_classes = num_classes
        self.device = torch.device(device)
        c, h, w = input_shape
        self.generator = Generator(opts.nz, opts.ngf, (h, w), c).to(self.device).train()
        # Adam with betas (0.5, 0.999) for both loops, meta lr scaled by g_steps, as the reference.
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), opts.lr_g * opts.g_steps,
                                               betas=(0.5, 0.999))
        # A teacher whose BN layers cannot be trusted to see whole batches (the loader reports
        # bn_layers=0 then) gets no BN term rather than a wrong one.
        self.bn_stats = BNStatistics(teacher if use_bn_statistics else nn.Identity(), momentum=opts.bn_mmt)
        # Under torch.distributed the caller sets this to average the meta-gradients across ranks
        # before the meta step (see dfkd_deploy.distributed); None in a single process.
        self.meta_grad_sync = None

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        a = self.opts.augment
        return self.normalizer(crop_flip(x, a.crop_padding, a.flip))

    def synthesize(self, student: nn.Module | None = None, *, adversarial: bool = False,
                   meta_update: bool = True, batch_size: int | None = None) -> tuple[torch.Tensor, RoundStats]:
        """One batch: returns pixel-space images ([0,1], NCHW) and the round's loss terms."""
        o = self.opts
        bs = batch_size or o.batch_size
        use_adv = adversarial and o.adv > 0 and student is not None
        was_training = student.training if student is not None else False
        if student is not None:
            student.eval()

        z = torch.randn(bs, o.nz, device=self.device, requires_grad=True)
        targets = torch.randint(0, self.num_classes, (bs,), device=self.device)
        fast = copy.deepcopy(self.generator)
        inner = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": o.lr_z}],
                                 lr=o.lr_g, betas=(0.5, 0.999))
        if meta_update:
            self.meta_optimizer.zero_grad(set_to_none=False)
            for p in self.generator.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

        best: tuple[float, torch.Tensor, RoundStats] | None = None
        for _ in range(o.g_steps):
            x = fast(z)
            x_aug = self._augment(x)
            with self.bn_stats.capture():
                t_out = self.teacher(x_aug)
            loss_bn = self.bn_stats.loss().to(t_out.device)
            loss_ce = class_ce(t_out, targets)
            loss_adv = adversarial_kl(student(x_aug), t_out) if use_adv else torch.zeros((), device=t_out.device)
            loss = o.bn * loss_bn + o.oh * loss_ce + o.adv * loss_adv
            if not torch.isfinite(loss):
                from ..errors import TrainingError

                raise TrainingError(f"synthesis loss is {loss.item()} (bn={loss_bn.item():.4g}, "
                                    f"ce={loss_ce.item():.4g}, adv={loss_adv.item():.4g}); lower synthesis.lr_g")
            if best is None or loss.item() < best[0]:
                with torch.no_grad():
                    conf = target_confidence(t_out, targets).item()
                best = (loss.item(), x.detach(), RoundStats(loss.item(), loss_bn.item(), loss_ce.item(),
                                                            loss_adv.item(), conf))
            inner.zero_grad()
            loss.backward()
            if meta_update:
                for p, fp in zip(self.generator.parameters(), fast.parameters()):
                    if fp.grad is not None:
                        p.grad.add_(fp.grad)
            inner.step()

        if meta_update:
            if self.meta_grad_sync is not None:
                self.meta_grad_sync(self.generator.parameters())
            self.meta_optimizer.step()
            self.bn_stats.update_ema()
        if student is not None and was_training:
            student.train()
        assert best is not None
        return best[1], best[2]

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "bn_ema": self.bn_stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.bn_stats.load_state_dict(state["bn_ema"])
