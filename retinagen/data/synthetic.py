"""Procedural synthetic fundus photographs with ground-truth factors: the built-in dataset.

Every image is rendered from a :class:`FundusFactors` record, so the factors that a GAN should
discover (pigmentation, glare, field-of-view shape, exposure, vessels, disc position, DR lesions)
are known exactly and can score MIG / ACM without a human. Rendering is numpy + OpenCV at the
target resolution (no 1024 px render downsampled); ``benchmarks/synth_throughput.py`` measures its speed.

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
import io
import itertools
import json
import math
import multiprocessing
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from retinagen.dr_scale import NUM_GRADES
from retinagen.errors import ConfigError, RetinagenError
from retinagen.fileio import atomic_write_json, atomic_write_text
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

# EyePACS training set: grades {0: 25810, 1: 2443, 2: 5292, 3: 873, 4: 708} of 35,126 images.
DEFAULT_GRADE_PROBS: tuple[float, ...] = (0.735, 0.069, 0.151, 0.025, 0.020)

MAX_SEED = 2**31 - 1
MIN_RESOLUTION = 16
MAX_RESOLUTION = 1024
JPEG_QUALITY = 95
SYNTH_FORMAT = "retinagen-synthfundus"
SYNTH_FORMAT_VERSION = 1
LATERALITY_CODES: dict[str, int] = {"left": 0, "right": 1}

# Lesion counts per DR grade, inclusive (low, high). Both ends never decrease with the grade, so
# for a fixed random draw a higher grade never has fewer lesions of any type (renders nest).
LESION_COUNT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "microaneurysms": ((0, 0), (1, 5), (3, 12), (6, 20), (8, 25)),
    "haemorrhages": ((0, 0), (0, 0), (1, 6), (8, 20), (8, 24)),
    "exudates": ((0, 0), (0, 0), (0, 10), (4, 25), (4, 30)),
    "cotton_wool_spots": ((0, 0), (0, 0), (0, 2), (1, 5), (1, 6)),
    "neovascular_tufts": ((0, 0), (0, 0), (0, 0), (0, 0), (1, 3)),
}
_LESION_TYPES = tuple(LESION_COUNT_RANGES)
_MAX_LESIONS = {k: v[-1][1] for k, v in LESION_COUNT_RANGES.items()}

# name -> (low, high), inclusive; the documented range of every factors.csv column.
FACTOR_RANGES: dict[str, tuple[float, float]] = {
    "laterality": (0, 1),
    "grade": (0, 4),
    "pigmentation": (0.0, 1.0),
    "tigroid": (0.0, 1.0),
    "glare": (0.0, 1.0),
    "brightness": (0.0, 1.0),
    "fov_radius": (0.80, 1.0),
    "fov_cut": (0.0, 0.30),
    "notch": (0, 1),
    "vessel_seed": (0, MAX_SEED),
    "vessel_density": (0.0, 1.0),
    "vessel_contrast": (0.0, 1.0),
    "disc_x": (-0.70, 0.70),
    "disc_y": (-0.15, 0.15),
    **{k: (0, float(_MAX_LESIONS[k])) for k in _LESION_TYPES},
    "lesion_count": (0, float(sum(_MAX_LESIONS.values()))),
    "texture_seed": (0, MAX_SEED),
}
_DISC_ABS_X = (0.35, 0.70)  # |disc_x|: nasal offset of the disc from the image centre
_INT_FACTORS = frozenset(
    {"laterality", "grade", "notch", "vessel_seed", "texture_seed", "lesion_count", *_LESION_TYPES}
)


class SynthArgumentError(ConfigError, ValueError):
    """A bad argument to the synthetic generator (``n``, ``resolution``, ``grade_probs``, a factor)."""


# --------------------------------------------------------------------------------------------------
# Factors


@dataclass(frozen=True)
class FundusFactors:
    """Every ground-truth factor of one synthetic fundus image; see the module docstring.

    Together with the resolution these fully determine the rendered pixels (the seeds drive all
    remaining randomness), so ``render_fundus(f, R)`` is a pure function.
    """

    laterality: str
    grade: int
    pigmentation: float
    tigroid: float
    glare: float
    brightness: float
    fov_radius: float
    fov_cut: float
    notch: int
    vessel_seed: int
    vessel_density: float
    vessel_contrast: float
    disc_x: float
    disc_y: float
    microaneurysms: int
    haemorrhages: int
    exudates: int
    cotton_wool_spots: int
    neovascular_tufts: int
    texture_seed: int

    def __post_init__(self) -> None:
        if self.laterality not in LATERALITY_CODES:
            raise SynthArgumentError(f"laterality must be 'left' or 'right', got {self.laterality!r}")
        for f in fields(self):
            if f.name == "laterality":
                continue
            value = getattr(self, f.name)
            lo, hi = FACTOR_RANGES[f.name]
            if f.name in _INT_FACTORS:
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise SynthArgumentError(f"factor {f.name} must be an integer, got {value!r}")
            elif not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise SynthArgumentError(f"factor {f.name} must be a finite number, got {value!r}")
            if not lo <= value <= hi:
                raise SynthArgumentError(f"factor {f.name}={value!r} is outside its range [{lo}, {hi}]")
        side = 1.0 if self.laterality == "right" else -1.0
        if not _DISC_ABS_X[0] - 1e-9 <= side * self.disc_x <= _DISC_ABS_X[1] + 1e-9:
            raise SynthArgumentError(
                f"disc_x={self.disc_x!r} does not fit a {self.laterality} eye: the disc is nasal, "
                f"{'+' if side > 0 else '-'}[{_DISC_ABS_X[0]}, {_DISC_ABS_X[1]}]"
            )
        for k in _LESION_TYPES:
            lo, hi = LESION_COUNT_RANGES[k][self.grade]
            if not lo <= getattr(self, k) <= hi:
                raise SynthArgumentError(
                    f"factor {k}={getattr(self, k)} is outside [{lo}, {hi}] for grade {self.grade}"
                )

    @property
    def lesion_count(self) -> int:
        return int(sum(getattr(self, k) for k in _LESION_TYPES))

    @property
    def side(self) -> float:
        """+1 for a right eye (disc right of centre), -1 for a left eye."""
        return 1.0 if self.laterality == "right" else -1.0

    def as_row(self) -> dict[str, int | float]:
        """The factors.csv row (without ``image``): every key of FACTOR_RANGES, in that order, numeric."""
        row: dict[str, int | float] = {}
        for name in FACTOR_RANGES:
            if name == "laterality":
                row[name] = LATERALITY_CODES[self.laterality]
            elif name == "lesion_count":
                row[name] = self.lesion_count
            elif name in _INT_FACTORS:
                row[name] = int(getattr(self, name))
            else:
                row[name] = float(getattr(self, name))
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FundusFactors:
        """Inverse of :meth:`as_row` (accepts the strings csv.DictReader yields)."""
        try:
            kwargs: dict[str, Any] = {}
            for f in fields(cls):
                raw = row[f.name]
                if f.name == "laterality":
                    code = int(float(raw))
                    kwargs[f.name] = {v: k for k, v in LATERALITY_CODES.items()}[code]
                elif f.name in _INT_FACTORS:
                    kwargs[f.name] = int(float(raw))
                else:
                    kwargs[f.name] = float(raw)
        except (KeyError, ValueError) as e:
            raise SynthArgumentError(f"factors row is missing or has a bad value: {e}") from None
        factors = cls(**kwargs)
        if "lesion_count" in row and int(float(row["lesion_count"])) != factors.lesion_count:
            raise SynthArgumentError("factors row: lesion_count is not the sum of the lesion counts")
        return factors


def _check_grade_probs(grade_probs: Sequence[float]) -> np.ndarray:
    if isinstance(grade_probs, (str, bytes)):
        raise SynthArgumentError(
            f"grade_probs must be a sequence of 5 numbers, got the string {grade_probs!r}"
        )
    try:
        p = np.asarray([float(x) for x in grade_probs], dtype=np.float64)
    except (TypeError, ValueError):
        raise SynthArgumentError(f"grade_probs must be 5 numbers, got {grade_probs!r}") from None
    if p.shape != (5,):
        raise SynthArgumentError(f"grade_probs must have 5 entries (DR grades 0-4), got {len(p)}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise SynthArgumentError(f"grade_probs must be non-negative finite numbers, got {tuple(p.tolist())}")
    if abs(p.sum() - 1.0) > 1e-6:
        raise SynthArgumentError(f"grade_probs must sum to 1 (within 1e-6), got sum {p.sum():.8g}")
    return p


def _draw_grade(u: float, p: np.ndarray) -> int:
    """Inverse CDF of ``p`` at ``u`` in [0, 1); never a grade of probability 0."""
    # The cap catches a u past a cumulative sum of 1 - 1e-7 (sums are only checked to 1e-6).
    last = int(np.flatnonzero(p > 0)[-1])
    return int(min(np.searchsorted(np.cumsum(p), u, side="right"), last))


def _lesion_count(kind: str, grade: int, u: float) -> int:
    lo, hi = LESION_COUNT_RANGES[kind][grade]
    return min(hi, lo + int(u * (hi - lo + 1)))


def sample_factors(
    rng: np.random.Generator,
    grade_probs: Sequence[float] = DEFAULT_GRADE_PROBS,
    *,
    laterality: str | None = None,
    grade: int | None = None,
) -> FundusFactors:
    """Draw one image's factors, each independently of the others.

    Continuous factors are uniform on their FACTOR_RANGES range, except ``fov_cut`` (0 with
    probability 0.4, else uniform on [0.02, 0.30]); ``notch`` is 1 with probability 0.3; lesion
    counts are uniform on their grade's LESION_COUNT_RANGES.

    ``laterality`` ("left"/"right") and ``grade`` (0-4) fix those factors. The generator is advanced
    by the same number of draws either way, so the same ``rng`` state with only ``grade`` changed
    yields the same image apart from its lesions (lesions nest: a higher grade adds, never removes).
    """
    p = _check_grade_probs(grade_probs)
    if laterality is not None and laterality not in LATERALITY_CODES:
        raise SynthArgumentError(f"laterality must be 'left', 'right' or None, got {laterality!r}")
    if grade is not None and (isinstance(grade, bool) or grade not in range(NUM_GRADES)):
        raise SynthArgumentError(f"grade must be an integer 0-4 or None, got {grade!r}")
    u = rng.random(16)
    seeds = rng.integers(0, MAX_SEED, size=2, endpoint=True)
    lat = laterality if laterality is not None else ("right" if u[0] < 0.5 else "left")
    g = grade if grade is not None else _draw_grade(float(u[1]), p)
    side = 1.0 if lat == "right" else -1.0
    # EyePACS mixes cameras: about 40 % full circles, the rest cut by the frame.
    fov_cut = 0.0 if u[7] < 0.4 else 0.02 + 0.28 * (u[7] - 0.4) / 0.6
    lesion_u = u[11:16]
    counts = {k: _lesion_count(k, g, float(lesion_u[i])) for i, k in enumerate(_LESION_TYPES)}
    return FundusFactors(
        laterality=lat,
        grade=g,
        pigmentation=float(u[2]),
        tigroid=float(u[3]),
        glare=float(u[4]),
        brightness=float(u[5]),
        fov_radius=float(0.80 + 0.20 * u[6]),
        fov_cut=float(fov_cut),
        notch=int(u[8] < 0.3),
        vessel_seed=int(seeds[0]),
        vessel_density=float(u[9]),
        vessel_contrast=float(u[10]),
        disc_x=float(side * (_DISC_ABS_X[0] + (_DISC_ABS_X[1] - _DISC_ABS_X[0]) * rng.random())),
        disc_y=float(-0.15 + 0.30 * rng.random()),
        texture_seed=int(seeds[1]),
        **counts,
    )


def sample_patient_factors(
    rng: np.random.Generator, grade_probs: Sequence[float] = DEFAULT_GRADE_PROBS, n_eyes: int = 2
) -> list[FundusFactors]:
    """Factors for one patient's eyes (left first): correlated like EyePACS pairs.

    Both eyes share the camera (FOV shape, notch), the pigmentation base (+-0.03), a similar
    exposure, vessel density and disc height, and mirrored laterality. Each eye's grade equals the
    patient's grade with probability 0.75 and is otherwise redrawn, so the marginal grade
    distribution stays exactly ``grade_probs``.
    """
    if n_eyes not in (1, 2):
        raise SynthArgumentError(f"n_eyes must be 1 or 2, got {n_eyes!r}")
    p = _check_grade_probs(grade_probs)
    u = rng.random(4)
    patient_grade = _draw_grade(float(u[0]), p)
    grades = [patient_grade if u[1 + i] < 0.75 else _draw_grade(float(rng.random()), p) for i in range(2)]
    left = sample_factors(rng, p, laterality="left", grade=grades[0])
    right = sample_factors(rng, p, laterality="right", grade=grades[1])
    jitter = rng.normal(0.0, 1.0, size=5)
    right = replace(
        right,
        pigmentation=float(np.clip(left.pigmentation + 0.03 * jitter[0], 0.0, 1.0)),
        tigroid=float(np.clip(left.tigroid + 0.10 * jitter[1], 0.0, 1.0)),
        brightness=float(np.clip(left.brightness + 0.10 * jitter[2], 0.0, 1.0)),
        vessel_density=float(np.clip(left.vessel_density + 0.10 * jitter[3], 0.0, 1.0)),
        disc_y=float(np.clip(left.disc_y + 0.03 * jitter[4], -0.15, 0.15)),
        fov_radius=left.fov_radius,
        fov_cut=left.fov_cut,
        notch=left.notch,
    )
    return [left, right][:n_eyes]


# --------------------------------------------------------------------------------------------------
# Rendering helpers

_SHIFT = 4  # OpenCV drawing: coordinates in 1/16 pixel, for sub-pixel anti-aliased lines/circles
_SCALE = float(1 << _SHIFT)
_N_THETA = 72  # tigroid stripes around the circle
_N_RHO = 12


@lru_cache(maxsize=16)
def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x [1, R], y [R, 1], radius [R, R], and the tigroid polar remap maps [R, R] (float32)."""
    c = ((np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2.0 - 1.0).astype(np.float32)
    x, y = c[None, :], c[:, None]
    rad = np.sqrt(x * x + y * y).astype(np.float32)
    theta = np.arctan2(y, x)
    map_x = ((theta + np.pi) / (2 * np.pi) * _N_THETA).astype(np.float32)
    map_y = (rad / 1.5 * (_N_RHO - 1)).astype(np.float32)
    for a in (x, y, rad, map_x, map_y):
        a.setflags(write=False)
    return x, y, rad, map_x, map_y


def _to_px(pts: np.ndarray, resolution: int) -> np.ndarray:
    """Normalised [-1, 1] coordinates -> int32 fixed-point pixel coordinates for cv2 ``shift``."""
    return np.round(((pts + 1.0) * (0.5 * resolution) - 0.5) * _SCALE).astype(np.int32)


def _anatomy(f: FundusFactors) -> tuple[np.ndarray, np.ndarray, float]:
    """Disc centre, macula centre (normalised coordinates), and the anatomical scale."""
    s = f.fov_radius
    disc = np.array([f.disc_x, f.disc_y])
    # The fovea lies ~2.5 disc diameters temporal to the disc and slightly below it.
    macula = disc + np.array([-f.side * 0.70 * s, 0.05 * s])
    return disc, macula, s


def _first_bad(pts: np.ndarray, macula: np.ndarray, faz: float) -> np.ndarray:
    """Per path [..., n, 2]: the number of leading points inside the image and outside the fovea.

    A path is cut where it leaves the image or enters the foveal avascular zone.
    """
    bad = (np.abs(pts).max(axis=-1) > 1.05) | (((pts - macula) ** 2).sum(axis=-1) < faz * faz)
    bad[..., 0] = False
    n = pts.shape[-2]
    return np.where(bad.any(axis=-1), bad.argmax(axis=-1), n)


def _walk(start: np.ndarray, headings: np.ndarray, step: np.ndarray | float) -> np.ndarray:
    """Paths [..., n+1, 2] from ``start`` [..., 2] taking steps of length ``step`` at ``headings`` [..., n]."""
    steps = np.stack([np.cos(headings), np.sin(headings)], axis=-1) * np.asarray(step)[..., None, None]
    return np.concatenate([start[..., None, :], start[..., None, :] + np.cumsum(steps, axis=-2)], axis=-2)


_K1_MAX = 8  # side branches per main vessel
_K2_MAX = 3  # sub-branches per side branch
_K3_MAX = 2  # twigs per sub-branch
_N0 = 30  # path points of a main vessel
_N1 = 14  # path steps of a side branch
_N2 = 8  # path steps of a sub-branch
_N3 = 5  # path steps of a twig

# A vessel drawn as polylines: (fixed-point pixel points [n, 2] int32, width in px, is vein).
_Polyline = tuple[np.ndarray, float, bool]


def _main_vessel(
    rng: np.random.Generator,
    temporal: bool,
    vert: float,
    disc: np.ndarray,
    macula: np.ndarray,
    side: float,
    s: float,
) -> np.ndarray:
    """Path [n, 2] of one main vessel from the disc, in normalised coordinates.

    The superior (``vert`` = -1) and inferior vessels share a short vertical trunk from the disc
    centre, as the central retinal artery and vein divide on the disc.
    """
    u = rng.random(8)
    centre = disc
    disc = disc + np.array([0.0, vert * 0.045 * s])
    d = disc - macula
    r0 = float(np.hypot(d[0], d[1]))
    theta0 = float(np.arctan2(d[1], d[0]))
    if temporal:
        # Arcade: an arch over/under the macula, r(phi) = r0 (1 - c sin phi), then a tail that relaxes
        # towards the temporal horizontal, so the two arcades diverge (an open "C" around the macula).
        big_phi = 1.35 + 0.45 * u[1]
        phi = np.linspace(0.0, big_phi, 17)
        c = 0.24 + 0.14 * u[2]
        wobble = 1.0 + 0.03 * np.sin(phi * (2.0 + 3.0 * u[3]) + 6.28 * u[4])
        r = r0 * (1.0 - c * np.sin(phi)) * wobble
        sweep = vert * (1.0 if np.cos(theta0) >= 0 else -1.0)
        ang = theta0 + sweep * phi
        arch = macula + np.stack([r * np.cos(ang), r * np.sin(ang)], axis=-1)
        tangent = arch[-1] - arch[-2]
        h = float(np.arctan2(tangent[1], tangent[0]))
        target = (np.pi if side > 0 else 0.0) - side * vert * (0.1 + 0.3 * u[6])
        h = target + math.remainder(h - target, 2 * np.pi)
        k = np.arange(_N0 - 18)
        tail_h = target + (h - target) * np.exp(-k / 5.0) + np.cumsum(rng.normal(0.0, 0.04, k.size))
        tail = _walk(arch[-1], tail_h, (0.45 + 0.25 * u[5]) * s / k.size)
        return np.concatenate([centre[None], arch, tail[1:]], axis=0)
    # Nasal vessel: leaves the disc up/down-nasally and relaxes towards the nasal horizontal.
    target = 0.0 if side > 0 else np.pi
    h0 = target + math.remainder(float(np.arctan2(vert * (0.9 + 0.9 * u[1]), side * 1.0)) - target, 2 * np.pi)
    k = np.arange(_N0 - 2)
    heads = target + (h0 - target) * np.exp(-k / (8 + 10 * u[2])) + np.cumsum(rng.normal(0, 0.04, k.size))
    return np.concatenate([centre[None], _walk(disc, heads, (0.8 + 0.3 * u[3]) * s / k.size)], axis=0)


def _branches(
    parent: np.ndarray,
    parent_len: np.ndarray,
    w_parent: tuple[np.ndarray, np.ndarray],
    u: np.ndarray,
    noise: np.ndarray,
    length: np.ndarray,
    tortuosity: float,
    centre: np.ndarray,
    macula: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Side branches of paths ``parent`` [..., n, 2] (valid length ``parent_len`` [...]).

    ``u`` [..., K, 5] uniforms, ``noise`` [..., K, m] normals. Each branch leaves at a random point,
    30-75 degrees off the parent's direction, with 40-70 % of the parent's width there, then bends
    into the local flow: away from the posterior pole ``centre``, or towards the fovea for branches
    that start out heading to it (real branches converge on the macula).
    Returns (paths [..., K, m+1, 2], start width [..., K]).
    """
    t = 0.12 + 0.83 * u[..., 0]
    last = np.maximum(parent_len - 2, 0)[..., None]
    i = np.minimum((t * (parent_len[..., None] - 1)).astype(np.int64), last)
    start = np.take_along_axis(parent, i[..., None], axis=-2)
    nxt = np.take_along_axis(parent, (i + 1)[..., None], axis=-2)
    dvec = nxt - start
    h = np.arctan2(dvec[..., 1], dvec[..., 0]) + np.where(u[..., 1] < 0.5, 1.0, -1.0) * (
        0.5 + 0.8 * u[..., 2]
    )
    out_dir = start - centre
    to_mac = macula - start
    h_out = np.arctan2(out_dir[..., 1], out_dir[..., 0])
    h_mac = np.arctan2(to_mac[..., 1], to_mac[..., 0])
    inward = np.cos(h - h_mac) > 0.5
    target = np.where(inward, h_mac, h_out)
    target = h + np.remainder(target - h + np.pi, 2 * np.pi) - np.pi  # the nearer turn
    k = np.arange(noise.shape[-1])
    heads = (
        target[..., None]
        + (h - target)[..., None] * np.exp(-k / 9.0)
        + np.cumsum(tortuosity * noise, axis=-1)
    )
    frac = i / np.maximum(parent_len[..., None] - 1, 1)
    w0 = (w_parent[0][..., None] + (w_parent[1] - w_parent[0])[..., None] * frac) * (0.4 + 0.3 * u[..., 3])
    return _walk(start, heads, length / noise.shape[-1]), w0


def _vessel_polylines(f: FundusFactors, resolution: int) -> list[_Polyline]:
    """The retinal vessel tree as pixel polylines.

    Eight main vessels (artery + vein for the superior/inferior temporal arcades, which arch around
    the macula, and for the superior/inferior nasal vessels) leave the disc; each grows up to
    ``_K1_MAX`` side branches with up to ``_K2_MAX`` sub-branches of up to ``_K3_MAX`` twigs. The geometry is computed in
    normalised coordinates (independent of resolution). All draws of a main vessel come from its own
    generator in fixed-size blocks, so a denser tree contains the sparser one.
    """
    disc, macula, s = _anatomy(f)
    faz = 0.07 * s
    k1 = round(2 + (_K1_MAX - 2) * f.vessel_density)
    k2 = round(_K2_MAX * f.vessel_density)
    k3 = round(_K3_MAX * f.vessel_density)
    mains, keys = [], []
    blocks = []
    for j, (vert, vein, temporal) in enumerate(
        (v, vn, t) for v in (-1.0, 1.0) for vn in (False, True) for t in (True, False)
    ):
        rng = np.random.default_rng([f.vessel_seed, j])
        mains.append(_main_vessel(rng, temporal, vert, disc, macula, f.side, s))
        keys.append(vein)
        # Fixed-size draws for every candidate branch, used or not (nesting, see above).
        blocks.append(
            (
                rng.random(),
                rng.random((_K1_MAX, 5)),
                rng.normal(0.0, 1.0, (_K1_MAX, _N1)),
                rng.random((_K1_MAX, _K2_MAX, 5)),
                rng.normal(0.0, 1.0, (_K1_MAX, _K2_MAX, _N2)),
                rng.random((_K1_MAX, _K2_MAX, _K3_MAX, 5)),
                rng.normal(0.0, 1.0, (_K1_MAX, _K2_MAX, _K3_MAX, _N3)),
            )
        )
    main = np.stack(mains)  # [8, N0, 2]
    vein = np.array(keys)
    main_len = _first_bad(main, macula, faz)
    w0 = np.where(vein, 0.019, 0.014) * s * (0.9 + 0.2 * np.array([b[0] for b in blocks]))
    w1 = 0.4 * w0
    b1, n1, b2, n2, b3, n3 = (np.stack([b[i] for b in blocks]) for i in range(1, 7))
    b1, n1 = b1[:, :k1], n1[:, :k1]
    b2, n2 = b2[:, :k1, :k2], n2[:, :k1, :k2]
    b3, n3 = b3[:, :k1, :k2, :k3], n3[:, :k1, :k2, :k3]
    centre = 0.6 * disc + 0.4 * macula
    kids, kid_w0 = _branches(
        main, main_len, (w0, w1), b1, n1, (0.3 + 0.45 * b1[..., 4]) * s, 0.08, centre, macula
    )
    kid_len = _first_bad(kids, macula, faz)
    subs, sub_w0 = _branches(
        kids, kid_len, (kid_w0, 0.5 * kid_w0), b2, n2, (0.12 + 0.2 * b2[..., 4]) * s, 0.07, centre, macula
    )
    sub_len = np.where((kid_len >= 3)[..., None], _first_bad(subs, macula, faz), 0)
    twigs, twig_w0 = _branches(
        subs,
        np.maximum(sub_len, 2),
        (sub_w0, 0.5 * sub_w0),
        b3,
        n3,
        (0.06 + 0.1 * b3[..., 4]) * s,
        0.1,
        centre,
        macula,
    )
    twig_len = np.where((sub_len >= 3)[..., None], _first_bad(twigs, macula, faz), 0)

    half = 0.5 * resolution
    out: list[_Polyline] = []
    main_px = _to_px(main, resolution)
    for j in range(len(main)):
        n = int(main_len[j])
        bounds = np.linspace(0, n - 1, 5).round().astype(int)  # 4 pieces, tapering
        for a, b in itertools.pairwise(bounds.tolist()):
            if b > a:
                w = w0[j] + (w1[j] - w0[j]) * ((a + b) / 2) / max(n - 1, 1)
                out.append((main_px[j, a : b + 1], float(w * half), bool(vein[j])))
    # Branches of every level: one constant width each (their taper is sub-pixel).
    for paths, lengths, widths in (
        (kids, kid_len, kid_w0),
        (subs, sub_len, sub_w0),
        (twigs, twig_len, twig_w0),
    ):
        is_vein = np.broadcast_to(vein.reshape((-1,) + (1,) * (lengths.ndim - 1)), lengths.shape)
        keep = lengths >= 2
        pts = _to_px(paths[keep], resolution)
        for p, n, w, v in zip(
            pts,
            lengths[keep].tolist(),
            (0.75 * half * widths[keep]).tolist(),
            is_vein[keep].tolist(),
            strict=True,
        ):
            out.append((p[:n], w, v))
    return out


def _draw_vessels(polylines: Iterable[_Polyline], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise the tree: artery and vein coverage maps, uint8 [R, R] (255 = full vessel).

    A vessel thinner than a pixel is drawn 1 px wide with coverage equal to its width, which is
    what an ideal area-averaging camera would record; polylines are batched by (thickness, coverage).
    """
    groups: dict[tuple[bool, int, int], list[np.ndarray]] = {}
    for pts, w, vein in polylines:
        key = (vein, int(w + 0.5) or 1, 8 if w >= 1.0 else (int(8 * w + 0.5) or 1))
        group = groups.get(key)
        if group is None:
            groups[key] = [pts]
        else:
            group.append(pts)
    art = np.zeros((resolution, resolution), np.uint8)
    ven = np.zeros((resolution, resolution), np.uint8)
    # Fainter first, so a strong vessel crossing a faint one wins.
    for (vein, thick, cov), lines in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        cv2.polylines(ven if vein else art, lines, False, int(cov * 255 // 8), thick, cv2.LINE_AA, _SHIFT)
    return art, ven


def _soft_clamp_into_fov(pts: np.ndarray, f: FundusFactors) -> np.ndarray:
    """Squash points smoothly into the visible field of view (elementwise, so prefixes are kept)."""
    rv = 0.88 * f.fov_radius
    yv = 0.9 * f.fov_radius * (1.0 - f.fov_cut)
    rho = np.hypot(pts[:, 0], pts[:, 1]) + 1e-9
    pts = pts * (rv * np.tanh(rho / rv) / rho)[:, None]
    pts[:, 1] = yv * np.tanh(pts[:, 1] / yv)
    return pts


def _push_off_disc(pts: np.ndarray, disc: np.ndarray, radius: float) -> np.ndarray:
    d = pts - disc
    dist = np.hypot(d[:, 0], d[:, 1]) + 1e-9
    scale = np.maximum(1.0, radius / dist)
    return disc + d * scale[:, None]


def _circle(canvas: np.ndarray, c: np.ndarray, r_px: float, resolution: int, value: float) -> None:
    """Anti-aliased filled disc; sub-pixel radii keep their area (dimmer, not bigger)."""
    value = value * min(1.0, (r_px / 0.7) ** 2)
    r_px = max(r_px, 0.7)
    centre = _to_px(c[None], resolution)[0]
    cv2.circle(
        canvas,
        (int(centre[0]), int(centre[1])),
        int(round(r_px * _SCALE)),
        int(255 * value),
        -1,
        cv2.LINE_AA,
        _SHIFT,
    )


def _draw_lesions(f: FundusFactors, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Red (microaneurysms, haemorrhages, new vessels), yellow (exudates), pale (cotton wool) maps.

    Positions and shapes come from fixed-size draws per lesion type, so the first k lesions of a
    type do not depend on how many are drawn.
    """
    if f.lesion_count == 0:
        return None
    disc, macula, s = _anatomy(f)
    half = 0.5 * resolution
    rng = np.random.default_rng([f.texture_seed, 2])
    red = np.zeros((resolution, resolution), np.uint8)
    yellow = np.zeros_like(red)
    pale = np.zeros_like(red)
    disc_clear = 0.16 * s

    # Microaneurysms: tiny sharp red dots clustered over the posterior pole.
    m = _MAX_LESIONS["microaneurysms"]
    pos = _push_off_disc(_soft_clamp_into_fov(macula + rng.normal(0, 0.32 * s, (m, 2)), f), disc, disc_clear)
    rad = (0.007 + 0.006 * rng.random(m)) * s * half
    for i in range(f.microaneurysms):
        _circle(red, pos[i], rad[i], resolution, 0.95)

    # Dot/blot haemorrhages (round/irregular) and flame haemorrhages (along the nerve fibres).
    m = _MAX_LESIONS["haemorrhages"]
    pos = _push_off_disc(_soft_clamp_into_fov(macula + rng.normal(0, 0.42 * s, (m, 2)), f), disc, disc_clear)
    hu = rng.random((m, 4))
    for i in range(f.haemorrhages):
        r = (0.014 + 0.026 * hu[i, 0]) * s * half
        flame = hu[i, 1] < 0.35
        if flame:
            radial = pos[i] - disc
            angle = math.degrees(math.atan2(radial[1], radial[0]))
            axes = (r * 1.9, r * 0.55)
        else:
            angle = 360.0 * hu[i, 2]
            axes = (r, r * (0.65 + 0.35 * hu[i, 3]))
        if max(axes) < 0.8:
            _circle(red, pos[i], max(axes), resolution, 0.8)
            continue
        c = _to_px(pos[i][None], resolution)[0]
        ax = (max(1, int(axes[0] * _SCALE)), max(1, int(axes[1] * _SCALE)))
        cv2.ellipse(red, (int(c[0]), int(c[1])), ax, angle, 0, 360, 230, -1, cv2.LINE_AA, _SHIFT)

    # Hard exudates: yellow waxy specks in clusters of 5 around the macula (circinate pattern).
    m = _MAX_LESIONS["exudates"]
    n_clusters = (m + 4) // 5
    ring = rng.random((n_clusters, 2))
    centres = (
        macula
        + np.stack([np.cos(6.283 * ring[:, 0]), np.sin(6.283 * ring[:, 0])], axis=-1)
        * ((0.12 + 0.3 * ring[:, 1]) * s)[:, None]
    )
    offsets = rng.normal(0, 0.035 * s, (m, 2))
    pos = _push_off_disc(_soft_clamp_into_fov(centres[np.arange(m) // 5] + offsets, f), disc, disc_clear)
    rad = (0.008 + 0.012 * rng.random(m)) * s * half
    for i in range(f.exudates):
        _circle(yellow, pos[i], rad[i], resolution, 1.0)

    # Cotton-wool spots: pale fluffy patches near the disc along the arcades (blurred below).
    m = _MAX_LESIONS["cotton_wool_spots"]
    cu = rng.random((m, 4))
    ang = np.where(cu[:, 0] < 0.5, -1.0, 1.0) * (0.5 + 1.2 * cu[:, 1]) * np.pi / 2
    ang = ang + (0.0 if f.side < 0 else np.pi)
    pos = _soft_clamp_into_fov(
        disc + np.stack([np.cos(ang), np.sin(ang)], -1) * ((0.22 + 0.3 * cu[:, 2]) * s)[:, None], f
    )
    for i in range(f.cotton_wool_spots):
        r = (0.022 + 0.018 * cu[i, 3]) * s * half
        for dx, dy in ((0.0, 0.0), (0.5, 0.2), (-0.3, 0.45)):
            _circle(pale, pos[i] + np.array([dx, dy]) * r / half, r * 0.7, resolution, 0.75)

    # Neovascular tufts (grade 4): tangles of fine tortuous vessels on/near the disc or an arcade.
    m = _MAX_LESIONS["neovascular_tufts"]
    nu = rng.random((m, 2))
    noise = rng.normal(0, 1.0, (m, 7, 12))
    start_h = rng.random((m, 7)) * 2 * np.pi
    centres = _soft_clamp_into_fov(
        disc
        + np.stack([np.cos(6.283 * nu[:, 0]), np.sin(6.283 * nu[:, 0])], axis=-1)
        * ((0.05 + 0.3 * nu[:, 1]) * s)[:, None],
        f,
    )
    for i in range(f.neovascular_tufts):
        lines = [
            _to_px(_walk(centres[i], start_h[i, k] + np.cumsum(0.7 * noise[i, k]), 0.012 * s), resolution)
            for k in range(7)
        ]
        cov = 255 if 0.006 * s * half >= 1 else int(255 * max(0.35, 0.006 * s * half))
        cv2.polylines(red, lines, False, cov, 1, cv2.LINE_AA, _SHIFT)

    if f.cotton_wool_spots:
        sigma = max(0.6, 0.009 * s * half)
        pale = cv2.GaussianBlur(pale, (0, 0), sigma)
    if resolution >= 128:  # soften the polygonal look of small anti-aliased discs
        red = cv2.GaussianBlur(red, (3, 3), 0)
        yellow = cv2.GaussianBlur(yellow, (3, 3), 0)
    return red, yellow, pale


# Fundus base colours (linear-ish RGB in [0, 1]) for pigmentation 0 and 1.
_LIGHT = np.array([0.88, 0.37, 0.22], np.float32)
_DARK = np.array([0.52, 0.19, 0.10], np.float32)
_VEIN_ABSORB = np.array([0.36, 0.62, 0.52], np.float32)
_ARTERY_ABSORB = np.array([0.18, 0.40, 0.33], np.float32)
_RED_LESION_ABSORB = np.array([0.40, 0.75, 0.68], np.float32)
_EXUDATE = np.array([0.98, 0.88, 0.45], np.float32)
_COTTON_WOOL = np.array([0.95, 0.85, 0.66], np.float32)
_DISC_RIM = np.array([0.98, 0.70, 0.42], np.float32)
_DISC_CUP = np.array([1.00, 0.88, 0.66], np.float32)
_GLARE = np.array([0.80, 0.86, 0.92], np.float32)


def _fov_mask(f: FundusFactors, resolution: int) -> np.ndarray:
    """Anti-aliased field-of-view coverage [R, R] in [0, 1]: circle, frame cut, notch."""
    x, y, rad, _, _ = _grid(resolution)
    px = 0.5 * resolution  # pixels per normalised unit
    r = f.fov_radius
    mask = np.clip((r - rad) * px + 0.5, 0.0, 1.0)
    if f.fov_cut > 0:
        # A hard, pixel-aligned edge: the camera frame cuts whole sensor rows (see crop_to_frame).
        first = _frame_cut_rows(f, resolution)
        mask[:first] = 0.0
        mask[resolution - first :] = 0.0
    if f.notch:
        # A small square bite out of the rim at about 1-2 o'clock (a camera orientation mark).
        a = np.deg2rad(-48.0)
        cx, cy, half_side = r * np.cos(a), r * np.sin(a), 0.045
        inside = np.clip((half_side - np.abs(x - cx)) * px + 0.5, 0, 1) * np.clip(
            (half_side - np.abs(y - cy)) * px + 0.5, 0, 1
        )
        mask *= 1.0 - inside
    return mask.astype(np.float32)


def _gauss_into(
    acc: np.ndarray, x: np.ndarray, y: np.ndarray, cx: float, cy: float, sigma: float, amp: float
) -> None:
    """``acc += amp * exp(-|p - c|^2 / 2 sigma^2)``, evaluated only where it exceeds ~amp * 2e-3."""
    res = acc.shape[0]
    half = 0.5 * res
    reach = 3.5 * sigma
    i0, i1 = max(0, int((cy - reach + 1) * half)), min(res, int((cy + reach + 1) * half) + 1)
    j0, j1 = max(0, int((cx - reach + 1) * half)), min(res, int((cx + reach + 1) * half) + 1)
    if i0 >= i1 or j0 >= j1:
        return
    dx, dy = x[:, j0:j1] - cx, y[i0:i1] - cy
    acc[i0:i1, j0:j1] += amp * np.exp((dx * dx + dy * dy) * (-0.5 / (sigma * sigma)))


def _box(res: int, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
    half = 0.5 * res
    i0, i1 = max(0, int((cy - reach + 1) * half)), min(res, int((cy + reach + 1) * half) + 1)
    j0, j1 = max(0, int((cx - reach + 1) * half)), min(res, int((cx + reach + 1) * half) + 1)
    return slice(i0, max(i0, i1)), slice(j0, max(j0, j1))


def render_fundus(factors: FundusFactors, resolution: int) -> np.ndarray:
    """Render one synthetic fundus photograph.

    Args:
        factors: all ground truth (seeds included); see :class:`FundusFactors`.
        resolution: side R in pixels, 16 <= R <= 1024.
    Returns:
        uint8 RGB array [R, R, 3]; black (0) outside the field of view. Deterministic given
        (factors, resolution).
    """
    if not isinstance(factors, FundusFactors):
        raise SynthArgumentError(f"factors must be a FundusFactors, got {type(factors).__name__}")
    res = _check_resolution(resolution)
    f = factors
    x, y, rad, map_x, map_y = _grid(res)
    disc_a, macula_a, s = _anatomy(f)
    # Python floats, not numpy float64 scalars: those would promote the float32 maps to float64.
    dx_, dy_ = float(disc_a[0]), float(disc_a[1])
    mx_, my_ = float(macula_a[0]), float(macula_a[1])
    rng = np.random.default_rng([f.texture_seed, 1])
    tu = [float(v) for v in rng.random(4)]

    img = _paint_background(f, res, rng, x, y, rad, map_x, map_y, s, (dx_, dy_), (mx_, my_))
    rdx, rdy = _paint_disc(img, f, res, x, y, s, (dx_, dy_), tu)
    # Vessels (on top of the disc): veins darker and wider than arteries.
    art, ven = _draw_vessels(_vessel_polylines(f, res), res)
    if res >= 128:
        art = cv2.GaussianBlur(art, (3, 3), 0)
        ven = cv2.GaussianBlur(ven, (3, 3), 0)
    contrast = (0.45 + 0.55 * f.vessel_contrast) / 255.0
    img *= 1.0 - ven.astype(np.float32)[..., None] * (contrast * _VEIN_ABSORB)
    img *= 1.0 - art.astype(np.float32)[..., None] * (contrast * _ARTERY_ABSORB)

    # DR lesions.
    lesions = _draw_lesions(f, res)
    if lesions is not None:
        red, yellow, pale = (c.astype(np.float32) * np.float32(1 / 255.0) for c in lesions)
        img *= 1.0 - red[..., None] * _RED_LESION_ABSORB
        img = img * (1.0 - yellow[..., None]) + _EXUDATE * yellow[..., None]
        pale *= 0.7
        img = img * (1.0 - pale[..., None]) + _COTTON_WOOL * pale[..., None]

    # Exposure, straight into 8-bit scale.
    img *= 255.0 * (0.6 + 0.85 * f.brightness)

    if f.glare > 0:
        _paint_glare(img, f, rng, x, y, rad, s, (dx_, dy_), (mx_, my_), (rdx, rdy))

    # Sensor noise, then black outside the field of view.
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(0.008 * 255.0)
    img += 0.5  # round, not truncate, in the uint8 cast
    img *= _fov_mask(f, res)[..., None]
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


def _paint_background(f: FundusFactors, res: int, rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
                      rad: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, s: float, disc: tuple[float, float],
                      macula: tuple[float, float]) -> np.ndarray:
    """Float32 RGB [R, R, 3] of the fundus background: pigment colour and blotches, choroidal pattern,
    illumination and vignetting, macula and fovea (draws from ``rng`` in a fixed order)."""
    dx_, dy_ = disc
    mx_, my_ = macula
    # Background: pigmentation sets the colour, with slow colour blotches. Everything else that does
    # not depend on the channel is gathered into one luminance map ``lum`` first (fewer RGB passes).
    base = _LIGHT + (_DARK - _LIGHT) * np.float32(f.pigmentation)
    blotch = cv2.resize(
        rng.normal(0.0, 1.0, (5, 5, 3)).astype(np.float32), (res, res), interpolation=cv2.INTER_CUBIC
    )
    img = (blotch * np.float32(0.045) + np.float32(1.0)) * base
    # Choroidal (tigroid) pattern: dark inter-vascular spaces between radial choroidal vessels, seen
    # in the mid-periphery; the posterior pole stays smooth.
    polar = rng.normal(0.0, 1.0, (_N_RHO, _N_THETA)).astype(np.float32)
    stripes = cv2.remap(polar, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_WRAP)
    lum = np.clip(stripes - 0.2, 0.0, None)
    lum *= np.clip((rad - 0.25 * s) * (2.0 / s), 0.0, 1.0)
    lum *= -0.16 * f.tigroid
    lum += 1.0
    if res >= 96:  # fine choroidal grain, invisible (and skipped) at small sizes
        g = max(4, res // 6)
        grain = cv2.resize(
            rng.normal(0.0, 1.0, (g, g)).astype(np.float32), (res, res), interpolation=cv2.INTER_LINEAR
        )
        lum *= grain * np.float32(0.025) + np.float32(1.0)
    # Illumination: a brighter posterior pole ...
    pole = np.ones_like(lum)
    _gauss_into(pole, x, y, (dx_ + mx_) / 2, (dy_ + my_) / 2, 0.35 * s, 0.10)
    lum *= pole
    img *= lum[..., None]
    # ... and a darker, more saturated periphery (green/blue fall off faster than red).
    vig = np.minimum(rad * (1.0 / f.fov_radius), 1.05) ** 2.6
    img *= 1.0 - vig[..., None] * np.array([0.38, 0.62, 0.55], np.float32)

    # Macula and fovea: darker (macular pigment absorbs green/blue), stronger in pigmented eyes.
    mac = np.zeros_like(lum)
    _gauss_into(mac, x, y, mx_, my_, 0.13 * s, 0.75 + 0.5 * f.pigmentation)
    fovea = np.zeros_like(lum)
    _gauss_into(fovea, x, y, mx_, my_, 0.028 * s, 1.0)
    bi, bj = _box(res, mx_, my_, 3.5 * 0.13 * s)
    img[bi, bj] *= (
        1.0
        - mac[bi, bj, None] * np.array([0.26, 0.45, 0.38], np.float32)
        - fovea[bi, bj, None] * np.array([0.10, 0.15, 0.12], np.float32)
    )
    return img


def _paint_disc(img: np.ndarray, f: FundusFactors, res: int, x: np.ndarray, y: np.ndarray, s: float,
               disc: tuple[float, float], tu: list[float]) -> tuple[float, float]:
    """Paint the optic disc into ``img`` in place; returns its radii (x, y) in model units."""
    dx_, dy_ = disc
    px = 0.5 * res
    side = f.side
    # Optic disc: a bright yellowish, slightly tall ellipse with a paler cup offset temporally and a
    # faint bright halo; computed in the disc's bounding box only.
    rdx, rdy = (0.095 + 0.025 * tu[0]) * s, (0.105 + 0.025 * tu[0]) * s
    bi, bj = _box(res, dx_, dy_, 1.6 * rdy)
    xb, yb = x[:, bj], y[bi]
    e = np.sqrt(((xb - dx_) * (1.0 / rdx)) ** 2 + ((yb - dy_) * (1.0 / rdy)) ** 2)
    soft = max(0.3, 1.2 / (rdx * px))
    m_disc = np.clip((1.0 - e) * (1.0 / soft) + 0.5, 0.0, 1.0)
    halo = np.clip(1.0 - (e - 1.0) * 2.0, 0.0, 1.0) * (1.0 - m_disc) * 0.25
    cup_x, cup_y = dx_ - side * 0.25 * rdx, dy_ - 0.05 * rdy
    cup_r = (0.35 + 0.2 * tu[1]) * rdx
    ec = np.sqrt((xb - cup_x) ** 2 + (yb - cup_y) ** 2) * (1.0 / cup_r)
    m_cup = np.clip((1.0 - ec) * (1.0 / max(0.35, 1.5 / (cup_r * px))) + 0.5, 0.0, 1.0)
    disc_col = _DISC_RIM + (_DISC_CUP - _DISC_RIM) * m_cup[..., None]
    # Nasal disc margin a little pinker (more nerve fibres), temporal paler: shade across the disc.
    disc_col *= (1.0 - 0.08 * np.clip((xb - dx_) * (side / rdx), -1.0, 1.0))[..., None]
    patch = img[bi, bj]
    img[bi, bj] = patch * (1.0 - m_disc + 0.25 * halo)[..., None] + disc_col * m_disc[..., None]
    return rdx, rdy


def _paint_glare(img: np.ndarray, f: FundusFactors, rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
                rad: np.ndarray, s: float, disc: tuple[float, float], macula: tuple[float, float],
                disc_r: tuple[float, float]) -> None:
    """Add glare in place (not scaled by exposure)."""
    dx_, dy_ = disc
    mx_, my_ = macula
    rdx, rdy = disc_r
    side = f.side
    # Glare (not scaled by exposure): a hazy crescent at the rim plus specular spots on the disc,
    # the foveal reflex, and one broad haze patch.
    gu = [float(v) for v in rng.random(6)]
    ca, sa = math.cos(2 * math.pi * gu[0]), math.sin(2 * math.pi * gu[0])
    ang_w = (x * ca + y * sa) / np.maximum(rad, 1e-6) * 0.5 + 0.5  # cos(angle to the glare side)
    t = (f.fov_radius - rad) * (1.0 / (0.12 * s))
    haze = np.exp(-(t * t)) * ang_w**3 * 1.0
    _gauss_into(haze, x, y, dx_ - side * 0.3 * rdx, dy_ + 0.1 * rdy, 0.035 * s, 1.1)
    _gauss_into(haze, x, y, mx_, my_, 0.012 * s, 0.55)
    a = 2 * math.pi * gu[1]
    r_spot = (0.3 + 0.4 * gu[2]) * s
    _gauss_into(haze, x, y, math.cos(a) * r_spot, math.sin(a) * r_spot, 0.16 * s, 0.5)
    haze *= 255.0 * f.glare
    img += haze[..., None] * _GLARE


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise SynthArgumentError(f"resolution must be an integer, got {resolution!r}")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise SynthArgumentError(
            f"resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}"
        )
    return int(resolution)


def crop_to_frame(img: np.ndarray, factors: FundusFactors) -> np.ndarray:
    """The photograph as the camera frames it: ``img`` [R, R, 3] without the rows beyond the frame cut.

    ``render_fundus`` returns the square, centred view a prepared dataset holds: a frame-cut circle
    has black bands above and below it. A raw EyePACS photograph has no such bands; the frame itself
    cuts the circle. This keeps the rows whose centres lie inside the cut, [H, R, 3] with H <= R
    (H = R when ``fov_cut`` is 0), which is what :func:`write_synth_dataset` saves.
    """
    if img.ndim != 3 or img.shape[0] != img.shape[1]:
        raise SynthArgumentError(f"img must be a square [R, R, C] render, got shape {img.shape}")
    first = _frame_cut_rows(factors, img.shape[0])
    return img[first : img.shape[0] - first]


def _frame_cut_rows(f: FundusFactors, res: int) -> int:
    """Rows cut off at the top (and as many at the bottom): those whose centre lies beyond the cut."""
    if f.fov_cut <= 0:
        return 0
    ymax = f.fov_radius * (1.0 - f.fov_cut)
    # Row i has its centre at y = (i + 0.5) * 2 / R - 1; it is kept iff y > -ymax.
    t = (1.0 - ymax) * res / 2 - 0.5
    return max(0, math.floor(t) + 1)


def make_sample_grid(
    n: int = 16, resolution: int = 64, seed: int = 0, cols: int = 8, pad: int = 2
) -> np.ndarray:
    """A grid of ``n`` synthetic fundus images for docs / dashboards: uint8 RGB [H, W, 3].

    Shows one image per DR grade first (so lesions appear even for small n), then random ones.
    """
    if n < 1 or cols < 1:
        raise SynthArgumentError(f"n and cols must be >= 1, got n={n}, cols={cols}")
    res = _check_resolution(resolution)
    tiles = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        tiles.append(render_fundus(sample_factors(rng, grade=(4 - i) if i < 5 else None), res))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (res + pad) + pad, cols * (res + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[
            pad + r * (res + pad) : pad + r * (res + pad) + res,
            pad + c * (res + pad) : pad + c * (res + pad) + res,
        ] = t
    return grid


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
    p = _check_grade_probs(grade_probs)
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


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _fmt(v: int | float) -> int | str:
    return v if isinstance(v, int) else repr(float(v))  # repr round-trips floats exactly


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
        workers: processes rendering in parallel; None -> min(2, cpu count); 1 -> in this process.
        progress: show a progress bar on stderr.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SynthArgumentError(f"n must be an integer >= 1, got {n!r}")
    res = _check_resolution(resolution)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    probs = _check_grade_probs(grade_probs)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise SynthArgumentError(f"workers must be an integer >= 1 or None, got {workers!r}")
    n, seed, workers = int(n), int(seed), int(workers)
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
            tmp / "trainLabels.csv", _csv_text(["image", "level"], ((s, f.grade) for s, f in plan))
        )
        names = list(FACTOR_RANGES)
        atomic_write_text(
            tmp / "factors.csv",
            _csv_text(["image", *names], ([s, *(_fmt(v) for v in f.as_row().values())] for s, f in plan)),
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
