"""Training-time quality scores: each snapshot scored, logged as quality/*, the best one kept outside the rotation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from retinagen.config import load_run_config, parse_overrides
from retinagen.errors import ConfigError, RetinagenError
from retinagen.training.checkpoint import list_checkpoints, load_checkpoint
from retinagen.training.loop import train


def _cfg(zip_path: Path, *extra: str, kimg: float = 0.064) -> Any:
    # 64 images, batch 4, a snapshot every 16 images: 4 snapshots in 64 images.
    sets = [f"data.path={zip_path}", f"train.kimg={kimg}", "train.keep_checkpoints=1", *extra]
    return load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(sets))


class FakeScorer:
    """fd_fundus from a fixed list, one per snapshot; records what it was called with."""

    def __init__(self, fds: list[float], sleep: float = 0.0) -> None:
        self.fds = list(fds)
        self.calls: list[tuple[Path, Path]] = []
        self.sleep = sleep

    def __call__(self, ck: Path, data_zip: Path) -> dict[str, Any]:
        self.calls.append((ck, data_zip))
        time.sleep(self.sleep)
        fd = self.fds[len(self.calls) - 1]
        return {"judge": "abc123", "fd_fundus": fd, "precision": 0.5, "fidelity": {0: 0.25, 2: 1.0}, "sha": "x"}


def _quality_lines(run: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "quality/fd_fundus" in r]


def test_every_snapshot_is_scored_and_the_best_is_kept(tmp_path: Path, synth_zip_16: Path) -> None:
    run = tmp_path / "run"
    scorer = FakeScorer([5.0, 3.0, 4.0, 3.5], sleep=0.5)
    summary = train(_cfg(synth_zip_16), run, progress=False, snapshot_score=scorer)
    assert [c.name for c, _ in scorer.calls] == ["ckpt-000004.json", "ckpt-000008.json", "ckpt-000012.json",
                                                "ckpt-000016.json"]
    assert all(z == synth_zip_16 for _, z in scorer.calls)
    rows = _quality_lines(run)
    assert [r["quality/fd_fundus"] for r in rows] == [5.0, 3.0, 4.0, 3.5]
    assert [r["step"] for r in rows] == [4, 8, 12, 16] and [r["quality/best"] for r in rows] == [1, 1, 0, 0]
    assert rows[0]["quality/judge"] == "abc123" and rows[0]["quality/fidelity/2"] == 1.0
    # Only the newest ordinary snapshot stays (keep_checkpoints=1); the best one (step 8) is kept beside it.
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt-000016.json"]
    best = sorted((run / "checkpoints").glob("best-*"))
    assert [p.name for p in best] == ["best-000008.json", "best-000008.safetensors"]
    ck = load_checkpoint(best[0])  # whole: its sha256 matches, and it records its score
    assert ck.meta["step"] == 8 and ck.meta["quality"]["fd_fundus"] == 3.0
    assert ck.meta["tensors_file"] == "best-000008.safetensors"
    # Scoring time (4 x 0.5 s) is not training time.
    last = load_checkpoint(run / "checkpoints" / "ckpt-000016.json").meta
    assert last["train_seconds"] < summary.elapsed_s - 1.5


def test_a_resumed_run_keeps_its_best(tmp_path: Path, synth_zip_16: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(synth_zip_16), run, progress=False, max_steps=8, snapshot_score=FakeScorer([2.0, 3.0]))
    assert sorted(p.name for p in (run / "checkpoints").glob("best-*.json")) == ["best-000004.json"]
    train(_cfg(synth_zip_16), run, resume=True, progress=False, snapshot_score=FakeScorer([2.5, 1.0]))
    rows = _quality_lines(run)
    assert [r["quality/fd_fundus"] for r in rows] == [2.0, 3.0, 2.5, 1.0]
    assert [r["quality/best"] for r in rows] == [1, 0, 0, 1]  # 2.5 does not beat the first session's 2.0
    assert sorted(p.name for p in (run / "checkpoints").glob("best-*.json")) == ["best-000016.json"]


def test_a_failing_scorer_does_not_stop_training(tmp_path: Path, synth_zip_16: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def broken(ck: Path, data_zip: Path) -> dict[str, Any]:
        raise RetinagenError("judges.json: not readable judges")

    summary = train(_cfg(synth_zip_16), tmp_path / "run", progress=False, snapshot_score=broken)
    assert summary.images_seen == 64 and not summary.stopped_early
    assert "not scored: judges.json: not readable judges" in capsys.readouterr().err
    assert _quality_lines(tmp_path / "run") == []


def test_quality_n_below_the_feature_width_is_refused(synth_zip_16: Path) -> None:
    with pytest.raises(ConfigError, match="quality_n"):
        _cfg(synth_zip_16, "train.quality_n=50")


def test_the_real_scorer_on_a_smoke_run(tmp_path: Path, synth_zip_16: Path, tiny_judges_dir: Path) -> None:
    from retinagen.metrics.judges import load_judges
    from retinagen.metrics.quality import SnapshotScorer

    judges = load_judges(tiny_judges_dir)
    cfg = _cfg(synth_zip_16, "train.quality_n=128", kimg=0.032)
    run = tmp_path / "run"
    train(cfg, run, progress=False, snapshot_score=SnapshotScorer(cfg, judges=judges))
    rows = _quality_lines(run)
    assert len(rows) == 2 and all(r["quality/judge"] == judges.judge_id for r in rows)
    assert all(r["quality/fd_fundus"] > 0 and 0 <= r["quality/recall"] <= 1 for r in rows)
    assert all("quality/L_info_discrete" in r and "quality/referable_agreement" in r for r in rows)
    assert all("quality/group_fidelity/0-1" in r for r in rows)
    assert len(list((run / "checkpoints").glob("best-*.json"))) == 1
    # On data other than the built-in synthetic set the reference is the run's own training images and the
    # judge grader (which knows synthetic lesions only) gives no fidelity.
    other = SnapshotScorer(cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": "eyepacs"})}),
                           judges=judges)
    row = other(list_checkpoints(run / "checkpoints")[-1], synth_zip_16)
    assert "fidelity" not in row and "group_fidelity" not in row and "referable_agreement" not in row
    assert row["fd_fundus"] > 0
    from retinagen.data.dataset import ZipImageDataset

    assert other._judges_for(synth_zip_16).ref_features.shape == (len(ZipImageDataset(synth_zip_16)), 128)
