"""The project's own fundus feature encoder: ``fd_fundus``, a Fréchet / KID distance in a fundus feature space.

FID needs Inception-v3 weights that cannot be downloaded here, and ImageNet features are a poor judge of
retinal detail anyway. So the project trains a small CNN on a prepared dataset ZIP and measures FD and KID
(`retinagen.metrics.fid`) on its penultimate-layer features. The extractor is registered as ``"fd_fundus"``
(`register_extractor`), so `fid_repeated`, `create_extractor` and the torch-fidelity path all run with it,
given the encoder file as the "weights".

Network (`FundusEncoderNet`): uint8 [B, 3, H, W] -> resized (bilinear, antialiased) to the encoder's input
size S, mapped to [-1, 1] and standardised per channel with the training images' mean and std -> a 3x3 stem
conv, then one stage per entry of ``channels`` after the first (a stride-2 3x3 conv and a 3x3 conv, each
with GroupNorm) -> average pool to a 2 x 2 grid (the four quadrants), concatenated with the image's
per-channel mean and std -> Linear -> SiLU: the features [B, feature_dim] (default 128).

Why this shape: GroupNorm works on each image alone, so features never depend on the rest of the batch and
training and evaluation behave the same (BatchNorm's running statistics made training unstable on small
fundus sets and differ between modes). But per-image normalisation removes global intensity and colour,
which is exactly what pigmentation, glare and exposure are; so the stem has no normalisation and the colour
statistics reach the features directly. A global average pool would hide where things are (the optic
disc's side gives the laterality), so the last map is pooled to 2 x 2 instead. Both choices were kept
because they scored better on held-out synthetic images (the factor heads' R^2): without the 2 x 2 pool the
regression stalled, and with normalisation in the stem pigmentation and glare were lost.

Training objective (cheap, uses whatever the dataset carries; the heads are discarded for FD):

* ``dr_grade``: cross-entropy on the DR grade (``dataset.json`` ``labels``, -1 = unlabelled is ignored),
  when at least two grades occur;
* ``factors``: mean squared error on the ground-truth factors of synthetic data (``dataset.json``
  ``factors``: ``{"names": [...], "values": {file: [...]}}``), each standardised to zero mean and unit
  variance on the training images. Columns whose name contains ``seed`` (random-number seeds: identifiers,
  not properties of the picture), constant columns and ``grade`` when the grade head exists are left out;
* ``attrs``: binary cross-entropy on CelebA's 0/1 attributes (``dataset.json`` ``attrs``);
* ``rotation``: only when none of the above exists, self-supervised rotation prediction (Gidaris et al.
  2018): each image is turned by k x 90 degrees (k random per image) and the 4-way class predicted. A
  fundus has a definite orientation (disc position, vessel arcades), so this forces features that see
  the anatomy, and it costs one forward pass per image like the supervised heads.

The terms are summed with weight 1 (each is O(1) at initialisation). Supervised grade and factor
regression give features that move with what a fundus GAN should reproduce (lesions, pigmentation,
illumination, field of view), which is the point of a domain-relevant distance.

Data: the ``train`` split when ``dataset.json`` has splits (held-out ``val`` images score the heads,
written to the JSON as ``validation``), else every image; optionally a seeded random subset of
``max_images`` (and at most a quarter of that for validation). Images are decoded once into memory (uint8 at the dataset's resolution) when that takes
at most 1 GiB, else read from the ZIP per batch.

On disk (data only, no pickles): ``NAME.safetensors`` (the network's tensors, heads included) and
``NAME.json`` (schema, the architecture config, the objective, the training-data fingerprint, training
settings and losses, and the SHA-256 of the tensor file, which is the extractor's ``weights_id`` and is
checked on load). Same data, settings and seed -> the same encoder (on the same device and library versions).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retinagen.artifact import read_artifact, write_artifact
from retinagen.errors import CheckpointError, RetinagenError
from retinagen.metrics.fid import FeatureExtractor, MetricUnavailable, register_extractor
from retinagen.progress import progress_bar
from retinagen.training.schedule import warmup_cosine

__all__ = [
    "ENCODER_ENV_VAR",
    "ENCODER_SCHEMA",
    "EXTRACTOR_NAME",
    "EncoderConfig",
    "FundusEncoderExtractor",
    "FundusEncoderNet",
    "encoder_cache_key",
    "encoder_training_targets",
    "load_fundus_encoder",
    "train_fundus_encoder",
]

EXTRACTOR_NAME = "fd_fundus"
ENCODER_SCHEMA = "retinagen.fundus_encoder/1"
# Used by the registry factory when no encoder file is passed (e.g. torch-fidelity without weights path).
ENCODER_ENV_VAR = "RETINAGEN_FUNDUS_ENCODER"
_DEFAULT_CHANNELS = (32, 64, 128, 128)
_MAX_INPUT_SIZE = 128  # default input size: the dataset's resolution, at most this (CPU cost grows with S^2)
_PRELOAD_LIMIT_BYTES = 1 << 30
_POOL_GRID = 2  # the last feature map is average-pooled to 2 x 2 (quadrants) before the embedding
_OBJECTIVES = ("dr_grade", "factors", "attrs", "rotation")


# ====================================================================================== the network
@dataclass
class EncoderConfig:
    """Everything needed to rebuild a `FundusEncoderNet` (stored in the encoder's JSON).

    input_size: S, images are resized to S x S; input_mean / input_std: per-channel (RGB) statistics of the
    training images in [-1, 1], used to standardise the input; channels: per-stage widths (stage 0 at S, stage k
    at S / 2^k);
    feature_dim: width of the features; num_classes: DR grades of the grade head (0: none); factor_names:
    regressed factors (their standardisation in factor_mean / factor_std); attr_names: binary attributes;
    rotation: whether the rotation head exists.
    """

    input_size: int
    input_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    input_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    channels: list[int] = field(default_factory=lambda: list(_DEFAULT_CHANNELS))
    feature_dim: int = 128
    num_classes: int = 0
    factor_names: list[str] = field(default_factory=list)
    factor_mean: list[float] = field(default_factory=list)
    factor_std: list[float] = field(default_factory=list)
    attr_names: list[str] = field(default_factory=list)
    rotation: bool = False

    def validate(self, where: str = "encoder config") -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.input_size) or not 8 <= self.input_size <= 1024:
            raise CheckpointError(
                f"{where}: input_size must be an integer in [8, 1024], got {self.input_size!r}"
            )
        for name, vals in (("input_mean", self.input_mean), ("input_std", self.input_std)):
            ok = isinstance(vals, list) and len(vals) == 3
            if not ok or not all(isinstance(v, int | float) and math.isfinite(v) for v in vals):
                raise CheckpointError(f"{where}: {name} must be a list of 3 finite numbers")
        if min(self.input_std) <= 0:
            raise CheckpointError(f"{where}: input_std must be positive")
        if not self.channels or not all(is_int(c) and 1 <= c <= 4096 for c in self.channels):
            raise CheckpointError(f"{where}: channels must be a non-empty list of integers in [1, 4096]")
        if self.input_size >> (len(self.channels) - 1) < 1:
            raise CheckpointError(
                f"{where}: {len(self.channels)} stages need input_size >= 2^{len(self.channels) - 1}"
            )
        if not is_int(self.feature_dim) or not 2 <= self.feature_dim <= 4096:
            raise CheckpointError(f"{where}: feature_dim must be an integer in [2, 4096]")
        if not is_int(self.num_classes) or self.num_classes < 0 or self.num_classes == 1:
            raise CheckpointError(f"{where}: num_classes must be 0 or >= 2, got {self.num_classes!r}")
        n_f = len(self.factor_names)
        if len(self.factor_mean) != n_f or len(self.factor_std) != n_f:
            raise CheckpointError(f"{where}: factor_mean and factor_std must have one value per factor")
        if not all(isinstance(s, str) for s in [*self.factor_names, *self.attr_names]):
            raise CheckpointError(f"{where}: factor and attribute names must be strings")
        if not isinstance(self.rotation, bool):
            raise CheckpointError(f"{where}: rotation must be true or false")
        if not (self.num_classes or n_f or self.attr_names or self.rotation):
            raise CheckpointError(f"{where}: the encoder has no training head")

    @property
    def objective(self) -> list[str]:
        """The training terms in use, in `_OBJECTIVES` order."""
        used = {
            "dr_grade": self.num_classes > 0,
            "factors": bool(self.factor_names),
            "attrs": bool(self.attr_names),
            "rotation": self.rotation,
        }
        return [k for k in _OBJECTIVES if used[k]]

    @classmethod
    def from_json(cls, data: Any, where: str) -> EncoderConfig:
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: 'config' must be an object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown encoder config keys {unknown}")
        if "input_size" not in data:
            raise CheckpointError(f"{where}: encoder config has no input_size")
        try:
            cfg = cls(**data)
        except TypeError as exc:
            raise CheckpointError(f"{where}: bad encoder config ({exc})") from None
        cfg.validate(where)
        return cfg


def _unit_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] (any H, W) -> float [B, 3, size, size] in [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    return _resized(images.float() / 127.5 - 1.0, size)


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """float [B, 3, H, W] -> [B, 3, size, size]."""
    if x.shape[-2:] != (size, size):
        # Antialiased bilinear: downscaling averages (no aliasing of vessel detail), upscaling interpolates.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _groups(c: int) -> int:
    """GroupNorm groups: 8 where the width allows (per-image normalisation, batch independent)."""
    for g in (8, 4, 2):
        if c % g == 0:
            return g
    return 1


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.SiLU(),
    )


class FundusEncoderNet(nn.Module):
    """Small per-image CNN: uint8 [B, 3, H, W] -> features float32 [B, feature_dim] (+ training heads)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        ch = cfg.channels
        # Fixed input standardisation (stored in the config, not trained): non-persistent buffers.
        self.register_buffer(
            "in_mean", torch.tensor(cfg.input_mean, dtype=torch.float32).view(1, 3, 1, 1), False
        )
        self.register_buffer(
            "in_std", torch.tensor(cfg.input_std, dtype=torch.float32).view(1, 3, 1, 1), False
        )
        # The stem is not normalised: absolute colour and intensity must survive to the features.
        layers: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1), nn.SiLU()]
        for c_in, c_out in zip(ch[:-1], ch[1:], strict=True):
            layers += [_conv_block(c_in, c_out, 2), _conv_block(c_out, c_out, 1)]
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(ch[-1] * _POOL_GRID**2 + 6, cfg.feature_dim)
        self.grade_head = nn.Linear(cfg.feature_dim, cfg.num_classes) if cfg.num_classes else None
        self.factor_head = nn.Linear(cfg.feature_dim, len(cfg.factor_names)) if cfg.factor_names else None
        self.attr_head = nn.Linear(cfg.feature_dim, len(cfg.attr_names)) if cfg.attr_names else None
        self.rotation_head = nn.Linear(cfg.feature_dim, 4) if cfg.rotation else None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (any H, W) -> float [B, 3, S, S], standardised per channel."""
        return (_unit_range(images, self.cfg.input_size) - self.in_mean) / self.in_std

    def preprocess_float(self, x: torch.Tensor) -> torch.Tensor:
        """Images float [B, 3, H, W] in [-1, 1] (a generator's output; differentiable) -> what `preprocess` gives
        for the same images as uint8."""
        return (_resized(x.float(), self.cfg.input_size) - self.in_mean) / self.in_std

    def features_from_float(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images float [B, 3, S, S] -> features [B, feature_dim]."""
        h = F.adaptive_avg_pool2d(self.trunk(x), _POOL_GRID).flatten(1)
        colour = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), correction=0)], dim=1)
        return F.silu(self.embed(torch.cat([h, colour], dim=1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [B, 3, H, W] -> features float32 [B, feature_dim] (the penultimate layer)."""
        return self.features_from_float(self.preprocess(images))


class FundusEncoderExtractor(FeatureExtractor):
    """``fd_fundus``: a trained `FundusEncoderNet` as a `FeatureExtractor` (uint8 [B, 3, H, W] -> [B, D])."""

    def __init__(
        self, net: FundusEncoderNet, weights_id: str, path: Path | None = None, meta: dict | None = None
    ) -> None:
        super().__init__(EXTRACTOR_NAME, net.cfg.feature_dim, weights_id)
        self.net = net
        self.path = path
        self.meta = dict(meta or {})

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


# ==================================================================================== training data
@dataclass
class _Targets:
    grades: np.ndarray | None  # [N] int64, -1 unlabelled
    factors: np.ndarray | None  # [N, F] float32, standardised; NaN where an image has no factors
    attrs: np.ndarray | None  # [N, A] float32 0/1; NaN missing
    cfg_fields: dict[str, Any]


def encoder_training_targets(dataset: Any, indices: list[int], n_fit: int | None = None) -> _Targets:
    """The supervised targets of the images ``indices`` of a `ZipImageDataset` (see the module docstring).

    Which targets exist and the factors' standardisation are decided on the first ``n_fit`` rows (the
    training images; default all), so held-out rows after them do not leak into the training setup.
    """
    n_fit = len(indices) if n_fit is None else n_fit
    meta = dataset.meta if isinstance(getattr(dataset, "meta", None), dict) else {}
    names = [dataset.names[i] for i in indices]
    fields: dict[str, Any] = {}
    grades = None
    labels = np.asarray(dataset.labels)[indices]
    fit_labels = labels[:n_fit]
    if int(getattr(dataset, "num_classes", 0)) >= 2 and len(np.unique(fit_labels[fit_labels >= 0])) >= 2:
        grades = labels.astype(np.int64)
        fields["num_classes"] = int(dataset.num_classes)

    from retinagen.data.dataset import per_image_table

    factors = None
    if (table := per_image_table(meta.get("factors"), names)) is not None:
        all_names, raw = table
        keep, mean, std = [], [], []
        for j, fname in enumerate(all_names):
            col = raw[:n_fit, j][np.isfinite(raw[:n_fit, j])]
            if "seed" in fname.lower() or (fname == "grade" and grades is not None) or len(col) < 2:
                continue
            s = float(col.std())
            if s < 1e-8:
                continue
            keep.append(j)
            mean.append(float(col.mean()))
            std.append(s)
        if keep:
            factors = ((raw[:, keep] - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
            fields.update(factor_names=[all_names[j] for j in keep], factor_mean=mean, factor_std=std)

    attrs = None
    if (table := per_image_table(meta.get("attrs"), names)) is not None:
        anames, values = table
        # Binary targets (CelebA's -1/1): 1 where > 0, 0 otherwise, NaN where a file has no row.
        arr = np.where(np.isfinite(values), values > 0, np.nan).astype(np.float32)
        if np.isfinite(arr[:n_fit]).any():
            attrs = arr
            fields["attr_names"] = anames
    if grades is None and factors is None and attrs is None:
        fields["rotation"] = True
    return _Targets(grades, factors, attrs, fields)


def _split_indices(dataset: Any, max_images: int | None, seed: int) -> tuple[list[int], list[int], str]:
    """(train indices, validation indices, description): the train/val splits of dataset.json when present."""
    splits = dataset.meta.get("splits") if isinstance(getattr(dataset, "meta", None), dict) else None
    n = len(dataset)
    if isinstance(splits, dict) and splits:
        train = [i for i, name in enumerate(dataset.names) if splits.get(name) == "train"]
        val = [i for i, name in enumerate(dataset.names) if splits.get(name) == "val"]
        if len(train) < 2:
            train, val = list(range(n)), []
        how = "train split" if val or len(train) < n else "all images"
    else:
        train, val, how = list(range(n)), [], "all images"
    rng = np.random.default_rng([seed, 7])
    if max_images is not None and max_images < len(train):
        train = sorted(int(i) for i in rng.choice(train, size=max_images, replace=False))
        how += f", random {max_images}"
    # Validation only scores the heads: a quarter of the training budget is plenty.
    if max_images is not None and len(val) > max(max_images // 4, 2):
        val = sorted(int(i) for i in rng.choice(val, size=max(max_images // 4, 2), replace=False))
    if len(train) < 2:
        raise RetinagenError(f"{dataset.path}: need at least 2 training images for the fundus encoder")
    return train, val, how


class _ImageStore:
    """uint8 [3, R, R] images of a dataset by index: decoded once into memory when small enough."""

    def __init__(self, dataset: Any, indices: list[int], progress: bool) -> None:
        self.dataset = dataset
        r = int(dataset.resolution)
        self.cache: dict[int, torch.Tensor] = {}
        if len(indices) * 3 * r * r <= _PRELOAD_LIMIT_BYTES:
            with progress_bar(len(indices), "fundus encoder: decode images", enabled=progress) as bar:
                for i in indices:
                    self.cache[i] = self._read(i)
                    bar.advance(1)

    def _read(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.dataset.read_uint8(i).transpose(2, 0, 1)))

    def batch(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.cache[i] if i in self.cache else self._read(i) for i in indices])


@torch.no_grad()
def _channel_stats(
    store: _ImageStore, idx: list[int], size: int, batch_size: int
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (float64 accumulation) of the images ``idx`` at ``size`` px in [-1, 1]."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for start in range(0, len(idx), batch_size):
        x = _unit_range(store.batch(idx[start : start + batch_size]), size).double()
        total += x.sum(dim=(0, 2, 3)).numpy()
        total_sq += (x**2).sum(dim=(0, 2, 3)).numpy()
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    # A floor keeps a constant channel (e.g. a grey test set) from dividing by ~0.
    return [float(v) for v in mean], [float(max(v, 1e-3)) for v in std]


def _losses(
    net: FundusEncoderNet,
    x: torch.Tensor,
    rows: np.ndarray,
    t: _Targets,
    gen: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """Per-objective losses of a batch: x float [B, 3, S, S] preprocessed, rows [B] indices into the targets."""
    out: dict[str, torch.Tensor] = {}
    if net.rotation_head is not None:
        # Evaluation (no generator): a fixed rotation per position, so the score is deterministic.
        n = x.shape[0]
        # The CPU generator draws the rotations, so they do not depend on the training device.
        k = torch.arange(n) % 4 if gen is None else torch.randint(0, 4, (n,), generator=gen)
        k = k.to(x.device)
        x = torch.stack([torch.rot90(img, int(kk), dims=(1, 2)) for img, kk in zip(x, k, strict=True)])
        f = net.features_from_float(x)
        out["rotation"] = F.cross_entropy(net.rotation_head(f), k)
        return out
    f = net.features_from_float(x)
    if net.grade_head is not None and t.grades is not None:
        g = torch.from_numpy(t.grades[rows]).to(x.device)
        if (g >= 0).any():
            out["dr_grade"] = F.cross_entropy(net.grade_head(f), g, ignore_index=-1)
    if net.factor_head is not None and t.factors is not None:
        y = torch.from_numpy(t.factors[rows]).to(x.device)
        m = torch.isfinite(y)
        if m.any():
            out["factors"] = F.mse_loss(net.factor_head(f)[m], y[m])
    if net.attr_head is not None and t.attrs is not None:
        y = torch.from_numpy(t.attrs[rows]).to(x.device)
        m = torch.isfinite(y)
        if m.any():
            out["attrs"] = F.binary_cross_entropy_with_logits(net.attr_head(f)[m], y[m])
    return out


@torch.no_grad()
def _validation_scores(
    net: FundusEncoderNet, store: _ImageStore, idx: list[int], t: _Targets, batch_size: int
) -> dict[str, float]:
    """Held-out scores of the heads: losses, grade accuracy, mean factor R^2 (on standardised factors)."""
    net.eval()
    sums: dict[str, float] = {}
    correct = labelled = 0
    n_f = len(net.cfg.factor_names)
    sq_err, y_sum, y_sq, y_n = np.zeros(n_f), np.zeros(n_f), np.zeros(n_f), np.zeros(n_f)
    for start in range(0, len(idx), batch_size):
        rows = np.arange(start, min(start + batch_size, len(idx)))
        x = net.preprocess(store.batch([idx[r] for r in rows]).to(net.in_mean.device))
        for k, v in _losses(net, x, rows, t, None).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(rows)
        f = net.features_from_float(x)
        if net.grade_head is not None and t.grades is not None:
            g = t.grades[rows]
            pred = net.grade_head(f).argmax(1).cpu().numpy()
            correct += int((pred[g >= 0] == g[g >= 0]).sum())
            labelled += int((g >= 0).sum())
        if net.factor_head is not None and t.factors is not None:
            y = t.factors[rows]
            p = net.factor_head(f).cpu().numpy()
            ok = np.isfinite(y)
            y0 = np.where(ok, y, 0.0)
            sq_err += np.where(ok, (p - y0) ** 2, 0.0).sum(0)
            y_sum += y0.sum(0)
            y_sq += (y0**2).sum(0)
            y_n += ok.sum(0)
    out = {f"loss/{k}": v / len(idx) for k, v in sums.items()}
    if labelled:
        out["grade_accuracy"] = correct / labelled
    var_tot = y_sq - y_sum**2 / np.maximum(y_n, 1)  # n * variance of each factor over these images
    ok_cols = var_tot > 1e-12
    if ok_cols.any():
        # R^2 per factor (1 - residual / total sum of squares), averaged over factors that vary here.
        out["factor_r2_mean"] = float(np.mean(1.0 - sq_err[ok_cols] / var_tot[ok_cols]))
    return out


def train_fundus_encoder(
    zip_path: str | Path,
    out_path: str | Path,
    *,
    resolution: int | None = None,
    epochs: int = 12,
    batch_size: int = 16,
    min_steps: int = 0,
    seed: int = 0,
    max_images: int | None = None,
    feature_dim: int = 128,
    channels: tuple[int, ...] | list[int] = _DEFAULT_CHANNELS,
    lr: float = 5e-3,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Train the fundus encoder on a prepared dataset ZIP and save it (data only); returns the .safetensors path.

    Args:
        zip_path: a dataset ZIP from ``retinagen prepare`` / ``retinagen synth`` + prepare.
        out_path: where to write; ``.safetensors`` and ``.json`` are written with this stem.
        resolution: the encoder's input size S (default: the dataset's resolution, at most 128). Images of any
            size are resized to S inside the encoder.
        epochs, batch_size: passes over the training images and images per step (AdamW, lr ``lr``, cosine).
        min_steps: train for more epochs when ``epochs`` would give fewer optimizer steps than this (small
            datasets need more passes; the JSON records the epochs actually run).
        seed: weight initialisation, shuffling and rotations; same seed -> same encoder.
        max_images: train on a seeded random subset of at most this many images (default: all).
        feature_dim, channels: the architecture (features: [B, feature_dim]).
        device: where to train ("cuda" makes large datasets cheap); the saved encoder is the same format.
    Cost: one forward + backward pass per image per epoch (it grows with S^2).
    """
    from retinagen.data.dataset import ZipImageDataset

    if epochs < 1 or batch_size < 1 or min_steps < 0:
        raise ValueError(
            f"epochs and batch_size must be >= 1 and min_steps >= 0, got {epochs}, {batch_size}, {min_steps}"
        )
    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images must be >= 2, got {max_images}")
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise RetinagenError(f"{zip_path}: dataset ZIP not found")
    out = Path(out_path)
    tensor_path = out.with_suffix(".safetensors")
    t_start = time.perf_counter()
    ds = ZipImageDataset(zip_path)
    size = int(resolution) if resolution is not None else min(int(ds.resolution), _MAX_INPUT_SIZE)
    train_idx, val_idx, how = _split_indices(ds, max_images, seed)
    targets = encoder_training_targets(ds, train_idx + val_idx, n_fit=len(train_idx))
    store = _ImageStore(ds, train_idx + val_idx, progress)
    in_mean, in_std = _channel_stats(store, train_idx, size, batch_size)
    cfg = EncoderConfig(
        input_size=size,
        input_mean=in_mean,
        input_std=in_std,
        channels=list(channels),
        feature_dim=feature_dim,
        **targets.cfg_fields,
    )
    try:
        cfg.validate("train_fundus_encoder")
    except CheckpointError as exc:
        raise RetinagenError(str(exc)) from None

    with torch.random.fork_rng(devices=[]):
        # Initialise from the seed without leaving a trace in the process-global RNG.
        torch.manual_seed(seed)
        net = FundusEncoderNet(cfg)
    dev = torch.device(device)
    net = net.to(dev)
    gen = torch.Generator().manual_seed(seed)
    n_train = len(train_idx)
    steps_per_epoch = math.ceil(n_train / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    total_steps = epochs * steps_per_epoch
    history = _fit(net, store, train_idx, targets, epochs=epochs, batch_size=batch_size, lr=lr, gen=gen, dev=dev,
                   progress=progress)
    net.eval()
    validation = (
        _validation_scores(net, store, val_idx, _targets_rows(targets, n_train), batch_size)
        if val_idx
        else {}
    )
    train_scores = _validation_scores(net, store, train_idx, targets, batch_size)

    meta = {
        "schema": ENCODER_SCHEMA,
        "extractor": EXTRACTOR_NAME,
        "config": asdict(cfg),
        "objective": cfg.objective,
        "data": {
            "fingerprint": ds.fingerprint(),
            "file": zip_path.name,
            "resolution": int(ds.resolution),
            "images": how,
            "n_train": n_train,
            "n_val": len(val_idx),
        },
        "training": {
            "epochs": epochs,
            "min_steps": min_steps,
            "device": str(dev),
            "steps": total_steps,
            "batch_size": batch_size,
            "seed": seed,
            "lr": lr,
            "max_images": max_images,
            "seconds": round(time.perf_counter() - t_start, 3),
            "history": history,
            "train_scores": train_scores,
        },
        "validation": validation,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_version": torch.__version__,
    }
    _save(net, tensor_path, meta)
    return tensor_path


def _fit(net: FundusEncoderNet, store: _ImageStore, train_idx: list[int], targets: _Targets, *, epochs: int,
         batch_size: int, lr: float, gen: torch.Generator, dev: torch.device, progress: bool) -> list[dict[str, float]]:
    """AdamW with warm-up + cosine over ``epochs`` seeded passes (rows shuffled by ``gen``); the loss history."""
    n_train = len(train_idx)
    total_steps = epochs * math.ceil(n_train / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total_steps))
    history: list[dict[str, float]] = []
    net.train()
    with progress_bar(epochs * n_train, "fundus encoder: train", enabled=progress) as bar:
        for epoch in range(epochs):
            perm = torch.randperm(n_train, generator=gen).numpy()
            sums: dict[str, float] = {}
            for start in range(0, n_train, batch_size):
                rows = perm[start : start + batch_size]
                x = net.preprocess(store.batch([train_idx[r] for r in rows]).to(dev))
                parts = _losses(net, x, rows, targets, gen)
                if not parts:
                    bar.advance(len(rows))
                    continue
                loss = sum(parts.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]
                opt.step()
                sched.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(rows)
                bar.advance(len(rows))
            history.append({"epoch": epoch + 1, **{f"loss/{k}": v / n_train for k, v in sums.items()}})
    return history


def _save(net: FundusEncoderNet, tensor_path: Path, meta: dict[str, Any]) -> None:
    """The weights from the CPU (the file does not depend on the training device's layout), then the JSON."""
    net = net.cpu()
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_artifact(tensor_path, state, meta, header={"format": "retinagen-fundus-encoder"})


def _targets_rows(t: _Targets, offset: int) -> _Targets:
    """The targets of the rows after ``offset`` (the validation images, stored after the training ones)."""

    def tail(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[offset:]

    return _Targets(tail(t.grades), tail(t.factors), tail(t.attrs), t.cfg_fields)


# ============================================================================================ loading
def _accept_encoder(meta: dict[str, Any], json_path: Path) -> None:
    if meta.get("schema") != ENCODER_SCHEMA:
        raise CheckpointError(
            f"{json_path}: not a fundus encoder (schema {meta.get('schema')!r}, expected {ENCODER_SCHEMA!r})"
        )


def load_fundus_encoder(path: str | Path, device: str | torch.device = "cpu") -> FundusEncoderExtractor:
    """Load an encoder written by `train_fundus_encoder` (``.safetensors`` or its ``.json``) as an extractor.

    Refuses anything but safetensors (pickles can run code when loaded), a tensor file whose SHA-256 differs
    from the one in its JSON, and configs or tensors that do not match. The extractor is in eval mode without
    gradients; its ``weights_id`` is the tensor file's SHA-256.
    """
    art = read_artifact(path, accept=_accept_encoder)
    tensor_path, json_path, meta, tensors, digest = art.tensor_path, art.json_path, art.meta, art.tensors, art.sha256
    cfg = EncoderConfig.from_json(meta.get("config"), str(json_path))
    net = FundusEncoderNet(cfg)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{tensor_path}: tensors do not match the encoder config ({exc})") from None
    ext = FundusEncoderExtractor(net, digest, tensor_path, meta)
    return ext.to(torch.device(device)).eval().requires_grad_(False)


def _factory(weights: str | Path | None) -> FeatureExtractor:
    path = weights if weights not in (None, "") else os.environ.get(ENCODER_ENV_VAR, "")
    if not path:
        raise MetricUnavailable(
            f"{EXTRACTOR_NAME} needs a trained fundus encoder file: pass its .safetensors path as the extractor "
            f"weights (retinagen evaluate --fundus-encoder PATH, or set {ENCODER_ENV_VAR}=PATH); "
            "train one with retinagen.metrics.encoder.train_fundus_encoder, or let retinagen evaluate train one"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise MetricUnavailable(f"{EXTRACTOR_NAME}: fundus encoder file {p} not found")
    return load_fundus_encoder(p)


register_extractor(EXTRACTOR_NAME, _factory, overwrite=True)


def encoder_cache_key(data_fingerprint: str, **settings: Any) -> str:
    """SHA-256 hex key of an encoder trained on data with ``data_fingerprint`` under ``settings`` (for caching)."""
    payload = {"schema": ENCODER_SCHEMA, "data": data_fingerprint, **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
