"""Anomaly scoring (clinical/anomaly.py): features, scorers, calibration, files, evaluation, benchmark."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from clinical import anomaly as an
from retinagen.config import load_run_config, parse_overrides
from retinagen.data.dataset import ZipImageDataset
from retinagen.data.fundus import circular_mask, to_model_range
from retinagen.errors import CheckpointError, ConfigError, RetinagenError
from retinagen.generation import LoadedModel, generate_images, load_model
from retinagen.training.loop import train
from tests.outputs import leaks
from tests.retinagen.data import dicom_fixtures as dfx

# Tiny f-AnoGAN settings: the behaviour under test, not its quality.
FANOGAN_FAST = {"steps": 2, "encoder_samples": 64, "scale_images": 8}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """16 px models: intra-op threads only add synchronisation on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _smoke_run(data: Path, out: Path, *extra: str) -> Path:
    cfg = load_run_config(
        "synthfundus", preset="smoke", overrides=parse_overrides([f"data.path={data}", *extra])
    )
    train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def run_dir(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _smoke_run(synth_zip_16, tmp_path_factory.mktemp("anomaly") / "run")


@pytest.fixture(scope="module")
def model(run_dir: Path) -> LoadedModel:
    return load_model(run_dir, with_discriminator=True)


@pytest.fixture(scope="module")
def normals(synth_zip_16: Path) -> torch.Tensor:
    """Every grade-0 image of the tiny dataset, [N, 3, 16, 16] in [-1, 1]."""
    ds = ZipImageDataset(synth_zip_16)
    return torch.stack([to_model_range(ds.read_uint8(int(i))) for i in np.flatnonzero(ds.labels == 0)])


@pytest.fixture(scope="module")
def scorers(model: LoadedModel, synth_zip_16: Path) -> dict[str, an.AnomalyScorer]:
    return {
        "mahalanobis": an.fit_scorer(model, synth_zip_16),
        "knn": an.fit_scorer(model, synth_zip_16, method="knn", options={"k": 3}),
        "fanogan": an.fit_scorer(model, synth_zip_16, method="fanogan", options=FANOGAN_FAST),
    }


def _shifted(n: int, res: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images far from any fundus: flat mid-grey and uniform noise, [n, 3, res, res] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return {"gray": torch.zeros(n, 3, res, res), "noise": torch.rand(n, 3, res, res, generator=g) * 2 - 1}


# --------------------------------------------------------------------------------------------------- features


def test_features_are_named_per_scale_and_code_and_do_not_depend_on_the_batch(
    model: LoadedModel, normals: torch.Tensor
) -> None:
    ex = an.FeatureExtractor(model, batch_size=5)
    names = [g.name for g in ex.groups]
    assert names[:2] == ["D:rgb@16px", "D@16px"] and "D@8px" in names and "D@4px" in names and "D:h" in names
    assert names[-model.spec.n_codes :] == [f"Q:c{i}" for i in range(model.spec.n_codes)]
    assert ex.groups[-1].stop == ex.dim and all(
        a.stop == b.start for a, b in zip(ex.groups[:-1], ex.groups[1:], strict=True)
    )
    # Q:c0 is categorical(3): three log-probabilities that exponentiate to one.
    q0 = next(g for g in ex.groups if g.name == "Q:c0")
    batch = ex(normals[:7])
    assert batch.shape == (7, ex.dim) and np.isfinite(batch).all()
    np.testing.assert_allclose(np.exp(batch[:, q0.start : q0.stop]).sum(axis=1), 1.0, rtol=1e-5)
    # Minibatch stddev is made per-image: one at a time == in a batch of 5 == in a batch of 7.
    single = np.concatenate([ex(normals[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(batch, single, rtol=1e-4, atol=1e-5)
    assert model.D is not None and model.D.mbstd.group_size == model.cfg.model.mbstd_group  # restored


def test_a_checkpoint_without_discriminator_is_refused(run_dir: Path) -> None:
    g_only = load_model(run_dir, with_discriminator=False)
    with pytest.raises(CheckpointError, match="no discriminator"):
        an.FeatureExtractor(g_only)


# ------------------------------------------------------------------------------------------ density methods


def test_mahalanobis_matches_the_closed_form_on_a_gaussian() -> None:
    rng = np.random.default_rng(0)
    d = 4
    mu = np.array([1.0, -2.0, 0.5, 3.0])
    a = rng.normal(size=(d, d))
    cov = a @ a.T + 0.5 * np.eye(d)
    x = rng.multivariate_normal(mu, cov, size=20000)
    ctx = an.ScoringContext.from_features(x)
    m = an.build_method("mahalanobis")
    m.fit(x, torch.zeros(0), ctx)
    q = rng.multivariate_normal(mu, cov, size=2000)
    s = m.score(q, torch.zeros(0), ctx)
    # Exact: squared distance under the Ledoit-Wolf estimate of the standardised features.
    z = (q - x.mean(0)) / x.std(0)
    lw = LedoitWolf().fit((x - x.mean(0)) / x.std(0))
    dz = z - lw.location_
    np.testing.assert_allclose(s, np.einsum("ij,jk,ik->i", dz, np.linalg.inv(lw.covariance_), dz), rtol=1e-8)
    # Population closed form (n >> d: shrinkage ~0): (q - mu)^T Sigma^-1 (q - mu), chi-square(d) mean d.
    true = np.einsum("ij,jk,ik->i", q - mu, np.linalg.inv(cov), q - mu)
    np.testing.assert_allclose(s, true, rtol=0.05, atol=0.05)
    assert s.mean() == pytest.approx(d, rel=0.08)
    assert m.score(mu[None] + 10 * np.sqrt(np.diag(cov))[None], torch.zeros(0), ctx)[0] > 50


def test_knn_is_the_mean_distance_to_the_k_nearest_standardised_references() -> None:
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    ctx = an.ScoringContext(mean=np.zeros(2), sd=np.ones(2))
    m = an.build_method("knn", {"k": 2})
    m.fit(ref, torch.zeros(0), ctx)
    s = m.score(np.array([[0.0, 0.0], [10.0, 10.0]]), torch.zeros(0), ctx)
    far = (np.hypot(5, 5) + np.hypot(9, 10)) / 2  # nearest two to (10, 10): (5, 5) and (1, 0)/(0, 1)
    np.testing.assert_allclose(s, np.array([0.5, far]) / np.sqrt(2))
    with pytest.raises(RetinagenError, match="k = 5"):
        an.build_method("knn", {"k": 5}).fit(ref, torch.zeros(0), ctx)


def test_bad_scorer_names_and_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown anomaly scorer 'nope'.*knn"):
        an.build_method("nope")
    with pytest.raises(ConfigError, match="k must be"):
        an.build_method("knn", {"k": 0})
    with pytest.raises(ConfigError, match="bad options"):
        an.build_method("mahalanobis", {"shrink": 1})
    with pytest.raises(ConfigError, match="kappa"):
        an.build_method("fanogan", {"kappa": -1.0})
    assert set(an.SCORERS) >= {"mahalanobis", "knn", "fanogan"}


# -------------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(("n", "fpr"), [(1000, 0.05), (200, 0.01), (37, 0.1), (10, 0.05)])
def test_threshold_gives_the_requested_false_positive_rate(n: int, fpr: float) -> None:
    scores = np.random.default_rng(n).normal(size=n)
    t = an.calibrate_threshold(scores, fpr)
    rate = float((scores > t).mean())
    assert fpr - 1.0 / n < rate <= fpr + 1e-12
    with pytest.raises(ConfigError):
        an.calibrate_threshold(scores, 0.0)


def test_fitted_scorer_flags_about_fpr_of_its_calibration_normals(
    scorers: dict[str, an.AnomalyScorer], normals: torch.Tensor
) -> None:
    for s in scorers.values():
        n_cal = s.info["n_calibration"]
        assert s.info["calibration_fpr"] <= s.fpr and s.info["calibration_fpr"] > s.fpr - 1.0 / n_cal
        # Only grade 0 is used, split 3:1 into fit and held-out calibration images.
        assert s.info["normals"] == "grades [0]" and s.info["n_fit"] + n_cal == normals.shape[0]
        assert n_cal == round(0.25 * normals.shape[0]) and len(s.calibration_scores) == n_cal
        # The percentile of the threshold itself is the share of calibration normals at or below it.
        assert s.percentile(np.array([s.threshold]))[0] == pytest.approx(
            100 * (1 - s.info["calibration_fpr"])
        )


def test_shifted_inputs_score_higher_than_normals(
    model: LoadedModel, normals: torch.Tensor, scorers: dict[str, an.AnomalyScorer]
) -> None:
    for name in ("mahalanobis", "knn"):
        scorer = scorers[name]
        normal = scorer.score_images(model, normals).score
        for kind, imgs in _shifted(6, model.resolution).items():
            batch = scorer.score_images(model, imgs)
            assert batch.score.min() > np.median(normal), (name, kind)
            assert batch.flagged.all() and (batch.percentile == 100.0).all(), (name, kind)


def test_fanogan_reconstructs_what_its_generator_can_draw_and_not_the_rest(model: LoadedModel) -> None:
    """f-AnoGAN needs a generator of normal eyes; an 8-step smoke G draws blobs, not eyes, so the normals
    here are its own grade-0 samples (in its range by construction) and the anomalies grey / noise."""
    u8, _ = generate_images(model, 40, seed=1, grade=0)
    drawn = torch.stack([to_model_range(u) for u in u8])
    scorer = an.fit_scorer_on_images(
        model, drawn[:28], method="fanogan", options={"steps": 5, "encoder_samples": 256, "scale_images": 16}
    )
    held = scorer.score_images(model, drawn[28:]).score
    for kind, imgs in _shifted(6, model.resolution).items():
        assert scorer.score_images(model, imgs).score.min() > np.median(held), kind
    # More refinement steps lower a drawable image's residual (the inversion works).
    method = scorer.method
    assert isinstance(method, an.FanoganMethod)
    ctx = scorer.context(model)
    feats = ctx.need_model()[1](drawn[28:])
    errs = []
    for steps in (0, 10):
        method.steps = steps
        errs.append(float(((method.reconstruct(feats, drawn[28:], ctx) - drawn[28:]) ** 2).mean()))
    assert errs[1] < errs[0]


def test_top_features_name_the_group_that_moved() -> None:
    groups = (an.FeatureGroup("D@16px", 0, 3), an.FeatureGroup("Q:c0", 3, 4), an.FeatureGroup("Q:c1", 4, 5))
    scorer = an.AnomalyScorer(
        method=an.build_method("mahalanobis"),
        checkpoint_sha256="x",
        checkpoint_path="",
        resolution=16,
        ben_graham=False,
        groups=groups,
        feat_mean=np.zeros(5),
        feat_sd=np.ones(5) * 2,
        calibration_scores=np.arange(10.0),
        threshold=8.0,
        fpr=0.1,
    )
    feats = np.array([[0, 0, 0, 0, 9.0], [4, 4, 4, 2, 0]])
    top = scorer.top_features(feats, k=2)
    assert top[0][0] == ("Q:c1", 4.5) and top[1][0] == ("D@16px", 2.0) and top[1][1] == ("Q:c0", 1.0)


def test_fit_refuses_bad_inputs(model: LoadedModel, synth_zip_16: Path, normals: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="fpr"):
        an.fit_scorer_on_images(model, normals, fpr=1.5)
    with pytest.raises(RetinagenError, match="at least 4"):
        an.fit_scorer_on_images(model, normals[:3])
    with pytest.raises(RetinagenError, match="only 0 normal images"):
        an.fit_scorer(model, synth_zip_16, normal_grades=(7,))
    with pytest.raises(RetinagenError, match="does not exist"):
        an.fit_scorer(model, synth_zip_16.parent / "missing.zip")


# ------------------------------------------------------------------------------------------ scorer files


def test_save_load_round_trip_gives_identical_scores(
    model: LoadedModel, normals: torch.Tensor, scorers: dict[str, an.AnomalyScorer], tmp_path: Path
) -> None:
    imgs = torch.cat([normals[:4], _shifted(2, model.resolution)["noise"]])
    for name, scorer in scorers.items():
        meta_path = scorer.save(tmp_path / name)
        assert meta_path == tmp_path / f"{name}.json" and (tmp_path / f"{name}.safetensors").is_file()
        meta = json.loads(meta_path.read_text())
        assert meta["scorer"] == name and meta["checkpoint_sha256"] == model.sha256 and meta["fpr"] == 0.05
        assert meta["feature_groups"][0][0] == "D:rgb@16px" and meta["version"] == an.SCORER_VERSION
        loaded = an.load_scorer(tmp_path / f"{name}.safetensors", model)
        a, b = scorer.score_images(model, imgs), loaded.score_images(model, imgs)
        np.testing.assert_array_equal(a.score, b.score)
        np.testing.assert_array_equal(a.percentile, b.percentile)
        assert (
            a.top == b.top
            and loaded.threshold == scorer.threshold
            and loaded.method.options() == scorer.method.options()
        )
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_pickles_and_tampered_scorer_files_are_refused(
    scorers: dict[str, an.AnomalyScorer], tmp_path: Path
) -> None:
    scorers["mahalanobis"].save(tmp_path / "s")
    torch.save({"threshold": 1.0}, tmp_path / "evil.safetensors")  # a pickle (zip) under a safetensors name
    shutil.copy(tmp_path / "s.json", tmp_path / "evil.json")
    with pytest.raises(CheckpointError, match="refused: a pickle"):  # tmp_path holds "pickle" too
        an.load_scorer(tmp_path / "evil")
    meta = json.loads((tmp_path / "s.json").read_text())
    meta["tensors_sha256"] = "0" * 64
    (tmp_path / "s.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        an.load_scorer(tmp_path / "s.json")
    (tmp_path / "s.json").unlink()
    with pytest.raises(CheckpointError, match="metadata file s.json is missing"):
        an.load_scorer(tmp_path / "s")


def test_a_scorer_refuses_another_checkpoint(
    scorers: dict[str, an.AnomalyScorer], normals: torch.Tensor, synth_zip_16: Path, tmp_path: Path
) -> None:
    other = load_model(_smoke_run(synth_zip_16, tmp_path / "other", "train.seed=1"))
    scorers["mahalanobis"].save(tmp_path / "s")
    with pytest.raises(CheckpointError, match="fitted on checkpoint sha256"):
        an.load_scorer(tmp_path / "s", other)
    loaded = an.load_scorer(tmp_path / "s")  # without a model it loads ...
    with pytest.raises(CheckpointError, match="fitted on checkpoint sha256"):
        loaded.score_images(other, normals[:2])  # ... and refuses when used with the wrong one
    with pytest.raises(CheckpointError, match="fitted on checkpoint sha256"):
        an.load_scorer_model(loaded, other.path)


# ------------------------------------------------------------------------------------------- file inputs


@pytest.fixture(scope="module")
def input_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    fundus = d / "eye.png"
    cv2.imwrite(str(fundus), dfx.retina_rgb(128)[:, :, ::-1])
    face = (__import__("skimage.data", fromlist=["lfw_subset"]).lfw_subset()[0] * 255).astype(np.uint8)
    cv2.imwrite(str(d / "face.png"), cv2.resize(face, (128, 128), interpolation=cv2.INTER_CUBIC))
    (d / "notes.png").write_text("this is not an image\n")
    (d / "empty.jpg").write_bytes(b"")
    (d / "cut.png").write_bytes(fundus.read_bytes()[:300])
    return {
        "fundus": fundus,
        "face": d / "face.png",
        "text": d / "notes.png",
        "empty": d / "empty.jpg",
        "truncated": d / "cut.png",
        "missing": d / "missing.png",
        "dicom8": dfx.op8_rgb(d / "op8.dcm"),
        "dicom12": dfx.op16_rgb_12bit(d / "op12.dcm"),
        "ct": dfx.ct_image(d / "ct.dcm"),
    }


def test_scoring_files_flags_no_fundus_reports_bad_files_and_goes_on(
    model: LoadedModel, scorers: dict[str, an.AnomalyScorer], input_files: dict[str, Path], tmp_path: Path
) -> None:
    order = ["fundus", "text", "face", "empty", "dicom8", "truncated", "missing", "ct", "dicom12"]
    scorer = scorers["mahalanobis"]
    results = an.score_files(scorer, model, [input_files[k] for k in order], batch_size=4, progress=False)
    by = dict(zip(order, results, strict=True))
    assert [r.file for r in results] == [str(input_files[k]) for k in order]
    for k in ("fundus", "dicom8", "dicom12"):
        assert (
            by[k].flag in ("normal", "anomaly") and np.isfinite(by[k].score) and len(by[k].top_features) == 3
        )
    # The same eye as PNG, 8-bit DICOM and 12-bit DICOM reads (almost) the same: the DICOM path scales by
    # the stored bit depth.
    assert by["dicom8"].score == pytest.approx(by["dicom12"].score, rel=0.2)
    assert by["face"].flag == "no_fundus" and by["face"].score is None and "no fundus" in by["face"].reason
    assert by["text"].flag == "unreadable" and "text" in by["text"].reason
    assert by["empty"].flag == "unreadable" and "empty" in by["empty"].reason
    assert by["truncated"].flag == "unreadable" and by["truncated"].reason
    assert by["missing"].flag == "unreadable" and "does not exist" in by["missing"].reason
    assert by["ct"].flag == "unreadable" and by["ct"].reason
    out = an.write_scores_csv(results, tmp_path / "scores.csv", scorer.threshold)
    rows = list(csv.DictReader(out.open()))
    assert [r["flag"] for r in rows] == [r.flag for r in results]
    assert rows[0]["score"] and rows[0]["top_features"].count("=") == 3 and rows[2]["score"] == ""
    assert not leaks([out], dfx.PHI_STRINGS)  # no DICOM header value reaches the CSV


def test_folders_are_expanded_to_image_and_dicom_files(input_files: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    shutil.copy(input_files["fundus"], d / "a.png")
    shutil.copy(input_files["dicom8"], d / "sub" / "IM0001")  # DICOM without extension: sniffed
    (d / "readme.txt").write_text("x")
    assert an.expand_inputs([d, tmp_path / "nope.png"]) == [
        d / "a.png",
        d / "sub" / "IM0001",
        tmp_path / "nope.png",
    ]


# ------------------------------------------------------------------------------------------- evaluation


def test_detection_metrics_on_separable_and_refused_scores() -> None:
    m = an.detection_metrics(np.array([0.0, 1.0, 2.0]), np.array([3.0, 4.0, np.inf]), threshold=2.5)
    assert m["auroc"] == 1.0 and m["aupr"] == 1.0 and m["f1"] == 1.0 and m["tpr"] == 1.0 and m["fpr"] == 0.0
    m = an.detection_metrics(np.array([0.0, 5.0]), np.array([1.0, 2.0]), threshold=10.0)
    assert m["auroc"] == 0.5 and m["f1"] == 0.0 and m["tpr"] == 0.0
    assert an.detection_metrics(np.array([1.0]), np.array([]), 0.0)["auroc"] is None


def test_evaluate_reports_auroc_one_on_a_separable_case(
    model: LoadedModel,
    normals: torch.Tensor,
    scorers: dict[str, an.AnomalyScorer],
    input_files: dict[str, Path],
) -> None:
    scorer = scorers["mahalanobis"]
    shifted = _shifted(8, model.resolution)
    report = an.evaluate(scorer, normals, torch.cat(list(shifted.values())), model=model, progress=False)
    m = report["metrics"]
    assert (
        m["auroc"] == 1.0 and m["aupr"] == 1.0 and m["n_normal"] == normals.shape[0] and m["n_abnormal"] == 16
    )
    assert m["tpr"] == 1.0 and 0.0 < m["f1"] <= 1.0
    # Files: the face is refused by the FOV detector and counts as flagged; the text file is left out.
    files = an.evaluate(
        scorer,
        [input_files["fundus"]],
        [input_files["face"], input_files["text"]],
        model=model,
        progress=False,
    )
    assert files["abnormal"]["n_no_fundus"] == 1 and files["abnormal"]["unreadable"][0]["file"].endswith(
        "notes.png"
    )
    assert files["metrics"]["auroc"] == 1.0 and files["metrics"]["n_abnormal"] == 1


def test_corruptions_change_the_image_as_described() -> None:
    r = 32
    yy, xx = np.mgrid[0:r, 0:r]
    stripes = np.where((xx // 2) % 2 == 0, 80, 120).astype(np.uint8)  # mean 100, texture for the blur
    img = (np.repeat(stripes[:, :, None], 3, axis=2) * circular_mask(r, r)[:, :, None]).astype(np.uint8)
    rng = np.random.default_rng(0)
    inside = circular_mask(r, r)
    for kind, gain in (("overexposed", 2.2), ("underexposed", 0.35)):
        expected = np.clip(img.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(an.corrupt_fundus(img, kind, rng)[inside], expected[inside])
    assert (an.corrupt_fundus(img, "overexposed", rng)[~inside] == 0).all()  # the mask is kept
    occluded = an.corrupt_fundus(img, "occlusion", rng)
    assert 0.1 < (occluded[inside] == 0).all(axis=1).mean() < 0.3
    row = slice(r // 4, 3 * r // 4)
    assert an.corrupt_fundus(img, "blur", rng)[r // 2, row].std() < 0.2 * img[r // 2, row].std()
    with pytest.raises(ConfigError, match="unknown corruption"):
        an.corrupt_fundus(img, "rain", rng)


def test_benchmark_reports_auroc_per_type_and_scorer(run_dir: Path, synth_zip_16: Path) -> None:
    result = an.run_benchmark(
        run_dir,
        synth_zip_16,
        scorers=("mahalanobis", "knn"),
        options={"knn": {"k": 3}},
        max_per_type=6,
        progress=False,
    )
    types = ["referable_dr", "blur", "overexposed", "underexposed", "occlusion", "faces", "natural"]
    for s in ("mahalanobis", "knn"):
        assert list(result["results"][s]) == types
        for t in types:
            assert 0.0 <= result["results"][s][t]["auroc"] <= 1.0
        assert (
            "auroc_forced" in result["results"][s]["faces"] and result["timing"][s]["score_ms_per_image"] > 0
        )
    refused = result["counts"]["refused_by_fov_detector"]
    assert result["counts"]["faces"] == 6 and refused["faces"] == 6  # every enlarged LFW face is refused
    assert result["results"]["mahalanobis"]["faces"]["auroc"] == 1.0  # refused = flagged, ranked above all
    json.dumps(result)  # JSON-able
    md = an.benchmark_markdown(result)
    assert md.count("\n| ") >= len(types) + 2 and "Referable DR" in md and "6 (6 refused)" in md


def test_scorer_context_rejects_a_feature_layout_change(
    model: LoadedModel, scorers: dict[str, an.AnomalyScorer]
) -> None:
    broken = dataclasses.replace(scorers["mahalanobis"], groups=scorers["mahalanobis"].groups[:-1])
    with pytest.raises(CheckpointError, match="feature layout"):
        broken.context(model)


def test_anomaly_commands_fit_score_evaluate(
    run_dir: Path, synth_zip_16: Path, input_files: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from retinagen.cli import main

    scorer = tmp_path / "scorer"
    assert main(["anomaly", "fit", "--checkpoint", str(run_dir), "--data", str(synth_zip_16), "--out", str(scorer),
                 "--normal-grades", "all"]) == 0
    capsys.readouterr()
    assert scorer.with_suffix(".json").is_file() and scorer.with_suffix(".safetensors").is_file()
    csv_out = tmp_path / "scores.csv"
    files = [input_files[k] for k in ("fundus", "face", "text", "dicom8")]
    assert main(["anomaly", "score", "--scorer", str(scorer), *map(str, files), "--out", str(csv_out)]) == 0
    assert "1 with no detectable fundus" in capsys.readouterr().out
    rows = {Path(r["file"]).name: r for r in csv.DictReader(csv_out.open())}
    assert rows["face.png"]["flag"] == "no_fundus" and rows["notes.png"]["flag"] == "unreadable"
    assert rows["eye.png"]["flag"] in ("normal", "anomaly") and float(rows["eye.png"]["score"]) >= 0
    normal, abnormal = tmp_path / "normal", tmp_path / "abnormal"
    normal.mkdir(), abnormal.mkdir()
    shutil.copy(input_files["fundus"], normal / "eye.png")
    shutil.copy(input_files["dicom8"], normal / "eye.dcm")
    shutil.copy(input_files["face"], abnormal / "face.png")
    report = tmp_path / "REPORT.json"
    assert main(["anomaly", "evaluate", "--scorer", str(scorer), "--normal", str(normal), "--abnormal",
                 str(abnormal), "--out", str(report)]) == 0
    assert json.loads(report.read_text())["metrics"]["auroc"] == 1.0  # the face is refused = flagged
    assert main(["anomaly", "score", "--scorer", str(tmp_path / "nope"), str(files[0]), "--out", str(csv_out)]) == 2
    assert "nope" in capsys.readouterr().err
