"""Adaptive discriminator augmentation (Karras et al. 2020, "Training GANs with limited data").

Everything D sees (real and fake images, and the reals of the R1 penalty) passes through `AugmentPipe`: each
transform of ``augment.transforms`` is applied to each image with probability ``p``. Under ``augment.mode``
``ada`` the strength ``p`` follows the overfitting heuristic r_t = E[sign(D(real))]: every ``interval`` steps
p moves up when r_t is above ``target`` (D is too sure of the reals) and down when it is below, by
``batch * interval / (speed_kimg * 1000)``, so p can cross [0, 1] in ``speed_kimg`` thousand images. ``fixed``
keeps p at ``augment.p``; ``off`` leaves images untouched. p and the r_t accumulator are part of every
checkpoint, so a resumed run continues with the p it stopped at.

The transforms are differentiable (G's gradient passes through them) and, as in the paper, applied with
p < 1 they do not leak: the augmented distribution still determines the clean one. Geometric ones are one
affine map per image (grid_sample, bilinear), padded with black, the surround of a fundus photograph:

* ``xflip``: mirror left-right (changes which eye the image looks like; off by default for fundus data);
* ``rot90``: a multiple of 90 degrees; ``translate``: up to 12.5 % of the side each way;
* ``scale``: isotropic, lognormal (std 0.2 octaves); ``rotate``: uniform angle; ``aniso``: anisotropic scale;
* ``brightness`` (additive, std 0.2), ``contrast`` (x 2^N(0, 0.5) about the image mean), ``saturation``
  (x 2^N(0, 1) about the luma).

Randomness comes from the trainer's generator; every process draws the whole global batch's parameters and
keeps its own rows, so N processes augment as one process would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

GEOMETRIC = ("xflip", "rot90", "translate", "scale", "rotate", "aniso")
COLOUR = ("brightness", "contrast", "saturation")
TRANSFORMS = GEOMETRIC + COLOUR
DEFAULT_TRANSFORMS = ("translate", "scale", "rotate", "aniso", "brightness", "contrast", "saturation")
_LUMA = (0.299, 0.587, 0.114)


def _pick(p: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """[n] bool: which images get a transform applied with probability p."""
    return torch.rand(n, generator=gen) < p


class AugmentPipe:
    """The augmentation of D's inputs, with its strength ``p`` and the ADA controller."""

    def __init__(self, transforms: Sequence[str] = DEFAULT_TRANSFORMS, *, p: float = 0.0, mode: str = "ada",
                 target: float = 0.6, speed_kimg: float = 500.0, interval: int = 4) -> None:
        unknown = sorted(set(transforms) - set(TRANSFORMS))
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; choose from {', '.join(TRANSFORMS)}")
        if mode not in ("ada", "fixed"):
            raise ValueError(f"mode must be 'ada' or 'fixed', got {mode!r}")
        self.transforms = tuple(t for t in TRANSFORMS if t in set(transforms))  # a fixed order
        self.mode = mode
        self.p = float(p)
        self.target = float(target)
        self.speed_kimg = float(speed_kimg)
        self.interval = int(interval)
        self._sign_sum = 0.0
        self._sign_count = 0.0
        # Per-step sums of sign(D(real)) not yet added to _sign_sum: kept on the device so that a step
        # does not wait for the GPU; read once per `interval` steps (they are integers: the order of
        # the additions does not change the result).
        self._pending: list[torch.Tensor] = []
        self.last_rt = float("nan")

    # ------------------------------------------------------------------------------ applying
    def __call__(self, x: torch.Tensor, gen: torch.Generator, *, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Augment a batch [n, C, H, W] in [-1, 1]: this process's n rows of a global batch of n * world."""
        if self.p <= 0 or not self.transforms:
            return x
        n = x.shape[0]
        total = n * world
        rows = slice(rank * n, (rank + 1) * n)
        geo = [t for t in self.transforms if t in GEOMETRIC]
        if geo:
            mat = self._geometric(geo, total, gen)[rows].to(x.device, torch.float32)
            grid = F.affine_grid(mat[:, :2, :], list(x.shape), align_corners=False)
            # +1 / -1: grid_sample pads with 0, and black (-1) is a fundus image's surround.
            x = F.grid_sample(x.float() + 1, grid.to(x.dtype if x.dtype != torch.bfloat16 else torch.float32),
                              mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype) - 1
        for name in self.transforms:
            if name in COLOUR:
                x = self._colour(name, x, total, gen, rows)
        return x

    def _geometric(self, names: list[str], n: int, gen: torch.Generator) -> torch.Tensor:
        """[n, 3, 3] output-to-input maps in normalised coordinates, composed in a fixed order."""
        m = torch.eye(3).repeat(n, 1, 1)

        def then(a: torch.Tensor) -> None:
            nonlocal m
            m = m @ a

        def diag(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
            a = torch.eye(3).repeat(n, 1, 1)
            a[:, 0, 0], a[:, 1, 1] = sx, sy
            return a

        def rot(theta: torch.Tensor) -> torch.Tensor:
            a = torch.eye(3).repeat(n, 1, 1)
            c, s = torch.cos(theta), torch.sin(theta)
            a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = c, -s, s, c
            return a

        def shift(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
            a = torch.eye(3).repeat(n, 1, 1)
            a[:, 0, 2], a[:, 1, 2] = tx, ty
            return a

        for name in names:
            on = _pick(self.p, n, gen).float()
            if name == "xflip":  # mirrored with probability p / 2: never leaks, whatever p
                flip = torch.randint(0, 2, (n,), generator=gen).float() * on
                then(diag(1 - 2 * flip, torch.ones(n)))
            elif name == "rot90":
                k = torch.randint(0, 4, (n,), generator=gen).float() * on
                then(rot(k * (math.pi / 2)))
            elif name == "translate":  # up to 1/8 of the side (0.25 in [-1, 1] coordinates) each way
                t = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.25
                then(shift(t[:, 0] * on, t[:, 1] * on))
            elif name == "scale":
                s = torch.exp2(torch.randn(n, generator=gen) * 0.2 * on)
                then(diag(s, s))
            elif name == "rotate":
                theta = (torch.rand(n, generator=gen) * 2 - 1) * math.pi * on
                then(rot(theta))
            elif name == "aniso":
                s = torch.exp2(torch.randn(n, generator=gen) * 0.2 * on)
                then(diag(s, 1 / s))
        return m

    def _colour(self, name: str, x: torch.Tensor, n: int, gen: torch.Generator, rows: slice) -> torch.Tensor:
        on = _pick(self.p, n, gen).float()
        if name == "brightness":
            b = (torch.randn(n, generator=gen) * 0.2 * on)[rows].to(x.device, x.dtype)
            return x + b.view(-1, 1, 1, 1)
        if name == "contrast":
            c = torch.exp2(torch.randn(n, generator=gen) * 0.5 * on)[rows].to(x.device, x.dtype)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            return (x - mean) * c.view(-1, 1, 1, 1) + mean
        # saturation (RGB only; a grey image has none)
        s = torch.exp2(torch.randn(n, generator=gen) * 1.0 * on)[rows].to(x.device, x.dtype)
        if x.shape[1] != 3:
            return x
        w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        luma = (x * w).sum(dim=1, keepdim=True)
        return luma + (x - luma) * s.view(-1, 1, 1, 1)

    # ------------------------------------------------------------------------------ the controller
    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Add D's logits on (augmented) reals to r_t's running sum (``ada`` mode)."""
        if self.mode == "ada":
            self._pending.append(torch.sign(real_logits.detach().float()).sum())
            self._sign_count += float(real_logits.numel())

    def _flush(self) -> None:
        if self._pending:
            self._sign_sum += float(torch.stack(self._pending).double().sum())
            self._pending = []

    def adjust(self, step: int, batch: int, world: int = 1) -> None:
        """Every ``interval`` steps: r_t over them (summed over processes), p moved towards the target."""
        if self.mode != "ada" or step % self.interval:
            return
        self._flush()
        stats = torch.tensor([self._sign_sum, self._sign_count], dtype=torch.float64)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
        self._sign_sum = self._sign_count = 0.0
        if stats[1] <= 0:
            return
        self.last_rt = float(stats[0] / stats[1])
        delta = batch * self.interval / (self.speed_kimg * 1000.0)
        self.p = min(max(self.p + math.copysign(delta, self.last_rt - self.target), 0.0), 1.0)

    # ------------------------------------------------------------------------------ checkpointing
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._flush()
        return {"augment.state": torch.tensor([self.p, self._sign_sum, self._sign_count, self.last_rt],
                                              dtype=torch.float64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = tensors.get("augment.state")
        if state is None:
            return  # a checkpoint written without augmentation: start from the configured p
        self.p, self._sign_sum, self._sign_count, self.last_rt = (float(v) for v in state.tolist())
        self._pending = []
