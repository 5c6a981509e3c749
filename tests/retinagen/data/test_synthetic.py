"""Tests for the procedural synthetic fundus generator (retinagen.data.synthetic)."""

from __future__ import annotations

import csv
import json
from dataclasses import fields, replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import retinagen.data.synth_factors as synth_factors
import retinagen.data.synth_render as synth_render
import retinagen.data.synthetic as synth
from retinagen.data.synthetic import (
    DEFAULT_GRADE_PROBS,
    FACTOR_RANGES,
    FundusFactors,
    crop_to_frame,
    make_sample_grid,
    plan_dataset,
    read_factors_csv,
    render_fundus,
    sample_factors,
    sample_patient_factors,
    write_synth_dataset,
)
from retinagen.errors import RetinagenError

R = 96  # big enough for lesions/vessels to cover whole pixels, small enough to be fast


def _base(seed: int = 7, **overrides: object) -> FundusFactors:
    """A grade-0 right eye with mid-range settings; ``overrides`` replace single factors."""
    f = sample_factors(np.random.default_rng(seed), laterality="right", grade=0)
    f = replace(f, pigmentation=0.4, glare=0.0, brightness=0.5, fov_radius=0.9, fov_cut=0.0, notch=0)
    return replace(f, **overrides)


def _fov(img: np.ndarray) -> np.ndarray:
    return img.max(axis=-1) > 0


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------------
# Factors


def test_factor_ranges_cover_every_row_key_and_samples_stay_inside() -> None:
    rng = np.random.default_rng(0)
    rows = [sample_factors(rng).as_row() for _ in range(500)]
    assert list(rows[0]) == list(FACTOR_RANGES)
    for name, (lo, hi) in FACTOR_RANGES.items():
        values = np.array([r[name] for r in rows], dtype=np.float64)
        assert lo <= values.min() and values.max() <= hi, name
    # Continuous factors are spread over their range, not stuck at one value.
    for name in ("pigmentation", "glare", "brightness", "tigroid", "vessel_density", "fov_radius", "disc_y"):
        values = np.array([r[name] for r in rows])
        lo, hi = FACTOR_RANGES[name]
        assert values.std() > 0.2 * (hi - lo), name
    assert {r["laterality"] for r in rows} == {0, 1}
    assert all(r["lesion_count"] == 0 for r in rows if r["grade"] == 0)


def test_factors_are_sampled_independently() -> None:
    rng = np.random.default_rng(1)
    rows = [sample_factors(rng).as_row() for _ in range(1500)]
    names = [
        "pigmentation",
        "tigroid",
        "glare",
        "brightness",
        "fov_radius",
        "vessel_density",
        "vessel_contrast",
    ]
    m = np.array([[r[k] for k in names] for r in rows])
    corr = np.corrcoef(m, rowvar=False)
    off = corr[~np.eye(len(names), dtype=bool)]
    assert np.abs(off).max() < 0.1  # ~3.9 standard errors for n = 1500
    abs_disc_x = np.array([abs(r["disc_x"]) for r in rows])
    lat = np.array([r["laterality"] for r in rows])
    assert abs(np.corrcoef(abs_disc_x, lat)[0, 1]) < 0.1
    assert np.all(np.sign([r["disc_x"] for r in rows]) == np.where(lat == 1, 1, -1))  # disc is nasal


def test_grade_distribution_follows_probs() -> None:
    rng = np.random.default_rng(2)
    n = 2000
    grades = np.array([sample_factors(rng).grade for _ in range(n)])
    observed = np.bincount(grades, minlength=5)
    expected = np.array(DEFAULT_GRADE_PROBS) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001
    custom = (0.0, 0.5, 0.0, 0.5, 0.0)
    grades = {sample_factors(rng, custom).grade for _ in range(200)}
    assert grades == {1, 3}


def test_lesion_load_grows_with_grade() -> None:
    mean_load = []
    for g in range(5):
        rng = np.random.default_rng(3)
        mean_load.append(np.mean([sample_factors(rng, grade=g).lesion_count for _ in range(200)]))
    assert mean_load[0] == 0
    assert all(a < b for a, b in zip(mean_load, mean_load[1:], strict=False))
    f4 = sample_factors(np.random.default_rng(4), grade=4)
    assert f4.neovascular_tufts >= 1 and f4.microaneurysms >= 1
    assert sample_factors(np.random.default_rng(4), grade=3).neovascular_tufts == 0


def test_fixing_grade_or_laterality_keeps_the_other_factors() -> None:
    a = sample_factors(np.random.default_rng(5), grade=0)
    b = sample_factors(np.random.default_rng(5), grade=4)
    same = {f.name for f in fields(FundusFactors)} - {"grade", *synth_factors.LESION_TYPES}
    assert all(getattr(a, k) == getattr(b, k) for k in same)


def test_patients_have_two_correlated_eyes() -> None:
    rng = np.random.default_rng(6)
    pairs = [sample_patient_factors(rng) for _ in range(400)]
    for left, right in pairs:
        assert (left.laterality, right.laterality) == ("left", "right")
        assert left.disc_x < 0 < right.disc_x
        assert (
            left.fov_radius == right.fov_radius
            and left.fov_cut == right.fov_cut
            and left.notch == right.notch
        )
        assert abs(left.pigmentation - right.pigmentation) < 0.2
    pig = np.array([[a.pigmentation, b.pigmentation] for a, b in pairs])
    grades = np.array([[a.grade, b.grade] for a, b in pairs])
    assert np.corrcoef(pig.T)[0, 1] > 0.95
    assert np.corrcoef(grades.T)[0, 1] > 0.5
    assert len(sample_patient_factors(rng, n_eyes=1)) == 1


def test_factors_validate_and_round_trip_through_rows() -> None:
    f = _base()
    assert FundusFactors.from_row({k: str(v) for k, v in f.as_row().items()}) == f
    with pytest.raises(RetinagenError, match="glare"):
        replace(f, glare=1.5)
    with pytest.raises(ValueError, match="disc_x"):
        replace(f, disc_x=-0.5)  # a right eye's disc is right of centre
    with pytest.raises(RetinagenError, match="microaneurysms"):
        replace(f, microaneurysms=3)  # grade 0 has no lesions
    with pytest.raises(RetinagenError, match="laterality"):
        replace(f, laterality="both")
    with pytest.raises(RetinagenError, match="laterality"):
        sample_factors(np.random.default_rng(0), laterality="up")
    with pytest.raises(RetinagenError, match="grade"):
        sample_factors(np.random.default_rng(0), grade=5)


# --------------------------------------------------------------------------------------------------
# Rendering


def test_render_shape_dtype_black_surround_and_determinism() -> None:
    f = sample_factors(np.random.default_rng(11), grade=3)
    for res in (16, 64, 97):
        img = render_fundus(f, res)
        assert img.shape == (res, res, 3) and img.dtype == np.uint8
    img = render_fundus(f, R)
    assert np.array_equal(img, render_fundus(f, R))
    c = np.arange(R) + 0.5 - R / 2
    outside = np.hypot(c[None, :], c[:, None]) > f.fov_radius * R / 2 + 1
    assert img[outside].max() == 0
    assert img[R // 2, R // 2].max() > 0
    other = replace(f, texture_seed=f.texture_seed + 1)
    assert not np.array_equal(img, render_fundus(other, R))


def test_render_looks_like_a_fundus() -> None:
    f = _base(glare=0.0, brightness=0.5, pigmentation=0.2)
    img = render_fundus(f, 128).astype(np.float64)
    inside = _fov(img)
    mean = img[inside].mean(axis=0)
    assert mean[0] > 1.6 * mean[1] > mean[2]  # orange-red: R >> G > B
    # The optic disc (nasal, right of centre for a right eye) is the brightest region.
    lum = img.sum(axis=-1)
    ys, xs = np.nonzero(lum >= np.percentile(lum[inside], 99.5))
    cx, cy = (xs.mean() + 0.5) / 64 - 1, (ys.mean() + 0.5) / 64 - 1
    assert abs(cx - f.disc_x) < 0.1 and abs(cy - f.disc_y) < 0.1
    # The macula, temporal to the disc, is darker than the mid-periphery around it.
    mx, my = synth_render._anatomy(f)[1]
    px = lambda v: int((v + 1) * 64)  # noqa: E731
    macula = img[px(my) - 3 : px(my) + 4, px(mx) - 3 : px(mx) + 4, 1].mean()
    ring = img[px(my) - 25 : px(my) - 15, px(mx) - 5 : px(mx) + 5, 1].mean()
    assert macula < ring
    # Left eye: disc on the left.
    left = replace(f, laterality="left", disc_x=-f.disc_x)
    lum = render_fundus(left, 128).astype(np.float64).sum(axis=-1)
    ys, xs = np.nonzero(lum >= np.percentile(lum[inside], 99.5))
    assert (xs.mean() + 0.5) / 64 - 1 < -0.2


@pytest.mark.parametrize("seed", [7, 8])
def test_each_factor_moves_the_image_in_its_direction(seed: int) -> None:
    def mean_rgb(f: FundusFactors) -> np.ndarray:
        img = render_fundus(f, R).astype(np.float64)
        return img[_fov(img)].mean(axis=0)

    # Pigmentation: darker fundus (lower red and green), monotonically.
    means = [mean_rgb(_base(seed, pigmentation=p)) for p in (0.0, 0.5, 1.0)]
    assert means[0][0] > means[1][0] > means[2][0] and means[0][1] > means[1][1] > means[2][1]

    # Brightness: brighter overall, monotonically.
    lum = [mean_rgb(_base(seed, brightness=b)).sum() for b in (0.0, 0.5, 1.0)]
    assert lum[0] < lum[1] < lum[2]

    # Glare: more near-white pixels.
    def near_white(f: FundusFactors) -> int:
        return int((render_fundus(f, R).min(axis=-1) > 190).sum())

    whites = [near_white(_base(seed, glare=g)) for g in (0.0, 0.5, 1.0)]
    assert whites[0] < whites[1] < whites[2]

    # Field of view: a bigger radius shows more, a frame cut and the notch show less.
    def area(f: FundusFactors) -> int:
        return int(_fov(render_fundus(f, R)).sum())

    assert (
        area(_base(seed, fov_radius=0.8))
        < area(_base(seed, fov_radius=0.9))
        < area(_base(seed, fov_radius=1.0))
    )
    assert area(_base(seed, fov_cut=0.3)) < area(_base(seed, fov_cut=0.1)) < area(_base(seed, fov_cut=0.0))
    assert area(_base(seed, notch=1)) < area(_base(seed, notch=0))

    # Vessels: a denser or higher-contrast tree darkens the green channel (vessels absorb green).
    g = [mean_rgb(_base(seed, vessel_density=d))[1] for d in (0.0, 1.0)]
    assert g[1] < g[0]
    g = [mean_rgb(_base(seed, vessel_contrast=c))[1] for c in (0.0, 1.0)]
    assert g[1] < g[0]

    # Tigroid: a visible choroidal pattern darkens the periphery a little.
    assert mean_rgb(_base(seed, tigroid=1.0))[1] < mean_rgb(_base(seed, tigroid=0.0))[1]


def test_lesion_pixels_grow_with_grade() -> None:
    def with_grade(g: int) -> FundusFactors:
        f = sample_factors(np.random.default_rng(9), laterality="left", grade=g)
        return replace(f, glare=0.0, brightness=0.6, pigmentation=0.3, fov_cut=0.0)

    ref = render_fundus(with_grade(0), R).astype(np.int16)
    changed = []
    for g in range(5):
        diff = np.abs(render_fundus(with_grade(g), R).astype(np.int16) - ref).max(axis=-1)
        changed.append(int((diff > 25).sum()))
    assert changed[0] == 0
    assert changed[1] > 0
    assert all(a <= b for a, b in zip(changed, changed[1:], strict=False))
    assert changed[4] > changed[2] > changed[1]


def test_frame_cut_is_at_the_image_border_on_disk() -> None:
    f = _base(fov_cut=0.2, fov_radius=1.0)
    img = render_fundus(f, 100)
    framed = crop_to_frame(img, f)
    cut = (100 - framed.shape[0]) // 2
    assert framed.shape == (100 - 2 * cut, 100, 3) and cut > 0
    assert img[:cut].max() == 0 and img[100 - cut :].max() == 0  # only black rows were removed
    assert framed[0, 50].max() > 0 and framed[-1, 50].max() > 0  # the frame cuts the fundus circle
    # 20 % of the diameter (100 px) is cut: 10 rows at the top and 10 at the bottom.
    assert cut == 10
    assert crop_to_frame(render_fundus(_base(fov_cut=0.0), 64), _base(fov_cut=0.0)).shape == (64, 64, 3)
    with pytest.raises(RetinagenError, match="square"):
        crop_to_frame(framed, f)


def test_the_project_fov_detector_finds_the_synthetic_field_of_view() -> None:
    # The dataset must go through the same `prepare` path as EyePACS: its FOV detection included.
    from retinagen.data.fundus import detect_fov

    for seed, cut, radius in ((7, 0.0, 0.92), (8, 0.25, 1.0), (9, 0.12, 0.85)):
        f = _base(seed, fov_cut=cut, fov_radius=radius, glare=0.4)
        fov = detect_fov(crop_to_frame(render_fundus(f, 128), f))
        assert fov.radius / 64 == pytest.approx(radius, abs=0.03)
        assert fov.frame_cut == pytest.approx(cut, abs=0.03)


def test_render_rejects_bad_input() -> None:
    f = _base()
    for bad in (8, 15, 1025, 64.0, True):
        with pytest.raises(RetinagenError, match="resolution"):
            render_fundus(f, bad)  # type: ignore[arg-type]
    with pytest.raises(RetinagenError, match="FundusFactors"):
        render_fundus({"grade": 0}, 64)  # type: ignore[arg-type]


def test_sample_grid() -> None:
    grid = make_sample_grid(n=10, resolution=32, seed=0, cols=4, pad=2)
    assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3) and grid.dtype == np.uint8


# --------------------------------------------------------------------------------------------------
# Dataset on disk


def test_write_dataset_layout_and_csvs(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    summary = write_synth_dataset(out, n=7, resolution=32, seed=3, workers=1, progress=False)
    assert summary.n == 7 and summary.resolution == 32 and summary.out == out
    assert sum(summary.grade_counts.values()) == 7 and summary.images_per_s > 0

    files = sorted(p.name for p in (out / "train").iterdir())
    expected = sorted(f"{k}_{eye}.jpeg" for k in (1, 2, 3) for eye in ("left", "right")) + ["4_left.jpeg"]
    assert files == expected  # 7 images -> 4 patients, the last with one eye

    assert (out / "trainLabels.csv").read_text().splitlines()[0] == "image,level"
    labels = _read_csv(out / "trainLabels.csv")
    assert sorted(r["image"] + ".jpeg" for r in labels) == files
    factors_rows = _read_csv(out / "factors.csv")
    with open(out / "factors.csv", newline="") as fh:
        assert next(csv.reader(fh)) == ["image", *FACTOR_RANGES]
    assert [r["image"] for r in factors_rows] == [r["image"] for r in labels]
    for lab, row in zip(labels, factors_rows, strict=True):
        assert int(lab["level"]) == int(row["grade"])
        assert int(row["laterality"]) == (1 if lab["image"].endswith("_right") else 0)
    assert summary.grade_counts == {g: sum(int(r["level"]) == g for r in labels) for g in range(5)}

    meta = json.loads((out / "synth.json").read_text())
    assert meta["format"] == synth.SYNTH_FORMAT and meta["seed"] == 3 and meta["synthetic"] is True

    # Each JPEG is exactly the rendering of its recorded factors, and decodes to an RGB fundus.
    factors = read_factors_csv(out / "factors.csv")
    assert sorted(factors) == sorted(r["image"] for r in labels)
    for stem in sorted(factors):
        f = factors[stem]
        data = (out / "train" / f"{stem}.jpeg").read_bytes()
        assert data == synth._encode_jpeg(crop_to_frame(render_fundus(f, 32), f))
        jpeg = cv2.imread(str(out / "train" / f"{stem}.jpeg"), cv2.IMREAD_COLOR)
        h = jpeg.shape[0]
        assert jpeg.shape[1:] == (32, 3) and (h == 32) == (f.fov_cut == 0)
        assert jpeg[0, 0].max() < 10 and jpeg[h // 2, 16].max() > 40
    # No temporary folders left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_dataset_is_deterministic_and_independent_of_workers(tmp_path: Path) -> None:
    a = write_synth_dataset(tmp_path / "a", n=9, resolution=32, seed=11, workers=1, progress=False)
    write_synth_dataset(tmp_path / "b", n=9, resolution=32, seed=11, workers=2, progress=False)
    write_synth_dataset(tmp_path / "c", n=9, resolution=32, seed=12, workers=1, progress=False)
    assert a.workers == 1
    names = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    for name in names:
        assert (tmp_path / "a" / "train" / name).read_bytes() == (
            tmp_path / "b" / "train" / name
        ).read_bytes()
    for csv_name in ("trainLabels.csv", "factors.csv"):
        assert (tmp_path / "a" / csv_name).read_bytes() == (tmp_path / "b" / csv_name).read_bytes()
    assert (tmp_path / "a" / "factors.csv").read_bytes() != (tmp_path / "c" / "factors.csv").read_bytes()
    differ = [
        (tmp_path / "a" / "train" / n).read_bytes() != (tmp_path / "c" / "train" / n).read_bytes()
        for n in names
    ]
    assert all(differ)
    # An image's factors do not depend on n (patients are seeded by (seed, patient)).
    assert plan_dataset(4, 11)[:3] == plan_dataset(9, 11)[:3]


def test_plan_grade_marginal_follows_probs() -> None:
    grades = np.array([f.grade for _, f in plan_dataset(2000, seed=0)])
    observed = np.bincount(grades, minlength=5)
    expected = np.array(DEFAULT_GRADE_PROBS) * 2000
    assert float(((observed - expected) ** 2 / expected).sum()) < 25.0  # eyes of a patient are correlated


def test_output_folder_rules(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RetinagenError, match="not empty"):
        write_synth_dataset(foreign, n=2, resolution=16, workers=1, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RetinagenError, match="not a folder"):
        write_synth_dataset(a_file, n=2, resolution=16, workers=1, progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    write_synth_dataset(empty, n=4, resolution=16, workers=1, progress=False)
    assert len(list((empty / "train").iterdir())) == 4
    # A previous synth output is replaced as a whole.
    write_synth_dataset(empty, n=3, resolution=16, workers=1, progress=False)
    assert len(list((empty / "train").iterdir())) == 3
    assert len(_read_csv(empty / "factors.csv")) == 3


def test_interrupted_run_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "prev"
    write_synth_dataset(out, n=2, resolution=16, seed=1, workers=1, progress=False)
    before = (out / "factors.csv").read_bytes()
    calls = []

    def broken(job: tuple) -> int:
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return synth._render_chunk.__wrapped__(job)  # type: ignore[attr-defined]

    broken.__wrapped__ = synth._render_chunk  # type: ignore[attr-defined]
    monkeypatch.setattr(synth, "_render_chunk", broken)
    with pytest.raises(KeyboardInterrupt):
        write_synth_dataset(out, n=40, resolution=16, seed=2, workers=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_synth_dataset(tmp_path / "new", n=40, resolution=16, seed=2, workers=1, progress=False)
    assert (out / "factors.csv").read_bytes() == before  # the previous dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]  # no partial folders


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must"),
        ({"n": 2.5}, "n must"),
        ({"resolution": 8}, "resolution"),
        ({"resolution": 2048}, "resolution"),
        ({"seed": -1}, "seed"),
        ({"workers": 0}, "workers"),
        ({"grade_probs": (0.5, 0.5)}, "grade_probs"),
        ({"grade_probs": (0.5, 0.5, 0.1, -0.1, 0.0)}, "grade_probs"),
        ({"grade_probs": (0.2, 0.2, 0.2, 0.2, 0.1)}, "grade_probs"),
        ({"grade_probs": (0.2, 0.2, 0.2, 0.2, float("nan"))}, "grade_probs"),
        ({"grade_probs": "0.2,0.2,0.2,0.2,0.2"}, "grade_probs"),
    ],
)
def test_write_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"n": 2, "resolution": 16, "workers": 1, "progress": False, **kwargs}
    with pytest.raises(RetinagenError, match=match) as info:
        write_synth_dataset(tmp_path / "out", **args)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "out").exists()
