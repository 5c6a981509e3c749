"""Fréchet distance (FID, fd_fundus) and KID between real and generated images, offline.

The paper's quality measure (Sec. 4.3, Eq. 14) is

    FD = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2)),

the Fréchet distance between Gaussians fitted to image features: Inception-v3 pool features for FID, the
features of a fundus encoder the project trains itself for ``fd_fundus``. KID (Binkowski et al. 2018) is the
unbiased MMD^2 between the same features under the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3,
averaged over random subsets.

Layers of this module, bottom up:

* pure math on feature arrays: `feature_stats`, `StatsAccumulator` (streaming, batch-size independent),
  `frechet_distance`, `kid`;
* feature extractors: `retinagen.metrics.extractors` (re-exported here: the uint8 -> features contract,
  its registry, the local-only Inception-v3 weights);
* image sources: real images from a dataset (`RealSource`), generated images straight from a checkpoint
  (`model_source`, no files written); both reach the extractors as uint8 [B, 3, H, W];
* metrics: `fidelity_metrics` (one FID/KID through ``torch_fidelity.calculate_metrics``) and `fid_repeated`
  (the paper's "mean ± std over five estimates": real statistics once, from a cache when possible, generated
  statistics ``repeats`` times with different seeds).

torch-fidelity's own file cache and its conditional-generator path are not used: the cache stores pickles
(``torch.load(weights_only=False)``) and the conditional path calls ``np.int`` (gone in NumPy >= 1.24);
conditioning on DR grade happens inside our generator wrapper instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinagen.fileio import atomic_path, sha256_file
from retinagen.metrics.extractors import (
    INCEPTION_ENV_VAR,
    INCEPTION_SHA256_PREFIX,
    INCEPTION_WEIGHTS_FILENAME,
    FeatureExtractor,
    MetricUnavailable,
    create_extractor,
    register_extractor,
    registered_extractors,
    resolve_inception_weights,
    state_dict_sha256,
    torch_fidelity_extractor_name,
    verify_inception_weights,
)
from retinagen.progress import progress_bar

__all__ = [
    "INCEPTION_ENV_VAR",
    "INCEPTION_SHA256_PREFIX",
    "INCEPTION_WEIGHTS_FILENAME",
    "FeatureExtractor",
    "ImageSource",
    "MetricUnavailable",
    "RealSource",
    "RealStats",
    "StatsAccumulator",
    "StatsCache",
    "create_extractor",
    "default_stats_cache_dir",
    "feature_stats",
    "features_from_dataset",
    "features_from_source",
    "fid_repeated",
    "fidelity_metrics",
    "frechet_distance",
    "images_to_uint8_nchw",
    "kid",
    "model_source",
    "real_statistics",
    "register_extractor",
    "registered_extractors",
    "resolve_inception_weights",
    "state_dict_sha256",
    "stats_cache_key",
    "torch_fidelity_extractor_name",
    "verify_inception_weights",
]

# Bump when the cached statistics change meaning (e.g. a different covariance normalisation).
_STATS_CACHE_VERSION = 1


# =========================================================================================== pure math
def _as_features(features: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    arr = np.asarray(features)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be [N, D], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or inf")
    return arr


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, unbiased: divides by N - 1, as torch-fidelity) of features [N, D].

    Needs N >= 2. Computed in float64 from all rows at once; `StatsAccumulator` gives the same result streaming.
    """
    x = _as_features(features).astype(np.float64)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = xc.T @ xc / (x.shape[0] - 1)
    return mu, sigma


class StatsAccumulator:
    """Streaming mean and covariance of feature rows, independent of how the rows are batched.

    Merges per-batch (count, mean, centred scatter) with Chan et al.'s parallel update, which stays accurate
    in float64 where the naive sum of x x^T would cancel catastrophically for features with a large mean.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.n = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._scatter = np.zeros((dim, dim), dtype=np.float64)

    def add(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a batch [B, dim] (B may be 0)."""
        x = _as_features(features).astype(np.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {x.shape}")
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        scatter_b = xc.T @ xc
        n = self.n + nb
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._scatter += scatter_b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) as `feature_stats` would give on all rows added so far."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.n}")
        return self._mean.copy(), self._scatter / (self.n - 1)


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise removed: values below D * eps * max are set to 0.

    For singular covariances (N <= D) the null-space eigenvalues come out as +-1e-16-ish; their square roots
    (~1e-8 each) would otherwise add noise that makes FD(a, b) and FD(b, a) differ in the 8th digit.
    """
    tol = max(float(w.max(initial=0.0)), 0.0) * w.shape[0] * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sym_sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (rounding-level eigenvalues treated as 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (paper, Eq. 14).

    ``Tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^(1/2) S2 S1^(1/2)``, which is similar to ``S1 S2`` (same eigenvalues). This stays real and stable for
    singular covariances (fewer samples than feature dimensions), where ``scipy.linalg.sqrtm(S1 @ S2)`` returns
    complex values with small imaginary parts that have to be discarded. Rounding can leave the result a hair
    below zero for identical inputs; it is clamped at 0.

    Args:
        mu1, mu2: means [D]. sigma1, sigma2: covariances [D, D] (symmetric PSD; symmetrised here).
    Returns:
        The distance (a squared distance, in squared feature units), >= 0.
    """
    m1, m2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(f"mu1 and mu2 must both be [D], got {m1.shape} and {m2.shape}")
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be [{d}, {d}], got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", m1), ("mu2", m2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    r1 = _sym_sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_covmean = float(np.sqrt(_clip_eigenvalues(eig)).sum())
    diff = m1 - m2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples [m, D] under k(a, b) = (a.b / D + 1)^3."""
    m, dim = x.shape
    kxx = (x @ x.T / dim + 1.0) ** 3
    kyy = (y @ y.T / dim + 1.0) ** 3
    kxy = (x @ y.T / dim + 1.0) ** 3
    sum_xx = kxx.sum() - np.trace(kxx)
    sum_yy = kyy.sum() - np.trace(kyy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kid(
    features_a: np.ndarray | torch.Tensor,
    features_b: np.ndarray | torch.Tensor,
    subset_size: int = 1000,
    subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std over ``subsets`` random subsets of the unbiased MMD^2.

    Each subset draws ``subset_size`` rows without replacement from each side, with the cubic polynomial kernel
    k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018). The subsets are drawn with
    ``np.random.RandomState(seed)`` in the same order as torch-fidelity 0.4, so both give the same numbers for
    the same features and seed. KID can be slightly negative for near-identical distributions (unbiased).

    Args:
        features_a, features_b: [N_a, D] and [N_b, D]; subset_size must be in [2, min(N_a, N_b)].
    Returns:
        (mean, std) over the subsets (std with ddof=0, as torch-fidelity).
    """
    a = _as_features(features_a, "features_a").astype(np.float64)
    b = _as_features(features_b, "features_b").astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if not 2 <= subset_size <= min(len(a), len(b)):
        raise ValueError(
            f"subset_size must be in [2, min(N_a, N_b)] = [2, {min(len(a), len(b))}], got {subset_size}"
        )
    rng = np.random.RandomState(seed)
    values = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        xa = a[rng.choice(len(a), subset_size, replace=False)]
        xb = b[rng.choice(len(b), subset_size, replace=False)]
        values[s] = _mmd2_unbiased_poly(xa, xb)
    return float(values.mean()), float(values.std())



# ==================================================================================== image sources
def images_to_uint8_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images in any of the project's layouts -> uint8 [B, 3, H, W] on the CPU.

    Accepts uint8 [B, H, W, 3] numpy (what `retinagen.generation.generate_images` returns), uint8 [B, 3, H, W]
    tensors, and float [B, 3, H, W] tensors in [-1, 1] (what the generator and the datasets produce); a single
    image without the batch axis is accepted too.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 [B, H, W, 3], got dtype {images.dtype}")
        arr = images[None] if images.ndim == 3 else images
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"numpy images must be uint8 [B, H, W, 3], got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a numpy array or a tensor, got {type(images).__name__}")
    t = images.detach().cpu()
    t = t[None] if t.ndim == 3 else t
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"image tensors must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if not t.is_floating_point():
        raise ValueError(f"image tensors must be uint8 or float in [-1, 1], got {t.dtype}")
    # Same mapping as retinagen.generation: [-1, 1] -> round((x + 1) * 127.5).
    return ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()


def _dataset_image(dataset: Any, index: int) -> torch.Tensor:
    """Item ``index`` of an image dataset as uint8 [3, H, W]."""
    read_uint8 = getattr(dataset, "read_uint8", None)
    if callable(read_uint8):
        # ZipImageDataset: the stored bytes, without the round trip through [-1, 1] floats.
        return images_to_uint8_nchw(np.asarray(read_uint8(index)))[0]
    item = dataset[index]
    img = item[0] if isinstance(item, tuple | list) else item
    return images_to_uint8_nchw(img)[0]


class Uint8ImageDataset(torch.utils.data.Dataset):
    """View of an image dataset (items ``img`` or ``(img, label)``) as uint8 [3, H, W] tensors (torch-fidelity input)."""

    def __init__(self, dataset: Any, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _dataset_image(self.dataset, self.indices[i])


@dataclass(frozen=True)
class RealSource:
    """Real images for FID: a dataset plus a fingerprint that identifies its content (for the stats cache).

    ``dataset[i]`` is ``img`` or ``(img, label)`` with ``img`` float [3, R, R] in [-1, 1] or uint8.
    """

    dataset: Any
    fingerprint: str
    name: str = "real"

    @classmethod
    def from_zip(cls, path: str | Path, split: str | None = None) -> RealSource:
        """A prepared dataset ZIP (``retinagen prepare``); the fingerprint covers the data and the split."""
        from retinagen.data.dataset import ZipImageDataset

        ds = ZipImageDataset(path, split=split)
        fp = ds.fingerprint() if callable(getattr(ds, "fingerprint", None)) else sha256_file(Path(path))
        return cls(ds, f"{fp}:{split or 'all'}", Path(path).name)

    @property
    def resolution(self) -> int:
        return int(_dataset_image(self.dataset, 0).shape[-1])


# A source of generated images: (n, seed, start) -> uint8 [n, R, R, 3], images start .. start+n-1 of the seeded
# run. Image i must depend only on (seed, i), not on n or start, so that batching cannot change the statistics.
ImageSource = Callable[[int, int, int], np.ndarray]


def model_source(
    model: Any, *, grade: int | None = None, truncation_psi: float = 1.0, batch_size: int = 64
) -> ImageSource:
    """Generated images straight from a loaded checkpoint (`retinagen.generation.LoadedModel`), no files written.

    Conditional models draw each image's DR grade from the training grade distribution (or use ``grade``), inside
    `retinagen.generation.generate_images`, per image seed.
    """
    from retinagen.generation import generate_images

    def source(n: int, seed: int, start: int) -> np.ndarray:
        imgs, _ = generate_images(
            model, n, seed, grade=grade, truncation_psi=truncation_psi, batch_size=batch_size, start=start
        )
        return imgs

    return source


def _as_real_source(real: RealSource | str | Path) -> RealSource:
    return real if isinstance(real, RealSource) else RealSource.from_zip(real)


def _as_image_source(generator: Any) -> ImageSource:
    if hasattr(generator, "G") and hasattr(generator, "spec"):
        return model_source(generator)
    if callable(generator):
        return generator
    raise TypeError("generator must be a LoadedModel or a callable (n, seed, start) -> uint8 [n, R, R, 3]")


@lru_cache(maxsize=1)
def _generator_input_class() -> type:
    from torch_fidelity.generative_model_base import GenerativeModelBase

    class GeneratorInput(GenerativeModelBase):
        """An `ImageSource` as a torch-fidelity generative model input.

        torch-fidelity draws noise [B, z_size] and calls forward(noise); the noise is ignored and images come
        from the source in order (image i of ``seed``), so torch-fidelity and `features_from_source` see the same
        images. num_classes is 0: any DR-grade conditioning happens inside the source (torch-fidelity's own
        conditional path uses ``np.int``, removed in NumPy 1.24).
        """

        def __init__(self, source: ImageSource, seed: int) -> None:
            super().__init__()
            self.source = source
            self.seed = seed
            self.next_index = 0

        @property
        def z_size(self) -> int:
            return 1

        @property
        def z_type(self) -> str:
            return "normal"

        @property
        def num_classes(self) -> int:
            return 0

        def forward(self, noise: torch.Tensor, *args: Any) -> torch.Tensor:
            n = int(noise.shape[0])
            imgs = images_to_uint8_nchw(self.source(n, self.seed, self.next_index))
            if imgs.shape[0] != n:
                raise RuntimeError(f"image source returned {imgs.shape[0]} images, expected {n}")
            self.next_index += n
            return imgs.to(noise.device)

    return GeneratorInput


# ============================================================================== feature extraction
@torch.no_grad()
def _run_extractor(extractor: FeatureExtractor, images: torch.Tensor) -> np.ndarray:
    return extractor(images.to(extractor.device)).cpu().numpy().astype(np.float32)


def features_from_dataset(
    dataset: Any,
    extractor: FeatureExtractor,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """Features float32 [N, D] of dataset items ``indices`` (default: all), in order, in batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    out = np.zeros((len(idx), extractor.feature_dim), dtype=np.float32)
    with progress_bar(len(idx), f"features ({extractor.name}) real", enabled=progress) as bar:
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            batch = torch.stack([_dataset_image(dataset, i) for i in chunk])
            out[start : start + len(chunk)] = _run_extractor(extractor, batch)
            bar.advance(len(chunk))
    return out


def features_from_source(
    source: ImageSource | Any,
    extractor: FeatureExtractor,
    n: int,
    seed: int,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """Features float32 [n, D] of generated images 0..n-1 of ``seed`` (a LoadedModel or an `ImageSource`)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    src = _as_image_source(source)
    out = np.zeros((n, extractor.feature_dim), dtype=np.float32)
    with progress_bar(n, f"features ({extractor.name}) generated, seed {seed}", enabled=progress) as bar:
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            imgs = images_to_uint8_nchw(src(m, seed, start))
            if imgs.shape[0] != m:
                raise RuntimeError(f"image source returned {imgs.shape[0]} images, expected {m}")
            out[start : start + m] = _run_extractor(extractor, imgs)
            bar.advance(m)
    return out


# ======================================================================================= stats cache
def default_stats_cache_dir() -> Path:
    return Path.home() / ".cache" / "retinagen" / "stats"


def stats_cache_key(
    dataset_fingerprint: str,
    extractor_name: str,
    extractor_weights_id: str,
    resolution: int,
    n: int,
    subset: str = "all",
) -> str:
    """SHA-256 hex key of real-data statistics: the data, the extractor and its weights, resolution, n, subset."""
    payload = {
        "version": _STATS_CACHE_VERSION,
        "dataset": dataset_fingerprint,
        "extractor": extractor_name,
        "weights": extractor_weights_id,
        "resolution": int(resolution),
        "n": int(n),
        "subset": subset,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class RealStats:
    """Real-data feature statistics: mu [D], sigma [D, D] (float64), optional features [N, D] (float32, for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    key: str = ""
    features: np.ndarray | None = None
    from_cache: bool = False


class StatsCache:
    """Real-data statistics as ``<key>.npz`` files in a folder (default ``~/.cache/retinagen/stats``).

    Data only: written with ``np.savez`` (atomically) and read with ``np.load(allow_pickle=False)``. A file that
    is unreadable or whose stored key differs is treated as a miss and rewritten.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_stats_cache_dir()

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a SHA-256 hex digest, got {key!r}")
        return self.root / f"{key}.npz"

    def load(self, key: str) -> RealStats | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                feats = z["features"] if "features" in z.files else None
                return RealStats(
                    mu=z["mu"].astype(np.float64),
                    sigma=z["sigma"].astype(np.float64),
                    n=int(z["n"]),
                    key=key,
                    features=None if feats is None else feats.astype(np.float32),
                    from_cache=True,
                )
        except (OSError, ValueError, KeyError):
            return None

    def save(self, key: str, stats: RealStats) -> Path:
        p = self.path(key)
        arrays: dict[str, np.ndarray] = {
            "mu": np.asarray(stats.mu, dtype=np.float64),
            "sigma": np.asarray(stats.sigma, dtype=np.float64),
            "n": np.asarray(stats.n, dtype=np.int64),
            "key": np.asarray(key),
        }
        if stats.features is not None:
            arrays["features"] = np.asarray(stats.features, dtype=np.float32)
        with atomic_path(p) as tmp, open(tmp, "wb") as fh:
            # A file handle, not a path: np.savez would append ".npz" to the temporary name.
            np.savez(fh, **arrays)
        return p


def _real_indices(n_total: int, n: int | None, seed: int) -> tuple[list[int], str]:
    if n_total < 2:
        raise ValueError(f"need at least 2 real images, got {n_total}")
    if n is None or n >= n_total:
        return list(range(n_total)), "all"
    if n < 2:
        raise ValueError(f"n_real must be >= 2, got {n}")
    idx = np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))
    return [int(i) for i in idx], f"random:{seed}"


def real_statistics(
    real: RealSource,
    extractor: FeatureExtractor,
    *,
    n: int | None = None,
    seed: int = 0,
    cache: StatsCache | str | Path | None | bool = None,
    keep_features: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> RealStats:
    """Statistics of the real images (all, or a seeded random subset of ``n``), from the cache when present.

    ``cache``: a `StatsCache`, a folder, None (the default folder) or False (no cache). ``keep_features`` keeps
    (and caches) the feature rows, which KID needs.
    """
    idx, subset = _real_indices(len(real.dataset), n, seed)
    key = stats_cache_key(
        real.fingerprint, extractor.name, extractor.weights_id, real.resolution, len(idx), subset
    )
    store: StatsCache | None
    if cache is False:
        store = None
    elif isinstance(cache, StatsCache):
        store = cache
    else:
        store = StatsCache(None if cache is None or cache is True else cache)
    if store is not None:
        hit = store.load(key)
        if hit is not None and (hit.features is not None or not keep_features):
            return hit
    feats = features_from_dataset(
        real.dataset, extractor, indices=idx, batch_size=batch_size, progress=progress
    )
    mu, sigma = feature_stats(feats)
    stats = RealStats(mu, sigma, len(idx), key, feats if keep_features else None)
    if store is not None:
        store.save(key, stats)
    return stats


# ============================================================================================ metrics
def _summary(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    # Sample std (ddof=1) of the repeated estimates; 0 for a single estimate.
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def fid_repeated(
    real_source: RealSource | str | Path,
    generator_source: Any,
    n_samples: int,
    repeats: int = 5,
    *,
    extractor: str | FeatureExtractor = "inception-v3",
    weights: str | Path | None = None,
    seed: int = 0,
    n_real: int | None = None,
    with_kid: bool = False,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    cache: StatsCache | str | Path | None | bool = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Fréchet distance estimated ``repeats`` times (paper: mean ± std over five estimates).

    Real statistics are computed once (or read from the cache); generated statistics are computed ``repeats``
    times from ``n_samples`` images each, with seeds ``seed, seed + 1, ...``. Every image is generated from its
    own per-image seed, so the result does not depend on ``batch_size``.

    Args:
        real_source: a `RealSource` or the path of a prepared dataset ZIP (all its images).
        generator_source: a `retinagen.generation.LoadedModel` or an `ImageSource`.
        extractor: a registered extractor name (``"inception-v3"`` for FID, ``"fd_fundus"``) or an instance.
        weights: weights file for the extractor (for Inception: see `resolve_inception_weights`).
    Returns:
        ``{"mean", "std", "values", "seeds", "n_samples", "n_real", "repeats", "extractor",
        "real_stats_cached"}`` plus ``"kid": {"mean", "std", "values"}`` with ``with_kid`` (the KID mean of each
        repeat). Raises `MetricUnavailable` when the extractor cannot be built (e.g. no Inception weights).
    """
    if repeats < 1 or n_samples < 2:
        raise ValueError(f"need repeats >= 1 and n_samples >= 2, got {repeats} and {n_samples}")
    ext = (
        extractor if isinstance(extractor, FeatureExtractor) else create_extractor(extractor, weights, device)
    )
    real = real_statistics(
        _as_real_source(real_source),
        ext,
        n=n_real,
        seed=seed,
        cache=cache,
        keep_features=with_kid,
        batch_size=batch_size,
        progress=progress,
    )
    src = _as_image_source(generator_source)
    seeds = [seed + r for r in range(repeats)]
    fds: list[float] = []
    kids: list[float] = []
    for s in seeds:
        feats = features_from_source(src, ext, n_samples, s, batch_size=batch_size, progress=progress)
        mu, sigma = feature_stats(feats)
        fds.append(frechet_distance(real.mu, real.sigma, mu, sigma))
        if with_kid:
            assert real.features is not None
            size = min(kid_subset_size, len(real.features), len(feats))
            kids.append(kid(real.features, feats, size, kid_subsets, s)[0])
    out = _summary(fds)
    out.update(
        seeds=seeds,
        n_samples=n_samples,
        n_real=real.n,
        repeats=repeats,
        extractor=ext.name,
        real_stats_cached=real.from_cache,
    )
    if with_kid:
        out["kid"] = _summary(kids)
    return out


def fidelity_metrics(
    real_source: RealSource | str | Path,
    generator_source: Any,
    n_samples: int,
    *,
    extractor: str = "inception-v3",
    weights: str | Path | None = None,
    fid: bool = True,
    with_kid: bool = True,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    n_real: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    verbose: bool = False,
) -> dict[str, float]:
    """One FID/KID estimate computed by ``torch_fidelity.calculate_metrics``.

    Input 1 is the real dataset (uint8 [3, H, W] items), input 2 the generator (images 0..n_samples-1 of
    ``seed``, produced inside torch-fidelity's loop, nothing written to disk). torch-fidelity's file cache is off
    (it pickles), its data loader runs in-process (``save_cpu_ram``), ``kid_subset_size`` is capped at the
    number of samples, and the weights path is always given, so nothing is downloaded.

    Returns ``{"fid"}`` and/or ``{"kid_mean", "kid_std"}``.
    """
    if not (fid or with_kid):
        raise ValueError("ask for at least one of fid, with_kid")
    import torch_fidelity

    if extractor == "inception-v3":
        path = resolve_inception_weights(weights)
        verify_inception_weights(path)
        tf_name, layer, weights_arg = "inception-v3-compat", "2048", str(path)
    else:
        tf_name, layer = torch_fidelity_extractor_name(extractor), "features"
        weights_arg = None if weights is None else str(weights)
    real = _as_real_source(real_source)
    idx, _ = _real_indices(len(real.dataset), n_real, seed)
    real_ds = Uint8ImageDataset(real.dataset, idx)
    gen = _generator_input_class()(_as_image_source(generator_source), seed)
    kwargs: dict[str, Any] = {
        "input1": real_ds,
        "input2": gen,
        "input2_model_num_samples": int(n_samples),
        "cuda": torch.device(device).type == "cuda",
        "batch_size": batch_size,
        "fid": fid,
        "kid": with_kid,
        "feature_extractor": tf_name,
        "feature_layer_fid": layer,
        "feature_layer_kid": layer,
        "kid_subset_size": min(kid_subset_size, len(real_ds), int(n_samples)),
        "kid_subsets": kid_subsets,
        "cache": False,
        "save_cpu_ram": True,
        "rng_seed": seed,
        "verbose": verbose,
    }
    if weights_arg is not None:
        kwargs["feature_extractor_weights_path"] = weights_arg
    res = torch_fidelity.calculate_metrics(**kwargs)
    out: dict[str, float] = {}
    if fid:
        out["fid"] = float(res[torch_fidelity.KEY_METRIC_FID])
    if with_kid:
        out["kid_mean"] = float(res[torch_fidelity.KEY_METRIC_KID_MEAN])
        out["kid_std"] = float(res[torch_fidelity.KEY_METRIC_KID_STD])
    return out
