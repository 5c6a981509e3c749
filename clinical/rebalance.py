"""DR-grade rebalancing: synthetic images from a grade-conditional checkpoint fill up the rare grades.

``rebalance(checkpoint, data_zip, out_dir, target="uniform")`` counts the DR grades of the real
training split of a prepared dataset, works out how many synthetic images each grade needs to reach
the target, generates them with the checkpoint's EMA generator (optionally steering discovered codes
and gating every image through a DR grader) and writes a folder that is both a synthetic set for
``retinagen downstream`` and a merged real + synthetic dataset for ``retinagen prepare``.

Targets (`parse_target`; the string is parsed strictly, an error names what is wrong)
    ``uniform``                 every grade is raised to the count of the largest grade.
    ``counts:0=0,1=500,2=300``  exactly these numbers of *synthetic* images per grade (grades not
                                listed get none).
    ``ratio:0.5``               every grade is raised to at least ceil(0.5 x the largest grade's count);
                                ``ratio:1`` is ``uniform``.

Output folder (EyePACS layout, flat, so ``prepare --dataset eyepacs`` keeps patient ids)::

    OUT/train/<patient>_<eye>.png        copies of the real training images (byte-identical ZIP
                                         members; ``real_<member>.png`` when no patient/eye is known)
    OUT/train/synth_g<G>_<T>.png         synthetic image of grade G, try T (T >= 6 digits)
    OUT/manifest.csv                     one row per synthetic image: file, level, synthetic=1, seed, try,
                                         codes, checkpoint_sha256, model, created (ISO UTC), gate_prob,
                                         gate_rejection_rate (of its grade), sha256 (of the PNG bytes)
    OUT/tries.csv                        every try the run used, kept or rejected by the gate
    OUT/trainLabels.csv                  ``image,level`` of real + synthetic (EyePACS format)
    OUT/labels.csv                       ``image,label`` of the same images (folder format)
    OUT/labels_merged.csv                ``image,level,synthetic,file``: the merged set, synthetic marked
    OUT/rebalance_report.json            settings, per-grade requested / generated / tries / rejected /
                                         rejection rate / shortfall, real histogram before and after

    ``retinagen prepare --dataset eyepacs --data-root OUT ...`` or ``--dataset folder --data-root OUT
    --labels OUT/labels.csv ...`` prepare the merged set; ``retinagen downstream --synthetic OUT`` reads
    the manifest (only synthetic rows). The copies of real images can be left out (``copy_real=False``);
    the merged label files are then not written.

Seeds and determinism
    Try ``T`` of grade ``G`` uses the latent of ``image_seed(seed, G * 2**32 + T)``
    (`retinagen.generation.image_seed`), so every image is a function of (checkpoint, seed, grade, try,
    steering) alone. Tries are generated in fixed chunks (``[k * batch_size, (k+1) * batch_size)``) and
    the grader sees whole chunks, so a rerun computes every image with the same batch composition: same
    bytes on the same device and batch size.

Steering (`parse_steer`)
    ``{"pigmentation": "spread"}`` spreads a code evenly over the images of each grade: a uniform code
    takes the values of a base-2 van der Corput sequence over [-1, 1] (every prefix is evenly spread,
    whatever the gate rejects), shifted by a seeded offset; a categorical / Bernoulli code cycles
    through its classes. ``{"c4": 0.8}`` fixes a code. Attribute names (``pigmentation``, ``melanin``)
    are resolved through the checkpoint's factor map (`retinagen.generation.find_factor_map`).

Quality gate
    With a grader, a synthetic image is kept only if the grader's probability of the requested grade is
    >= ``gate_threshold``. Each grade gets at most ``ceil(requested x max_tries_factor)`` tries; a grade
    that does not reach its count in that budget is reported as a shortfall (the run does not loop on).

Resuming
    A rerun with the same settings (checked against the report; different settings are refused) reuses
    every try recorded in ``tries.csv`` whose image verifies: the file exists, its sha256 equals its
    manifest row, it decodes to the model's resolution, and the row's grade / seed / checkpoint match the
    try. A chunk with a missing, corrupt or unrecorded image is recomputed; only images whose bytes
    differ from the file on disk are written. All writes are atomic (`retinagen.fileio`).

Safety
    The output folder must not lie inside the folder of the real dataset ZIP (nor any ``real_roots``);
    paths are resolved, symlinks included. An existing non-empty folder is used only when it holds a
    previous rebalance report. Synthetic names (``synth_g<G>_<T>``) cannot collide with the names of the
    real copies, and nothing outside OUT is ever written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from retinagen import __version__
from retinagen.data.dataset import ZipImageDataset, read_dataset_json
from retinagen.errors import BadInputError, ConfigError, RetinagenError, UnsafePathError
from retinagen.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from retinagen.generation import (
    LoadedModel,
    find_factor_map,
    image_seed,
    load_model,
    parse_code_settings,
    png_bytes,
    resolve_code_name,
    run_generator,
    sample_latents,
)
from retinagen.progress import progress_bar
from retinagen.training.checkpoint import sha256_file

__all__ = [
    "DEFAULT_MAX_TRIES_FACTOR",
    "GRADE_STRIDE",
    "MANIFEST_COLUMNS",
    "REPORT_FILE",
    "RebalanceSummary",
    "RebalanceTarget",
    "SteerPlan",
    "parse_steer",
    "parse_target",
    "rebalance",
    "spread_value",
    "synthetic_counts",
    "synthetic_name",
    "try_seed",
]

REPORT_FORMAT = "retinagen-rebalance"
REPORT_VERSION = 1
REPORT_FILE = "rebalance_report.json"
MANIFEST_FILE = "manifest.csv"
TRIES_FILE = "tries.csv"
IMAGE_DIR = "train"  # EyePACS layout: prepare --dataset eyepacs lists OUT/train/ (not recursively)
GRADE_STRIDE = 2**32  # try T of grade G is image index G * GRADE_STRIDE + T of the seeded run
DEFAULT_MAX_TRIES_FACTOR = 4.0
FLUSH_EVERY_S = 30.0  # rewrite manifest / tries / report at least this often (a crash loses at most this)

MANIFEST_COLUMNS = (
    "file", "level", "synthetic", "seed", "try", "codes", "checkpoint_sha256", "model", "created",
    "gate_prob", "gate_rejection_rate", "sha256",
)
TRIES_COLUMNS = ("level", "try", "seed", "kept", "gate_prob", "file")
_SYNTH_RE = re.compile(r"^synth_g(\d+)_(\d{6,})$")
_SAFE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# A grader's prediction: (grader, images uint8 [N, 3, R, R]) -> probabilities [N, num_classes].
PredictFn = Callable[[Any, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class RebalanceTarget:
    """A parsed ``--target``: kind "uniform" | "counts" | "ratio"; ``counts`` grade -> synthetic images."""

    kind: str
    counts: tuple[tuple[int, int], ...] = ()
    ratio: float = 1.0

    def canonical(self) -> str:
        """The target as a normalised string (what the report records and a resume compares)."""
        if self.kind == "counts":
            return "counts:" + ",".join(f"{g}={n}" for g, n in self.counts)
        if self.kind == "ratio":
            return f"ratio:{self.ratio:g}"
        return "uniform"


_TARGET_HELP = "expected 'uniform', 'counts:G=N,...' (e.g. counts:0=0,1=500,2=300) or 'ratio:R' with 0 < R <= 1"


def parse_target(text: str, num_classes: int = 5) -> RebalanceTarget:
    """``"uniform"`` / ``"counts:0=0,1=500"`` / ``"ratio:0.5"`` -> `RebalanceTarget`; `ConfigError` otherwise.

    Strict: the kind is lower case, counts are non-negative integers for grades 0..num_classes-1, each
    grade at most once, no empty items; the ratio is a finite number in (0, 1]. Spaces around items are
    allowed.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--target: empty; {_TARGET_HELP}")
    raw = text.strip()
    kind, sep, rest = raw.partition(":")
    kind = kind.strip()
    if kind == "uniform":
        if sep:
            raise ConfigError(f"--target {raw!r}: 'uniform' takes no value; {_TARGET_HELP}")
        return RebalanceTarget("uniform")
    if kind == "ratio":
        value = rest.strip()
        try:
            ratio = float(value)
        except ValueError:
            raise ConfigError(f"--target {raw!r}: ratio {value!r} is not a number; {_TARGET_HELP}") from None
        if not sep or not math.isfinite(ratio) or not 0 < ratio <= 1:
            raise ConfigError(f"--target {raw!r}: the ratio must be a number in (0, 1], got {value!r}")
        return RebalanceTarget("ratio", ratio=ratio)
    if kind == "counts":
        if not sep or not rest.strip():
            raise ConfigError(f"--target {raw!r}: no counts given; {_TARGET_HELP}")
        counts: dict[int, int] = {}
        for item in rest.split(","):
            item = item.strip()
            if not item:
                raise ConfigError(f"--target {raw!r}: empty item (a stray comma?); {_TARGET_HELP}")
            g_text, eq, n_text = item.partition("=")
            g_text, n_text = g_text.strip(), n_text.strip()
            if not eq or not re.fullmatch(r"\d+", g_text) or not re.fullmatch(r"\d+", n_text):
                raise ConfigError(
                    f"--target {raw!r}: item {item!r} must be GRADE=COUNT with non-negative integers"
                )
            g, n = int(g_text), int(n_text)
            if g >= num_classes:
                raise ConfigError(f"--target {raw!r}: grade {g} is not a grade of this model (0..{num_classes - 1})")
            if g in counts:
                raise ConfigError(f"--target {raw!r}: grade {g} is given twice")
            counts[g] = n
        return RebalanceTarget("counts", counts=tuple(sorted(counts.items())))
    raise ConfigError(f"--target {raw!r}: unknown kind {kind!r}; {_TARGET_HELP}")


def synthetic_counts(target: RebalanceTarget, real_counts: Sequence[int]) -> list[int]:
    """Synthetic images per grade [K] that take ``real_counts`` [K] to ``target`` (never negative)."""
    real = [int(c) for c in real_counts]
    top = max(real, default=0)
    if target.kind == "uniform":
        goal = [top] * len(real)
    elif target.kind == "ratio":
        # The small epsilon keeps 0.5 * 26 = 13 from becoming 14 through float rounding.
        floor_ = math.ceil(target.ratio * top - 1e-9)
        goal = [max(c, floor_) for c in real]
    else:
        given = dict(target.counts)
        return [given.get(g, 0) for g in range(len(real))]
    return [max(0, g - c) for g, c in zip(goal, real, strict=True)]


# --------------------------------------------------------------------------------------------------
# Steering


@dataclass(frozen=True)
class SteerPlan:
    """Resolved steering: ``fixed`` code index -> value, ``spread`` code indices; ``labels`` for reports."""

    fixed: dict[int, float] = field(default_factory=dict)
    spread: tuple[int, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)  # "c4 (pigmentation)" -> "spread" / "0.8"

    def canonical(self) -> dict[str, str]:
        """Code name -> "spread" or the fixed value: what the report records and a resume compares."""
        return self.labels


def _steer_items(steer: Mapping[str, Any] | Sequence[str] | None) -> list[tuple[str, str]]:
    if not steer:
        return []
    if isinstance(steer, Mapping):
        return [(str(k).strip(), str(v).strip()) for k, v in steer.items()]
    if isinstance(steer, str):
        raise ConfigError(f"--steer {steer!r}: give a list of NAME=spread|VALUE items or a mapping")
    items = []
    for item in steer:
        name, eq, value = str(item).partition("=")
        if not eq or not name.strip() or not value.strip():
            raise ConfigError(f"--steer {item!r}: expected NAME=spread or NAME=VALUE (e.g. pigmentation=spread, c4=0.8)")
        items.append((name.strip(), value.strip()))
    return items


def parse_steer(
    model: LoadedModel,
    steer: Mapping[str, Any] | Sequence[str] | None,
    factors: str | Path | None = None,
) -> SteerPlan:
    """Resolve steering requests against ``model``'s codes (and its factor map for attribute names).

    ``steer``: ``{"pigmentation": "spread", "c4": 0.8}`` or ``["pigmentation=spread", "c4=0.8"]``. Values
    are ``spread`` or the code's own value (class index, 0/1, or a number in [-1, 1]; see
    `retinagen.generation.parse_code_settings`). ``factors``: a factor map file (default: the checkpoint's,
    read only when a name is not a plain code name). Raises `ConfigError` (`CodeValueError`) naming the item.
    """
    items = _steer_items(steer)
    if not items:
        return SteerPlan()
    spec = model.spec
    plain = {*spec.code_names, *(str(i) for i in range(spec.n_codes))}
    fmap = None
    if factors is not None or any(name not in plain for name, _ in items):
        found = find_factor_map(model, factors)
        fmap = found[0] if found is not None else None
    fixed: dict[int, float] = {}
    spread: list[int] = []
    labels: dict[str, str] = {}
    for name, value in items:
        idx = resolve_code_name(spec, name, model.factor_names, fmap, flag="--steer")
        code = spec.code_names[idx]
        if idx in fixed or idx in spread:
            raise ConfigError(f"--steer {name}={value}: code {code} is steered twice")
        key = code if name in plain else f"{code} ({name})"
        if value.lower() == "spread":
            spread.append(idx)
            labels[key] = "spread"
        else:
            try:
                fixed.update(parse_code_settings(spec, {name: value}, model.factor_names, factor_map=fmap))
            except ConfigError as exc:  # its messages name generate's flag; this one is --steer
                raise type(exc)(str(exc).replace("--set ", "--steer ", 1)) from None
            labels[key] = f"{fixed[idx]:g}"
    return SteerPlan(fixed=fixed, spread=tuple(spread), labels=labels)


def _van_der_corput(t: int) -> float:
    """The base-2 radical inverse of t in [0, 1): 0, 1/2, 1/4, 3/4, 1/8, ... (every prefix evenly spread)."""
    x, denom = 0.0, 1.0
    while t:
        denom *= 2.0
        x += (t & 1) / denom
        t >>= 1
    return x


def _spread_offset(seed: int, grade: int, code: int) -> float:
    """A seeded offset in [0, 1) so different seeds spread over different (still even) values."""
    return float(np.random.default_rng(np.random.SeedSequence([seed, grade, code, 0x5EED])).random())


def spread_value(model: LoadedModel, code: int, seed: int, grade: int, t: int) -> float:
    """The value a ``spread`` code takes on try ``t`` of ``grade``: even over [-1, 1) or cycling over classes."""
    kind = model.spec.code_kinds[code]
    u = _spread_offset(seed, grade, code)
    if kind == "uniform":
        return -1.0 + 2.0 * ((_van_der_corput(t) + u) % 1.0)
    n_classes = model.spec.categorical[code] if kind == "categorical" else 2
    return float((t + int(u * n_classes)) % n_classes)


# --------------------------------------------------------------------------------------------------
# Names and seeds


def try_seed(seed: int, grade: int, t: int) -> int:
    """The latent seed of try ``t`` of ``grade``: `image_seed` of image ``grade * GRADE_STRIDE + t``."""
    return image_seed(seed, grade * GRADE_STRIDE + t)


def synthetic_name(grade: int, t: int) -> str:
    """File stem of try ``t`` of ``grade``: ``synth_g2_000041``."""
    return f"synth_g{grade}_{t:06d}"


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
# Summary


@dataclass(frozen=True)
class RebalanceSummary:
    """What `rebalance` did. Per-grade lists are indexed by grade 0..K-1.

    real_counts: real training images per grade; requested: synthetic images the target asks for;
    generated: synthetic images kept; tries: tries used; rejected: tries the gate rejected;
    shortfall: requested - generated; reused: kept images found on disk and verified (not written);
    written: synthetic images written by this call; real_copied: real images copied by this call (a
    resume copies only missing or changed ones); elapsed_s / images_per_s: wall time and kept images
    per second of this call (reused ones included); warnings: what the report's ``warnings`` lists.
    """

    out: Path
    report_path: Path
    manifest_path: Path
    real_counts: list[int]
    requested: list[int]
    generated: list[int]
    tries: list[int]
    rejected: list[int]
    shortfall: list[int]
    reused: int
    written: int
    real_copied: int
    elapsed_s: float
    images_per_s: float
    warnings: list[str]

    @property
    def target_met(self) -> bool:
        return not any(self.shortfall)


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


def _csv_text(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _fmt_prob(p: float | None) -> str:
    return "" if p is None else f"{p:.6f}"


def _to_int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass
class _Try:
    """One try: its seed, whether the gate kept it, the probability, and (when computed) the image."""

    grade: int
    t: int
    seed: int
    kept: bool
    gate_prob: float | None
    codes: str = ""
    png: bytes | None = None


# --------------------------------------------------------------------------------------------------
# The job


class _Rebalancer:
    def __init__(self, model: LoadedModel, out: Path, *, seed: int, steer: SteerPlan, predict: Callable | None,
                 gate_threshold: float, batch_size: int) -> None:
        self.model = model
        self.out = out
        self.seed = seed
        self.steer = steer
        self.predict = predict
        self.gate_threshold = gate_threshold
        self.batch_size = batch_size
        self.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.prior_tries: dict[tuple[int, int], dict[str, str]] = {}
        self.prior_rows: dict[tuple[int, int], dict[str, str]] = {}
        self.reused = 0
        self.written = 0

    # -- previous run --------------------------------------------------------------------------

    def load_prior(self) -> None:
        for row in _read_csv_rows(self.out / TRIES_FILE):
            g, t = _to_int(row.get("level")), _to_int(row.get("try"))
            if g is not None and t is not None:
                self.prior_tries[(g, t)] = row
        for row in _read_csv_rows(self.out / MANIFEST_FILE):
            g, t = _to_int(row.get("level")), _to_int(row.get("try"))
            if g is not None and t is not None:
                self.prior_rows[(g, t)] = row

    def _file_of(self, grade: int, t: int) -> str:
        return f"{IMAGE_DIR}/{synthetic_name(grade, t)}.png"

    def _verify(self, grade: int, t: int) -> bool:
        """A kept try of a previous run is usable: row matches the try, file has its sha256 and decodes."""
        row = self.prior_rows.get((grade, t))
        if row is None:
            return False
        if (row.get("file") != self._file_of(grade, t) or row.get("seed") != str(try_seed(self.seed, grade, t))
                or row.get("checkpoint_sha256") != self.model.sha256 or row.get("synthetic") != "1"):
            return False
        path = self.out / row["file"]
        try:
            data = path.read_bytes()
        except OSError:
            return False
        if hashlib.sha256(data).hexdigest() != row.get("sha256"):
            return False
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        r = self.model.resolution
        return img is not None and img.shape == (r, r, 3)

    def from_records(self, grade: int, ts: range, remaining: int) -> list[_Try] | None:
        """The tries of a chunk as recorded by a previous run (only as many as are needed), or None."""
        out: list[_Try] = []
        for t in ts:
            if remaining <= 0:
                break
            rec = self.prior_tries.get((grade, t))
            if rec is None or rec.get("seed") != str(try_seed(self.seed, grade, t)) or rec.get("kept") not in ("0", "1"):
                return None
            kept = rec["kept"] == "1"
            if kept and not self._verify(grade, t):
                return None
            prob = rec.get("gate_prob") or ""
            try:
                gate_prob = float(prob) if prob else None
            except ValueError:
                return None
            if (gate_prob is None) != (self.predict is None):
                return None
            codes = self.prior_rows[(grade, t)].get("codes", "") if kept else ""
            out.append(_Try(grade, t, try_seed(self.seed, grade, t), kept, gate_prob, codes))
            remaining -= int(kept)
        return out

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def compute(self, grade: int, ts: range) -> list[_Try]:
        """Generate and gate a whole chunk of tries (same batch every time: reproducible bytes)."""
        model, spec = self.model, self.model.spec
        seeds = [try_seed(self.seed, grade, t) for t in ts]
        sample, grades = sample_latents(model, seeds, grade=grade)
        for idx, value in self.steer.fixed.items():
            sample = spec.with_code(sample, idx, value, allow_extrapolation=True)
        for idx in self.steer.spread:
            values = torch.tensor([spread_value(model, idx, self.seed, grade, t) for t in ts], dtype=torch.float64)
            sample = spec.with_code(sample, idx, values)
        imgs = run_generator(model, sample, grades, batch_size=len(seeds))
        # [-1, 1] -> uint8 exactly as retinagen.generation writes PNGs (round half away from zero on x127.5)
        u8 = ((imgs.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, 3, R, R]
        probs = None
        if self.predict is not None:
            probs = _check_proba(self.predict(u8.numpy()), len(seeds), model.num_classes)[:, grade]
        values = sample.values().cpu().numpy()
        hwc = u8.permute(0, 2, 3, 1).contiguous().numpy()
        out = []
        for j, t in enumerate(ts):
            codes = " ".join(f"{c}={float(v):.9g}" for c, v in zip(spec.code_names, values[j], strict=True))
            p = None if probs is None else float(probs[j])
            kept = p is None or p >= self.gate_threshold
            out.append(_Try(grade, t, seeds[j], kept, p, codes, png_bytes(hwc[j]) if kept else None))
        return out

    def store(self, tr: _Try) -> str:
        """Make sure a kept try's PNG is on disk (written only when absent or different); returns its sha256."""
        path = self.out / self._file_of(tr.grade, tr.t)
        if tr.png is None:  # reused from a previous run, verified in from_records
            self.reused += 1
            return self.prior_rows[(tr.grade, tr.t)]["sha256"]
        try:
            same = path.read_bytes() == tr.png
        except OSError:
            same = False
        if same:
            self.reused += 1
        else:
            atomic_write_bytes(path, tr.png)
            self.written += 1
        return hashlib.sha256(tr.png).hexdigest()


def _check_proba(p: Any, n: int, k: int) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.shape != (n, k):
        raise RetinagenError(f"the grader returned probabilities of shape {arr.shape}, expected ({n}, {k}) for {k} grades")
    if not np.isfinite(arr).all() or (arr < -1e-6).any() or (arr > 1 + 1e-6).any():
        raise RetinagenError("the grader returned probabilities outside [0, 1] (or NaN)")
    return arr


def _make_predict(grader: Any, predict_fn: PredictFn | None, device: str | torch.device) -> tuple[Callable, dict]:
    """A gate function images uint8 [N, 3, R, R] -> [N, K] and the grader's identity for the report."""
    if isinstance(grader, (str, Path)):
        from clinical.grader import load_grader, predict_proba

        path = Path(grader)
        loaded = load_grader(path, device=device)
        fn = predict_fn or predict_proba
        ident = {"file": path.name, "sha256": sha256_file(path.with_suffix(".safetensors"))}
        return (lambda x: fn(loaded, x)), ident
    if predict_fn is None:
        from clinical.grader import predict_proba as fn
    else:
        fn = predict_fn
    ident = {"object": type(grader).__name__, "predict": getattr(fn, "__name__", type(fn).__name__)}
    return (lambda x: fn(grader, x)), ident


def _resolve_model(checkpoint: str | Path | LoadedModel, device: str | torch.device) -> LoadedModel:
    model = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, device, with_discriminator=False)
    if model.num_classes == 0:
        raise RetinagenError(
            f"{model.path}: this checkpoint is not DR-grade conditional (model.conditional=false), so it cannot "
            "generate images of a requested grade; train one with `--set model.conditional=true` on a graded dataset"
        )
    return model


def _real_split(data_zip: Path) -> tuple[ZipImageDataset, str | None]:
    meta = read_dataset_json(data_zip)
    splits = meta.get("splits") or {}
    split = "train" if splits else None
    ds = ZipImageDataset(data_zip, split=split)
    if ds.num_classes == 0:
        raise BadInputError(data_zip, "the dataset has no labels (DR grades); rebalancing needs a graded dataset")
    if (ds.labels < 0).any():
        raise BadInputError(data_zip, f"{int((ds.labels < 0).sum())} training images have no grade")
    return ds, split


def rebalance(
    checkpoint: str | Path | LoadedModel,
    data_zip: str | Path,
    out_dir: str | Path,
    *,
    target: str | RebalanceTarget,
    seed: int = 0,
    steer: Mapping[str, Any] | Sequence[str] | None = None,
    factors: str | Path | None = None,
    grader: Any = None,
    predict_fn: PredictFn | None = None,
    gate_threshold: float = 0.5,
    max_tries_factor: float = DEFAULT_MAX_TRIES_FACTOR,
    copy_real: bool = True,
    real_roots: Sequence[str | Path] = (),
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> RebalanceSummary:
    """Generate synthetic images per DR grade until the real training split reaches ``target``.

    Args:
        checkpoint: a grade-conditional checkpoint (.safetensors or run folder) or a `LoadedModel`.
        data_zip: the prepared real dataset (``retinagen prepare``); its ``train`` split is counted (all
            images when it has no splits).
        out_dir: the output folder (see the module docstring); must not be inside the ZIP's folder.
        target: ``uniform``, ``counts:G=N,...`` or ``ratio:R`` (`parse_target`), or a parsed target.
        seed: non-negative run seed; same seed, same images.
        steer: codes to spread or fix, e.g. ``{"pigmentation": "spread"}`` (`parse_steer`).
        factors: factor map for attribute names (default: the checkpoint's ``factors.json``).
        grader: None (no gate), a grader checkpoint path (`clinical.grader.load_grader`; recorded by its
            sha256), or any object that ``predict_fn`` accepts (recorded, and compared on resume, by type only).
        predict_fn: ``(grader, images uint8 [N, 3, R, R]) -> [N, K]`` probabilities; default
            `clinical.grader.predict_proba`.
        gate_threshold: keep an image only if P(requested grade) >= this, in [0, 1].
        max_tries_factor: with a gate, at most ceil(requested * factor) tries per grade (>= 1).
        copy_real: copy the real training images into OUT/train and write the merged label files.
        real_roots: further folders of real data that OUT must not be inside.
        batch_size: tries per generator / grader batch (also the chunk of resumption).
        device: torch device for the generator (and a grader loaded from a path).
        progress: progress bars on stderr.

    Raises:
        ConfigError: a bad target, steering or numeric argument. UnsafePathError: OUT inside real data.
        BadInputError: OUT is not usable, or the dataset has no grades. RetinagenError: an unconditional
        checkpoint, a grade count that does not match the model, or a previous run with other settings.
    """
    t0 = time.perf_counter()
    data_zip, out = Path(data_zip), Path(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(gate_threshold, (int, float)) and math.isfinite(gate_threshold) and 0 <= gate_threshold <= 1):
        raise ConfigError(f"--gate-threshold must be a number in [0, 1], got {gate_threshold!r}")
    if not (isinstance(max_tries_factor, (int, float)) and math.isfinite(max_tries_factor) and max_tries_factor >= 1):
        raise ConfigError(f"max_tries_factor must be a number >= 1, got {max_tries_factor!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    _check_out(out, data_zip, [Path(r) for r in real_roots])

    model = _resolve_model(checkpoint, device)
    k = model.num_classes
    tgt = target if isinstance(target, RebalanceTarget) else parse_target(target, k)
    if tgt.kind == "counts" and any(g >= k for g, _ in tgt.counts):
        raise ConfigError(f"--target {tgt.canonical()}: grades must be 0..{k - 1} for this model")
    plan = parse_steer(model, steer, factors)
    ds, split = _real_split(data_zip)
    if ds.num_classes != k:
        raise RetinagenError(
            f"{data_zip}: the dataset has {ds.num_classes} grades but {model.path.name} was trained with {k}"
        )
    real = np.bincount(ds.labels, minlength=k).astype(int).tolist()
    need = synthetic_counts(tgt, real)
    if grader is None:
        max_tries = list(need)
    else:
        max_tries = [max(n, math.ceil(n * max_tries_factor - 1e-9)) for n in need]
    if max(max_tries, default=0) >= GRADE_STRIDE:
        raise ConfigError(f"too many images requested ({max(max_tries):,}); at most {GRADE_STRIDE - 1:,} tries per grade")

    predict, grader_ident = (None, None) if grader is None else _make_predict(grader, predict_fn, device)
    warnings = _warnings(model, ds, real, need)
    settings = {
        "checkpoint_sha256": model.sha256,
        "dataset_fingerprint": ds.fingerprint(),
        "split": split or "all",
        "seed": seed,
        "target": tgt.canonical(),
        "steer": plan.canonical(),
        "grader": grader_ident,
        "gate_threshold": float(gate_threshold) if grader is not None else None,
        "max_tries_factor": float(max_tries_factor) if grader is not None else None,
        "copy_real": bool(copy_real),
    }
    _check_resume(out, settings)

    job = _Rebalancer(model, out, seed=seed, steer=plan, predict=predict, gate_threshold=float(gate_threshold),
                      batch_size=batch_size)
    job.load_prior()
    base_report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "retinagen_version": __version__,
        "settings": settings,
        "checkpoint": {"file": model.path.name, "sha256": model.sha256, "model": model.cfg.msi_name,
                       "num_classes": k, "resolution": model.resolution},
        "dataset": {"file": data_zip.name, "fingerprint": settings["dataset_fingerprint"], "split": split or "all",
                    "resolution": ds.resolution, "n_images": len(ds)},
        "target": tgt.canonical(),
        "warnings": warnings,
    }
    out.mkdir(parents=True, exist_ok=True)
    # Written first: it marks the folder as a rebalance output (a rerun resumes it) before any image lands.
    atomic_write_json(out / REPORT_FILE, {**base_report, "complete": False})

    real_stems = _real_stems(ds)
    copied = _copy_real(ds, real_stems, out, progress) if copy_real else 0

    rows: list[dict[str, Any]] = []
    tries_rows: list[dict[str, Any]] = []
    tries = [0] * k
    kept_n = [0] * k
    rejected = [0] * k
    probs_kept: list[list[float]] = [[] for _ in range(k)]
    spread_vals: dict[int, list[list[float]]] = {idx: [[] for _ in range(k)] for idx in plan.spread}
    t_gen = time.perf_counter()
    last_flush = time.monotonic()

    def flush(complete: bool) -> None:
        atomic_write_text(out / MANIFEST_FILE, _csv_text(MANIFEST_COLUMNS, rows))
        atomic_write_text(out / TRIES_FILE, _csv_text(TRIES_COLUMNS, tries_rows))
        if not complete:
            atomic_write_json(out / REPORT_FILE, {**base_report, "complete": False})

    with progress_bar(sum(need), "rebalance", unit="img", enabled=progress) as bar:
        for g in range(k):
            t = 0
            while kept_n[g] < need[g] and t < max_tries[g]:
                ts = range(t, min(t + batch_size, max_tries[g]))
                chunk = job.from_records(g, ts, need[g] - kept_n[g])
                if chunk is None:  # something in this chunk is missing, corrupt or unrecorded: recompute it all
                    chunk = job.compute(g, ts)
                for tr in chunk:
                    if kept_n[g] >= need[g]:
                        break
                    tries[g] += 1
                    file = job._file_of(g, tr.t) if tr.kept else ""
                    tries_rows.append({"level": g, "try": tr.t, "seed": tr.seed, "kept": int(tr.kept),
                                       "gate_prob": _fmt_prob(tr.gate_prob), "file": file})
                    if not tr.kept:
                        rejected[g] += 1
                        continue
                    sha = job.store(tr)
                    prior = job.prior_rows.get((g, tr.t), {})
                    kept_n[g] += 1
                    if tr.gate_prob is not None:
                        probs_kept[g].append(tr.gate_prob)
                    _collect_spread(spread_vals, model, tr.codes, g)
                    rows.append({
                        "file": file, "level": g, "synthetic": 1, "seed": tr.seed, "try": tr.t, "codes": tr.codes,
                        "checkpoint_sha256": model.sha256, "model": model.cfg.msi_name,
                        # A verified image keeps the time it was made; a rewritten one gets this run's.
                        "created": prior.get("created") if prior.get("sha256") == sha and prior.get("created")
                        else job.created,
                        "gate_prob": _fmt_prob(tr.gate_prob), "gate_rejection_rate": "", "sha256": sha,
                    })
                    bar.advance(1)
                t = ts.stop
                if time.monotonic() - last_flush > FLUSH_EVERY_S:
                    flush(False)
                    last_flush = time.monotonic()
    gen_s = time.perf_counter() - t_gen

    rates = [rejected[g] / tries[g] if tries[g] else None for g in range(k)]
    for row in rows:
        rate = rates[int(row["level"])]
        row["gate_rejection_rate"] = "" if grader is None or rate is None else f"{rate:.6f}"
    flush(True)

    stale = _stale_files(out, {r["file"] for r in rows})
    if stale:
        warnings.append(f"{len(stale)} synthetic file(s) in {IMAGE_DIR}/ are not in the manifest (left from an "
                        f"earlier run), e.g. {stale[0]}; prepare will reject them as unlabelled")
    if copy_real:
        _write_merged(out, ds, real_stems, rows)

    shortfall = [need[g] - kept_n[g] for g in range(k)]
    for g in range(k):
        if shortfall[g]:
            warnings.append(f"grade {g}: {kept_n[g]} of {need[g]} synthetic images after {tries[g]} tries "
                            f"(the gate rejected {rejected[g]}); shortfall {shortfall[g]}")
    n_kept = sum(kept_n)
    elapsed = time.perf_counter() - t0
    after = [real[g] + kept_n[g] for g in range(k)]
    report = {
        **base_report,
        "complete": True,
        "target_met": not any(shortfall),
        "real_counts": _by_grade(real),
        "requested": _by_grade(need),
        "generated": _by_grade(kept_n),
        "after_counts": _by_grade(after),
        "distribution_before": _fractions(real),
        "distribution_after": _fractions(after),
        "per_grade": [
            {
                "grade": g, "real": real[g], "requested": need[g], "generated": kept_n[g], "tries": tries[g],
                "max_tries": max_tries[g], "rejected": rejected[g], "rejection_rate": rates[g],
                "shortfall": shortfall[g],
                "mean_gate_prob": float(np.mean(probs_kept[g])) if probs_kept[g] else None,
            }
            for g in range(k)
        ],
        "gate": None if grader is None else {"grader": grader_ident, "threshold": float(gate_threshold),
                                             "max_tries_factor": float(max_tries_factor),
                                             "rejected": sum(rejected), "tries": sum(tries),
                                             "rejection_rate": sum(rejected) / sum(tries) if sum(tries) else None},
        "steer": plan.canonical(),
        "steer_coverage": _coverage(spread_vals, model),
        "files": {"manifest": MANIFEST_FILE, "tries": TRIES_FILE, "images": f"{IMAGE_DIR}/",
                  **({"eyepacs_labels": "trainLabels.csv", "folder_labels": "labels.csv",
                      "merged_labels": "labels_merged.csv"} if copy_real else {})},
        "prepare_commands": [
            "retinagen prepare --dataset eyepacs --data-root OUT --resolution R --out MERGED.zip",
            "retinagen prepare --dataset folder --data-root OUT --labels OUT/labels.csv --resolution R --out MERGED.zip",
        ] if copy_real else [],
        "real_copied": len(ds) if copy_real else 0,
        "timing": {
            "elapsed_s": round(elapsed, 3),
            "generation_s": round(gen_s, 3),
            "images_kept": n_kept,
            "images_written": job.written,
            "images_reused": job.reused,
            "tries": sum(tries),
            "tries_per_s": round(sum(tries) / gen_s, 2) if gen_s > 0 else None,
            "device": str(model.device),
            "batch_size": batch_size,
        },
        "warnings": warnings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / REPORT_FILE, report)
    return RebalanceSummary(
        out=out, report_path=out / REPORT_FILE, manifest_path=out / MANIFEST_FILE, real_counts=real, requested=need,
        generated=kept_n, tries=tries, rejected=rejected, shortfall=shortfall, reused=job.reused, written=job.written,
        real_copied=copied, elapsed_s=elapsed, images_per_s=n_kept / elapsed if elapsed > 0 else 0.0,
        warnings=warnings,
    )


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
