"""Procedural synthetic fundus photographs with ground-truth factors: the built-in dataset.

Every image is rendered from a :class:`FundusFactors` record, so the factors that a GAN should
discover (pigmentation, glare, field-of-view shape, exposure, vessels, disc position, DR lesions)
are known exactly and can score MIG / ACM without a human. The factors and how they are drawn live in
:mod:`retinagen.data.synth_factors`, the rendering in :mod:`retinagen.data.synth_render`; this module
writes the dataset to disk and re-exports both.

Geometry is in *normalised image coordinates*: x to the right and y downwards, both in [-1, 1]
(units of the image half-width, centre 0). Anatomical sizes scale with ``fov_radius`` (a smaller
field of view in the frame is the same 45-degree photograph taken further away).

Factors (all columns of ``factors.csv``; ranges in :data:`FACTOR_RANGES`, sampled independently
of one another unless said otherwise):

- ``laterality``: 0 = left eye, 1 = right eye. The optic disc sits on the nasal side: right of the
  image centre for a right eye, left for a left eye (fundus photographs are not mirrored).
- ``grade``: DR grade 0-4 (EyePACS/ICDR), drawn from ``grade_probs``.
- ``pigmentation``: melanin, 0 = light orange-red fundus, 1 = dark brown-red.
- ``tigroid``: visibility of the choroidal (tigroid) vessel pattern, 0 = none, 1 = strong.
- ``glare``: rim haze plus specular spots on the disc / macular reflex, 0 = none, 1 = strong.
- ``brightness``: exposure; the image is multiplied by ``0.6 + 0.85 * brightness``.
- ``fov_radius``: radius of the circular field of view as a fraction of the image half-width.
- ``fov_cut``: fraction of the circle's diameter cut off by the frame, top + bottom equally
  (EyePACS-style cropped circles); 0 = full circle. ``render_fundus`` shows the cut as black bands
  in its square output (the view of a prepared dataset); the JPEGs on disk are cropped to the frame
  (:func:`crop_to_frame`), so the cut lies on the image border as in a raw EyePACS photograph.
- ``notch``: 1 if the camera's orientation notch (a small square bite at the upper-right rim) shows.
- ``vessel_seed``: seed of the vessel tree (branch positions, angles, tortuosity).
- ``vessel_density``: how many side branches the tree grows, 0 = sparse, 1 = dense.
- ``vessel_contrast``: how dark vessels are against the background, 0 = faint, 1 = strong.
- ``disc_x``, ``disc_y``: optic disc centre in normalised image coordinates. ``|disc_x|`` is drawn
  independently; its sign follows laterality. The macula / fovea is temporal to the disc.
- ``microaneurysms``, ``haemorrhages``, ``exudates``, ``cotton_wool_spots``, ``neovascular_tufts``:
  lesion counts; their ranges grow with ``grade`` (grade 0 has none), so they are correlated with it.
- ``lesion_count``: the sum of the five lesion counts.
- ``texture_seed``: seed of the nuisance detail (background texture, sensor noise, glare placement,
  lesion placement and shapes).

The dataset on disk (:func:`write_synth_dataset`) follows the EyePACS Kaggle layout so the same
``prepare`` path reads it: ``train/<patient>_{left,right}.jpeg``, ``trainLabels.csv`` (``image,level``),
plus ``factors.csv`` (``image`` then the factors above) and ``synth.json`` (how it was made). Images
are ``R`` px wide and ``R`` px tall unless the frame cuts the circle (then shorter). Both eyes of a
patient share correlated traits, as in EyePACS. With an odd ``n`` the last patient has a left eye only.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from retinagen.checks import Count, Seed, check
from retinagen.data import default_workers
from retinagen.data.synth_factors import (
    DEFAULT_GRADE_PROBS,
    FACTOR_RANGES,
    LATERALITY_CODES,
    LESION_COUNT_RANGES,
    FundusFactors,
    SynthArgumentError,
    check_grade_probs,
    check_resolution,
    sample_factors,
    sample_patient_factors,
)
from retinagen.data.synth_render import crop_to_frame, make_sample_grid, render_fundus
from retinagen.dr_scale import NUM_GRADES
from retinagen.errors import RetinagenError
from retinagen.fileio import atomic_write_json, atomic_write_text, csv_text
from retinagen.progress import progress_bar

__all__ = [
    "DEFAULT_GRADE_PROBS",
    "FACTOR_RANGES",
    "LATERALITY_CODES",
    "LESION_COUNT_RANGES",
    "FundusFactors",
    "SynthArgumentError",
    "SynthSummary",
    "crop_to_frame",
    "make_sample_grid",
    "plan_dataset",
    "read_factors_csv",
    "render_fundus",
    "sample_factors",
    "sample_patient_factors",
    "write_synth_dataset",
]

JPEG_QUALITY = 95
SYNTH_FORMAT = "retinagen-synthfundus"
SYNTH_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Dataset on disk


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_synth_dataset` wrote and how fast."""

    n: int
    resolution: int
    grade_counts: dict[int, int]
    elapsed_s: float
    images_per_s: float
    out: Path
    seed: int = 0
    workers: int = 1


def plan_dataset(
    n: int, seed: int, grade_probs: Sequence[float] = DEFAULT_GRADE_PROBS
) -> list[tuple[str, FundusFactors]]:
    """(image stem, factors) for images 0..n-1: patient ``k`` (1-based) gets ``k_left``, ``k_right``.

    Patient k's factors come from its own generator seeded by (seed, k), so any image's factors
    are independent of n (beyond whether the last patient has one or two eyes) and of workers.
    """
    p = check_grade_probs(grade_probs)
    plan: list[tuple[str, FundusFactors]] = []
    for k in range(math.ceil(n / 2)):
        eyes = min(2, n - 2 * k)
        rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
        for eye, factors in zip(("left", "right"), sample_patient_factors(rng, p, n_eyes=eyes), strict=False):
            plan.append((f"{k + 1}_{eye}", factors))
    return plan


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(
        ".jpeg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:  # pragma: no cover - OpenCV only fails here on impossible inputs
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _render_chunk(job: tuple[str, int, list[tuple[str, FundusFactors]]]) -> int:
    """Worker task: render and write a chunk of images into the (temporary) train folder."""
    folder, resolution, items = job
    for stem, factors in items:
        img = crop_to_frame(render_fundus(factors, resolution), factors)
        Path(folder, f"{stem}.jpeg").write_bytes(_encode_jpeg(img))
    return len(items)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _is_synth_output(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "synth.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == SYNTH_FORMAT


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RetinagenError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_synth_output(out):
        raise RetinagenError(
            f"--out {out}: folder is not empty and is not a previous `retinagen synth` output "
            "(no synth.json); choose an empty or new folder"
        )


def _fmt(v: int | float) -> int | str:
    return v if isinstance(v, int) else repr(float(v))  # repr round-trips floats exactly


_MIN_PIXELS_FOR_PROCESSES = 2**20  # below this the default (workers=None) renders in this process


def write_synth_dataset(
    out: Path,
    n: int,
    resolution: int,
    seed: int = 0,
    grade_probs: Sequence[float] = DEFAULT_GRADE_PROBS,
    workers: int | None = None,
    progress: bool = True,
) -> SynthSummary:
    """Write ``n`` synthetic fundus images in the EyePACS Kaggle layout under ``out``.

    ``out/train/<patient>_{left,right}.jpeg`` (JPEG quality 95; ``resolution`` wide, framed by
    :func:`crop_to_frame` so frame-cut photographs are less tall), ``out/trainLabels.csv``
    (``image,level``), ``out/factors.csv`` (``image`` + FACTOR_RANGES columns) and ``out/synth.json``.
    Everything is written into a temporary sibling folder that replaces ``out`` only when complete,
    so an interrupted run leaves no partial dataset. ``out`` must be new, empty, or a previous
    synth output (which is replaced). Same seed -> byte-identical files for any ``workers``.

    Args:
        out: output folder.
        n: number of images, >= 1 (ceil(n / 2) patients; the last has one eye when n is odd).
        resolution: image width (and height of uncut photographs), 16-1024.
        seed: non-negative integer.
        grade_probs: probabilities of DR grades 0-4 (5 non-negative numbers summing to 1).
        workers: processes rendering in parallel; None -> ``default_workers()``, or this process alone for a set
            small enough to render in about a second (n * resolution**2 < 2**20 pixels); 1 -> in this process.
        progress: show a progress bar on stderr.
    """
    n = check(Count, n, "n", SynthArgumentError)
    res = check_resolution(resolution)
    seed = check(Seed, seed, "seed", SynthArgumentError)
    probs = check_grade_probs(grade_probs)
    if workers is None:
        # Starting a worker process costs about a second; a small set renders faster than that here.
        workers = 1 if n * res * res < _MIN_PIXELS_FOR_PROCESSES else default_workers()
    workers = check(Count, workers, "workers (or None)", SynthArgumentError)
    out = Path(out)
    _check_out(out)

    t0 = time.perf_counter()
    plan = plan_dataset(n, seed, probs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_name(out, "partial")
    tmp.mkdir()  # normal permissions (tempfile.mkdtemp would make the dataset folder owner-only)
    try:
        train = tmp / "train"
        train.mkdir()
        chunk = max(4, min(64, math.ceil(n / (workers * 8))))
        jobs = [(str(train), res, plan[i : i + chunk]) for i in range(0, n, chunk)]
        with progress_bar(n, f"synth {res}px", unit="img", enabled=progress) as bar:
            if workers == 1 or len(jobs) == 1:
                for job in jobs:
                    bar.advance(_render_chunk(job))
            else:
                ctx = multiprocessing.get_context("spawn")  # safe with torch/threads in the parent
                with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
                    for done in pool.imap_unordered(_render_chunk, jobs):
                        bar.advance(done)
        atomic_write_text(
            tmp / "trainLabels.csv", csv_text(["image", "level"], ((s, f.grade) for s, f in plan))
        )
        names = list(FACTOR_RANGES)
        atomic_write_text(
            tmp / "factors.csv",
            csv_text(["image", *names], ([s, *(_fmt(v) for v in f.as_row().values())] for s, f in plan)),
        )
        grade_counts = {g: 0 for g in range(NUM_GRADES)}
        for _, f in plan:
            grade_counts[f.grade] += 1
        atomic_write_json(
            tmp / "synth.json",
            {
                "format": SYNTH_FORMAT,
                "version": SYNTH_FORMAT_VERSION,
                "synthetic": True,
                "generator": "retinagen.data.synthetic",
                "n": n,
                "resolution": res,
                "seed": seed,
                "grade_probs": probs.tolist(),
                "grade_counts": {str(k): v for k, v in grade_counts.items()},
                "jpeg_quality": JPEG_QUALITY,
                "factor_ranges": {k: list(v) for k, v in FACTOR_RANGES.items()},
            },
        )
        # fileio's atomic writes create owner-only files (mkstemp); give the dataset's CSV/JSON the
        # same umask-derived permissions as the images, so other users/jobs can read them.
        file_mode = train.stat().st_mode & 0o666
        for name in ("trainLabels.csv", "factors.csv", "synth.json"):
            (tmp / name).chmod(file_mode)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - t0
    return SynthSummary(
        n=n,
        resolution=res,
        grade_counts=grade_counts,
        elapsed_s=elapsed,
        images_per_s=n / elapsed if elapsed > 0 else float("inf"),
        out=out,
        seed=seed,
        workers=workers,
    )


def _sibling_name(out: Path, tag: str) -> Path:
    """An unused hidden name beside ``out`` (same file system, so renames are atomic)."""
    while True:
        candidate = out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        if not candidate.exists():
            return candidate


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty, or a previous synth output) by the finished ``tmp`` folder."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _sibling_name(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous dataset back
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_factors_csv(path: Path) -> dict[str, FundusFactors]:
    """Read a factors.csv written by :func:`write_synth_dataset`: image stem -> FundusFactors."""
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or reader.fieldnames[0] != "image":
                raise RetinagenError(f"{path}: not a factors.csv (first column must be 'image')")
            return {row["image"]: FundusFactors.from_row(row) for row in reader}
    except OSError as e:
        raise RetinagenError(f"{path}: cannot read factors ({e.strerror})") from None
