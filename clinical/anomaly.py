"""Anomaly scoring of fundus images from a trained MSI checkpoint's discriminator and Q head.

What is scored
    Every image becomes one feature vector (`FeatureExtractor`), read from the trained discriminator:

    * ``D:rgb@{R}px``, ``D@{r}px`` (r = R .. 8), ``D@4px``, ``D:h``: the global-average-pooled activations
      of D's trunk at every scale (`Discriminator.features`): after fromRGB, after each residual block
      (named by the resolution the block reads), after the 4x4 conv, and the trunk features h;
    * ``Q:c{i}``: the Q head's posterior parameters of code c_i (`LatentSpec.split_q_params`): the
      log-softmax of a categorical code's logits, a Bernoulli code's logit, a uniform code's mean (and
      log-variance when learned).

    D's minibatch-stddev layer mixes the samples of a batch; features are computed with its group size set
    to 1 for the duration of the call, which is exactly what D computes for a batch of one image, so an
    image's features never depend on what else is in the batch.

Scorers (a registry, `SCORERS`; `register_scorer` adds one)
    * ``mahalanobis`` (default): features standardised on the reference normals, Ledoit-Wolf shrunk
      covariance (`sklearn.covariance.LedoitWolf`), score = squared Mahalanobis distance
      (x - mu)^T Sigma^-1 (x - mu) (chi-square with F degrees of freedom for Gaussian normals).
    * ``knn``: mean Euclidean distance to the k nearest reference normals in the standardised feature
      space, divided by sqrt(F) (an RMS deviation per feature).
    * ``fanogan``: f-AnoGAN-style (Schlegl et al. 2019): encode, reconstruct with G_ema, compare. The
      encoder is f-AnoGAN's "ziz" idea made cheap: at fit time ``encoder_samples`` (1024) latents are
      drawn, G_ema renders them (at DR grade ``grade``, default 0, for conditional models: "how well does
      the model of a *normal* eye explain this image") and a ridge regression maps the images'
      standardised D/Q features back to their latents (Z', C) in closed form. At scoring time the
      encoded latent is refined by ``steps`` (20) Adam steps of latent optimisation of G_ema's input on
      0.9 * image MSE + 0.1 * standardised D-feature MSE (AnoGAN's lambda = 0.1), codes clamped to
      their ranges. Score = image residual / s_img + kappa * D-feature residual / s_feat, where s_img and
      s_feat are the medians of the two residuals over (up to 64) reference normals, so both terms are ~1
      on normal eyes and kappa (default 1, as in f-AnoGAN) weighs them. Cost: about one training step of
      G and D per image per refinement step (``steps=0`` is the encoder alone, a few forward passes).

Fitting and calibration
    `fit_scorer` reads reference normal images from a prepared ZIP (``ZipImageDataset``; by default only
    grade 0), splits them at random (seeded) into a fit part and a held-out calibration part, fits the
    scorer on the first and sets the threshold on the second at the requested false-positive rate
    (default 5 %): the smallest calibration score t with #{s > t} <= fpr * n. Per image the output is the
    score, its percentile among the calibration normals, the flag (score > threshold) and the feature
    groups with the largest RMS standardised deviation (``Q:c4=5.2``).

Inputs
    Files go through the training preprocessing, as `retinagen prepare` runs it:
    `retinagen.data.imageio.decode_image` (PNG/JPEG/...; DICOM via `retinagen.data.dicom.read_dicom`,
    pixels only, no header value is kept), then `preprocess_fundus` (FOV detection, crop, resize, mask;
    Ben Graham when the dataset was prepared with it) and `to_model_range`. An image with no detectable
    fundus is reported as ``no_fundus`` and not scored; an unreadable file is reported with its reason
    and the batch goes on.

Files
    A scorer is data only: ``NAME.safetensors`` (arrays) and ``NAME.json`` (method, options, checkpoint
    sha256, threshold, fpr, feature names, version, the sha256 of the tensor file), written atomically,
    JSON last. Loading refuses pickles and any other non-safetensors file (`CheckpointError`), and using a
    scorer with a checkpoint other than the one it was fitted on is an error.

Benchmark
    `run_benchmark` is the issue's anomaly benchmark: fit on grade-0 images of a synthetic fundus dataset,
    then AUROC per anomaly type (referable DR, faces, natural images, corrupted fundus) per scorer.
    Nothing in it is tuned on its own results: every constant is fixed in this file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file

from retinagen import __version__ as retinagen_version
from retinagen.data.dataset import ZipImageDataset
from retinagen.data.fundus import circular_mask, preprocess_fundus, to_model_range
from retinagen.data.imageio import IMAGE_EXTENSIONS, decode_image, is_dicom_file
from retinagen.data.prepare import report_path_for
from retinagen.errors import (
    BadInputError,
    CheckpointError,
    ConfigError,
    NoFundusError,
    RetinagenError,
)
from retinagen.fileio import atomic_path, atomic_write_json, atomic_write_text
from retinagen.generation import LoadedModel, load_model
from retinagen.progress import progress_bar
from retinagen.training.checkpoint import check_safetensors_header, sha256_file

__all__ = [
    "DEFAULT_FPR",
    "SCORERS",
    "SCORER_FORMAT",
    "SCORER_VERSION",
    "AnomalyScorer",
    "FeatureExtractor",
    "FeatureGroup",
    "ImageScore",
    "InputImage",
    "benchmark_markdown",
    "corrupt_fundus",
    "detection_metrics",
    "evaluate",
    "expand_inputs",
    "fit_scorer",
    "fit_scorer_on_images",
    "load_inputs",
    "load_scorer",
    "load_scorer_model",
    "parse_options",
    "read_fundus_file",
    "register_scorer",
    "run_benchmark",
    "score_files",
    "write_scores_csv",
]

SCORER_FORMAT = "retinagen-anomaly-scorer"
SCORER_VERSION = 1
DEFAULT_FPR = 0.05
# Number of feature groups named per image as "what drove the score".
TOP_FEATURES = 3
# Features constant over the reference normals would divide by ~0; their sd is floored at this fraction
# of the median sd (a deviation there is still large, but finite).
_SD_FLOOR_FRACTION = 1e-3


# ---------------------------------------------------------------------------------------------------
# Inputs: files -> model-range images, with per-file status
# ---------------------------------------------------------------------------------------------------


@dataclass
class InputImage:
    """One input file after reading and preprocessing.

    status: "ok" (``image`` is float32 [3, R, R] in [-1, 1]), "no_fundus" (decoded, but the FOV detector
    found no fundus) or "unreadable" (not decodable: ``reason`` says why). ``file`` is the path as given.
    """

    file: str
    status: str
    reason: str = ""
    image: torch.Tensor | None = field(default=None, repr=False)


def read_fundus_file(path: str | Path, resolution: int, *, ben_graham: bool = False) -> torch.Tensor:
    """Read a fundus photograph or DICOM file and preprocess it exactly as `retinagen prepare` does.

    Returns float32 [3, resolution, resolution] in [-1, 1]. Decoding is `decode_image`, which sends DICOM
    to `retinagen.data.dicom.read_dicom` (pixels only: no header value leaves it) and everything else to
    the safe raster reader; then `preprocess_fundus` and `to_model_range`. Raises `NoFundusError` (no
    field of view), `DicomError` (bad DICOM) or `ImageDecodeError` (any other undecodable file), each
    naming the file.
    """
    p = Path(path)
    pixels = decode_image(p).pixels  # [H, W, 3] uint8, or uint16 for 16-bit sources and DICOM
    try:
        u8 = preprocess_fundus(pixels, resolution, ben_graham=ben_graham)
    except NoFundusError as exc:
        raise NoFundusError(p, exc.reason) from None
    return to_model_range(u8)


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the image/DICOM files under them (recursively, sorted).

    A file inside a folder counts when its extension is an image/DICOM one or its content starts like
    DICOM (files without extension are common in DICOM exports). A path that does not exist is kept, so
    that it is reported as unreadable rather than silently dropped.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
                if f.suffix.lower() in IMAGE_EXTENSIONS or is_dicom_file(f):
                    out.append(f)
        else:
            out.append(p)
    return out


def load_inputs(
    paths: Sequence[str | Path], resolution: int, *, ben_graham: bool = False
) -> list[InputImage]:
    """`read_fundus_file` on every path; failures become statuses, never exceptions (the batch goes on)."""
    results: list[InputImage] = []
    for p in paths:
        try:
            img = read_fundus_file(p, resolution, ben_graham=ben_graham)
        except NoFundusError as exc:
            results.append(InputImage(str(p), "no_fundus", exc.reason))
        except BadInputError as exc:  # ImageDecodeError, DicomError, UnsafePathError
            results.append(InputImage(str(p), "unreadable", exc.reason))
        else:
            results.append(InputImage(str(p), "ok", "", img))
    return results


# ---------------------------------------------------------------------------------------------------
# Features from D and Q
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureGroup:
    """A named block of columns [start, stop) of the feature vector (``D@16px``, ``Q:c4``)."""

    name: str
    start: int
    stop: int

    @property
    def kind(self) -> str:
        """Which network the group comes from: "D" (trunk activations) or "Q" (posterior parameters)."""
        return self.name[0]


@contextmanager
def per_image_statistics(D: torch.nn.Module) -> Iterator[None]:
    """Make D's minibatch-stddev statistic per image (group size 1) for the duration of the block.

    With group size 1 every image is its own group, which is what D computes for a batch of one; so
    features do not depend on batch composition. The original group size is restored afterwards.
    """
    mbstd = getattr(D, "mbstd", None)
    if mbstd is None or not hasattr(mbstd, "group_size"):
        yield
        return
    old = mbstd.group_size
    mbstd.group_size = 1
    try:
        yield
    finally:
        mbstd.group_size = old


def _d_group_name(key: str) -> str:
    if key.startswith("rgb"):
        return f"D:rgb@{key[3:]}px"
    if key.startswith("block"):
        return f"D@{key[5:]}px"
    if key == "conv4":
        return "D@4px"
    return f"D:{key}"


class FeatureExtractor:
    """Images [N, 3, R, R] in [-1, 1] -> features [N, F] from D's trunk and Q head (module docstring).

    ``groups`` lists the named column blocks, D groups first (from the input up), then one Q group per
    code in code order. `torch_features` is differentiable with respect to the images (used by the
    f-AnoGAN inversion); `__call__` is the no-grad, batched, float64 numpy version.
    """

    def __init__(self, model: LoadedModel, batch_size: int = 64) -> None:
        if model.D is None:
            raise CheckpointError(
                f"{model.path}: the checkpoint holds no discriminator; anomaly scoring needs D and its Q head"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.D = model.D
        self.spec = model.spec
        self.resolution = model.resolution
        self.batch_size = batch_size
        with torch.no_grad(), per_image_statistics(self.D):
            raw = self.D.features(torch.zeros(1, 3, self.resolution, self.resolution, device=model.device))
        self._d_keys = [k for k in raw if k != "q_params"]
        self.has_q = "q_params" in raw and self.spec.q_param_dim > 0
        groups: list[FeatureGroup] = []
        start = 0
        for k in self._d_keys:
            width = int(raw[k].shape[1])
            groups.append(FeatureGroup(_d_group_name(k), start, start + width))
            start += width
        if self.has_q:
            for i, width in enumerate(self._q_widths()):
                groups.append(FeatureGroup(f"Q:c{i}", start, start + width))
                start += width
        self.groups: tuple[FeatureGroup, ...] = tuple(groups)
        self.dim = start
        self.d_dim = sum(g.stop - g.start for g in groups if g.kind == "D")

    def _q_widths(self) -> list[int]:
        s = self.spec
        per_uniform = 2 if s.learned_variance else 1
        return list(s.categorical) + [1] * s.n_bernoulli + [per_uniform] * s.n_uniform

    def _q_columns(self, q_params: torch.Tensor) -> list[torch.Tensor]:
        """Q's output [N, P] -> one [N, w_i] block per code, in code order."""
        q = self.spec.split_q_params(q_params.float())
        cols = [F.log_softmax(logits, dim=1) for logits in q.cat_logits]
        cols += [q.bern_logits[:, j : j + 1] for j in range(self.spec.n_bernoulli)]
        for j in range(self.spec.n_uniform):
            parts = [q.unif_mean[:, j : j + 1]]
            if q.unif_logvar is not None:
                parts.append(q.unif_logvar[:, j : j + 1])
            cols.append(torch.cat(parts, dim=1))
        return cols

    def torch_features(self, images: torch.Tensor, *, with_q: bool = True) -> torch.Tensor:
        """Differentiable features [N, F] (float32; only the D columns when ``with_q`` is False)."""
        r = self.resolution
        if images.ndim != 4 or images.shape[1:] != (3, r, r):
            raise ValueError(f"images must be [N, 3, {r}, {r}] in [-1, 1], got {tuple(images.shape)}")
        with per_image_statistics(self.D):
            raw = self.D.features(images.to(self.model.device, torch.float32))
        cols = [raw[k].float() for k in self._d_keys]
        if with_q and self.has_q:
            cols += self._q_columns(raw["q_params"])
        return torch.cat(cols, dim=1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """images [N, 3, R, R] in [-1, 1] -> float64 [N, F] (batched; independent of batch size)."""
        out = [
            self.torch_features(images[i : i + self.batch_size]).double().cpu().numpy()
            for i in range(0, images.shape[0], self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim))


# ---------------------------------------------------------------------------------------------------
# Scoring methods (registry)
# ---------------------------------------------------------------------------------------------------


@dataclass
class ScoringContext:
    """What a method may use besides the features: the standardisation, the model and the extractor.

    ``model`` and ``extractor`` may be None for methods that only read features (mahalanobis, knn), so
    those can be fitted and tested on plain arrays.
    """

    mean: np.ndarray  # [F] reference-normal mean
    sd: np.ndarray  # [F] reference-normal sd (floored)
    model: LoadedModel | None = None
    extractor: FeatureExtractor | None = None

    @classmethod
    def from_features(
        cls, feats: np.ndarray, model: LoadedModel | None = None, extractor: FeatureExtractor | None = None
    ) -> ScoringContext:
        """Standardisation fitted on reference features [N, F] (sd floored, see `_SD_FLOOR_FRACTION`)."""
        mean, sd = _standardiser(np.asarray(feats, dtype=np.float64))
        return cls(mean, sd, model, extractor)

    def need_model(self) -> tuple[LoadedModel, FeatureExtractor]:
        if self.model is None or self.extractor is None:
            raise RetinagenError(
                "this scorer needs the model (generator and discriminator), not only features"
            )
        return self.model, self.extractor

    def standardise(self, feats: np.ndarray) -> np.ndarray:
        return (feats - self.mean) / self.sd


class ScoreMethod(ABC):
    """A density / reconstruction model fitted on reference normals; larger scores = more anomalous.

    Subclasses set ``name``, validate their options in ``__init__`` and keep their fitted state in numpy
    arrays (`state` / `load_state`), so that a scorer file holds data only.
    """

    name: ClassVar[str]

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """The JSON-able options the method was built with (``type(self)(**options)`` rebuilds it)."""

    @abstractmethod
    def fit(self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext) -> None:
        """feats [N, F] float64 of the fit normals; images [N, 3, R, R] in [-1, 1] (the same images)."""

    @abstractmethod
    def score(self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext) -> np.ndarray:
        """Scores [N] float64 for feats [N, F] and their images [N, 3, R, R]."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Fitted arrays (saved to safetensors)."""

    @abstractmethod
    def load_state(self, arrays: Mapping[str, np.ndarray], n_features: int) -> None:
        """Restore `state`; raise CheckpointError when arrays are missing or misshapen."""


SCORERS: dict[str, type[ScoreMethod]] = {}


def register_scorer(cls: type[ScoreMethod]) -> type[ScoreMethod]:
    """Class decorator: make a `ScoreMethod` available under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} has no name")
    SCORERS[cls.name] = cls
    return cls


def build_method(name: str, options: Mapping[str, Any] | None = None) -> ScoreMethod:
    """The registered method ``name`` with ``options``; unknown names/options are ConfigErrors."""
    if name not in SCORERS:
        raise ConfigError(f"unknown anomaly scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    try:
        return SCORERS[name](**dict(options or {}))
    except TypeError as exc:
        raise ConfigError(f"scorer {name}: bad options {dict(options or {})} ({exc})") from None


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["k=10", "kappa=0.5"]`` -> ``{"k": 10, "kappa": 0.5}`` (values read as JSON, else kept as text)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, e.g. k=10")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def _need(arrays: Mapping[str, np.ndarray], key: str, shape: tuple[int | None, ...]) -> np.ndarray:
    if key not in arrays:
        raise CheckpointError(f"scorer file has no array {key!r}")
    a = arrays[key]
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape, strict=True)):
        raise CheckpointError(f"scorer array {key!r} has shape {a.shape}, expected {shape}")
    return a


@register_scorer
class MahalanobisMethod(ScoreMethod):
    """Squared Mahalanobis distance under a Ledoit-Wolf covariance of the standardised features.

    Standardising first matters: LW shrinks towards a multiple of the identity, which only makes sense
    when the features share a scale (Q logits and D activations do not).
    """

    name = "mahalanobis"

    def __init__(self) -> None:
        self.location: np.ndarray | None = None
        self.precision: np.ndarray | None = None
        self.shrinkage: float = float("nan")

    def options(self) -> dict[str, Any]:
        return {}

    def fit(self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext) -> None:
        from sklearn.covariance import LedoitWolf

        if feats.shape[0] < 2:
            raise RetinagenError("mahalanobis needs at least 2 reference images to fit")
        lw = LedoitWolf().fit(ctx.standardise(feats))
        self.location = np.asarray(lw.location_, dtype=np.float64)
        self.precision = np.asarray(lw.precision_, dtype=np.float64)
        self.shrinkage = float(lw.shrinkage_)

    def score(self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext) -> np.ndarray:
        assert self.location is not None and self.precision is not None
        d = ctx.standardise(feats) - self.location
        return ((d @ self.precision) * d).sum(axis=1)  # d_i^T P d_i per row, through BLAS

    def state(self) -> dict[str, np.ndarray]:
        assert self.location is not None and self.precision is not None
        return {
            "location": self.location,
            "precision": self.precision,
            "shrinkage": np.array([self.shrinkage]),
        }

    def load_state(self, arrays: Mapping[str, np.ndarray], n_features: int) -> None:
        self.location = _need(arrays, "location", (n_features,)).astype(np.float64)
        self.precision = _need(arrays, "precision", (n_features, n_features)).astype(np.float64)
        self.shrinkage = float(_need(arrays, "shrinkage", (1,))[0])


@register_scorer
class KnnMethod(ScoreMethod):
    """Mean Euclidean distance to the k nearest reference normals in standardised feature space / sqrt(F)."""

    name = "knn"

    def __init__(self, k: int = 5) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"knn: k must be an integer >= 1, got {k!r}")
        self.k = k
        self.reference: np.ndarray | None = None

    def options(self) -> dict[str, Any]:
        return {"k": self.k}

    def fit(self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext) -> None:
        if feats.shape[0] < self.k:
            raise RetinagenError(f"knn: k = {self.k} but only {feats.shape[0]} reference images to fit on")
        self.reference = ctx.standardise(feats).astype(np.float32)

    def score(self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext) -> np.ndarray:
        assert self.reference is not None
        ref = torch.from_numpy(self.reference)
        z = torch.from_numpy(ctx.standardise(feats).astype(np.float32))
        out = []
        for i in range(0, z.shape[0], 256):  # chunks keep the [n, N_ref] distance matrix small
            d = torch.cdist(z[i : i + 256].double(), ref.double())
            out.append(d.topk(self.k, dim=1, largest=False).values.mean(dim=1))
        scores = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
        return (scores / math.sqrt(ref.shape[1])).numpy()

    def state(self) -> dict[str, np.ndarray]:
        assert self.reference is not None
        return {"reference": self.reference}

    def load_state(self, arrays: Mapping[str, np.ndarray], n_features: int) -> None:
        self.reference = _need(arrays, "reference", (None, n_features)).astype(np.float32)
        if self.reference.shape[0] < self.k:
            raise CheckpointError(
                f"knn scorer holds {self.reference.shape[0]} reference images < k = {self.k}"
            )


@register_scorer
class FanoganMethod(ScoreMethod):
    """f-AnoGAN-style score: encode, refine by latent optimisation, compare (module docstring).

    Options: kappa (weight of the feature residual; f-AnoGAN's kappa = 1); steps and lr of the Adam
    refinement (0 steps = the encoder alone, one forward pass); grade (the DR grade G is conditioned on;
    ignored by unconditional models); seed (of the encoder's training latents); encoder_samples and
    ridge_alpha (the encoder); scale_images (reference normals inverted to set the two residual scales).
    """

    name = "fanogan"
    # AnoGAN (Schlegl et al. 2017): inversion loss (1 - lambda) * residual + lambda * discrimination, 0.1.
    INVERSION_FEATURE_WEIGHT = 0.1

    def __init__(
        self,
        kappa: float = 1.0,
        steps: int = 20,
        lr: float = 0.05,
        grade: int = 0,
        seed: int = 0,
        encoder_samples: int = 1024,
        ridge_alpha: float = 10.0,
        scale_images: int = 64,
        batch_size: int = 64,
    ) -> None:
        for key, v, lo in (("kappa", kappa, 0.0), ("ridge_alpha", ridge_alpha, 0.0)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < lo:
                raise ConfigError(f"fanogan: {key} must be a finite number >= {lo:g}, got {v!r}")
        for key, v, lo in (
            ("steps", steps, 0),
            ("grade", grade, 0),
            ("seed", seed, 0),
            ("encoder_samples", encoder_samples, 2),
            ("scale_images", scale_images, 1),
            ("batch_size", batch_size, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"fanogan: {key} must be an integer >= {lo}, got {v!r}")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise ConfigError(f"fanogan: lr must be > 0, got {lr!r}")
        self.kappa, self.steps, self.lr, self.grade, self.seed = float(kappa), steps, float(lr), grade, seed
        self.encoder_samples, self.ridge_alpha = encoder_samples, float(ridge_alpha)
        self.scale_images, self.batch_size = scale_images, batch_size
        self.encoder_w: np.ndarray | None = None  # [F, z_dim]: standardised features -> (Z', C)
        self.encoder_b: np.ndarray | None = None  # [z_dim]
        self.scales: np.ndarray | None = None  # [2]: median image residual, median feature residual

    def options(self) -> dict[str, Any]:
        return {
            "kappa": self.kappa,
            "steps": self.steps,
            "lr": self.lr,
            "grade": self.grade,
            "seed": self.seed,
            "encoder_samples": self.encoder_samples,
            "ridge_alpha": self.ridge_alpha,
            "scale_images": self.scale_images,
            "batch_size": self.batch_size,
        }

    def _grades(self, model: LoadedModel, n: int) -> torch.Tensor | None:
        if model.num_classes == 0:
            return None
        if not self.grade < model.num_classes:
            raise ConfigError(f"fanogan: grade {self.grade} out of range 0..{model.num_classes - 1}")
        return torch.full((n,), self.grade, dtype=torch.int64, device=model.device)

    @torch.no_grad()
    def fit_encoder(self, ctx: ScoringContext) -> None:
        """Ridge regression from standardised features of generated images to their latents (Z', C).

        f-AnoGAN's "ziz" encoder training (generated image -> its own latent), with a linear map on the
        discriminator/Q features instead of a trained CNN: closed form, seconds on a CPU.
        """
        model, extractor = ctx.need_model()
        spec = model.spec
        gen = torch.Generator().manual_seed(self.seed)
        sample = spec.sample(self.encoder_samples, gen)
        feats, targets = [], []
        for i in range(0, sample.n, self.batch_size):
            part = sample[slice(i, i + self.batch_size)].to(model.device)
            imgs = model.G(part.z_noise, part.code(), self._grades(model, part.n), noise_mode="const").float()
            feats.append(ctx.standardise(extractor(imgs)))
            targets.append(torch.cat([part.z_noise, part.code()], dim=1).double().cpu().numpy())
        x, y = np.concatenate(feats), np.concatenate(targets)
        xm, ym = x.mean(axis=0), y.mean(axis=0)
        xc, yc = x - xm, y - ym
        gram = xc.T @ xc + self.ridge_alpha * np.eye(x.shape[1])
        self.encoder_w = np.linalg.solve(gram, xc.T @ yc)
        self.encoder_b = ym - xm @ self.encoder_w

    def encode(self, feats: np.ndarray, ctx: ScoringContext) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [N, F] -> starting latents Z' [N, noise_dim], C [N, code_dim] (clamped to code ranges)."""
        assert self.encoder_w is not None and self.encoder_b is not None
        model, _ = ctx.need_model()
        pred = (
            torch.from_numpy(ctx.standardise(feats) @ self.encoder_w + self.encoder_b)
            .float()
            .to(model.device)
        )
        nd = model.spec.noise_dim
        return pred[:, :nd].contiguous(), _clamp_code(pred[:, nd:].contiguous(), model)

    def reconstruct(self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """G_ema(E(x) refined) [N, 3, R, R] for images [N, 3, R, R] in [-1, 1] with features feats [N, F]."""
        z, code = self.encode(feats, ctx)
        model, _ = ctx.need_model()
        return invert_images(
            ctx,
            images,
            z,
            code,
            self._grades(model, images.shape[0]),
            steps=self.steps,
            lr=self.lr,
            feature_weight=self.INVERSION_FEATURE_WEIGHT,
        )

    def residuals(
        self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext
    ) -> tuple[np.ndarray, np.ndarray]:
        """(image MSE [N], standardised D-feature MSE [N]) between each image and its reconstruction."""
        img_res, feat_res = [], []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i : i + self.batch_size].to(ctx.need_model()[0].device, torch.float32)
            recon = self.reconstruct(feats[i : i + self.batch_size], x, ctx)
            with torch.no_grad():
                img_res.append(((x - recon) ** 2).mean(dim=(1, 2, 3)).double().cpu())
                fx, fr = _std_d_features(ctx, x), _std_d_features(ctx, recon)
                feat_res.append(((fx - fr) ** 2).mean(dim=1).double().cpu())
        if not img_res:
            return np.zeros(0), np.zeros(0)
        return torch.cat(img_res).numpy(), torch.cat(feat_res).numpy()

    def fit(self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext) -> None:
        self.fit_encoder(ctx)
        img_res, feat_res = self.residuals(feats[: self.scale_images], images[: self.scale_images], ctx)
        # Medians over normals: each term is ~1 on a normal eye; the floor guards a perfect reconstruction.
        self.scales = np.array(
            [max(float(np.median(img_res)), 1e-12), max(float(np.median(feat_res)), 1e-12)]
        )

    def score(self, feats: np.ndarray, images: torch.Tensor, ctx: ScoringContext) -> np.ndarray:
        assert self.scales is not None
        img_res, feat_res = self.residuals(feats, images, ctx)
        return img_res / self.scales[0] + self.kappa * feat_res / self.scales[1]

    def state(self) -> dict[str, np.ndarray]:
        assert self.scales is not None and self.encoder_w is not None and self.encoder_b is not None
        return {"scales": self.scales, "encoder_w": self.encoder_w, "encoder_b": self.encoder_b}

    def load_state(self, arrays: Mapping[str, np.ndarray], n_features: int) -> None:
        self.scales = _need(arrays, "scales", (2,)).astype(np.float64)
        self.encoder_w = _need(arrays, "encoder_w", (n_features, None)).astype(np.float64)
        self.encoder_b = _need(arrays, "encoder_b", (self.encoder_w.shape[1],)).astype(np.float64)


def _std_d_features(ctx: ScoringContext, images: torch.Tensor) -> torch.Tensor:
    """Standardised D-trunk features [N, F_D] (differentiable), on the reference normals' scale."""
    _, extractor = ctx.need_model()
    d = extractor.d_dim
    mean = torch.as_tensor(ctx.mean[:d], dtype=torch.float32, device=images.device)
    sd = torch.as_tensor(ctx.sd[:d], dtype=torch.float32, device=images.device)
    return (extractor.torch_features(images, with_q=False) - mean) / sd


def _clamp_code(code: torch.Tensor, model: LoadedModel) -> torch.Tensor:
    """Clamp a relaxed code [N, code_dim] in place: one-hot blocks, bits to [0, 1]; uniforms to [-1, 1]."""
    s = model.spec
    nc, nb = sum(s.categorical), s.n_bernoulli
    with torch.no_grad():
        code[:, : nc + nb].clamp_(0.0, 1.0)
        code[:, nc + nb :].clamp_(-1.0, 1.0)
    return code


def invert_images(
    ctx: ScoringContext,
    images: torch.Tensor,
    z_init: torch.Tensor,
    code_init: torch.Tensor,
    grades: torch.Tensor | None,
    *,
    steps: int = 20,
    lr: float = 0.05,
    feature_weight: float = 0.1,
) -> torch.Tensor:
    """Reconstructions G_ema(z*, c*) [N, 3, R, R] of images [N, 3, R, R] in [-1, 1] by latent optimisation.

    Starts from (z_init [N, noise_dim], code_init [N, code_dim]) and takes ``steps`` Adam steps on
    (1 - w) * image MSE + w * standardised D-feature MSE, summed over images: Adam updates every latent
    element from its own gradient, so each image is optimised independently of its batch. The relaxed
    code vector is clamped to its ranges after every step. ``grades`` [N] for conditional models.
    """
    model, _ = ctx.need_model()
    x = images.to(model.device, torch.float32)
    z = z_init.detach().clone().requires_grad_(True)
    code = code_init.detach().clone().requires_grad_(True)
    if steps > 0:
        with torch.no_grad():
            fx = _std_d_features(ctx, x)
        opt = torch.optim.Adam([z, code], lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            recon = model.G(z, code, grades, noise_mode="const")
            img_loss = ((recon - x) ** 2).mean(dim=(1, 2, 3))
            feat_loss = ((_std_d_features(ctx, recon) - fx) ** 2).mean(dim=1)
            ((1.0 - feature_weight) * img_loss + feature_weight * feat_loss).sum().backward()
            opt.step()
            _clamp_code(code, model)
    with torch.no_grad():
        return model.G(z, code, grades, noise_mode="const").float()


# ---------------------------------------------------------------------------------------------------
# The scorer: method + standardisation + calibration, saved data-only
# ---------------------------------------------------------------------------------------------------


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
        tensor_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        arrays = {
            "feat_mean": self.feat_mean.astype(np.float64),
            "feat_sd": self.feat_sd.astype(np.float64),
            "calibration_scores": self.calibration_scores.astype(np.float64),
        }
        arrays.update({f"method.{k}": np.ascontiguousarray(v) for k, v in self.method.state().items()})
        with atomic_path(tensor_path) as tmp:
            save_numpy_file(
                arrays, str(tmp), metadata={"format": SCORER_FORMAT, "version": str(SCORER_VERSION)}
            )
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
            "tensors_file": tensor_path.name,
            "tensors_sha256": sha256_file(tensor_path),
        }
        atomic_write_json(json_path, meta)
        return json_path


def _scorer_stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def load_scorer(path: str | Path, model: LoadedModel | None = None) -> AnomalyScorer:
    """Load a scorer written by `AnomalyScorer.save` (``STEM``, ``STEM.json`` or ``STEM.safetensors``).

    Data only: the tensor file must be safetensors (a pickle is refused with `CheckpointError` before any
    parser sees it) and match the sha256 its JSON records. With ``model``, also checks that the scorer was
    fitted on that checkpoint.
    """
    stem = _scorer_stem(path)
    tensor_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    check_safetensors_header(tensor_path)
    if not json_path.is_file():
        raise CheckpointError(f"{tensor_path}: its metadata file {json_path.name} is missing")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{json_path}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != SCORER_FORMAT:
        raise CheckpointError(
            f"{json_path}: not a retinagen anomaly scorer (format {SCORER_FORMAT!r} expected)"
        )
    if meta.get("version") != SCORER_VERSION:
        raise CheckpointError(
            f"{json_path}: scorer version {meta.get('version')!r}; this retinagen reads {SCORER_VERSION}"
        )
    if meta.get("tensors_sha256") != sha256_file(tensor_path):
        raise CheckpointError(
            f"{tensor_path}: contents do not match the sha256 in {json_path.name} (corrupt or replaced)"
        )
    try:
        arrays = load_numpy_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensor_path}: cannot read arrays ({type(exc).__name__})") from None
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


def _standardiser(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = feats.mean(axis=0)
    sd = feats.std(axis=0)
    floor = max(_SD_FLOOR_FRACTION * float(np.median(sd)), 1e-8)
    return mean, np.maximum(sd, floor)


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


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


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
    rng = np.random.default_rng(seed)
    model = load_model(checkpoint, with_discriminator=True)
    data = Path(data)
    ds = ZipImageDataset(data)
    if ds.resolution != model.resolution:
        raise RetinagenError(
            f"{data}: images are {ds.resolution} px but the model works at {model.resolution} px"
        )
    if ds.num_classes == 0:
        raise RetinagenError(f"{data}: the benchmark needs DR-grade labels")
    res = model.resolution
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
    ref_images = _read_prepared(ds, ref_idx)

    extractor = FeatureExtractor(model)
    # Features are extracted once per image set and shared by the scorers: ``score_ms_per_image`` is the
    # scorer's own time, ``total_ms_per_image`` adds the feature extraction (``feature_ms_per_image``).
    extract_ms = _time_features(extractor, normals)
    feats_cache: dict[str, np.ndarray] = {}

    def feats_of(key: str, imgs: torch.Tensor) -> np.ndarray:
        if key not in feats_cache:
            feats_cache[key] = extractor(imgs)
        return feats_cache[key]

    counts = {"reference_normals": int(ref_idx.size), "heldout_normals": int(held_idx.size)}
    for name, imgs in sets.items():
        counts[name] = int(imgs.shape[0]) + refused.get(name, 0)
    counts["refused_by_fov_detector"] = refused

    results: dict[str, dict[str, Any]] = {}
    timing: dict[str, dict[str, float]] = {}
    total = len(scorers) * (1 + len(sets) + len(forced))
    with progress_bar(total, "anomaly benchmark", unit="set", enabled=progress) as bar:
        for name in scorers:
            ref_feats = feats_of("reference", ref_images)
            t0 = time.perf_counter()
            scorer = fit_scorer_on_images(
                model,
                ref_images,
                method=name,
                options=(options or {}).get(name),
                fpr=fpr,
                seed=seed,
                feats=ref_feats,
                info={"data": data.name, "normals": "grade 0 (benchmark reference)"},
            )
            fit_s = time.perf_counter() - t0
            bar.advance(1)
            n_scored, score_s = 0, 0.0

            def scores_of(key: str, imgs: torch.Tensor, scorer: AnomalyScorer = scorer) -> np.ndarray:
                nonlocal n_scored, score_s
                feats = feats_of(key, imgs)  # shared by the scorers: timed apart (feature_ms_per_image)
                t = time.perf_counter()
                s = scorer.score_images(model, imgs, feats=feats, extractor=extractor).score
                score_s += time.perf_counter() - t
                n_scored += int(imgs.shape[0])
                return s

            normal_scores = scores_of("normals", normals)
            per_type: dict[str, Any] = {}
            for key, imgs in sets.items():
                s = np.concatenate([scores_of(key, imgs), np.full(refused.get(key, 0), np.inf)])
                per_type[key] = detection_metrics(normal_scores, s, scorer.threshold)
                bar.advance(1)
            for key, imgs in forced.items():
                m = detection_metrics(normal_scores, scores_of(f"forced:{key}", imgs), scorer.threshold)
                per_type[key].update(
                    {f"{k}_forced": v for k, v in m.items() if k in ("auroc", "aupr", "f1", "tpr")}
                )
                bar.advance(1)
            results[name] = per_type
            method_ms = 1000 * score_s / max(n_scored, 1)
            timing[name] = {
                "fit_s": round(fit_s, 3),
                "score_ms_per_image": round(method_ms, 3),
                "total_ms_per_image": round(method_ms + extract_ms, 3),
                "heldout_normal_fpr": float((normal_scores > scorer.threshold).mean()),
            }
            say(
                f"{name}: "
                + ", ".join(
                    f"{k} {v['auroc']:.3f}" for k, v in per_type.items() if v.get("auroc") is not None
                )
            )
    return {
        "benchmark": "retinagen-anomaly",
        "version": SCORER_VERSION,
        "checkpoint_sha256": model.sha256,
        "checkpoint": str(model.path),
        "data": data.name,
        "data_fingerprint": ds.fingerprint(),
        "resolution": res,
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
