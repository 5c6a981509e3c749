"""A run folder's layout in one place, which folder a checkpoint belongs to, and reading its training log.

    RUN/config.json      the resolved config (written when training starts)
    RUN/metrics.jsonl    one JSON object per line: training statistics, snapshot scores
    RUN/checkpoints/     ckpt-<step>.{safetensors,json}, best-<step>.* (`retinagen.training.checkpoint`)
    RUN/samples/         fakes-<step>.png fixed-seed grids
    RUN/traversals/      c<i>.png, one grid per latent code
    RUN/factors.json     the factor map `retinagen discover` writes
    RUN/tensorboard/     TensorBoard events
    RUN/data/            the training ZIP prepared for a synthfundus run
    RUN/grade_guide.*    the grader `loss.grade_guide=auto` trains on the training data (`retinagen.training.grade_guide`)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
TRAVERSALS_DIR = "traversals"
FACTOR_MAP_FILE = "factors.json"
TENSORBOARD_DIR = "tensorboard"
DATA_DIR = "data"
GRADE_GUIDE_STEM = "grade_guide"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder (nothing is created or read until asked)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES_DIR

    @property
    def traversals(self) -> Path:
        return self.root / TRAVERSALS_DIR

    @property
    def factors(self) -> Path:
        return self.root / FACTOR_MAP_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def grade_guide(self) -> Path:
        return self.root / f"{GRADE_GUIDE_STEM}.safetensors"

    def is_run(self) -> bool:
        """A folder counts as a run folder when it holds the run's config.json or metrics.jsonl."""
        return self.config.is_file() or self.metrics.is_file()

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run folder of a checkpoint file (``RUN/checkpoints/ckpt-*`` or ``RUN/ckpt-*``), if any.

        The folder above is only considered for a checkpoint in a ``checkpoints/`` folder (a lone file's
        grandparent is not its run).
        """
        ck = Path(checkpoint)
        cands = (ck.parent.parent, ck.parent) if ck.parent.name == CHECKPOINTS_DIR else (ck.parent,)
        return next((cls(c) for c in cands if cls(c).is_run()), None)

    def log(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Every non-empty line of metrics.jsonl with its record, or None for a line that does not read as a
        JSON object (the last line of a run killed mid-write). Nothing when the file is absent."""
        yield from read_log(self.metrics)


def read_log(path: str | Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """`RunDir.log` for a metrics.jsonl at any path."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            yield line, rec if isinstance(rec, dict) else None


def step_of(rec: dict[str, Any]) -> int | None:
    """A log record's training step, when it has an integer one."""
    step = rec.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None
