"""Feature vectors read from a trained discriminator and its Q head.

``D:rgb@{R}px``, ``D@{r}px``, ``D@4px``, ``D:h``: global-average-pooled activations of D's trunk at every
scale; ``Q:c{i}``: the Q head's posterior parameters of code c_i. D's minibatch-stddev layer is set to group
size 1 while features are read, so an image's features never depend on the rest of its batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from retinagen.errors import (
    CheckpointError,
    ConfigError,
)
from retinagen.generation import LoadedModel


@dataclass(frozen=True)
class FeatureGroup:
    """A named block of columns [start, stop) of the feature vector (``D@16px``, ``Q:c4``)."""

    name: str
    start: int
    stop: int

    @property
    def kind(self) -> str:
        """Which network the group comes from: "D" (trunk activations) or "Q" (posterior parameters)."""
        return self.name[0]


@contextmanager
def per_image_statistics(D: torch.nn.Module) -> Iterator[None]:
    """Make D's minibatch-stddev statistic per image (group size 1) for the duration of the block.

    With group size 1 every image is its own group, which is what D computes for a batch of one; so
    features do not depend on batch composition. The original group size is restored afterwards.
    """
    mbstd = getattr(D, "mbstd", None)
    if mbstd is None or not hasattr(mbstd, "group_size"):
        yield
        return
    old = mbstd.group_size
    mbstd.group_size = 1
    try:
        yield
    finally:
        mbstd.group_size = old


def _d_group_name(key: str) -> str:
    if key.startswith("rgb"):
        return f"D:rgb@{key[3:]}px"
    if key.startswith("block"):
        return f"D@{key[5:]}px"
    if key == "conv4":
        return "D@4px"
    return f"D:{key}"


class FeatureExtractor:
    """Images [N, 3, R, R] in [-1, 1] -> features [N, F] from D's trunk and Q head (module docstring).

    ``groups`` lists the named column blocks, D groups first (from the input up), then one Q group per
    code in code order. `torch_features` is differentiable with respect to the images (used by the
    f-AnoGAN inversion); `__call__` is the no-grad, batched, float64 numpy version.
    """

    def __init__(self, model: LoadedModel, batch_size: int = 64) -> None:
        if model.D is None:
            raise CheckpointError(
                f"{model.path}: the checkpoint holds no discriminator; anomaly scoring needs D and its Q head"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.D = model.D
        self.spec = model.spec
        self.resolution = model.resolution
        self.batch_size = batch_size
        with torch.no_grad(), per_image_statistics(self.D):
            raw = self.D.features(torch.zeros(1, 3, self.resolution, self.resolution, device=model.device))
        self._d_keys = [k for k in raw if k != "q_params"]
        self.has_q = "q_params" in raw and self.spec.q_param_dim > 0
        groups: list[FeatureGroup] = []
        start = 0
        for k in self._d_keys:
            width = int(raw[k].shape[1])
            groups.append(FeatureGroup(_d_group_name(k), start, start + width))
            start += width
        if self.has_q:
            for i, width in enumerate(self._q_widths()):
                groups.append(FeatureGroup(f"Q:c{i}", start, start + width))
                start += width
        self.groups: tuple[FeatureGroup, ...] = tuple(groups)
        self.dim = start
        self.d_dim = sum(g.stop - g.start for g in groups if g.kind == "D")

    def _q_widths(self) -> list[int]:
        s = self.spec
        per_uniform = 2 if s.learned_variance else 1
        return list(s.categorical) + [1] * s.n_bernoulli + [per_uniform] * s.n_uniform

    def _q_columns(self, q_params: torch.Tensor) -> list[torch.Tensor]:
        """Q's output [N, P] -> one [N, w_i] block per code, in code order."""
        q = self.spec.split_q_params(q_params.float())
        cols = [F.log_softmax(logits, dim=1) for logits in q.cat_logits]
        cols += [q.bern_logits[:, j : j + 1] for j in range(self.spec.n_bernoulli)]
        for j in range(self.spec.n_uniform):
            parts = [q.unif_mean[:, j : j + 1]]
            if q.unif_logvar is not None:
                parts.append(q.unif_logvar[:, j : j + 1])
            cols.append(torch.cat(parts, dim=1))
        return cols

    def torch_features(self, images: torch.Tensor, *, with_q: bool = True) -> torch.Tensor:
        """Differentiable features [N, F] (float32; only the D columns when ``with_q`` is False)."""
        r = self.resolution
        if images.ndim != 4 or images.shape[1:] != (3, r, r):
            raise ValueError(f"images must be [N, 3, {r}, {r}] in [-1, 1], got {tuple(images.shape)}")
        with per_image_statistics(self.D):
            raw = self.D.features(images.to(self.model.device, torch.float32))
        cols = [raw[k].float() for k in self._d_keys]
        if with_q and self.has_q:
            cols += self._q_columns(raw["q_params"])
        return torch.cat(cols, dim=1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """images [N, 3, R, R] in [-1, 1] -> float64 [N, F] (batched; independent of batch size)."""
        out = [
            self.torch_features(images[i : i + self.batch_size]).double().cpu().numpy()
            for i in range(0, images.shape[0], self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim))
