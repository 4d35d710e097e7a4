"""What every synthesizer shares: the round's statistics, precision and memory-format choices,
and the interface the Distiller, the probes and checkpoints use.

A synthesizer offers ``synthesize(student, adversarial=, meta_update=, batch_size=)`` returning
pixel-space images ([0, 1], NCHW) and a :class:`RoundStats`; ``state_dict()`` /
``load_state_dict()``; ``reset_l0()`` (the generator re-initialisation of FastDFKD, a no-op
where there is no generator); and ``set_rank_sync()``, the hook through which the Distiller keeps
the ranks of a torch.distributed run in step. Every method is built from (Teacher, synthesis
options, device, resolved priors): see :mod:`dfkd_deploy.synthesis.registry`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from dfkd_deploy.core.precision import autocast_factory, resolve_precision
from dfkd_deploy.synthesis.losses import InversionLoss
from dfkd_deploy.synthesis.priors import Priors, adversarial_weight
from dfkd_deploy.teachers.spec import Teacher


@dataclass
class RoundStats:
    loss: float
    bn: float
    ce: float
    adv: float
    confidence: float   # teacher's mean probability of the sampled labels, best batch
    prior: float = 0.0  # weighted sum of the BN-free prior terms, best batch


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
    """Common set-up: device, precision, the shared :class:`InversionLoss`.

    A teacher without BN statistics (``spec.bn_layers == 0``) gets no BN term."""

    method = "base"   # set by @register_synthesizer

    def __init__(self, teacher: Teacher, opts, device: torch.device | str, priors: Priors):
        spec = teacher.spec
        use_bn_statistics = spec.bn_layers > 0
        self.teacher = teacher.module
        self.device = torch.device(device)
        self.normalizer = teacher.normalizer().to(self.device)
        self.opts = opts
        self.num_classes = spec.num_classes
        self.input_shape = tuple(spec.input_shape)
        self.precision = resolve_precision(opts.precision, self.device)
        self.autocast = autocast_factory(self.precision, self.device)
        self.channels_last = bool(opts.channels_last) and len(self.input_shape) == 3
        # torch.distributed hooks (see set_rank_sync); None in a single process
        self.meta_grad_sync: Callable[[Iterable[nn.Parameter]], None] | None = None
        self.module_sync: Callable[[nn.Module], None] | None = None
        self.loss = InversionLoss(self.teacher, self.normalizer, opts, priors.weights,
                                  use_bn_statistics=use_bn_statistics, autocast=self.autocast,
                                  channels_last=self.channels_last,
                                  explicit_activation=priors.explicit_activation,
                                  explicit_ranges=priors.explicit_ranges,
                                  input_shape=self.input_shape,
                                  explicit_proxy=priors.explicit_proxy)
        # the adversarial weight, lower for a teacher without BN statistics (synthesis.adv_bn_free)
        self.adv = self.loss.adv = adversarial_weight(opts, use_bn_statistics, self.loss.proxy is not None)
        self._setup()

    def set_rank_sync(self, meta_grad_sync: Callable[[Iterable[nn.Parameter]], None],
                      module_sync: Callable[[nn.Module], None]) -> None:
        """Under torch.distributed: ``meta_grad_sync(params)`` averages the meta-gradients across
        ranks before every meta step; ``module_sync(module)`` gives a re-initialised module rank
        0's weights everywhere (see :mod:`dfkd_deploy.core.distributed`)."""
        self.meta_grad_sync, self.module_sync = meta_grad_sync, module_sync

    def _setup(self) -> None:
        """What a method builds beyond the common set-up (a generator, a pixel parametrisation)."""

    @property
    def bn_stats(self):
        return self.loss.bn_stats

    def close(self) -> None:
        """Take this synthesizer's hooks off the teacher (a synthesizer made for a side job, e.g.
        probes or a calibration, must not leave them on the run's teacher)."""
        self.loss.remove()

    def __enter__(self) -> "Synthesizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset_l0(self) -> None:
        """Re-initialise the generator's input layers (FastDFKD); nothing to do without a generator.
        Under torch.distributed every rank then takes rank 0's fresh weights."""
        module = self._reinitialise_input_layers()
        if module is not None and self.module_sync is not None:
            self.module_sync(module)

    def _reinitialise_input_layers(self) -> nn.Module | None:
        """A method's own re-initialisation; returns the module it changed (None: nothing)."""
        return None

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
