"""benchmarks/second_judge.py: a DenseNet grader trained on the judges' set, beside the fixed judges."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_JUDGES

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import second_judge  # noqa: E402


def test_groups_sum_p_over_a_groups_grades() -> None:
    asked = np.array([0, 1, 2, 3, 4, 4])
    proba = np.zeros((6, 5))
    proba[0, 1] = proba[1, 0] = 1.0  # 0 and 1 swapped: both in group 0-1
    proba[2, 2] = 0.4
    proba[2, 0] = 0.6  # grade 2 asked, judged 0
    proba[3, 3] = proba[3, 4] = 0.3  # neither grade alone, the group 3-4 at 0.6
    proba[3, 0] = 0.4
    proba[4, 2] = proba[5, 4] = 1.0
    assert second_judge.groups(proba, asked) == pytest.approx([1.0, 0.0, 2 / 3])


def test_table_for_real_and_a_trained_run(smoke_run_master: Path, tiny_judges_dir: Path, tmp_path: Path) -> None:
    from retinagen.metrics.judges import JudgeSpec

    spec = JudgeSpec(**TINY_JUDGES)
    judges_dir = tmp_path / "judges"
    shutil.copytree(tiny_judges_dir, judges_dir / f"judges-{spec.key()}")
    ck = sorted((smoke_run_master / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    text = second_judge.report([ck], spec, judges_dir, n=20, steps=5, held_out=40)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["real held-out", f"{smoke_run_master.name}-{ck.stem.split('-')[-1]}"]
    for r in rows:
        values = [float(v) for c in r.split("|")[2:5] for v in c.strip().split(" / ")]
        assert all(0.0 <= v <= 1.0 for v in values if v == v)
    assert len(list(judges_dir.glob("second-*/grader.safetensors"))) == 1
    # Built once: a second report loads the cached grader (a rebuild would render and train again).
    built = next(judges_dir.glob("second-*/grader.safetensors")).stat().st_mtime_ns
    second_judge.report([], spec, judges_dir, n=20, steps=5, held_out=40)
    assert next(judges_dir.glob("second-*/grader.safetensors")).stat().st_mtime_ns == built
