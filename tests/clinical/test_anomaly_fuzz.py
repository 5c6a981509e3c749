"""Fuzz the anomaly scorer's file path: random bytes and mutated PNG/JPEG/DICOM files go through
`clinical.anomaly.score_files` (decode -> FOV -> preprocess -> D/Q features -> score). Every input must
come back as a result with a known flag (and a finite score when scored) or a project error: no other
exception, no hang, and one bad file never stops the batch."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinical import anomaly as an
from retinagen.config import load_run_config, parse_overrides
from retinagen.generation import load_model
from retinagen.training.loop import train
from tests.retinagen.test_fuzz import dicom_seeds, image_seeds, mutated

FLAGS = {"anomaly", "normal", "no_fundus", "unreadable"}
COUNT = {"inputs": 0}


@pytest.fixture(scope="module")
def fitted(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("anomaly_fuzz") / "run"
    cfg = load_run_config("synthfundus", preset="smoke", overrides=parse_overrides([f"data.path={synth_zip_16}"]))
    train(cfg, run, progress=False)
    model = load_model(run, with_discriminator=True)
    yield model, an.fit_scorer(model, synth_zip_16)
    torch.set_num_threads(before)
    print(f"\nanomaly-scorer fuzz: {COUNT['inputs']} inputs")


def _batch() -> st.SearchStrategy[list[tuple[str, bytes]]]:
    raw = st.tuples(st.sampled_from(["x.png", "x.jpg", "x.dcm", "x"]), st.binary(max_size=2048))
    return st.lists(st.one_of(mutated(image_seeds()), mutated(dicom_seeds()), raw), min_size=1, max_size=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=_batch())
def test_scorer_survives_random_and_mutated_files(fitted, batch: list[tuple[str, bytes]], tmp_path: Path) -> None:
    model, scorer = fitted
    folder = tmp_path / f"b{time.monotonic_ns()}"
    folder.mkdir()
    paths = []
    for i, (name, data) in enumerate(batch):
        p = folder / f"{i}{Path(name).suffix}"
        p.write_bytes(data)
        paths.append(p)
    t0 = time.perf_counter()
    results = an.score_files(scorer, model, paths, batch_size=4, progress=False)
    assert time.perf_counter() - t0 < 5.0 * len(paths)
    COUNT["inputs"] += len(paths)
    assert [r.file for r in results] == [str(p) for p in paths]  # one result per file, in order
    for r in results:
        assert r.flag in FLAGS
        if r.flag in ("anomaly", "normal"):
            assert r.score is not None and math.isfinite(r.score)
        else:
            assert r.score is None and r.reason
