"""Rendering a synthetic fundus photograph from its :class:`FundusFactors` (numpy + OpenCV).

Rendering is at the target resolution (no 1024 px render downsampled); geometry is in normalised
image coordinates (see :mod:`retinagen.data.synthetic`). ``benchmarks/synth_throughput.py``
measures its speed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from functools import lru_cache

import cv2
import numpy as np

from retinagen.data.synth_factors import (
    MAX_LESIONS,
    FundusFactors,
    SynthArgumentError,
    check_resolution,
    sample_factors,
)

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
    m = MAX_LESIONS["microaneurysms"]
    pos = _push_off_disc(_soft_clamp_into_fov(macula + rng.normal(0, 0.32 * s, (m, 2)), f), disc, disc_clear)
    rad = (0.007 + 0.006 * rng.random(m)) * s * half
    for i in range(f.microaneurysms):
        _circle(red, pos[i], rad[i], resolution, 0.95)

    # Dot/blot haemorrhages (round/irregular) and flame haemorrhages (along the nerve fibres).
    m = MAX_LESIONS["haemorrhages"]
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
    m = MAX_LESIONS["exudates"]
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
    m = MAX_LESIONS["cotton_wool_spots"]
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
    m = MAX_LESIONS["neovascular_tufts"]
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
    res = check_resolution(resolution)
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
    res = check_resolution(resolution)
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
