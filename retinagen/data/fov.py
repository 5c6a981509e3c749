"""Field-of-view (FOV) detection: the circle of a fundus photograph, including one the frame cuts off.

`detect_fov` takes a channel-last image (see `retinagen.data.pixels`) and returns a `FOV` in its pixel
coordinates (x = column, y = row, pixel centres at integer indices), or raises `NoFundusError` naming why the
image holds no fundus (black, no round bright region, a spill beyond the circle, ...). It works on a copy
about `_DETECT_SIDE` pixels across: Otsu splits of the brightness, the outline's free (non-frame) points,
a robust circle fit, then an edge refinement at full resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from retinagen.data.pixels import as_hwc, resize, rgb_float, value_scale
from retinagen.errors import NoFundusError

__all__ = ["FOV", "detect_fov"]

# FOV detection runs on a copy whose longest side is about this many pixels: the circle is fitted
# to hundreds of edge points, so its error at this size is well under 1% of the radius, while
# detection costs a few ms instead of tens of ms at full size.
_DETECT_SIDE = 384
_MIN_DETECT_SIDE = 256  # smaller images are enlarged to at least this for detection
_MIN_SIDE = 32  # below this there is nothing to detect
_MAX_ASPECT = 4.0  # longer / shorter side; fundus photographs are ~1:1 to ~1.6:1 (frame-cut EyePACS)
_BLACK_LEVEL = 0.02  # 99.9th-percentile brightness below this (~5/255): the image is black
_MIN_REL_CONTRAST = 0.3  # (FOV level - surround level) / FOV level, on the normalised image
_THRESHOLD_FRACTION = 0.3  # threshold between surround and FOV level: low, to keep the dim periphery
_MIN_DIAMETER_FRACTION = 0.25  # FOV diameter vs the image's shorter side
_MIN_INLIER_FRACTION = 0.6  # share of the outline's free (non-border) points on the circle
_MIN_ARC_DEGREES = 60.0  # total angle of the outline the circle is fitted to
_MIN_SPREAD_DEGREES = 150.0  # angle from the first to the last piece of that outline
_MIN_VISIBLE_FRACTION = 0.4  # share of the fitted disc inside the frame (30 % cuts at top and bottom: 49 %)
_MIN_COVERAGE = 0.9  # share of the visible disc covered by the bright region
_MAX_SPILL = 0.08  # share of the bright region outside the (3% enlarged) disc
_MAX_SURROUND_LEVEL = 0.1  # surround brightness vs the FOV's, both above the darkest class ...
_MAX_SURROUND_STEP = 4.0  # ... or this many levels (of 255) above it, whichever is larger
_EDGE_TOLERANCE = 3.0  # px of a native-resolution image that a band's edge may wander (JPEG blocks)
_STRONG_EDGE = 30.0 / 255  # rim contrast above which a ray's steepest drop is its edge (see `_refine_circle`)
_MIN_RIM = 2.0 / 255  # rim level above the surround below which a ray holds no edge
_EDGE_SIGMA = (0.35, 1.5)  # native px: the error of a bright ray's edge point, and of a dim ray's
_EDGE_MAX_FRAC = 0.03  # refined circle: inlier residuals below this share of the radius
_RAY_STEP = 0.25  # small px between a ray's samples; 1/8 native px when an image is enlarged more than 2x
_MASS_SPAN = (6.0, 2.0, 5.0)  # native px: rim line from r - 6 to r - 2, rim mass from r - 2 to r + 5
_SURROUND_SPAN = (3.0, 8.0)  # native px outside r where the surround's level is measured
_SOFT_SIGMA = 8.0  # small px: the last-resort smoothing for an outline broken by JPEG noise
_MIN_SHARP_COVERAGE = 0.9  # ... and the share of its disc's inner 90 % that must be bright without it
_MAX_DESCENTS = 2  # extra Otsu splits of the darker class tried when the first gives no round FOV


@dataclass(frozen=True)
class FOV:
    """A fundus field of view: a circle in the input image's pixel coordinates.

    cx, cy: centre (x = column, y = row; pixel centres at integer indices), may lie anywhere in the
        image. radius: in pixels. The circle is the full FOV even where the frame cuts it.
    frame_cut: fraction of the circle's vertical extent (2 * radius) outside the image; 0 if whole.
    coverage: fraction of the fitted disc's area *inside the frame* that the detected bright region
        covers (1.0 = a perfect disc), measured against the circle fitted to the region's outline
        (the one the sanity checks use, before the edge refinement that makes `radius` exact). The
        part of the disc cut off by the frame is not counted here: that is what `frame_cut` reports.
    """

    cx: float
    cy: float
    radius: float
    frame_cut: float
    coverage: float


# ---------------------------------------------------------------------------------------------------
# Field-of-view detection
# ---------------------------------------------------------------------------------------------------


def _fit_circle(pts: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float, float]:
    """Least-squares algebraic (Kasa) circle fit to points [N, 2] (x, y), optionally weighted [N],
    -> (cx, cy, r)."""
    if w is None:
        w = np.ones(len(pts))
    mean = (pts * w[:, None]).sum(axis=0) / w.sum()
    p = (pts - mean).astype(np.float64)
    # x^2 + y^2 = 2 a x + 2 b y + c, linear in (a, b, c); centred for conditioning.
    sw = np.sqrt(w)[:, None]
    a_mat = np.column_stack([2 * p[:, 0], 2 * p[:, 1], np.ones(len(p))]) * sw
    rhs = (p**2).sum(axis=1) * sw[:, 0]
    (a, b, c), *_ = np.linalg.lstsq(a_mat, rhs, rcond=None)
    r2 = c + a * a + b * b
    r = math.sqrt(r2) if r2 > 0 else float("nan")
    return float(a + mean[0]), float(b + mean[1]), r


def _weighted_median(v: np.ndarray, w: np.ndarray | None) -> float:
    if w is None:
        return float(np.median(v))
    order = np.argsort(v)
    cw = np.cumsum(w[order])
    return float(v[order][np.searchsorted(cw, 0.5 * cw[-1])])


def _robust_circle(
    pts: np.ndarray, w: np.ndarray | None = None, max_frac: float = 0.02
) -> tuple[float, float, float, np.ndarray]:
    """Kasa fit (weighted by `w` if given), then refit on inliers until stable.

    Inlier: residual below 3 robust sigmas (from the weighted median residual), but never above
    `max_frac` of the radius (so a ragged, non-round outline cannot make every point an inlier) nor
    below 1.5 px (pixel quantisation). Drops outline points that are not on the FOV circle: camera
    notches, dark vessels or lesions that dent the rim. Returns (cx, cy, r, inlier mask).
    """
    inliers = np.ones(len(pts), dtype=bool)
    cx, cy, r = _fit_circle(pts, w)
    for _ in range(6):
        if not math.isfinite(r):
            break
        res = np.abs(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) - r)
        sigma = 1.4826 * _weighted_median(res[inliers], None if w is None else w[inliers])
        new = res < max(1.5, min(3.0 * sigma, max_frac * r))
        if new.sum() < 8 or np.array_equal(new, inliers):
            break
        inliers = new
        cx, cy, r = _fit_circle(pts[inliers], None if w is None else w[inliers])
    return cx, cy, r, inliers


Frame = tuple[int, int, int, int]  # (x0, y0, x1, y1): the first and last columns and rows inside the frame
_THETA = np.linspace(0.0, 2.0 * math.pi, 360, endpoint=False)
_RAYS = np.column_stack([np.cos(_THETA), np.sin(_THETA)])  # [360, 2]: the refinement's ray directions


def _ray_step(u: float) -> float:
    """Small px between a ray's samples for an image of `u` small px per native px (`_RAY_STEP`)."""
    return _RAY_STEP * max(1.0, u / 2.0)


def _radial_profiles(
    bright: np.ndarray, cx: float, cy: float, rho: np.ndarray, frame: Frame
) -> tuple[np.ndarray, np.ndarray]:
    """Brightness along the rays `_RAYS` from (cx, cy), sampled at radii `rho`: (profiles [360,
    len(rho)], n_in [360]), n_in the number of a ray's leading samples inside the frame (a ray
    leaving a rectangle never re-enters it)."""
    x0, y0, x1, y1 = frame
    c, s = _RAYS[:, 0], _RAYS[:, 1]
    mx = (cx + c[:, None] * rho[None, :]).astype(np.float32)
    my = (cy + s[:, None] * rho[None, :]).astype(np.float32)
    prof = cv2.remap(bright, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float64)
    inside = (mx >= x0 + 1) & (mx <= x1 - 1) & (my >= y0 + 1) & (my <= y1 - 1)
    n_in = np.where(inside.all(axis=1), rho.size, np.argmin(inside, axis=1))
    return prof, n_in


def _steepest_edges(
    bright: np.ndarray, circle: tuple[float, float, float], low: float, level: float, frame: Frame, u: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each ray's steepest brightness drop within 15 % of r: (edge radii [360], contrast [360], ok [360]).

    A ray is ok if past the drop, from half a window to two windows out (windows of 3 native px, `u`
    small px each; within the frame), it reaches below `level` (the surround) and the drop is at
    least half of level - low. A bright rim's edge, blurred and ringing from JPEG, reaches the
    surround only there. contrast: the mean before the drop minus the minimum past it.
    """
    cx, cy, r = circle
    step = _ray_step(u)
    rho = np.arange(0.85 * r, 1.15 * r + 4.0 * u, step)
    prof, n_in = _radial_profiles(bright, cx, cy, rho, frame)
    rows = np.arange(len(prof))
    grad = np.gradient(prof, axis=1)
    k = round(3.0 * u / step)
    j_all = np.arange(rho.size)[None, :]
    searchable = (j_all >= k) & (j_all < (n_in - round(u / step))[:, None])
    j = np.argmin(np.where(searchable, grad, np.inf), axis=1)
    ok = searchable[rows, j]
    csum = np.concatenate([np.zeros((len(prof), 1)), np.cumsum(prof, axis=1)], axis=1)
    a, b = np.clip(j - k, 0, rho.size), np.clip(j - k // 2, 0, rho.size)
    before = (csum[rows, b] - csum[rows, a]) / np.maximum(1, b - a)
    past = (j_all >= (j + k // 2)[:, None]) & (j_all < np.minimum(j + 2 * k, n_in)[:, None])
    after = np.where(past, prof, np.inf).min(axis=1)
    after = np.where(np.isfinite(after), after, prof[rows, np.clip(n_in - 1, 0, rho.size - 1)])
    # Past the drop the ray must fall close to the surround (within 15 % of the rim's height) and
    # the drop must be at least half of level - low: a glare rim or a JPEG block edge inside the
    # FOV drops steeply but not to black.
    ok &= (after - low < 0.15 * (before - low)) & (before - after > 0.5 * (level - low))
    jj = np.clip(j, 1, rho.size - 2)
    g0, g1, g2 = grad[rows, jj - 1], grad[rows, jj], grad[rows, jj + 1]
    denom = g0 - 2.0 * g1 + g2
    offset = np.where(denom > 0, 0.5 * (g0 - g2) / np.where(denom > 0, denom, 1.0), 0.0)
    return rho[jj] + step * np.clip(offset, -1.0, 1.0), before - after, ok


def _mass_edges(
    bright: np.ndarray, cx: float, cy: float, r: float, low: float, frame: Frame, u: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each ray's edge near radius r, placed by the brightness the rim carries above the surround:
    (edge radii [360], rim contrast [360], ok [360]).

    A dim rim in a JPEG is smeared over its 8x8 blocks and quantised with them, so its steepest
    drop lies wherever a block boundary or the vignetting slope happens to be; blurring and block
    averaging keep the brightness *sum*. The excess over the surround from r - 2 to r + 5 native px
    (`u` small px each), divided by the rim's level (a line fitted from r - 6 to r - 2 px, never
    rising outwards, extrapolated), is how far the FOV extends past r - 2. The surround level is the
    trimmed mean (the sum is what the blocks keep, not the median) of the samples 3 to 8 px outside
    r, or `low` if the frame keeps less than 25 native px of ray for them (100 samples when u = 1).
    """
    step = _ray_step(u)
    fa, fb, sb = _MASS_SPAN
    s0, s1 = _SURROUND_SPAN
    rho = np.arange(r - fa * u, r + max(sb, s1) * u, step)
    prof, n_in = _radial_profiles(bright, cx, cy, rho, frame)
    rows = np.arange(len(prof))
    ja, jr, jb = (round(v * u / step) for v in (fa - fb, fa, fa + sb))
    j_all = np.arange(rho.size)[None, :]
    js0, js1 = round((fa + s0) * u / step), round((fa + s1) * u / step)
    outer = np.sort(prof[(j_all >= js0) & (j_all < np.minimum(n_in, js1)[:, None])])
    n = outer.size
    surround = float(outer[n // 10 : n - n // 10].mean()) if n * step >= 25.0 * u else low
    x = rho[:ja] - rho[ja]
    xc, pc = x - x.mean(), prof[:, :ja] - prof[:, :ja].mean(axis=1, keepdims=True)
    slope = (pc * xc).sum(axis=1) / (xc * xc).sum()
    rim = prof[:, :ja].mean(axis=1) - slope * x.mean() - surround  # the line's excess at r - 2 px
    slope = np.minimum(slope, 0.0)  # extrapolated past r - 2 px only while it falls
    end = np.minimum(jb, n_in)
    csum = np.concatenate([np.zeros((len(prof), 1)), np.cumsum(prof - surround, axis=1)], axis=1)
    mass = (csum[rows, np.maximum(end, ja)] - csum[rows, ja]) * step
    # The extent L past r - 2 px: rim L + slope L^2 / 2 = mass (a stable form of the root).
    ext = 2.0 * mass / np.maximum(rim + np.sqrt(np.maximum(rim * rim + 2.0 * slope * mass, 0.0)), 1e-12)
    ok = (n_in >= jr) & (rim > 0) & (ext > 0) & (ext < (end - ja) * step)
    return rho[ja] + ext, rim, ok


def _refine_circle(
    bright: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    low: float,
    level: float,
    frame: Frame,
    u: float,
) -> tuple[float, float, float] | None:
    """Move the circle onto the FOV's actual edge, found along radial rays.

    The threshold outline sits wherever the dim periphery crosses the threshold, so vignetting
    (common in EyePACS) shrinks it, and in a dark, glary photograph it bulges out at the glare and
    falls inside the dim side. bright: [h, w] smoothed brightness; (cx, cy, r): the outline's
    circle; low: the surround's level; level: the outline's threshold; frame: (x0, y0, x1, y1), the
    first and last columns and rows inside the frame (the image, less any straight black bands);
    u: small-image pixels per native pixel (> 1 for an enlarged small image).

    On a ray whose rim stands well above the surround (a bright rim: `_STRONG_EDGE`) the edge is the
    steepest drop (`_steepest_edges`), to a fraction of a pixel; on a dim ray that drop can be far
    off and the edge is placed by the brightness the rim carries (`_mass_edges`), to a pixel or
    two. Both go into one robust circle fit, weighted by how well each locates the edge: a bright
    arc alone is too short to fix the radius when the frame cuts the circle, and a dim one alone
    too vague. The bright rays' edges are found once, from the outline's circle, and first fix a
    circle of their own; the dim rays' are found from the current circle and the fit is repeated
    once (a third round measured worse on the full sweep). Rays that leave the frame before the
    edge are skipped. Returns None if too few rays agree or the circle would move implausibly far.
    """
    cur = (cx, cy, r + 0.5)
    dirs = _RAYS
    steep0, contrast0, ok0 = _steepest_edges(bright, cur, low, level, frame, u)
    strong0 = ok0 & (contrast0 >= _STRONG_EDGE)
    pts0 = np.array(cur[:2]) + dirs * steep0[:, None]
    if ok0.sum() >= 12:
        c1 = _robust_circle(pts0[ok0], contrast0[ok0] ** 2)[:3]
        if math.isfinite(c1[2]) and math.hypot(c1[0] - cx, c1[1] - cy) + abs(c1[2] - r) <= 0.15 * r:
            cur = c1
    ps = pts0[strong0]
    for _ in range(2):
        mass, rim, mass_ok = _mass_edges(bright, *cur, low, frame, u)
        weak = ~strong0 & mass_ok & (rim >= _MIN_RIM)
        pw = (np.array(cur[:2]) + dirs * mass[:, None])[weak]
        pts = np.concatenate([ps, pw])
        sigma = np.concatenate([np.full(len(ps), _EDGE_SIGMA[0]), np.full(len(pw), _EDGE_SIGMA[1])]) * u
        if len(pts) < 16:
            return None
        ncx, ncy, nr, inliers = _robust_circle(pts, 1.0 / sigma**2, max_frac=_EDGE_MAX_FRAC)
        if not math.isfinite(nr) or inliers.sum() < 16:
            return None
        cur = (ncx, ncy, nr)
    if math.hypot(cur[0] - cx, cur[1] - cy) + abs(cur[2] - r) > 0.15 * r:
        return None
    return cur


def _no_fundus(reason: str) -> NoFundusError:
    return NoFundusError(None, f"no fundus found: {reason}")


def _otsu(hist: np.ndarray) -> int | None:
    """Otsu's threshold of a histogram: the t that maximises the between-class variance of the
    values <= t against those > t (as cv2.THRESH_OTSU); None if it holds fewer than two values."""
    levels = np.arange(hist.size, dtype=np.float64)
    w0 = np.cumsum(hist, dtype=np.float64)
    m0 = np.cumsum(hist * levels)
    w1 = w0[-1] - w0
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return None
    mu0 = m0 / np.where(w0 > 0, w0, 1.0)
    mu1 = (m0[-1] - m0) / np.where(w1 > 0, w1, 1.0)
    return int(np.argmax(np.where(valid, w0 * w1 * (mu0 - mu1) ** 2, -1.0)))


def _hist_median(hist: np.ndarray, lo: int, hi: int) -> float:
    """np.median of the values lo..hi (inclusive) counted in a histogram of integer values."""
    c = np.cumsum(hist[lo : hi + 1])
    n = int(c[-1])
    below = np.searchsorted(c, [(n - 1) // 2, n // 2], side="right")
    return lo + 0.5 * float(below[0] + below[1])


def _surround_levels(u8: np.ndarray) -> list[tuple[float, float]]:
    """Candidate (surround level, FOV level) pairs, best first, from the uint8 brightness image.

    Otsu first, as a fundus photograph is mostly bimodal: black surround, bright FOV. When the
    frame cuts away most of the surround (a wide disc, deep cuts) the surround is a sliver of the
    histogram and Otsu splits the FOV itself, bright centre against dim periphery; Otsu run again
    on the lower class then separates the black surround from the periphery. Each further level is
    only tried if the one before gives no round FOV (see `detect_fov`).
    """
    hist = np.bincount(u8.ravel(), minlength=256)
    out = []
    top = 255
    for _ in range(1 + _MAX_DESCENTS):
        t = _otsu(hist[: top + 1])
        if t is None:
            break
        levels = (_hist_median(hist, 0, t), _hist_median(hist, t + 1, 255))
        if levels not in out:
            out.append(levels)
        top = t
    return out


def _corner_level(u8: np.ndarray) -> tuple[float, float]:
    """(level, spread) of the frame's corners: the second-darkest corner patch's median, and the
    range of its middle 90 % of values (the surround's noise).

    A FOV whose edge shows anywhere inside the frame leaves the frame's corners in the black
    surround (or in a band), however little of the surround the frame keeps: that is where a
    histogram split misses it. The second-darkest corner tolerates a corner that text or a
    bright notch covers.
    """
    hs, ws = u8.shape
    p = max(2, round(0.02 * min(hs, ws)))
    patches = sorted((u8[:p, :p], u8[:p, -p:], u8[-p:, :p], u8[-p:, -p:]), key=lambda c: float(np.median(c)))
    lo, mid, hi = np.percentile(patches[1], [5, 50, 95])
    return float(mid), float(hi - lo)


def _band_frame(pts: np.ndarray, ws: int, hs: int, tol: float) -> list[int]:
    """The frame [x0, y0, x1, y1] (first/last column and row inside it) that the region's outline
    suggests: the image, pulled in to any straight, axis-aligned edge of the region at its top,
    bottom, left or right. Such an edge is a camera mask's black band (EyePACS cuts top and bottom
    this way), not part of the circle. pts: outline [N, 2] (x, y) ints in the small image; tol: how
    far (px) the edge's points may lie from its extreme row or column (JPEG blocks make it ragged,
    by more in an enlarged small image).

    A circle's own extreme rows are nearly straight too: within t = tol + 1 rows of its top it has
    about 2 sqrt(2 t r) outline points. A band edge needs 1.5 times that (a cut at least ~3 % of r deep;
    shallower cuts are a few outliers to the circle fit), and the caller keeps it only if it lies
    clearly inside the fitted circle. The edge is put at its densest line within tol of the extreme,
    not at the extreme: a protrusion there (a JPEG block, a glare spill) would leave the edge's own
    line of points inside the frame, where they pull the circle fit.
    """
    x, y = pts[:, 0], pts[:, 1]
    r_est = 0.5 * max(int(x.max() - x.min()), int(y.max() - y.min()))  # <= r, equal unless cut
    need = max(12.0, 3.0 * math.sqrt(2.0 * (tol + 1.0) * r_est))
    frame = [0, 0, ws - 1, hs - 1]
    lo_x, lo_y, hi_x, hi_y = int(x.min()), int(y.min()), int(x.max()), int(y.max())
    t = int(math.floor(tol))

    def densest(v: np.ndarray) -> int:  # offset (0..t) from the extreme with the most edge points
        return int(np.argmax(np.bincount(v[v <= t], minlength=t + 1)))

    if lo_x > 1 and (x <= lo_x + tol).sum() >= need:
        frame[0] = lo_x + densest(x - lo_x)
    if lo_y > 1 and (y <= lo_y + tol).sum() >= need:
        frame[1] = lo_y + densest(y - lo_y)
    if hi_x < ws - 2 and (x >= hi_x - tol).sum() >= need:
        frame[2] = hi_x - densest(hi_x - x)
    if hi_y < hs - 2 and (y >= hi_y - tol).sum() >= need:
        frame[3] = hi_y - densest(hi_y - y)
    return frame


def _free_points(pts: np.ndarray, frame: list[int], hs: int, ws: int) -> np.ndarray:
    """Outline points not on the frame's edge: within 1 px of the image border, or within 3 px of a
    band's edge (JPEG noise in the band makes that edge ragged by a pixel or two; points further in
    are outliers the robust fit drops, while a wider margin eats the short arcs of a corner-cut
    frame: measured, 3 of the sweep's cases refused at tol + 1)."""
    x0, y0, x1, y1 = frame
    m0, m1 = (1 if x0 == 0 else 3), (1 if x1 == ws - 1 else 3)
    n0, n1 = (1 if y0 == 0 else 3), (1 if y1 == hs - 1 else 3)
    x, y = pts[:, 0], pts[:, 1]
    return pts[(x > x0 + m0) & (x < x1 - m1) & (y > y0 + n0) & (y < y1 - n1)]


def _round_region(
    u8: np.ndarray, thr: float, black: float, tol: float, sharp: np.ndarray | None = None
) -> tuple[float, float, float, float, Frame]:
    """The round FOV in the small brightness image `u8` thresholded at `thr`; `black` is the
    image's darkest class level (the surround's, if there is a fundus); `tol`: as in `_band_frame`;
    `sharp`: if `u8` is a smoothed copy, the unsmoothed brightness, which must also be above `thr`
    over `_MIN_SHARP_COVERAGE` of the disc's inner 90 %.

    Returns (cx, cy, r, coverage, frame) in small-image pixels, frame = (x0, y0, x1, y1) as in
    `_band_frame`. Raises NoFundusError (with the reason) if the bright region is not a FOV.
    """
    hs, ws = u8.shape
    mask = (u8 > thr).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)  # JPEG specks, thin text in the surround
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n < 2:
        raise _no_fundus("no bright region after removing noise")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=len)
    filled = np.zeros_like(region)
    cv2.drawContours(filled, [outline], -1, 1, thickness=-1)  # fills holes (dark lesions, disc rim)

    pts = outline[:, 0, :]
    frame = _band_frame(pts, ws, hs, tol)
    free = _free_points(pts, frame, hs, ws).astype(np.float64)
    if len(free) < 16:
        raise _no_fundus("the bright region fills the frame; no edge of a field of view is visible")
    cx, cy, r, inliers = _robust_circle(free)
    if math.isfinite(r) and r > 0:
        # A band edge must cut the circle: a straight edge at the circle's own extreme (within a
        # pixel or 1 % of r) is the circle's flat top, not a band. Drop those and refit once.
        depth = max(1.5, 0.01 * r)
        keep = [
            frame[0] == 0 or frame[0] - 0.5 - (cx - r) >= depth,
            frame[1] == 0 or frame[1] - 0.5 - (cy - r) >= depth,
            frame[2] == ws - 1 or (cx + r) - (frame[2] + 0.5) >= depth,
            frame[3] == hs - 1 or (cy + r) - (frame[3] + 0.5) >= depth,
        ]
        if not all(keep):
            whole = (0, 0, ws - 1, hs - 1)
            frame = [v if k else w0 for v, k, w0 in zip(frame, keep, whole, strict=True)]
            free = _free_points(pts, frame, hs, ws).astype(np.float64)
            cx, cy, r, inliers = _robust_circle(free)
    if not (math.isfinite(r) and r > 0):
        raise _no_fundus("the bright region's outline is not circular")
    if inliers.mean() < _MIN_INLIER_FRACTION:
        raise _no_fundus(
            f"the bright region's outline is not circular ({100 * inliers.mean():.0f}% of it on a circle)"
        )
    # Enough of the circle, spread around it, to pin down centre and radius: EyePACS leaves two
    # opposite arcs, a corner-cropped photo four short ones; one short arc is not enough.
    angles = np.degrees(np.arctan2(free[inliers, 1] - cy, free[inliers, 0] - cx))
    bins = np.unique(np.floor((angles + 180.0) / 10.0).astype(int) % 36)
    gaps = np.diff(np.concatenate([bins, bins[:1] + 36]))
    arc, spread = 10.0 * bins.size, 360.0 - 10.0 * (int(gaps.max()) - 1)
    if arc < _MIN_ARC_DEGREES or spread < _MIN_SPREAD_DEGREES:
        raise _no_fundus(f"too little of a circular edge is visible ({arc:.0f} degrees)")
    if not (0 <= cx < ws and 0 <= cy < hs):
        raise _no_fundus("the fitted circle's centre lies outside the image")
    if 2 * r < _MIN_DIAMETER_FRACTION * min(ws, hs):
        raise _no_fundus(
            f"the round bright region is too small (diameter {100 * 2 * r / min(ws, hs):.0f}% "
            "of the image's shorter side)"
        )

    x0, y0, x1, y1 = frame
    yy, xx = np.mgrid[0:hs, 0:ws]
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    disc = d2 <= r * r
    in_frame = disc[y0 : y1 + 1, x0 : x1 + 1]
    visible = in_frame.sum() / (math.pi * r * r)
    if visible < _MIN_VISIBLE_FRACTION:
        raise _no_fundus(f"most of the fitted circle lies outside the image ({100 * visible:.0f}% inside)")
    covered = filled.astype(bool)
    coverage = float((covered[y0 : y1 + 1, x0 : x1 + 1] & in_frame).sum() / max(1, in_frame.sum()))
    if coverage < _MIN_COVERAGE:
        raise _no_fundus(f"the bright region fills only {100 * coverage:.0f}% of its fitted circle")
    spill = float((covered & (d2 > (1.03 * r) ** 2)).sum() / max(1, filled.sum()))
    if spill > _MAX_SPILL:
        raise _no_fundus(f"{100 * spill:.0f}% of the bright region lies outside its fitted circle")
    # A FOV is surrounded by black. A round glare patch inside a fundus passes every shape check
    # above when the frame has cut away most of the black: its surroundings are the fundus.
    beyond = d2[y0 : y1 + 1, x0 : x1 + 1] > (1.06 * r + 2.0) ** 2
    if beyond.sum() >= 20:
        crop = u8[y0 : y1 + 1, x0 : x1 + 1]
        outside, inside = float(np.median(crop[beyond])), float(np.median(crop[in_frame]))
        if outside - black > max(_MAX_SURROUND_STEP, _MAX_SURROUND_LEVEL * (inside - black)):
            raise _no_fundus(
                "the round bright region is not surrounded by black (outside it "
                f"{100 * (outside - black) / max(1.0, inside - black):.0f}% as bright as inside)"
            )
    if sharp is not None:
        inner = d2[y0 : y1 + 1, x0 : x1 + 1] <= (0.9 * r) ** 2
        share = float((sharp[y0 : y1 + 1, x0 : x1 + 1][inner] > thr).mean()) if inner.any() else 0.0
        if share < _MIN_SHARP_COVERAGE:
            raise _no_fundus(f"the bright region fills only {100 * share:.0f}% of its fitted circle")
    return cx, cy, r, coverage, (x0, y0, x1, y1)


def detect_fov(img: np.ndarray) -> FOV:
    """Find the circular field of view of a fundus photograph.

    img: channel-last [H, W] or [H, W, C], C in (1, 3, 4), uint8 / uint16 / float in [0, 1].
    Returns the FOV circle in `img`'s pixel coordinates; if the frame cuts the circle (EyePACS crops
    top and bottom, by the image's edge or by straight black bands), the full circle is returned
    and `frame_cut` > 0.

    Method (on a copy downscaled to about 384 px): brightness = mean of red and green (blue is dark and
    noisy in fundus photos), Gaussian-smoothed; normalised by its 99.9th percentile so dark and
    overexposed photos look alike; Otsu splits surround from FOV, and the threshold is placed 30% of
    the way from the surround's median to the FOV's median (robust to JPEG noise, keeps the dim
    periphery); morphological opening; largest connected component, holes filled; a robust circle
    fit to its outline points that lie neither on the image border nor on a straight black band's
    edge; sanity checks (the reasons in NoFundusError); finally the circle is moved onto the
    steepest radial brightness drop, the FOV's true edge, which vignetting and exposure do not
    shift. If the checks fail, Otsu is run again on the darker class (a frame that cuts away most
    of the surround leaves too little of it for one Otsu split) and the checks are repeated; failing
    that, all of it once more on a more heavily smoothed copy (a dark rim under coarse JPEG).

    Raises NoFundusError (a BadInputError) when there is no fundus: black, uniform, too small or
    strip-shaped (sides more than 4:1) images, no dark surround, or a bright region that is not a
    large round disc (natural photos, faces, noise).
    """
    arr = as_hwc(img)
    h, w = arr.shape[:2]
    if min(h, w) < _MIN_SIDE:
        raise _no_fundus(f"the image is too small ({w}x{h} px)")
    if max(h, w) > _MAX_ASPECT * min(h, w):
        # Also keeps the shrink below sound: one factor for both sides would take a strip's short
        # side to 0 px (a fuzzed JPEG header of 15621x40 px crashed cv2.resize before this check).
        raise _no_fundus(f"the image is {w}x{h} px, a strip: its sides are more than {_MAX_ASPECT:g}:1")
    scale = value_scale(arr)

    # Shrink by an integer factor (dropping < f edge pixels): cv2's INTER_AREA has a fast exact path
    # for integer ratios (1.5 ms instead of 4.5 ms for 1411 px), and small pixel i then covers
    # exactly full-res pixels [f * i, f * (i + 1)).
    # Small images are enlarged by an integer factor instead (f = 1 / u): the smoothing, the opening
    # and the edge windows below are a few pixels wide, too coarse for a 64 or 128 px photograph's
    # rim, and bilinear enlargement maps pixel centres the same way, (i + 0.5) / u - 0.5.
    if max(h, w) >= _MIN_DETECT_SIDE:
        f: float = max(1, round(max(h, w) / _DETECT_SIDE))
        hs, ws = h // int(f), w // int(f)
        small = resize(arr[: hs * int(f), : ws * int(f)], ws, hs) if f > 1 else arr
    else:
        u = math.ceil(_MIN_DETECT_SIDE / max(h, w))
        f, hs, ws = 1.0 / u, h * u, w * u
        small = resize(arr, ws, hs)

    rgb = rgb_float(small, scale)
    bright = 0.5 * (rgb[:, :, 0] + rgb[:, :, 1])
    bright = cv2.GaussianBlur(bright, (0, 0), sigmaX=1.5)

    top = float(np.percentile(bright, 99.9))
    if top < _BLACK_LEVEL:
        raise _no_fundus(
            f"the image is black or nearly black (99.9th percentile brightness {top * 255:.1f}/255)"
        )
    bright_n = bright * np.float32(1.0 / top)
    u8 = np.clip(bright_n * 255.0 + 0.5, 0, 255).astype(np.uint8)
    levels = _surround_levels(u8)
    if not levels:
        raise _no_fundus("the image is uniform (no bright field of view against a dark surround)")
    # (surround level, FOV level, threshold) candidates, tried in turn until one gives a round FOV.
    candidates = [(low, high, low + _THRESHOLD_FRACTION * (high - low)) for low, high in levels]
    # Last resort, a threshold just above the noise of the frame's corners: for a dark fundus with
    # strong glare the histogram splits above all fall between glare and fundus, or inside the
    # fundus, and put the threshold above its dim periphery.
    corner, spread = _corner_level(u8)
    corner_thr = corner + max(3.0, 1.5 * spread)
    brighter = u8[u8 > corner_thr]
    if brighter.size:
        candidates.append((corner, float(np.median(brighter)), corner_thr))
        # ... and, failing that, the usual fraction of the way from the corners' level to the FOV's.
        high = float(np.median(brighter))
        candidates.append((corner, high, corner + _THRESHOLD_FRACTION * (high - corner)))
    black = min(corner, *(low for low, _ in levels))
    first_error: NoFundusError | None = None

    def tries():  # (candidate, the brightness it thresholds)
        yield from ((c, u8) for c in candidates)
        # Last of all, the same candidates on a more heavily smoothed copy: a dark rim under coarse
        # JPEG (quality 30 at 128 px) breaks the outline up at every threshold, and smoothing makes
        # it round again. It also rounds off a block of bright text, so the disc it gives must be
        # bright in `u8` too (`_round_region`'s `sharp`).
        soft = cv2.GaussianBlur(bright_n, (0, 0), sigmaX=_SOFT_SIGMA)
        u8_soft = np.clip(soft * 255.0 + 0.5, 0, 255).astype(np.uint8)
        yield from ((c, u8_soft) for c in candidates)

    for (low, high, thr), img8 in tries():
        if high - low < _MIN_REL_CONTRAST * high:
            if first_error is None:
                first_error = _no_fundus(
                    f"no dark surround around a bright field of view (contrast {100 * (high - low) / high:.0f}%)"
                )
            continue
        try:
            cx, cy, r, coverage, frame = _round_region(
                img8, thr, black, _EDGE_TOLERANCE * max(1.0, 1.0 / f), sharp=None if img8 is u8 else u8
            )
        except NoFundusError as exc:
            first_error = first_error or exc
            continue
        break
    else:
        assert first_error is not None
        raise first_error

    # Outline pixels are the outermost pixels *inside* the region: the edge is half a pixel out.
    fitted = (cx, cy, r + 0.5)
    refined = _refine_circle(bright_n, cx, cy, r, low / 255.0, thr / 255.0, frame, max(1.0, 1.0 / f))
    cx, cy, r = refined if refined is not None else fitted
    # Back to full-resolution pixel coordinates (small pixel centre i <-> full-res f * (i + 0.5) - 0.5).
    cx_full = f * (cx + 0.5) - 0.5
    cy_full = f * (cy + 0.5) - 0.5
    r_full = f * r
    # The frame's top and bottom edges in full-res pixels: the image's, or a black band's.
    x0, y0, x1, y1 = frame
    top_edge = -0.5 if y0 == 0 else f * y0 - 0.5
    bottom_edge = h - 0.5 if y1 == hs - 1 else f * (y1 + 1) - 0.5
    outside = max(0.0, top_edge - (cy_full - r_full)) + max(0.0, (cy_full + r_full) - bottom_edge)
    frame_cut = min(1.0, outside / (2 * r_full))
    return FOV(cx=cx_full, cy=cy_full, radius=r_full, frame_cut=frame_cut, coverage=coverage)
