"""The Anomaly page: check, decode, preprocess and score one upload, with an occlusion heat map."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from retinagen.checks import check, int_in
from retinagen.dashboard_api.run import DashboardRun
from retinagen.errors import NoFundusError, RetinagenError


@dataclass
class UploadAnalysis:
    """What the Anomaly page shows for one upload (all arrays are uint8 RGB unless said otherwise).

    status: "ok" (scored, or preprocessed when the run has no scorer) or "no_fundus" (``reason`` says why).
    preview: the decoded upload, longer side <= 512 px, with the detected FOV circle drawn.
    prepared: [R, R, 3], what the scorer sees (crop, resize, mask). heatmap: float [g, g] >= 0, the score drop
    when each region is replaced by its smoothed surroundings (None when not computed); overlay: the heat map
    over ``prepared``.
    """

    kind: str
    status: str
    reason: str = ""
    preview: np.ndarray | None = None
    fov: Any = None
    prepared: np.ndarray | None = None
    score: float | None = None
    percentile: float | None = None
    flagged: bool | None = None
    threshold: float | None = None
    top_features: list[tuple[str, float]] = field(default_factory=list)
    heatmap: np.ndarray | None = None
    overlay: np.ndarray | None = None
    heatmap_note: str = ""


def _preview(pixels: np.ndarray, fov: Any, side: int = 512) -> np.ndarray:
    """uint8 RGB preview (longer side <= ``side``) of decoded pixels, with the FOV circle when given."""
    from retinagen.data.preprocess import to_rgb_float

    rgb = (np.clip(to_rgb_float(pixels), 0, 1) * 255 + 0.5).astype(np.uint8)
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if fov is not None:
        centre = (round((fov.cx + 0.5) * scale - 0.5), round((fov.cy + 0.5) * scale - 0.5))
        cv2.circle(small, centre, max(1, round(fov.radius * scale)), (0, 255, 0), max(1, round(2 * max(small.shape) / 512)))
    return np.ascontiguousarray(small)


HEATMAP_METHODS = ("mahalanobis", "knn")  # feature-only scorers: one batch of occluded images is cheap


def occlusion_heatmap(run: DashboardRun, prepared: np.ndarray, grid: int = 4) -> np.ndarray:
    """Occlusion sensitivity of the anomaly score: float [grid, grid] >= 0.

    Each cell of the prepared image uint8 [R, R, 3] is replaced in turn by a strongly smoothed copy of the image
    (Gaussian, sigma R / 8, masked: what an unremarkable fundus would show there), and all grid^2 copies are
    scored in one batch. Cell value = max(0, score(image) - score(occluded copy)): how much of the score that
    region explains. Only for feature-only scorers (`HEATMAP_METHODS`); `RetinagenError` otherwise.
    """
    from clinical.anomaly import FeatureExtractor
    from retinagen.data.preprocess import circular_mask, to_model_range

    scorer = run.scorer
    if scorer is None:
        raise RetinagenError("this run has no anomaly scorer")
    if scorer.method.name not in HEATMAP_METHODS:
        raise RetinagenError(f"no heat map for the {scorer.method.name} scorer (one inversion per region)")
    r = prepared.shape[0]
    if prepared.shape != (r, r, 3) or prepared.dtype != np.uint8:
        raise ValueError(f"prepared must be uint8 [R, R, 3], got {prepared.dtype} {prepared.shape}")
    grid = check(int_in(2, r), grid, "grid")
    smooth = cv2.GaussianBlur(prepared.astype(np.float32), (0, 0), sigmaX=r / 8.0)
    smooth = (np.clip(smooth, 0, 255) + 0.5).astype(np.uint8) * circular_mask(r, r)[:, :, None].astype(np.uint8)
    edges = np.linspace(0, r, grid + 1).round().astype(int)
    copies = []
    for i in range(grid):
        for j in range(grid):
            c = prepared.copy()
            ys, xs = slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1])
            c[ys, xs] = smooth[ys, xs]
            copies.append(to_model_range(c))
    batch = torch.stack([to_model_range(prepared), *copies])
    with run.lock:
        scores = scorer.score_images(run.model, batch, extractor=FeatureExtractor(run.model)).score
    return np.maximum(scores[0] - scores[1:], 0.0).reshape(grid, grid)


def heatmap_overlay(prepared: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heat map [g, g] (scaled to its maximum) in the JET colour map over ``prepared`` uint8 [R, R, 3]."""
    r = prepared.shape[0]
    top = float(heat.max())
    norm = heat / top if top > 0 else np.zeros_like(heat)
    big = cv2.resize(norm.astype(np.float32), (r, r), interpolation=cv2.INTER_NEAREST)
    colour = cv2.cvtColor(cv2.applyColorMap((big * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (prepared.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha + 0.5).astype(np.uint8)


def analyse_upload(run: DashboardRun, upload: Any, *, heatmap_grid: int | None = 4) -> UploadAnalysis:
    """Check, decode, preprocess and score one upload (bytes or a binary file object).

    Raises `retinagen.data.uploads.UploadError` for a file that is not an acceptable, decodable PNG / JPEG /
    DICOM. A decodable image without a fundus is not an error: status "no_fundus" with the detector's reason.
    """
    from clinical.anomaly import FeatureExtractor
    from retinagen.data.preprocess import detect_fov, preprocess_fundus, to_model_range
    from retinagen.data.uploads import decode_upload

    up = decode_upload(upload)
    try:
        fov = detect_fov(up.pixels)
    except NoFundusError as exc:
        return UploadAnalysis(up.kind, "no_fundus", exc.reason, preview=_preview(up.pixels, None))
    res = run.model.resolution
    ben_graham = bool(run.scorer.ben_graham) if run.scorer is not None else False
    prepared = preprocess_fundus(up.pixels, res, ben_graham=ben_graham, fov=fov)
    out = UploadAnalysis(up.kind, "ok", preview=_preview(up.pixels, fov), fov=fov, prepared=prepared)
    if run.scorer is None:
        out.reason = run.scorer_error or "this run has no anomaly scorer (anomaly/scorer.json)"
        return out
    with run.lock:
        batch = run.scorer.score_images(run.model, to_model_range(prepared)[None],
                                        extractor=FeatureExtractor(run.model))
    out.score, out.percentile = float(batch.score[0]), float(batch.percentile[0])
    out.flagged, out.threshold = bool(batch.flagged[0]), float(run.scorer.threshold)
    out.top_features = list(batch.top[0])
    if heatmap_grid:
        try:
            out.heatmap = occlusion_heatmap(run, prepared, min(heatmap_grid, res))
            out.overlay = heatmap_overlay(prepared, out.heatmap)
        except RetinagenError as exc:
            out.heatmap_note = str(exc)
    return out
