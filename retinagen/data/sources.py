"""Dataset sources: where the raw images of each dataset are and what their labels are.

A source is a function ``(data_root, labels) -> SourceScan`` registered under a name with
`register_source`; `scan_source(name, data_root)` runs one. Scanning reads only directory
listings and label files (no pixels): it yields one `Record` per image to process and one
`Rejected` per label-file problem (a label row for a missing image, an unknown grade, conflicting
duplicate rows, an image without a label row, a path escaping the data root). Problems that make
the whole dataset unusable (data root missing, the expected layout absent, a label file without
its header) raise `RetinagenError` saying what was expected.

Layouts
    eyepacs  ``train/<patient>_{left,right}.jpeg`` + ``trainLabels.csv`` (``image,level``; image is the
             file stem). Patient id = the stem before ``_left``/``_right``. ``retinagen synth``
             writes this layout too, plus ``factors.csv`` and ``synth.json``: their ground-truth
             factors are carried along and the dataset is marked synthetic.
    aptos    ``train.csv`` (``id_code,diagnosis``) + ``train_images/<id_code>.png``. No patient ids.
    celeba   ``img_align_celeba/*.jpg`` + ``list_attr_celeba.txt`` (count; 40 names; ``file v1..v40``
             with -1/1) + optional ``list_eval_partition.txt`` (``file 0|1|2`` = train/val/test).
             Attributes are stored as 0/1. No class label.
    folder   every image under the data root (recursive, sorted, hidden files skipped); optional
             labels CSV ``image,label`` (image relative to the root, label an integer >= 0).
    dicom    every DICOM file under the data root (``.dcm``/``.dicom`` or the ``DICM`` magic);
             optional labels CSV as for folder.

Every path that comes from a label file goes through `resolve_inside`; the listing itself refuses
symlinks that point outside the data root. `Record.key` is the file's data-root-relative POSIX
path: stable across runs and machines, and what reports quote (never an absolute path).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from retinagen.data.imageio import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, is_dicom_file, resolve_inside
from retinagen.dr_scale import NUM_GRADES
from retinagen.errors import RetinagenError, UnsafePathError

__all__ = [
    "DR_GRADES",
    "SOURCES",
    "Record",
    "Rejected",
    "SourceScan",
    "register_source",
    "scan_source",
]

DR_GRADES = NUM_GRADES  # ICDR / EyePACS diabetic retinopathy grades 0-4
SPLIT_NAMES = ("train", "val", "test")
_EYES = ("left", "right")

Domain = Literal["fundus", "face"]


@dataclass(frozen=True)
class Record:
    """One image to prepare.

    key:        the file's path relative to the data root, POSIX separators (stable id).
    path:       the resolved file to read (inside the data root).
    label:      class label (DR grade 0-4 for fundus datasets), None when unlabelled.
    patient_id: patient identifier from the file name (EyePACS), None when unknown.
    eye:        "left" / "right" when known.
    attrs:      binary attributes name -> 0/1 (CelebA), None otherwise.
    split:      "train" / "val" / "test" when the dataset defines it (CelebA), else None.
    factors:    ground-truth generative factors name -> value (``retinagen synth`` data), else None.
    """

    key: str
    path: Path
    label: int | None = None
    patient_id: str | None = None
    eye: str | None = None
    attrs: dict[str, int] | None = None
    split: str | None = None
    factors: dict[str, float] | None = None


@dataclass(frozen=True)
class Rejected:
    """A file (data-root-relative name, or ``labels.csv line N``) that was not used, and why."""

    file: str
    reason: str


@dataclass
class SourceScan:
    """What a source found: the images to process and everything set aside, with reasons.

    domain:       "fundus" (field-of-view preprocessing) or "face" (centre crop).
    num_classes:  number of label classes the dataset defines (5 DR grades), None if open-ended.
    attr_names / factor_names: column names of `Record.attrs` / `Record.factors`, in order.
    warnings:     (file, message) for things that were accepted but worth a look.
    ignored:      data-root-relative names of files skipped because they are not images.
    input_files:  label / metadata files read (prepare refuses to overwrite them).
    synthetic:    True for data written by ``retinagen synth``.
    """

    records: list[Record]
    rejected: list[Rejected]
    domain: Domain
    num_classes: int | None = None
    attr_names: tuple[str, ...] | None = None
    factor_names: tuple[str, ...] | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    input_files: list[Path] = field(default_factory=list)
    synthetic: bool = False


SourceFn = Callable[[Path, "Path | None"], SourceScan]
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Decorator: register ``fn(data_root, labels) -> SourceScan`` under ``name``."""

    def deco(fn: SourceFn) -> SourceFn:
        if name in SOURCES:
            raise ValueError(f"dataset source {name!r} is already registered")
        SOURCES[name] = fn
        return fn

    return deco


def scan_source(name: str, data_root: str | Path, *, labels: str | Path | None = None) -> SourceScan:
    """Scan ``data_root`` with the source registered as ``name``; see the module docstring."""
    if name not in SOURCES:
        raise RetinagenError(f"unknown dataset {name!r}; known: {', '.join(sorted(SOURCES))}")
    root = Path(data_root)
    if not root.exists():
        raise RetinagenError(f"data root {root} does not exist")
    if not root.is_dir():
        raise RetinagenError(f"data root {root} is not a folder")
    labels_path = Path(labels) if labels is not None else None
    if labels_path is not None and not labels_path.is_file():
        raise RetinagenError(f"labels file {labels_path} does not exist")
    return SOURCES[name](root, labels_path)


# --------------------------------------------------------------------------------------------------
# Helpers


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_files(root: Path) -> Iterable[str]:
    """Data-root-relative POSIX names of all non-hidden files below root, sorted; symlinked
    folders are not entered (a listing never leaves the root through a folder link)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = Path(dirpath).relative_to(root)
        for f in filenames:
            if not _is_hidden(f):
                found.append((rel_dir / f).as_posix())
    return sorted(found)


def _list_dir(root: Path, subdir: str) -> list[str]:
    """Data-root-relative names of the non-hidden entries directly in ``root/subdir``, sorted."""
    return sorted(f"{subdir}/{e.name}" for e in os.scandir(root / subdir) if not _is_hidden(e.name))


def _checked(root: Path, key: str, rejected: list[Rejected]) -> Path | None:
    """The resolved path of a listed file, or None (with a rejection) if it leaves the root or is
    not a regular file (a broken link, a folder)."""
    try:
        path = resolve_inside(root, key)
    except UnsafePathError as e:
        rejected.append(Rejected(key, e.reason))
        return None
    if not path.is_file():
        rejected.append(Rejected(key, "not a regular file (broken link or folder)"))
        return None
    return path


def _norm_key(name: str) -> str:
    """Lexically normalised POSIX form of a relative name from a CSV (``a/./b`` -> ``a/b``)."""
    return PurePosixPath(os.path.normpath(name.strip().replace("\\", "/"))).as_posix()


def _read_csv(path: Path, expected: tuple[str, ...], what: str) -> tuple[list[tuple[int, list[str]]], str]:
    """Rows (line number, stripped cells) of a CSV whose header must be ``expected`` (case-insensitive).

    Returns the rows after the header and the file's display name. A missing or different header
    is fatal: without it the columns cannot be trusted.
    """
    display = path.name
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [(i + 1, [c.strip() for c in row]) for i, row in enumerate(csv.reader(fh))]
    except UnicodeDecodeError:
        raise RetinagenError(f"{path}: {what} is not UTF-8 text") from None
    except (OSError, csv.Error) as e:
        raise RetinagenError(f"{path}: cannot read {what} ({type(e).__name__})") from None
    rows = [(n, r) for n, r in rows if any(r)]
    want = ",".join(expected)
    if not rows:
        raise RetinagenError(f"{path}: {what} is empty; expected the header '{want}' and one row per image")
    header = [c.lower() for c in rows[0][1]]
    if tuple(header) != expected:
        raise RetinagenError(
            f"{path}: {what} must start with the header '{want}', found '{','.join(rows[0][1])}'"
        )
    return rows[1:], display


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


@dataclass
class _LabelRow:
    line: int
    label: int


def _collect_label_rows(
    rows: list[tuple[int, list[str]]],
    csv_name: str,
    n_cols: int,
    valid: Callable[[int], bool],
    label_desc: str,
    file_of: Callable[[str], str],
    rejected: list[Rejected],
) -> tuple[dict[str, list[_LabelRow]], set[str]]:
    """Parse ``name,label`` rows: valid rows grouped by name, plus the names seen in any row.

    Malformed rows and invalid labels are rejected here (``file_of(name)`` is the name reports use).
    """
    good: dict[str, list[_LabelRow]] = {}
    seen: set[str] = set()
    for line, cells in rows:
        if len(cells) != n_cols:
            rejected.append(
                Rejected(
                    f"{csv_name} line {line}", f"malformed row: expected {n_cols} columns, got {len(cells)}"
                )
            )
            continue
        name, text = cells[0], cells[1]
        if not name:
            rejected.append(Rejected(f"{csv_name} line {line}", "malformed row: empty image name"))
            continue
        seen.add(name)
        value = _parse_int(text)
        if value is None or not valid(value):
            rejected.append(
                Rejected(
                    file_of(name), f"unknown label {text!r} in {csv_name} line {line} (expected {label_desc})"
                )
            )
            continue
        good.setdefault(name, []).append(_LabelRow(line, value))
    return good, seen


def _resolve_duplicates(
    good: dict[str, list[_LabelRow]],
    csv_name: str,
    file_of: Callable[[str], str],
    rejected: list[Rejected],
    warnings: list[tuple[str, str]],
) -> dict[str, int]:
    """One label per name: identical duplicates are kept once (with a warning), conflicting ones
    reject the image (which grade is right cannot be known)."""
    out: dict[str, int] = {}
    for name, rows in good.items():
        labels = sorted({r.label for r in rows})
        lines = ", ".join(str(r.line) for r in rows)
        if len(labels) > 1:
            rejected.append(
                Rejected(
                    file_of(name),
                    f"conflicting duplicate label rows in {csv_name} (lines {lines}: labels "
                    f"{', '.join(map(str, labels))})",
                )
            )
            continue
        if len(rows) > 1:
            warnings.append(
                (file_of(name), f"identical duplicate label rows in {csv_name} (lines {lines}); kept once")
            )
        out[name] = labels[0]
    return out


def _patient_and_eye(stem: str) -> tuple[str | None, str | None]:
    base, sep, side = stem.rpartition("_")
    if sep and base and side.lower() in _EYES:
        return base, side.lower()
    return None, None


def _read_factors(root: Path, scan: SourceScan) -> dict[str, dict[str, float]]:
    """``factors.csv`` of ``retinagen synth`` output: stem -> {factor: value}. Optional extras: a
    problem drops the factors (with a warning), it never rejects images."""
    path = root / "factors.csv"
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader)]
            if not header or header[0] != "image" or len(header) < 2:
                raise ValueError("first column must be 'image'")
            values: dict[str, dict[str, float]] = {}
            for row in reader:
                if not any(row):
                    continue
                if len(row) != len(header):
                    raise ValueError("row with a wrong number of columns")
                nums = [float(x) for x in row[1:]]
                if not all(math.isfinite(v) for v in nums):
                    raise ValueError("non-finite value")
                values[row[0].strip()] = dict(zip(header[1:], nums, strict=True))
    except (OSError, ValueError, StopIteration, csv.Error) as e:
        scan.warnings.append(
            ("factors.csv", f"ignored: {e if isinstance(e, ValueError) else type(e).__name__}")
        )
        return {}
    scan.input_files.append(path)
    scan.factor_names = tuple(header[1:])
    return values


# --------------------------------------------------------------------------------------------------
# Graded fundus datasets (EyePACS, APTOS): a folder of images named by id + a CSV of grades


def _scan_graded(
    root: Path,
    *,
    image_dir: str,
    csv_path: Path,
    header: tuple[str, str],
    layout: str,
    with_patients: bool,
) -> SourceScan:
    missing = [
        p
        for p, ok in ((f"{image_dir}/", (root / image_dir).is_dir()), (csv_path.name, csv_path.is_file()))
        if not ok
    ]
    if missing:
        raise RetinagenError(
            f"{root}: not the {layout}; missing: {', '.join(missing)} "
            f"(expected {image_dir}/<id>.<ext> images and a CSV with header '{','.join(header)}')"
        )
    scan = SourceScan(records=[], rejected=[], domain="fundus", num_classes=DR_GRADES, input_files=[csv_path])
    rows, csv_name = _read_csv(csv_path, header, "the labels file")

    # Images by stem; two files with one stem (10_left.jpeg and 10_left.png) are ambiguous.
    by_stem: dict[str, list[str]] = {}
    for key in _list_dir(root, image_dir):
        if PurePosixPath(key).suffix.lower() not in IMAGE_EXTENSIONS:
            if (root / key).is_file():
                scan.ignored.append(key)
            continue
        by_stem.setdefault(PurePosixPath(key).stem, []).append(key)
    if not by_stem and not rows:
        raise RetinagenError(f"{root}: no images in {image_dir}/ and no rows in {csv_name}")

    def file_of(stem: str) -> str:
        keys = by_stem.get(stem)
        return keys[0] if keys and len(keys) == 1 else f"{image_dir}/{stem} ({csv_name})"

    good, seen = _collect_label_rows(
        rows, csv_name, 2, lambda g: 0 <= g < DR_GRADES, "an integer 0-4", file_of, scan.rejected
    )
    labels = _resolve_duplicates(good, csv_name, file_of, scan.rejected, scan.warnings)
    factors = _read_factors(root, scan) if with_patients else {}
    scan.synthetic = with_patients and (root / "synth.json").is_file()

    for stem in sorted(set(labels) - set(by_stem)):
        scan.rejected.append(Rejected(f"{image_dir}/{stem} ({csv_name})", "label row for missing image"))
    for stem, keys in sorted(by_stem.items()):
        if len(keys) > 1:
            for key in keys:
                scan.rejected.append(
                    Rejected(key, f"ambiguous: several files named {stem}.* ({', '.join(keys)})")
                )
            continue
        key = keys[0]
        if stem not in labels:
            if stem not in seen:  # rows with a bad label were rejected above already
                scan.rejected.append(Rejected(key, f"no label row in {csv_name}"))
            continue
        path = _checked(root, key, scan.rejected)
        if path is None:
            continue
        patient, eye = _patient_and_eye(stem) if with_patients else (None, None)
        scan.records.append(
            Record(
                key=key, path=path, label=labels[stem], patient_id=patient, eye=eye, factors=factors.get(stem)
            )
        )
    return scan


@register_source("eyepacs")
def eyepacs(data_root: Path, labels: Path | None) -> SourceScan:
    """EyePACS (Kaggle DR): ``train/*.jpeg`` + ``trainLabels.csv`` (``image,level``); ``labels``
    replaces the CSV."""
    return _scan_graded(
        data_root,
        image_dir="train",
        csv_path=labels if labels is not None else data_root / "trainLabels.csv",
        header=("image", "level"),
        layout="EyePACS layout",
        with_patients=True,
    )


@register_source("aptos")
def aptos(data_root: Path, labels: Path | None) -> SourceScan:
    """APTOS 2019: ``train_images/*.png`` + ``train.csv`` (``id_code,diagnosis``); ``labels``
    replaces the CSV."""
    return _scan_graded(
        data_root,
        image_dir="train_images",
        csv_path=labels if labels is not None else data_root / "train.csv",
        header=("id_code", "diagnosis"),
        layout="APTOS layout",
        with_patients=False,
    )


# --------------------------------------------------------------------------------------------------
# CelebA


def _read_celeba_attrs(
    path: Path, rejected: list[Rejected], warnings: list[tuple[str, str]]
) -> tuple[tuple[str, ...], dict[str, dict[str, int]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RetinagenError(f"{path}: cannot read the attribute file ({type(e).__name__})") from None
    expected = "line 1: the image count; line 2: the attribute names; then 'file v1 ... vN' with -1/1"
    if len(lines) < 2 or _parse_int(lines[0].strip()) is None or not lines[1].split():
        raise RetinagenError(f"{path}: not a CelebA attribute file (expected {expected})")
    names = tuple(lines[1].split())
    if len(set(names)) != len(names):
        raise RetinagenError(f"{path}: duplicate attribute names on line 2")
    rows: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for i, line in enumerate(lines[2:], start=3):
        cells = line.split()
        if not cells:
            continue
        where = f"{path.name} line {i}"
        if len(cells) != len(names) + 1:
            rejected.append(
                Rejected(
                    where,
                    f"malformed row: expected a file name and {len(names)} values, got {len(cells)} fields",
                )
            )
            continue
        values = [_parse_int(v) for v in cells[1:]]
        if any(v not in (-1, 1) for v in values):
            rejected.append(
                Rejected(f"img_align_celeba/{cells[0]}", f"attribute values must be -1 or 1 ({where})")
            )
            continue
        rows.setdefault(cells[0], []).append((i, tuple(int(v == 1) for v in values)))
    attrs: dict[str, dict[str, int]] = {}
    for fname, found in rows.items():
        lines_text = ", ".join(str(n) for n, _ in found)
        if len({v for _, v in found}) > 1:
            rejected.append(
                Rejected(
                    f"img_align_celeba/{fname}",
                    f"conflicting duplicate rows in {path.name} (lines {lines_text})",
                )
            )
            continue
        if len(found) > 1:
            warnings.append(
                (
                    f"img_align_celeba/{fname}",
                    f"identical duplicate rows in {path.name} (lines {lines_text}); kept once",
                )
            )
        attrs[fname] = dict(zip(names, found[0][1], strict=True))
    return names, attrs


def _read_celeba_partition(path: Path, rejected: list[Rejected]) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RetinagenError(f"{path}: cannot read the partition file ({type(e).__name__})") from None
    out: dict[str, str] = {}
    for i, line in enumerate(lines, start=1):
        cells = line.split()
        if not cells:
            continue
        v = _parse_int(cells[1]) if len(cells) == 2 else None
        if v not in (0, 1, 2):
            rejected.append(Rejected(f"{path.name} line {i}", "malformed row: expected 'file 0|1|2'"))
            continue
        out[cells[0]] = SPLIT_NAMES[v]
    return out


@register_source("celeba")
def celeba(data_root: Path, labels: Path | None) -> SourceScan:
    """CelebA aligned faces with their 40 binary attributes and the official partition."""
    if labels is not None:
        raise RetinagenError(
            "--labels is not used with --dataset celeba (attributes come from list_attr_celeba.txt)"
        )
    img_dir = data_root / "img_align_celeba"
    attr_path = data_root / "list_attr_celeba.txt"
    missing = [
        n
        for n, ok in (("img_align_celeba/", img_dir.is_dir()), (attr_path.name, attr_path.is_file()))
        if not ok
    ]
    if missing:
        raise RetinagenError(
            f"{data_root}: not the CelebA layout; missing: {', '.join(missing)} (expected img_align_celeba/*.jpg, "
            "list_attr_celeba.txt and optionally list_eval_partition.txt)"
        )
    scan = SourceScan(records=[], rejected=[], domain="face", num_classes=None, input_files=[attr_path])
    names, attrs = _read_celeba_attrs(attr_path, scan.rejected, scan.warnings)
    scan.attr_names = names
    part_path = data_root / "list_eval_partition.txt"
    if part_path.is_file():
        scan.input_files.append(part_path)
        splits = _read_celeba_partition(part_path, scan.rejected)
    else:
        splits = {}
        scan.warnings.append(
            ("list_eval_partition.txt", "absent: splits are drawn per image from --split-seed")
        )

    listed: dict[str, str] = {}
    for key in _list_dir(data_root, "img_align_celeba"):
        fname = PurePosixPath(key).name
        if PurePosixPath(fname).suffix.lower() in IMAGE_EXTENSIONS:
            listed[fname] = key
        elif (data_root / key).is_file():
            scan.ignored.append(key)
    for fname in sorted(set(attrs) - set(listed)):
        scan.rejected.append(
            Rejected(f"img_align_celeba/{fname} ({attr_path.name})", "label row for missing image")
        )
    already = {r.file for r in scan.rejected}
    for fname, key in sorted(listed.items()):
        if fname not in attrs:
            if key not in already:
                scan.rejected.append(Rejected(key, f"no label row in {attr_path.name}"))
            continue
        path = _checked(data_root, key, scan.rejected)
        if path is None:
            continue
        scan.records.append(Record(key=key, path=path, attrs=attrs[fname], split=splits.get(fname)))
    return scan


# --------------------------------------------------------------------------------------------------
# Folder / DICOM folder with an optional labels CSV


def _scan_folder(root: Path, labels: Path | None, *, dicom_only: bool) -> SourceScan:
    scan = SourceScan(records=[], rejected=[], domain="fundus", num_classes=None)
    kind = "DICOM files" if dicom_only else "image files"
    candidates: list[str] = []
    for key in _walk_files(root):
        if dicom_only:
            ok = PurePosixPath(key).suffix.lower() in DICOM_EXTENSIONS or is_dicom_file(root / key)
        else:
            ok = PurePosixPath(key).suffix.lower() in IMAGE_EXTENSIONS
        (candidates if ok else scan.ignored).append(key)
    if labels is not None:
        scan.input_files.append(labels)
        # A labels CSV inside the data root is metadata, not an image to report as ignored.
        scan.ignored = [k for k in scan.ignored if (root / k).resolve() != labels.resolve()]
    if not candidates and labels is None:
        exts = ".dcm/.dicom or the DICM magic" if dicom_only else ", ".join(sorted(IMAGE_EXTENSIONS))
        raise RetinagenError(f"{root}: no {kind} found ({exts}); hidden files and folders are skipped")

    if labels is None:
        for key in candidates:
            path = _checked(root, key, scan.rejected)
            if path is not None:
                scan.records.append(Record(key=key, path=path))
        return scan

    rows, csv_name = _read_csv(labels, ("image", "label"), "the labels file")
    unsafe: set[str] = set()

    def file_of(name: str) -> str:
        return _norm_key(name) if name not in unsafe else name

    # Paths first: an unsafe path is rejected for that reason, whatever its label says.
    safe_rows: list[tuple[int, list[str]]] = []
    for line, cells in rows:
        if len(cells) == 2 and cells[0]:
            try:
                resolve_inside(root, cells[0])
            except UnsafePathError as e:
                unsafe.add(cells[0])
                scan.rejected.append(Rejected(cells[0], f"{e.reason} ({csv_name} line {line})"))
                continue
        safe_rows.append((line, cells))
    good, seen = _collect_label_rows(
        safe_rows, csv_name, 2, lambda v: v >= 0, "an integer >= 0", file_of, scan.rejected
    )
    # Two spellings of one file (a/b.png, ./a/b.png) are the same image.
    merged: dict[str, list[_LabelRow]] = {}
    for name, rws in good.items():
        merged.setdefault(_norm_key(name), []).extend(rws)
    label_of = _resolve_duplicates(merged, csv_name, lambda k: k, scan.rejected, scan.warnings)
    seen_keys = {_norm_key(n) for n in seen | unsafe}

    for key, label in sorted(label_of.items()):
        path = resolve_inside(root, key)
        if not path.exists():
            scan.rejected.append(Rejected(key, f"label row for missing image ({csv_name})"))
            continue
        if not path.is_file():
            scan.rejected.append(Rejected(key, "not a regular file (broken link or folder)"))
            continue
        if dicom_only and not is_dicom_file(path):
            scan.rejected.append(Rejected(key, "not a DICOM file (no .dcm extension and no DICM magic)"))
            continue
        scan.records.append(Record(key=key, path=path, label=label))
    for key in candidates:
        if key not in seen_keys:
            scan.rejected.append(Rejected(key, f"no label row in {csv_name}"))
    scan.records.sort(key=lambda r: r.key)
    if not scan.records and not scan.rejected:
        raise RetinagenError(f"{root}: no {kind} found and {csv_name} has no rows")
    return scan


@register_source("folder")
def folder(data_root: Path, labels: Path | None) -> SourceScan:
    """Every image under the data root; labels from an optional ``image,label`` CSV."""
    return _scan_folder(data_root, labels, dicom_only=False)


@register_source("dicom")
def dicom(data_root: Path, labels: Path | None) -> SourceScan:
    """Every DICOM file under the data root; labels from an optional ``image,label`` CSV."""
    return _scan_folder(data_root, labels, dicom_only=True)
