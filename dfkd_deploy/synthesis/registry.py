"""Name -> class registry of synthesis methods (``synthesis.method`` in a recipe).

A method registers itself with ``@register_synthesizer("name")``; :func:`build_synthesizer`
constructs it from the teacher, the recipe's synthesis options, the device and the resolved
priors. The built-in methods register on ``import dfkd_deploy.synthesis``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.recipe import synthesis_batch
from dfkd_deploy.synthesis.priors import Priors

if TYPE_CHECKING:
    from dfkd_deploy.synthesis.base import Synthesizer
    from dfkd_deploy.teachers.spec import Teacher

_REGISTRY: dict[str, type] = {}


def register_synthesizer(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"synthesis method {name!r} registered twice")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return deco


def synthesizer_names() -> list[str]:
    return sorted(_REGISTRY)


def build_synthesizer(name: str, teacher: "Teacher", options, device: torch.device | str,
                      priors: Priors) -> "Synthesizer":
    """The method ``name`` on ``teacher`` with ``options`` (a recipe's ``synthesis`` section)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UsageError(f"unknown synthesis method {name!r}; choose one of: {', '.join(synthesizer_names())}")
    if options.batch_size == "auto":   # not resolved against a student (a teacher-only synthesis, probes)
        options = options.model_copy(update={"batch_size": synthesis_batch(options)})
    return cls(teacher, options, device, priors)


def make_synthesizer(teacher: "Teacher", recipe, device) -> "Synthesizer":
    """The recipe's synthesis method on this teacher, its priors resolved once here: a teacher
    without BN statistics (``spec.bn_layers == 0``) gets no BN term, and the BN-free priors (TV, L2,
    DAFL entropy and activation) at their defaults wherever the recipe leaves ``synthesis.priors.*`` null."""
    s = recipe.synthesis
    return build_synthesizer(s.method, teacher, s, torch.device(device), Priors.for_teacher(teacher.spec, s.priors))
