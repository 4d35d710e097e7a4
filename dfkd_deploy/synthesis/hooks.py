"""Hooks on some of a teacher's modules that record only while a synthesis step asks them to
(and, for attention transfer in KD, on a student's: ``dfkd_deploy.distill.attention``).

The prior terms that look inside the teacher (its penultimate features, its quantized
activations' ranges, stand-in statistics of its first convolutions) share this: hook a set of
modules once, record inside :meth:`TeacherHooks.capture`, remove the hooks when synthesis is
done. A module that refuses hooks (TorchScript) makes the whole term unavailable.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class TeacherHooks:
    """Forward pre-hooks (``_hook(module, args)``) on ``modules``, or with ``OUTPUTS`` set, forward
    hooks (``_hook(module, args, output)``). ``available`` is False when none could be hooked."""

    OUTPUTS = False

    def __init__(self, modules):
        self.active = False
        self.handles = []
        self._reset()
        for m in modules:
            register = m.register_forward_hook if self.OUTPUTS else m.register_forward_pre_hook
            try:
                self.handles.append(register(self._hook))
            except Exception:  # noqa: BLE001 - script modules refuse hooks: the term is unavailable
                self.remove()
                break
        self.available = bool(self.handles)

    def _reset(self) -> None:
        raise NotImplementedError

    def _hook(self, module, *args):
        raise NotImplementedError

    @contextmanager
    def capture(self) -> Iterator[None]:
        self._reset()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
