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
        self.last: dict[tuple[int, int], tuple[nn.Module, int]] = {}

    def _hook(self, module, _args, out):
        k = self.calls.get(id(module), 0)
        self.calls[id(module)] = k + 1
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            self.last[(int(out.shape[-2]), int(out.shape[-1]))] = (module, k)


def _stage_ends(model: nn.Module, example: torch.Tensor) -> dict[tuple[int, int], tuple[nn.Module, int]]:
    """{(H, W): (module, call index)} of the last call that produced a 4-D output of each size;
    empty when the model refuses hooks (TorchScript)."""
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

    def __init__(self, points: dict[tuple[int, int], tuple[nn.Module, int]]):
        self.by_call: dict[int, dict[int, tuple[int, int]]] = {}   # id(module) -> {call index: resolution}
        for res, (m, k) in points.items():
            self.by_call.setdefault(id(m), {})[k] = res
        modules = list({id(m): m for m, _k in points.values()}.values())
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


class AttentionTransfer:
    """:meth:`loss` after a teacher and a student forward inside :meth:`capture`: the sum over shared resolutions of the mean squared difference of the two
    attention maps (ZSKT's form), unweighted. ``resolutions`` is empty when the nets share none
    (or refuse hooks): then :meth:`capture` records nothing and the loss is not defined."""

    def __init__(self, teacher: nn.Module, student: nn.Module, example: torch.Tensor):
        t, s = _stage_ends(teacher, example), _stage_ends(student, example)
        self.resolutions = sorted(set(t) & set(s), reverse=True)
        self._t = _Capture({r: t[r] for r in self.resolutions}) if self.resolutions else None
        self._s = _Capture({r: s[r] for r in self.resolutions}) if self.resolutions else None

    @property
    def available(self) -> bool:
        return bool(self.resolutions)

    @contextmanager
    def capture(self) -> Iterator[None]:
        with self._t.capture(), self._s.capture():
            yield

    def loss(self) -> torch.Tensor:
        t, s = self._t.out, self._s.out
        missing = [r for r in self.resolutions if r not in t or r not in s]
        if missing:
            raise RuntimeError(f"attention transfer: no feature map at {missing} in this forward pass")
        return sum((attention_map(s[r]) - attention_map(t[r].detach())).pow(2).mean() for r in self.resolutions)

    def remove(self) -> None:
        for c in (self._t, self._s):
            if c is not None:
                c.remove()
