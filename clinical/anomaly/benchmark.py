"""Evaluation of a scorer on labelled images, and the anomaly benchmark.

`run_benchmark` fits on grade-0 images of a synthetic fundus dataset, then reports AUROC per anomaly type
(referable DR, faces, natural images, corrupted fundus) per scorer. Nothing in it is tuned on its own
results: every constant is fixed here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from clinical.anomaly.features import FeatureExtractor
from clinical.anomaly.methods import build_method
from clinical.anomaly.scorer import (
    DEFAULT_FPR,
    SCORER_VERSION,
    AnomalyScorer,
    _read_prepared,
    fit_scorer_on_images,
    load_scorer_model,
    score_files,
)
from retinagen.data.dataset import ZipImageDataset
from retinagen.data.preprocess import circular_mask, preprocess_fundus, to_model_range
from retinagen.errors import (
    ConfigError,
    NoFundusError,
    RetinagenError,
)
from retinagen.generation import LoadedModel, load_model
from retinagen.progress import progress_bar


def detection_metrics(
    normal_scores: np.ndarray, abnormal_scores: np.ndarray, threshold: float
) -> dict[str, Any]:
    """AUROC, AUPR (average precision, abnormal = positive) and F1/TPR/FPR at ``threshold`` (flag: s > t).

    Scores may be +inf (inputs refused by the FOV detector count as flagged, ranked above every scored
    image); they are replaced by a finite value above every finite score and the threshold, which
    leaves ranks and flags unchanged.
    """
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    a = np.asarray(normal_scores, dtype=np.float64)
    b = np.asarray(abnormal_scores, dtype=np.float64)
    out: dict[str, Any] = {"n_normal": int(a.size), "n_abnormal": int(b.size)}
    if a.size == 0 or b.size == 0:
        return out | {"auroc": None, "aupr": None, "f1": None, "tpr": None, "fpr": None}
    s = np.concatenate([a, b])
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN")
    finite = s[np.isfinite(s)]
    top = max(float(finite.max()) if finite.size else 0.0, threshold) + 1.0
    s = np.where(np.isposinf(s), top, s)
    y = np.concatenate([np.zeros(a.size, dtype=int), np.ones(b.size, dtype=int)])
    pred = (s > threshold).astype(int)
    return out | {
        "auroc": float(roc_auc_score(y, s)),
        "aupr": float(average_precision_score(y, s)),
        "f1": float(f1_score(y, pred, zero_division=0.0)),
        "tpr": float(pred[y == 1].mean()),
        "fpr": float(pred[y == 0].mean()),
    }


def _as_scores(
    scorer: AnomalyScorer, model: LoadedModel, inputs: Sequence[str | Path] | torch.Tensor, progress: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores of inputs (prepared tensor or files/folders): no_fundus -> +inf, unreadable files dropped."""
    if isinstance(inputs, torch.Tensor):
        batch = scorer.score_images(model, inputs)
        return batch.score, {
            "n": int(inputs.shape[0]),
            "n_scored": int(inputs.shape[0]),
            "n_no_fundus": 0,
            "unreadable": [],
        }
    results = score_files(scorer, model, inputs, progress=progress)
    scores = [np.inf if r.flag == "no_fundus" else r.score for r in results if r.flag != "unreadable"]
    return np.asarray(scores, dtype=np.float64), {
        "n": len(results),
        "n_scored": sum(r.score is not None for r in results),
        "n_no_fundus": sum(r.flag == "no_fundus" for r in results),
        "unreadable": [{"file": r.file, "reason": r.reason} for r in results if r.flag == "unreadable"],
    }


def evaluate(
    scorer: AnomalyScorer,
    normal_images: Sequence[str | Path] | torch.Tensor,
    abnormal_images: Sequence[str | Path] | torch.Tensor,
    *,
    model: LoadedModel | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Image-level AUROC, AUPR and F1 at the calibrated threshold of normal vs abnormal inputs.

    Inputs are files/folders (read through the training preprocessing) or prepared tensors [N, 3, R, R]
    in [-1, 1]. Images refused by the FOV detector count as flagged (score +inf: ranked above every
    scored image, in both classes); unreadable files are left out and listed.
    """
    model = model or load_scorer_model(scorer)
    a, info_a = _as_scores(scorer, model, normal_images, progress)
    b, info_b = _as_scores(scorer, model, abnormal_images, progress)
    return {
        "scorer": scorer.method.name,
        "checkpoint_sha256": scorer.checkpoint_sha256,
        "threshold": scorer.threshold,
        "target_fpr": scorer.fpr,
        "metrics": detection_metrics(a, b, scorer.threshold),
        "normal": info_a,
        "abnormal": info_b,
        "refused_policy": "no_fundus inputs count as flagged (score +inf); unreadable files are excluded",
    }


# ---------------------------------------------------------------------------------------------------
# The anomaly benchmark (issue 5, item 4)
# ---------------------------------------------------------------------------------------------------

# Fixed before any benchmark was run; never changed to improve a number.
CORRUPTIONS = ("blur", "overexposed", "underexposed", "occlusion")
NATURAL_IMAGES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "cat",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "page",
)
NATURAL_CROPS = 8  # random square crops per natural image
FACE_PHOTO_SIDE = 128  # LFW crops are 25 px: enlarged to a photo size the FOV detector accepts


def corrupt_fundus(img_u8: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A corrupted copy of a prepared fundus image uint8 [R, R, 3] (the circular mask is re-applied).

    blur: Gaussian, sigma = R / 20 (defocus); overexposed: x 2.2, clipped; underexposed: x 0.35;
    occlusion: a black disc of radius R / 5 at a random place inside the field of view (a lash / dust
    shadow). The constants are fixed a priori.
    """
    r = img_u8.shape[0]
    f = img_u8.astype(np.float32)
    if kind == "blur":
        f = cv2.GaussianBlur(f, (0, 0), sigmaX=r / 20.0)
    elif kind == "overexposed":
        f = f * 2.2
    elif kind == "underexposed":
        f = f * 0.35
    elif kind == "occlusion":
        ang, rad = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.5) * r / 2
        cx, cy = r / 2 + rad * math.cos(ang), r / 2 + rad * math.sin(ang)
        yy, xx = np.mgrid[0:r, 0:r]
        f[(xx - cx) ** 2 + (yy - cy) ** 2 <= (r / 5.0) ** 2] = 0.0
    else:
        raise ConfigError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    out = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    return out * circular_mask(r, r)[:, :, None].astype(np.uint8)


def _forced_prepare(img_u8: np.ndarray, resolution: int) -> np.ndarray:
    """Bypass the FOV detector: centre square crop, resize, circular mask -> uint8 [R, R, 3]."""
    if img_u8.ndim == 2:
        img_u8 = np.repeat(img_u8[:, :, None], 3, axis=2)
    h, w = img_u8.shape[:2]
    s = min(h, w)
    crop = img_u8[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s, :3]
    interp = cv2.INTER_AREA if s > resolution else cv2.INTER_LINEAR
    small = cv2.resize(np.ascontiguousarray(crop), (resolution, resolution), interpolation=interp)
    return small * circular_mask(resolution, resolution)[:, :, None].astype(np.uint8)


def _ood_photos(seed: int) -> dict[str, list[np.ndarray]]:
    """Out-of-distribution photographs, uint8 [H, W, 3]: LFW faces (enlarged) and natural-image crops."""
    import skimage.data

    faces = (np.clip(skimage.data.lfw_subset(), 0, 1) * 255 + 0.5).astype(np.uint8)
    face_photos = [
        np.repeat(
            cv2.resize(f, (FACE_PHOTO_SIDE, FACE_PHOTO_SIDE), interpolation=cv2.INTER_CUBIC)[:, :, None],
            3,
            axis=2,
        )
        for f in faces
    ]
    rng = np.random.default_rng(seed)
    natural: list[np.ndarray] = []
    for name in NATURAL_IMAGES:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - an image missing from this scikit-image build is skipped
            continue
        if img.dtype != np.uint8:
            continue
        img = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]
        h, w = img.shape[:2]
        for _ in range(NATURAL_CROPS):
            s = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            natural.append(np.ascontiguousarray(img[y : y + s, x : x + s]))
    return {"faces": face_photos, "natural": natural}


def _pipeline(photos: Sequence[np.ndarray], resolution: int) -> tuple[torch.Tensor, int]:
    """Photos through the real preprocessing: (accepted images [M, 3, R, R], number refused as no fundus)."""
    kept, refused = [], 0
    for p in photos:
        try:
            kept.append(to_model_range(preprocess_fundus(p, resolution)))
        except NoFundusError:
            refused += 1
    return (torch.stack(kept) if kept else torch.zeros(0, 3, resolution, resolution)), refused


def run_benchmark(
    checkpoint: str | Path,
    data: str | Path,
    *,
    scorers: Sequence[str] = ("mahalanobis", "knn", "fanogan"),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    fpr: float = DEFAULT_FPR,
    seed: int = 0,
    max_per_type: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The anomaly benchmark: fit on grade-0 synthetic fundus images, AUROC per anomaly type per scorer.

    data: a prepared, DR-graded fundus ZIP. Reference normals = grade 0 of the ``train`` split (all
    splits' grade 0 minus a seeded 50 % hold-out when the ZIP has no splits); each scorer is fitted and
    calibrated on them (`fit_scorer_on_images`). Held-out normals = the other grade-0 images.
    Anomaly types, each scored against the held-out normals:

    * ``referable_dr``: grade >= 2 images (never seen in fitting: only grade 0 is);
    * ``blur``, ``overexposed``, ``underexposed``, ``occlusion``: `corrupt_fundus` of the held-out normals;
    * ``faces`` (scikit-image's LFW subset) and ``natural`` (scikit-image sample photographs, random
      crops). These go through the real preprocessing; the FOV detector refuses most or all of them.
      Refused images count as flagged with score +inf (ranked above every scored image): ``auroc``.
      ``auroc_forced`` scores all of them after bypassing the detector (centre crop, resize, mask), which
      measures the scorer itself on out-of-distribution content.

    ``max_per_type`` caps every set (seeded subsample) to bound the f-AnoGAN inversion time. Returns a
    JSON-able dict: settings, counts, ``results[scorer][type]`` with auroc / aupr / f1 / tpr / fpr (and
    the forced variants for faces and natural), and ``timing`` (ms per image for fit and score).
    """
    say = log or (lambda _msg: None)
    model = load_model(checkpoint, with_discriminator=True)
    data = Path(data)
    ds = ZipImageDataset(data)
    if ds.resolution != model.resolution:
        raise RetinagenError(
            f"{data}: images are {ds.resolution} px but the model works at {model.resolution} px"
        )
    if ds.num_classes == 0:
        raise RetinagenError(f"{data}: the benchmark needs DR-grade labels")
    b = _benchmark_sets(ds, model.resolution, np.random.default_rng(seed), seed, max_per_type)

    extractor = FeatureExtractor(model)
    # Features are extracted once per image set and shared by the scorers: ``score_ms_per_image`` is the
    # scorer's own time, ``total_ms_per_image`` adds the feature extraction (``feature_ms_per_image``).
    extract_ms = _time_features(extractor, b.normals)
    feats_cache: dict[str, np.ndarray] = {}

    def feats_of(key: str, imgs: torch.Tensor) -> np.ndarray:
        if key not in feats_cache:
            feats_cache[key] = extractor(imgs)
        return feats_cache[key]

    counts = {"reference_normals": int(b.ref_images.shape[0]), "heldout_normals": int(b.normals.shape[0])}
    for name, imgs in b.sets.items():
        counts[name] = int(imgs.shape[0]) + b.refused.get(name, 0)
    counts["refused_by_fov_detector"] = b.refused

    results: dict[str, dict[str, Any]] = {}
    timing: dict[str, dict[str, float]] = {}
    total = len(scorers) * (1 + len(b.sets) + len(b.forced))
    with progress_bar(total, "anomaly benchmark", unit="set", enabled=progress) as bar:
        for name in scorers:
            t0 = time.perf_counter()
            scorer = fit_scorer_on_images(
                model,
                b.ref_images,
                method=name,
                options=(options or {}).get(name),
                fpr=fpr,
                seed=seed,
                feats=feats_of("reference", b.ref_images),
                info={"data": data.name, "normals": "grade 0 (benchmark reference)"},
            )
            fit_s = time.perf_counter() - t0
            bar.advance(1)
            results[name], method_ms, normal_fpr = _score_sets(model, scorer, b, feats_of, extractor, bar.advance)
            timing[name] = {
                "fit_s": round(fit_s, 3),
                "score_ms_per_image": round(method_ms, 3),
                "total_ms_per_image": round(method_ms + extract_ms, 3),
                "heldout_normal_fpr": normal_fpr,
            }
            say(
                f"{name}: "
                + ", ".join(
                    f"{k} {v['auroc']:.3f}" for k, v in results[name].items() if v.get("auroc") is not None
                )
            )
    return {
        "benchmark": "retinagen-anomaly",
        "version": SCORER_VERSION,
        "checkpoint_sha256": model.sha256,
        "checkpoint": str(model.path),
        "data": data.name,
        "data_fingerprint": ds.fingerprint(),
        "resolution": model.resolution,
        "fpr": fpr,
        "seed": seed,
        "max_per_type": max_per_type,
        "options": {name: build_method(name, (options or {}).get(name)).options() for name in scorers},
        "counts": counts,
        "results": results,
        "timing": timing,
        "feature_ms_per_image": extract_ms,
        "refused_policy": (
            "images refused by the FOV detector count as flagged (score +inf) in auroc/aupr/f1; "
            "*_forced scores every image after bypassing the detector"
        ),
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
    }


@dataclass
class _BenchmarkSets:
    """The benchmark's images in model range: reference and held-out normals, the anomaly sets (and how many
    of each the FOV detector refused), and the out-of-distribution photos forced past the detector."""

    ref_images: torch.Tensor
    normals: torch.Tensor
    sets: dict[str, torch.Tensor]
    refused: dict[str, int]
    forced: dict[str, torch.Tensor]


def _benchmark_sets(ds: ZipImageDataset, res: int, rng: np.random.Generator, seed: int,
                    max_per_type: int | None) -> _BenchmarkSets:
    splits = ds.meta.get("splits") or {}
    normal = np.flatnonzero(ds.labels == 0)
    if splits:
        is_train = np.array([splits.get(n) == "train" for n in ds.names])
        ref_idx, held_idx = normal[is_train[normal]], normal[~is_train[normal]]
    else:
        perm = rng.permutation(normal)
        ref_idx, held_idx = np.sort(perm[: normal.size // 2]), np.sort(perm[normal.size // 2 :])
    dr_idx = np.flatnonzero(ds.labels >= 2)

    def cap(idx: np.ndarray) -> np.ndarray:
        if max_per_type is None or idx.size <= max_per_type:
            return idx
        return np.sort(rng.choice(idx, size=max_per_type, replace=False))

    held_idx, dr_idx = cap(held_idx), cap(dr_idx)
    held_u8 = [ds.read_uint8(int(i)) for i in held_idx]
    sets: dict[str, torch.Tensor] = {"referable_dr": _read_prepared(ds, dr_idx)}
    for kind in CORRUPTIONS:
        sets[kind] = torch.stack([to_model_range(corrupt_fundus(u, kind, rng)) for u in held_u8])
    refused: dict[str, int] = {}
    forced: dict[str, torch.Tensor] = {}
    for name, photos in _ood_photos(seed).items():
        if max_per_type is not None and len(photos) > max_per_type:
            photos = [photos[i] for i in sorted(rng.choice(len(photos), size=max_per_type, replace=False))]
        sets[name], refused[name] = _pipeline(photos, res)
        forced[name] = torch.stack([to_model_range(_forced_prepare(p, res)) for p in photos])
    normals = torch.stack([to_model_range(u) for u in held_u8])
    return _BenchmarkSets(_read_prepared(ds, ref_idx), normals, sets, refused, forced)


def _score_sets(
    model: Any,
    scorer: AnomalyScorer,
    b: _BenchmarkSets,
    feats_of: Callable[[str, torch.Tensor], np.ndarray],
    extractor: FeatureExtractor,
    advance: Callable[[int], None],
) -> tuple[dict[str, Any], float, float]:
    """Detection metrics of one fitted scorer per anomaly set against the held-out normals, its scoring time
    (ms per image, features excluded) and its false-positive rate on the held-out normals."""
    n_scored, score_s = 0, 0.0

    def scores_of(key: str, imgs: torch.Tensor) -> np.ndarray:
        nonlocal n_scored, score_s
        feats = feats_of(key, imgs)  # shared by the scorers: timed apart (feature_ms_per_image)
        t = time.perf_counter()
        s = scorer.score_images(model, imgs, feats=feats, extractor=extractor).score
        score_s += time.perf_counter() - t
        n_scored += int(imgs.shape[0])
        return s

    normal_scores = scores_of("normals", b.normals)
    per_type: dict[str, Any] = {}
    for key, imgs in b.sets.items():
        s = np.concatenate([scores_of(key, imgs), np.full(b.refused.get(key, 0), np.inf)])
        per_type[key] = detection_metrics(normal_scores, s, scorer.threshold)
        advance(1)
    for key, imgs in b.forced.items():
        m = detection_metrics(normal_scores, scores_of(f"forced:{key}", imgs), scorer.threshold)
        per_type[key].update({f"{k}_forced": v for k, v in m.items() if k in ("auroc", "aupr", "f1", "tpr")})
        advance(1)
    return per_type, 1000 * score_s / max(n_scored, 1), float((normal_scores > scorer.threshold).mean())


def _time_features(extractor: FeatureExtractor, images: torch.Tensor) -> float:
    """Feature extraction time, ms per image (median of 3 runs over ``images``)."""
    if images.shape[0] == 0:
        return float("nan")
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        extractor(images)
        runs.append(time.perf_counter() - t)
    return round(1000 * float(np.median(runs)) / images.shape[0], 3)


_TYPE_LABELS = {
    "referable_dr": "Referable DR (grade >= 2)",
    "blur": "Corrupted: blur",
    "overexposed": "Corrupted: over-exposure",
    "underexposed": "Corrupted: under-exposure",
    "occlusion": "Corrupted: occlusion",
    "faces": "Faces (LFW)",
    "natural": "Natural images",
}


def benchmark_markdown(result: Mapping[str, Any]) -> str:
    """A Markdown table of `run_benchmark`'s AUROC per anomaly type (rows) and scorer (columns).

    Faces and natural images show ``pipeline / forced``: the AUROC with refused images counted as
    flagged, and the AUROC of the scorer alone on all of them with the FOV detector bypassed.
    """
    scorers = list(result["results"])
    types = list(next(iter(result["results"].values()))) if scorers else []
    counts = result.get("counts", {})
    refused = counts.get("refused_by_fov_detector", {})

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "| Anomaly type | n | " + " | ".join(f"AUROC {s}" for s in scorers) + " |",
        "|---|---|" + "---|" * len(scorers),
    ]
    for t in types:
        n = counts.get(t, "")
        n_txt = f"{n} ({refused[t]} refused)" if t in refused else str(n)
        cells = []
        for s in scorers:
            r = result["results"][s][t]
            cells.append(
                f"{fmt(r.get('auroc'))} / {fmt(r.get('auroc_forced'))}"
                if "auroc_forced" in r
                else fmt(r.get("auroc"))
            )
        lines.append(f"| {_TYPE_LABELS.get(t, t)} | {n_txt} | " + " | ".join(cells) + " |")
    timing = result.get("timing", {})
    lines.append("")
    lines.append(
        f"Normals: {counts.get('reference_normals')} grade-0 reference images (fit + calibration), "
        f"{counts.get('heldout_normals')} held-out grade-0 images; "
        f"threshold at {100 * result.get('fpr', 0):.0f} % FPR. "
        "Faces / natural: `pipeline / forced` (refused by the FOV detector = flagged / detector bypassed)."
    )
    if timing:
        lines.append("")
        lines.append("| Scorer | fit (s) | ms/image (features + score) | FPR on held-out normals |")
        lines.append("|---|---|---|---|")
        for s, t in timing.items():
            lines.append(
                f"| {s} | {t['fit_s']:.1f} | {t['total_ms_per_image']:.1f} | {t['heldout_normal_fpr']:.3f} |"
            )
        lines.append("")
        lines.append(
            f"Timing on {result.get('device', 'cpu')} with {result.get('torch_threads')} torch thread(s); "
            "fit excludes the reference images' feature extraction."
        )
    return "\n".join(lines) + "\n"
