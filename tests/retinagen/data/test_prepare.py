"""`prepare_dataset`: ZIP + dataset.json + report, every bad input reported, nothing valid lost."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zipfile
import zlib
from collections import Counter
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

import retinagen.data.prepare as prep
from retinagen.data.imageio import read_image
from retinagen.data.prepare import (
    PrepareSummary,
    assign_splits,
    encode_png,
    face_crop,
    member_name,
    prepare_dataset,
    report_path_for,
)
from retinagen.data.sources import Record
from retinagen.errors import RetinagenError
from tests.outputs import leaks
from tests.retinagen.data import dicom_fixtures as dfx

RES = 32

CELEBA_ATTRS = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]


# ------------------------------------------------------------------------------------------------
# Fixture builders (real fundus pixels from skimage.data.retina(), real faces from lfw_subset.npy)


@cache
def retina(size: int = 128) -> np.ndarray:
    from skimage import data

    arr = np.asarray(Image.fromarray(data.retina()).resize((size, size), Image.Resampling.BOX))
    arr.flags.writeable = False
    return arr


def fundus(i: int) -> np.ndarray:
    """Distinct real-fundus variants: brightness and mirror change with i."""
    img = (retina().astype(np.float32) * (0.75 + 0.05 * (i % 6))).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(img[:, ::-1] if i % 2 else img)


def save(path: Path, arr: np.ndarray, fmt: str | None = None, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def png_chunk_types(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return kinds


def load(out: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """(dataset.json, {member: uint8 RGB}, report) of a prepared dataset."""
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.read("dataset.json"))
        images = {}
        for n in zf.namelist():
            if n.endswith(".png"):
                data = zf.read(n)
                assert png_chunk_types(data) == [b"IHDR", b"IDAT", b"IEND"], n  # no metadata chunks
                images[n] = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    report = json.loads(report_path_for(out).read_text())
    return meta, images, report


def by_key(meta: dict[str, Any], field: str) -> dict[str, Any]:
    """dataset.json field re-keyed by the original file name."""
    values = dict(meta[field]) if field != "labels" else dict(meta["labels"] or [])
    return {meta["keys"][n]: v for n, v in values.items()}


def write_eyepacs(root: Path, grades: dict[str, int]) -> Path:
    for i, stem in enumerate(grades):
        save(root / "train" / f"{stem}.jpeg", fundus(i), quality=92)
    (root / "trainLabels.csv").write_text("image,level\n" + "".join(f"{s},{g}\n" for s, g in grades.items()))
    return root


# ------------------------------------------------------------------------------------------------
# The salted EyePACS folder: every kind of bad input, each reported with its reason


@pytest.fixture()
def salted_eyepacs(tmp_path: Path) -> Path:
    root = tmp_path / "eyepacs"
    train = root / "train"
    valid = ["1_left", "1_right", "7_left", "7_right", "8_left", "8_right", "9_left"]
    for i, stem in enumerate(valid):
        save(train / f"{stem}.jpeg", fundus(i), quality=92)
    (train / "2_left.jpeg").write_bytes(b"")  # zero bytes
    good = io.BytesIO()
    Image.fromarray(fundus(3)).save(good, "JPEG", quality=92)
    (train / "2_right.jpeg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # truncated
    (train / "3_left.jpeg").write_text("image,level\n10_left,0\n")  # text named .jpeg
    save(train / "3_right.jpeg", fundus(4), fmt="PNG")  # a PNG named .jpeg: valid, kept with a warning
    assert cv2.imwrite(str(train / "4_left.png"), fundus(5)[:, :, ::-1].astype(np.uint16) * 257)  # 16-bit
    rgba = np.dstack([fundus(6), np.full(fundus(6).shape[:2], 255, np.uint8)])
    rgba[:8, :8, 3] = 0
    save(train / "4_right.png", rgba)  # RGBA
    save(train / "5_left.jpeg", fundus(7)[:, :, 1], quality=92)  # greyscale (mode L)
    (train / "5_right.png").write_bytes(bomb_png(50_000, 50_000))  # decompression bomb
    save(train / "6_left.jpeg", np.full((96, 96, 3), 128, np.uint8), quality=92)  # no fundus
    outside = save(tmp_path / "elsewhere" / "x.jpeg", fundus(8), quality=92)
    os.symlink(outside, train / "6_right.jpeg")  # symlink pointing outside the root
    (root / "trainLabels.csv").write_text(
        "image,level\n"
        "1_left,0\n1_right,2\n2_left,1\n2_right,0\n3_left,0\n3_right,3\n4_left,1\n4_right,0\n"
        "5_left,4\n5_right,0\n6_left,0\n6_right,0\n"
        "7_left,7\n"  # unknown grade
        "7_right,x\n"  # non-integer grade
        "8_left,2\n8_left,2\n"  # identical duplicate: kept once
        "8_right,1\n8_right,3\n"  # conflicting duplicate: rejected
        "99_left,0\n"  # label row for a missing image
        "10_left,1,1\n"  # malformed row
    )
    return root


KEPT = {
    "train/1_left.jpeg": 0,
    "train/1_right.jpeg": 2,
    "train/3_right.jpeg": 3,
    "train/4_left.png": 1,
    "train/4_right.png": 0,
    "train/5_left.jpeg": 4,
    "train/8_left.jpeg": 2,
}


def test_salted_eyepacs_every_problem_reported_and_no_valid_image_lost(
    salted_eyepacs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ds" / "eyepacs32.zip"
    summary = prepare_dataset("eyepacs", salted_eyepacs, RES, out, workers=1, progress=False)
    assert isinstance(summary, PrepareSummary)
    assert summary.report_path == tmp_path / "ds" / "eyepacs32.report.json"
    meta, images, report = load(out)

    assert by_key(meta, "labels") == KEPT  # every valid image kept, with its CSV grade
    assert summary.n_kept == len(KEPT) == len(images)
    assert summary.label_counts == dict(sorted(Counter(KEPT.values()).items()))
    assert report["label_counts"] == {str(k): v for k, v in summary.label_counts.items()}
    for img in images.values():
        assert img.shape == (RES, RES, 3) and img.dtype == np.uint8

    rejected = {r["file"]: r["reason"] for r in report["rejected"]}
    expect = {
        "train/2_left.jpeg": "empty file",
        "train/2_right.jpeg": "truncated",
        "train/3_left.jpeg": "holds text",
        "train/5_right.png": "decompression bomb",
        "train/6_left.jpeg": "no fundus",
        "train/6_right.jpeg": "symlink",
        "train/7_left.jpeg": "unknown label '7'",
        "train/7_right.jpeg": "unknown label 'x'",
        "train/8_right.jpeg": "conflicting duplicate",
        "train/9_left.jpeg": "no label row",
        "train/99_left (trainLabels.csv)": "label row for missing image",
        "trainLabels.csv line 21": "malformed row",
    }
    for f, why in expect.items():
        assert why in rejected[f], (f, rejected.get(f))
    assert len(rejected) == len(expect) == summary.n_rejected == report["n_rejected"]
    assert summary.n_seen == report["n_seen"] == len(KEPT) + len(expect)

    warned = {(w["file"], w["warning"].split(" ")[0]) for w in report["warnings"]}
    assert ("train/3_right.jpeg", "extension") in warned and ("train/8_left.jpeg", "identical") in warned
    # Patients / eyes from file names; both eyes of patient 1 in the same split.
    patients = by_key(meta, "patients")
    assert patients["train/1_left.jpeg"] == patients["train/1_right.jpeg"] == "1"
    assert by_key(meta, "eyes")["train/4_right.png"] == "right"
    splits = by_key(meta, "splits")
    assert splits["train/1_left.jpeg"] == splits["train/1_right.jpeg"]
    # No absolute path of this machine in the report or the ZIP.
    assert not leaks([out, report_path_for(out)], [str(tmp_path)])  # ZIP members read decompressed
    assert report["data_root"] == "eyepacs" and report["resolution"] == RES
    assert report["timing"]["images_per_s"] > 0


def test_16bit_and_greyscale_sources_give_the_same_kind_of_output(
    salted_eyepacs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "e.zip"
    prepare_dataset("eyepacs", salted_eyepacs, RES, out, workers=1, progress=False)
    meta, images, _ = load(out)
    name_of = {v: k for k, v in meta["keys"].items()}
    grey = images[name_of["train/5_left.jpeg"]]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # 16-bit source = fundus(5) * 257: same picture as the 8-bit preprocessing of fundus(5).
    from retinagen.data.fundus import preprocess_fundus

    ref = preprocess_fundus(fundus(5), RES)
    assert np.abs(images[name_of["train/4_left.png"]].astype(int) - ref.astype(int)).max() <= 2


# ------------------------------------------------------------------------------------------------
# Folder + CSV with unsafe paths, DICOM files, and PHI


def test_folder_csv_paths_dicom_and_no_phi(tmp_path: Path) -> None:
    root = tmp_path / "root"
    save(root / "good" / "a.jpeg", fundus(0), quality=92)
    save(root / "good" / "b.png", fundus(1))
    (root / "dcm").mkdir()
    dfx.op8_rgb(root / "dcm" / "op.dcm")
    dfx.ct_image(root / "dcm" / "ct.dcm")
    secret = save(tmp_path / "outside.jpeg", fundus(2), quality=92)
    os.symlink(secret, root / "link.jpeg")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "image,label\n"
        "good/a.jpeg,0\ngood/b.png,1\ndcm/op.dcm,2\ndcm/ct.dcm,0\n"
        f"../outside.jpeg,1\n{secret},1\nlink.jpeg,0\n"
    )
    out = tmp_path / "f.zip"
    s = prepare_dataset("folder", root, RES, out, labels=labels, workers=1, progress=False)
    meta, images, report = load(out)
    assert by_key(meta, "labels") == {"good/a.jpeg": 0, "good/b.png": 1, "dcm/op.dcm": 2}
    assert by_key(meta, "eyes") == {"dcm/op.dcm": "left"}  # DICOM Image Laterality
    assert meta["patients"] == {}  # no patient ids from folders (and never from DICOM headers)
    assert meta["num_classes"] == 3
    rejected = {r["file"]: r["reason"] for r in report["rejected"]}
    assert "escapes the data root" in rejected["../outside.jpeg"]
    assert "absolute path" in rejected[str(secret)]
    assert "symlink" in rejected["link.jpeg"]
    assert "CT" in rejected["dcm/ct.dcm"]
    assert s.n_kept == 3 and s.n_rejected == 4
    # Every file and every ZIP member decompressed (dataset.json is stored deflated).
    assert not leaks([out, report_path_for(out)], dfx.PHI_STRINGS)
    # The absolute path in the CSV is quoted (that is the user's own text), but not our data root.
    assert not leaks([out, report_path_for(out)], [str(root)])


def test_dicom_source_keeps_fundus_and_reports_others(tmp_path: Path) -> None:
    root = tmp_path / "dicoms"
    root.mkdir()
    dfx.op8_rgb(root / "a.dcm")
    dfx.op16_rgb_12bit(root / "b.dcm")
    dfx.ct_image(root / "c.dcm")
    dfx.no_pixel_data(root / "d.dcm")
    out = tmp_path / "d.zip"
    s = prepare_dataset("dicom", root, RES, out, workers=1, progress=False)
    meta, images, report = load(out)
    assert sorted(meta["keys"].values()) == ["a.dcm", "b.dcm"]
    assert meta["labels"] is None and s.label_counts == {}
    assert by_key(meta, "eyes") == {"a.dcm": "left", "b.dcm": "right"}
    rejected = {r["file"]: r["reason"] for r in report["rejected"]}
    assert set(rejected) == {"c.dcm", "d.dcm"} and "pixel" in rejected["d.dcm"].lower()
    assert not leaks([out, report_path_for(out)], dfx.PHI_STRINGS)


# ------------------------------------------------------------------------------------------------
# Other sources


def test_aptos_labels_match_csv(tmp_path: Path) -> None:
    root = tmp_path / "aptos"
    ids = {"000c1434d8d7": 2, "001639a390f0": 4, "0024cdab0c1e": 1, "002c21358ce6": 0}
    for i, k in enumerate(ids):
        save(root / "train_images" / f"{k}.png", fundus(i))
    (root / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{k},{v}\n" for k, v in ids.items()))
    out = tmp_path / "a.zip"
    prepare_dataset("aptos", root, RES, out, workers=1, progress=False)
    meta, images, _ = load(out)
    assert by_key(meta, "labels") == {f"train_images/{k}.png": v for k, v in ids.items()}
    assert meta["patients"] == {} and set(meta["splits"].values()) <= {"train", "val", "test"}
    assert meta["source"] == "aptos" and meta["num_classes"] == 5 and meta["synthetic"] is False


def lfw_faces(n: int) -> list[np.ndarray]:
    import skimage

    faces = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")[:n]
    out = []
    for f in faces:
        up = cv2.resize((f * 255).astype(np.uint8), (50, 50), interpolation=cv2.INTER_CUBIC)
        tall = cv2.copyMakeBorder(up, 6, 6, 0, 0, cv2.BORDER_REPLICATE)  # 50 x 62, like CelebA's 178 x 218
        out.append(np.repeat(tall[:, :, None], 3, axis=2))
    return out


def test_celeba_attributes_and_partition_preserved(tmp_path: Path) -> None:
    root = tmp_path / "celeba"
    rng = np.random.default_rng(3)
    values = rng.choice([-1, 1], size=(6, 40))
    names = [f"{i + 1:06d}.jpg" for i in range(6)]
    for name, face in zip(names, lfw_faces(6), strict=True):
        save(root / "img_align_celeba" / name, face, quality=95)
    rows = [f"{n} " + " ".join(f"{v:2d}" for v in vals) for n, vals in zip(names, values, strict=True)]
    (root / "list_attr_celeba.txt").write_text(f"6\n{' '.join(CELEBA_ATTRS)}\n" + "\n".join(rows) + "\n")
    parts = [0, 0, 0, 0, 1, 2]
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, parts, strict=True))
    )
    out = tmp_path / "c.zip"
    s = prepare_dataset("celeba", root, RES, out, workers=1, progress=False)
    meta, images, _ = load(out)
    assert s.n_kept == 6 and meta["labels"] is None and meta["num_classes"] is None
    assert meta["attrs"]["names"] == CELEBA_ATTRS
    got = {meta["keys"][n]: v for n, v in meta["attrs"]["values"].items()}
    for name, vals in zip(names, values, strict=True):
        assert got[f"img_align_celeba/{name}"] == [int(v == 1) for v in vals]
    assert by_key(meta, "splits") == {
        f"img_align_celeba/{n}": ["train", "val", "test"][p] for n, p in zip(names, parts, strict=True)
    }
    # Images are the centre crop (no fundus processing): identical to face_crop of the decoded file.
    name_of = {v: k for k, v in meta["keys"].items()}
    for name in names:
        key = f"img_align_celeba/{name}"
        np.testing.assert_array_equal(images[name_of[key]], face_crop(read_image(root / key), RES))


def test_face_crop_is_the_centre_square() -> None:
    img = np.zeros((218, 178, 3), np.uint8)
    img[20:198] = 200  # the centred 178 x 178 square
    out = face_crop(img, 178)
    assert out.shape == (178, 178, 3) and (out == 200).all()
    small = face_crop(img, 64)
    assert small.shape == (64, 64, 3) and (small == 200).all()
    assert face_crop(np.full((10, 12, 3), 65535, np.uint16), 8).max() == 255


# ------------------------------------------------------------------------------------------------
# Synthetic data (retinagen synth writes the EyePACS layout): labels, factors, patient split


def write_synth(root: Path, n: int) -> Path:
    from retinagen.data.synthetic import write_synth_dataset

    write_synth_dataset(root, n=n, resolution=64, seed=5, workers=1, progress=False)
    return root


def test_synth_labels_match_csv_and_eyes_stay_together(tmp_path: Path) -> None:
    root = write_synth(tmp_path / "syn", 40)
    out = tmp_path / "s.zip"
    s = prepare_dataset("eyepacs", root, RES, out, workers=1, progress=False)
    meta, images, report = load(out)
    with open(root / "trainLabels.csv") as fh:
        csv_grades = {row["image"]: int(row["level"]) for row in csv.DictReader(fh)}
    labels = by_key(meta, "labels")
    for key, grade in labels.items():
        assert csv_grades[Path(key).stem] == grade
    rejected = {r["file"] for r in report["rejected"]}
    assert len(labels) + len(rejected) == len(csv_grades) == 40
    assert s.label_counts == dict(sorted(Counter(labels.values()).items()))
    assert meta["synthetic"] is True and "glare" in meta["factors"]["names"]
    assert set(meta["factors"]["values"]) == set(meta["keys"])
    by_patient: dict[str, set[str]] = {}
    for name, pid in meta["patients"].items():
        by_patient.setdefault(pid, set()).add(meta["splits"][name])
    assert all(len(v) == 1 for v in by_patient.values())
    assert len(meta["patients"]) == len(images)


def test_members_follow_the_nvlabs_layout() -> None:
    assert member_name(0) == "00000/img00000000.png"
    assert member_name(999) == "00000/img00000999.png"
    assert member_name(1000) == "00001/img00001000.png"
    assert report_path_for(Path("x/d.zip")) == Path("x/d.report.json")


def test_encode_png_has_no_metadata_and_round_trips() -> None:
    img = fundus(0)[:40, :40].copy()
    data = encode_png(img)
    assert png_chunk_types(data) == [b"IHDR", b"IDAT", b"IEND"]
    back = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(back, img)


# ------------------------------------------------------------------------------------------------
# Splits


def fake_records(n_patients: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n_patients):
        g = int(rng.choice(5, p=[0.7, 0.1, 0.12, 0.05, 0.03]))
        for eye in ("left", "right"):
            recs.append(
                Record(key=f"train/{p}_{eye}.jpeg", path=Path("."), label=g, patient_id=str(p), eye=eye)
            )
    return recs


def test_assign_splits_patient_level_deterministic_and_stratified() -> None:
    recs = fake_records(1000)
    a = assign_splits(recs, seed=0)
    assert a == assign_splits(recs, seed=0)
    assert a != assign_splits(recs, seed=1)
    for i in range(0, len(recs), 2):
        assert a[i] == a[i + 1]  # both eyes together
    counts = Counter(a)
    assert abs(counts["train"] / len(a) - 0.8) < 0.01 and abs(counts["val"] / len(a) - 0.1) < 0.01
    for g in range(5):
        sub = [s for s, r in zip(a, recs, strict=True) if r.label == g]
        assert abs(sub.count("train") / len(sub) - 0.8) < 0.05, g  # each grade split like the whole


def test_assign_splits_keeps_preset_and_splits_images_without_patients() -> None:
    recs = [Record(key=f"{i}.png", path=Path("."), split="test" if i == 0 else None) for i in range(10)]
    a = assign_splits(recs, seed=0, fractions=(0.6, 0.2, 0.2))
    assert a[0] == "test" and Counter(a[1:]) == {"train": 5, "val": 2, "test": 2}
    with pytest.raises(RetinagenError, match="fractions"):
        assign_splits(recs, seed=0, fractions=(0.5, 0.5, 0.5))


# ------------------------------------------------------------------------------------------------
# Exit semantics, argument checks, atomicity, determinism, crash recovery


def test_nothing_valid_raises_after_writing_the_report(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpeg").write_bytes(b"")
    (root / "b.png").write_text("text")
    save(root / "c.png", np.full((64, 64, 3), 90, np.uint8))
    out = tmp_path / "o" / "bad.zip"
    with pytest.raises(RetinagenError, match=r"nothing valid was prepared from .*3 files rejected"):
        prepare_dataset("folder", root, RES, out, workers=1, progress=False)
    assert not out.exists()
    report = json.loads(report_path_for(out).read_text())
    assert report["n_kept"] == 0 and report["out_written"] is False
    assert {r["file"] for r in report["rejected"]} == {"a.jpeg", "b.png", "c.png"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["bad.report.json"]  # no temp files left


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"resolution": 48}, "power of two"),
        ({"resolution": 4}, "power of two"),
        ({"out": "x.tar"}, r"\.zip"),
        ({"workers": 0}, "--workers"),
        ({"split_fractions": (0.9, 0.2, 0.0)}, "fractions"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    root = write_eyepacs(tmp_path / "e", {"1_left": 0})
    args: dict[str, Any] = {"resolution": RES, "out": tmp_path / "o.zip"}
    args.update(kwargs)
    out = Path(args.pop("out"))
    with pytest.raises(RetinagenError, match=match):
        prepare_dataset("eyepacs", root, args.pop("resolution"), tmp_path / out, progress=False, **args)


def test_refuses_to_overwrite_input_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    save(root / "a.png", fundus(0))
    (root / "x.zip").write_bytes(b"listed as an image in the CSV")
    labels = root / "d.report.json"
    labels.write_text("image,label\na.png,0\nx.zip,1\n")
    before = (root / "x.zip").read_bytes()
    with pytest.raises(RetinagenError, match="input file"):
        prepare_dataset("folder", root, RES, root / "x.zip", labels=labels, workers=1, progress=False)
    with pytest.raises(RetinagenError, match="report file .* input file"):
        prepare_dataset("folder", root, RES, root / "d.zip", labels=labels, workers=1, progress=False)
    assert (root / "x.zip").read_bytes() == before and labels.read_text().startswith("image,label")


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_eyepacs(tmp_path / "e", {f"{i}_left": 0 for i in range(6)})
    calls = {"n": 0}
    real = prep.encode_png

    def flaky(img: np.ndarray) -> bytes:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(img)

    monkeypatch.setattr(prep, "encode_png", flaky)
    out = tmp_path / "o" / "d.zip"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("eyepacs", root, RES, out, workers=1, progress=False)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_unexpected_error_in_one_file_is_a_rejection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_eyepacs(tmp_path / "e", {f"{i}_left": i % 5 for i in range(4)})
    from retinagen.data import preprocess as fundus_mod

    real_pf = fundus_mod.preprocess_fundus
    calls = {"n": 0}

    def boom(img: np.ndarray, resolution: int, **kw: Any) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ZeroDivisionError("/secret/path leaked?")
        return real_pf(img, resolution, **kw)

    monkeypatch.setattr(fundus_mod, "preprocess_fundus", boom)
    out = tmp_path / "d.zip"
    s = prepare_dataset("eyepacs", root, RES, out, workers=1, progress=False)
    _, _, report = load(out)
    assert s.n_kept == 3 and report["rejected"] == [
        {"file": "train/1_left.jpeg", "reason": "internal error: ZeroDivisionError"}
    ]


def test_same_zip_bytes_for_one_and_two_workers(tmp_path: Path) -> None:
    """Deterministic output: in-process and two worker processes give byte-identical ZIPs."""
    root = write_eyepacs(
        tmp_path / "e",
        {f"{p}_{e}": (p * 2 + (e == "right")) % 5 for p in range(9) for e in ("left", "right")},
    )
    (root / "train" / "0_left.jpeg").write_bytes(b"")  # a rejection in the mix
    a, b = tmp_path / "a.zip", tmp_path / "b.zip"
    sa = prepare_dataset("eyepacs", root, RES, a, workers=1, progress=False)
    sb = prepare_dataset("eyepacs", root, RES, b, workers=2, progress=False)
    assert sa.n_kept == sb.n_kept == 17
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(report_path_for(b).read_text())["settings"]["workers"] == 2


class _FakeExecutor:
    """In-process stand-in for ProcessPoolExecutor whose 'worker' dies on files named *crash*."""

    def __init__(self) -> None:
        self.broken = False

    def submit(self, fn: Any, chunk: list[tuple[int, str]], settings: Any) -> Future:
        if self.broken:
            raise BrokenProcessPool("pool is broken")
        f: Future = Future()
        if any("crash" in Path(path).name for _, path in chunk):
            self.broken = True
            f.set_exception(BrokenProcessPool("a worker died"))
        else:
            f.set_result(fn(chunk, settings))
        return f

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def test_a_worker_crash_rejects_only_the_file_that_caused_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grades = {f"{i}_left": 0 for i in range(10)}
    grades["5_crash"] = 1
    root = write_eyepacs(tmp_path / "e", grades)
    monkeypatch.setattr(prep._Pool, "_new", lambda self: _FakeExecutor())
    monkeypatch.setattr(prep, "_chunk_size", lambda n, w, r: 3)
    out = tmp_path / "d.zip"
    s = prepare_dataset("eyepacs", root, RES, out, workers=2, progress=False)
    _, _, report = load(out)
    assert s.n_kept == 10
    assert report["rejected"] == [
        {"file": "train/5_crash.jpeg", "reason": "internal error: the worker process crashed on this file"}
    ]


def test_absolute_paths_in_error_messages_are_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_eyepacs(tmp_path / "data", {"1_left": 0, "2_left": 1})
    real = prep.decode_image

    def picky(path: Any, **kw: Any) -> Any:
        if Path(path).name == "2_left.jpeg":
            raise RetinagenError(f"{path}: unreadable in {root.resolve()} (no pixel data)")
        return real(path, **kw)

    monkeypatch.setattr(prep, "decode_image", picky)
    out = tmp_path / "d.zip"
    prepare_dataset("eyepacs", root, RES, out, workers=1, progress=False)
    (rej,) = json.loads(report_path_for(out).read_text())["rejected"]
    assert rej == {
        "file": "train/2_left.jpeg",
        "reason": "train/2_left.jpeg: unreadable in <data root> (no pixel data)",
    }


def test_ben_graham_option(tmp_path: Path) -> None:
    root = write_eyepacs(tmp_path / "e", {"1_left": 0, "1_right": 1})
    plain, bg = tmp_path / "p.zip", tmp_path / "b.zip"
    prepare_dataset("eyepacs", root, RES, plain, workers=1, progress=False)
    prepare_dataset("eyepacs", root, RES, bg, ben_graham=True, workers=1, progress=False)
    (_, a, _), (_, b, rb) = load(plain), load(bg)
    assert rb["settings"]["ben_graham"] is True
    # Local-contrast normalisation pulls the field of view towards mid-grey (128).
    centre = slice(RES // 4, 3 * RES // 4)
    for name in a:
        assert abs(b[name][centre, centre].mean() - 128) < abs(a[name][centre, centre].mean() - 128)
    faces = tmp_path / "celeba"
    save(faces / "img_align_celeba" / "1.jpg", lfw_faces(1)[0])
    (faces / "list_attr_celeba.txt").write_text("1\nSmiling\n1.jpg 1\n")
    with pytest.raises(RetinagenError, match="fundus images only"):
        prepare_dataset("celeba", faces, RES, tmp_path / "c.zip", ben_graham=True, progress=False)


@pytest.mark.parametrize(("omp", "cpus", "expected"), [(None, 8, 2), (None, 1, 1), ("1", 8, 1), ("2", 8, 2),
                                                       ("4", 3, 2), ("", 8, 2), ("0", 8, 2), ("x", 8, 2)])
def test_default_workers_follow_the_cpus_and_the_thread_budget(
    monkeypatch: pytest.MonkeyPatch, omp: str | None, cpus: int, expected: int
) -> None:
    """Left to us (``workers=None``), prepare and synth start at most 2 processes, and one where the process was
    given one thread (a shared machine, a test worker): a second process would only queue for the same core."""
    from retinagen.data import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert default_workers() == expected
