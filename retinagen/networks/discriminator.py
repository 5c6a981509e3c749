"""Discriminator D with the auxiliary network Q appended to its trunk (paper, Fig. 2), shared by all MSI variants.

StyleGAN2 residual discriminator: fromRGB at full resolution, one residual block per resolution down to
4x4 (two 3x3 convs, FIR downsampling, a 1x1 skip, sum scaled by sqrt(1/2)), then minibatch stddev, a 3x3
conv and an FC layer giving the features h [N, C4]. From h:

* adversarial head: logit [N] (a logit of D(x) in Eq. 2), plus Miyato & Koyama projection on the DR grade
  when conditioned: logit += <embed(grade), h> / sqrt(C4);
* Q head: a small MLP h -> q_params [N, q_param_dim] (layout in `retinagen.latent`);
* optional auxiliary DR-grade classifier: h -> class logits [N, num_classes].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from retinagen.networks.generator import channels_at, check_grade, check_resolution
from retinagen.networks.grow import GrowStage
from retinagen.networks.layers import Downsample2d, EqualizedConv2d, EqualizedLinear, MinibatchStdDev


class DiscriminatorOutput(NamedTuple):
    """logits [N] (real vs fake, before the sigmoid); q_params [N, P]; class_logits [N, K] or None."""

    logits: torch.Tensor
    q_params: torch.Tensor
    class_logits: torch.Tensor | None


class DiscriminatorBlock(nn.Module):
    """Residual block: [N, in, r, r] -> [N, out, r/2, r/2]."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3, activation=True)
        self.down = Downsample2d()
        self.conv1 = EqualizedConv2d(in_channels, out_channels, 3, activation=True)
        self.skip = EqualizedConv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(self.down(x))
        x = self.conv1(self.down(self.conv0(x)))
        # sqrt(1/2) keeps the variance of the sum of two ~unit-variance branches at ~1.
        return (x + y) * math.sqrt(0.5)


class Discriminator(nn.Module):
    """D + Q (+ optional grade classifier) on images [N, 3, R, R] in [-1, 1].

    Args:
        resolution: input size R, a power of two in [8, 1024].
        q_param_dim: width of Q's output (``LatentSpec.q_param_dim``); 0 = no Q head (beta = 0).
        channel_base, channel_max: width at resolution r is min(channel_base // r, channel_max).
        num_classes: number of DR grades for projection conditioning (0 = unconditional).
        mbstd_group: minibatch-stddev group size (N need not be a multiple; see `MinibatchStdDev`).
        mbstd_channels: number of minibatch-stddev statistics.
        q_hidden: hidden width of the Q MLP (default: the trunk width C4).
        aux_classifier: add a DR-grade classification head (needs num_classes > 0).
        grow_from: train progressively from this resolution (`retinagen.networks.grow`): the input is
            average-pooled to the stage's resolution and enters the trunk there through a fromRGB layer
            of that resolution (``from_rgb_low``); None: off.
    """

    def __init__(
        self,
        resolution: int,
        *,
        q_param_dim: int,
        channel_base: int = 16384,
        channel_max: int = 512,
        num_classes: int = 0,
        mbstd_group: int = 4,
        mbstd_channels: int = 1,
        q_hidden: int | None = None,
        aux_classifier: bool = False,
        grow_from: int | None = None,
    ) -> None:
        super().__init__()
        log2 = check_resolution(resolution)
        if q_param_dim < 0 or num_classes < 0:
            raise ValueError("q_param_dim and num_classes must be >= 0")
        if aux_classifier and num_classes < 2:
            raise ValueError("aux_classifier needs num_classes >= 2")
        self.resolution = resolution
        self.q_param_dim = q_param_dim
        self.num_classes = num_classes

        def ch(r: int) -> int:
            return channels_at(r, channel_base, channel_max)

        self.from_rgb = EqualizedConv2d(3, ch(resolution), 1, activation=True)
        self.block_resolutions = [2**k for k in range(log2, 2, -1)]  # R, R/2, ..., 8
        self.blocks = nn.ModuleList(DiscriminatorBlock(ch(r), ch(r // 2)) for r in self.block_resolutions)
        c4 = ch(4)
        self.feature_dim = c4
        self.mbstd = MinibatchStdDev(mbstd_group, mbstd_channels)
        self.conv4 = EqualizedConv2d(c4 + mbstd_channels, c4, 3, activation=True)
        self.fc = EqualizedLinear(c4 * 16, c4, activation=True)
        self.out = EqualizedLinear(c4, 1)
        self.embed = EqualizedLinear(num_classes, c4, bias=False) if num_classes > 0 else None
        if q_param_dim > 0:
            hidden = q_hidden or c4
            self.q_head: nn.Module | None = nn.Sequential(
                EqualizedLinear(c4, hidden, activation=True), EqualizedLinear(hidden, q_param_dim)
            )
        else:
            self.q_head = None
        self.class_head = EqualizedLinear(c4, num_classes) if aux_classifier else None
        self.grow = GrowStage(grow_from, resolution) if grow_from is not None else None
        self.from_rgb_low = (
            nn.ModuleDict({str(r): EqualizedConv2d(3, ch(r), 1, activation=True) for r in self.grow.stages[:-1]})
            if self.grow is not None else None
        )  # fmt: skip

    def _check_img(self, img: torch.Tensor) -> None:
        r = self.resolution
        if img.ndim != 4 or img.shape[1:] != (3, r, r):
            raise ValueError(f"Discriminator expects img [N, 3, {r}, {r}], got {tuple(img.shape)}")

    def _trunk(self, img: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """img -> (h [N, C4], pooled per-block activations {name: [N, C_i]})."""
        pooled: dict[str, torch.Tensor] = {}
        if self.grow is None or self.grow.full:
            x = self.from_rgb(img)
            pooled[f"rgb{self.resolution}"] = x.mean(dim=(2, 3))
            top = self.resolution
        else:
            x, top = self._grown_entry(img)
        for r, block in zip(self.block_resolutions, self.blocks, strict=True):
            if r > top:
                continue
            x = block(x)
            pooled[f"block{r}"] = x.mean(dim=(2, 3))  # output of the block at r, spatial size r/2
        x = self.conv4(self.mbstd(x))
        pooled["conv4"] = x.mean(dim=(2, 3))
        h = self.fc(x.reshape(x.shape[0], -1))
        return h, pooled

    def _grown_entry(self, img: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Progressive growing: (the trunk's input at the stage, the resolution of the first block to run).

        At a stable stage r the image is pooled to r and enters through fromRGB_r. While r fades in, the
        pooled image is first blended with its r/2 version (PGGAN's fade of the inputs) and the trunk's
        input is alpha * block_r(fromRGB_r(x)) + (1 - alpha) * fromRGB_{r/2}(x pooled to r/2)."""
        assert self.grow is not None and self.from_rgb_low is not None
        r, low = self.grow.res, self.from_rgb_low
        x_r = F.avg_pool2d(img, self.resolution // r) if r < self.resolution else img
        if not self.grow.fading:
            return low[str(r)](x_r), r
        alpha = self.grow.alpha.to(img.dtype)
        half = F.avg_pool2d(x_r, 2)
        x_r = torch.lerp(F.interpolate(half, scale_factor=2.0, mode="nearest"), x_r, alpha)
        entry = self.from_rgb if r == self.resolution else low[str(r)]
        new = self.blocks[self.block_resolutions.index(r)](entry(x_r))
        return torch.lerp(low[str(r // 2)](half), new, alpha), r // 2

    def forward(
        self, img: torch.Tensor, grade: torch.Tensor | None = None, *, q_grad_scale: float = 1.0
    ) -> DiscriminatorOutput:
        """img: [N, 3, R, R] in [-1, 1]; grade: [N] int in [0, num_classes) or None (no projection term).

        ``q_grad_scale``: the share of the Q head's gradient that flows on into the trunk (values unchanged;
        the trainer passes `loss.q_trunk_scale` on D's step, so Q's loss need not retrain D's features).

        Note: the minibatch-stddev layer mixes samples, so real and fake batches should go through D separately.
        """
        self._check_img(img)
        check_grade(grade, img.shape[0], self.num_classes, "Discriminator", required=False)
        h, _ = self._trunk(img)
        logits = self.out(h).squeeze(1)
        if self.embed is not None and grade is not None:
            e = self.embed(F.one_hot(grade.long(), self.num_classes).to(h.dtype))
            logits = logits + (e * h).sum(dim=1) / math.sqrt(self.feature_dim)
        q_in = h if q_grad_scale == 1.0 else h * q_grad_scale + h.detach() * (1.0 - q_grad_scale)
        q_params = self.q_head(q_in) if self.q_head is not None else h.new_zeros(h.shape[0], 0)
        class_logits = self.class_head(h) if self.class_head is not None else None
        return DiscriminatorOutput(logits, q_params, class_logits)

    def features(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """Multi-scale features for anomaly scoring: global-average-pooled activations [N, C_i].

        Keys, in order from the input: ``rgb{R}`` (after fromRGB), ``block{r}`` for r = R .. 8 (output of
        the block that reads r x r maps), ``conv4`` (4x4 conv after minibatch stddev), ``h`` (the trunk
        features the heads read) and, when there is a Q head, ``q_params``.

        ``rgb*`` and ``block*`` depend on each image alone; ``conv4``, ``h`` and ``q_params`` come after the
        minibatch-stddev layer and so depend on the rest of the batch (score in fixed-size batches, or
        one image at a time, to make them per-image).
        """
        self._check_img(img)
        h, pooled = self._trunk(img)
        pooled["h"] = h
        if self.q_head is not None:
            pooled["q_params"] = self.q_head(h)
        return pooled
