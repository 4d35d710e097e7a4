"""Stand-in feature statistics for teachers that lost their BatchNorm statistics.

A teacher whose BN layers were folded into its convolutions (torch's dynamo export, the
MLPerf-Tiny ResNet-8) computes the same function as before, but the file no longer records the
per-channel statistics its training data produced, which are what the BN term of model inversion
matches. What is left to say about the data is what all natural images share: colour noise whose
amplitude spectrum falls as a power of the frequency. :class:`ProxyStatistics` measures, once,
the per-channel mean and variance of the outputs of the teacher's first convolutions (in the
order they run) on such noise, and its loss pulls a synthesized batch's statistics at those
layers towards them; the deeper layers are left to the class terms.

Measured on the shared CIFAR-10 ResNet-56 with its BN kept (``benchmarks/proxy_noise.py``,
docs/method.md): at the first stage's 19 BN layers, 1/f^1.5 noise is 2.5 times as far from the
training statistics as real test images are (114 against 46 in the synthesizer's BN-loss units;
uniform noise 649, 14 times), while at the 36 deeper layers it is 2.8 times as far (348 against
126), hence :data:`PROXY_LAYER_FRACTION`. With it on, ``benchmarks/bn_free_priors.py`` chose the
weight (docs/benchmarks.md).

The loss is scale-free, since a folded layer's scale is arbitrary: per layer, the RMS over
channels of the mean's offset in units of the proxy's standard deviation plus the RMS of the
variance's relative offset, averaged over the layers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from dfkd_deploy.synthesis.hooks import TeacherHooks
from dfkd_deploy.synthesis.moments import channel_moments
from dfkd_deploy.teachers.spec import has_convolution

# Exponent of the noise's amplitude spectrum (1/f^alpha) and the share of the teacher's
# convolutions, first in call order, whose statistics are matched.
PROXY_ALPHA = 1.5
PROXY_LAYER_FRACTION = 1 / 3
PROXY_IMAGES = 256


def proxy_applicable(teacher: nn.Module, input_shape) -> bool:
    """Whether a teacher can have the prior: an image input and at least one convolution (an MLP
    cannot; whether its convolutions accept hooks shows only when :class:`ProxyStatistics` is built)."""
    return len(tuple(input_shape)) == 3 and has_convolution(teacher)


def power_law_noise(n: int, shape: tuple[int, int, int], *, alpha: float = PROXY_ALPHA,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` pixel-space images in [0, 1] (NCHW) of colour noise with a 1/f^alpha amplitude
    spectrum: a luminance field shared by the channels plus 0.4 of an independent field per
    channel, a mean of 0.47 with a random colour cast (sd 0.1) and a contrast (sd) of 0.22."""
    c, h, w = shape
    fy, fx = torch.fft.fftfreq(h), torch.fft.fftfreq(w)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    r[0, 0] = 1.0
    amp = r.pow(-alpha)
    amp[0, 0] = 0.0

    def field(channels: int) -> torch.Tensor:
        phase = torch.rand(n, channels, h, w, generator=generator) * (2 * math.pi)
        return torch.fft.ifft2(amp * torch.exp(1j * phase)).real

    x = field(1) + 0.4 * field(c)
    x = (x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True).clamp_min(1e-8)
    x = 0.47 + 0.22 * x + 0.1 * torch.randn(n, c, 1, 1, generator=generator)
    return x.clamp(0.0, 1.0).float()


class ProxyStatistics(TeacherHooks):
    """Forward hooks on a teacher's convolutions; targets measured on :func:`power_law_noise`.

    ``available`` is False when the teacher has no convolution that accepts a hook (an MLP,
    TorchScript). The hooks record only inside :meth:`capture`; a teacher run in chunks (a
    fixed-batch file) has its chunks' moments pooled per layer."""

    OUTPUTS = True

    def __init__(self, teacher: nn.Module, normalizer: nn.Module, input_shape, *,
                 fraction: Optional[float] = None, images: int = PROXY_IMAGES,
                 alpha: float = PROXY_ALPHA, seed: int = 0, device: torch.device | str = "cpu"):
        fraction = PROXY_LAYER_FRACTION if fraction is None else fraction
        self.targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layer_names: list[str] = []
        convs = [(n, m) for n, m in teacher.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
        super().__init__([m for _, m in convs] if len(tuple(input_shape)) == 3 else [])
        if not self.available:
            return
        gen = torch.Generator().manual_seed(seed)
        noise = power_law_noise(images, tuple(input_shape), alpha=alpha, generator=gen).to(device)
        sums: dict[int, list] = {}      # per layer, in the order the layers first ran
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                for start in range(0, images, 64):
                    with self.capture():
                        teacher(normalizer(noise[start:start + 64]))
                    _accumulate(sums, self.fired)
        finally:
            teacher.train(was_training)
        moments = _moments(sums)
        keep = list(moments)[:max(1, math.ceil(fraction * len(moments)))] if moments else []
        names = {id(m): n for n, m in convs}
        for mid in keep:
            mean, var = moments[mid]
            self.targets[mid] = (mean, var.clamp_min(1e-8))
            self.layer_names.append(names[mid])
        self.available = bool(self.targets)
        if not self.available:
            self.remove()

    def _reset(self) -> None:
        self.fired: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []

    def _hook(self, module, inputs, output):
        if not self.active or not isinstance(output, torch.Tensor) or output.dim() < 2:
            return
        if self.targets and id(module) not in self.targets:
            return
        mean, var = channel_moments(output)
        self.fired.append((id(module), mean, var, output.numel() // output.shape[1]))

    def loss(self) -> Optional[torch.Tensor]:
        """Mean over the matched layers of RMS((mu - mu_p) / sd_p) + RMS((var - var_p) / var_p)."""
        terms = []
        for mid, (mean, var) in _moments(_accumulate({}, self.fired)).items():
            t_mean, t_var = self.targets[mid]
            t_mean, t_var = t_mean.to(mean.device), t_var.to(mean.device)
            terms.append(((mean - t_mean) / t_var.sqrt()).square().mean().add(1e-12).sqrt()
                         + ((var - t_var) / t_var).square().mean().add(1e-12).sqrt())
        return torch.stack(terms).mean() if terms else None


def _accumulate(sums: dict[int, list], fired) -> dict[int, list]:
    """Add recorded (layer, mean, var, count) moments into per-layer [sum, sum of squares, count]
    (a teacher run in chunks fires each layer once per chunk); returns ``sums``."""
    for mid, mean, var, n in fired:
        acc = sums.setdefault(mid, [0.0, 0.0, 0])
        acc[0] = acc[0] + mean * n
        acc[1] = acc[1] + (var + mean * mean) * n
        acc[2] += n
    return sums


def _moments(sums: dict[int, list]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer pooled mean and biased variance from :func:`_accumulate`'s sums, in its order."""
    out = {}
    for mid, (s1, s2, n) in sums.items():
        mean = s1 / n
        out[mid] = (mean, s2 / n - mean * mean)
    return out
