"""Scoring methods, a registry (`SCORERS`; `register_scorer` adds one): mahalanobis, knn, fanogan.

* ``mahalanobis`` (default): standardised features, Ledoit-Wolf covariance, squared Mahalanobis distance.
* ``knn``: mean distance to the k nearest reference normals, divided by sqrt(F).
* ``fanogan``: f-AnoGAN-style (Schlegl et al. 2019): a closed-form ridge encoder from D/Q features to latents
  fitted on G_ema's own samples, refined by latent optimisation; score = image residual + kappa * D-feature
  residual, each divided by its median over reference normals.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from clinical.anomaly.features import FeatureExtractor
from retinagen.checks import Count, CountAtLeast2, NonNegativeFloat, NonNegativeInt, PositiveFloat, check
from retinagen.errors import (
    CheckpointError,
    ConfigError,
    RetinagenError,
)
from retinagen.generation import LoadedModel

# Features constant over the reference normals would divide by ~0; their sd is floored at this fraction
# of the median sd (a deviation there is still large, but finite).
_SD_FLOOR_FRACTION = 1e-3


def _standardiser(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = feats.mean(axis=0)
    sd = feats.std(axis=0)
    floor = max(_SD_FLOOR_FRACTION * float(np.median(sd)), 1e-8)
    return mean, np.maximum(sd, floor)


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
        self.k = check(Count, k, "knn: k", ConfigError)
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
        for key, v, kind in (
            ("kappa", kappa, NonNegativeFloat),
            ("ridge_alpha", ridge_alpha, NonNegativeFloat),
            ("lr", lr, PositiveFloat),
            ("steps", steps, NonNegativeInt),
            ("grade", grade, NonNegativeInt),
            ("seed", seed, NonNegativeInt),
            ("encoder_samples", encoder_samples, CountAtLeast2),
            ("scale_images", scale_images, Count),
            ("batch_size", batch_size, Count),
        ):
            check(kind, v, f"fanogan: {key}", ConfigError)
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
