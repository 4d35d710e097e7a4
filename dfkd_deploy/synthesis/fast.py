"""FastDFKD (Fang et al., AAAI 2022): a meta-learned generator from which a few steps make a batch.

One round (``synthesize``), as the reference's ``fast_meta`` synthesizer:
1. fresh latent z (learnable) and uniformly sampled target labels;
2. a copy of the generator and z take ``g_steps`` Adam steps (betas 0.5, 0.999; z at ``lr_z``)
   on the shared :class:`~dfkd_deploy.synthesis.losses.InversionLoss`:
   bn * BN-statistics (EMA-blended, ``bn_mmt``) + oh * CE(T(x), y) - adv * masked KL(S(x) || T(x))
   (+ the BN-free priors when they are on); the adversarial term only once the Distiller says so;
3. first-order meta update (FOMAML): the copy's gradients at every inner step are summed into
   the meta generator's gradient, and one Adam step with lr = lr_g * g_steps is taken;
4. the inner step with the lowest loss gives the batch that enters the pool, and the last
   step's batch statistics are folded into the BN moving average.

Speed (see docs/method.md): the student's weights take no gradients during synthesis, the
teacher and student run under bf16 autocast where the device supports it (the generator's
convolutions in bf16 except their weight gradients), convolutions in channels-last, and the BN hooks compute their moments with two reductions.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dfkd_deploy.models.generator import Generator
from dfkd_deploy.synthesis.base import RoundStats, Synthesizer, frozen
from dfkd_deploy.synthesis.losses import target_confidence
from dfkd_deploy.synthesis.registry import register_synthesizer


@register_synthesizer("fastdfkd")
class FastSynthesizer(Synthesizer):

    def _setup(self) -> None:
        opts = self.opts
        c, h, w = self.input_shape
        self.generator = Generator(opts.nz, opts.ngf, (h, w), c).to(self.device).train()
        if self.channels_last:
            self.generator.to(memory_format=torch.channels_last)
        # bf16 forward and input gradients for the generator's convolutions, fp32 weight gradients
        self.generator.bf16_convs = self.precision == "bf16"
        # Adam with betas (0.5, 0.999) for both loops, meta lr scaled by g_steps, as the reference.
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), opts.lr_g * opts.g_steps,
                                               betas=(0.5, 0.999))

    def _reinitialise_input_layers(self) -> nn.Module:
        self.generator.reset_l0()
        return self.generator

    def _fast_copy(self) -> nn.Module:
        """The round's fast generator: one module kept across rounds and loaded with the meta
        generator's parameters and buffers each round (the same values a deep copy would have,
        without building a module and allocating its tensors every round)."""
        fast = getattr(self, "_fast", None)
        if fast is None:
            fast = self._fast = copy.deepcopy(self.generator)
        else:
            with torch.no_grad():
                for dst, src in zip(fast.state_dict().values(), self.generator.state_dict().values()):
                    dst.copy_(src)
        fast.bf16_convs = self.generator.bf16_convs
        fast.train(self.generator.training)
        for p in fast.parameters():
            p.grad = None
        return fast

    def synthesize(self, student: nn.Module | None = None, *, adversarial: bool = False,
                   meta_update: bool = True, batch_size: int | None = None) -> tuple[torch.Tensor, RoundStats]:
        """One batch: returns pixel-space images ([0,1], NCHW) and the round's loss terms."""
        o = self.opts
        bs = batch_size or o.batch_size
        adv_student = student if (adversarial and self.adv > 0 and student is not None) else None

        z = torch.randn(bs, o.nz, device=self.device, requires_grad=True)
        targets = torch.randint(0, self.num_classes, (bs,), device=self.device)
        fast = self._fast_copy()
        inner = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": o.lr_z}],
                                 lr=o.lr_g, betas=(0.5, 0.999))
        if meta_update:
            self.meta_optimizer.zero_grad(set_to_none=False)
            for p in self.generator.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

        best_loss, best_x, best_stats = float("inf"), None, None
        with frozen(student):
            for _ in range(o.g_steps):
                # No autocast for the generator: it needs weight gradients, and bf16
                # weight-gradient convolutions are slow on CPU (about 1 s per call with oneDNN
                # 3.12 here); under bf16 its convolutions run as _MixedConv2d instead.
                x = fast(z)
                terms = self.loss(x, targets, adv_student)
                self._check_finite(terms)
                loss = terms.total.item()
                if best_x is None or loss < best_loss:
                    best_loss, best_x = loss, x.detach()
                    best_stats = RoundStats(loss, terms.bn.item(), terms.ce.item(), terms.adv.item(),
                                            target_confidence(terms.teacher_logits, targets).item(),
                                            terms.prior.item())
                inner.zero_grad()
                terms.total.backward()
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
        return best_x.contiguous(), best_stats

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "bn_ema": self.bn_stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.bn_stats.load_state_dict(state["bn_ema"])
