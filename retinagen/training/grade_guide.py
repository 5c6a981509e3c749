"""A frozen DR grader whose cross-entropy on the fakes joins G's loss (`loss.grade_guide`).

D's own grade classifier (`model.aux_classifier`) shares D's trunk, which learns what tells real from fake
first; in short runs its features carry no grade (benchmarks/d_grade_probe.py), so its grade loss cannot
tell G what a grade-3 fundus looks like. The guide is a fundus encoder (`retinagen.metrics.encoder`) trained
beforehand on the run's own labelled training images; it is frozen, so G can only lower its loss by changing
the images. It reads G's clean output (never D's augmented view) at the encoder's own input size.

``loss.grade_guide=auto`` trains that encoder at the start of the run on the run's training ZIP into
RUN/grade_guide.safetensors (`ensure_auto_guide`); a resumed run loads it again, and the checkpoint's SHA-256
of the guide makes sure it is the same one.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from retinagen.errors import CheckpointError, RetinagenError
from retinagen.run_dir import GRADE_GUIDE_STEM

__all__ = ["AUTO", "GradeGuide", "check_grade_guide", "ensure_auto_guide", "load_grade_guide"]

AUTO = "auto"
# The auto guide's training: the fixed judges' encoder recipe (`retinagen.metrics.judges.JudgeSpec`).
AUTO_EPOCHS = 12
AUTO_MIN_STEPS = 800
# What `loss.grade_guide_augment` applies before the guide: every transform of `retinagen.training.augment`,
# all of which keep the DR grade.
GUIDE_TRANSFORMS = ("xflip", "rot90", "translate", "scale", "rotate", "brightness", "contrast", "saturation")


class GradeGuide(nn.Module):
    """Images float [B, 3, H, W] in [-1, 1] (G's output) -> grade logits [B, num_classes] of a frozen encoder."""

    def __init__(self, net: nn.Module, sha256: str) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.sha256 = sha256

    def train(self, mode: bool = True) -> GradeGuide:  # always in eval mode: it is never trained here
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # What is exported is clamped to [-1, 1]: the guide reads that, so G cannot lower the guide's loss with
        # pixel values that vanish on export. A pixel out of range gets no gradient from the guide (a
        # straight-through clamp let the guide push such pixels further out, where it never saw them move:
        # measured, D then won within 2 kimg at 8 px).
        x = self.net.preprocess_float(images.float().clamp(-1.0, 1.0))
        return self.net.grade_head(self.net.features_from_float(x))


def load_grade_guide(path: str | Path, num_classes: int, device: torch.device | str = "cpu") -> GradeGuide:
    """Load a fundus encoder file as a guide; refuses one without a grade head of ``num_classes`` grades."""
    from retinagen.metrics.encoder import load_fundus_encoder

    p = _existing_file(path)
    ext = load_fundus_encoder(p)
    head = ext.net.grade_head
    if head is None:
        raise CheckpointError(f"{p}: this fundus encoder has no grade head (it was trained without grades)")
    if head.out_features != num_classes:
        raise CheckpointError(
            f"{p}: the encoder grades {head.out_features} classes, the model has {num_classes}"
        )
    return GradeGuide(ext.net, ext.weights_id).to(torch.device(device))


def check_grade_guide(guide: str | None, conditional: bool) -> None:
    """Up-front check of ``loss.grade_guide`` (before any long work): a model that can be guided, an existing file."""
    if guide is None:
        return
    if not conditional:
        raise RetinagenError("loss.grade_guide needs a grade-conditional model (model.conditional: true)")
    if guide != AUTO:
        _existing_file(guide)


def _existing_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{p}: loss.grade_guide file not found (a fundus encoder .safetensors)")
    return p


def ensure_auto_guide(path: Path, zip_path: Path, fingerprint: str, resolution: int, seed: int,
                      device: torch.device | str = "cpu", progress: bool = True, keep: bool = True) -> Path:
    """Train the auto guide on ``zip_path`` into ``path`` unless it is there (returns ``path``); with ``keep``
    False into a temporary folder instead, which is deleted (the other processes of a multi-process run train
    alongside the first, so that none waits at a barrier for minutes, and then load the first one's file).

    Input size min(resolution, 128), the judges' epochs; ``seed`` is the run's, offset so the guide's
    initialisation is not the judges' (seed 0). A guide already there must be complete and trained on this
    data (``fingerprint``), or it is refused. The encoder is written atomically by `train_fundus_encoder`.
    """
    from retinagen.metrics.encoder import train_fundus_encoder

    if keep and (path.is_file() or path.with_suffix(".json").is_file()):
        meta_path = path.with_suffix(".json")
        try:
            trained_on = json.loads(meta_path.read_text(encoding="utf-8"))["data"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path.parent}: {path.name} or {meta_path.name} is missing or unreadable; "
                                  "delete both to train the grade guide again") from None
        if trained_on != fingerprint or not path.is_file():
            raise CheckpointError(f"{path}: this grade guide was trained on other data than this run's "
                                  f"({zip_path.name}); delete it and {meta_path.name} to train it again")
        return path
    if keep:
        print(f"grade guide: training a DR grader on {zip_path.name} into {path.name} (loss.grade_guide=auto)",
              file=sys.stderr)
    kwargs = dict(resolution=min(resolution, 128), epochs=AUTO_EPOCHS, min_steps=AUTO_MIN_STEPS, seed=seed + 1,
                  device=device)
    if keep:
        return train_fundus_encoder(zip_path, path.with_suffix(""), progress=progress, **kwargs)
    with tempfile.TemporaryDirectory(prefix="retinagen-guide-") as tmp:
        train_fundus_encoder(zip_path, Path(tmp) / GRADE_GUIDE_STEM, progress=False, **kwargs)
    return path
