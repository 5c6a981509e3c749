"""The scorer (method + standardisation + calibration), its data-only files, fitting, and scoring files.

A scorer is ``NAME.safetensors`` (arrays) and ``NAME.json`` (method, options, checkpoint sha256, threshold,
fpr, feature names, version, the tensor file's sha256), written atomically, JSON last. Loading refuses
pickles and any other non-safetensors file, and a scorer used with another checkpoint than the one it was
fitted on is an error. `fit_scorer` fits on a seeded split of reference normals and sets the threshold on
the held-out part at the requested false-positive rate: the smallest t with #{s > t} <= fpr * n.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinical.anomaly.features import FeatureExtractor, FeatureGroup
from clinical.anomaly.inputs import expand_inputs, load_inputs
from clinical.anomaly.methods import ScoreMethod, ScoringContext, _need, build_method
from retinagen import __version__ as retinagen_version
from retinagen.artifact import read_artifact, write_artifact
from retinagen.data.dataset import ZipImageDataset
from retinagen.data.prepare import report_path_for
from retinagen.data.preprocess import to_model_range
from retinagen.errors import (
    CheckpointError,
    ConfigError,
    RetinagenError,
)
from retinagen.fileio import atomic_write_text
from retinagen.generation import LoadedModel, load_model
from retinagen.progress import progress_bar

SCORER_FORMAT = "retinagen-anomaly-scorer"
SCORER_VERSION = 1
DEFAULT_FPR = 0.05
# Number of feature groups named per image as "what drove the score".
TOP_FEATURES = 3


@dataclass
class ScoreBatch:
    """Scores of N images: score [N], percentile [N] (0-100, among calibration normals), flagged [N] bool,
    top [N] lists of (feature group, RMS standardised deviation), largest first."""

    score: np.ndarray
    percentile: np.ndarray
    flagged: np.ndarray
    top: list[list[tuple[str, float]]]


@dataclass
class AnomalyScorer:
    """A fitted, calibrated anomaly scorer bound (by sha256) to one checkpoint. See the module docstring."""

    method: ScoreMethod
    checkpoint_sha256: str
    checkpoint_path: str
    resolution: int
    ben_graham: bool
    groups: tuple[FeatureGroup, ...]
    feat_mean: np.ndarray  # [F]
    feat_sd: np.ndarray  # [F]
    calibration_scores: np.ndarray  # [M], sorted ascending
    threshold: float
    fpr: float
    info: dict[str, Any] = field(default_factory=dict)

    # -- binding to a model ------------------------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def check_model(self, model: LoadedModel) -> None:
        """Refuse a model other than the one the scorer was fitted on."""
        if model.sha256 != self.checkpoint_sha256:
            raise CheckpointError(
                f"{model.path}: this anomaly scorer was fitted on checkpoint sha256 "
                f"{self.checkpoint_sha256[:12]}..., "
                f"not on this one ({model.sha256[:12]}...); refit it with `retinagen anomaly fit`"
            )

    def context(self, model: LoadedModel, extractor: FeatureExtractor | None = None) -> ScoringContext:
        self.check_model(model)
        ex = extractor or FeatureExtractor(model)
        if [g.name for g in ex.groups] != self.feature_names or ex.dim != self.feat_mean.shape[0]:
            raise CheckpointError("the model's feature layout does not match the scorer's")
        return ScoringContext(self.feat_mean, self.feat_sd, model, ex)

    # -- scoring -----------------------------------------------------------------------------------

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Percent of calibration normals scoring <= each score (0-100)."""
        cal = self.calibration_scores
        return (
            100.0
            * np.searchsorted(cal, np.asarray(scores, dtype=np.float64), side="right")
            / max(len(cal), 1)
        )

    def top_features(self, feats: np.ndarray, k: int = TOP_FEATURES) -> list[list[tuple[str, float]]]:
        """Per image, the k feature groups with the largest RMS standardised deviation from the normals."""
        z2 = ((feats - self.feat_mean) / self.feat_sd) ** 2
        rms = np.stack([np.sqrt(z2[:, g.start : g.stop].mean(axis=1)) for g in self.groups], axis=1)
        order = np.argsort(-rms, axis=1, kind="stable")[:, :k]
        return [[(self.groups[j].name, float(rms[i, j])) for j in row] for i, row in enumerate(order)]

    def score_images(
        self,
        model: LoadedModel,
        images: torch.Tensor,
        *,
        feats: np.ndarray | None = None,
        extractor: FeatureExtractor | None = None,
    ) -> ScoreBatch:
        """Score prepared images [N, 3, R, R] in [-1, 1] (already through the fundus preprocessing)."""
        ctx = self.context(model, extractor)
        if feats is None:
            feats = ctx.need_model()[1](images)
        if images.shape[0] == 0:
            return ScoreBatch(np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool), [])
        scores = np.asarray(self.method.score(feats, images, ctx), dtype=np.float64)
        return ScoreBatch(scores, self.percentile(scores), scores > self.threshold, self.top_features(feats))

    # -- files -------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``STEM.safetensors`` then ``STEM.json`` atomically; returns the JSON path."""
        stem = _scorer_stem(path)
        arrays = {
            "feat_mean": self.feat_mean.astype(np.float64),
            "feat_sd": self.feat_sd.astype(np.float64),
            "calibration_scores": self.calibration_scores.astype(np.float64),
        }
        arrays.update({f"method.{k}": np.ascontiguousarray(v) for k, v in self.method.state().items()})
        meta = {
            "format": SCORER_FORMAT,
            "version": SCORER_VERSION,
            "retinagen_version": retinagen_version,
            "scorer": self.method.name,
            "options": self.method.options(),
            "checkpoint_sha256": self.checkpoint_sha256,
            "checkpoint_path": self.checkpoint_path,
            "resolution": self.resolution,
            "ben_graham": self.ben_graham,
            "threshold": self.threshold,
            "fpr": self.fpr,
            "feature_groups": [[g.name, g.start, g.stop] for g in self.groups],
            "info": self.info,
        }
        header = {"format": SCORER_FORMAT, "version": str(SCORER_VERSION)}
        return write_artifact(stem, arrays, meta, header=header, numpy=True)


def _scorer_stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def _accept_scorer(meta: dict[str, Any], json_path: Path) -> None:
    if meta.get("format") != SCORER_FORMAT:
        raise CheckpointError(f"{json_path}: not a retinagen anomaly scorer (format {SCORER_FORMAT!r} expected)")
    if meta.get("version") != SCORER_VERSION:
        raise CheckpointError(
            f"{json_path}: scorer version {meta.get('version')!r}; this retinagen reads {SCORER_VERSION}"
        )


def load_scorer(path: str | Path, model: LoadedModel | None = None) -> AnomalyScorer:
    """Load a scorer written by `AnomalyScorer.save` (``STEM``, ``STEM.json`` or ``STEM.safetensors``).

    Data only: the tensor file must be safetensors (a pickle is refused with `CheckpointError` before any
    parser sees it) and match the sha256 its JSON records. With ``model``, also checks that the scorer was
    fitted on that checkpoint.
    """
    art = read_artifact(_scorer_stem(path), accept=_accept_scorer, numpy=True)
    arrays, meta, json_path = art.tensors, art.meta, art.json_path
    try:
        groups = tuple(FeatureGroup(str(n), int(a), int(b)) for n, a, b in meta["feature_groups"])
        n_feat = groups[-1].stop if groups else 0
        method = build_method(str(meta["scorer"]), meta.get("options") or {})
        method.load_state(
            {k[len("method.") :]: v for k, v in arrays.items() if k.startswith("method.")}, n_feat
        )
        scorer = AnomalyScorer(
            method=method,
            checkpoint_sha256=str(meta["checkpoint_sha256"]),
            checkpoint_path=_resolve_recorded(str(meta.get("checkpoint_path", "")), json_path.parent),
            resolution=int(meta["resolution"]),
            ben_graham=bool(meta.get("ben_graham", False)),
            groups=groups,
            feat_mean=_need(arrays, "feat_mean", (n_feat,)),
            feat_sd=_need(arrays, "feat_sd", (n_feat,)),
            calibration_scores=np.sort(_need(arrays, "calibration_scores", (None,))),
            threshold=float(meta["threshold"]),
            fpr=float(meta["fpr"]),
            info=dict(meta.get("info") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{json_path}: malformed scorer metadata ({type(exc).__name__}: {exc})"
        ) from None
    except ConfigError as exc:
        raise CheckpointError(f"{json_path}: {exc}") from None
    if model is not None:
        scorer.check_model(model)
    return scorer


def _resolve_recorded(path: str, base: Path) -> str:
    """A recorded checkpoint path; a relative one (a shipped, relocatable model folder) is relative to
    the scorer's own folder."""
    if path and not Path(path).is_absolute():
        return str((base / path).resolve())
    return path


def load_scorer_model(
    scorer: AnomalyScorer, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """The model a scorer belongs to: ``checkpoint``, else the path recorded at fit time (sha checked)."""
    path = checkpoint or scorer.checkpoint_path
    if not path:
        raise CheckpointError("the scorer records no checkpoint path; pass the checkpoint explicitly")
    model = load_model(path, device, with_discriminator=True)
    scorer.check_model(model)
    return model


# ---------------------------------------------------------------------------------------------------
# Fitting and calibration
# ---------------------------------------------------------------------------------------------------


def calibrate_threshold(scores: np.ndarray, fpr: float) -> float:
    """The smallest calibration score t with #{s > t} <= fpr * n: flagging s > t gives FPR <= fpr there.

    scores [n >= 1]; fpr in (0, 1). With ties the realised rate can be lower than fpr, never higher.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise RetinagenError("calibration needs at least one normal image")
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"fpr must be in (0, 1), got {fpr}")
    allowed = math.floor(fpr * s.size + 1e-9)
    return float(s[s.size - allowed - 1])


def fit_scorer_on_images(
    model: LoadedModel,
    images: torch.Tensor,
    *,
    method: str = "mahalanobis",
    options: Mapping[str, Any] | None = None,
    fpr: float = DEFAULT_FPR,
    calibration_fraction: float = 0.25,
    seed: int = 0,
    ben_graham: bool = False,
    info: Mapping[str, Any] | None = None,
    feats: np.ndarray | None = None,
) -> AnomalyScorer:
    """Fit ``method`` on prepared normal images [N, 3, R, R] in [-1, 1] and calibrate its threshold.

    The images are split at random (``seed``) into fit and held-out calibration parts
    (``calibration_fraction`` of them, at least one image); ``feats`` [N, F] may be passed when already
    computed. ``ben_graham`` records how files must be preprocessed for this model.
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise ConfigError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"fpr must be in (0, 1), got {fpr}")
    n = images.shape[0]
    if n < 4:
        raise RetinagenError(f"anomaly fit needs at least 4 normal images, got {n}")
    m = build_method(method, options)
    extractor = FeatureExtractor(model)
    if feats is None:
        feats = extractor(images)
    perm = np.random.default_rng(seed).permutation(n)
    n_cal = min(max(1, round(calibration_fraction * n)), n - 2)
    cal_idx, fit_idx = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
    ctx = ScoringContext.from_features(feats[fit_idx], model, extractor)
    mean, sd = ctx.mean, ctx.sd
    m.fit(feats[fit_idx], images[fit_idx], ctx)
    cal_scores = np.sort(np.asarray(m.score(feats[cal_idx], images[cal_idx], ctx), dtype=np.float64))
    threshold = calibrate_threshold(cal_scores, fpr)
    details = dict(info or {})
    details.update(
        n_fit=int(fit_idx.size),
        n_calibration=int(cal_idx.size),
        calibration_fpr=float((cal_scores > threshold).mean()),
        seed=seed,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    return AnomalyScorer(
        method=m,
        checkpoint_sha256=model.sha256,
        checkpoint_path=str(model.path.resolve()),
        resolution=model.resolution,
        ben_graham=ben_graham,
        groups=extractor.groups,
        feat_mean=mean,
        feat_sd=sd,
        calibration_scores=cal_scores,
        threshold=threshold,
        fpr=fpr,
        info=details,
    )


def _dataset_ben_graham(data: Path) -> bool:
    """Whether `prepare` applied Ben Graham to this ZIP (its report says; False when there is none)."""
    report = report_path_for(data)
    if not report.is_file():
        return False
    try:
        settings = json.loads(report.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return False
    if settings.get("domain", "fundus") != "fundus":
        raise RetinagenError(
            f"{data}: prepared as {settings.get('domain')!r} images; anomaly scoring is for fundus data"
        )
    return bool(settings.get("ben_graham", False))


def _read_prepared(ds: ZipImageDataset, indices: Sequence[int]) -> torch.Tensor:
    if len(indices) == 0:
        return torch.zeros(0, 3, ds.resolution, ds.resolution)
    return torch.stack([to_model_range(ds.read_uint8(int(i))) for i in indices])


def fit_scorer(
    model: LoadedModel,
    data: str | Path,
    *,
    method: str = "mahalanobis",
    options: Mapping[str, Any] | None = None,
    fpr: float = DEFAULT_FPR,
    normal_grades: Sequence[int] | None = (0,),
    split: str | None = None,
    calibration_fraction: float = 0.25,
    seed: int = 0,
    max_images: int | None = None,
    ben_graham: bool | None = None,
) -> AnomalyScorer:
    """Fit a scorer on the normal images of a prepared dataset ZIP (``retinagen prepare``).

    normal_grades: keep only images with these labels (default grade 0); ignored, and recorded as such,
    when the dataset is unlabelled. split: "train"/"val"/"test" or None for all. max_images: a seeded
    random subset of at most this many. ben_graham: None = read from the dataset's prepare report.
    """
    data = Path(data)
    ds = ZipImageDataset(data, split=split)
    if ds.resolution != model.resolution:
        raise RetinagenError(
            f"{data}: images are {ds.resolution} px but the model works at {model.resolution} px"
        )
    idx = np.arange(len(ds))
    grade_note = "all images (unlabelled dataset)"
    if normal_grades is not None and ds.num_classes > 0:
        idx = idx[np.isin(ds.labels, np.asarray(list(normal_grades)))]
        grade_note = f"grades {sorted(int(g) for g in normal_grades)}"
    if max_images is not None and idx.size > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_images, replace=False))
    if idx.size < 4:
        raise RetinagenError(
            f"{data}: only {idx.size} normal images ({grade_note}); anomaly fit needs at least 4"
        )
    bg = _dataset_ben_graham(data) if ben_graham is None else ben_graham
    images = _read_prepared(ds, idx)
    info = {"data": data.name, "data_fingerprint": ds.fingerprint(), "normals": grade_note, "split": split}
    return fit_scorer_on_images(
        model,
        images,
        method=method,
        options=options,
        fpr=fpr,
        calibration_fraction=calibration_fraction,
        seed=seed,
        ben_graham=bg,
        info=info,
    )


# ---------------------------------------------------------------------------------------------------
# Scoring files, CSV
# ---------------------------------------------------------------------------------------------------


@dataclass
class ImageScore:
    """The result for one input file. flag: "anomaly" | "normal" | "no_fundus" | "unreadable"."""

    file: str
    flag: str
    score: float | None = None
    percentile: float | None = None
    top_features: list[tuple[str, float]] = field(default_factory=list)
    reason: str = ""


def score_files(
    scorer: AnomalyScorer,
    model: LoadedModel,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> list[ImageScore]:
    """Score files/folders through the training preprocessing; bad files are reported and skipped."""
    files = expand_inputs(paths)
    ctx = scorer.context(model)
    results: list[ImageScore] = []
    with progress_bar(len(files), "anomaly score", enabled=progress) as bar:
        for start in range(0, len(files), batch_size):
            chunk = load_inputs(
                files[start : start + batch_size], scorer.resolution, ben_graham=scorer.ben_graham
            )
            ok = [r for r in chunk if r.status == "ok"]
            batch = (
                scorer.score_images(model, torch.stack([r.image for r in ok]), extractor=ctx.need_model()[1])
                if ok
                else None
            )
            j = 0
            for r in chunk:
                if r.status != "ok":
                    results.append(ImageScore(r.file, r.status, reason=r.reason))
                    continue
                assert batch is not None
                results.append(
                    ImageScore(
                        r.file,
                        "anomaly" if batch.flagged[j] else "normal",
                        float(batch.score[j]),
                        float(batch.percentile[j]),
                        batch.top[j],
                    )
                )
                j += 1
            bar.advance(len(chunk))
    return results


CSV_COLUMNS = ("file", "flag", "score", "percentile", "threshold", "top_features", "reason")


def write_scores_csv(results: Sequence[ImageScore], out: str | Path, threshold: float) -> Path:
    """Write one row per input (``CSV_COLUMNS``) atomically. Holds file names as given and our own
    reasons only: no DICOM header value is ever read into a result."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in results:
        w.writerow(
            [
                r.file,
                r.flag,
                "" if r.score is None else f"{r.score:.6g}",
                "" if r.percentile is None else f"{r.percentile:.2f}",
                f"{threshold:.6g}",
                ";".join(f"{name}={v:.2f}" for name, v in r.top_features),
                r.reason,
            ]
        )
    atomic_write_text(out, buf.getvalue())
    return Path(out)
