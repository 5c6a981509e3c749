"""benchmarks/d_grade_probe.py: linear probes find the grade where features carry it, and only there."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import d_grade_probe  # noqa: E402


def _labels(n: int = 800) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.choice(5, size=n, p=[0.7, 0.1, 0.1, 0.05, 0.05])


def test_a_feature_that_encodes_the_grade_is_found() -> None:
    y = _labels()
    rng = np.random.default_rng(1)
    feats = np.concatenate([np.eye(5)[y] * 3.0, rng.normal(size=(len(y), 20))], axis=1) + rng.normal(0, 0.5, (len(y), 25))
    r = d_grade_probe.probe(feats, y, 5)
    assert r["balanced_accuracy"] > 0.9 and r["ce"] < 0.5 * r["prior_ce"]


def test_features_without_the_grade_score_no_better_than_the_prior() -> None:
    y = _labels()
    r = d_grade_probe.probe(np.random.default_rng(2).normal(size=(len(y), 64)), y, 5)
    assert r["ce"] >= 0.97 * r["prior_ce"] and r["balanced_accuracy"] < 0.35


def test_report_on_a_trained_run(smoke_run_master: Path) -> None:
    ck = sorted((smoke_run_master / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    text = d_grade_probe.report(ck, None, 64, judge=False)
    rows = [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[0] == "features" and "h" in rows and "pixels" in rows and "judge encoder" not in rows
    assert any(r.startswith("block") for r in rows)


def test_a_d_trained_alone_is_probed_beside_the_runs(smoke_run_master: Path) -> None:
    ck = sorted((smoke_run_master / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    text = d_grade_probe.report(ck, None, 64, judge=False, alone=3)
    assert "| h of D trained alone (3 steps) | " in text
    assert "The classifier of D trained alone, on the held-out quarter: CE " in text


def test_missing_data_is_a_clear_error(smoke_run_master: Path, tmp_path: Path) -> None:
    from retinagen.errors import RetinagenError

    ck = sorted((smoke_run_master / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    with pytest.raises(RetinagenError, match="missing.zip: dataset file does not exist"):
        d_grade_probe.report(ck, tmp_path / "missing.zip", 64, judge=False)
