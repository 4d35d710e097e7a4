"""Loss terms for model inversion, shared by every synthesis method (FastDFKD and DeepInversion).

Terms on the teacher's BatchNorm statistics and outputs:

- ``BNStatistics``: forward hooks on every BatchNorm of the teacher; the loss is
  sum_l ||mu_batch - mu_run||_2 + ||var_batch - var_run||_2 (DeepInversion's feature
  regulariser). With ``momentum`` > 0 the batch statistics are blended with an exponential
  moving average of previous batches' statistics (the reference's ``bn_mmt``), which lets a
  small batch match the running statistics without every batch having to cover all classes.
  The per-channel moments come from :func:`channel_moments`: two reductions and, backwards,
  one fused multiply-add, instead of ``torch.var_mean``'s Welford pass and its autograd graph.
- ``class_ce``: cross-entropy of the teacher's output to the sampled target labels.
- ``adversarial_kl``: minus the student-teacher KL, masked to samples where both agree on the
  top-1 class, so the generator seeks samples on which the student is about to fail.

Priors that need no BN statistics (for fused or BN-free teachers; weights in ``synthesis.priors``):

- ``total_variation``: mean absolute difference of neighbouring pixels, in 4 directions
  (DeepInversion's image prior, L1 form, in [0, 1] pixel space).
- ``l2_prior``: mean square of the normalised (model-space) input (DeepInversion's L2 prior).
- ``class_balance``: log K - H(mean softmax of the batch): DAFL's information-entropy term
  (0 when the batch's predictions are balanced over the K classes).
- ``activation_l1``: -mean |f| of the teacher's penultimate features, the input of its last
  Linear/Gemm/MatMul (DAFL's activation term), captured by :class:`PenultimateFeatures`.

A prior for int8 teachers, whose quantized activations carry the range calibration saw:

- ``ranges``: :class:`ActivationRanges` hooks the surrogate's FakeQuant modules; per quantized
  activation, the mean excess outside [qmin, qmax] plus the squared gap between the batch's
  largest value and qmax (and its smallest and qmin, for a signed range), both in units of the
  range's span, averaged over the activations. Real data reached those ends when the file was
  calibrated; synthetic batches that do not, or overshoot, are told so.

:class:`InversionLoss` puts them together: pixels -> augmentation -> teacher (and student) ->
the weighted sum. Both synthesizers call it, so there is one implementation of every term.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.teachers.batchnorm import find_batchnorms, is_onnx_functional_bn
from dfkd_deploy.core.augment import color_shift, crop_flip, zoom
from dfkd_deploy.synthesis.hooks import TeacherHooks
from dfkd_deploy.synthesis.moments import channel_affine_grad, channel_moments, channel_sums
from dfkd_deploy.synthesis.proxy_stats import ProxyStatistics

# --------------------------------------------------------------------------- BN statistics


class _BNWithMoments(torch.autograd.Function):
    """An inference-mode BatchNorm that also returns its input's per-channel moments.

    Forward is the BN kernel itself (bit-identical output). Backward folds the BN gradient and
    the moments' gradient into one per-channel multiply-add over the input, instead of a BN
    backward, a separate moments backward and the sum of the two."""

    @staticmethod
    def forward(ctx, x, run_mean, run_var, weight, bias, eps):
        y = F.batch_norm(x, run_mean, run_var, weight, bias, False, 0.0, eps)
        n = x.numel() // x.shape[1]
        s1, s2 = channel_sums(x)
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        scale = torch.rsqrt(run_var.float() + eps)
        if weight is not None:
            scale = scale * weight.float()
        ctx.save_for_backward(x, mean, scale)
        ctx.n = n
        return y, mean, var

    @staticmethod
    def backward(ctx, g_y, g_mean, g_var):
        x, mean, scale = ctx.saved_tensors
        n = ctx.n
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        g_var = torch.zeros_like(mean) if g_var is None else g_var
        a = (g_mean - 2 * mean * g_var) / n
        b = 2 * g_var / n
        return channel_affine_grad(x, a, b, g_y, scale), None, None, None, None, None


class _BNHook:
    """One teacher BN layer. Inside ``capture()`` an inference-mode layer runs as
    :class:`_BNWithMoments` (its ``forward`` is swapped for the capture); any other layer (e.g. in
    training mode) is served by a forward hook that computes the moments of its input."""

    def __init__(self, name: str, module: nn.Module, owner: "BNStatistics"):
        self.name = name
        self.owner = owner
        self.module = module
        self.functional = is_onnx_functional_bn(module)
        self.handle = module.register_forward_hook(self._hook)
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fused_ran = False

    # -- fused path ------------------------------------------------------------------------
    def install(self) -> None:
        m = self.module
        if m.training or (not self.functional and getattr(m, "running_mean", None) is None):
            return
        m.forward = self._functional_forward if self.functional else self._module_forward

    def uninstall(self) -> None:
        self.module.__dict__.pop("forward", None)

    def _module_forward(self, x):
        m = self.module
        y, mean, var = _BNWithMoments.apply(x, m.running_mean, m.running_var, m.weight, m.bias, m.eps)
        self.fused_ran = True
        self._record(mean, var, m.running_mean, m.running_var)
        return y

    def _functional_forward(self, x, weight, bias, running_mean, running_var):
        y, mean, var = _BNWithMoments.apply(x, running_mean, running_var, weight, bias, self.module.epsilon)
        self.fused_ran = True
        self._record(mean, var, running_mean, running_var)
        return y

    # -- hook path -------------------------------------------------------------------------
    def _hook(self, module, inputs, output):
        if not self.owner.active:
            return
        if self.fused_ran:
            self.fused_ran = False
            return
        x = inputs[0]
        if self.functional:  # onnx2torch passes (x, weight, bias, running_mean, running_var)
            run_mean, run_var = inputs[3], inputs[4]
        else:
            run_mean, run_var = module.running_mean, module.running_var
        if run_mean is None or run_var is None:   # no running statistics to match
            return
        mean, var = channel_moments(x)
        self._record(mean, var, run_mean, run_var)

    def _record(self, mean, var, run_mean, run_var) -> None:
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
        self.uninstall()
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
        for h in self.hooks:
            h.fused_ran = False
            h.install()
        try:
            yield
        finally:
            self.active = False
            for h in self.hooks:
                h.uninstall()

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


# --------------------------------------------------------------------------- output terms


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


def target_confidence(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean teacher probability of the sampled labels: how convincing a batch is."""
    return F.softmax(teacher_logits.float(), dim=1).gather(1, targets[:, None]).mean()


# --------------------------------------------------------------------------- priors without BN


def total_variation(pixels: torch.Tensor) -> torch.Tensor:
    """Sum over 4 directions (horizontal, vertical, both diagonals) of the mean |difference|."""
    x = pixels.float()
    terms = []
    if x.shape[-1] > 1:
        terms.append((x[..., :, 1:] - x[..., :, :-1]).abs().mean())
    if x.shape[-2] > 1:
        terms.append((x[..., 1:, :] - x[..., :-1, :]).abs().mean())
    if x.shape[-1] > 1 and x.shape[-2] > 1:
        terms.append((x[..., 1:, 1:] - x[..., :-1, :-1]).abs().mean())
        terms.append((x[..., 1:, :-1] - x[..., :-1, 1:]).abs().mean())
    return torch.stack(terms).sum() if terms else x.new_zeros(())


def l2_prior(model_input: torch.Tensor) -> torch.Tensor:
    """Mean square of the normalised input (0 at the data mean, about 1 for natural images)."""
    return model_input.float().square().mean()


def class_balance(teacher_logits: torch.Tensor) -> torch.Tensor:
    """log K - H(p_mean): 0 when the batch's mean prediction is uniform over the K classes."""
    p = F.softmax(teacher_logits.float(), dim=1).mean(0)
    return math.log(p.numel()) + (p * torch.log(p.clamp_min(1e-12))).sum()


def activation_l1(features: torch.Tensor) -> torch.Tensor:
    """Minus the mean absolute penultimate activation (DAFL: real data activates the features)."""
    return -features.float().abs().mean()


_CLASSIFIER_TYPES = ("OnnxGemm", "OnnxMatMul")


class PenultimateFeatures(TeacherHooks):
    """Captures the input of the teacher's classifier layer: the last Linear / onnx2torch Gemm or
    MatMul module to run in a forward pass (the last convolution when there is none, e.g. a
    1x1-conv head). "Last to run" rather than "last registered" copes with converted graphs whose
    module order says nothing about execution order; a teacher run in chunks (fixed batch) gets
    the chunks concatenated."""

    def __init__(self, teacher: nn.Module):
        linear = [m for m in teacher.modules() if isinstance(m, nn.Linear) or type(m).__name__ in _CLASSIFIER_TYPES]
        super().__init__(linear or [m for m in teacher.modules() if isinstance(m, nn.modules.conv._ConvNd)])

    def _reset(self) -> None:
        self.fired: list[tuple[int, torch.Tensor]] = []

    def _hook(self, module, args):
        if self.active and args and isinstance(args[0], torch.Tensor):
            self.fired.append((id(module), args[0]))

    def features(self) -> Optional[torch.Tensor]:
        if not self.fired:
            return None
        last = self.fired[-1][0]
        chunks = [t for mid, t in self.fired if mid == last]
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return out.flatten(1)


class ActivationRanges(TeacherHooks):
    """The range prior of an int8 teacher: pre-hooks on its FakeQuant modules (the quantized
    activations of :mod:`dfkd_deploy.teachers.quantized`), each input measured in integer units
    q = x / scale + zero_point."""

    def __init__(self, teacher: nn.Module):
        super().__init__([m for m in teacher.modules() if type(m).__name__ == "FakeQuant" and hasattr(m, "qmax")])

    def _reset(self) -> None:
        self.terms: list[torch.Tensor] = []

    def _hook(self, module, args):
        if not (self.active and args and isinstance(args[0], torch.Tensor)):
            return
        x = args[0].float()
        scale, zp = module.scale.float(), module.zero_point.float()
        if scale.ndim and module.axis is not None:
            shape = [1] * x.ndim
            shape[module.axis % x.ndim] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        q = x / scale + zp
        qmin, qmax = float(module.qmin), float(module.qmax)
        span = max(qmax - qmin, 1.0)
        outside = (F.relu(q - qmax) + F.relu(qmin - q)).mean() / span
        reach = (F.relu(qmax - q.amax()) / span) ** 2
        if float(zp.min()) > qmin:          # a signed range: the batch should reach its bottom too
            reach = reach + (F.relu(q.amin() - qmin) / span) ** 2
        self.terms.append(outside + reach)

    def loss(self) -> Optional[torch.Tensor]:
        return torch.stack(self.terms).mean() if self.terms else None


# --------------------------------------------------------------------------- the total


@dataclass
class LossTerms:
    total: torch.Tensor
    bn: torch.Tensor
    ce: torch.Tensor
    adv: torch.Tensor
    prior: torch.Tensor          # weighted sum of the prior terms
    teacher_logits: torch.Tensor  # fp32


class InversionLoss:
    """The objective every synthesis step minimises, for a batch of pixel-space images:

    bn * BN statistics + oh * CE(T(x), y) + adv * masked-KL adversarial term
    + tv * TV + l2 * L2 + entropy * (log K - H) + activation * (-mean |f|) + ranges * R

    where x is the augmented (crop + flip) and normalised batch. ``autocast`` is the context the
    teacher and student run in (bf16 autocast or none); every loss term is computed in fp32.
    """

    def __init__(self, teacher: nn.Module, normalizer: nn.Module, opts, priors: dict[str, float],
                 use_bn_statistics: bool = True, autocast=nullcontext, channels_last: bool = False,
                 explicit_activation: bool = False, explicit_ranges: bool = False,
                 input_shape=None, explicit_proxy: bool = False):
        self.teacher = teacher
        self.normalizer = normalizer
        self.opts = opts
        self.adv = float(opts.adv)   # the synthesizer sets the resolved weight (synthesis.adv_bn_free)
        self.autocast = autocast
        self.channels_last = channels_last
        # A teacher whose BN layers cannot be trusted to see whole batches (the loader reports
        # bn_layers=0 then) gets no BN term rather than a wrong one.
        self.bn_stats = BNStatistics(teacher if use_bn_statistics and opts.bn > 0 else nn.Identity(),
                                     momentum=opts.bn_mmt)
        self.priors = dict(priors)
        self.notes: list[str] = []
        self.features: Optional[PenultimateFeatures] = self._hooked_prior(
            "activation", lambda: PenultimateFeatures(teacher), explicit_activation,
            "synthesis.priors.activation needs the teacher's penultimate features, but no "
            "Linear/Gemm/MatMul/Conv layer of this teacher accepts a hook; set it to 0",
            "activation prior off: no hookable classifier layer in the teacher")
        self.ranges: Optional[ActivationRanges] = self._hooked_prior(
            "ranges", lambda: ActivationRanges(teacher), explicit_ranges,
            "synthesis.priors.ranges needs an int8 teacher's quantized activations, and this "
            "teacher has none (or they refuse hooks); set it to 0",
            "range prior off: the teacher has no quantized activations")
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        self.proxy: Optional[ProxyStatistics] = self._hooked_prior(
            "proxy", lambda: ProxyStatistics(teacher, normalizer, input_shape or (), device=device), explicit_proxy,
            "synthesis.priors.proxy needs image inputs and convolutions that accept a hook, "
            "and this teacher has none; set it to 0",
            "proxy-statistics prior off: the teacher has no hookable convolution on an image input")

    def _hooked_prior(self, name: str, build, explicit: bool, error: str, note: str):
        """The hooks of a prior that is on, or None: a prior the teacher cannot have is an error
        when the recipe set it, and is turned off with a note when it was automatic."""
        if self.priors.get(name, 0) <= 0:
            return None
        hooks = build()
        if hooks.available:
            return hooks
        if explicit:
            raise UsageError(error)
        self.priors[name] = 0.0
        self.notes.append(note)
        return None

    def _model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        a = self.opts.augment
        x = self.normalizer(zoom(crop_flip(pixels, a.crop_padding, a.flip), a.zoom))
        x = color_shift(x, a.color_shift)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def remove(self) -> None:
        """Take every hook this loss put on the teacher off again (BN statistics, features)."""
        self.bn_stats.remove()
        if self.features is not None:
            self.features.remove()
        if self.ranges is not None:
            self.ranges.remove()
        if self.proxy is not None:
            self.proxy.remove()

    def __call__(self, pixels: torch.Tensor, targets: torch.Tensor, student: nn.Module | None = None) -> LossTerms:
        o, w = self.opts, self.priors
        x = self._model_input(pixels)
        feats = self.features.capture() if self.features is not None else nullcontext()
        ranges = self.ranges.capture() if self.ranges is not None else nullcontext()
        proxy = self.proxy.capture() if self.proxy is not None else nullcontext()
        with self.autocast(), self.bn_stats.capture(), feats, ranges, proxy:
            t_out = self.teacher(x)
            s_out = student(x) if student is not None else None
        t_out = t_out.float()
        zero = t_out.new_zeros(())
        loss_bn = self.bn_stats.loss().to(t_out.device) if len(self.bn_stats) else zero
        loss_ce = class_ce(t_out, targets)
        loss_adv = adversarial_kl(s_out.float(), t_out) if s_out is not None else zero
        prior = zero
        if w["tv"] > 0:
            prior = prior + w["tv"] * total_variation(pixels)
        if w["l2"] > 0:
            prior = prior + w["l2"] * l2_prior(self.normalizer(pixels))
        if w["entropy"] > 0:
            prior = prior + w["entropy"] * class_balance(t_out)
        if self.features is not None:
            f = self.features.features()
            if f is not None:
                prior = prior + w["activation"] * activation_l1(f)
        if self.ranges is not None:
            r = self.ranges.loss()
            if r is not None:
                prior = prior + w["ranges"] * r
        if self.proxy is not None:
            p = self.proxy.loss()
            if p is not None:
                prior = prior + w["proxy"] * p
        total = o.bn * loss_bn + o.oh * loss_ce + self.adv * loss_adv + prior
        return LossTerms(total, loss_bn, loss_ce, loss_adv, prior, t_out)
