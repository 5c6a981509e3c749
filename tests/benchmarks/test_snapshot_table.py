"""benchmarks/snapshot_table.py: the per-snapshot tables of docs/ablations.md, from metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import snapshot_table  # noqa: E402


def _run(tmp_path: Path, records: list[dict], junk: str = "") -> Path:
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in records]
    (run / "metrics.jsonl").write_text("\n".join(lines[:1] + ([junk] if junk else []) + lines[1:]) + "\n")
    return run


def test_one_row_per_scored_snapshot_with_adas_p(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scored = {"quality/fd_fundus": 30.25, "quality/precision": 0.5, "quality/recall": 0.25,
              "quality/referable_agreement": 0.5, "quality/L_info_discrete": 1.8, "quality/H_discrete": 5.95,
              "quality/train_seconds": 600.0, **{f"quality/fidelity/{g}": g / 10 for g in range(5)}}
    run = _run(tmp_path, [{"kimg": 1.0, "augment/p": 0.1}, {"kimg": 2.0, "augment/p": 0.2},
                          {"kimg": 2.0, **scored}, {"kimg": 3.0, "augment/p": 0.3},
                          {"kimg": 4.0, **scored, "quality/recall": float("nan")}], junk="{not json")
    text = snapshot_table.table(run, "demo")
    assert text.splitlines()[0] == "**demo** (10 min of training)"
    body = [ln for ln in text.splitlines() if ln.startswith("| 2 ") or ln.startswith("| 4 ")]
    assert body == ["| 2 | 30.2 | 0.500 | 0.250 | 0.00 / 0.10 / 0.20 / 0.30 / 0.40 | 0.50 | 1.80 / 5.95 | 10.0 | 0.20 |",
                    "| 4 | 30.2 | 0.500 | – | 0.00 / 0.10 / 0.20 / 0.30 / 0.40 | 0.50 | 1.80 / 5.95 | 10.0 | 0.30 |"]
    assert "not JSON" in capsys.readouterr().err


def test_group_fidelity_gets_its_column_when_logged(tmp_path: Path) -> None:
    base = {"quality/fd_fundus": 12.0, "quality/precision": 0.5, "quality/recall": 0.25,
            "quality/fidelity/3": 0.1, "quality/fidelity/4": 0.0}
    groups = {"quality/group_fidelity/0-1": 0.9, "quality/group_fidelity/2": 0.5, "quality/group_fidelity/3-4": 0.25}
    old = snapshot_table.table(_run(tmp_path, [{"kimg": 2.0, **base}]), "old")
    assert "groups" not in old  # runs logged before the column existed keep their table
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"kimg": 2.0, **base, **groups}) + "\n")
    new = snapshot_table.table(tmp_path / "run", "new").splitlines()
    assert new[2].endswith("| groups 0-1 / 2 / 3-4 |")
    assert new[4].endswith("| 0.90 / 0.50 / 0.25 |")


def test_a_folder_without_metrics_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="metrics.jsonl"):
        snapshot_table.main([str(tmp_path)])


def test_the_z_share_column_appears_where_it_was_logged(tmp_path: Path) -> None:
    scored = {"quality/fd_fundus": 30.0, "quality/L_info_discrete": 1.8, "quality/H_discrete": 5.95}
    run = _run(tmp_path, [{"kimg": 2.0, **scored}, {"kimg": 4.0, **scored, "quality/z_share": 0.4321}])
    lines = snapshot_table.table(run).splitlines()
    assert lines[2].endswith("| L_info / H(C) | z share |")
    assert lines[4].endswith("| 1.80 / 5.95 | – |") and lines[5].endswith("| 1.80 / 5.95 | 0.43 |")


def test_a_grown_run_shows_its_stage_at_each_snapshot(tmp_path: Path) -> None:
    scored = {"quality/fd_fundus": 30.0, "quality/L_info_discrete": 1.8, "quality/H_discrete": 5.95}
    run = _run(tmp_path, [{"kimg": 1.9, "grow/resolution": 8.0, "grow/alpha": 1.0}, {"kimg": 2.0, **scored},
                          {"kimg": 4.9, "grow/resolution": 16.0, "grow/alpha": 0.45}, {"kimg": 5.0, **scored},
                          {"kimg": 12.0, "grow/resolution": 32.0, "grow/alpha": 1.0}, {"kimg": 12.0, **scored}])
    lines = snapshot_table.table(run).splitlines()
    assert lines[2].endswith("| L_info / H(C) | stage px |")
    assert [ln.rsplit("|", 2)[1].strip() for ln in lines[4:7]] == ["8", "16 (0.45)", "32"]
