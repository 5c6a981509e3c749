"""Exponential moving average of the generator's weights (StyleGAN2's G_ema).

The half-life is given in thousands of images (``ema_kimg``) so it does not depend on the batch
size; ``ema_rampup`` shortens it early in training (half-life <= rampup * images seen).
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch_size: int, ema_kimg: float, images_seen: int, rampup: float | None) -> float:
    """Per-step decay so that the weights' half-life is ``ema_kimg`` thousand images."""
    ema_nimg = ema_kimg * 1000.0
    if rampup is not None:
        ema_nimg = min(ema_nimg, images_seen * rampup)
    if ema_nimg <= 0:
        return 0.0
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * model`` for parameters; buffers are copied."""
    targets, sources = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if len(targets) != len(sources):
        raise ValueError(f"update_ema: {len(targets)} EMA parameters for {len(sources)} model parameters")
    if targets:
        # One multi-tensor kernel per dtype/device group instead of a launch per parameter (on CUDA the
        # per-parameter loop is launch-bound); the same lerp per element.
        torch._foreach_lerp_(targets, sources, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)
