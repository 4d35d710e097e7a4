"""Make ``import torchvision`` work when its wheel does not match the installed torch build.

PyPI's torchvision wheel is a CUDA build. With a CPU-only torch, importing it fails while
registering fake kernels for ``torchvision::nms`` (the compiled ops did not load). The model
definitions we need do not use those ops, so on that specific failure we register the two
registration modules as empty and import again. This is the only place in the project that
knows about it; everything imports torchvision through :func:`import_torchvision`.
"""
from __future__ import annotations

import sys
import types

_STUBBED = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_torchvision():
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:  # operator torchvision::nms does not exist
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for name in _STUBBED:
            sys.modules[name] = types.ModuleType(name)
        import torchvision  # noqa: F401
    return sys.modules["torchvision"]


def import_onnx2torch():
    """onnx2torch imports torchvision at import time, so it must come after the fix above."""
    import_torchvision()
    import onnx2torch

    return onnx2torch
