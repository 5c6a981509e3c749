"""The ground-truth factors of a synthetic fundus photograph and how they are drawn.

Every image of the built-in dataset is rendered (:mod:`retinagen.data.synth_render`) from one
:class:`FundusFactors` record; the factor meanings and ranges are listed in
:mod:`retinagen.data.synthetic`. Patients' two eyes share correlated traits, as in EyePACS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from retinagen.checks import check, int_in
from retinagen.dr_scale import NUM_GRADES
from retinagen.errors import ConfigError

# EyePACS training set: grades {0: 25810, 1: 2443, 2: 5292, 3: 873, 4: 708} of 35,126 images.
DEFAULT_GRADE_PROBS: tuple[float, ...] = (0.735, 0.069, 0.151, 0.025, 0.020)

MAX_SEED = 2**31 - 1
MIN_RESOLUTION = 16
MAX_RESOLUTION = 1024
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
LESION_TYPES = tuple(LESION_COUNT_RANGES)
MAX_LESIONS = {k: v[-1][1] for k, v in LESION_COUNT_RANGES.items()}

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
    **{k: (0, float(MAX_LESIONS[k])) for k in LESION_TYPES},
    "lesion_count": (0, float(sum(MAX_LESIONS.values()))),
    "texture_seed": (0, MAX_SEED),
}
_DISC_ABS_X = (0.35, 0.70)  # |disc_x|: nasal offset of the disc from the image centre
_INT_FACTORS = frozenset(
    {"laterality", "grade", "notch", "vessel_seed", "texture_seed", "lesion_count", *LESION_TYPES}
)


class SynthArgumentError(ConfigError, ValueError):
    """A bad argument to the synthetic generator (``n``, ``resolution``, ``grade_probs``, a factor)."""


def check_resolution(resolution: int) -> int:
    resolution = check(int_in(), resolution, "resolution", SynthArgumentError)
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise SynthArgumentError(
            f"resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}"
        )
    return int(resolution)


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
                check(int_in(), value, f"factor {f.name}", SynthArgumentError)
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
        for k in LESION_TYPES:
            lo, hi = LESION_COUNT_RANGES[k][self.grade]
            if not lo <= getattr(self, k) <= hi:
                raise SynthArgumentError(
                    f"factor {k}={getattr(self, k)} is outside [{lo}, {hi}] for grade {self.grade}"
                )

    @property
    def lesion_count(self) -> int:
        return int(sum(getattr(self, k) for k in LESION_TYPES))

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


def check_grade_probs(grade_probs: Sequence[float]) -> np.ndarray:
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
    p = check_grade_probs(grade_probs)
    if laterality is not None and laterality not in LATERALITY_CODES:
        raise SynthArgumentError(f"laterality must be 'left', 'right' or None, got {laterality!r}")
    if grade is not None:
        grade = check(int_in(0, NUM_GRADES - 1), grade, "grade (or None)", SynthArgumentError)
    u = rng.random(16)
    seeds = rng.integers(0, MAX_SEED, size=2, endpoint=True)
    lat = laterality if laterality is not None else ("right" if u[0] < 0.5 else "left")
    g = grade if grade is not None else _draw_grade(float(u[1]), p)
    side = 1.0 if lat == "right" else -1.0
    # EyePACS mixes cameras: about 40 % full circles, the rest cut by the frame.
    fov_cut = 0.0 if u[7] < 0.4 else 0.02 + 0.28 * (u[7] - 0.4) / 0.6
    lesion_u = u[11:16]
    counts = {k: _lesion_count(k, g, float(lesion_u[i])) for i, k in enumerate(LESION_TYPES)}
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
    p = check_grade_probs(grade_probs)
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


