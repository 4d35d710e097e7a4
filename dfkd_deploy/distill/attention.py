"""Attention transfer in KD: the student's spatial attention maps matched to the teacher's at the
end of every resolution both nets share.

Zagoruyko & Komodakis (ICLR 2017) define a layer's attention map as the channel mean of its
squared activations, flattened and L2-normalised; Zero-shot Knowledge Transfer (Micaelli & Storkey,
NeurIPS 2019) adds the squared difference of those maps, at the end of each block group, to the
KD loss of a student trained on synthesized images. A synthetic image carries little of the real
data; the maps give the student what the teacher computes *inside* it, not only its ten logits.

Where the maps are taken is found by probing, so nothing depends on module names (a zoo net and
an onnx2torch graph are handled alike): one forward pass with hooks on every module records, for
each spatial size H x W (H * W > 1) of a 4-D output, the last call that produced it. That is the
end of the stage at that resolution (a container's hook fires after its children's, a
downsampling shortcut's output already has the next size). Resolutions found in both nets are
matched; a pair of nets with none in common (an MLP, a digits CNN against a differently strided
student) has no attention term. A module called several times in one forward (a shared ReLU) is
keyed by its call count.

The same points also give *feature matching* (``distillation.features``): where the two nets'
outputs at a resolution have the same channel count too (a ``depth`` student and its teacher, whose
stages keep the teacher's widths), the student's feature maps are matched to the teacher's
themselves, not only their attention maps: the squared error relative to the teacher's mean
square (scale-free), summed over those resolutions. This is FitNets' hint loss (Romero et al.,
ICLR 2015) without the regressor, which equal widths make unnecessary, at every stage end; a
student built from the teacher's own blocks starts with its features aligned channel by channel.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_deploy.synthesis.hooks import TeacherHooks


class _Probe(TeacherHooks):
    """Forward hooks on every submodule: ``last[(H, W)]`` = (module, call index) of the last call
    that produced a 4-D output of that size."""

    OUTPUTS = True

    def _reset(self) -> None:
        self.calls: dict[int, int] = {}
        self.last: dict[tuple[int, int], tuple[nn.Module, int, int]] = {}

    def _hook(self, module, _args, out):
        k = self.calls.get(id(module), 0)
        self.calls[id(module)] = k + 1
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            self.last[(int(out.shape[-2]), int(out.shape[-1]))] = (module, k, int(out.shape[1]))


def _stage_ends(model: nn.Module, example: torch.Tensor) -> dict[tuple[int, int], tuple[nn.Module, int, int]]:
    """{(H, W): (module, call index, channels)} of the last call that produced a 4-D output of each
    size; empty when the model refuses hooks (TorchScript)."""
    probe = _Probe([m for m in model.modules() if m is not model])
    if not probe.available:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), probe.capture():
            model(example)
    finally:
        model.train(was_training)
        probe.remove()
    return probe.last


class _Capture(TeacherHooks):
    """Forward hooks that keep the chosen calls' outputs (``out``, by resolution) while
    :meth:`capture` is open."""

    OUTPUTS = True

    def __init__(self, points: dict[tuple[int, int], tuple[nn.Module, int, int]]):
        self.by_call: dict[int, dict[int, tuple[int, int]]] = {}   # id(module) -> {call index: resolution}
        for res, (m, k, _c) in points.items():
            self.by_call.setdefault(id(m), {})[k] = res
        modules = list({id(m): m for m, _k, _c in points.values()}.values())
        super().__init__(modules)

    def _reset(self) -> None:
        self.calls: dict[int, int] = {}
        self.out: dict[tuple[int, int], torch.Tensor] = {}

    def _hook(self, module, _args, out):
        if not self.active:
            return
        k = self.calls.get(id(module), 0)
        self.calls[id(module)] = k + 1
        res = self.by_call[id(module)].get(k)
        if res is not None:
            self.out[res] = out


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Channel mean of the squared activations, flattened and L2-normalised (B x H*W)."""
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


def feature_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the student's feature map against the teacher's, relative to the
    teacher's mean square (so layers of any scale weigh alike; 1.0 for an all-zero student)."""
    t = t.detach().float()
    return (s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-8)


class AttentionTransfer:
    """:meth:`loss` after a teacher and a student forward inside :meth:`capture`: the sum over shared resolutions of the mean squared difference of the two
    attention maps (ZSKT's form), unweighted; :meth:`feature_loss` the sum of
    :func:`feature_distance` over ``feature_resolutions``, those of the shared resolutions where
    both nets also have the same channel count. ``resolutions`` is empty when the nets share none
    (or refuse hooks): then :meth:`capture` records nothing and the losses are not defined."""

    def __init__(self, teacher: nn.Module, student: nn.Module, example: torch.Tensor):
        t, s = _stage_ends(teacher, example), _stage_ends(student, example)
        self.resolutions = sorted(set(t) & set(s), reverse=True)
        self.feature_resolutions = [r for r in self.resolutions if t[r][2] == s[r][2]]
        self._t = _Capture({r: t[r] for r in self.resolutions}) if self.resolutions else None
        self._s = _Capture({r: s[r] for r in self.resolutions}) if self.resolutions else None

    @property
    def available(self) -> bool:
        return bool(self.resolutions)

    @contextmanager
    def capture(self) -> Iterator[None]:
        with self._t.capture(), self._s.capture():
            yield

    def _maps(self, resolutions: list[tuple[int, int]]) -> tuple[dict, dict]:
        t, s = self._t.out, self._s.out
        missing = [r for r in resolutions if r not in t or r not in s]
        if missing:
            raise RuntimeError(f"attention transfer: no feature map at {missing} in this forward pass")
        return t, s

    def loss(self) -> torch.Tensor:
        t, s = self._maps(self.resolutions)
        return sum((attention_map(s[r]) - attention_map(t[r].detach())).pow(2).mean() for r in self.resolutions)

    def feature_loss(self) -> torch.Tensor:
        t, s = self._maps(self.feature_resolutions)
        return sum(feature_distance(s[r], t[r]) for r in self.feature_resolutions)

    def terms(self, attention: float, features: float) -> dict[str, tuple[float, torch.Tensor]]:
        """{name: (weight, unweighted term)} of the terms these weights turn on, after a forward
        inside :meth:`capture`: ``attention`` when its weight is > 0, ``features`` when its weight
        is > 0 and some stage has the same shape in both nets. What the trainer adds to its KD
        loss (and logs) and what the budget calibration times."""
        out = {}
        if attention > 0:
            out["attention"] = (attention, self.loss())
        if features > 0 and self.feature_resolutions:
            out["features"] = (features, self.feature_loss())
        return out

    def remove(self) -> None:
        for c in (self._t, self._s):
            if c is not None:
                c.remove()
