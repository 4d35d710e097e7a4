"""Name -> constructor registry for student (and teacher) architectures.

Recipes name models by string; ``dfkd-deploy list students`` prints this registry.
Every constructor takes ``num_classes``, ``in_channels`` and ``input_size`` (H, W) keywords so
that a student follows whatever teacher it is distilled from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from dfkd_deploy.core.errors import UsageError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    description: str
    # Input normalisation the published weights for this architecture expect, if any.
    default_mean: tuple[float, ...] | None = None
    default_std: tuple[float, ...] | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str = "", mean=None, std=None):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0],
                                     tuple(mean) if mean else None, tuple(std) if std else None)
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def list_students() -> list[ModelEntry]:
    """Every registered architecture with its description (``dfkd-deploy list students``)."""
    return [_REGISTRY[n] for n in model_names()]


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown architecture {name!r}; choose one of: {', '.join(model_names())}") from None


def build_model(name: str, *, num_classes: int, in_channels: int = 3,
                input_size: tuple[int, int] = (32, 32)) -> nn.Module:
    return get_entry(name).build(num_classes=num_classes, in_channels=in_channels,
                                 input_size=tuple(input_size))
