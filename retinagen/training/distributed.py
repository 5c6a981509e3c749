"""Multi-process training without DistributedDataParallel: process group, gradient all-reduce, and the
seeded, resumable data order each process takes its slice of."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from retinagen.errors import RetinagenError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the process group when launched by torchrun (even with one process, so that
    `torchrun --nproc_per_node 1` runs the same all_reduce path as a multi-process run); a no-op for a
    plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def allreduce_grads(module: nn.Module, world: int) -> None:
    """Average gradients over processes with one flat all_reduce (no-op without a process group)."""
    if world <= 1 and not dist.is_initialized():
        return
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].reshape(p.grad.shape))
        offset += n


def broadcast_module(module: nn.Module, world: int) -> None:
    if world <= 1 and not dist.is_initialized():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


class StreamSampler(torch.utils.data.Sampler[int]):
    """An endless, seeded stream of dataset indices, startable at any position.

    The global stream is the concatenation of permutations ``perm(seed, epoch)``; every global batch
    of ``batch`` images is cut into ``world`` equal slices, and this process yields its slice. Given
    the number of global images already consumed it resumes exactly where a previous run stopped.

    ``weights`` (one per image, summing to 1): each "epoch" is then n draws with replacement by those
    weights instead of a permutation, seeded the same way, so a weighted stream resumes as exactly.
    """

    def __init__(self, n: int, seed: int, batch: int, rank: int, world: int, start: int = 0,
                 weights: np.ndarray | None = None) -> None:
        if n <= 0:
            raise RetinagenError("the training set is empty")
        if weights is not None and weights.shape != (n,):
            raise RetinagenError(f"the sampler has {n} images but {weights.shape} weights")
        self.n, self.seed, self.batch, self.rank, self.world, self.start = n, seed, batch, rank, world, start
        self.local = batch // world
        self.weights = weights

    def _perm(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            return rng.permutation(self.n)
        return rng.choice(self.n, size=self.n, replace=True, p=self.weights)

    def __iter__(self) -> Iterator[int]:
        pos = self.start
        cached_epoch, perm = -1, np.empty(0, dtype=np.int64)
        while True:
            base = pos + self.rank * self.local
            for q in range(base, base + self.local):
                epoch = q // self.n
                if epoch != cached_epoch:
                    cached_epoch, perm = epoch, self._perm(epoch)
                yield int(perm[q % self.n])
            pos += self.batch

    def __len__(self) -> int:  # pragma: no cover - endless; DataLoader only needs it for len()
        return 2**62


def balanced_grade_probs(counts: np.ndarray, balance: float) -> np.ndarray:
    """How often each grade is shown in training: proportional to count ** (1 - balance), so 0 keeps the
    data's frequencies and 1 shows every grade present equally often. A grade with no images gets 0."""
    counts = np.asarray(counts, dtype=np.float64)
    w = np.where(counts > 0, np.power(np.maximum(counts, 1.0), 1.0 - balance), 0.0)
    if w.sum() <= 0:
        raise RetinagenError("no grade has any image")
    return w / w.sum()


def image_weights(labels: np.ndarray, grade_probs: np.ndarray) -> np.ndarray:
    """Per-image sampling weights under which grade g is drawn with probability grade_probs[g]."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(grade_probs)).astype(np.float64)
    per_image = np.divide(grade_probs, counts, out=np.zeros_like(grade_probs, dtype=np.float64), where=counts > 0)
    w = per_image[labels]
    return w / w.sum()
