"""Shared fixtures: a tiny prepared synthetic fundus dataset, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_zip_16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 synthetic fundus images at 16 px, prepared into a ZIP (labels: DR grades)."""
    from retinagen.data.prepare import prepare_dataset
    from retinagen.data.synthetic import write_synth_dataset

    root = tmp_path_factory.mktemp("synth16")
    write_synth_dataset(root / "raw", n=64, resolution=32, seed=3, workers=1, progress=False)
    out = root / "synth16.zip"
    prepare_dataset("eyepacs", root / "raw", 16, out, workers=1, progress=False)
    return out
