"""Learning-rate schedules shared by the auxiliary trainers (fundus encoder, DR grader)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int = 0) -> float:
    """The lr factor at ``step``: linear from 1/warmup to 1 over ``warmup`` steps, then a cosine from 1 to 0
    at ``total`` (held at 0 after it). A `torch.optim.lr_scheduler.LambdaLR` function."""
    if step < warmup:
        return (step + 1) / warmup
    t = min((step - warmup) / max(1, total - warmup), 1.0)
    return 0.5 * (1 + math.cos(math.pi * t))
