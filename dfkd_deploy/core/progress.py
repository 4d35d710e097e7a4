"""Progress display for long steps: a rich bar with ETA on a terminal, periodic lines elsewhere."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class _Task:
    def __init__(self, progress: Progress | None, task_id, total: int, label: str, silent: bool = False):
        self.progress, self.task_id, self.total, self.label = progress, task_id, total, label
        self.silent = silent
        self.done = 0
        self.start = time.time()
        self._last_line = 0.0

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if self.progress is not None:
            self.progress.update(self.task_id, advance=n, info=info)
            return
        if self.silent:
            return
        now = time.time()
        if now - self._last_line >= 10 or self.done >= self.total:  # plain logs: a line every 10 s
            self._last_line = now
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0
            print(f"{self.label}: {self.done}/{self.total}  elapsed {elapsed:.0f}s  eta {eta:.0f}s  {info}",
                  file=sys.stderr, flush=True)


@contextmanager
def task(label: str, total: int, enabled: bool = True) -> Iterator[_Task]:
    if not enabled:
        yield _Task(None, None, total, label, silent=True)
        return
    if not console.is_terminal:
        yield _Task(None, None, total, label)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False) as progress:
        tid = progress.add_task(label, total=total, info="")
        yield _Task(progress, tid, total, label)
