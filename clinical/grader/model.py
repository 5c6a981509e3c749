"""The DR grader: a MONAI DenseNet sized by a preset (`PRESETS`), its training, prediction and data-only files.

Inputs are RGB uint8 scaled to [-1, 1] and resized with antialiased bilinear interpolation (one function for
training, testing and `predict_proba`). Plain cross-entropy by default, so the real data's class imbalance is
left for the synthetic rebalancing to fix; AdamW, linear warm-up then cosine decay. Augmentation never flips:
a mirrored fundus is an eye of the other side. `save_grader` / `load_grader` go through
`retinagen.training.checkpoint` (atomic, sha256-verified, data only; pickles and mismatched weights refused).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AfterValidator
from torch import nn

from clinical.grader.data import GradedImages, _counts, _iter_batches, resize_uint8
from retinagen.checks import (
    Count,
    CountAtLeast2,
    Kind,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    check,
    check_fields,
    int_in,
    number_in,
    one_of,
)
from retinagen.dr_scale import NUM_GRADES
from retinagen.errors import CheckpointError, ConfigError, RetinagenError
from retinagen.progress import progress_bar
from retinagen.training.checkpoint import load_checkpoint, save_checkpoint
from retinagen.training.schedule import warmup_cosine

GRADER_FORMAT = "retinagen-grader"
GRADER_VERSION = 1
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


def _device_name(name: str) -> str:
    if not (name in ("auto", "cpu") or name.startswith("cuda")):
        raise ValueError("must be 'auto', 'cpu' or 'cuda[:i]'")
    return name


Arch = one_of(ARCHITECTURES, "grader-arch")
Loss = one_of(LOSS_DESCRIPTIONS, "grader-loss")
GraderResolution = int_in(MIN_RESOLUTION, 1024)
BatchSize = int_in(2)
Fraction = number_in(0.0, 1.0, high_open=True)  # [0, 1)
Rotation = number_in(0.0, 180.0)
GraderDevice = Annotated[str, AfterValidator(_device_name), Kind("grader-device", "'auto', 'cpu' or 'cuda[:i]'")]


@dataclass(frozen=True)
class GraderConfig:
    """How a grader is built and trained; every arm of a comparison uses the same one.

    Geometry: ``resolution`` R (images are resized to R x R). Budget: ``steps`` optimizer steps of
    ``batch_size`` images (epochs = steps * batch_size / training images). Augmentation ranges are
    half-widths of uniform draws. ``device``: "auto" (CUDA when available), "cpu" or "cuda[:i]".
    ``amp``: bf16 autocast on CUDA. Training images are held in memory as uint8 when they fit in
    ``cache_max_bytes``, otherwise streamed from disk by ``num_workers`` DataLoader workers.
    Every field is checked against its kind (`retinagen.checks`) when a config is made.
    """

    arch: Arch = "densenet_small"
    resolution: GraderResolution = 32
    batch_size: BatchSize = 64
    steps: Count = 1000
    lr: PositiveFloat = 2e-3
    weight_decay: NonNegativeFloat = 1e-4
    warmup_fraction: Fraction = 0.05
    loss: Loss = "ce"
    augment: bool = True
    max_rotation_deg: Rotation = 15.0
    max_scale: Fraction = 0.1
    max_shift: NonNegativeFloat = 0.05
    brightness: Fraction = 0.2
    contrast: Fraction = 0.2
    eval_batch_size: Count = 256
    num_workers: NonNegativeInt = 0
    device: GraderDevice = "auto"
    amp: bool = False
    cache_max_bytes: NonNegativeInt = 4 << 30

    def __post_init__(self) -> None:
        check_fields(self, "grader config")

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
    check(int_in(MIN_RESOLUTION), res, f"{path}: the resolution in its metadata", CheckpointError)
    check(CountAtLeast2, k, f"{path}: num_classes in its metadata", CheckpointError)
    net = ARCHITECTURES[arch](k)
    try:
        net.load_state_dict(ck.module_state("net"), strict=True)
    except (RuntimeError, CheckpointError) as exc:
        reason = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match architecture {arch!r} ({reason})") from None
    net.to(device).eval().requires_grad_(False)
    return Grader(net=net, arch=arch, resolution=res, num_classes=k, meta=dict(meta))
