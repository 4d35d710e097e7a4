"""Progress display for long steps, everywhere a run goes.

- On a terminal (stderr is a TTY and ``CI`` is not ``true``): a rich bar with elapsed time, ETA
  and the step's key figures.
- Elsewhere (a log file, a pipe, CI): plain lines, ``label: done/total  elapsed  eta  figures``;
  one per step for per-epoch tasks (``every_step=True``), otherwise at most one every
  :data:`PLAIN_INTERVAL_S` seconds and one at the end.
- ``enabled=False`` (``--quiet``) drops the bars and those lines only. Warnings (:func:`warn`),
  the stages' own one-line messages and the final summary are still printed: a user who asked
  for quiet asked not to watch progress, not to miss what went wrong.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
PLAIN_INTERVAL_S = 10.0


def interactive() -> bool:
    """Bars only where a person watches a terminal; CI logs get plain lines."""
    return console.is_terminal and os.environ.get("CI", "").strip().lower() not in ("true", "1")


def warn(message: str) -> None:
    """A one-line warning on stderr, whatever --quiet says."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Task:
    def __init__(self, progress: Progress | None, task_id, total: int, label: str, silent: bool = False,
                 every_step: bool = False):
        self.progress, self.task_id, self.total, self.label = progress, task_id, total, label
        self.silent, self.every_step = silent, every_step
        self.done = 0
        self.start = time.time()
        self._last_line = 0.0
        self._resumed_at = 0   # steps already done when this task started (a resumed run)

    def resume_at(self, done: int) -> None:
        """Steps an earlier (resumed) run did: counted, but not timed for the ETA."""
        self.done = self._resumed_at = done
        if self.progress is not None:
            self.progress.update(self.task_id, completed=done)

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if self.progress is not None:
            self.progress.update(self.task_id, advance=n, info=info)
            return
        if self.silent:
            return
        now = time.time()
        if self.every_step or now - self._last_line >= PLAIN_INTERVAL_S or self.done >= self.total:
            self._last_line = now
            print(self.line(now, info), file=sys.stderr, flush=True)

    def line(self, now: float, info: str = "") -> str:
        elapsed = now - self.start
        timed = self.done - self._resumed_at
        eta = elapsed / timed * (self.total - self.done) if timed > 0 else None
        eta_text = _duration(eta) if eta is not None else "?"
        return (f"{self.label}: {self.done}/{self.total}  elapsed {_duration(elapsed)}  eta {eta_text}"
                + (f"  {info}" if info else ""))


@contextmanager
def task(label: str, total: int, enabled: bool = True, *, every_step: bool = False) -> Iterator[_Task]:
    """``every_step``: on plain output, one line per :meth:`_Task.advance` (per-epoch tasks)."""
    if not enabled:
        yield _Task(None, None, total, label, silent=True)
        return
    if not interactive():
        yield _Task(None, None, total, label, every_step=every_step)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False) as progress:
        tid = progress.add_task(label, total=total, info="")
        yield _Task(progress, tid, total, label)
