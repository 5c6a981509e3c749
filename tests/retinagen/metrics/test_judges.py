"""The fixed judges: deterministic, data-only, refused when damaged; their scores (fidelity, precision and recall,
variety shares). Tiny 16 px judges keep these building tests fast; the shipped 32 px judges every run is scored by
are validated like FID in test_judges_validation.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from retinagen.config import JUDGE_SEEDS, load_run_config, parse_overrides
from retinagen.errors import CheckpointError, ConfigError
from retinagen.metrics import judges as jm
from retinagen.metrics.judges import (
    JudgeSpec,
    build_judges,
    get_judges,
    grade_fidelity,
    held_out_real,
    load_judges,
    precision_recall,
)

TINY = JudgeSpec(resolution=16, n_train=160, n_reference=96, epochs=1, min_steps=10)


@pytest.fixture(scope="module")
def tiny_dir(tiny_judges_dir: Path) -> Path:
    return tiny_judges_dir


# ------------------------------------------------------------------------------------------- building


def test_a_rebuild_gives_the_same_files(tiny_dir: Path, tmp_path: Path, two_threads: None) -> None:
    again = build_judges(TINY, tmp_path / "again", progress=False)
    first = json.loads((tiny_dir / "judges.json").read_text())["files"]
    second = json.loads((again / "judges.json").read_text())["files"]
    # The weights, the reference features and the reference images are byte-identical: same judge id.
    for name in ("encoder.safetensors", "reference.safetensors", "reference.zip"):
        assert second[name] == first[name], name
    # encoder.json differs only in when it was made and how long that took.
    a, b = (json.loads((d / "encoder.json").read_text()) for d in (tiny_dir, again))
    for meta in (a, b):
        meta.pop("created")
        meta["training"].pop("seconds")
    assert a == b
    assert sorted(p.name for p in again.iterdir()) == sorted([*jm.JUDGE_FILES, "judges.json"])


def test_judges_are_data_only_and_carry_their_validation(tiny_dir: Path) -> None:
    j = load_judges(tiny_dir)
    meta = j.meta
    assert meta["spec"] == {**TINY.__dict__}
    v = meta["validation"]
    assert v["n_reference"] == TINY.n_reference
    assert set(v["grade_accuracy_per_grade"]) <= {"0", "1", "2", "3", "4"}
    assert 0.0 <= v["referable_accuracy"] <= 1.0 and v["fd_half_vs_half"] >= 0.0
    assert j.judge_id == meta["files"]["encoder.safetensors"][:12]
    # Data only: two safetensors files (an 8-byte length, then a JSON header), JSON, and a ZIP of PNGs + JSON.
    for name in ("encoder.safetensors", "reference.safetensors"):
        assert (tiny_dir / name).read_bytes()[8:9] == b"{", name
    json.loads((tiny_dir / "encoder.json").read_text())
    with zipfile.ZipFile(tiny_dir / "reference.zip") as zf:
        assert {Path(n).suffix for n in zf.namelist()} <= {".png", ".json", ""}
    # The reference images are a prepared dataset with ground-truth factors (MIG reads Q on them).
    from retinagen.data.dataset import ZipImageDataset

    ds = ZipImageDataset(j.reference_zip)
    assert len(ds) == len(j.ref_features) == TINY.n_reference and ds.resolution == 16
    assert "pigmentation" in j.factor_names and j.ref_factors.shape == (TINY.n_reference, len(j.factor_names))


@pytest.mark.parametrize("name", jm.JUDGE_FILES)
def test_a_changed_or_missing_file_is_refused(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    copy = tmp_path / "j"
    shutil.copytree(tiny_dir, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name}: contents do not match"):
        load_judges(copy)
    (copy / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name}: missing"):
        load_judges(copy)


def test_a_judges_json_that_is_not_one_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "j"
    shutil.copytree(tiny_dir, copy)
    (copy / "judges.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(CheckpointError, match="judges.json: not readable judges"):
        load_judges(copy)
    meta = json.loads((tiny_dir / "judges.json").read_text())
    del meta["files"]["reference.zip"]
    (copy / "judges.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected"):
        load_judges(copy)


def test_an_interrupted_build_leaves_nothing_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import retinagen.metrics.encoder as enc

    seen: list[Path] = []

    def boom(*a: Any, **k: Any) -> None:
        seen.extend(p for p in tmp_path.rglob("*") if p.is_file())  # both sets rendered and prepared by now
        raise KeyboardInterrupt

    monkeypatch.setattr(enc, "train_fundus_encoder", boom)
    small = dataclasses.replace(TINY, n_train=24, n_reference=16)  # what is cleaned up does not depend on sizes
    with pytest.raises(KeyboardInterrupt):
        get_judges(small, tmp_path, progress=False)
    assert len([p for p in seen if p.suffix == ".zip"]) >= 2, seen
    assert list(tmp_path.iterdir()) == []


def test_training_data_may_not_use_the_judges_seeds() -> None:
    assert JudgeSpec().seeds == JUDGE_SEEDS
    for seed in JUDGE_SEEDS:
        with pytest.raises(ConfigError, match="judges' seeds"):
            load_run_config("synthfundus", preset="smoke", overrides=parse_overrides([f"data.synth_seed={seed}"]))
    load_run_config("synthfundus", preset="smoke", overrides=parse_overrides([f"data.synth_seed={JUDGE_SEEDS[1] + 1}"]))
    with pytest.raises(ValueError, match="not held out"):
        held_out_real(TINY, 10, TINY.seed, Path("unused"))


# ------------------------------------------------------------------------------------------- scores


def test_grade_fidelity_counts_confident_verdicts() -> None:
    proba = np.array([[0.9, 0.1, 0, 0, 0], [0.4, 0.6, 0, 0, 0], [0.2, 0.3, 0.5, 0, 0], [0.5, 0, 0, 0, 0.5]])
    out = grade_fidelity(proba, np.array([0, 0, 2, 4]))
    assert out["fidelity"] == {0: 0.5, 2: 1.0, 4: 1.0}
    # judged referable (p(grade >= 2) >= 0.5): rows 2 and 3; requested referable: rows 2 and 3.
    assert out["referable_agreement"] == 1.0
    assert grade_fidelity(proba, np.array([4, 4, 0, 0]))["referable_agreement"] == 0.0


def test_group_fidelity_sums_the_groups_grades() -> None:
    # Asked 0: judged 1 (0.6) still counts for group 0-1; asked 3: p 0.3 + 0.3 over grades 3-4 counts, where
    # neither grade alone reaches 0.5; asked 4 with p(3-4) 0.4 does not; no image was asked for grade 2.
    proba = np.array([[0.4, 0.6, 0, 0, 0], [0.2, 0.1, 0.4, 0.3, 0.0], [0.1, 0.1, 0.2, 0.3, 0.3], [0.3, 0.1, 0.2, 0.1, 0.3]])
    out = grade_fidelity(proba, np.array([0, 3, 3, 4]))
    assert out["fidelity"] == {0: 0.0, 3: 0.0, 4: 0.0}
    assert out["group_fidelity"] == {"0-1": 1.0, "3-4": pytest.approx(1 / 3)}


def test_precision_and_recall_tell_fidelity_from_diversity() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    same = rng.normal(size=(400, 8))
    collapsed = rng.normal(scale=0.2, size=(400, 8))  # inside the real manifold, a fraction of its spread
    off = rng.normal(loc=4.0, size=(400, 8))
    p, r = precision_recall(same, real)
    assert p > 0.8 and r > 0.8
    p, r = precision_recall(collapsed, real)
    assert p > 0.95 and r < 0.3
    p, r = precision_recall(off, real)
    assert p < 0.2


def test_score_of_a_checkpoint(tiny_dir: Path, smoke_run_master: Path) -> None:
    from retinagen.generation import load_model
    from retinagen.metrics.quality import score_checkpoint

    model = load_model(smoke_run_master)
    judges = load_judges(tiny_dir)
    row = score_checkpoint(model, judges, n=40, seed=0, acm_n=4)
    assert row["judge"] == judges.judge_id and row["n"] == 40
    assert row["kimg"] == model.meta["kimg"] and row["train_seconds"] > 0
    assert row["fd_fundus"] > 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    if model.num_classes:
        assert set(row["fidelity"]) == set(range(model.num_classes))
    assert row["H_discrete"] >= 0 and row["L_info_discrete"] <= row["H_discrete"] + 1e-6
    assert "mig" in row and isinstance(row["acm"], dict)
    assert 0 <= row["z_share"] <= 2 and 0 <= row["code_share"] <= 2  # logged at every snapshot
    again = score_checkpoint(model, judges, n=40, seed=0, quick=True)
    assert again["fd_fundus"] == pytest.approx(row["fd_fundus"], rel=1e-6)
    assert "mig" not in again and "acm" not in again
    with pytest.raises(ValueError, match="judges built at 16 px"):
        score_checkpoint(model, load_judges_at(judges, 32), n=8)


def load_judges_at(judges: jm.Judges, res: int) -> jm.Judges:
    """The same judges claiming another resolution (only the check reads it)."""
    meta = {**judges.meta, "spec": {**judges.meta["spec"], "resolution": res}}
    return jm.Judges(judges.folder, meta, judges.encoder, {"features": torch.from_numpy(judges.ref_features),
                                                           "grades": torch.from_numpy(judges.ref_grades)})


def test_variety_shares_tell_a_g_that_ignores_z_from_one_that_ignores_the_codes() -> None:
    from types import SimpleNamespace

    from retinagen.latent import LatentSpec
    from retinagen.metrics.quality import variety_shares

    spec = LatentSpec(z_dim=8, categorical=(3,), n_bernoulli=2, n_uniform=2)

    def model(use_z: float, use_c: float) -> SimpleNamespace:
        def G(z, code, grade, **kwargs):  # noqa: N802
            v = use_z * z[:, :3] + use_c * code[:, :3]
            return v.view(-1, 3, 1, 1).expand(-1, 3, 4, 4)
        return SimpleNamespace(spec=spec, G=G, device=torch.device("cpu"), num_classes=0, resolution=4, meta={})

    only_codes = variety_shares(model(0.0, 1.0), 64, 0)
    assert only_codes["z_share"] == 0.0 and only_codes["code_share"] == pytest.approx(1.0)
    only_z = variety_shares(model(1.0, 0.0), 64, 0)
    assert only_z["code_share"] == 0.0 and only_z["z_share"] == pytest.approx(1.0)
    both = variety_shares(model(1.0, 1.0), 64, 0)
    assert 0.05 < both["z_share"] < 0.95 and 0.05 < both["code_share"] < 0.95
    assert both["z_share"] + both["code_share"] == pytest.approx(1.0, abs=0.1)  # additive, independent parts
    assert variety_shares(model(1.0, 1.0), 64, 0) == both  # fixed seeds
    assert variety_shares(SimpleNamespace(spec=LatentSpec(z_dim=8, categorical=(), n_bernoulli=0, n_uniform=0)),
                          8, 0) == {}


def test_grade_counts_split_n_by_the_probabilities() -> None:
    from retinagen.metrics.quality import grade_counts

    assert grade_counts([0.73, 0.07, 0.15, 0.025, 0.025], 100) == [73, 7, 15, 3, 2]  # largest remainders
    assert sum(grade_counts([0.1] * 7, 33)) == 33 and grade_counts([1, 1, 1, 1, 1], 10) == [2] * 5
    assert grade_counts([0.5, 0.0, 0.5], 3) in ([2, 0, 1], [1, 0, 2])  # a grade of probability 0 gets none
    for probs, n in (([0.0, 0.0], 5), ([0.5, float("nan")], 5), ([0.5, -0.1], 5), ([1.0], 0), ([1.0], -2)):
        with pytest.raises(ValueError):
            grade_counts(probs, n)



def test_grade_shift_tells_a_whole_image_mark_from_lesions_at_random_places() -> None:
    from retinagen.metrics.quality import grade_shift

    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(500, 8, 8, 3)).astype(np.uint8)
    grades = np.repeat(np.arange(5), 100)
    lesions = base.copy()
    for i, g in enumerate(grades):  # g bright dots at random places: the mean images barely differ
        for _ in range(g):
            y, x = rng.integers(0, 8, 2)
            lesions[i, y, x] = 255
    marked = base.astype(np.int64)
    marked[grades >= 3, :, :, 2] += 60  # grades 3-4 bluer everywhere
    marked = marked.clip(0, 255).astype(np.uint8)
    noise = grade_shift(base, grades)
    assert grade_shift(lesions, grades) < 2 * noise + 1.5
    assert grade_shift(marked, grades) > 2.5 * grade_shift(lesions, grades)
    assert np.isnan(grade_shift(base, np.zeros(500, np.int64)))  # one grade: nothing to compare
