"""Scoring snapshots during training: a quality row per snapshot into metrics.jsonl and TensorBoard, and
the best snapshot so far (lowest fd_fundus) kept as ``checkpoints/best-<step>``."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retinagen.errors import RetinagenError
from retinagen.run_dir import read_log, step_of
from retinagen.training.checkpoint import checkpoint_stem, copy_checkpoint

SnapshotScore = Callable[[Path, Path], dict[str, Any]]
BEST_PREFIX = "best-"  # checkpoints/best-<step>.{json,safetensors}: the lowest fd_fundus of the run so far


def best_logged_fd(metrics_path: Path) -> float:
    """The lowest ``quality/fd_fundus`` logged so far (a resumed run keeps its best)."""
    best = math.inf
    for _, rec in read_log(metrics_path):
        value = rec.get("quality/fd_fundus") if rec is not None else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            best = min(best, float(value))
    return best


def score_snapshot(score: SnapshotScore, ck: Path, data_zip: Path, metrics_path: Path, writer: Any,
                   best_fd: float, *, step: int, images_seen: int) -> tuple[float, float]:
    """Score snapshot ``ck`` (taken at ``step``), log the row, keep it as the best snapshot if it is.

    Returns the best fd_fundus so far and the seconds scoring took (not training time)."""
    t = time.perf_counter()
    try:
        row = score(ck, data_zip)
    except RetinagenError as exc:  # a broken judges cache must not stop a long run: say so, train on
        print(f"warning: snapshot {ck.name} not scored: {exc}", file=sys.stderr)
        row = {}
    record: dict[str, Any] = {"step": step, "kimg": images_seen / 1000.0}
    for key, value in _flatten(row).items():
        if key not in ("kimg", "n"):
            record[f"quality/{key}"] = value
    if row.get("judge"):
        record["quality/judge"] = str(row["judge"])  # scores are comparable between runs of one judge id
    fd = record.get("quality/fd_fundus")
    is_best = isinstance(fd, int | float) and math.isfinite(fd) and fd < best_fd
    if row:
        record["quality/best"] = int(is_best)
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k.startswith("quality/") and isinstance(v, int | float):
                    writer.add_scalar(k, v, step)
    if is_best:
        folder = ck.parent
        new = copy_checkpoint(ck, folder / checkpoint_stem(step, BEST_PREFIX), {"quality": row})
        for old in folder.glob(f"{BEST_PREFIX}*.json"):
            if old != new:
                old.unlink(missing_ok=True)
                old.with_suffix(".safetensors").unlink(missing_ok=True)
        best_fd = float(fd)
    return best_fd, time.perf_counter() - t


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a score row as flat keys (``fidelity/2``); strings (judge id, sha) are dropped."""
    out: dict[str, float] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def log_lines_upto(path: Path, upto_step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to ``upto_step`` (what a resumed run keeps); cut lines are dropped."""
    return [line for line, rec in read_log(path) if rec is not None and (step_of(rec) or 0) <= upto_step]
