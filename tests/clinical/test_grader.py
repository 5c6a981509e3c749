"""DR grader and downstream proof: metrics, patient split, synthetic manifests, checkpoints, the full run."""

from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from clinical.grader import (
    ARMS,
    GradedImages,
    GraderConfig,
    augment_batch,
    balanced_accuracy,
    bootstrap_indices,
    bootstrap_samples,
    confusion_matrix,
    evaluate_predictions,
    grader_config,
    kappa_from_confusion,
    load_grader,
    load_synthetic_folder,
    per_grade_recall,
    percentile_interval,
    predict_proba,
    quadratic_weighted_kappa,
    referable_auroc,
    referable_scores,
    run_downstream,
    save_grader,
    split_by_group,
    split_real,
    train_grader,
)
from retinagen.data.dataset import ZipImageDataset
from retinagen.data.synthetic import render_fundus, sample_factors
from retinagen.errors import BadInputError, CheckpointError, ConfigError
from retinagen.training.checkpoint import save_checkpoint

TINY = grader_config("smoke", steps=6, batch_size=8)


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def _fundus(grade: int, res: int, seed: int) -> np.ndarray:
    return render_fundus(sample_factors(np.random.default_rng(seed), grade=grade), res)


def _write_manifest(folder: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    header = header or ["file", "level", "synthetic", "seed", "codes", "checkpoint_sha256"]
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _synth_folder(folder: Path, n: int, res: int = 16, seed: int = 0) -> list[list[str]]:
    """``n`` procedural fundus PNGs with grades 0-4 in turn and their manifest rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"seed{seed}-{i:06d}.png"
        (folder / name).write_bytes(_png(_fundus(i % 5, res, seed * 1000 + i)))
        rows.append([name, str(i % 5), "1", str(i), "c0=0.5", "ab" * 32])
    _write_manifest(folder, rows)
    return rows


def _zip_dataset(path: Path, labels: list[int], patients: list[str] | None, splits: list[str] | None,
                 res: int = 16) -> Path:
    """A prepared-dataset ZIP written by hand (dataset.json + PNG members)."""
    names = [f"00000/img{i:08d}.png" for i in range(len(labels))]
    meta: dict = {"labels": [[n, lab] for n, lab in zip(names, labels, strict=True)], "resolution": res,
                  "num_classes": 5}
    if patients is not None:
        meta["patients"] = dict(zip(names, patients, strict=True))
    if splits is not None:
        meta["splits"] = dict(zip(names, splits, strict=True))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dataset.json", json.dumps(meta))
        for i, (n, lab) in enumerate(zip(names, labels, strict=True)):
            zf.writestr(n, _png(_fundus(lab, res, i)))
    return path


# --------------------------------------------------------------------------------------------------
# Metrics against hand-computed values


def test_kappa_hand_computed_values() -> None:
    # O = [[1,0,0],[0,0,1],[0,0,1]], E = outer([1,1,1], [1,0,2]) / 3; sum W*O = 1, sum W*E = 5 -> 1 - 1/5.
    assert quadratic_weighted_kappa([0, 1, 2], [0, 2, 2]) == pytest.approx(0.8)
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == pytest.approx(1.0)
    # Complete reversal of the extremes: sum W*O = 32, sum W*E = 16.
    assert quadratic_weighted_kappa([0, 4], [4, 0]) == pytest.approx(-1.0)
    # One and the same grade everywhere: 0/0, undefined rather than a made-up number.
    assert quadratic_weighted_kappa([0, 0, 0], [0, 0, 0]) is None
    # A constant prediction against varied truth is defined and equals 0 (no agreement beyond chance).
    assert quadratic_weighted_kappa([0, 0, 2], [0, 0, 0]) == pytest.approx(0.0)


def test_vectorised_kappa_matches_sklearn_on_random_resamples() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, 200)
    p = np.clip(t + rng.integers(-1, 2, 200), 0, 4)
    idx = bootstrap_indices(200, 20, seed=1)
    cms = np.stack([confusion_matrix(t[i], p[i]) for i in idx])
    ours = kappa_from_confusion(cms)
    ref = [cohen_kappa_score(t[i], p[i], labels=list(range(5)), weights="quadratic") for i in idx]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_recall_and_balanced_accuracy_hand_computed() -> None:
    y_true = [0, 0, 0, 0, 2, 2]
    y_pred = [0, 0, 0, 1, 2, 0]
    assert per_grade_recall(y_true, y_pred) == [0.75, None, 0.5, None, None]
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(0.625)  # mean over the grades present only
    cm = confusion_matrix(y_true, y_pred)
    assert cm[0].tolist() == [3, 1, 0, 0, 0] and cm[2].tolist() == [1, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="grades must be in"):
        confusion_matrix([0, 5], [0, 0])


def test_referable_auroc_known_case_and_degenerate() -> None:
    proba = np.zeros((4, 5))
    for i, s in enumerate([0.1, 0.4, 0.35, 0.8]):  # P(grade >= 2) split over grades 2-4
        proba[i, :2] = [(1 - s) / 2, (1 - s) / 2]
        proba[i, 2:] = s / 3
    np.testing.assert_allclose(referable_scores(proba), [0.1, 0.4, 0.35, 0.8])
    # positives (grade >= 2) score 0.35 and 0.8, negatives 0.1 and 0.4: 3 of 4 pairs ranked right.
    value, reason = referable_auroc(np.array([0, 1, 2, 3]), proba)
    assert value == pytest.approx(0.75) and reason is None
    value, reason = referable_auroc(np.array([0, 1, 0, 1]), proba)
    assert value is None and "only non-referable" in reason


def test_bootstrap_interval_contains_estimate_and_narrows_with_n() -> None:
    rng = np.random.default_rng(0)

    def width_and_check(n: int) -> float:
        t = rng.integers(0, 5, n)
        p = np.where(rng.random(n) < 0.7, t, rng.integers(0, 5, n))
        proba = np.eye(5)[p] * 0.9 + 0.02
        metrics, _ = evaluate_predictions(t, proba, indices=bootstrap_indices(n, 200, seed=0))
        for name in ("qwk", "balanced_accuracy", "auroc_referable"):
            e = metrics[name]
            assert e["low"] <= e["value"] <= e["high"], (name, e)
            assert e["n_valid_resamples"] == 200
        return metrics["qwk"]["high"] - metrics["qwk"]["low"]

    small, large = width_and_check(40), width_and_check(1000)
    assert large < small / 2.5  # ~ 1/sqrt(n): 25x the images, ~5x narrower


def test_bootstrap_is_seeded_and_skips_undefined_resamples() -> None:
    a, b, c = bootstrap_indices(10, 5, 3), bootstrap_indices(10, 5, 3), bootstrap_indices(10, 5, 4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    y = np.array([0] * 9 + [3])
    samples = bootstrap_samples(lambda idx: float(y[idx].mean()) if (y[idx] == 3).any() else None,
                                bootstrap_indices(10, 200, 0))
    lo, hi, n_valid = percentile_interval(samples)
    assert 0 < n_valid < 200  # resamples without the one grade-3 image are undefined and left out
    assert lo is not None and hi is not None and lo <= hi
    assert percentile_interval(np.full(4, np.nan)) == (None, None, 0)


def test_evaluate_predictions_degenerate_test_set() -> None:
    y = np.array([0, 0, 1, 1, 0])  # no grade 2-4: recall n/a for them, AUROC undefined
    proba = np.eye(5)[[0, 1, 1, 1, 0]]
    metrics, _ = evaluate_predictions(y, proba, indices=bootstrap_indices(5, 50, 0))
    for g in ("2", "3", "4"):
        assert metrics["recall"][g]["value"] is None and "absent" in metrics["recall"][g]["reason"]
    assert metrics["recall"]["0"]["value"] == pytest.approx(2 / 3)
    assert metrics["auroc_referable"]["value"] is None
    assert "non-referable" in metrics["auroc_referable"]["reason"]
    with pytest.raises(ValueError, match="proba must be"):
        evaluate_predictions(y, proba[:, :3], indices=bootstrap_indices(5, 5, 0))


# --------------------------------------------------------------------------------------------------
# Patient-level split


def test_split_by_group_keeps_patients_whole_and_is_seeded() -> None:
    groups = [f"p{i // 2}" for i in range(200)]  # 100 patients, two eyes each
    labels = np.array([(i // 2) % 5 for i in range(200)])
    is_test = split_by_group(labels, groups, 0.2, seed=7)
    test_p = {g for g, t in zip(groups, is_test, strict=True) if t}
    train_p = {g for g, t in zip(groups, is_test, strict=True) if not t}
    assert not test_p & train_p
    assert len(test_p) == 20
    assert set(labels[is_test]) == {0, 1, 2, 3, 4}  # stratified by grade
    assert np.array_equal(is_test, split_by_group(labels, groups, 0.2, seed=7))
    assert not np.array_equal(is_test, split_by_group(labels, groups, 0.2, seed=8))


def test_split_real_by_patient_when_zip_has_no_split(tmp_path: Path) -> None:
    labels = [0, 0, 1, 1, 2, 2, 0, 0, 3, 3, 4, 4, 0, 0, 2, 2, 0, 0, 1, 1]
    patients = [str(i // 2) for i in range(20)]
    ds = ZipImageDataset(_zip_dataset(tmp_path / "d.zip", labels, patients, None))
    split = split_real(ds, seed=0, test_fraction=0.3)
    assert split.method == "patient"
    test_p = {patients[i] for i in split.test}
    train_p = {patients[i] for i in split.train}
    assert test_p and train_p and not test_p & train_p
    assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(20))
    assert split.summary(ds.labels)["patients_in_both"] == 0


def test_split_real_uses_zip_split_and_drops_leaking_training_images(tmp_path: Path) -> None:
    # Patient "a" has one eye in test and one in train (a broken split): the train eye must go.
    labels = [0, 2, 0, 1, 2, 0]
    patients = ["a", "a", "b", "b", "c", "c"]
    splits = ["train", "test", "train", "train", "val", "val"]
    ds = ZipImageDataset(_zip_dataset(tmp_path / "leak.zip", labels, patients, splits))
    split = split_real(ds, seed=0)
    assert split.method == "dataset"
    assert split.test.tolist() == [1]
    assert split.train.tolist() == [2, 3, 4, 5]  # val joins train (no model selection); index 0 dropped
    assert split.dropped_for_leakage == 1


def test_split_real_refuses_unlabelled_dataset(tmp_path: Path) -> None:
    path = tmp_path / "nolabels.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dataset.json", json.dumps({"labels": None, "resolution": 16}))
        zf.writestr("00000/img00000000.png", _png(_fundus(0, 16, 0)))
    with pytest.raises(BadInputError, match="no DR grade labels"):
        split_real(ZipImageDataset(path))


# --------------------------------------------------------------------------------------------------
# Synthetic folder


def test_bad_manifest_rows_are_skipped_and_reported(tmp_path: Path) -> None:
    folder = tmp_path / "synth"
    rows = _synth_folder(folder, 3)
    (folder / "broken.png").write_bytes(b"this is not an image")
    (folder / "wide.png").write_bytes(_png(np.zeros((16, 24, 3), np.uint8)))
    (folder / "extra.png").write_bytes(_png(_fundus(0, 16, 99)))  # on disk, in no row
    sha = "ab" * 32
    bad = [
        [rows[0][0], "", "1", "0", "", sha],  # duplicate of a good row's file, but first: missing grade
        ["x1.png", "abc", "1", "0", "", sha],
        ["x2.png", "2.5", "1", "0", "", sha],
        ["x3.png", "7", "1", "0", "", sha],
        [rows[1][0], "1", "0", "0", "", sha],  # a real image (synthetic=0)
        ["../escape.png", "1", "1", "0", "", sha],
        ["/etc/passwd", "1", "1", "0", "", sha],
        [rows[2][0], "2", "1", "0", "", sha],  # duplicate file
        ["missing.png", "1", "1", "0", "", sha],
        ["broken.png", "1", "1", "0", "", sha],
        ["wide.png", "1", "1", "0", "", sha],
        ["short.png", "1"],
    ]
    _write_manifest(folder, rows + bad)
    s = load_synthetic_folder(folder, progress=False)
    assert [p.name for p in s.paths] == [r[0] for r in rows]
    assert s.labels.tolist() == [0, 1, 2]
    assert s.n_rows == 15 and len(s.skipped) == 12
    reasons = {r["file"]: r["reason"] for r in s.skipped if r["file"] not in {rows[0][0], rows[1][0], rows[2][0]}}
    assert "malformed grade" in reasons["x1.png"] and "malformed grade" in reasons["x2.png"]
    assert "outside 0-4" in reasons["x3.png"]
    assert "escapes" in reasons["../escape.png"] and "absolute" in reasons["/etc/passwd"]
    assert "does not exist" in reasons["missing.png"]
    assert "not an image" in reasons["broken.png"]
    assert "square" in reasons["wide.png"]
    assert "fields" in reasons["short.png"]
    by_line = {r["line"]: r["reason"] for r in s.skipped}
    assert "missing grade" in by_line[5]
    assert "synthetic=1" in by_line[9]
    assert "duplicate" in by_line[12]
    assert s.unlisted == 1  # extra.png
    assert s.checkpoints == [sha]
    assert s.summary()["n_skipped"] == 12


def test_synthetic_folder_whole_file_errors(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    with pytest.raises(BadInputError, match="no manifest.csv"):
        load_synthetic_folder(folder, progress=False)
    _write_manifest(folder, [["a.png", "1"]], header=["image", "level"])
    with pytest.raises(BadInputError, match="no 'file' column"):
        load_synthetic_folder(folder, progress=False)
    _write_manifest(folder, [["a.png", "1"]], header=["file", "label"])
    with pytest.raises(BadInputError, match="'level' or 'grade'"):
        load_synthetic_folder(folder, progress=False)
    _write_manifest(folder, [["a.png", "1", "1"]], header=["file", "grade", "synthetic"])
    with pytest.raises(BadInputError, match="no usable synthetic images"):
        load_synthetic_folder(folder, progress=False)
    with pytest.raises(BadInputError, match="does not exist"):
        load_synthetic_folder(tmp_path / "nowhere", progress=False)


# --------------------------------------------------------------------------------------------------
# Training, augmentation, predict_proba, save / load


@pytest.fixture(scope="module")
def tiny_grader(synth_zip_16: Path):
    ds = ZipImageDataset(synth_zip_16)
    data = GradedImages.from_zip(ds, np.arange(len(ds)), TINY.resolution)
    return train_grader(data, TINY, seed=0, progress=False), ds


def test_augmentation_never_mirrors_an_eye() -> None:
    x = torch.full((64, 3, 32, 32), -1.0)
    x[:, :, 12:20, 24:30] = 1.0  # a bright "disc" on the right
    cfg = GraderConfig()
    out = augment_batch(x, torch.Generator().manual_seed(0), cfg)
    w = (out + 1).sum(dim=(1, 2))  # [N, W]: brightness per column
    centroid = (w * torch.arange(32.0)).sum(1) / w.sum(1)
    assert (centroid > 20).all()  # stays right of centre in every sample
    assert not torch.allclose(out[0], out[1])  # the draws differ between images
    still = GraderConfig(max_rotation_deg=0, max_scale=0, max_shift=0, brightness=0, contrast=0)
    assert torch.allclose(augment_batch(x, torch.Generator().manual_seed(0), still), x, atol=1e-5)


def test_training_is_seeded(synth_zip_16: Path, tiny_grader) -> None:
    grader, ds = tiny_grader
    imgs = np.stack([ds.read_uint8(i) for i in range(8)]).transpose(0, 3, 1, 2)
    data = GradedImages.from_zip(ds, np.arange(len(ds)), TINY.resolution)
    again = train_grader(data, TINY, seed=0, progress=False)
    other = train_grader(data, TINY, seed=1, progress=False)
    p = predict_proba(grader, imgs)
    assert np.array_equal(p, predict_proba(again, imgs))
    assert not np.allclose(p, predict_proba(other, imgs))
    tr = grader.meta["training"]
    assert tr["steps"] == 6 and tr["n_images"] == len(ds) and tr["n_synthetic"] == 0


def test_streamed_training_equals_in_memory_training(synth_zip_16: Path, tiny_grader) -> None:
    grader, ds = tiny_grader  # trained with its images loaded into memory
    streamed = GradedImages.from_zip(ds, np.arange(len(ds)), TINY.resolution)
    g = train_grader(streamed, replace(TINY, cache_max_bytes=0), seed=0, progress=False)
    assert not streamed.loaded  # read from the ZIP batch by batch
    imgs = np.stack([ds.read_uint8(i) for i in range(len(ds))])
    assert np.array_equal(predict_proba(grader, imgs), predict_proba(g, imgs))


def test_predict_proba_shapes_layouts_and_errors(tiny_grader) -> None:
    grader, ds = tiny_grader
    imgs_hwc = np.stack([ds.read_uint8(i) for i in range(5)])  # [N, 16, 16, 3]
    p = predict_proba(grader, imgs_hwc.transpose(0, 3, 1, 2))
    assert p.shape == (5, 5) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    assert np.array_equal(p, predict_proba(grader, imgs_hwc))  # channel-last accepted too
    # Another batch size may pick another conv kernel: equal up to float rounding.
    np.testing.assert_allclose(p, predict_proba(grader, torch.from_numpy(imgs_hwc.transpose(0, 3, 1, 2)), batch_size=2),
                               atol=1e-6)
    big = np.repeat(np.repeat(imgs_hwc, 2, 1), 2, 2)  # 32 px input is resized to the grader's 16 px
    assert predict_proba(grader, big).shape == (5, 5)
    assert predict_proba(grader, np.zeros((0, 3, 16, 16), np.uint8)).shape == (0, 5)
    with pytest.raises(ValueError, match="uint8"):
        predict_proba(grader, imgs_hwc.astype(np.float32))
    with pytest.raises(ValueError, match="square"):
        predict_proba(grader, np.zeros((1, 3, 16, 20), np.uint8))


def test_save_load_round_trip_gives_identical_predictions(tmp_path: Path, tiny_grader) -> None:
    grader, ds = tiny_grader
    imgs = np.stack([ds.read_uint8(i) for i in range(len(ds))])
    path = save_grader(grader, tmp_path / "g")
    assert path.name == "g.safetensors" and path.with_suffix(".json").is_file()
    loaded = load_grader(path)
    assert (loaded.arch, loaded.resolution, loaded.num_classes) == (grader.arch, grader.resolution, 5)
    assert np.array_equal(predict_proba(grader, imgs), predict_proba(loaded, imgs))
    assert np.array_equal(predict_proba(loaded, imgs), predict_proba(load_grader(path.with_suffix(".json")), imgs))


def test_pickle_and_mismatched_checkpoints_are_refused(tmp_path: Path, tiny_grader) -> None:
    grader, _ = tiny_grader
    evil = tmp_path / "evil.safetensors"
    torch.save(grader.net.state_dict(), evil)  # a pickle (zip) wearing a safetensors name
    with pytest.raises(CheckpointError, match="refused: a pickle"):  # tmp_path holds "pickle" too
        load_grader(evil)
    with pytest.raises(CheckpointError, match="not found"):
        load_grader(tmp_path / "absent.safetensors")
    # Weights that do not fit the architecture the sidecar names.
    path = save_grader(grader, tmp_path / "g")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["arch"] = "densenet_small"
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match architecture"):
        load_grader(path)
    # A retinagen checkpoint of another kind.
    other = save_checkpoint(tmp_path / "gen", {"G.w": torch.zeros(2)}, {"config": {}})
    with pytest.raises(CheckpointError, match="not a DR grader"):
        load_grader(other)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="arch"):
        GraderConfig(arch="resnet")
    with pytest.raises(ConfigError, match="loss"):
        GraderConfig(loss="focal")
    with pytest.raises(ConfigError, match="resolution"):
        GraderConfig(resolution=8)
    with pytest.raises(ConfigError, match="unknown grader preset"):
        grader_config("huge")
    with pytest.raises(ConfigError, match="unknown grader config key"):
        grader_config("cpu", stepz=3)
    assert grader_config("gpu").arch == "densenet121" and grader_config("cpu").resolution == 32


# --------------------------------------------------------------------------------------------------
# End to end


def test_run_downstream_end_to_end(tmp_path: Path, synth_zip_16: Path) -> None:
    folder = tmp_path / "synth"
    rows = _synth_folder(folder, 10, res=32, seed=4)  # generator side 32 px, grader 16 px: resized
    _write_manifest(folder, rows + [["gone.png", "3", "1", "0", "", ""]])
    out = tmp_path / "out"
    report = run_downstream(synth_zip_16, folder, out, config=TINY, seed=0, n_bootstrap=30, progress=False)

    saved = json.loads((out / "REPORT.json").read_text())
    assert saved == report
    assert list(saved["arms"]) == list(ARMS)
    ds = ZipImageDataset(synth_zip_16)
    n_test = int((np.array([ds.meta["splits"][n] for n in ds.names]) == "test").sum())
    assert saved["split"]["method"] == "dataset" and saved["split"]["n_test"] == n_test
    assert saved["split"]["patients_in_both"] == 0
    arms = saved["arms"]
    n_real = saved["split"]["n_train"]
    assert (arms["real_only"]["n_train_real"], arms["real_only"]["n_train_synthetic"]) == (n_real, 0)
    assert (arms["real_plus_synthetic"]["n_train_real"], arms["real_plus_synthetic"]["n_train_synthetic"]) == (n_real, 10)
    assert (arms["synthetic_only"]["n_train_real"], arms["synthetic_only"]["n_train_synthetic"]) == (0, 10)
    for arm in ARMS:
        m = arms[arm]["metrics"]
        assert np.asarray(m["confusion_matrix"]).sum() == n_test
        for name in ("qwk", "balanced_accuracy"):
            e = m[name]
            assert e["value"] is None or e["low"] is not None
        png = out / arms[arm]["confusion_png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        g = load_grader(out / arms[arm]["grader_file"])
        assert g.meta["trained_on"]["arm"] == arm
    assert set(arms["real_plus_synthetic"]["delta_vs_real_only"]) == {"qwk", "balanced_accuracy", "auroc_referable"}
    assert saved["synthetic"]["kept"] == 10 and saved["synthetic"]["n_skipped"] == 1
    assert saved["synthetic"]["skipped"][0]["file"] == "gone.png"
    assert "plain cross-entropy" in saved["grader"]["loss"] and "no flips" in saved["grader"]["augmentation"]

    md = (out / "REPORT.md").read_text()
    for title in ("| real only |", "| real + synthetic |", "| synthetic only |"):
        assert title in md
    assert "](REPORT_files/confusion-real_only.png)" in md
    assert "gone.png" in md
    absent = [g for g, c in saved["split"]["test_counts"].items() if c == 0]
    assert absent and "n/a" in md  # this tiny test set lacks some grades: their recall is n/a
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_downstream_command(tmp_path: Path, synth_zip_16: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from retinagen.cli import main

    folder = tmp_path / "synth"
    _write_manifest(folder, _synth_folder(folder, 8, res=16, seed=2))
    base = ["downstream", "--real", str(synth_zip_16), "--preset", "smoke"]
    assert main([*base, "--synthetic", str(folder), "--out", str(tmp_path / "r.txt")]) == 2
    assert ".json" in capsys.readouterr().err
    assert main([*base, "--synthetic", str(tmp_path / "nope"), "--out", str(tmp_path / "R.json")]) == 2
    assert "nope" in capsys.readouterr().err
    out = tmp_path / "out" / "R.json"
    assert main([*base, "--synthetic", str(folder), "--out", str(out), "--n-bootstrap", "20", "--no-progress"]) == 0
    assert "real only" in capsys.readouterr().out.replace("_", " ")
    report = json.loads(out.read_text())
    assert list(report["arms"]) == list(ARMS)
    assert out.with_suffix(".md").is_file()
