"""Progress bars for long work: count, items/s and ETA, on stderr.

One helper so every long job (synth, prepare, train, evaluate, ...) looks the same.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``412.3 img/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


class Bar:
    """Handle returned by :func:`progress_bar`; ``advance(n)`` moves it forward."""

    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None and self._task_id is not None:
            self._progress.advance(self._task_id, n)

    def set_description(self, text: str) -> None:
        if self._progress is not None and self._task_id is not None:
            self._progress.update(self._task_id, description=text)


@contextmanager
def progress_bar(total: float | None, description: str, unit: str = "img", enabled: bool = True) -> Iterator[Bar]:
    """A progress bar on stderr with count, rate and ETA; ``enabled=False`` makes it silent."""
    if not enabled:
        yield Bar(None, None)
        return
    console = Console(file=sys.stderr)
    columns = [
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as progress:
        task_id = progress.add_task(description, total=total)
        yield Bar(progress, task_id)
