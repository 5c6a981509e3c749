"""DR-grade rebalancing: synthetic images from a grade-conditional checkpoint fill up the rare grades.

``rebalance(checkpoint, data_zip, out_dir, target="uniform")`` counts the DR grades of the real
training split of a prepared dataset, works out how many synthetic images each grade needs to reach
the target, generates them with the checkpoint's EMA generator (optionally steering discovered codes
and gating every image through a DR grader) and writes a folder that is both a synthetic set for
``retinagen downstream`` and a merged real + synthetic dataset for ``retinagen prepare``.

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

Targets and steering: `clinical.rebalance.targets`; the folder's safety checks: `clinical.rebalance.files`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from clinical.rebalance.files import (
    IMAGE_DIR,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    REPORT_FILE,
    REPORT_FORMAT,
    REPORT_VERSION,
    TRIES_COLUMNS,
    TRIES_FILE,
    _by_grade,
    _check_out,
    _check_resume,
    _collect_spread,
    _copy_real,
    _coverage,
    _fmt_prob,
    _fractions,
    _read_csv_rows,
    _real_stems,
    _stale_files,
    _to_int,
    _warnings,
    _write_merged,
)
from clinical.rebalance.targets import (
    GRADE_STRIDE,
    RebalanceTarget,
    SteerPlan,
    parse_steer,
    parse_target,
    spread_value,
    synthetic_counts,
    synthetic_name,
    try_seed,
)
from retinagen import __version__
from retinagen.checks import Count, Multiplier, Seed, UnitInterval, check
from retinagen.data.dataset import ZipImageDataset, read_dataset_json
from retinagen.errors import BadInputError, ConfigError, RetinagenError
from retinagen.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, csv_text, sha256_file
from retinagen.generation import (
    LoadedModel,
    load_model,
    png_bytes,
    run_generator,
    sample_latents,
)
from retinagen.progress import progress_bar

DEFAULT_MAX_TRIES_FACTOR = 4.0
FLUSH_EVERY_S = 30.0  # rewrite manifest / tries / report at least this often (a crash loses at most this)

# A grader's prediction: (grader, images uint8 [N, 3, R, R]) -> probabilities [N, num_classes].
PredictFn = Callable[[Any, np.ndarray], np.ndarray]


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
    _check_arguments(seed, gate_threshold, max_tries_factor, batch_size)
    _check_out(out, data_zip, [Path(r) for r in real_roots])
    model = _resolve_model(checkpoint, device)
    tgt, plan, ds, split, real, need, max_tries = _plan(model, data_zip, target, steer, factors, gated=grader is not None,
                                                         max_tries_factor=max_tries_factor)
    predict, grader_ident = (None, None) if grader is None else _make_predict(grader, predict_fn, device)
    warnings = _warnings(model, ds, real, need)
    settings = _settings(model, ds, split, seed, tgt, plan, grader_ident, gate_threshold, max_tries_factor,
                         gated=grader is not None, copy_real=copy_real)
    _check_resume(out, settings)

    job = _Rebalancer(model, out, seed=seed, steer=plan, predict=predict, gate_threshold=float(gate_threshold),
                      batch_size=batch_size)
    job.load_prior()
    base_report = _base_report(model, ds, data_zip, split, tgt, settings, warnings)
    out.mkdir(parents=True, exist_ok=True)
    # Written first: it marks the folder as a rebalance output (a rerun resumes it) before any image lands.
    atomic_write_json(out / REPORT_FILE, {**base_report, "complete": False})

    real_stems = _real_stems(ds)
    copied = _copy_real(ds, real_stems, out, progress) if copy_real else 0
    tally = _Tally.empty(model.num_classes, plan.spread)
    gen_s = _generate(job, tally, need, max_tries, out, base_report, progress)
    tally.set_rejection_rates(gated=grader is not None)
    tally.flush(out, base_report, complete=True)

    stale = _stale_files(out, {r["file"] for r in tally.rows})
    if stale:
        warnings.append(f"{len(stale)} synthetic file(s) in {IMAGE_DIR}/ are not in the manifest (left from an "
                        f"earlier run), e.g. {stale[0]}; prepare will reject them as unlabelled")
    if copy_real:
        _write_merged(out, ds, real_stems, tally.rows)
    shortfall = [n - kept for n, kept in zip(need, tally.kept, strict=True)]
    for g, short in enumerate(shortfall):
        if short:
            warnings.append(f"grade {g}: {tally.kept[g]} of {need[g]} synthetic images after {tally.tries[g]} tries "
                            f"(the gate rejected {tally.rejected[g]}); shortfall {short}")
    elapsed = time.perf_counter() - t0
    report = {
        **base_report,
        "complete": True,
        "target_met": not any(shortfall),
        **_counts_report(real, need, max_tries, tally, shortfall),
        "gate": None if grader is None else {"grader": grader_ident, "threshold": float(gate_threshold),
                                             "max_tries_factor": float(max_tries_factor),
                                             "rejected": sum(tally.rejected), "tries": sum(tally.tries),
                                             "rejection_rate": tally.rejection_rate()},
        "steer": plan.canonical(),
        "steer_coverage": _coverage(tally.spread_vals, model),
        **_files_report(copy_real, len(ds)),
        "timing": {
            "elapsed_s": round(elapsed, 3),
            "generation_s": round(gen_s, 3),
            "images_kept": sum(tally.kept),
            "images_written": job.written,
            "images_reused": job.reused,
            "tries": sum(tally.tries),
            "tries_per_s": round(sum(tally.tries) / gen_s, 2) if gen_s > 0 else None,
            "device": str(model.device),
            "batch_size": batch_size,
        },
        "warnings": warnings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / REPORT_FILE, report)
    return RebalanceSummary(
        out=out, report_path=out / REPORT_FILE, manifest_path=out / MANIFEST_FILE, real_counts=real, requested=need,
        generated=tally.kept, tries=tally.tries, rejected=tally.rejected, shortfall=shortfall, reused=job.reused,
        written=job.written, real_copied=copied, elapsed_s=elapsed,
        images_per_s=sum(tally.kept) / elapsed if elapsed > 0 else 0.0, warnings=warnings,
    )


def _check_arguments(seed: Any, gate_threshold: Any, max_tries_factor: Any, batch_size: Any) -> None:
    check(Seed, seed, "--seed", ConfigError)
    check(UnitInterval, gate_threshold, "--gate-threshold", ConfigError)
    check(Multiplier, max_tries_factor, "max_tries_factor", ConfigError)
    check(Count, batch_size, "--batch-size", ConfigError)


def _plan(
    model: LoadedModel,
    data_zip: Path,
    target: str | RebalanceTarget,
    steer: Mapping[str, Any] | Sequence[str] | None,
    factors: str | Path | None,
    *,
    gated: bool,
    max_tries_factor: float,
) -> tuple[RebalanceTarget, SteerPlan, ZipImageDataset, str | None, list[int], list[int], list[int]]:
    """Target, steering, the real split and its grade counts, the synthetic images and tries per grade."""
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
    max_tries = [max(n, math.ceil(n * max_tries_factor - 1e-9)) for n in need] if gated else list(need)
    if max(max_tries, default=0) >= GRADE_STRIDE:
        raise ConfigError(f"too many images requested ({max(max_tries):,}); at most {GRADE_STRIDE - 1:,} tries per grade")
    return tgt, plan, ds, split, real, need, max_tries


def _settings(model: LoadedModel, ds: ZipImageDataset, split: str | None, seed: int, tgt: RebalanceTarget,
              plan: SteerPlan, grader_ident: Any, gate_threshold: float, max_tries_factor: float, *, gated: bool,
              copy_real: bool) -> dict[str, Any]:
    """What a rerun must match to resume this folder (`_check_resume`)."""
    return {
        "checkpoint_sha256": model.sha256,
        "dataset_fingerprint": ds.fingerprint(),
        "split": split or "all",
        "seed": seed,
        "target": tgt.canonical(),
        "steer": plan.canonical(),
        "grader": grader_ident,
        "gate_threshold": float(gate_threshold) if gated else None,
        "max_tries_factor": float(max_tries_factor) if gated else None,
        "copy_real": bool(copy_real),
    }


def _base_report(model: LoadedModel, ds: ZipImageDataset, data_zip: Path, split: str | None, tgt: RebalanceTarget,
                 settings: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    """The report's fields known before any image is made (the incomplete report written while it runs)."""
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "retinagen_version": __version__,
        "settings": settings,
        "checkpoint": {"file": model.path.name, "sha256": model.sha256, "model": model.cfg.msi_name,
                       "num_classes": model.num_classes, "resolution": model.resolution},
        "dataset": {"file": data_zip.name, "fingerprint": settings["dataset_fingerprint"], "split": split or "all",
                    "resolution": ds.resolution, "n_images": len(ds)},
        "target": tgt.canonical(),
        "warnings": warnings,
    }


@dataclass
class _Tally:
    """What the generation loop has tried and kept so far (per grade), and the manifest and tries rows."""

    tries: list[int]
    kept: list[int]
    rejected: list[int]
    probs_kept: list[list[float]]
    spread_vals: dict[int, list[list[float]]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    tries_rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def empty(cls, k: int, spread: Sequence[int]) -> _Tally:
        return cls([0] * k, [0] * k, [0] * k, [[] for _ in range(k)], {idx: [[] for _ in range(k)] for idx in spread})

    def add(self, job: _Rebalancer, g: int, tr: _Try) -> bool:
        """Record try ``tr`` of grade ``g``; a kept one is stored (or verified on disk). True when kept."""
        model = job.model
        self.tries[g] += 1
        file = job._file_of(g, tr.t) if tr.kept else ""
        self.tries_rows.append({"level": g, "try": tr.t, "seed": tr.seed, "kept": int(tr.kept),
                                "gate_prob": _fmt_prob(tr.gate_prob), "file": file})
        if not tr.kept:
            self.rejected[g] += 1
            return False
        sha = job.store(tr)
        prior = job.prior_rows.get((g, tr.t), {})
        self.kept[g] += 1
        if tr.gate_prob is not None:
            self.probs_kept[g].append(tr.gate_prob)
        _collect_spread(self.spread_vals, model, tr.codes, g)
        self.rows.append({
            "file": file, "level": g, "synthetic": 1, "seed": tr.seed, "try": tr.t, "codes": tr.codes,
            "checkpoint_sha256": model.sha256, "model": model.cfg.msi_name,
            # A verified image keeps the time it was made; a rewritten one gets this run's.
            "created": prior.get("created") if prior.get("sha256") == sha and prior.get("created") else job.created,
            "gate_prob": _fmt_prob(tr.gate_prob), "gate_rejection_rate": "", "sha256": sha,
        })
        return True

    def rates(self) -> list[float | None]:
        return [r / n if n else None for r, n in zip(self.rejected, self.tries, strict=True)]

    def rejection_rate(self) -> float | None:
        return sum(self.rejected) / sum(self.tries) if sum(self.tries) else None

    def set_rejection_rates(self, *, gated: bool) -> None:
        rates = self.rates()
        for row in self.rows:
            rate = rates[int(row["level"])]
            row["gate_rejection_rate"] = "" if not gated or rate is None else f"{rate:.6f}"

    def flush(self, out: Path, base_report: Mapping[str, Any], *, complete: bool) -> None:
        atomic_write_text(out / MANIFEST_FILE, csv_text(MANIFEST_COLUMNS, self.rows))
        atomic_write_text(out / TRIES_FILE, csv_text(TRIES_COLUMNS, self.tries_rows))
        if not complete:
            atomic_write_json(out / REPORT_FILE, {**base_report, "complete": False})


def _generate(job: _Rebalancer, tally: _Tally, need: Sequence[int], max_tries: Sequence[int], out: Path,
              base_report: Mapping[str, Any], progress: bool) -> float:
    """Try chunk after chunk per grade until the grade has its images or its tries; returns the seconds taken.

    Manifest, tries and an incomplete report are rewritten at least every ``FLUSH_EVERY_S`` seconds."""
    t_gen = time.perf_counter()
    last_flush = time.monotonic()
    with progress_bar(sum(need), "rebalance", unit="img", enabled=progress) as bar:
        for g in range(len(need)):
            t = 0
            while tally.kept[g] < need[g] and t < max_tries[g]:
                ts = range(t, min(t + job.batch_size, max_tries[g]))
                chunk = job.from_records(g, ts, need[g] - tally.kept[g])
                if chunk is None:  # something in this chunk is missing, corrupt or unrecorded: recompute it all
                    chunk = job.compute(g, ts)
                for tr in chunk:
                    if tally.kept[g] >= need[g]:
                        break
                    if tally.add(job, g, tr):
                        bar.advance(1)
                t = ts.stop
                if time.monotonic() - last_flush > FLUSH_EVERY_S:
                    tally.flush(out, base_report, complete=False)
                    last_flush = time.monotonic()
    return time.perf_counter() - t_gen


def _counts_report(real: Sequence[int], need: Sequence[int], max_tries: Sequence[int], tally: _Tally,
                   shortfall: Sequence[int]) -> dict[str, Any]:
    after = [r + kept for r, kept in zip(real, tally.kept, strict=True)]
    rates = tally.rates()
    return {
        "real_counts": _by_grade(real),
        "requested": _by_grade(need),
        "generated": _by_grade(tally.kept),
        "after_counts": _by_grade(after),
        "distribution_before": _fractions(real),
        "distribution_after": _fractions(after),
        "per_grade": [
            {
                "grade": g, "real": real[g], "requested": need[g], "generated": tally.kept[g], "tries": tally.tries[g],
                "max_tries": max_tries[g], "rejected": tally.rejected[g], "rejection_rate": rates[g],
                "shortfall": shortfall[g],
                "mean_gate_prob": float(np.mean(tally.probs_kept[g])) if tally.probs_kept[g] else None,
            }
            for g in range(len(real))
        ],
    }


def _files_report(copy_real: bool, n_real: int) -> dict[str, Any]:
    merged = {"eyepacs_labels": "trainLabels.csv", "folder_labels": "labels.csv", "merged_labels": "labels_merged.csv"}
    return {
        "files": {"manifest": MANIFEST_FILE, "tries": TRIES_FILE, "images": f"{IMAGE_DIR}/",
                  **(merged if copy_real else {})},
        "prepare_commands": [
            "retinagen prepare --dataset eyepacs --data-root OUT --resolution R --out MERGED.zip",
            "retinagen prepare --dataset folder --data-root OUT --labels OUT/labels.csv --resolution R --out MERGED.zip",
        ] if copy_real else [],
        "real_copied": n_real if copy_real else 0,
    }
