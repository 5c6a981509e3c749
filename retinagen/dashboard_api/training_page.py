"""The Training & metrics page: metrics.jsonl rows, sample grids and evaluation report tables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retinagen.errors import BadInputError
from retinagen.metrics.registry import METRICS
from retinagen.run_dir import RunDir

MAX_REPORTS = 50


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, float]], int]:
    """The numeric fields of every line of ``metrics.jsonl`` (rows), and the number of unreadable lines."""
    rows, bad = [], 0
    for _, rec in RunDir(Path(run_dir)).log():
        if rec is None:
            bad += 1  # e.g. the last line of a run killed mid-write
            continue
        rows.append({k: float(v) for k, v in rec.items()
                     if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))})
    return rows, bad


LOSS_KEYS = ("loss/D", "loss/G")
# Per-snapshot scores of the fixed judges (training's quality/* lines); fd_fundus apart (its own scale).
QUALITY_FD_KEY = "quality/fd_fundus"
QUALITY_SHARE_KEYS = ("quality/precision", "quality/recall", "quality/referable_agreement", "quality/z_share",
                      "quality/group_fidelity/0-1", "quality/group_fidelity/2", "quality/group_fidelity/3-4")
INFO_KEYS = ("info/L_info_discrete", "info/H_discrete", "info/L_info")


def sample_grids(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``samples/fakes-<step>.png`` grids as (training step, path), oldest first."""
    folder = Path(run_dir) / "samples"
    out = []
    for p in folder.glob("fakes-*.png") if folder.is_dir() else []:
        digits = p.stem.split("-", 1)[1]
        if digits.isdigit():
            out.append((int(digits), p))
    return sorted(out)


def find_reports(run_dir: str | Path, *, max_depth: int = 3) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """Evaluation reports (``REPORT.json`` / ``*.json`` with the evaluation schema) up to ``max_depth`` folders
    below the run folder: (path, report) pairs newest first, and notes on files that could not be read."""
    from retinagen.metrics.report import load_report

    root = Path(run_dir)
    found, notes = [], []
    for path in sorted(root.rglob("REPORT.json")):
        if len(path.relative_to(root).parts) > max_depth + 1:
            continue
        try:
            found.append((path, load_report(path)))
        except BadInputError as exc:
            notes.append(f"{path.relative_to(root)}: {exc.reason}")
        if len(found) >= MAX_REPORTS:
            break
    found.sort(key=lambda pr: str(pr[1].get("created", "")), reverse=True)
    return found, notes


def _ms(sec: Mapping[str, Any] | None) -> str:
    if not sec:
        return "not run"
    if sec.get("status") != "ok":
        return "skipped"
    return f"{sec['mean']:.4g} ± {sec['std']:.2g}"


def report_tables(report: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Rows for the dashboard's tables from an evaluation report: ``quality`` (FID, KID, fd_fundus),
    ``mig`` (MIG and max I), ``acm`` (per attribute: code, ACM %, 95 % margin), ``notes`` (every metric of
    `retinagen.metrics.registry.METRICS` that was skipped or not requested, with what it measures)."""
    m = report.get("metrics", {})
    model = report.get("model", {})
    name = str(model.get("msi", "model"))
    fdf = m.get("fd_fundus") or {}
    quality = [{
        "model": name, "kimg": model.get("kimg"), "FID": _ms(m.get("fid")), "KID": _ms(m.get("kid")),
        "fd_fundus FD": _ms(fdf.get("fd")) if fdf.get("status") == "ok" else _ms(fdf or None),
        "fd_fundus KID": _ms(fdf.get("kid")) if fdf.get("status") == "ok" else _ms(fdf or None),
    }]
    mig_rows = []
    mig = m.get("mig")
    if mig and mig.get("status") == "ok":
        mig_rows.append({"model": name, "MIG": mig["mig"], "max I": mig["max_mi"],
                         "MIG (normalised)": mig.get("mig_normalized"), "max I (normalised)": mig.get("max_mi_normalized")})
    acm_rows = []
    acm = m.get("acm")
    if acm and acm.get("status") == "ok":
        for r in acm.get("rows", []):
            acm_rows.append({"attribute": r["attribute"], "code": f"{r['code']} ({r['kind']})",
                             "assigned": bool(r.get("assigned")), "ACM %": r["percent"], "± 95 %": r["margin95"],
                             "n": r["n"], "direction": r.get("direction")})
    notes = []
    for k, info in METRICS.items():  # every metric evaluate knows, so one not requested is visible too
        sec = m.get(k)
        if not isinstance(sec, dict):
            notes.append({"metric": k, "measures": info.description, "reason": f"not requested (--metrics {k})"})
        elif sec.get("status") not in (None, "ok"):
            notes.append({"metric": k, "measures": info.description, "reason": str(sec.get("reason", ""))})
    return {"quality": quality, "mig": mig_rows, "acm": acm_rows, "notes": notes}


def read_png(path: str | Path) -> np.ndarray:
    """A PNG the run wrote (sample grids, strips) as uint8 RGB, through the safe reader."""
    from retinagen.data.imageio import read_image

    arr = read_image(path)
    if arr.dtype != np.uint8:
        arr = (arr >> 8).astype(np.uint8)
    return arr
