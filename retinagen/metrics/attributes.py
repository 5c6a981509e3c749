"""Measurable fundus attributes: one float per image for each attribute the dashboard names.

These probes let control be scored without a person (automated ACM, factor discovery): a code
controls "pigmentation" when traversing it moves :func:`pigmentation` consistently. Every probe
maps a batch of images to float64 ``[N]`` and looks inside the field of view (FOV) only.

Accepted image batches (what the rest of the project hands around):

- numpy ``uint8 [N, H, W, 3]`` RGB (decoded files, ``generation.generate_images``);
- torch floating ``[N, 3, H, W]`` in [-1, 1] (generator output; values outside are clamped).

Internally each image becomes float32 RGB in [0, 255]; ``H, W >= 16``.

The FOV is estimated per image from the image itself (its brightest channel above a fraction of the
FOV's own level, largest connected region kept), never by `retinagen.data.fov.detect_fov`:
generated images may have an imperfect black surround or a circle the detector rejects, and a
probe must return a number for every image.

The attributes (:data:`ATTRIBUTES`, :func:`measure`), what each follows and what it is built to
ignore (the synthetic renderer's factor in brackets, `retinagen.data.synthetic`):

- ``pigmentation`` [pigmentation]: melanin. Pigmented fundi are brown-red, light ones orange-red:
  melanin absorbs green more than red. The probe is the median over the FOV of log(R / G), a
  chromaticity, so an exposure gain (which scales R and G alike) leaves it unchanged. White glare
  would lower R / G, so the estimated glare (below) is subtracted from R and G first; the median
  ignores the disc, lesions and vessels, which cover little of the FOV.
- ``glare`` [glare]: rim haze and specular reflexes, i.e. near-white light added on top of the
  fundus. The fundus' own blue is about k0 times its red (k0: the 25th percentile of B / R in the
  FOV); blue beyond that is added white light g, from B = k0 R + (1 - k0) g. The probe is the FOV
  mean of g / 255. Absolute, like the glare itself (it does not scale with exposure).
- ``brightness`` [brightness]: exposure as seen: the FOV mean of the brightest channel (normally
  red, the channel melanin changes least) less the estimated glare, / 255. A dark fundus does read
  darker (Spearman rho -0.52 with pigmentation on the synthetic data, +0.86 with exposure).
- ``fov_area`` [fov_radius and fov_cut]: field-of-view shape, the fraction of the frame inside
  the FOV: a smaller circle and a circle cut by the frame (EyePACS) both lower it.
- ``vessel_contrast`` [vessel_contrast]: how dark vessels are relative to the fundus beside them.
  Valley depth in the green channel less the estimated glare (how much darker a pixel is than the
  darker of its two neighbours a few px away on either side, relative to them, max over 4
  directions), opened with lines at 8+ orientations so only valleys that run along a line survive
  (vessels, not noise, dots or lesions); the probe is the mean of the deepest 2 % of that map in
  the FOV, disc excluded, so it follows the main vessels' darkness rather than how many branches
  there are.
- ``lesion_load`` [lesion_count]: DR lesions. Small dark blobs (microaneurysms, haemorrhages:
  filled by a closing with a short line at every orientation, which a vessel is not) plus small
  yellow specks (exudates: a green excess over the line openings larger than the blue excess,
  which white glare does not have), both relative to the local background, above a noise floor,
  summed over the FOV without the optic disc and divided by the FOV area.

Sizes: kernel sizes in pixels scale with half the frame's longer side (fixed for a batch of one
resolution, so rounding cannot jump between images); regions such as the disc scale with the FOV
radius. Values are comparable across resolutions up to the detail each can show.

How well each probe follows its factor (Spearman rho per resolution) is measured by
``benchmarks/attribute_probes.py`` and reported in the README; lesion load is comparable between images of
one source, not against synthetic grade levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import cv2
import numpy as np
import torch

__all__ = [
    "ATTRIBUTES",
    "SYNONYMS",
    "AttributeProbe",
    "brightness",
    "fov_area",
    "glare",
    "lesion_load",
    "measure",
    "pigmentation",
    "resolve_attribute",
    "to_float_images",
    "vessel_contrast",
]

ImageBatch = np.ndarray | torch.Tensor

_MIN_SIDE = 16
# FOV mask: brightest channel above this fraction of the FOV's own level (its 95th percentile), and
# at least this many 8-bit levels (a generated black surround is rarely exactly 0).
_FOV_LEVEL_FRACTION = 0.22
_FOV_MIN_LEVEL = 14.0
_EPS = 1.0  # 8-bit levels added to denominators: ratios of near-black pixels stay finite
# Structuring line lengths, / half the frame's longer side. Vessels: long enough to tell a vessel run
# from a dot (7 px at 64 px, 13 px at 128 px). Lesions: longer than most lesions but short enough
# that a curved vessel is not filled like a blob (7 px at 64-128 px, 13 px at 256 px).
_VESSEL_LINE_FRACTION = 0.2
_LESION_LINE_FRACTION = 0.1
_LESION_LINE_MIN = 7
_VALLEY_OFFSET = 0.03  # vessel valley: neighbours this far (/ half the frame) on either side
_VESSEL_TOP_FRACTION = 0.02
_LESION_DARK_FLOOR = 0.12  # relative darkening below this is noise / vessel residue, not a lesion
_LESION_BRIGHT_FLOOR = 0.10
_LESION_NOISE_FLOORS = 3.0  # ... and below this many noise standard deviations


# ============================================================================================ input
def to_float_images(images: ImageBatch) -> np.ndarray:
    """A batch as float32 RGB [N, H, W, 3] in [0, 255] (see the module docstring for what is accepted)."""
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise ValueError(
                f"a torch batch must be floating [N, 3, H, W] in [-1, 1], got dtype {images.dtype}"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"a torch batch must be [N, 3, H, W], got shape {tuple(images.shape)}")
        x = images.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5)
        out = x.permute(0, 2, 3, 1).cpu().numpy()
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"a numpy batch must be uint8 [N, H, W, 3], got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"a numpy batch must be uint8 [N, H, W, 3] RGB, got shape {images.shape}")
        out = images.astype(np.float32)
    else:
        raise TypeError(f"images must be a numpy uint8 or torch float batch, got {type(images).__name__}")
    if min(out.shape[1], out.shape[2]) < _MIN_SIDE:
        raise ValueError(f"images must be at least {_MIN_SIDE} px on each side, got {out.shape[1:3]}")
    if not np.isfinite(out).all():
        raise ValueError("images contain NaN or inf")
    return np.ascontiguousarray(out)


# ======================================================================================== one image
@lru_cache(maxsize=32)
def _line_kernels(length: int) -> tuple[np.ndarray, ...]:
    """Line structuring elements of ``length`` px (odd), at orientations evenly spread over 180 degrees.

    Enough orientations that a line's end moves at most ~1.25 px from one to the next (8 for 7 px,
    16 for 13 px): with fewer, a thin vessel lying between two orientations fits no line and reads
    as a blob.
    """
    n_orient = max(8, math.ceil(math.pi * (length - 1) / 2.5))
    kernels = []
    c = length // 2
    for k in range(n_orient):
        a = np.pi * k / n_orient
        ker = np.zeros((length, length), np.uint8)
        dx, dy = c * np.cos(a), c * np.sin(a)
        p0 = (round(c - dx), round(c - dy))
        p1 = (round(c + dx), round(c + dy))
        cv2.line(ker, p0, p1, 1, 1, cv2.LINE_8)
        kernels.append(ker)
    return tuple(kernels)


def _odd(x: float, lo: int) -> int:
    n = max(lo, round(x))
    return n if n % 2 == 1 else n + 1


def _shifted(a: np.ndarray, dy: int, dx: int, pad: int) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]`` with edge replication; ``a`` is pre-padded by ``pad``."""
    h, w = a.shape[0] - 2 * pad, a.shape[1] - 2 * pad
    return a[pad + dy : pad + dy + h, pad + dx : pad + dx + w]


class _Frame:
    """One image float32 [H, W, 3] in [0, 255] and its lazily computed FOV mask and feature maps.

    Sizes in pixels come from two scales: ``half`` (half the frame's longer side, fixed for a batch of
    one resolution) for every integer kernel size, so that rounding does not jump from image to image
    with the FOV radius; and ``radius`` (the FOV's own, continuous) for regions such as the disc.
    """

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.h, self.w = rgb.shape[:2]
        self.half = 0.5 * max(self.h, self.w)

    # ------------------------------------------------------------------------------------ the FOV
    @cached_property
    def mask(self) -> np.ndarray:
        """FOV mask bool [H, W]: brightest channel above a fraction of the FOV level, largest region."""
        top = cv2.blur(self.rgb.max(axis=2), (3, 3))
        level = float(np.percentile(top, 95))
        thr = max(_FOV_MIN_LEVEL, _FOV_LEVEL_FRACTION * level)
        m = (top > thr).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n > 2:  # keep the largest region: the FOV, not specks in a noisy surround
            biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            m = (labels == biggest).astype(np.uint8)
        return m.astype(bool)

    @cached_property
    def area(self) -> int:
        return int(self.mask.sum())

    @cached_property
    def radius(self) -> float:
        """FOV radius in px: half the widest row of the mask (the frame cuts rows, never the width)."""
        return max(1.0, 0.5 * float(self.mask.sum(axis=1).max(initial=0)))

    @cached_property
    def interior(self) -> np.ndarray:
        """The FOV pulled in by ~3 % of the frame: away from the rim, where filters see the surround."""
        k = _odd(0.06 * self.half, 3)
        se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        inner = cv2.erode(self.mask.astype(np.uint8), se).astype(bool)
        return inner if inner.any() else self.mask

    def inside(self, values: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        """``values`` [H, W] at the pixels of ``where`` (default: the FOV); the whole frame if it is empty."""
        m = self.mask if where is None else where
        return values[m] if m.any() else values.reshape(-1)

    # ------------------------------------------------------------------------------- feature maps
    @cached_property
    def filled(self) -> np.ndarray:
        """The image with every surround pixel set to its nearest FOV pixel: float32 [H, W, 3].

        Filters near the rim then see a continuation of the fundus instead of a black step, which
        would read as a huge dark structure.
        """
        if self.mask.all() or not self.mask.any():
            return self.rgb
        _, labels = cv2.distanceTransformWithLabels(
            (~self.mask).astype(np.uint8), cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL
        )
        # With DIST_LABEL_PIXEL every zero (FOV) pixel gets its own label, 1.. in raster order.
        fov_index = np.flatnonzero(self.mask.ravel())
        flat = self.rgb.reshape(-1, 3)
        return np.ascontiguousarray(flat[fov_index[labels.ravel() - 1]].reshape(self.rgb.shape))

    def channel(self, c: int) -> np.ndarray:
        return np.ascontiguousarray(self.filled[..., c])

    @cached_property
    def disc(self) -> np.ndarray:
        """Pixels near the optic disc, bool [H, W]: the strongest disc-sized yellow-white spot.

        The disc is the most yellow bright region of a fundus (G - B high); white glare is not
        (G - B about 0) and the darker, redder fundus has a lower G - B.
        """
        gb = cv2.GaussianBlur(self.channel(1) - self.channel(2), (0, 0), max(0.8, 0.06 * self.half))
        gb = np.where(self.interior, gb, -np.inf)
        y, x = np.unravel_index(int(np.argmax(gb)), gb.shape)
        yy, xx = np.ogrid[: self.h, : self.w]
        return (yy - y) ** 2 + (xx - x) ** 2 <= (0.22 * self.radius) ** 2

    @cached_property
    def glare_map(self) -> np.ndarray:
        """Estimated white light added per pixel, float32 [H, W] in 8-bit levels (surround: filled).

        The fundus' own blue is about k0 times its red (k0: the 25th percentile of B/R in the FOV,
        which most glare-free pixels reach); blue beyond that is white light g, added equally to every
        channel: B = k0 R + (1 - k0) g for R, B measured with the light.
        """
        r, b = self.filled[..., 0], self.filled[..., 2]
        k0 = float(np.percentile(self.inside((b + _EPS) / (r + _EPS), self.interior), 25))
        # A fundus is red (k0 ~ 0.1-0.5); a near-neutral image has nothing to tell light from colour by,
        # so the gain 1 / (1 - k0) is capped instead of blowing up.
        return np.maximum(b - k0 * r, 0.0) / (1.0 - min(k0, 0.9))

    @cached_property
    def green_noise(self) -> float:
        """Robust standard deviation of pixel noise in the green channel (8-bit levels) inside the FOV.

        From the residual after a 3x3 mean (which keeps 8/9 of white noise's variance), by the median
        absolute value, so vessels and lesions (a small share of pixels) do not inflate it.
        """
        g = self.channel(1)
        resid = self.inside(g - cv2.blur(g, (3, 3)), self.interior)
        return float(1.4826 * np.median(np.abs(resid)) * math.sqrt(9.0 / 8.0))

    @cached_property
    def lesion_len(self) -> int:
        """Structuring line length for lesion blobs (see the constants)."""
        return _odd(_LESION_LINE_FRACTION * self.half, _LESION_LINE_MIN)

    @cached_property
    def vessel_len(self) -> int:
        """Structuring line length for vessel runs (see the constants)."""
        return _odd(_VESSEL_LINE_FRACTION * self.half, 5)

    @cached_property
    def green_closings(self) -> np.ndarray:
        """Closings of the green channel with lines at every orientation, float32 [K, H, W]."""
        g = self.channel(1)
        return np.stack([cv2.morphologyEx(g, cv2.MORPH_CLOSE, k) for k in _line_kernels(self.lesion_len)])

    def line_openings(self, c: int) -> np.ndarray:
        """Max over orientations of openings of channel ``c`` with lines: bright blobs removed."""
        ch = self.channel(c)
        return np.stack(
            [cv2.morphologyEx(ch, cv2.MORPH_OPEN, k) for k in _line_kernels(self.lesion_len)]
        ).max(axis=0)

    @cached_property
    def vessel_map(self) -> np.ndarray:
        """Relative depth of long dark lines (vessels) in the green channel, float32 [H, W] >= 0.

        Valley depth: how much darker a pixel is than the darker of its two neighbours d px away on
        either side, in 4 directions (max), relative to those neighbours. Then the max over
        orientations of an opening with a line: only valleys that continue along a line survive,
        which removes noise, dots and the short blobs of lesions.
        """
        # Green without the estimated glare: added light would make vessels under it look fainter.
        g = np.ascontiguousarray(np.maximum(self.filled[..., 1] - self.glare_map, 0.0))
        d = max(1, round(_VALLEY_OFFSET * self.half))
        padded = np.pad(g, d, mode="edge")
        depth = np.zeros_like(g)
        for oy, ox in ((0, 1), (1, 0), (1, 1), (1, -1)):
            side = np.minimum(_shifted(padded, oy * d, ox * d, d), _shifted(padded, -oy * d, -ox * d, d))
            np.maximum(depth, (side - g) / (side + _EPS), out=depth)
        return np.stack(
            [cv2.morphologyEx(depth, cv2.MORPH_OPEN, k) for k in _line_kernels(self.vessel_len)]
        ).max(axis=0)


# ======================================================================================== probes
def _pigmentation(f: _Frame) -> float:
    # Remove the estimated white glare first: added white light lowers R/G and would read as less melanin.
    g_light = f.glare_map
    r = np.maximum(f.rgb[..., 0] - g_light, 0.0)
    g = np.maximum(f.rgb[..., 1] - g_light, 0.0)
    return float(np.median(f.inside(np.log((r + _EPS) / (g + _EPS)), f.interior)))


def _glare(f: _Frame) -> float:
    return float(f.inside(f.glare_map).mean() / 255.0)


def _brightness(f: _Frame) -> float:
    # Glare is its own attribute: take the estimated added white light out of the exposure.
    return float(f.inside(np.maximum(f.rgb.max(axis=2) - f.glare_map, 0.0)).mean() / 255.0)


def _fov_area(f: _Frame) -> float:
    return f.area / float(f.h * f.w)


def _vessel_contrast(f: _Frame) -> float:
    vals = f.inside(f.vessel_map, f.interior & ~f.disc)
    k = max(1, round(_VESSEL_TOP_FRACTION * vals.size))
    return float(np.partition(vals, vals.size - k)[vals.size - k :].mean())


def _lesion_load(f: _Frame) -> float:
    g, b = f.channel(1), f.channel(2)
    clos = f.green_closings
    bg = clos.max(axis=0) + _EPS
    # Floors: a relative contrast, and a multiple of the image's own noise (a dim or dark fundus is noisier
    # relative to its level; noise dips must not count as microaneurysms).
    noise = _LESION_NOISE_FLOORS * f.green_noise
    dark = np.maximum(clos.min(axis=0) - g - np.maximum(_LESION_DARK_FLOOR * bg, noise), 0.0) / bg
    open_g, open_b = f.line_openings(1), f.line_openings(2)
    # Yellow: the green excess over the blue excess (white glare raises both about equally).
    yellow = (g - open_g) - (b - open_b)
    floor = np.maximum(_LESION_BRIGHT_FLOOR * (open_g + _EPS), math.sqrt(2.0) * noise)
    bright = np.maximum(yellow - floor, 0.0) / (open_g + _EPS)
    return float(f.inside(dark + bright, f.interior & ~f.disc).sum() / max(1, f.area))


# ===================================================================================== registry
def _apply(per_frame: Callable[[_Frame], float], images: ImageBatch) -> np.ndarray:
    return np.asarray([per_frame(_Frame(img)) for img in to_float_images(images)], dtype=np.float64)


def pigmentation(images: ImageBatch) -> np.ndarray:
    """Melanin: median log(R / G) over the FOV after removing the estimated white glare -> float64 [N]."""
    return _apply(_pigmentation, images)


def glare(images: ImageBatch) -> np.ndarray:
    """White light added on the fundus: FOV mean of the estimated glare, as a fraction of 255 -> float64 [N]."""
    return _apply(_glare, images)


def brightness(images: ImageBatch) -> np.ndarray:
    """Exposure: FOV mean of the brightest channel less the estimated glare, / 255 -> float64 [N] in [0, 1]."""
    return _apply(_brightness, images)


def fov_area(images: ImageBatch) -> np.ndarray:
    """Field-of-view shape: the fraction of the frame inside the FOV -> float64 [N] in [0, 1]."""
    return _apply(_fov_area, images)


def vessel_contrast(images: ImageBatch) -> np.ndarray:
    """Vessel darkness: mean relative depth of the deepest 2 % of long dark lines in the FOV -> float64 [N]."""
    return _apply(_vessel_contrast, images)


def lesion_load(images: ImageBatch) -> np.ndarray:
    """DR lesions: dark blobs + yellow specks above a noise floor, per FOV pixel -> float64 [N] >= 0."""
    return _apply(_lesion_load, images)


@dataclass(frozen=True)
class AttributeProbe:
    """One measurable attribute.

    name: registry key; fn: images -> float64 [N] (any batch `to_float_images` accepts); description:
    what it measures and how; unit: the unit of its values; synthetic_factor: the ground-truth factor
    (a column of the synthetic ``factors.csv``) it is validated against, None when there is none;
    spread: its typical standard deviation across fundus photographs (measured on the synthetic data
    at 64-128 px), the scale that tells a real change from noise (0: unknown).
    """

    name: str
    fn: Callable[[ImageBatch], np.ndarray]
    description: str
    unit: str
    synthetic_factor: str | None
    spread: float = 0.0


ATTRIBUTES: dict[str, AttributeProbe] = {
    p.name: p
    for p in (
        AttributeProbe(
            "pigmentation",
            pigmentation,
            "melanin: median log(R/G) over the FOV, white glare removed (brown-red fundi absorb more green)",
            "log ratio",
            "pigmentation",
            spread=0.045,
        ),
        AttributeProbe(
            "glare",
            glare,
            "white light added on the fundus: FOV mean of the blue beyond the fundus' own B/R",
            "fraction of 255",
            "glare",
            spread=0.023,
        ),
        AttributeProbe(
            "brightness",
            brightness,
            "exposure: FOV mean of the brightest channel less the estimated glare",
            "fraction of 255",
            "brightness",
            spread=0.16,
        ),
        AttributeProbe(
            "fov_area",
            fov_area,
            "field-of-view shape: fraction of the frame inside the FOV (circle size and frame cut)",
            "fraction of frame",
            "fov_radius",
            spread=0.086,
        ),
        AttributeProbe(
            "vessel_contrast",
            vessel_contrast,
            "relative depth of the deepest 2 % of long dark lines (vessels) in the FOV, disc excluded",
            "relative depth",
            "vessel_contrast",
            spread=0.025,
        ),
        AttributeProbe(
            "lesion_load",
            lesion_load,
            "small dark blobs and yellow specks (DR lesions) per FOV pixel, disc excluded",
            "relative excess per px",
            "lesion_count",
            spread=0.001,
        ),
    )
}

# The built-in probes by name, per image: `measure` shares one _Frame (FOV mask, feature maps) between them.
_PER_FRAME: dict[str, Callable[[_Frame], float]] = {
    "pigmentation": _pigmentation,
    "glare": _glare,
    "brightness": _brightness,
    "fov_area": _fov_area,
    "vessel_contrast": _vessel_contrast,
    "lesion_load": _lesion_load,
}

# Other names users type for the same attributes (``generate --set melanin=0.8``).
SYNONYMS: dict[str, str] = {
    "melanin": "pigmentation",
    "fov": "fov_area",
    "fov_shape": "fov_area",
    "field_of_view": "fov_area",
    "exposure": "brightness",
    "vessels": "vessel_contrast",
    "lesions": "lesion_load",
}


def resolve_attribute(name: str) -> str:
    """The registry name of ``name`` (itself or a synonym); KeyError naming the known ones otherwise."""
    key = SYNONYMS.get(name, name)
    if key not in ATTRIBUTES:
        raise KeyError(f"unknown attribute {name!r}; known: {', '.join([*ATTRIBUTES, *SYNONYMS])}")
    return key


def measure(images: ImageBatch, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Every requested probe (default: all of :data:`ATTRIBUTES`) on one batch: name -> float64 [N].

    Built-in probes share the FOV mask and feature maps of each image; a probe added to ATTRIBUTES
    from outside is called on the whole batch through its ``fn``.
    """
    keys: Sequence[str] = list(ATTRIBUTES) if names is None else [resolve_attribute(n) for n in names]
    arr = to_float_images(images)
    frames = [_Frame(img) for img in arr]
    out: dict[str, np.ndarray] = {}
    for k in keys:
        if k in _PER_FRAME:
            out[k] = np.asarray([_PER_FRAME[k](f) for f in frames], dtype=np.float64)
        else:
            vals = np.asarray(ATTRIBUTES[k].fn(images), dtype=np.float64).reshape(-1)
            if vals.shape != (len(frames),):
                raise ValueError(f"attribute {k!r} returned {vals.shape[0]} values for {len(frames)} images")
            out[k] = vals
    return out


def _expected_fov_area(radius: float, cut: float) -> float:
    """Fraction of the square frame inside a circle of radius r cut at |y| <= r (1 - cut) (notch ignored)."""
    h = radius * (1.0 - cut)
    return 2.0 * (h * math.sqrt(radius * radius - h * h) + radius * radius * math.asin(h / radius)) / 4.0


def synthetic_truth(factors: Sequence[Any]) -> dict[str, np.ndarray]:
    """What each built-in probe follows in images of the synthetic renderer (`retinagen.data.synthetic`'s
    `FundusFactors`): attribute -> float64 [N]. The probes are validated against these."""
    return {
        "pigmentation": np.array([f.pigmentation for f in factors], dtype=np.float64),
        "glare": np.array([f.glare for f in factors], dtype=np.float64),
        "brightness": np.array([f.brightness for f in factors], dtype=np.float64),
        "fov_area": np.array([_expected_fov_area(f.fov_radius, f.fov_cut) for f in factors], dtype=np.float64),
        "vessel_contrast": np.array([f.vessel_contrast for f in factors], dtype=np.float64),
        "lesion_load": np.array([f.lesion_count for f in factors], dtype=np.float64),
    }
