"""The rebalance output folder: its layout, the safety checks on it, the CSV files and the real copies.

The folder must not lie inside the real dataset's folder (nor any ``real_roots``; symlinks resolved), and an
existing non-empty one is used only when it holds a previous rebalance report. Synthetic names
(``synth_g<G>_<T>``) cannot collide with the real copies' names, and nothing outside it is written.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinagen.data.dataset import ZipImageDataset
from retinagen.errors import BadInputError, RetinagenError, UnsafePathError
from retinagen.fileio import atomic_write_bytes, atomic_write_text
from retinagen.generation import (
    LoadedModel,
)
from retinagen.progress import progress_bar

REPORT_FORMAT = "retinagen-rebalance"
REPORT_VERSION = 1
REPORT_FILE = "rebalance_report.json"
MANIFEST_FILE = "manifest.csv"
TRIES_FILE = "tries.csv"
IMAGE_DIR = "train"  # EyePACS layout: prepare --dataset eyepacs lists OUT/train/ (not recursively)
MANIFEST_COLUMNS = (
    "file", "level", "synthetic", "seed", "try", "codes", "checkpoint_sha256", "model", "created",
    "gate_prob", "gate_rejection_rate", "sha256",
)
TRIES_COLUMNS = ("level", "try", "seed", "kept", "gate_prob", "file")
_SYNTH_RE = re.compile(r"^synth_g(\d+)_(\d{6,})$")
_SAFE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --------------------------------------------------------------------------------------------------
# Paths and previous state


def _check_out(out: Path, data_zip: Path, real_roots: Sequence[Path]) -> None:
    """Refuse OUT inside a real data folder, or an existing non-empty folder that is not a rebalance output."""
    out_r = out.resolve()
    roots = [data_zip.resolve().parent, *(Path(r).resolve() for r in real_roots)]
    for root in roots:
        if out_r == root or root in out_r.parents:
            raise UnsafePathError(
                out,
                f"the output folder is inside the real data folder {root} (resolved {out_r}); synthetic images "
                "must never be written among real ones: choose a folder outside it",
            )
    if out.exists() and not out.is_dir():
        raise BadInputError(out, "the output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_FILE).is_file():
        raise BadInputError(
            out,
            f"the output folder is not empty and holds no {REPORT_FILE} (not a rebalance output); "
            "choose a new or empty folder",
        )


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV we wrote, or [] when absent / unreadable (the images are then verified by recomputing)."""
    try:
        text = path.read_text(encoding="utf-8")
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _fmt_prob(p: float | None) -> str:
    return "" if p is None else f"{p:.6f}"


def _to_int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _real_stems(ds: ZipImageDataset) -> list[str]:
    """File stems of the real copies: ``<patient>_<eye>`` (keeps EyePACS patient ids), else ``real_<member>``."""
    patients = ds.meta.get("patients") or {}
    eyes = ds.meta.get("eyes") or {}
    wanted = []
    for name in ds.names:
        p, e = patients.get(name), eyes.get(name)
        stem = f"{p}_{e}" if isinstance(p, str) and e in ("left", "right") else None
        wanted.append(stem if stem is not None and _SAFE_STEM.match(stem) else None)
    seen: dict[str, int] = {}
    for stem in wanted:
        if stem is not None:
            seen[stem] = seen.get(stem, 0) + 1
    out = []
    for name, stem in zip(ds.names, wanted, strict=True):
        if stem is None or seen[stem] > 1:  # unknown or ambiguous (two images of one eye): the member name
            stem = "real_" + Path(name).stem
        out.append(stem)
    return out


# --------------------------------------------------------------------------------------------------
# Helpers of the job


def _by_grade(values: Sequence[int]) -> dict[str, int]:
    return {str(g): int(v) for g, v in enumerate(values)}


def _fractions(values: Sequence[int]) -> dict[str, float]:
    total = sum(values)
    return {str(g): (v / total if total else 0.0) for g, v in enumerate(values)}


def _warnings(model: LoadedModel, ds: ZipImageDataset, real: list[int], need: list[int]) -> list[str]:
    out = []
    probs = model.meta.get("grade_probs")
    for g, n in enumerate(need):
        if n and isinstance(probs, list) and g < len(probs) and not probs[g]:
            out.append(f"grade {g}: the checkpoint was trained without any grade-{g} images; its synthetic "
                       f"grade-{g} images are not grounded in data")
        elif n and real[g] == 0:
            out.append(f"grade {g}: the real training split has no grade-{g} images")
    trained_on = model.meta.get("dataset_fingerprint")
    if trained_on and trained_on != ds.fingerprint():
        out.append(f"{model.path.name} was trained on another dataset (fingerprint {str(trained_on)[:12]}…, "
                   f"this one {ds.fingerprint()[:12]}…)")
    if ds.resolution != model.resolution:
        out.append(f"real images are {ds.resolution} px, synthetic ones {model.resolution} px; prepare resizes "
                   "both to its --resolution")
    return out


def _check_resume(out: Path, settings: Mapping[str, Any]) -> None:
    path = out / REPORT_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise BadInputError(path, "unreadable rebalance report; use a new output folder") from None
    if not isinstance(old, dict) or old.get("format") != REPORT_FORMAT or not isinstance(old.get("settings"), dict):
        raise BadInputError(path, "not a rebalance report; use a new output folder")
    prev = old["settings"]
    differ = [key for key in settings if prev.get(key) != settings[key]]
    if differ:
        detail = "; ".join(f"{key}: {prev.get(key)!r} then, {settings[key]!r} now" for key in differ)
        raise RetinagenError(
            f"{out}: made by a rebalance run with other settings ({detail}); rerun with the same settings to "
            "resume, or choose a new output folder"
        )


def _copy_real(ds: ZipImageDataset, stems: Sequence[str], out: Path, progress: bool) -> int:
    """Copy the real training images (ZIP member bytes) into OUT/train; returns how many were written."""
    import zipfile

    written = 0
    with zipfile.ZipFile(ds.path) as zf, progress_bar(len(ds), "copy real images", enabled=progress) as bar:
        for name, stem in zip(ds.names, stems, strict=True):
            data = zf.read(name)
            path = out / IMAGE_DIR / f"{stem}.png"
            try:
                same = path.read_bytes() == data
            except OSError:
                same = False
            if not same:
                atomic_write_bytes(path, data)
                written += 1
            bar.advance(1)
    return written


def _collect_spread(spread_vals: dict[int, list[list[float]]], model: LoadedModel, codes: str, grade: int) -> None:
    if not spread_vals:
        return
    values = dict(item.split("=", 1) for item in codes.split())
    for idx, per_grade in spread_vals.items():
        v = values.get(model.spec.code_names[idx])
        if v is not None:
            per_grade[grade].append(float(v))


def _coverage(spread_vals: dict[int, list[list[float]]], model: LoadedModel) -> dict[str, Any]:
    """Per spread code and grade: how the kept images cover the code's range (bins or classes)."""
    out: dict[str, Any] = {}
    for idx, per_grade in spread_vals.items():
        kind = model.spec.code_kinds[idx]
        entry: dict[str, Any] = {"kind": kind}
        if kind == "uniform":
            edges = np.linspace(-1.0, 1.0, 5)
            entry["bins"] = [f"[{a:g}, {b:g})" for a, b in zip(edges[:-1], edges[1:], strict=True)]
            entry["counts"] = {str(g): np.histogram(np.clip(v, -1, 1 - 1e-9), edges)[0].astype(int).tolist()
                               for g, v in enumerate(per_grade) if v}
        else:
            n = model.spec.categorical[idx] if kind == "categorical" else 2
            entry["counts"] = {str(g): np.bincount(np.asarray(v, dtype=int), minlength=n).tolist()
                               for g, v in enumerate(per_grade) if v}
        out[model.spec.code_names[idx]] = entry
    return out


def _stale_files(out: Path, listed: set[str]) -> list[str]:
    folder = out / IMAGE_DIR
    if not folder.is_dir():
        return []
    return sorted(f"{IMAGE_DIR}/{p.name}" for p in folder.glob("synth_g*.png")
                  if _SYNTH_RE.match(p.stem) and f"{IMAGE_DIR}/{p.name}" not in listed)


def _write_merged(out: Path, ds: ZipImageDataset, real_stems: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """trainLabels.csv (EyePACS), labels.csv (folder) and labels_merged.csv (with the synthetic column)."""
    entries = [(stem, int(label), 0) for stem, label in zip(real_stems, ds.labels, strict=True)]
    entries += [(Path(str(r["file"])).stem, int(r["level"]), 1) for r in rows]
    entries.sort()
    eyepacs = ["image,level"] + [f"{s},{lvl}" for s, lvl, _ in entries]
    folder = ["image,label"] + [f"{IMAGE_DIR}/{s}.png,{lvl}" for s, lvl, _ in entries]
    merged = ["image,level,synthetic,file"] + [f"{s},{lvl},{syn},{IMAGE_DIR}/{s}.png" for s, lvl, syn in entries]
    atomic_write_text(out / "trainLabels.csv", "\n".join(eyepacs) + "\n")
    atomic_write_text(out / "labels.csv", "\n".join(folder) + "\n")
    atomic_write_text(out / "labels_merged.csv", "\n".join(merged) + "\n")
