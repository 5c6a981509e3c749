"""Field-of-view detection sweep: every framing, exposure and quality a real fundus camera produces.

Each case is built from a fundus whose circle is known exactly, so the detector's circle can be
scored against the truth:

- ``retina``: the real photograph that ships with scikit-image (`skimage.data.retina()`), whose
  disc was measured independently (see test_fundus.py: centre (704, 703), radius 696 at 1411 px),
  scaled so that the disc's radius is ``radius`` x the image width and pasted centred on a black
  square canvas. Truth: the measured disc, scaled and shifted with it.
- ``synth``: `retinagen.data.synthetic.render_fundus` (what `retinagen synth` writes) with
  ``fov_radius = 2 x radius``. Truth: centre ((R - 1) / 2, (R - 1) / 2), radius ``fov_radius x R / 2``.

Then, in a camera's order: pigmentation (darker, browner fundus), glare, exposure gamma, the frame
cut (``cut_tb`` / ``cut_lr``: the fraction of the square's side removed at the top and at the bottom /
at the left and at the right; ``style`` "band" blacks those rows/columns out as a camera's mask does,
"crop" removes them as EyePACS' frame does), dark sensor noise in the surround and JPEG at quality
30. A case is valid (part of the sweep) when at least 60 degrees of the circle's edge stay inside
the frame: with less, no detector can place the circle, and `detect_fov` refuses it by design.

The default run holds a grid that covers every axis's extremes and the worst combinations; the full
cartesian grid is marked slow (`pytest -m slow tests/retinagen/data/test_fov_sweep.py`). Running
this file as a script prints the table the README quotes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
import time
from collections.abc import Iterable, Iterator

import cv2
import numpy as np
import pytest
import skimage.data

from retinagen.data.fundus import detect_fov
from retinagen.data.synthetic import render_fundus, sample_factors

REF_CX, REF_CY, REF_R = 704.0, 703.0, 696.0  # skimage retina disc at 1411 px (see test_fundus.py)
MAX_ERROR = 0.02  # the bar: centre and radius within 2 % of the true radius
MIN_VISIBLE_DEGREES = 60.0


@dataclasses.dataclass(frozen=True)
class Case:
    source: str  # "retina" | "synth"
    size: int  # width of the square image before the cut, px
    radius: float  # FOV radius / width
    cut_tb: float = 0.0  # fraction of the width cut at the top and at the bottom
    cut_lr: float = 0.0  # fraction of the width cut at the left and at the right
    style: str = "band"  # "band" (black mask inside the frame) | "crop" (the frame cuts)
    gamma: float = 1.0  # exposure: out = in ** gamma (values in [0, 1])
    dark: bool = False  # dark, heavily pigmented fundus
    glare: bool = False  # strong rim haze and specular reflexes
    jpeg: bool = False  # dark sensor noise in the surround + JPEG quality 30

    @property
    def name(self) -> str:
        flags = "".join(f"-{k}" for k in ("dark", "glare", "jpeg") if getattr(self, k))
        return (
            f"{self.source}{self.size}-r{self.radius:.2f}-tb{self.cut_tb:.2f}-lr{self.cut_lr:.2f}"
            f"-{self.style}-g{self.gamma:.1f}{flags}"
        )


def visible_degrees(radius: float, cut_tb: float, cut_lr: float) -> float:
    """Degrees of the circle's edge inside the frame, for a circle centred in a unit square."""
    theta = np.linspace(0.0, 2.0 * math.pi, 3600, endpoint=False)
    x, y = radius * np.cos(theta), radius * np.sin(theta)
    inside = (np.abs(y) <= 0.5 - cut_tb) & (np.abs(x) <= 0.5 - cut_lr)
    return 360.0 * float(inside.mean())


def is_valid(case: Case) -> bool:
    return visible_degrees(case.radius, case.cut_tb, case.cut_lr) >= MIN_VISIBLE_DEGREES


@functools.lru_cache(maxsize=1)
def _retina() -> np.ndarray:
    img = skimage.data.retina()
    img.setflags(write=False)
    return img


@functools.lru_cache(maxsize=8)
def _retina_canvas(size: int, radius: float) -> tuple[np.ndarray, float, float, float]:
    """The skimage retina scaled so its disc radius is radius x size, centred on a black square."""
    src = _retina()
    k = round(src.shape[0] * radius * size / REF_R) / src.shape[0]
    side = round(src.shape[0] * k)
    interp = cv2.INTER_AREA if side < src.shape[0] else cv2.INTER_LINEAR
    scaled = cv2.resize(src, (side, side), interpolation=interp)
    # cv2.resize maps pixel centres as (i + 0.5) * k - 0.5.
    cx, cy, r = (REF_CX + 0.5) * k - 0.5, (REF_CY + 0.5) * k - 0.5, REF_R * side / src.shape[0]
    ox, oy = round((size - 1) / 2 - cx), round((size - 1) / 2 - cy)
    canvas = np.zeros((size, size, 3), np.uint8)
    sx0, sy0 = max(0, -ox), max(0, -oy)
    dx0, dy0 = max(0, ox), max(0, oy)
    w, h = min(side - sx0, size - dx0), min(side - sy0, size - dy0)
    canvas[dy0 : dy0 + h, dx0 : dx0 + w] = scaled[sy0 : sy0 + h, sx0 : sx0 + w]
    canvas.setflags(write=False)
    return canvas, cx + ox, cy + oy, r


def _synth(case: Case) -> tuple[np.ndarray, float, float, float]:
    # A fixed draw of the other factors (vessels, disc, lesions, notch); the swept ones are set.
    seed = int(case.size * 1000 + round(case.radius * 100) + 7 * case.dark + 13 * case.glare)
    f = dataclasses.replace(
        sample_factors(np.random.default_rng(seed)),
        fov_radius=2.0 * case.radius,
        fov_cut=0.0,
        pigmentation=1.0 if case.dark else 0.4,
        brightness=0.0 if case.dark else 0.5,
        glare=1.0 if case.glare else 0.0,
    )
    c = (case.size - 1) / 2
    return render_fundus(f, case.size), c, c, 2.0 * case.radius * case.size / 2


def _disc(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _add_glare(img: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Strong glare inside the FOV: a bright rim crescent on one side, a broad haze and a reflex."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    d = np.sqrt(dx * dx + dy * dy)
    toward = np.clip((dx * math.cos(2.2) + dy * math.sin(2.2)) / np.maximum(d, 1e-6), 0.0, 1.0)
    haze = np.exp(-(((r - d) / (0.12 * r)) ** 2)) * toward**3 * 190.0
    haze += np.exp(-((dx + 0.35 * r) ** 2 + (dy - 0.3 * r) ** 2) / (2 * (0.18 * r) ** 2)) * 110.0
    haze += np.exp(-((dx - 0.1 * r) ** 2 + (dy + 0.05 * r) ** 2) / (2 * (0.03 * r) ** 2)) * 220.0
    haze *= d <= r
    out = img.astype(np.float32) + haze[..., None] * np.array([0.9, 0.95, 1.0], np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def build(case: Case) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The case's image (uint8 RGB) and its true FOV circle (cx, cy, r) in that image's pixels."""
    if case.source == "retina":
        base, cx, cy, r = _retina_canvas(case.size, case.radius)
        img = base.astype(np.float32)
        if case.dark:
            # Heavy melanin: the fundus turns dark brown-red, green and blue absorb the most.
            img *= np.array([0.45, 0.28, 0.25], np.float32)
        img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    elif case.source == "synth":
        img, cx, cy, r = _synth(case)
    else:
        raise ValueError(case.source)
    if case.glare:
        img = _add_glare(img, cx, cy, r) if case.source == "retina" else img  # synth renders its own
    if case.gamma != 1.0:
        lut = np.clip(255.0 * (np.arange(256) / 255.0) ** case.gamma + 0.5, 0, 255).astype(np.uint8)
        img = lut[img]
    n = case.size
    ct, cl = round(case.cut_tb * n), round(case.cut_lr * n)
    if case.style == "crop":
        img = img[ct : n - ct, cl : n - cl]
        cx, cy = cx - cl, cy - ct
        inside = _disc(img.shape[:2], cx, cy, r)
    elif case.style == "band":
        img = img.copy()
        keep = np.zeros((n, n), bool)
        keep[ct : n - ct, cl : n - cl] = True
        img[~keep] = 0
        inside = _disc(img.shape[:2], cx, cy, r) & keep
    else:
        raise ValueError(case.style)
    if case.jpeg:
        rng = np.random.default_rng(case.size)
        img = np.ascontiguousarray(img)
        img[~inside] = rng.integers(0, 16, size=(int((~inside).sum()), 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])
        assert ok
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return np.ascontiguousarray(img), (cx, cy, r)


def errors(case: Case) -> tuple[float, float] | str:
    """(centre error, radius error) in % of the true radius, or the refusal's reason."""
    img, (cx, cy, r) = build(case)
    try:
        fov = detect_fov(img)
    except Exception as exc:  # noqa: BLE001 - the sweep reports every failure, NoFundusError or not
        return f"{type(exc).__name__}: {exc}"
    return 100 * math.hypot(fov.cx - cx, fov.cy - cy) / r, 100 * abs(fov.radius - r) / r


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------

RADII = (0.40, 0.45, 0.50)
CUTS = (0.0, 0.1, 0.2, 0.3)
GAMMAS = (0.7, 1.0, 1.4)
LOOKS = ((False, False), (True, False), (False, True), (True, True))  # (dark, glare)
SIZES = {"retina": (128, 512, 2048), "synth": (128, 512)}


def full_grid() -> Iterator[Case]:
    """The cartesian product of every axis (valid cases only)."""
    for source, sizes in SIZES.items():
        for size, radius, cut_tb, cut_lr, style, gamma, (dark, glare), jpeg in itertools.product(
            sizes, RADII, CUTS, CUTS, ("band", "crop"), GAMMAS, LOOKS, (False, True)
        ):
            case = Case(source, size, radius, cut_tb, cut_lr, style, gamma, dark, glare, jpeg)
            if is_valid(case):
                yield case


def quick_grid() -> Iterator[Case]:
    """Every axis's extremes alone, and combined with the worst of the others, at every size."""
    seen: set[Case] = set()

    def emit(cases: Iterable[Case]) -> Iterator[Case]:
        for c in cases:
            if c not in seen and is_valid(c):
                seen.add(c)
                yield c

    worst = {"dark": True, "glare": True, "jpeg": True}
    for source, sizes in SIZES.items():
        for size in sizes:
            # Each axis alone.
            yield from emit(Case(source, size, r) for r in RADII)
            yield from emit(Case(source, size, 0.5, c, 0, s) for c in CUTS[1:] for s in ("band", "crop"))
            yield from emit(Case(source, size, 0.45, 0, c, s) for c in CUTS[1:] for s in ("band", "crop"))
            yield from emit(Case(source, size, 0.45, gamma=g) for g in (0.7, 1.4))
            yield from emit(Case(source, size, 0.45, **{k: True}) for k in worst)
            # The reported failure: a disc nearly touching the sides, a black band at top and bottom.
            yield from emit([Case(source, size, 0.48, 0.08, 0, "band")])
            # Extremes together: EyePACS' widest disc and deepest cut, corner crops, with the worst
            # exposure and image quality. (At 2048 px these take most of the time and fail as they do
            # at 512 px, which detection works at: they are left to the full grid.)
            if size > 512:
                continue
            for radius, (ct, cl), style, gamma in itertools.product(
                (0.40, 0.50), ((0.3, 0), (0, 0.3), (0.1, 0.1), (0.2, 0)), ("band", "crop"), (0.7, 1.4)
            ):
                yield from emit([Case(source, size, radius, ct, cl, style, gamma, **worst)])
            # The full grid's hardest combination: dark, underexposed and JPEG-noisy without glare (the
            # rim only a few grey levels above the surround's noise).
            for radius, (ct, cl), style in itertools.product(
                (0.40, 0.50), ((0, 0), (0.3, 0), (0, 0.3), (0.1, 0.1), (0.2, 0)), ("band", "crop")
            ):
                yield from emit([Case(source, size, radius, ct, cl, style, 1.4, dark=True, jpeg=True)])


def _table(cases: Iterable[Case]) -> list[tuple[Case, tuple[float, float] | str]]:
    return [(c, errors(c)) for c in cases]


def _summary(rows: list[tuple[Case, tuple[float, float] | str]]) -> str:
    lines = []
    for source in SIZES:
        for size in SIZES[source]:
            sel = [res for c, res in rows if c.source == source and c.size == size]
            if not sel:
                continue
            ok = [res for res in sel if not isinstance(res, str)]
            good = [res for res in ok if max(res) <= 100 * MAX_ERROR]
            worst_c = max((res[0] for res in ok), default=float("nan"))
            worst_r = max((res[1] for res in ok), default=float("nan"))
            lines.append(
                f"{source:6s} {size:5d} px: {len(sel):5d} cases, {len(ok):5d} accepted, "
                f"{len(good):5d} within 2 %, worst centre {worst_c:.2f} %, worst radius {worst_r:.2f} %"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


# The cases of the default grid the detector does not yet handle to 2 %, each named (strict: one that starts
# passing fails the run until it is taken off). All are underexposed (gamma 1.4), dark and JPEG-noisy (quality
# 30, surround noise up to 16/255) at 128 px, where the 2 % bar is 1-1.3 px: JPEG's 8x8 blocks at quality 30
# lift the surround next to the rim to 7-8 grey levels against a rim of 10-15, so the drop is spread over
# ~6 px, and the circle is placed 1.5-3 px inside it (radius 3-6 % small). Every one is accepted, and none is a
# wrong object. 35 of these 313 cases failed before the refinement placed dim rays' edges by the brightness
# the rim carries (`retinagen.data.fov._mass_edges`) beside the bright rays' steepest drops, 21 before the
# smoothed last-resort outline (`fov._SOFT_SIGMA`) accepted the 4 that were refused; 17 fail now.
KNOWN_FAILURES = frozenset({
    "synth128-r0.40-tb0.00-lr0.00-band-g1.4-dark-jpeg",
    "synth128-r0.40-tb0.00-lr0.00-crop-g1.4-dark-jpeg",
    "synth128-r0.40-tb0.00-lr0.30-band-g1.4-dark-jpeg",
    "synth128-r0.40-tb0.00-lr0.30-crop-g1.4-dark-jpeg",
    "synth128-r0.40-tb0.10-lr0.10-band-g1.4-dark-jpeg",
    "synth128-r0.40-tb0.10-lr0.10-crop-g1.4-dark-jpeg",
    "synth128-r0.40-tb0.20-lr0.00-band-g1.4-dark-jpeg",
    "synth128-r0.40-tb0.20-lr0.00-crop-g1.4-dark-jpeg",
    "synth128-r0.40-tb0.30-lr0.00-band-g1.4-dark-jpeg",
    "synth128-r0.40-tb0.30-lr0.00-crop-g1.4-dark-jpeg",
    "synth128-r0.50-tb0.00-lr0.00-band-g1.4-dark-jpeg",
    "synth128-r0.50-tb0.00-lr0.00-crop-g1.4-dark-jpeg",
    "synth128-r0.50-tb0.00-lr0.30-band-g1.4-dark-jpeg",
    "synth128-r0.50-tb0.20-lr0.00-band-g1.4-dark-jpeg",
    "synth128-r0.50-tb0.30-lr0.00-band-g1.4-dark-glare-jpeg",
    "synth128-r0.50-tb0.30-lr0.00-crop-g1.4-dark-glare-jpeg",
    "synth128-r0.50-tb0.30-lr0.00-crop-g1.4-dark-jpeg",
})


def known_gap(case: Case) -> bool:
    return case.name in KNOWN_FAILURES


_QUICK = list(quick_grid())
_MARKED = [
    pytest.param(c, marks=pytest.mark.xfail(reason="known gap: dark + gamma 1.4 + JPEG", strict=True))
    if known_gap(c)
    else c
    for c in _QUICK
]


@pytest.mark.parametrize("case", _MARKED, ids=[c.name for c in _QUICK])
def test_sweep_quick(case: Case) -> None:
    res = errors(case)
    assert not isinstance(res, str), f"{case.name} refused: {res}"
    centre, radius = res
    assert centre <= 100 * MAX_ERROR and radius <= 100 * MAX_ERROR, (case.name, res)


@pytest.mark.slow
def test_sweep_full_grid() -> None:
    rows = _table(full_grid())
    bad = [(c.name, res) for c, res in rows if isinstance(res, str) or max(res) > 100 * MAX_ERROR]
    print("\n" + _summary(rows))
    assert not bad, f"{len(bad)} of {len(rows)} cases failed, e.g. {bad[:10]}"


def test_known_failures_are_cases_of_the_grid() -> None:
    assert {c.name for c in _QUICK} >= KNOWN_FAILURES  # a renamed case cannot hide in the list


def test_quick_grid_covers_every_axis() -> None:
    # The default grid must reach each axis's extremes (the slow grid holds every combination).
    assert {c.radius for c in _QUICK} >= {0.40, 0.50}
    assert max(c.cut_tb for c in _QUICK) == 0.3 and max(c.cut_lr for c in _QUICK) == 0.3
    assert {c.gamma for c in _QUICK} >= {0.7, 1.4}
    assert {c.style for c in _QUICK} == {"band", "crop"}
    assert any(c.dark and c.glare and c.jpeg for c in _QUICK)
    assert {(c.source, c.size) for c in _QUICK} == {(s, n) for s, ns in SIZES.items() for n in ns}


def test_invalid_cases_are_those_without_enough_edge() -> None:
    # Both sides cut 30 %: the frame holds no part of the circle's edge; nothing to fit.
    assert visible_degrees(0.45, 0.3, 0.3) == 0.0
    assert visible_degrees(0.50, 0.3, 0.0) == pytest.approx(94, abs=1)


if __name__ == "__main__":
    grid = full_grid() if "--full" in sys.argv else iter(_QUICK)
    t0 = time.perf_counter()
    table = _table(grid)
    for c, res in table:
        if isinstance(res, str) or max(res) > 100 * MAX_ERROR:
            print("FAIL", c.name, res)
    print(_summary(table))
    print(f"{len(table)} cases in {time.perf_counter() - t0:.1f} s")
