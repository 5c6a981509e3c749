"""The grader's data: uint8 images from a prepared ZIP or a synthetic folder, and the patient-level split.

Real: a ZIP written by ``retinagen prepare``; its own ``test`` split is used when present, otherwise patients are
split with ``seed``, stratified by each patient's highest grade, and a training image whose patient is also in
the test set is dropped and counted. Synthetic: a folder of PNGs + ``manifest.csv`` as ``retinagen rebalance``
writes it; rows with a missing or malformed file name or grade, a path outside the folder, a duplicate, or an
unreadable or non-square image are skipped and listed with their reason, and the job goes on.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from retinagen.data.dataset import ZipImageDataset
from retinagen.data.imageio import decode_image, resolve_inside
from retinagen.dr_scale import NUM_GRADES
from retinagen.errors import BadInputError, ConfigError
from retinagen.progress import progress_bar

# --------------------------------------------------------------------------------------------------
# Images


def resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, R, R] (antialiased bilinear); unchanged when already R x R.

    One function for training, test and `predict_proba`, so a grader sees every image resized alike.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"resize_uint8 expects uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if images.shape[2] == resolution and images.shape[3] == resolution:
        return images
    if images.shape[0] == 0:
        return images.new_zeros((0, 3, resolution, resolution))
    x = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                      antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _hwc_to_chw_u8(img: np.ndarray, what: str) -> torch.Tensor:
    if img.dtype == np.uint16:  # 16-bit PNG: keep the top 8 bits' worth, rounded
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise BadInputError(what, f"expected an RGB image, got {img.dtype} {img.shape}")
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


@dataclass
class _ZipPart:
    """Members ``indices`` of a prepared ZIP (indices into ``ZipImageDataset(path)``)."""

    dataset: ZipImageDataset
    indices: np.ndarray
    labels: np.ndarray
    cache: torch.Tensor | None = None

    synthetic = False

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> torch.Tensor:
        return _hwc_to_chw_u8(self.dataset.read_uint8(int(self.indices[i])), str(self.dataset.path))


@dataclass
class _PngPart:
    """Image files (synthetic PNGs checked by `load_synthetic_folder`)."""

    paths: list[Path]
    labels: np.ndarray
    cache: torch.Tensor | None = None

    synthetic = True

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        return _hwc_to_chw_u8(decode_image(self.paths[i]).pixels, str(self.paths[i]))


class GradedImages(Dataset):
    """DR-graded images from prepared ZIPs and/or PNG files, resized to one resolution.

    Items: uint8 ``[3, R, R]`` RGB (labels are in ``.labels``, np.int64 ``[N]`` in 0..4). Parts are
    shared, not copied, by `concat`: a part loaded into memory once (`load`) stays loaded in every
    dataset that holds it.
    """

    def __init__(self, parts: Sequence[_ZipPart | _PngPart], resolution: int) -> None:
        self.parts = [p for p in parts if len(p) > 0]
        self.resolution = int(resolution)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    @classmethod
    def from_zip(cls, dataset: ZipImageDataset, indices: np.ndarray, resolution: int) -> GradedImages:
        idx = np.asarray(indices, dtype=np.int64)
        return cls([_ZipPart(dataset, idx, dataset.labels[idx].astype(np.int64))], resolution)

    @classmethod
    def from_files(cls, paths: Sequence[Path], labels: np.ndarray, resolution: int) -> GradedImages:
        return cls([_PngPart(list(paths), np.asarray(labels, dtype=np.int64))], resolution)

    def concat(self, other: GradedImages) -> GradedImages:
        if other.resolution != self.resolution:
            raise ValueError("cannot concatenate images of different resolutions")
        return GradedImages(self.parts + other.parts, self.resolution)

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([p.labels for p in self.parts]) if self.parts else np.zeros(0, np.int64)

    @property
    def synthetic(self) -> np.ndarray:
        """bool [N]: True for images from synthetic (PNG) parts."""
        return np.concatenate([np.full(len(p), p.synthetic) for p in self.parts]) if self.parts else np.zeros(0, bool)

    @property
    def nbytes(self) -> int:
        return len(self) * 3 * self.resolution * self.resolution

    @property
    def loaded(self) -> bool:
        return all(p.cache is not None for p in self.parts)

    def _locate(self, i: int) -> tuple[_ZipPart | _PngPart, int]:
        k = bisect.bisect_right(self._starts, i) - 1
        return self.parts[k], i - self._starts[k]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        part, j = self._locate(i)
        if part.cache is not None:
            return part.cache[j]
        return resize_uint8(part.read(j)[None], self.resolution)[0]

    def load(self, *, progress: bool = True, description: str = "load images") -> None:
        """Decode every image of the parts not yet in memory: uint8, N x 3 x R x R bytes."""
        todo = [p for p in self.parts if p.cache is None]
        with progress_bar(sum(len(p) for p in todo), description, enabled=progress and bool(todo)) as bar:
            for part in todo:
                out = torch.empty((len(part), 3, self.resolution, self.resolution), dtype=torch.uint8)
                for j in range(len(part)):
                    out[j] = resize_uint8(part.read(j)[None], self.resolution)[0]
                    bar.advance()
                part.cache = out

    def batch(self, indices: np.ndarray | Sequence[int]) -> torch.Tensor:
        """uint8 [B, 3, R, R] for dataset indices (fast when loaded)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.loaded:
            out = torch.empty((len(indices), 3, self.resolution, self.resolution), dtype=torch.uint8)
            k = np.searchsorted(np.asarray(self._starts), indices, side="right") - 1
            for pk, part in enumerate(self.parts):
                sel = np.nonzero(k == pk)[0]
                if sel.size:
                    assert part.cache is not None
                    out[torch.from_numpy(sel)] = part.cache[torch.from_numpy(indices[sel] - self._starts[pk])]
            return out
        return torch.stack([self[int(i)] for i in indices]) if len(indices) else torch.zeros(
            (0, 3, self.resolution, self.resolution), dtype=torch.uint8)


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


def _iter_batches(data: GradedImages, batches: Sequence[np.ndarray], num_workers: int, pin: bool) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, R, R] per index batch, in order; from memory or through DataLoader workers."""
    if data.loaded or num_workers == 0:
        for b in batches:
            yield data.batch(b)
        return
    loader = DataLoader(data, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                        collate_fn=_stack, pin_memory=pin, persistent_workers=False)
    yield from loader


# --------------------------------------------------------------------------------------------------
# Synthetic folder


@dataclass
class SyntheticSet:
    """The usable rows of a synthetic folder's ``manifest.csv``.

    paths / labels: the kept images and their grades (np.int64 [N]); skipped: one
    ``{"line", "file", "reason"}`` per skipped row (line numbers of the CSV, header = 1); unlisted:
    PNG files in the folder that no row names (ignored); checkpoints: the distinct
    ``checkpoint_sha256`` values of kept rows.
    """

    folder: Path
    paths: list[Path]
    labels: np.ndarray
    n_rows: int
    skipped: list[dict[str, Any]] = field(default_factory=list)
    unlisted: int = 0
    checkpoints: list[str] = field(default_factory=list)

    def images(self, resolution: int) -> GradedImages:
        return GradedImages.from_files(self.paths, self.labels, resolution)

    def label_counts(self) -> dict[int, int]:
        return _counts(self.labels)

    def summary(self) -> dict[str, Any]:
        return {
            "folder": self.folder.name,
            "manifest_rows": self.n_rows,
            "kept": len(self.paths),
            "n_skipped": len(self.skipped),
            "skipped": self.skipped,
            "counts": {str(k): v for k, v in self.label_counts().items()},
            "unlisted_pngs": self.unlisted,
            "checkpoint_sha256": self.checkpoints,
        }


_LABEL_COLUMNS = ("level", "grade")
_MAX_MANIFEST_BYTES = 256 << 20


def _parse_grade(text: str) -> int | None:
    t = text.strip()
    try:
        v = int(t)
    except ValueError:
        try:  # "2.0" from a spreadsheet is a grade; "2.5" is not
            f = float(t)
        except ValueError:
            return None
        if not math.isfinite(f) or f != int(f):
            return None
        v = int(f)
    return v


def _read_manifest(
    manifest: Path,
) -> tuple[list[str], list[str], dict[str, int], list[tuple[int, list[str]]], list[dict[str, Any]]]:
    """The manifest's columns, its grade columns, their positions, the non-blank rows with their line numbers, and
    the skip entry of a CSV error part-way (the rows before it are kept). Refuses a missing, oversized,
    undecodable manifest, or one whose header lacks ``file`` or a grade column."""
    if not manifest.is_file():
        raise BadInputError(manifest, "no manifest.csv in the synthetic folder (it lists file, level, synthetic=1, ...)")
    if manifest.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BadInputError(manifest, f"implausibly large manifest ({manifest.stat().st_size:,} bytes)")
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(manifest, f"cannot be read as UTF-8 text ({type(exc).__name__})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise BadInputError(manifest, "empty manifest (no header row)") from None
    except csv.Error as exc:
        raise BadInputError(manifest, f"malformed CSV header ({exc})") from None
    cols = [h.strip().lower() for h in header]
    if "file" not in cols:
        raise BadInputError(manifest, f"header has no 'file' column (columns: {', '.join(cols) or 'none'})")
    label_cols = [c for c in _LABEL_COLUMNS if c in cols]
    if not label_cols:
        raise BadInputError(manifest, "header has no 'level' or 'grade' column")
    rows: list[tuple[int, list[str]]] = []
    skipped: list[dict[str, Any]] = []
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        # A broken quote swallows the rest of the file: keep what came before, report the rest once.
        skipped.append({"line": reader.line_num, "file": "",
                        "reason": f"malformed CSV from here on ({exc}); the remaining lines are ignored"})
    return cols, label_cols, {c: cols.index(c) for c in cols}, rows, skipped


def _check_row(folder: Path, name: str, row: list[str], cols: list[str], label_cols: list[str], pos: dict[str, int],
               seen: set[Path], check_images: bool) -> tuple[int, Path] | str:
    """(grade, path) of a usable manifest row, or the reason it is skipped."""
    if len(row) != len(cols):
        return f"malformed row: {len(row)} fields, the header has {len(cols)}"
    grades = {}
    for c in label_cols:
        raw = row[pos[c]].strip()
        if not raw:
            grades[c] = ("missing", raw)
            continue
        g = _parse_grade(raw)
        grades[c] = ("ok", g) if g is not None else ("malformed", raw)
    bad = [(c, st, v) for c, (st, v) in grades.items() if st != "ok"]
    if bad:
        c, st, v = bad[0]
        return f"{st} grade in column '{c}'" + (f": {v!r}" if st == "malformed" else "")
    values = {v for _, v in grades.values()}
    if len(values) > 1:
        return "columns 'level' and 'grade' disagree"
    grade = int(values.pop())
    if not 0 <= grade < NUM_GRADES:
        return f"grade {grade} outside 0-{NUM_GRADES - 1}"
    if "synthetic" in pos and row[pos["synthetic"]].strip() not in ("1", "1.0", "true", "True", "yes"):
        return (f"not marked synthetic=1 (got {row[pos['synthetic']].strip()!r}); real images "
                "do not belong in the synthetic arm")
    try:
        path = resolve_inside(folder, name)
    except BadInputError as exc:
        return exc.reason
    if path in seen:
        return "duplicate row for a file already listed"
    if check_images:
        try:
            img = decode_image(path).pixels
        except BadInputError as exc:
            return exc.reason
        except Exception as exc:  # a decoder bug must not abort the job; its message may quote content
            return f"internal error while reading: {type(exc).__name__}"
        if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] != img.shape[1]:
            return f"image is {img.shape[1]} x {img.shape[0]}, expected a square RGB image"
    return grade, path


def load_synthetic_folder(folder: str | Path, *, check_images: bool = True, progress: bool = True) -> SyntheticSet:
    """Read ``folder/manifest.csv`` and keep the rows that are usable training data.

    Skipped (listed with the reason, never fatal): a row whose field count differs from the header,
    an empty / absolute / escaping file name, a duplicate file, a missing, non-integer or out-of-range
    grade (``level`` and ``grade`` both present and different, too), ``synthetic`` other than 1 (a
    real image must not slip into the synthetic arm), and, with ``check_images``, a file that is
    missing, unreadable, not RGB-decodable or not square.

    Raises `BadInputError` when the folder or manifest is missing or unreadable, the header lacks
    ``file`` or a grade column, or no row is usable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(folder, "synthetic folder does not exist (make one with `retinagen rebalance`)")
    manifest = folder / "manifest.csv"
    cols, label_cols, pos, rows, skipped = _read_manifest(manifest)
    paths: list[Path] = []
    labels: list[int] = []
    sha: list[str] = []
    seen: set[Path] = set()
    named: set[Path] = set()  # every file a row names (kept or not), for the unlisted-PNG count
    n_rows = 0

    with progress_bar(len(rows), "check synthetic images", enabled=progress and check_images) as bar:
        for line, row in rows:
            n_rows += 1
            bar.advance()
            name = row[pos["file"]].strip() if len(row) > pos["file"] else ""
            with contextlib.suppress(BadInputError):
                named.add(resolve_inside(folder, name))
            checked = _check_row(folder, name, row, cols, label_cols, pos, seen, check_images)
            if isinstance(checked, str):
                skipped.append({"line": line, "file": name, "reason": checked})
                continue
            grade, path = checked
            seen.add(path)
            paths.append(path)
            labels.append(grade)
            if "checkpoint_sha256" in pos and row[pos["checkpoint_sha256"]].strip():
                sha.append(row[pos["checkpoint_sha256"]].strip())

    unlisted = sum(1 for p in folder.glob("*.png") if p.resolve() not in named)
    if not paths:
        first = "; ".join(f"line {s['line']}: {s['reason']}" for s in skipped[:3]) or "no data rows"
        raise BadInputError(manifest, f"no usable synthetic images ({n_rows} rows, all skipped: {first})")
    return SyntheticSet(
        folder=folder,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        n_rows=n_rows,
        skipped=skipped,
        unlisted=unlisted,
        checkpoints=sorted(set(sha)),
    )


# --------------------------------------------------------------------------------------------------
# Patient-level split of the real data


def _counts(labels: np.ndarray) -> dict[int, int]:
    c = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_GRADES)[:NUM_GRADES]
    return {k: int(v) for k, v in enumerate(c)}


def split_by_group(labels: np.ndarray, groups: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """bool [N]: True for test images. Whole groups (patients) go to one side.

    Groups are stratified by their highest label, shuffled within each stratum with ``seed`` and
    ``round(test_fraction * size)`` of each stratum go to test (at least one group overall).
    """
    labels = np.asarray(labels)
    if len(groups) != len(labels):
        raise ValueError("labels and groups must have the same length")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    strata: dict[int, list[str]] = {}
    for g, idx in members.items():
        strata.setdefault(int(labels[idx].max()), []).append(g)
    rng = np.random.default_rng(seed)
    test_groups: list[str] = []
    for top in sorted(strata):
        gs = sorted(strata[top])
        order = rng.permutation(len(gs))
        test_groups += [gs[k] for k in order[: int(round(test_fraction * len(gs)))]]
    if not test_groups and len(members) >= 2:
        largest = max(sorted(strata), key=lambda t: len(strata[t]))
        test_groups.append(sorted(strata[largest])[int(rng.integers(len(strata[largest])))])
    is_test = np.zeros(len(labels), dtype=bool)
    for g in test_groups:
        is_test[members[g]] = True
    return is_test


@dataclass
class RealSplit:
    """Train / test indices into ``ZipImageDataset(path)`` (all images), and how they were made.

    method: "dataset" (the ZIP's own split: test vs train+val), "patient" or "image" (made here
    with ``seed``). patients_in_both is 0 by construction; dropped_for_leakage counts training images
    removed because their patient is in the test set.
    """

    train: np.ndarray
    test: np.ndarray
    method: str
    seed: int | None
    test_fraction: float | None
    n_unlabelled: int
    dropped_for_leakage: int
    groups: list[str]

    def summary(self, labels: np.ndarray) -> dict[str, Any]:
        g = np.asarray(self.groups, dtype=object)
        train_p = {x for x in g[self.train] if x.startswith("p:")}
        test_p = {x for x in g[self.test] if x.startswith("p:")}
        return {
            "method": self.method,
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "n_train": int(len(self.train)),
            "n_test": int(len(self.test)),
            "train_counts": {str(k): v for k, v in _counts(labels[self.train]).items()},
            "test_counts": {str(k): v for k, v in _counts(labels[self.test]).items()},
            "n_train_patients": len(train_p),
            "n_test_patients": len(test_p),
            "patients_in_both": len(train_p & test_p),
            "dropped_for_leakage": self.dropped_for_leakage,
            "n_unlabelled_excluded": self.n_unlabelled,
        }


def split_real(ds: ZipImageDataset, *, seed: int = 0, test_fraction: float = 0.2) -> RealSplit:
    """Held-out test images of a prepared dataset with no patient on both sides (see the module docstring)."""
    labels = ds.labels
    if labels.size and labels.max() >= NUM_GRADES:
        raise BadInputError(ds.path, f"labels must be DR grades 0-{NUM_GRADES - 1}; found {int(labels.max())}")
    labelled = np.nonzero(labels >= 0)[0]
    if labelled.size == 0:
        raise BadInputError(ds.path, "the dataset has no DR grade labels; a grader cannot be trained or tested")
    patients = ds.meta.get("patients") if isinstance(ds.meta.get("patients"), dict) else {}
    groups = [f"p:{patients[n]}" if n in patients else f"i:{n}" for n in ds.names]
    splits = ds.meta.get("splits") if isinstance(ds.meta.get("splits"), dict) else {}
    in_test = np.array([splits.get(n) == "test" for n in ds.names], dtype=bool)
    if in_test[labelled].any() and (~in_test[labelled]).any():
        method, used_seed, frac = "dataset", None, None
        test_mask = in_test
    else:
        method = "patient" if patients else "image"
        used_seed, frac = seed, test_fraction
        test_mask = np.zeros(len(labels), dtype=bool)
        test_mask[labelled] = split_by_group(labels[labelled], [groups[i] for i in labelled], test_fraction, seed)
    test = labelled[test_mask[labelled]]
    test_groups = {groups[i] for i in test}
    train_all = labelled[~test_mask[labelled]]
    # Whatever made the split, no patient may be on both sides: drop the training images that would leak.
    keep = np.array([groups[i] not in test_groups for i in train_all], dtype=bool)
    train = train_all[keep]
    if test.size == 0 or train.size == 0:
        raise BadInputError(ds.path, f"too few labelled images ({labelled.size}) for a train/test split")
    return RealSplit(train=train, test=test, method=method, seed=used_seed, test_fraction=frac,
                     n_unlabelled=int((labels < 0).sum()), dropped_for_leakage=int((~keep).sum()), groups=groups)
