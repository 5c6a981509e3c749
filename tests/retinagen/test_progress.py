"""Progress on a stderr that is not a terminal (a log file, a batch job's output): plain lines at the start,
every LOG_INTERVAL_S seconds and at the end, with count, percentage, rate, elapsed time and ETA."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import retinagen.progress as progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> tuple[io.StringIO, FakeClock]:
    """A stream for stderr (a file, not a terminal: each test redirects to it in its body, as pytest's capture
    sets sys.stderr again when the test's call starts) and a clock the test moves."""
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    return io.StringIO(), clock


def test_a_log_gets_a_line_at_the_start_every_interval_and_at_the_end(log: tuple[io.StringIO, FakeClock]) -> None:
    stream, clock = log
    with contextlib.redirect_stderr(stream), progress.progress_bar(100, "prepare eyepacs 64px") as bar:
        for _ in range(10):
            clock.t += 1.0
            bar.advance(5)  # 50 images in 10 s: no line yet (interval 30 s)
        clock.t += progress.LOG_INTERVAL_S - 10.0
        bar.advance(10)  # 60 images after 30 s
        clock.t += 20.0
        bar.advance(40)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "prepare eyepacs 64px: started, 100 img",
        "prepare eyepacs 64px: 60/100 img (60 %), 2.0 img/s, elapsed 0:00:30, ETA 0:00:20",
        "prepare eyepacs 64px: done, 100/100 img (100 %), 2.0 img/s, elapsed 0:00:50",
    ]


def test_a_resumed_run_counts_its_earlier_work_as_done_but_not_in_the_rate(log: tuple[io.StringIO, FakeClock]) -> None:
    stream, clock = log
    with contextlib.redirect_stderr(stream), progress.progress_bar(80_000, "train", completed=48_000) as bar:
        clock.t += 3600.0
        bar.advance(16_000)
        bar.set_description("G 1.20 D 0.80 Linfo 4.1/5.9")
        clock.t += 60.0
        bar.advance(160)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "train: 48,000/80,000 img (60 %)"
    assert lines[1] == "train: 64,000/80,000 img (80 %), 4.4 img/s, elapsed 1:00:00, ETA 1:00:00"
    assert lines[2] == "G 1.20 D 0.80 Linfo 4.1/5.9: 64,160/80,000 img (80 %), 4.4 img/s, elapsed 1:01:00, ETA 0:59:48"
    assert lines[3].startswith("G 1.20 D 0.80 Linfo 4.1/5.9: done, 64,160/80,000 img (80 %)")


def test_an_error_ends_the_log_with_where_it_stopped(log: tuple[io.StringIO, FakeClock]) -> None:
    stream, clock = log
    with (contextlib.redirect_stderr(stream), pytest.raises(RuntimeError, match="disk full"),
          progress.progress_bar(None, "generate") as bar):
        clock.t += 4.0
        bar.advance(8)
        raise RuntimeError("disk full")
    assert stream.getvalue().splitlines() == [
        "generate: started",
        "generate: stopped at 8 img, 2.0 img/s, elapsed 0:00:04",
    ]


def test_disabled_writes_nothing(log: tuple[io.StringIO, FakeClock]) -> None:
    stream, _ = log
    with contextlib.redirect_stderr(stream), progress.progress_bar(10, "synth 64px", enabled=False) as bar:
        bar.advance(10)
    assert stream.getvalue() == ""


def test_a_command_whose_stderr_is_a_file_logs_its_progress(tmp_path: Path) -> None:
    """`retinagen synth ... 2> log`: the log says what ran and how far it got (rich alone would show nothing
    there until the end, and then only its last frame)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log.txt", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "retinagen.cli", "synth", "--out", str(tmp_path / "s"),
                               "--n", "6", "--resolution", "32"], stderr=err, stdout=subprocess.DEVNULL,
                              env=env, timeout=120)
    assert proc.returncode == 0
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert "synth 32px: started, 6 img" in lines
    assert any(line.startswith("synth 32px: done, 6/6 img (100 %), ") for line in lines), lines
    assert not any("\x1b[" in line for line in lines)  # no terminal escape codes in a log


def test_a_notebook_keeps_the_live_bar(log: tuple[io.StringIO, FakeClock], monkeypatch: pytest.MonkeyPatch) -> None:
    """Jupyter's output is not a terminal either, but rich draws a live widget there: no plain lines."""
    import rich.console

    stream, _ = log
    made = []

    class FakeProgress:  # stands in for rich's live display, which needs a notebook
        def __init__(self, *columns: object, **kwargs: object) -> None:
            made.append(self)

        def __enter__(self) -> FakeProgress:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def add_task(self, description: str, total: float | None, completed: float) -> int:
            return 0

        def advance(self, task_id: int, n: float) -> None:
            pass

    monkeypatch.setattr(rich.console, "_is_jupyter", lambda: True)
    monkeypatch.setattr(progress, "Progress", FakeProgress)
    with contextlib.redirect_stderr(stream), progress.progress_bar(10, "synth 64px") as bar:
        assert not isinstance(bar, progress.LineBar)
        bar.advance(10)
    assert len(made) == 1 and stream.getvalue() == ""
