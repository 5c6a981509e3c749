"""data.grade_balance: how often each DR grade is shown in training, for real images and fake grades alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retinagen.config import load_run_config, parse_overrides
from retinagen.errors import CheckpointError
from retinagen.training.distributed import StreamSampler, balanced_grade_probs, image_weights
from retinagen.training.loop import Trainer, _loader, _open_training_data, train


def _cfg(data: Path, *extra: str):
    return load_run_config("synthfundus", preset="smoke", overrides=parse_overrides([f"data.path={data}", *extra]))


def test_balance_interpolates_between_the_data_and_equal_grades() -> None:
    counts = np.array([64.0, 16.0, 4.0, 0.0, 1.0])
    assert balanced_grade_probs(counts, 0.0) == pytest.approx(counts / counts.sum())
    # Every grade present equally often; a grade without images is never asked for (0 ** 0 would be 1).
    assert balanced_grade_probs(counts, 1.0) == pytest.approx([0.25, 0.25, 0.25, 0.0, 0.25])
    half = balanced_grade_probs(counts, 0.5)
    assert half == pytest.approx(np.array([8.0, 4.0, 2.0, 0.0, 1.0]) / 15.0)


def test_weighted_stream_shows_the_asked_grade_mix_and_resumes_exactly() -> None:
    labels = np.array([0] * 90 + [1] * 8 + [4] * 2)
    probs = balanced_grade_probs(np.bincount(labels, minlength=5), 1.0)
    weights = image_weights(labels, probs)
    it = iter(StreamSampler(len(labels), seed=5, batch=10, rank=0, world=1, weights=weights))
    stream = [next(it) for _ in range(30_000)]
    shares = np.bincount(labels[stream], minlength=5) / len(stream)
    assert shares == pytest.approx([1 / 3, 1 / 3, 0, 0, 1 / 3], abs=0.015)
    # Started at any image count, the weighted stream continues the same sequence (exact resume).
    later = iter(StreamSampler(len(labels), seed=5, batch=10, rank=0, world=1, start=250, weights=weights))
    assert [next(later) for _ in range(200)] == stream[250:450]


def test_training_shows_balanced_grades_and_saves_the_datas_frequencies(synth_zip_16: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_zip_16, "data.grade_balance=1")
    trainer = Trainer(cfg, tmp_path / "run", log=False)
    dataset = _open_training_data(trainer, synth_zip_16)
    counts = np.bincount(np.asarray(dataset.labels), minlength=5)
    present = counts > 0
    assert present.sum() >= 3 and counts.max() > 2 * counts[present].min()  # a skewed set to balance
    # What generation draws from stays the data's frequencies; what training shows is balanced.
    assert trainer.grade_probs.numpy() == pytest.approx(counts / counts.sum())
    assert trainer.train_grade_probs.numpy() == pytest.approx(present / present.sum())
    fake = trainer._sample_grades(20_000).cpu().numpy()
    assert np.bincount(fake, minlength=5) / fake.size == pytest.approx(present / present.sum(), abs=0.02)
    shown = []
    for _, (_img, label) in zip(range(200), _loader(trainer, dataset), strict=False):
        shown.append(label.numpy())
    real = np.concatenate(shown)
    assert np.bincount(real, minlength=5) / real.size == pytest.approx(present / present.sum(), abs=0.05)


def test_grade_balance_is_part_of_the_run_config(synth_zip_16: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(synth_zip_16), run, progress=False, max_steps=2)
    with pytest.raises(CheckpointError, match="data.grade_balance"):
        train(_cfg(synth_zip_16, "data.grade_balance=0.5"), run, resume=True, progress=False)
    summary = train(_cfg(synth_zip_16), run, resume=True, progress=False)
    assert summary.steps == 8
