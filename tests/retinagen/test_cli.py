"""The command line: its documented names and flags (README), exit codes 0 / 2 / 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

from retinagen.cli import main

COMMANDS = ["synth", "prepare", "train", "generate", "traverse", "evaluate", "discover", "compare", "rebalance",
            "downstream", "anomaly", "dashboard"]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "--dataset", "bogus"]) == 2
    assert main(["no-such-command"]) == 2


def test_bad_input_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code = main(["synth", "--out", str(tmp_path / "s"), "--n", "4", "--grades", "0.5,x"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--grades" in err and "Traceback" not in err


def test_console_script_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "retinagen.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "synth" in proc.stdout


def test_the_cli_choices_are_the_registries_names() -> None:
    """Every choice flag offers what its registry holds, in the registry's order (a new entry is a new choice)."""
    from clinical.anomaly import SCORERS
    from clinical.grader import PRESETS as GRADER_PRESETS
    from retinagen.cli.app import AnomalyScorerName, PrepareDataset, Preset, Split, TrainDataset
    from retinagen.config import DATASETS, PRESETS
    from retinagen.data.sources import SOURCES, SPLIT_NAMES

    def names(choice: type) -> list[str]:
        return [m.value for m in choice]

    assert names(PrepareDataset) == list(SOURCES) and names(TrainDataset) == list(DATASETS)
    assert names(Preset) == list(PRESETS) == list(GRADER_PRESETS)  # --preset of train and of downstream
    assert names(Split) == list(SPLIT_NAMES)
    assert sorted(names(AnomalyScorerName)) == sorted(SCORERS)  # listed by hand: SCORERS imports torch
