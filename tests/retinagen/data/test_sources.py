"""Dataset sources: layouts, label files, and every label-row problem reported with its reason.

Scanning never reads pixels, so most fixtures here are placeholder files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from retinagen.data.sources import SOURCES, Record, SourceScan, register_source, scan_source
from retinagen.errors import RetinagenError
from tests.retinagen.data import dicom_fixtures as dfx


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def reasons(scan: SourceScan) -> dict[str, str]:
    return {r.file: r.reason for r in scan.rejected}


def make_eyepacs(root: Path, stems: list[str], csv_text: str) -> Path:
    for s in stems:
        touch(root / "train" / f"{s}.jpeg")
    (root / "trainLabels.csv").write_text(csv_text)
    return root


def test_registry_has_the_issue_sources() -> None:
    assert {"eyepacs", "aptos", "celeba", "folder", "dicom"} <= set(SOURCES)
    with pytest.raises(ValueError, match="already registered"):
        register_source("eyepacs")(lambda root, labels: SourceScan([], [], "fundus"))
    with pytest.raises(RetinagenError, match="unknown dataset 'nope'"):
        scan_source("nope", ".")


def test_missing_data_root(tmp_path: Path) -> None:
    with pytest.raises(RetinagenError, match="does not exist"):
        scan_source("eyepacs", tmp_path / "absent")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RetinagenError, match="not a folder"):
        scan_source("folder", tmp_path / "f")


def test_eyepacs_clean(tmp_path: Path) -> None:
    root = make_eyepacs(
        tmp_path, ["10_left", "10_right", "13_left"], "image,level\n10_left,0\n10_right,2\n13_left,4\n"
    )
    scan = scan_source("eyepacs", root)
    assert scan.rejected == [] and scan.domain == "fundus" and scan.num_classes == 5
    assert [r.key for r in scan.records] == [
        "train/10_left.jpeg",
        "train/10_right.jpeg",
        "train/13_left.jpeg",
    ]
    r0 = scan.records[1]
    assert isinstance(r0, Record) and r0.label == 2 and r0.patient_id == "10" and r0.eye == "right"
    assert r0.path == (root / "train" / "10_right.jpeg").resolve()
    assert scan.synthetic is False and scan.factor_names is None


def test_eyepacs_label_problems_each_reported(tmp_path: Path) -> None:
    csv_text = (
        "image,level\n"
        "1_left,0\n"
        "1_right,7\n"  # unknown grade
        "2_left,x\n"  # non-integer
        "2_right,1\n2_right,1\n"  # identical duplicate: kept once with a warning
        "3_left,1\n3_left,3\n"  # conflicting duplicate: rejected
        "9_left,2\n"  # label row for a missing image
        "4_left,1,extra\n"  # wrong column count
        "\n"
    )
    root = make_eyepacs(tmp_path, ["1_left", "1_right", "2_left", "2_right", "3_left", "5_right"], csv_text)
    (root / "train" / "readme.txt").write_text("not an image")
    scan = scan_source("eyepacs", root)
    got = reasons(scan)
    assert [r.key for r in scan.records] == ["train/1_left.jpeg", "train/2_right.jpeg"]
    assert "unknown label '7'" in got["train/1_right.jpeg"] and "0-4" in got["train/1_right.jpeg"]
    assert "unknown label 'x'" in got["train/2_left.jpeg"]
    assert "conflicting duplicate" in got["train/3_left.jpeg"] and "1, 3" in got["train/3_left.jpeg"]
    assert got["train/9_left (trainLabels.csv)"] == "label row for missing image"
    assert "expected 2 columns, got 3" in got["trainLabels.csv line 10"]
    assert got["train/5_right.jpeg"] == "no label row in trainLabels.csv"
    assert len(scan.rejected) == 6  # one entry per problem: 1_right / 2_left are not also "no label row"
    assert any(f == "train/2_right.jpeg" and "identical duplicate" in w for f, w in scan.warnings)
    assert scan.ignored == ["train/readme.txt"]


@pytest.mark.parametrize("header", ["img,level\n", "image;level\n", "10_left,0\n", ""])
def test_eyepacs_bad_header_is_fatal_and_names_file_and_header(tmp_path: Path, header: str) -> None:
    root = make_eyepacs(tmp_path, ["10_left"], header + "10_left,0\n" if header else "")
    with pytest.raises(RetinagenError) as ei:
        scan_source("eyepacs", root)
    assert "trainLabels.csv" in str(ei.value) and "image,level" in str(ei.value)


def test_eyepacs_header_case_and_bom_tolerated(tmp_path: Path) -> None:
    root = make_eyepacs(tmp_path, ["10_left"], "\ufeffImage, Level\n10_left , 3\n")
    scan = scan_source("eyepacs", root)
    assert [r.label for r in scan.records] == [3]


def test_eyepacs_layout_missing_says_what_is_expected(tmp_path: Path) -> None:
    touch(tmp_path / "images" / "a.jpeg")
    with pytest.raises(RetinagenError) as ei:
        scan_source("eyepacs", tmp_path)
    msg = str(ei.value)
    assert "EyePACS" in msg and "train/" in msg and "trainLabels.csv" in msg


def test_eyepacs_symlink_out_of_root_is_rejected(tmp_path: Path) -> None:
    outside = touch(tmp_path / "outside" / "x.jpeg")
    root = make_eyepacs(tmp_path / "root", ["1_left"], "image,level\n1_left,0\n1_right,1\n")
    os.symlink(outside, root / "train" / "1_right.jpeg")
    scan = scan_source("eyepacs", root)
    assert [r.key for r in scan.records] == ["train/1_left.jpeg"]
    assert "symlink" in reasons(scan)["train/1_right.jpeg"]


def test_eyepacs_synth_output_carries_factors(tmp_path: Path) -> None:
    root = make_eyepacs(tmp_path, ["0_left", "0_right"], "image,level\n0_left,1\n0_right,0\n")
    (root / "factors.csv").write_text("image,grade,glare\n0_left,1,0.25\n0_right,0,0.5\n")
    (root / "synth.json").write_text('{"format": "x"}')
    scan = scan_source("eyepacs", root)
    assert scan.synthetic is True and scan.factor_names == ("grade", "glare")
    assert scan.records[0].factors == {"grade": 1.0, "glare": 0.25}


def test_aptos(tmp_path: Path) -> None:
    for i in ("000c1434d8d7", "001639a390f0", "0024cdab0c1e"):
        touch(tmp_path / "train_images" / f"{i}.png")
    (tmp_path / "train.csv").write_text("id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n0024cdab0c1e,1\n")
    scan = scan_source("aptos", tmp_path)
    assert [(r.key, r.label, r.patient_id) for r in scan.records] == [
        ("train_images/000c1434d8d7.png", 2, None),
        ("train_images/001639a390f0.png", 4, None),
        ("train_images/0024cdab0c1e.png", 1, None),
    ]
    (tmp_path / "train.csv").write_text("image,level\n")
    with pytest.raises(RetinagenError, match="id_code,diagnosis"):
        scan_source("aptos", tmp_path)


def write_celeba(
    root: Path, files: list[str], rows: list[str], names: list[str], partition: str | None
) -> None:
    for f in files:
        touch(root / "img_align_celeba" / f)
    (root / "list_attr_celeba.txt").write_text(f"{len(rows)}\n{' '.join(names)}\n" + "\n".join(rows) + "\n")
    if partition is not None:
        (root / "list_eval_partition.txt").write_text(partition)


def test_celeba_attrs_and_partition(tmp_path: Path) -> None:
    names = ["Smiling", "Male", "Eyeglasses"]
    rows = [
        "000001.jpg  1 -1 -1",
        "000002.jpg -1  1  1",
        "000003.jpg 1 1",
        "000004.jpg 1 0 1",
        "000009.jpg 1 1 1",
    ]
    write_celeba(
        tmp_path,
        ["000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg", "000005.jpg"],
        rows,
        names,
        "000001.jpg 0\n000002.jpg 2\n",
    )
    scan = scan_source("celeba", tmp_path)
    assert scan.domain == "face" and scan.attr_names == tuple(names)
    assert [(r.key, r.attrs, r.split, r.label) for r in scan.records] == [
        ("img_align_celeba/000001.jpg", {"Smiling": 1, "Male": 0, "Eyeglasses": 0}, "train", None),
        ("img_align_celeba/000002.jpg", {"Smiling": 0, "Male": 1, "Eyeglasses": 1}, "test", None),
    ]
    got = reasons(scan)
    assert "malformed row" in got["list_attr_celeba.txt line 5"]
    assert "-1 or 1" in got["img_align_celeba/000004.jpg"]
    assert got["img_align_celeba/000005.jpg"] == "no label row in list_attr_celeba.txt"
    assert got["img_align_celeba/000009.jpg (list_attr_celeba.txt)"] == "label row for missing image"
    assert got["img_align_celeba/000003.jpg"] == "no label row in list_attr_celeba.txt"


def test_celeba_missing_layout_and_labels_flag(tmp_path: Path) -> None:
    with pytest.raises(RetinagenError, match="img_align_celeba/.*list_attr_celeba.txt"):
        scan_source("celeba", tmp_path)
    write_celeba(tmp_path, ["1.jpg"], ["1.jpg 1"], ["Smiling"], None)
    scan = scan_source("celeba", tmp_path)
    assert scan.records[0].split is None  # no partition file: prepare draws splits
    with pytest.raises(RetinagenError, match="--labels"):
        scan_source("celeba", tmp_path, labels=tmp_path / "list_attr_celeba.txt")


def test_folder_without_labels_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for name in ("b/2.png", "a/1.JPG", "c.tif", ".hidden.png", ".cache/x.png", "notes.txt"):
        touch(tmp_path / name)
    scan = scan_source("folder", tmp_path)
    assert [r.key for r in scan.records] == ["a/1.JPG", "b/2.png", "c.tif"]
    assert all(r.label is None for r in scan.records)
    assert scan.ignored == ["notes.txt"]


def test_folder_empty_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path / "readme.md")
    with pytest.raises(RetinagenError, match="no image files"):
        scan_source("folder", tmp_path)


def test_folder_labels_csv_path_safety(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("a/1.png", "a/2.png", "3.png", "4.png", "5.png"):
        touch(root / name)
    touch(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "image,label\n"
        "a/1.png,0\n"
        "./a/2.png,3\n"
        "../secret.png,1\n"
        f"{tmp_path / 'secret.png'},1\n"
        "link.png,2\n"
        "3.png,-1\n"
        "missing.png,0\n"
        "a/1.png,0\n"
    )
    scan = scan_source("folder", root, labels=labels)
    assert [(r.key, r.label) for r in scan.records] == [("a/1.png", 0), ("a/2.png", 3)]
    got = reasons(scan)
    assert "escapes the data root" in got["../secret.png"]
    assert "absolute path" in got[str(tmp_path / "secret.png")]
    assert "symlink" in got["link.png"]
    assert "unknown label '-1'" in got["3.png"]
    assert got["missing.png"] == "label row for missing image (labels.csv)"
    assert got["4.png"] == "no label row in labels.csv" and got["5.png"] == "no label row in labels.csv"
    assert any("identical duplicate" in w for _, w in scan.warnings)
    assert labels in scan.input_files


def test_dicom_source_finds_dicom_by_magic(tmp_path: Path) -> None:
    dfx.op8_rgb(tmp_path / "a.dcm")
    q = tmp_path / "sub" / "IM0001"
    q.parent.mkdir()
    q.write_bytes((tmp_path / "a.dcm").read_bytes())
    touch(tmp_path / "photo.png")
    scan = scan_source("dicom", tmp_path)
    assert [r.key for r in scan.records] == ["a.dcm", "sub/IM0001"]
    assert scan.ignored == ["photo.png"]
    empty = tmp_path / "empty"
    touch(empty / "x.png")
    with pytest.raises(RetinagenError, match="no DICOM files"):
        scan_source("dicom", empty)
