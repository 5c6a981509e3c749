"""Progressive growing (Karras et al. 2018, "Progressive Growing of GANs"), as a resolution curriculum.

With ``model.grow_from`` = r0 the networks are built at their full resolution R but train first at r0:
the skip generator runs its blocks up to r0 and upsamples that image to R; the residual discriminator
average-pools what it sees to r0 and enters its trunk there through a fromRGB layer of its own. Each next
resolution then fades in over ``fade_kimg`` (G adds alpha * its toRGB output, D blends its new block with
the pooled path, and the images D sees are blended from their r/2 version as in PGGAN) and trains alone
for ``stable_kimg``, until R; from then on both are the plain networks. Early kimg at low resolution
cost a fraction of a full-resolution step, which is the point on a CPU budget.

`grow_stage` is a pure function of the images shown, so a resumed run picks up the same stage; the
stage is also kept in the networks' state (`GrowStage`) so a checkpoint written mid-curriculum samples
what it trained on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def grow_resolutions(grow_from: int, resolution: int) -> list[int]:
    """The stage resolutions r0, 2 r0, ..., R."""
    if grow_from < 4 or grow_from >= resolution or 2 ** round(math.log2(grow_from)) != grow_from:
        raise ValueError(f"grow_from must be a power of two in [4, {resolution}), got {grow_from}")
    out = [grow_from]
    while out[-1] < resolution:
        out.append(out[-1] * 2)
    return out


def grow_stage(kimg: float, grow_from: int, resolution: int, stable_kimg: float, fade_kimg: float) -> tuple[int, float]:
    """(resolution, alpha) after ``kimg`` thousand images: r0 for stable_kimg, then per resolution a fade
    of fade_kimg (alpha 0 -> 1) and stable_kimg at alpha 1; R (alpha 1) from the end of its fade on."""
    if stable_kimg < 0 or fade_kimg < 0:
        raise ValueError("stable_kimg and fade_kimg must be >= 0")
    stages = grow_resolutions(grow_from, resolution)
    t = kimg - stable_kimg
    if t < 0:
        return stages[0], 1.0
    for res in stages[1:]:
        if t < fade_kimg:
            return res, t / fade_kimg
        t -= fade_kimg + stable_kimg
        if t < 0 or res == resolution:
            return res, 1.0
    return resolution, 1.0


class GrowStage(nn.Module):
    """The networks' current stage: resolution ``res`` (a Python int, fixed per stage, so a compiled
    network specialises on it) and the fade ``alpha`` (a 0-d buffer, read only as a tensor, so a changing
    alpha neither recompiles nor waits for the device). Both are saved in the state dict."""

    def __init__(self, grow_from: int, resolution: int) -> None:
        super().__init__()
        self.stages = grow_resolutions(grow_from, resolution)
        self.resolution = resolution
        self.res = grow_from
        self.fading = False
        self.register_buffer("stage_res", torch.tensor(grow_from, dtype=torch.int64))
        self.register_buffer("alpha", torch.tensor(1.0))

    def set(self, res: int, alpha: float) -> None:
        if res not in self.stages or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"stage ({res}, {alpha}) is not one of {self.stages} with alpha in [0, 1]")
        self.res = int(res)
        self.fading = alpha < 1.0
        self.stage_res.fill_(res)
        self.alpha.fill_(alpha)

    @property
    def full(self) -> bool:
        """True once the networks are the plain full-resolution ones."""
        return self.res == self.resolution and not self.fading

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.set(int(self.stage_res), float(self.alpha))


def set_grow_stage(module: nn.Module, res: int, alpha: float) -> None:
    """Set every `GrowStage` inside ``module`` (G, D, G_ema) to (res, alpha)."""
    for m in module.modules():
        if isinstance(m, GrowStage):
            m.set(res, alpha)
