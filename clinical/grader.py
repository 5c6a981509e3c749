"""Downstream proof of synthetic rebalancing: a DR grader trained three ways, tested on held-out real data.

``run_downstream(real_zip, synthetic_dir, out_dir)`` trains the same grader (architecture, steps,
batch size, optimiser, seed) on

    real_only            the real training split
    real_plus_synthetic  the real training split + every usable synthetic image
    synthetic_only       the synthetic images alone

and evaluates all three on the same held-out, patient-split **real** test set: quadratic weighted
kappa, balanced accuracy, per-grade recall and AUROC for referable DR (grade >= 2), each with a
percentile-bootstrap 95 % interval over test images. The resamples are the same for every arm, so
the differences from ``real_only`` get paired intervals too. It writes ``REPORT.json``,
``REPORT.md`` and ``REPORT_files/confusion-<arm>.png`` (atomically) and the three graders as
data-only checkpoints in ``graders/``.

The grader
    A MONAI DenseNet (``monai.networks.nets``), sized by a preset (`PRESETS`):

    ========  ====================================================  ======  =====  =========
    preset    network                                               pixels  steps  batch
    ========  ====================================================  ======  =====  =========
    smoke     DenseNet(init 16, growth 8, blocks 2-2-2), 0.02 M      16     30     16
    cpu       DenseNet(init 32, growth 16, blocks 2-4-4), 0.15 M     32     1000   64
    gpu       DenseNet121, 7.0 M                                    256    6000   64
    ========  ====================================================  ======  =====  =========

    The small DenseNet is ~10x cheaper per step than DenseNet121 or EfficientNet-B0 at 32 px
    (``python benchmarks/grader_step.py`` measures it); each trained grader records its own wall and
    CPU seconds in ``meta["training"]``.
    Inputs are RGB uint8 scaled to [-1, 1], resized to the preset's side with antialiased bilinear
    interpolation (the same function for training, testing and `predict_proba`).

    Loss: plain cross-entropy by default, so the class imbalance of the real data is left for the
    synthetic rebalancing to fix (the point of the comparison); ``loss="weighted_ce"`` weights
    classes by inverse training frequency. AdamW, linear warm-up then cosine decay.

    Augmentation: small rotations (+-15 deg), isotropic scaling (+-10 %), shifts (+-5 %), brightness
    and contrast jitter (+-20 %), drawn from a seeded ``torch.Generator``. **No flips**: a mirrored
    fundus is an eye of the other side (a ``RandFlip`` flips laterality). A DR grade does not
    depend on the side, so a flip would not change the label, but the test images are never
    mirrored and the project does not make images of impossible anatomy; rotations and scalings
    have a positive determinant and never mirror.

Data
    Real: a ZIP written by ``retinagen prepare`` (`ZipImageDataset`). Its own patient-level split is
    used when it has a ``test`` split (train + val are the training set: no model selection is done,
    so nothing needs a validation set); otherwise patients (``dataset.json`` ``patients``; single
    images when absent) are split with ``seed``, stratified by each patient's highest grade. Any
    training image whose patient is also in the test set is dropped and counted, so no patient is on
    both sides whatever the ZIP says.

    Synthetic: a folder of PNGs + ``manifest.csv`` as written by `retinagen.generation.write_generated`
    and ``retinagen rebalance`` (``file``, ``level`` or ``grade``, ``synthetic=1``, ``seed``, ``codes``,
    ``checkpoint_sha256``, ...). Rows with a missing or malformed file name or grade, a path outside
    the folder, a duplicate file, ``synthetic`` other than 1, or an unreadable / non-square image are
    skipped and listed with their reason; the job goes on with the rest.

Checkpoints
    `save_grader` writes ``NAME.safetensors`` + ``NAME.json`` through `retinagen.training.checkpoint`
    (atomic, sha256-verified, data only). `load_grader` refuses pickles, other checkpoint kinds and
    weights that do not match the recorded architecture, with a `CheckpointError` naming the file.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import io
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from retinagen import __version__
from retinagen.data.dataset import ZipImageDataset
from retinagen.data.imageio import decode_image, resolve_inside
from retinagen.dr_scale import NUM_GRADES, REFERABLE_GRADE
from retinagen.errors import BadInputError, CheckpointError, ConfigError, RetinagenError
from retinagen.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from retinagen.progress import progress_bar
from retinagen.reporting import figure_png, jsonable
from retinagen.training.checkpoint import load_checkpoint, save_checkpoint
from retinagen.training.schedule import warmup_cosine

__all__ = [
    "ARCHITECTURES",
    "ARMS",
    "GRADER_FORMAT",
    "NUM_GRADES",
    "PRESETS",
    "REFERABLE_GRADE",
    "GradedImages",
    "Grader",
    "GraderConfig",
    "RealSplit",
    "SyntheticSet",
    "augment_batch",
    "balanced_accuracy",
    "bootstrap_indices",
    "bootstrap_samples",
    "confusion_matrix",
    "evaluate_predictions",
    "grader_config",
    "kappa_from_confusion",
    "load_grader",
    "load_synthetic_folder",
    "per_grade_recall",
    "percentile_interval",
    "predict_proba",
    "quadratic_weighted_kappa",
    "referable_auroc",
    "referable_scores",
    "render_markdown",
    "resize_uint8",
    "run_downstream",
    "save_grader",
    "split_by_group",
    "split_real",
    "summary_lines",
    "train_grader",
]

ARMS = ("real_only", "real_plus_synthetic", "synthetic_only")
ARM_TITLES = {"real_only": "real only", "real_plus_synthetic": "real + synthetic", "synthetic_only": "synthetic only"}
GRADER_FORMAT = "retinagen-grader"
GRADER_VERSION = 1
REPORT_FORMAT = "retinagen-downstream"
REPORT_VERSION = 1
MIN_RESOLUTION = 16  # a DenseNet's stem + 2 transitions divide by 16; below that the map is empty

LOSS_DESCRIPTIONS = {
    "ce": "plain cross-entropy (no class weights: the imbalance is left for the synthetic data to fix)",
    "weighted_ce": "class-weighted cross-entropy (weights n / (K * n_k) over the grades present in training)",
}

# --------------------------------------------------------------------------------------------------
# Architectures (a registry: a checkpoint names one of these, never a class path)


def _densenet_tiny(num_classes: int) -> nn.Module:
    from monai.networks.nets import DenseNet

    return DenseNet(spatial_dims=2, in_channels=3, out_channels=num_classes, init_features=16, growth_rate=8,
                    block_config=(2, 2, 2))


def _densenet_small(num_classes: int) -> nn.Module:
    from monai.networks.nets import DenseNet

    return DenseNet(spatial_dims=2, in_channels=3, out_channels=num_classes, init_features=32, growth_rate=16,
                    block_config=(2, 4, 4))


def _densenet121(num_classes: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=3, out_channels=num_classes)


def _efficientnet_b0(num_classes: int) -> nn.Module:
    from monai.networks.nets import EfficientNetBN

    # pretrained=False: these machines are offline, and ImageNet weights are not the point here.
    return EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3, num_classes=num_classes)


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "densenet_tiny": _densenet_tiny,
    "densenet_small": _densenet_small,
    "densenet121": _densenet121,
    "efficientnet-b0": _efficientnet_b0,
}

ARCH_DESCRIPTIONS = {
    "densenet_tiny": "MONAI DenseNet (init_features 16, growth_rate 8, blocks 2-2-2)",
    "densenet_small": "MONAI DenseNet (init_features 32, growth_rate 16, blocks 2-4-4)",
    "densenet121": "MONAI DenseNet121",
    "efficientnet-b0": "MONAI EfficientNetBN b0 (random init)",
}


# --------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class GraderConfig:
    """How a grader is built and trained; every arm of a comparison uses the same one.

    Geometry: ``resolution`` R (images are resized to R x R). Budget: ``steps`` optimizer steps of
    ``batch_size`` images (epochs = steps * batch_size / training images). Augmentation ranges are
    half-widths of uniform draws. ``device``: "auto" (CUDA when available), "cpu" or "cuda[:i]".
    ``amp``: bf16 autocast on CUDA. Training images are held in memory as uint8 when they fit in
    ``cache_max_bytes``, otherwise streamed from disk by ``num_workers`` DataLoader workers.
    """

    arch: str = "densenet_small"
    resolution: int = 32
    batch_size: int = 64
    steps: int = 1000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    loss: str = "ce"
    augment: bool = True
    max_rotation_deg: float = 15.0
    max_scale: float = 0.1
    max_shift: float = 0.05
    brightness: float = 0.2
    contrast: float = 0.2
    eval_batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    amp: bool = False
    cache_max_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"grader config {key}: {why}, got {getattr(self, key)!r}")

        if self.arch not in ARCHITECTURES:
            raise bad("arch", f"must be one of {', '.join(ARCHITECTURES)}")
        if self.loss not in LOSS_DESCRIPTIONS:
            raise bad("loss", f"must be one of {', '.join(LOSS_DESCRIPTIONS)}")
        for key, low in (("resolution", MIN_RESOLUTION), ("batch_size", 2), ("steps", 1), ("eval_batch_size", 1),
                         ("num_workers", 0), ("cache_max_bytes", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(key, f"must be an integer >= {low}")
        if self.resolution > 1024:
            raise bad("resolution", "must be <= 1024")
        for key in ("lr", "weight_decay", "warmup_fraction", "max_rotation_deg", "max_scale", "max_shift",
                    "brightness", "contrast"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise bad(key, "must be a finite number >= 0")
        if self.lr <= 0:
            raise bad("lr", "must be > 0")
        if self.warmup_fraction >= 1 or self.max_scale >= 1 or self.brightness >= 1 or self.contrast >= 1:
            raise ConfigError("grader config: warmup_fraction, max_scale, brightness and contrast must be < 1")
        if self.max_rotation_deg > 180:
            raise bad("max_rotation_deg", "must be <= 180")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise bad("device", "must be 'auto', 'cpu' or 'cuda[:i]'")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def augmentation_description(self) -> str:
        if not self.augment:
            return "none"
        return (f"rotation +-{self.max_rotation_deg:g} deg, scale +-{self.max_scale:.0%}, shift +-{self.max_shift:.0%}, "
                f"brightness +-{self.brightness:.0%}, contrast +-{self.contrast:.0%}; no flips (laterality kept)")


PRESETS: dict[str, GraderConfig] = {
    # Seconds: for tests and a first look at the pipeline.
    "smoke": GraderConfig(arch="densenet_tiny", resolution=16, batch_size=16, steps=30, lr=3e-3),
    # Minutes on 2 CPU cores for ~2000 images at 32 px (the resolution of the GAN's cpu preset).
    "cpu": GraderConfig(arch="densenet_small", resolution=32, batch_size=64, steps=1000, lr=2e-3),
    # Paper-ish: DenseNet121 at 256 px, ~14 epochs of EyePACS' ~28k training images per arm.
    "gpu": GraderConfig(arch="densenet121", resolution=256, batch_size=64, steps=6000, lr=3e-4, weight_decay=1e-4,
                        num_workers=8, amp=True),
}


def grader_config(preset: str = "cpu", **overrides: Any) -> GraderConfig:
    """The preset's config with ``overrides`` applied (unknown preset or key: `ConfigError`)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown grader preset {preset!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(GraderConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown grader config key(s): {', '.join(unknown)}")
    return replace(PRESETS[preset], **overrides)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"grader config device: {name!r} requested but CUDA is not available")
    return dev


# --------------------------------------------------------------------------------------------------
# Images


def resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, R, R] (antialiased bilinear); unchanged when already R x R.

    One function for training, test and `predict_proba`, so a grader sees every image resized alike.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"resize_uint8 expects uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if images.shape[2] == resolution and images.shape[3] == resolution:
        return images
    if images.shape[0] == 0:
        return images.new_zeros((0, 3, resolution, resolution))
    x = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                      antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _hwc_to_chw_u8(img: np.ndarray, what: str) -> torch.Tensor:
    if img.dtype == np.uint16:  # 16-bit PNG: keep the top 8 bits' worth, rounded
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise BadInputError(what, f"expected an RGB image, got {img.dtype} {img.shape}")
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


@dataclass
class _ZipPart:
    """Members ``indices`` of a prepared ZIP (indices into ``ZipImageDataset(path)``)."""

    dataset: ZipImageDataset
    indices: np.ndarray
    labels: np.ndarray
    cache: torch.Tensor | None = None

    synthetic = False

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> torch.Tensor:
        return _hwc_to_chw_u8(self.dataset.read_uint8(int(self.indices[i])), str(self.dataset.path))


@dataclass
class _PngPart:
    """Image files (synthetic PNGs checked by `load_synthetic_folder`)."""

    paths: list[Path]
    labels: np.ndarray
    cache: torch.Tensor | None = None

    synthetic = True

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        return _hwc_to_chw_u8(decode_image(self.paths[i]).pixels, str(self.paths[i]))


class GradedImages(Dataset):
    """DR-graded images from prepared ZIPs and/or PNG files, resized to one resolution.

    Items: uint8 ``[3, R, R]`` RGB (labels are in ``.labels``, np.int64 ``[N]`` in 0..4). Parts are
    shared, not copied, by `concat`: a part loaded into memory once (`load`) stays loaded in every
    dataset that holds it.
    """

    def __init__(self, parts: Sequence[_ZipPart | _PngPart], resolution: int) -> None:
        self.parts = [p for p in parts if len(p) > 0]
        self.resolution = int(resolution)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    @classmethod
    def from_zip(cls, dataset: ZipImageDataset, indices: np.ndarray, resolution: int) -> GradedImages:
        idx = np.asarray(indices, dtype=np.int64)
        return cls([_ZipPart(dataset, idx, dataset.labels[idx].astype(np.int64))], resolution)

    @classmethod
    def from_files(cls, paths: Sequence[Path], labels: np.ndarray, resolution: int) -> GradedImages:
        return cls([_PngPart(list(paths), np.asarray(labels, dtype=np.int64))], resolution)

    def concat(self, other: GradedImages) -> GradedImages:
        if other.resolution != self.resolution:
            raise ValueError("cannot concatenate images of different resolutions")
        return GradedImages(self.parts + other.parts, self.resolution)

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([p.labels for p in self.parts]) if self.parts else np.zeros(0, np.int64)

    @property
    def synthetic(self) -> np.ndarray:
        """bool [N]: True for images from synthetic (PNG) parts."""
        return np.concatenate([np.full(len(p), p.synthetic) for p in self.parts]) if self.parts else np.zeros(0, bool)

    @property
    def nbytes(self) -> int:
        return len(self) * 3 * self.resolution * self.resolution

    @property
    def loaded(self) -> bool:
        return all(p.cache is not None for p in self.parts)

    def _locate(self, i: int) -> tuple[_ZipPart | _PngPart, int]:
        k = bisect.bisect_right(self._starts, i) - 1
        return self.parts[k], i - self._starts[k]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        part, j = self._locate(i)
        if part.cache is not None:
            return part.cache[j]
        return resize_uint8(part.read(j)[None], self.resolution)[0]

    def load(self, *, progress: bool = True, description: str = "load images") -> None:
        """Decode every image of the parts not yet in memory: uint8, N x 3 x R x R bytes."""
        todo = [p for p in self.parts if p.cache is None]
        with progress_bar(sum(len(p) for p in todo), description, enabled=progress and bool(todo)) as bar:
            for part in todo:
                out = torch.empty((len(part), 3, self.resolution, self.resolution), dtype=torch.uint8)
                for j in range(len(part)):
                    out[j] = resize_uint8(part.read(j)[None], self.resolution)[0]
                    bar.advance()
                part.cache = out

    def batch(self, indices: np.ndarray | Sequence[int]) -> torch.Tensor:
        """uint8 [B, 3, R, R] for dataset indices (fast when loaded)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.loaded:
            out = torch.empty((len(indices), 3, self.resolution, self.resolution), dtype=torch.uint8)
            k = np.searchsorted(np.asarray(self._starts), indices, side="right") - 1
            for pk, part in enumerate(self.parts):
                sel = np.nonzero(k == pk)[0]
                if sel.size:
                    assert part.cache is not None
                    out[torch.from_numpy(sel)] = part.cache[torch.from_numpy(indices[sel] - self._starts[pk])]
            return out
        return torch.stack([self[int(i)] for i in indices]) if len(indices) else torch.zeros(
            (0, 3, self.resolution, self.resolution), dtype=torch.uint8)


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


def _iter_batches(data: GradedImages, batches: Sequence[np.ndarray], num_workers: int, pin: bool) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, R, R] per index batch, in order; from memory or through DataLoader workers."""
    if data.loaded or num_workers == 0:
        for b in batches:
            yield data.batch(b)
        return
    loader = DataLoader(data, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                        collate_fn=_stack, pin_memory=pin, persistent_workers=False)
    yield from loader


# --------------------------------------------------------------------------------------------------
# Synthetic folder


@dataclass
class SyntheticSet:
    """The usable rows of a synthetic folder's ``manifest.csv``.

    paths / labels: the kept images and their grades (np.int64 [N]); skipped: one
    ``{"line", "file", "reason"}`` per skipped row (line numbers of the CSV, header = 1); unlisted:
    PNG files in the folder that no row names (ignored); checkpoints: the distinct
    ``checkpoint_sha256`` values of kept rows.
    """

    folder: Path
    paths: list[Path]
    labels: np.ndarray
    n_rows: int
    skipped: list[dict[str, Any]] = field(default_factory=list)
    unlisted: int = 0
    checkpoints: list[str] = field(default_factory=list)

    def images(self, resolution: int) -> GradedImages:
        return GradedImages.from_files(self.paths, self.labels, resolution)

    def label_counts(self) -> dict[int, int]:
        return _counts(self.labels)

    def summary(self) -> dict[str, Any]:
        return {
            "folder": self.folder.name,
            "manifest_rows": self.n_rows,
            "kept": len(self.paths),
            "n_skipped": len(self.skipped),
            "skipped": self.skipped,
            "counts": {str(k): v for k, v in self.label_counts().items()},
            "unlisted_pngs": self.unlisted,
            "checkpoint_sha256": self.checkpoints,
        }


_LABEL_COLUMNS = ("level", "grade")
_MAX_MANIFEST_BYTES = 256 << 20


def _parse_grade(text: str) -> int | None:
    t = text.strip()
    try:
        v = int(t)
    except ValueError:
        try:  # "2.0" from a spreadsheet is a grade; "2.5" is not
            f = float(t)
        except ValueError:
            return None
        if not math.isfinite(f) or f != int(f):
            return None
        v = int(f)
    return v


def load_synthetic_folder(folder: str | Path, *, check_images: bool = True, progress: bool = True) -> SyntheticSet:
    """Read ``folder/manifest.csv`` and keep the rows that are usable training data.

    Skipped (listed with the reason, never fatal): a row whose field count differs from the header,
    an empty / absolute / escaping file name, a duplicate file, a missing, non-integer or out-of-range
    grade (``level`` and ``grade`` both present and different, too), ``synthetic`` other than 1 (a
    real image must not slip into the synthetic arm), and, with ``check_images``, a file that is
    missing, unreadable, not RGB-decodable or not square.

    Raises `BadInputError` when the folder or manifest is missing or unreadable, the header lacks
    ``file`` or a grade column, or no row is usable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(folder, "synthetic folder does not exist (make one with `retinagen rebalance`)")
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise BadInputError(manifest, "no manifest.csv in the synthetic folder (it lists file, level, synthetic=1, ...)")
    if manifest.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BadInputError(manifest, f"implausibly large manifest ({manifest.stat().st_size:,} bytes)")
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(manifest, f"cannot be read as UTF-8 text ({type(exc).__name__})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise BadInputError(manifest, "empty manifest (no header row)") from None
    except csv.Error as exc:
        raise BadInputError(manifest, f"malformed CSV header ({exc})") from None
    cols = [h.strip().lower() for h in header]
    if "file" not in cols:
        raise BadInputError(manifest, f"header has no 'file' column (columns: {', '.join(cols) or 'none'})")
    label_cols = [c for c in _LABEL_COLUMNS if c in cols]
    if not label_cols:
        raise BadInputError(manifest, "header has no 'level' or 'grade' column")
    pos = {c: cols.index(c) for c in cols}

    paths: list[Path] = []
    labels: list[int] = []
    sha: list[str] = []
    skipped: list[dict[str, Any]] = []
    seen: set[Path] = set()
    named: set[Path] = set()  # every file a row names (kept or not), for the unlisted-PNG count
    n_rows = 0

    def skip(line: int, name: str, reason: str) -> None:
        skipped.append({"line": line, "file": name, "reason": reason})

    rows: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        # A broken quote swallows the rest of the file: keep what came before, report the rest once.
        skip(reader.line_num, "", f"malformed CSV from here on ({exc}); the remaining lines are ignored")

    with progress_bar(len(rows), "check synthetic images", enabled=progress and check_images) as bar:
        for line, row in rows:
            n_rows += 1
            bar.advance()
            name = row[pos["file"]].strip() if len(row) > pos["file"] else ""
            with contextlib.suppress(BadInputError):
                named.add(resolve_inside(folder, name))
            if len(row) != len(cols):
                skip(line, name, f"malformed row: {len(row)} fields, the header has {len(cols)}")
                continue
            grades = {}
            for c in label_cols:
                raw = row[pos[c]].strip()
                if not raw:
                    grades[c] = ("missing", raw)
                    continue
                g = _parse_grade(raw)
                grades[c] = ("ok", g) if g is not None else ("malformed", raw)
            bad = [(c, st, v) for c, (st, v) in grades.items() if st != "ok"]
            if bad:
                c, st, v = bad[0]
                skip(line, name, f"{st} grade in column '{c}'" + (f": {v!r}" if st == "malformed" else ""))
                continue
            values = {v for _, v in grades.values()}
            if len(values) > 1:
                skip(line, name, "columns 'level' and 'grade' disagree")
                continue
            grade = int(values.pop())
            if not 0 <= grade < NUM_GRADES:
                skip(line, name, f"grade {grade} outside 0-{NUM_GRADES - 1}")
                continue
            if "synthetic" in pos and row[pos["synthetic"]].strip() not in ("1", "1.0", "true", "True", "yes"):
                skip(line, name, f"not marked synthetic=1 (got {row[pos['synthetic']].strip()!r}); real images "
                                 "do not belong in the synthetic arm")
                continue
            try:
                path = resolve_inside(folder, name)
            except BadInputError as exc:
                skip(line, name, exc.reason)
                continue
            if path in seen:
                skip(line, name, "duplicate row for a file already listed")
                continue
            if check_images:
                try:
                    img = decode_image(path).pixels
                except BadInputError as exc:
                    skip(line, name, exc.reason)
                    continue
                except Exception as exc:  # a decoder bug must not abort the job; its message may quote content
                    skip(line, name, f"internal error while reading: {type(exc).__name__}")
                    continue
                if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] != img.shape[1]:
                    skip(line, name, f"image is {img.shape[1]} x {img.shape[0]}, expected a square RGB image")
                    continue
            seen.add(path)
            paths.append(path)
            labels.append(grade)
            if "checkpoint_sha256" in pos and row[pos["checkpoint_sha256"]].strip():
                sha.append(row[pos["checkpoint_sha256"]].strip())

    unlisted = sum(1 for p in folder.glob("*.png") if p.resolve() not in named)
    if not paths:
        first = "; ".join(f"line {s['line']}: {s['reason']}" for s in skipped[:3]) or "no data rows"
        raise BadInputError(manifest, f"no usable synthetic images ({n_rows} rows, all skipped: {first})")
    return SyntheticSet(
        folder=folder,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        n_rows=n_rows,
        skipped=skipped,
        unlisted=unlisted,
        checkpoints=sorted(set(sha)),
    )


# --------------------------------------------------------------------------------------------------
# Patient-level split of the real data


def _counts(labels: np.ndarray) -> dict[int, int]:
    c = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_GRADES)[:NUM_GRADES]
    return {k: int(v) for k, v in enumerate(c)}


def split_by_group(labels: np.ndarray, groups: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """bool [N]: True for test images. Whole groups (patients) go to one side.

    Groups are stratified by their highest label, shuffled within each stratum with ``seed`` and
    ``round(test_fraction * size)`` of each stratum go to test (at least one group overall).
    """
    labels = np.asarray(labels)
    if len(groups) != len(labels):
        raise ValueError("labels and groups must have the same length")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    strata: dict[int, list[str]] = {}
    for g, idx in members.items():
        strata.setdefault(int(labels[idx].max()), []).append(g)
    rng = np.random.default_rng(seed)
    test_groups: list[str] = []
    for top in sorted(strata):
        gs = sorted(strata[top])
        order = rng.permutation(len(gs))
        test_groups += [gs[k] for k in order[: int(round(test_fraction * len(gs)))]]
    if not test_groups and len(members) >= 2:
        largest = max(sorted(strata), key=lambda t: len(strata[t]))
        test_groups.append(sorted(strata[largest])[int(rng.integers(len(strata[largest])))])
    is_test = np.zeros(len(labels), dtype=bool)
    for g in test_groups:
        is_test[members[g]] = True
    return is_test


@dataclass
class RealSplit:
    """Train / test indices into ``ZipImageDataset(path)`` (all images), and how they were made.

    method: "dataset" (the ZIP's own split: test vs train+val), "patient" or "image" (made here
    with ``seed``). patients_in_both is 0 by construction; dropped_for_leakage counts training images
    removed because their patient is in the test set.
    """

    train: np.ndarray
    test: np.ndarray
    method: str
    seed: int | None
    test_fraction: float | None
    n_unlabelled: int
    dropped_for_leakage: int
    groups: list[str]

    def summary(self, labels: np.ndarray) -> dict[str, Any]:
        g = np.asarray(self.groups, dtype=object)
        train_p = {x for x in g[self.train] if x.startswith("p:")}
        test_p = {x for x in g[self.test] if x.startswith("p:")}
        return {
            "method": self.method,
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "n_train": int(len(self.train)),
            "n_test": int(len(self.test)),
            "train_counts": {str(k): v for k, v in _counts(labels[self.train]).items()},
            "test_counts": {str(k): v for k, v in _counts(labels[self.test]).items()},
            "n_train_patients": len(train_p),
            "n_test_patients": len(test_p),
            "patients_in_both": len(train_p & test_p),
            "dropped_for_leakage": self.dropped_for_leakage,
            "n_unlabelled_excluded": self.n_unlabelled,
        }


def split_real(ds: ZipImageDataset, *, seed: int = 0, test_fraction: float = 0.2) -> RealSplit:
    """Held-out test images of a prepared dataset with no patient on both sides (see the module docstring)."""
    labels = ds.labels
    if labels.size and labels.max() >= NUM_GRADES:
        raise BadInputError(ds.path, f"labels must be DR grades 0-{NUM_GRADES - 1}; found {int(labels.max())}")
    labelled = np.nonzero(labels >= 0)[0]
    if labelled.size == 0:
        raise BadInputError(ds.path, "the dataset has no DR grade labels; a grader cannot be trained or tested")
    patients = ds.meta.get("patients") if isinstance(ds.meta.get("patients"), dict) else {}
    groups = [f"p:{patients[n]}" if n in patients else f"i:{n}" for n in ds.names]
    splits = ds.meta.get("splits") if isinstance(ds.meta.get("splits"), dict) else {}
    in_test = np.array([splits.get(n) == "test" for n in ds.names], dtype=bool)
    if in_test[labelled].any() and (~in_test[labelled]).any():
        method, used_seed, frac = "dataset", None, None
        test_mask = in_test
    else:
        method = "patient" if patients else "image"
        used_seed, frac = seed, test_fraction
        test_mask = np.zeros(len(labels), dtype=bool)
        test_mask[labelled] = split_by_group(labels[labelled], [groups[i] for i in labelled], test_fraction, seed)
    test = labelled[test_mask[labelled]]
    test_groups = {groups[i] for i in test}
    train_all = labelled[~test_mask[labelled]]
    # Whatever made the split, no patient may be on both sides: drop the training images that would leak.
    keep = np.array([groups[i] not in test_groups for i in train_all], dtype=bool)
    train = train_all[keep]
    if test.size == 0 or train.size == 0:
        raise BadInputError(ds.path, f"too few labelled images ({labelled.size}) for a train/test split")
    return RealSplit(train=train, test=test, method=method, seed=used_seed, test_fraction=frac,
                     n_unlabelled=int((labels < 0).sum()), dropped_for_leakage=int((~keep).sum()), groups=groups)


# --------------------------------------------------------------------------------------------------
# The grader


@dataclass
class Grader:
    """A trained DR grader: ``net`` maps float [N, 3, R, R] in [-1, 1] to logits [N, num_classes]."""

    net: nn.Module
    arch: str
    resolution: int
    num_classes: int = NUM_GRADES
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> Grader:
        self.net.to(device)
        return self


def _build_net(arch: str, num_classes: int, seed: int) -> nn.Module:
    # Initialise from the seed without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHITECTURES[arch](num_classes)


def _to_model_range(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float().div_(127.5).sub_(1.0)


def augment_batch(x: torch.Tensor, gen: torch.Generator, config: GraderConfig) -> torch.Tensor:
    """Random rotation / scale / shift and brightness / contrast: float [N, 3, R, R] in [-1, 1] -> same.

    Draws come from ``gen`` (a CPU generator) so a seed fixes them on any device. The affine maps
    have determinant s^2 > 0: no mirroring, so an eye's side (laterality) is never changed. Pixels
    moved in from outside the frame are black, like a fundus photograph's surround.
    """
    n = x.shape[0]
    if n == 0:
        return x
    u = torch.rand((n, 6), generator=gen).mul_(2).sub_(1)  # U(-1, 1)
    angle = u[:, 0] * math.radians(config.max_rotation_deg)
    scale = 1 + u[:, 1] * config.max_scale
    shift = u[:, 2:4] * (2 * config.max_shift)  # affine_grid coordinates span 2 per image width
    bright = 1 + u[:, 4] * config.brightness
    contrast = 1 + u[:, 5] * config.contrast
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(device=x.device, dtype=x.dtype)
    x01 = (x + 1) * 0.5
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x01 = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = x01.mean(dim=(1, 2, 3), keepdim=True)
    c = contrast.to(x.device, x.dtype).view(n, 1, 1, 1)
    b = bright.to(x.device, x.dtype).view(n, 1, 1, 1)
    x01 = ((x01 - mean) * c + mean) * b
    return x01.clamp_(0, 1).mul_(2).sub_(1)


def _class_weights(labels: np.ndarray) -> torch.Tensor:
    counts = np.bincount(labels, minlength=NUM_GRADES)[:NUM_GRADES].astype(np.float64)
    present = counts > 0
    w = np.zeros(NUM_GRADES)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def _batch_plan(n: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """``steps`` index batches of exactly ``batch_size``: concatenated seeded permutations of 0..n-1."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6772]))
    need = steps * batch_size
    stream = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    return list(stream.reshape(steps, batch_size))


def train_grader(
    data: GradedImages,
    config: GraderConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    description: str = "train grader",
) -> Grader:
    """Train a grader on ``data`` for ``config.steps`` steps; returns it in eval mode on its device.

    Deterministic in ``seed`` on a given device and thread count: initial weights, batch order and
    augmentation each come from it. ``grader.meta["training"]`` records counts, seconds (wall and
    CPU), the final loss (mean of the last 10 % of steps) and the thread count.
    """
    if len(data) == 0:
        raise RetinagenError("no training images")
    if data.resolution != config.resolution:
        raise ValueError(f"data resolution {data.resolution} != config resolution {config.resolution}")
    labels = data.labels
    if labels.min() < 0 or labels.max() >= NUM_GRADES:
        raise RetinagenError(f"training labels must be grades 0-{NUM_GRADES - 1}")
    device = _resolve_device(config.device)
    if not data.loaded and data.nbytes <= config.cache_max_bytes:
        data.load(progress=progress, description=f"{description}: load images")
    net = _build_net(config.arch, NUM_GRADES, seed).to(device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_fraction * config.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, config.steps, warmup))
    weight = _class_weights(labels).to(device) if config.loss == "weighted_ce" else None
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0x61756]).generate_state(1)[0]))
    plan = _batch_plan(len(data), config.steps, config.batch_size, seed)
    labels_t = torch.from_numpy(labels)
    use_amp = config.amp and device.type == "cuda"
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    with progress_bar(config.steps, description, unit="step", enabled=progress) as bar:
        batches = _iter_batches(data, plan, config.num_workers, device.type == "cuda")
        for idx, xb in zip(plan, batches, strict=True):
            x = _to_model_range(xb.to(device, non_blocking=True))
            y = labels_t[torch.from_numpy(idx)].to(device)
            if config.augment:
                x = augment_batch(x, gen, config)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.advance()
    net.eval()
    tail = losses[-max(1, len(losses) // 10):]
    synth = data.synthetic
    return Grader(
        net=net,
        arch=config.arch,
        resolution=config.resolution,
        num_classes=NUM_GRADES,
        meta={
            "config": config.to_json(),
            "training": {
                "seed": seed,
                "n_images": len(data),
                "n_real": int((~synth).sum()),
                "n_synthetic": int(synth.sum()),
                "counts": {str(k): v for k, v in _counts(labels).items()},
                "steps": config.steps,
                "batch_size": config.batch_size,
                "epochs": config.steps * config.batch_size / len(data),
                "loss": config.loss,
                "final_loss": float(np.mean(tail)),
                "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
            },
        },
    )


def _as_nchw_u8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"images must be uint8 [N, 3, H, W] (or [N, H, W, 3]), got {t.dtype} {tuple(t.shape)}")
    if t.shape[1] != 3 and t.shape[3] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"images must have 3 RGB channels, got shape {tuple(t.shape)}")
    if t.shape[2] != t.shape[3]:
        raise ValueError(f"images must be square, got {t.shape[3]} x {t.shape[2]}")
    # Contiguous NCHW whatever the input layout: the same memory layout gives bit-identical outputs.
    return t.contiguous()


@torch.no_grad()
def _logits_to_proba(grader: Grader, x_u8: torch.Tensor) -> torch.Tensor:
    x = _to_model_range(resize_uint8(x_u8, grader.resolution).to(grader.device))
    return torch.softmax(grader.net(x).float(), dim=1).cpu()


@torch.no_grad()
def predict_proba(grader: Grader, images: np.ndarray | torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
    """Grade probabilities float32 [N, 5] (rows sum to 1) for RGB uint8 images.

    ``images``: uint8 [N, 3, H, W] (numpy or torch; [N, H, W, 3] as `generate_images` returns is
    accepted too), square, any side (resized to the grader's resolution as in training).
    """
    t = _as_nchw_u8(images)
    grader.net.eval()
    out = [_logits_to_proba(grader, t[s : s + batch_size]) for s in range(0, t.shape[0], batch_size)]
    return (torch.cat(out) if out else torch.zeros((0, grader.num_classes))).numpy().astype(np.float32)


def _predict_dataset(grader: Grader, data: GradedImages, config: GraderConfig, progress: bool, desc: str) -> np.ndarray:
    n = len(data)
    batches = [np.arange(s, min(n, s + config.eval_batch_size)) for s in range(0, n, config.eval_batch_size)]
    grader.net.eval()
    out = []
    with progress_bar(n, desc, enabled=progress) as bar:
        for xb in _iter_batches(data, batches, config.num_workers, grader.device.type == "cuda"):
            out.append(_logits_to_proba(grader, xb))
            bar.advance(len(xb))
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, NUM_GRADES), np.float32)


# --------------------------------------------------------------------------------------------------
# Save / load (data only)


def save_grader(grader: Grader, path: str | Path) -> Path:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` (atomic, data only); returns the .safetensors path."""
    stem = Path(path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    tensors = {f"net.{k}": v for k, v in grader.net.state_dict().items()}
    meta = {
        "format": GRADER_FORMAT,
        "grader_version": GRADER_VERSION,
        "arch": grader.arch,
        "resolution": grader.resolution,
        "num_classes": grader.num_classes,
        "input": "RGB uint8 [N, 3, R, R] scaled to [-1, 1]; other sides resized by antialiased bilinear",
        **{k: v for k, v in grader.meta.items() if k not in ("format", "grader_version", "arch", "resolution",
                                                             "num_classes")},
    }
    json_path = save_checkpoint(stem, tensors, meta)
    return json_path.with_suffix(".safetensors")


def load_grader(path: str | Path, device: str | torch.device = "cpu") -> Grader:
    """Load a grader written by `save_grader` (``.safetensors`` or ``.json`` path).

    Raises `CheckpointError` for a missing file, a pickle / non-safetensors file, a sidecar that is
    missing or does not match the tensors' sha256, a checkpoint of another kind (e.g. a generator),
    an unknown architecture, or weights that do not fit the recorded architecture.
    """
    path = Path(path)
    ck = load_checkpoint(path)
    meta = ck.meta
    if meta.get("format") != GRADER_FORMAT:
        raise CheckpointError(f"{path}: not a DR grader checkpoint (format {meta.get('format')!r}, expected "
                              f"{GRADER_FORMAT!r}); graders are written by `retinagen downstream`")
    if meta.get("grader_version") != GRADER_VERSION:
        raise CheckpointError(f"{path}: grader version {meta.get('grader_version')!r} is not supported "
                              f"(this retinagen reads {GRADER_VERSION})")
    arch, res, k = meta.get("arch"), meta.get("resolution"), meta.get("num_classes")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown grader architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    if isinstance(res, bool) or not isinstance(res, int) or res < MIN_RESOLUTION:
        raise CheckpointError(f"{path}: invalid resolution {res!r} in its metadata")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise CheckpointError(f"{path}: invalid num_classes {k!r} in its metadata")
    net = ARCHITECTURES[arch](k)
    try:
        net.load_state_dict(ck.module_state("net"), strict=True)
    except (RuntimeError, CheckpointError) as exc:
        reason = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match architecture {arch!r} ({reason})") from None
    net.to(device).eval().requires_grad_(False)
    return Grader(net=net, arch=arch, resolution=res, num_classes=k, meta=dict(meta))


# --------------------------------------------------------------------------------------------------
# Metrics (pure functions on arrays)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_GRADES) -> np.ndarray:
    """int64 [K, K], rows = true grade, columns = predicted grade."""
    t, p = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred must have the same shape")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"grades must be in 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _qwk_weights(k: int) -> np.ndarray:
    i = np.arange(k)
    return (i[:, None] - i[None, :]).astype(np.float64) ** 2


def kappa_from_confusion(cm: np.ndarray) -> np.ndarray | float:
    """Quadratic weighted kappa of confusion matrices ``[..., K, K]``; nan where undefined.

    kappa = 1 - sum(W O) / sum(W E), W_ij = (i - j)^2, E = outer(row sums, column sums) / n: the
    formula of `sklearn.metrics.cohen_kappa_score(weights="quadratic")`, vectorised for the bootstrap.
    Undefined (0 / 0) when every true and predicted grade is one and the same grade.
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[-1]
    w = _qwk_weights(k)
    n = cm.sum(axis=(-1, -2))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = cm.sum(-1)[..., :, None] * cm.sum(-2)[..., None, :] / n[..., None, None]
        num = (w * cm).sum(axis=(-1, -2))
        den = (w * expected).sum(axis=(-1, -2))
        out = np.where(den > 0, 1 - num / np.where(den > 0, den, 1), np.nan)
    return float(out) if out.ndim == 0 else out


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_GRADES) -> float | None:
    """Quadratic weighted kappa (sklearn ``cohen_kappa_score``); None when undefined (see `kappa_from_confusion`)."""
    from sklearn.metrics import cohen_kappa_score

    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.size == 0 or np.isnan(kappa_from_confusion(confusion_matrix(t, p, num_classes))):
        return None
    return float(cohen_kappa_score(t, p, labels=list(range(num_classes)), weights="quadratic"))


def per_grade_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_GRADES) -> list[float | None]:
    """Recall (sensitivity) of each grade; None for a grade absent from ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(1)
    return [float(cm[k, k] / support[k]) if support[k] else None for k in range(num_classes)]


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_GRADES) -> float | None:
    """Mean recall over the grades present in ``y_true`` (sklearn's definition); None when empty."""
    rec = [r for r in per_grade_recall(y_true, y_pred, num_classes) if r is not None]
    return float(np.mean(rec)) if rec else None


def referable_scores(proba: np.ndarray) -> np.ndarray:
    """P(grade >= 2) = sum of the probabilities of grades 2-4: float [N]."""
    return np.asarray(proba, dtype=np.float64)[:, REFERABLE_GRADE:].sum(1)


def referable_auroc(y_true: np.ndarray, proba: np.ndarray) -> tuple[float | None, str | None]:
    """(AUROC of P(grade >= 2) for referable DR, None) or (None, reason) when only one class is present."""
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(y_true) >= REFERABLE_GRADE
    if pos.all() or not pos.any():
        which = "referable (grade >= 2)" if pos.any() else "non-referable (grade < 2)"
        return None, f"undefined: the test set holds only {which} images"
    return float(roc_auc_score(pos, referable_scores(proba))), None


def bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """int64 [B, n]: ``n_bootstrap`` resamples of 0..n-1 with replacement, from ``seed``."""
    if n < 1 or n_bootstrap < 1:
        raise ValueError("bootstrap needs n >= 1 and n_bootstrap >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB007]))
    return rng.integers(0, n, size=(n_bootstrap, n), dtype=np.int64)


def bootstrap_samples(statistic: Callable[[np.ndarray], float | None], indices: np.ndarray) -> np.ndarray:
    """float64 [B]: ``statistic(idx)`` for each resample row; nan where it returns None / nan."""
    out = np.full(len(indices), np.nan)
    for b, idx in enumerate(indices):
        v = statistic(idx)
        if v is not None:
            out[b] = v
    return out


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None, int]:
    """(low, high, n_valid): the percentile interval of the finite samples; (None, None, 0) if none."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None, None, 0
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(s, [a, 100 - a])
    return float(lo), float(hi), int(s.size)


def _metric_samples(y_true: np.ndarray, proba: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric on every resample (nan where undefined): arrays [B]."""
    from sklearn.metrics import roc_auc_score

    k = NUM_GRADES
    y_pred = proba.argmax(1)
    t, p = y_true[indices], y_pred[indices]  # [B, n]
    b = len(indices)
    flat = (np.arange(b)[:, None] * k * k + t * k + p).ravel()
    cm = np.bincount(flat, minlength=b * k * k).reshape(b, k, k)
    support = cm.sum(2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diagonal(cm, axis1=1, axis2=2) / np.maximum(support, 1), np.nan)
    present = np.isfinite(recall)
    n_present = present.sum(1)
    bacc = np.where(n_present > 0, np.where(present, recall, 0).sum(1) / np.maximum(n_present, 1), np.nan)
    out = {"qwk": kappa_from_confusion(cm), "balanced_accuracy": bacc}
    for g in range(k):
        out[f"recall_{g}"] = recall[:, g]
    pos = y_true >= REFERABLE_GRADE
    score = referable_scores(proba)

    def auc(idx: np.ndarray) -> float | None:
        yy = pos[idx]
        return float(roc_auc_score(yy, score[idx])) if yy.any() and not yy.all() else None

    out["auroc_referable"] = bootstrap_samples(auc, indices)
    return out


def _entry(value: float | None, samples: np.ndarray, level: float, reason: str | None = None) -> dict[str, Any]:
    lo, hi, nv = percentile_interval(samples, level)
    e: dict[str, Any] = {"value": value, "low": lo if value is not None else None,
                         "high": hi if value is not None else None, "n_valid_resamples": nv if value is not None else 0}
    if value is None:
        e["reason"] = reason or "undefined on the test set"
    return e


def evaluate_predictions(
    y_true: np.ndarray, proba: np.ndarray, *, indices: np.ndarray, level: float = 0.95
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Point metrics with percentile-bootstrap intervals over the resamples ``indices`` [B, n].

    Returns ``(metrics, samples)``: metrics ``{"qwk", "balanced_accuracy", "auroc_referable": {value,
    low, high, n_valid_resamples[, reason]}, "recall": {"0".."4": ...}, "confusion_matrix": [[...]]}``
    (value None with a reason where undefined: a grade absent from the test set has no recall, AUROC
    needs both referable and non-referable images); samples: the per-resample arrays (for paired
    differences between arms evaluated on the same ``indices``).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape != (len(y_true), NUM_GRADES):
        raise ValueError(f"proba must be [N, {NUM_GRADES}] for N = {len(y_true)} labels, got {proba.shape}")
    y_pred = proba.argmax(1)
    samples = _metric_samples(y_true, proba, indices)
    qwk = quadratic_weighted_kappa(y_true, y_pred)
    bacc = balanced_accuracy(y_true, y_pred)
    auc, auc_reason = referable_auroc(y_true, proba)
    recall = per_grade_recall(y_true, y_pred)
    metrics = {
        "qwk": _entry(qwk, samples["qwk"], level, "undefined: one grade only in both truth and prediction"),
        "balanced_accuracy": _entry(bacc, samples["balanced_accuracy"], level),
        "auroc_referable": _entry(auc, samples["auroc_referable"], level, auc_reason),
        "recall": {str(g): _entry(r, samples[f"recall_{g}"], level, f"grade {g} is absent from the test set")
                   for g, r in enumerate(recall)},
        "confusion_matrix": confusion_matrix(y_true, y_pred).tolist(),
    }
    return metrics, samples


def _delta(a: np.ndarray, b: np.ndarray, va: float | None, vb: float | None, level: float) -> dict[str, Any]:
    value = None if va is None or vb is None else va - vb
    return _entry(value, a - b, level, "undefined for one of the two arms")


# --------------------------------------------------------------------------------------------------
# Report


def confusion_png(cm: Sequence[Sequence[int]], title: str) -> bytes:
    """A confusion-matrix plot (colour: row-normalised recall; text: counts) as PNG bytes."""
    from matplotlib.figure import Figure

    m = np.asarray(cm, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig = Figure(figsize=(4.2, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    k = m.shape[0]
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=9,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true grade")
    return figure_png(fig)


def _fmt(e: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    v = f.format(e["value"])
    if e.get("low") is None:
        return v
    return f"{v} [{f.format(e['low'])}, {f.format(e['high'])}]"


def render_markdown(report: Mapping[str, Any]) -> str:
    """REPORT.md: inputs, the three arms with 95 % intervals, per-grade recall, differences, plots."""
    sp, sy, gr, bs = report["split"], report["synthetic"], report["grader"], report["bootstrap"]
    arms = report["arms"]
    lines = [
        "# Downstream DR grading: real vs real + synthetic vs synthetic",
        "",
        f"Real data `{report['real']['file']}`: {sp['n_train']} training and {sp['n_test']} held-out test images "
        f"(split: {sp['method']}; {sp['n_test_patients']} test patients, {sp['patients_in_both']} on both sides, "
        f"{sp['dropped_for_leakage']} training images dropped for leakage). Test grades: "
        + ", ".join(f"{k}: {v}" for k, v in sp["test_counts"].items()) + ".",
        "",
        f"Synthetic data `{sy['folder']}`: {sy['kept']} images kept of {sy['manifest_rows']} manifest rows "
        f"({sy['n_skipped']} skipped). Grades: " + ", ".join(f"{k}: {v}" for k, v in sy["counts"].items()) + ".",
        "",
        f"Grader: {gr['network']} at {gr['config']['resolution']} px; every arm {gr['config']['steps']} steps x batch "
        f"{gr['config']['batch_size']}, AdamW lr {gr['config']['lr']:g}, {gr['loss']}; augmentation: {gr['augmentation']}; "
        f"seed {gr['seed']}; device {gr['device']}.",
        "",
        f"Intervals: {bs['level']:.0%} percentile bootstrap over the {sp['n_test']} test images, {bs['n']} resamples "
        f"(seed {bs['seed']}), the same resamples for every arm.",
        "",
        "| Arm | Train images (real + synthetic) | Epochs | QWK | Balanced accuracy | AUROC referable (grade >= 2) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm, a in arms.items():
        m = a["metrics"]
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | {a['n_train_real']} + {a['n_train_synthetic']} | {a['epochs']:.1f} "
                     f"| {_fmt(m['qwk'])} | {_fmt(m['balanced_accuracy'])} | {_fmt(m['auroc_referable'])} |")
    lines += ["", "Recall per grade (n/a: the grade is absent from the test set):", "",
              "| Arm | " + " | ".join(f"grade {g} (n={sp['test_counts'][str(g)]})" for g in range(NUM_GRADES)) + " |",
              "| --- |" + " --- |" * NUM_GRADES]
    for arm, a in arms.items():
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | "
                     + " | ".join(_fmt(a["metrics"]["recall"][str(g)], 2) for g in range(NUM_GRADES)) + " |")
    deltas = {arm: a["delta_vs_real_only"] for arm, a in arms.items() if a.get("delta_vs_real_only")}
    if deltas:
        lines += ["", "Difference from real only (paired bootstrap; an interval excluding 0 is a clear difference):", "",
                  "| Arm | QWK | Balanced accuracy | AUROC referable |", "| --- | --- | --- | --- |"]
        for arm, d in deltas.items():
            lines.append(f"| {ARM_TITLES.get(arm, arm)} | {_fmt(d['qwk'], signed=True)} | "
                         f"{_fmt(d['balanced_accuracy'], signed=True)} | {_fmt(d['auroc_referable'], signed=True)} |")
    undefined = [f"{ARM_TITLES.get(arm, arm)} {name}: {a['metrics'][name]['reason']}"
                 for arm, a in arms.items() for name in ("qwk", "balanced_accuracy", "auroc_referable")
                 if a["metrics"][name]["value"] is None]
    if undefined:
        lines += ["", "Undefined metrics:", ""] + [f"- {u}" for u in undefined]
    lines += ["", "Confusion matrices (rows: true grade, columns: predicted; colour: fraction of the row):", ""]
    lines += [f"![{ARM_TITLES.get(arm, arm)}]({a['confusion_png']})" for arm, a in arms.items()]
    if sy["skipped"]:
        lines += ["", f"Skipped synthetic rows ({sy['n_skipped']}; first 20):", ""]
        lines += [f"- line {s['line']} `{s['file']}`: {s['reason']}" for s in sy["skipped"][:20]]
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", f"retinagen {report['retinagen_version']}, {report['created']}, {report['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per arm for a terminal: QWK, balanced accuracy and AUROC with intervals."""
    return [f"{ARM_TITLES.get(arm, arm):17s} QWK {_fmt(a['metrics']['qwk'])}  bal.acc {_fmt(a['metrics']['balanced_accuracy'])}"
            f"  AUROC(>=2) {_fmt(a['metrics']['auroc_referable'])}" for arm, a in report["arms"].items()]


def run_downstream(
    real_zip: str | Path,
    synthetic_dir: str | Path,
    out_dir: str | Path,
    *,
    preset: str = "cpu",
    seed: int = 0,
    n_bootstrap: int = 1000,
    config: GraderConfig | None = None,
    test_fraction: float = 0.2,
    device: str | None = None,
    report_name: str = "REPORT.json",
    save_graders: bool = True,
    level: float = 0.95,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the three arms, evaluate them on the real test set, write the report; returns it (as in REPORT.json).

    Args:
        real_zip: prepared dataset with DR grades (``retinagen prepare``).
        synthetic_dir: folder with PNGs + ``manifest.csv`` (``retinagen rebalance`` / ``generate``).
        out_dir: where ``report_name`` (REPORT.json), its ``.md``, ``<stem>_files/confusion-<arm>.png``
            and ``graders/<arm>.safetensors`` (+ .json) go.
        preset: `PRESETS` key (ignored when ``config`` is given); device overrides its device.
        seed: grader initialisation, batch order and augmentation (the same for every arm), the
            patient split when the ZIP has none, and the bootstrap resamples.
        n_bootstrap: resamples of the test set for the intervals.
        test_fraction: test share of patients when the split is made here.
    """
    t_start = time.perf_counter()
    if n_bootstrap < 1:
        raise ConfigError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    cfg = config if config is not None else grader_config(preset)
    if device is not None:
        cfg = replace(cfg, device=device)
    out_dir = Path(out_dir)
    json_path = out_dir / report_name
    files = out_dir / f"{json_path.stem}_files"

    real = ZipImageDataset(real_zip)
    split = split_real(real, seed=seed, test_fraction=test_fraction)
    synth = load_synthetic_folder(synthetic_dir, progress=progress)

    res = cfg.resolution
    train_real = GradedImages.from_zip(real, split.train, res)
    test = GradedImages.from_zip(real, split.test, res)
    synth_imgs = synth.images(res)
    for part, what in ((train_real, "real train"), (synth_imgs, "synthetic"), (test, "real test")):
        if part.nbytes <= cfg.cache_max_bytes:
            part.load(progress=progress, description=f"load {what} images")
    arm_data = {
        "real_only": train_real,
        "real_plus_synthetic": train_real.concat(synth_imgs),
        "synthetic_only": synth_imgs,
    }
    y_test = test.labels
    indices = bootstrap_indices(len(y_test), n_bootstrap, seed)

    arms: dict[str, Any] = {}
    samples: dict[str, dict[str, np.ndarray]] = {}
    dev_name = ""
    for arm in ARMS:
        data = arm_data[arm]
        grader = train_grader(data, cfg, seed=seed, progress=progress, description=f"train {arm}")
        dev_name = str(grader.device)
        proba = _predict_dataset(grader, test, cfg, progress, f"test {arm}")
        metrics, samples[arm] = evaluate_predictions(y_test, proba, indices=indices, level=level)
        png_name = f"confusion-{arm}.png"
        title = f"{ARM_TITLES[arm]}: QWK {_fmt(metrics['qwk'])}"
        atomic_write_bytes(files / png_name, confusion_png(metrics["confusion_matrix"], title))
        tr = grader.meta["training"]
        entry: dict[str, Any] = {
            "n_train": tr["n_images"],
            "n_train_real": tr["n_real"],
            "n_train_synthetic": tr["n_synthetic"],
            "train_counts": tr["counts"],
            "epochs": tr["epochs"],
            "train_seconds": tr["seconds"],
            "train_cpu_seconds": tr["cpu_seconds"],
            "final_loss": tr["final_loss"],
            "metrics": metrics,
            "confusion_png": f"{files.name}/{png_name}",
        }
        if save_graders:
            grader.meta["trained_on"] = {"arm": arm, "real": Path(real_zip).name, "real_fingerprint": real.fingerprint(),
                                         "synthetic": synth.folder.name}
            saved = save_grader(grader, out_dir / "graders" / arm)
            entry["grader_file"] = str(saved.relative_to(out_dir))
        arms[arm] = entry
        del grader

    for arm in ARMS[1:]:
        a, r = arms[arm]["metrics"], arms["real_only"]["metrics"]
        arms[arm]["delta_vs_real_only"] = {
            name: _delta(samples[arm][name], samples["real_only"][name], a[name]["value"], r[name]["value"], level)
            for name in ("qwk", "balanced_accuracy", "auroc_referable")
        }

    notes = [
        "Synthetic images must come from a generator trained on the real training split only "
        "(`retinagen train` uses the ZIP's train split by default); a generator that saw test images would leak them.",
        "Every arm starts from the same initial weights and trains for the same number of steps and batch size, "
        "so the arms differ only in their training images.",
    ]
    if split.dropped_for_leakage:
        notes.append(f"{split.dropped_for_leakage} training images were dropped: their patient is in the test set.")
    if synth.unlisted:
        notes.append(f"{synth.unlisted} PNG files in the synthetic folder are not in manifest.csv and were ignored.")
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "retinagen_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "real": {"file": Path(real_zip).name, "fingerprint": real.fingerprint(), "resolution": real.resolution,
                 "n_images": len(real)},
        "split": split.summary(real.labels),
        "synthetic": synth.summary(),
        "grader": {
            "preset": None if config is not None else preset,
            "network": ARCH_DESCRIPTIONS[cfg.arch],
            "config": cfg.to_json(),
            "loss": LOSS_DESCRIPTIONS[cfg.loss],
            "augmentation": cfg.augmentation_description(),
            "optimizer": "AdamW, linear warm-up then cosine decay to 0",
            "seed": seed,
            "device": dev_name,
            "torch_threads": torch.get_num_threads(),
        },
        "bootstrap": {"n": n_bootstrap, "seed": seed, "level": level,
                      "method": "percentile; test images resampled with replacement; the same resamples for every arm"},
        "arms": arms,
        "notes": notes,
        "total_seconds": time.perf_counter() - t_start,
    }
    report = jsonable(report)
    atomic_write_json(json_path, report)
    atomic_write_text(json_path.with_suffix(".md"), render_markdown(report))
    return report
