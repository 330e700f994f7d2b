"""Progress for long commands: a rich bar on a terminal, plain log lines elsewhere (CI, ``| tee``, log files).

Rich hides its live display when the output is not a terminal, so a 12-minute bench used to print nothing until the
end. :func:`progress` returns a rich ``Progress`` on a terminal and a :class:`LineProgress` with the same calls
otherwise: one line per new step description, and a line at least every ``every`` seconds during a long step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@dataclass
class _Task:
    description: str
    total: float | None = None
    completed: float = 0
    fields: dict[str, Any] = field(default_factory=dict)


class LineProgress:
    """The subset of ``rich.progress.Progress`` vitprune uses, printing plain lines."""

    def __init__(self, console: Console, every: float = 30.0) -> None:
        self.console = console
        self.every = every
        self.tasks: list[_Task] = []
        self._start = time.perf_counter()
        self._last = 0.0

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self.tasks.append(_Task(description, total, 0, fields))
        self._print(self.tasks[-1])
        return len(self.tasks) - 1

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, description: str | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance:
            task.completed += advance
        task.fields.update(fields)
        new_step = description is not None and description != task.description
        if description is not None:
            task.description = description
        if new_step or time.perf_counter() - self._last >= self.every or task.completed == task.total:
            self._print(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _print(self, task: _Task) -> None:
        self._last = time.perf_counter()
        elapsed = int(self._last - self._start)
        count = f" {task.completed:g}/{task.total:g}" if task.total else ""
        info = f" {task.fields['info']}" if task.fields.get("info") else ""
        self.console.print(f"[{elapsed // 60:d}:{elapsed % 60:02d}] {task.description}{count}{info}",
                           markup=False, highlight=False)


def progress(console: Console | None = None, *, info: bool = False, enabled: bool = True) -> Progress | LineProgress:
    """A progress display for ``console`` (default: stdout): rich on a terminal, plain lines otherwise.
    ``info=True`` adds a column for the task's ``info`` field (e.g. the current loss); ``enabled=False`` shows nothing
    (e.g. on the non-zero ranks of a torchrun job)."""
    console = console or Console()
    if not enabled:
        return LineProgress(Console(quiet=True))
    if not console.is_terminal:
        return LineProgress(console)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, TimeElapsedColumn(), console=console, transient=True)
