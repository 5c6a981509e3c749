"""Progress bars for long work: count, items/s and ETA, on stderr.

One helper so every long job (synth, prepare, train, evaluate, ...) looks the same. On a terminal it is a rich
bar; when stderr is a file or a pipe (`nohup ... > log`, a batch scheduler's log) rich would draw nothing until
the job ends, so the same figures are written as plain lines instead: at the start, every `LOG_INTERVAL_S`
seconds, and at the end. A Jupyter notebook keeps rich's live widget.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

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


LOG_INTERVAL_S = 30.0  # seconds between the plain progress lines written when stderr is not a terminal


def _clock_text(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


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


class LineBar(Bar):
    """The bar as plain lines on ``stream``: ``description: done/total unit (pct), rate, elapsed, ETA``.

    ``completed``: work already done before this bar started (a resumed run); it counts towards done and
    the percentage, not towards the rate."""

    def __init__(self, total: float | None, description: str, unit: str, stream: TextIO,
                 interval_s: float = LOG_INTERVAL_S, completed: float = 0.0) -> None:
        super().__init__(None, None)
        self.total, self.description, self.unit, self.stream = total, description, unit, stream
        self.interval_s = interval_s
        self.done = self._first = float(completed)
        self.start = self._last = time.monotonic()
        self._write(self._count() if completed else
                    "started" if total is None else f"started, {total:,.0f} {unit}")

    def _write(self, text: str) -> None:
        self.stream.write(f"{self.description}: {text}\n")
        self.stream.flush()

    def _count(self) -> str:
        if self.total is None:
            return f"{self.done:,.0f} {self.unit}"
        return f"{self.done:,.0f}/{self.total:,.0f} {self.unit} ({100 * self.done / max(self.total, 1e-12):.0f} %)"

    def status(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = (self.done - self._first) / elapsed if elapsed > 0 else 0.0
        parts = [self._count(), f"{rate:,.1f} {self.unit}/s", f"elapsed {_clock_text(elapsed)}"]
        if self.total is not None and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_clock_text((self.total - self.done) / rate)}")
        return ", ".join(parts)

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._write(self.status())

    def set_description(self, text: str) -> None:
        self.description = text

    def close(self, failed: bool = False) -> None:
        self._write(("stopped at " if failed else "done, ") + self.status())


@contextmanager
def progress_bar(total: float | None, description: str, unit: str = "img", enabled: bool = True,
                 completed: float = 0) -> Iterator[Bar]:
    """A progress bar on stderr with count, rate and ETA; ``enabled=False`` makes it silent. ``completed``: the
    work done before it started (a resumed run), shown as done but left out of the rate. On a stderr that is
    not a terminal, plain lines instead (`LineBar`)."""
    if not enabled:
        yield Bar(None, None)
        return
    console = Console(file=sys.stderr)
    if not console.is_terminal and not console.is_jupyter:  # a notebook keeps rich's live widget
        line = LineBar(total, description, unit, sys.stderr, completed=completed)
        try:
            yield line
        except BaseException:
            line.close(failed=True)
            raise
        line.close()
        return
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
        task_id = progress.add_task(description, total=total, completed=completed)
        yield Bar(progress, task_id)
