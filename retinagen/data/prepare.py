"""``retinagen prepare``: a raw dataset -> a ZIP of PNGs + ``dataset.json`` + a report.

Output (the NVlabs StyleGAN dataset layout, which their tools and `ZipImageDataset` read)
    ``OUT.zip``: ``00000/img00000000.png``, ``00000/img00000001.png``, ... (1000 per folder), every
    image ``resolution x resolution`` RGB uint8, PNG without any text / time / metadata chunk, stored
    uncompressed in the ZIP (PNG already is), and ``dataset.json``::

        {"labels": [["00000/img00000000.png", 3], ...] | null,   # NVlabs' key
         "format": "retinagen-dataset", "version": 1, "resolution": R, "source": "eyepacs",
         "num_classes": 5 | null, "synthetic": false,
         "keys": {fname: data-root-relative source file}, "splits": {fname: "train"|"val"|"test"},
         "patients": {fname: id}, "eyes": {fname: "left"|"right"},            # where known
         "attrs": {"names": [...], "values": {fname: [0/1, ...]}},             # CelebA
         "factors": {"names": [...], "values": {fname: [float, ...]}}}         # retinagen synth data

    ``OUT.report.json`` (beside it): counts (seen / kept / rejected, per label, per split), every
    rejected file with its reason, warnings, ignored non-image files, settings and timing. File names
    are data-root-relative; no absolute path and no DICOM header value other than the technical ones
    `read_dicom` returns ever reaches the ZIP or the report.

    The ZIP is assembled in a temporary file and renamed into place at the end, so an interrupted
    run leaves nothing half-written. The ZIP is deterministic: the same inputs and settings give the
    same bytes for any number of workers (fixed member order and timestamps), so its fingerprint is
    a stable dataset identity for checkpoints.

Processing
    Records are processed in chunks by worker processes with a bounded window of chunks in flight
    (results come back in order, memory stays flat for 35k images). Each worker reads and validates a
    file (`decode_image`), preprocesses it (fundus: `preprocess_fundus`; faces: centre square crop,
    resize) and returns PNG bytes or a rejection reason. One bad file never stops the run: any
    `RetinagenError` becomes a rejection with its reason, any other exception a rejection
    ``internal error: <type>``; a worker process that dies (a decoder crash, the OOM killer) is
    replaced and the file that killed it is found by retrying its chunk one file at a time.

    Why `concurrent.futures` and not `multiprocessing.Pool.imap`: a pool whose worker dies hangs
    ``imap`` forever, while the executor raises `BrokenProcessPool`, which is what makes the
    "one file never aborts the run" promise keepable. Workers start from a ``forkserver`` (``spawn``
    where there is none): forking the main process would copy the progress bar's and torch's
    threads into the child, which can deadlock.

Splits
    Patient-level and deterministic in ``split_seed``: both eyes of a patient land in the same split.
    Groups (patients; single images when the source has no patient ids) are stratified by the
    group's highest label, shuffled within each stratum and cut by ``split_fractions``. Sources that
    define their own split (CelebA's partition) keep it.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import signal
import time
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from retinagen import __version__
from retinagen.checks import Count, check, int_in
from retinagen.data import default_workers
from retinagen.data.imageio import DEFAULT_MAX_PIXELS, decode_image
from retinagen.data.sources import SPLIT_NAMES, Record, Rejected, SourceScan, scan_source
from retinagen.errors import BadInputError, RetinagenError
from retinagen.fileio import atomic_path, atomic_write_json
from retinagen.progress import progress_bar

__all__ = [
    "DATASET_FORMAT",
    "DATASET_VERSION",
    "IMAGES_PER_FOLDER",
    "PrepareSummary",
    "PreparedImage",
    "assign_splits",
    "encode_png",
    "face_crop",
    "member_name",
    "prepare_dataset",
    "prepare_image",
    "report_path_for",
]

DATASET_FORMAT = "retinagen-dataset"
DATASET_VERSION = 1
IMAGES_PER_FOLDER = 1000
MIN_RESOLUTION = 8
MAX_RESOLUTION = 2048
# zlib level 1: ~2x smaller than uncompressed at a fraction of the time of level 6+, and decoding
# speed (what training pays) hardly depends on the level.
PNG_COMPRESSION = 1
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: deterministic ZIP bytes
_MAX_CONSECUTIVE_CRASHES = 3
_MIN_RECORDS_FOR_PROCESSES = 100  # below this the default (workers=None) runs in this process


@dataclass(frozen=True)
class PrepareSummary:
    """What `prepare_dataset` did. label_counts: kept images per label (empty when unlabelled)."""

    out: Path
    report_path: Path
    n_seen: int
    n_kept: int
    n_rejected: int
    label_counts: dict[int, int]
    elapsed_s: float
    images_per_s: float


@dataclass(frozen=True)
class PreparedImage:
    """pixels: uint8 [R, R, 3] RGB as stored in the dataset; warnings / laterality from reading."""

    pixels: np.ndarray
    warnings: tuple[str, ...] = ()
    laterality: str | None = None


def report_path_for(out: str | Path) -> Path:
    """``d.zip`` -> ``d.report.json`` (beside the dataset)."""
    out = Path(out)
    return out.with_name(out.stem + ".report.json")


def member_name(index: int) -> str:
    """ZIP member of the ``index``-th kept image: ``00000/img00000000.png`` (1000 per folder)."""
    return f"{index // IMAGES_PER_FOLDER:05d}/img{index:08d}.png"


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise ValueError(f"expected uint8 or uint16, got {img.dtype}")


def face_crop(img: np.ndarray, resolution: int) -> np.ndarray:
    """Face photo [H, W, 3] uint8/uint16 -> uint8 [R, R, 3]: centre square crop, then resize.

    For CelebA's aligned 178 x 218 images this is the usual 178 x 178 centre crop (rows 20-197),
    which keeps the whole face; other sizes get the largest centred square. Shrinking uses area
    averaging (no aliasing), enlarging bicubic.
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"face_crop expects [H, W, 3], got {img.shape}")
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = _to_uint8(img[top : top + side, left : left + side])
    if side == resolution:
        return np.ascontiguousarray(crop)
    interp = cv2.INTER_AREA if side > resolution else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(crop, (resolution, resolution), interpolation=interp))


def prepare_image(
    path: str | Path,
    resolution: int,
    *,
    domain: str = "fundus",
    ben_graham: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Read one file and preprocess it exactly as `prepare_dataset` does: uint8 [R, R, 3] RGB.

    domain "fundus": field-of-view crop, resize, circular mask (+ Ben Graham); "face": centre crop.
    Raises ImageDecodeError / DicomError / NoFundusError (all `BadInputError`) for a bad file.
    """
    decoded = decode_image(path, max_pixels=max_pixels)
    if domain == "fundus":
        from retinagen.data.preprocess import preprocess_fundus

        pixels = preprocess_fundus(decoded.pixels, resolution, ben_graham=ben_graham)
    elif domain == "face":
        pixels = face_crop(decoded.pixels, resolution)
    else:
        raise ValueError(f"domain must be 'fundus' or 'face', got {domain!r}")
    if pixels.shape != (resolution, resolution, 3) or pixels.dtype != np.uint8:
        raise RuntimeError(
            f"preprocessing returned {pixels.shape} {pixels.dtype}, expected ({resolution}, {resolution}, 3) uint8"
        )
    return PreparedImage(pixels=pixels, warnings=decoded.warnings, laterality=decoded.laterality)


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB -> PNG bytes with only IHDR / IDAT / IEND chunks (no metadata at all)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png expects uint8 [H, W, 3], got {rgb.shape} {rgb.dtype}")
    ok, buf = cv2.imencode(
        ".png", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    )
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


# --------------------------------------------------------------------------------------------------
# Splits


def assign_splits(
    records: Sequence[Record], seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> list[str]:
    """Split name ("train" / "val" / "test") for each record; see the module docstring.

    Deterministic in ``seed``; records of one patient always share a split; a record whose
    ``split`` is already set keeps it.
    """
    fr = _check_fractions(fractions)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r.split is None:
            gid = f"p:{r.patient_id}" if r.patient_id is not None else f"i:{r.key}"
            groups.setdefault(gid, []).append(i)
    strata: dict[int, list[str]] = {}
    for gid, idx in groups.items():
        top = max((records[i].label for i in idx if records[i].label is not None), default=-1)
        strata.setdefault(top, []).append(gid)
    rng = np.random.default_rng(seed)
    out: list[str] = [r.split if r.split is not None else "" for r in records]
    for top in sorted(strata):
        gids = sorted(strata[top])
        order = rng.permutation(len(gids))
        counts = _largest_remainder(len(gids), fr)
        bounds = np.cumsum(counts)
        for pos, g in enumerate(order):
            split = SPLIT_NAMES[int(np.searchsorted(bounds, pos, side="right"))]
            for i in groups[gids[g]]:
                out[i] = split
    return out


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise RetinagenError(
            f"split fractions must be 3 non-negative numbers summing to 1, got {tuple(fractions)}"
        )
    return fr  # type: ignore[return-value]


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to n, as close to n * fractions as possible (ties: earlier split)."""
    raw = [n * f for f in fractions]
    counts = [int(math.floor(x)) for x in raw]
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# Workers


@dataclass(frozen=True)
class _Settings:
    resolution: int
    domain: str
    ben_graham: bool
    max_pixels: int


# (record index, PNG bytes or None, rejection reason or None, warnings, laterality)
_Outcome = tuple[int, bytes | None, str | None, tuple[str, ...], str | None]
_Task = tuple[int, str]  # (record index, path)


def _process_one(task: _Task, s: _Settings) -> _Outcome:
    index, path = task
    try:
        img = prepare_image(
            path, s.resolution, domain=s.domain, ben_graham=s.ben_graham, max_pixels=s.max_pixels
        )
        return index, encode_png(img.pixels), None, img.warnings, img.laterality
    except BadInputError as e:
        return index, None, e.reason, (), None
    except RetinagenError as e:
        return index, None, str(e), (), None
    except MemoryError:
        return index, None, "internal error: MemoryError (not enough memory for this image)", (), None
    except Exception as e:
        # The message is not kept: library messages can quote absolute paths or file content.
        return index, None, f"internal error: {type(e).__name__}", (), None


def _process_chunk(tasks: list[_Task], s: _Settings) -> list[_Outcome]:
    return [_process_one(t, s) for t in tasks]


def _init_worker() -> None:
    # Ctrl-C goes to the whole process group; the parent cleans up, workers just stop quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One OpenCV thread per worker process: the parallelism is the processes.
    cv2.setNumThreads(1)


def _mp_context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Import the heavy modules (torch, MONAI via fundus) once in the server, not per worker.
        ctx.set_forkserver_preload(["retinagen.data.prepare", "retinagen.data.preprocess"])
        return ctx
    return multiprocessing.get_context("spawn")


class _Pool:
    """A process pool that survives its workers dying (see the module docstring)."""

    def __init__(self, workers: int, settings: _Settings) -> None:
        self.workers = workers
        self.settings = settings
        self.ctx = _mp_context()
        self.ex = self._new()
        self.crashes_in_a_row = 0

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self.ctx, initializer=_init_worker)

    def submit(self, chunk: list[_Task]) -> Future[list[_Outcome]]:
        """Submit a chunk; if the pool is already broken, a future holding that error (handled,
        like every other loss, when the chunk's turn comes in `_await`)."""
        try:
            return self.ex.submit(_process_chunk, chunk, self.settings)
        except BrokenProcessPool as e:
            failed: Future[list[_Outcome]] = Future()
            failed.set_exception(e)
            return failed

    def restart(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)
        self.ex = self._new()

    def run_single(self, task: _Task) -> _Outcome:
        try:
            out = self.submit([task]).result()[0]
        except BrokenProcessPool:
            self.crashes_in_a_row += 1
            if self.crashes_in_a_row >= _MAX_CONSECUTIVE_CRASHES:
                raise RuntimeError(
                    f"worker processes crashed on {_MAX_CONSECUTIVE_CRASHES} files in a row; "
                    "run with --workers 1 to see the error"
                ) from None
            self.restart()
            return task[0], None, "internal error: the worker process crashed on this file", (), None
        self.crashes_in_a_row = 0
        return out

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


def _outcomes(chunks: Iterator[list[_Task]], settings: _Settings, workers: int) -> Iterator[list[_Outcome]]:
    """Outcomes chunk by chunk, in input order; at most ``4 * workers`` chunks in flight."""
    if workers <= 1:
        for chunk in chunks:
            yield _process_chunk(chunk, settings)
        return
    pool = _Pool(workers, settings)
    window = 4 * workers
    inflight: deque[tuple[list[_Task], Future[list[_Outcome]]]] = deque()
    try:
        for chunk in chunks:
            inflight.append((chunk, pool.submit(chunk)))
            if len(inflight) >= window:
                yield _await(pool, inflight)
        while inflight:
            yield _await(pool, inflight)
    finally:
        pool.close()


def _await(pool: _Pool, inflight: deque[tuple[list[_Task], Future[list[_Outcome]]]]) -> list[_Outcome]:
    chunk, fut = inflight.popleft()
    try:
        result = fut.result()
        pool.crashes_in_a_row = 0
        return result
    except BrokenProcessPool:
        # Every in-flight chunk is lost. Rerun this one a file at a time to find the culprit (it
        # may be in a later chunk: that one breaks again when it is resubmitted and is singled out
        # then); resubmit the others as they were.
        others = [c for c, _ in inflight]
        inflight.clear()
        pool.restart()
        result = [pool.run_single(t) for t in chunk]
        for c in others:
            inflight.append((c, pool.submit(c)))
        return result


def _chunk_size(n: int, workers: int, resolution: int) -> int:
    """Records per task: enough to hide the per-task IPC cost on small images, few enough that the
    results in flight stay small (about 2 MB of PNG per chunk; a 1024 px PNG is ~1.5 MB) and that
    every worker gets work on a small dataset."""
    png_bytes = resolution * resolution * 3 // 2  # PNG of a fundus at zlib level 1: ~half of raw
    by_size = max(1, (2 << 20) // png_bytes)
    return max(1, min(16, by_size, math.ceil(n / max(1, 4 * workers))))


def _chunks(records: Sequence[Record], size: int) -> Iterator[list[_Task]]:
    for start in range(0, len(records), size):
        yield [(i, str(records[i].path)) for i in range(start, min(start + size, len(records)))]


# --------------------------------------------------------------------------------------------------
# The job


def _check_args(
    dataset: str, data_root: Path, resolution: int, out: Path, workers: int | None, max_pixels: int
) -> int:
    check(int_in(), resolution, "--resolution", RetinagenError)
    if not (MIN_RESOLUTION <= resolution <= MAX_RESOLUTION) or resolution & (resolution - 1):
        raise RetinagenError(
            f"--resolution must be a power of two from {MIN_RESOLUTION} to {MAX_RESOLUTION} (StyleGAN's "
            f"generator doubles its resolution per block), got {resolution}"
        )
    if out.suffix.lower() != ".zip":
        raise RetinagenError(f"--out must name a .zip file, got {out}")
    if out.is_dir():
        raise RetinagenError(f"--out {out} is a folder; give a .zip file name")
    check(Count, max_pixels, "max_pixels", RetinagenError)
    if workers is None:
        return default_workers()
    return check(Count, workers, "--workers", RetinagenError)


def _refuse_overwriting_inputs(
    out: Path, report: Path, data_root: Path, scan: SourceScan, labels: Path | None
) -> None:
    """OUT and its report must not be an input file (an image or a label / metadata file). Ignored
    non-image files are not inputs: a previous OUT inside the data root may be replaced."""
    root = data_root.resolve()
    protected = {r.path.resolve() for r in scan.records}
    protected |= {p.resolve() for p in scan.input_files}
    protected |= {(root / r.file).resolve() for r in scan.rejected if (root / r.file).is_file()}
    if labels is not None:
        protected.add(labels.resolve())
    for target, what in ((out, "--out"), (report, "the report file")):
        if target.resolve() in protected:
            raise RetinagenError(f"{what} {target} is an input file of the dataset; choose another name")


def _safe_reason(reason: str, record: Record, data_root: Path) -> str:
    """Keep absolute paths of this machine out of the report (reasons quote only relative names)."""
    # Only absolute paths are replaced: a relative root such as "data" also occurs in plain words.
    for text, repl in (
        (str(record.path), record.key),
        (str(data_root.resolve()), "<data root>"),
        (str(data_root.absolute()), "<data root>"),
    ):
        reason = reason.replace(text, repl)
    return reason


def prepare_dataset(
    dataset: str,
    data_root: Path,
    resolution: int,
    out: Path,
    *,
    labels: Path | None = None,
    ben_graham: bool = False,
    workers: int | None = None,
    split_seed: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    label: str | None = None,
) -> PrepareSummary:
    """Preprocess the raw ``dataset`` under ``data_root`` into ``out`` (a ZIP) and its report.

    Args:
        dataset: a registered source name (eyepacs, aptos, celeba, folder, dicom).
        data_root: folder holding the raw dataset.
        resolution: output side in pixels, a power of two in [8, 2048].
        out: the ZIP to write (``.zip``); the report goes to `report_path_for(out)`.
        labels: labels CSV (``image,label``) for folder/dicom; replaces the default CSV of eyepacs/aptos.
        ben_graham: apply Ben Graham local-contrast normalisation to fundus images.
        workers: processes; None -> ``default_workers()`` (2 at most, 1 under ``OMP_NUM_THREADS=1``), or this
            process alone for < 100 images; 1 -> everything in this process.
        split_seed: seed of the patient-level train/val/test split.
        split_fractions: (train, val, test), summing to 1.
        max_pixels: largest width x height of an input image (decompression-bomb guard).
        progress: show a progress bar (count, images/s, ETA) on stderr.
        label: name shown on the progress bar (default: ``dataset``).

    Raises:
        RetinagenError: bad arguments, a missing or unrecognisable data root, or nothing valid to keep
            (the report is written first and names every rejected file).
    """
    t0 = time.perf_counter()
    data_root, out = Path(data_root), Path(out)
    labels = Path(labels) if labels is not None else None
    n_workers = _check_args(dataset, data_root, resolution, out, workers, max_pixels)
    fractions = _check_fractions(split_fractions)
    report_path = report_path_for(out)

    scan = scan_source(dataset, data_root, labels=labels)
    if ben_graham and scan.domain != "fundus":
        raise RetinagenError(f"--ben-graham applies to fundus images only, not to --dataset {dataset}")
    _refuse_overwriting_inputs(out, report_path, data_root, scan, labels)
    records = scan.records
    splits = assign_splits(records, split_seed, fractions)
    settings = _Settings(
        resolution=resolution, domain=scan.domain, ben_graham=ben_graham, max_pixels=max_pixels
    )

    rejected: list[Rejected] = list(scan.rejected)
    warnings: list[tuple[str, str]] = list(scan.warnings)
    kept: list[tuple[str, int]] = []  # (member name, record index)
    eyes_found: dict[int, str] = {}
    if workers is None and len(records) < _MIN_RECORDS_FOR_PROCESSES:
        # Starting worker processes (each imports torch) costs seconds; not worth it here.
        n_workers = 1
    chunk = _chunk_size(len(records), n_workers, resolution)

    if scan.domain == "fundus":
        # Imported before the clock starts (torch takes seconds): images/s measures images.
        import retinagen.data.preprocess  # noqa: F401
    t_proc = time.perf_counter()
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with progress_bar(
                len(records), f"prepare {label or dataset} {resolution}px", unit="img", enabled=progress
            ) as bar:
                _write_outcomes(zf, records, _outcomes(_chunks(records, chunk), settings, n_workers), data_root,
                                kept, eyes_found, rejected, warnings, bar.advance)
            proc_s = time.perf_counter() - t_proc
            meta = _dataset_json(dataset, scan, records, splits, kept, eyes_found, resolution)
            if kept:
                _add_member(zf, "dataset.json", json.dumps(meta, indent=None, separators=(",", ":")).encode("utf-8"),
                            zipfile.ZIP_DEFLATED)
        images_per_s = len(records) / proc_s if proc_s > 0 else 0.0
        label_counts = dict(
            sorted(Counter(records[i].label for _, i in kept if records[i].label is not None).items())
        )
        report = _report(
            dataset=dataset, data_root=data_root, out=out, labels=labels, resolution=resolution,
            ben_graham=ben_graham, workers=n_workers, split_seed=split_seed, fractions=fractions,
            max_pixels=max_pixels, scan=scan, kept=kept, records=records, splits=splits, rejected=rejected,
            warnings=warnings, label_counts=label_counts, elapsed_s=time.perf_counter() - t0, proc_s=proc_s,
            images_per_s=images_per_s,
        )  # fmt: skip
        if not kept:
            report["out_written"] = False
            atomic_write_json(report_path, report)
            # Raising inside atomic_path removes the temporary ZIP; an older OUT is left untouched.
            raise RetinagenError(
                f"nothing valid was prepared from {data_root}: {len(rejected)} files rejected (see {report_path})"
            )
    atomic_write_json(report_path, report)
    elapsed = time.perf_counter() - t0
    return PrepareSummary(
        out=out,
        report_path=report_path,
        n_seen=len(kept) + len(rejected),
        n_kept=len(kept),
        n_rejected=len(rejected),
        label_counts=label_counts,
        elapsed_s=elapsed,
        images_per_s=images_per_s,
    )


def _add_member(zf: zipfile.ZipFile, name: str, data: bytes, compress: int) -> None:
    """One member with a fixed time stamp and mode, so the same inputs give the same ZIP bytes."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _write_outcomes(
    zf: zipfile.ZipFile,
    records: Sequence[Any],
    outcomes: Iterator[list[_Outcome]],
    data_root: Path,
    kept: list[tuple[str, int]],
    eyes_found: dict[int, str],
    rejected: list[Rejected],
    warnings: list[tuple[str, str]],
    advance: Callable[[int], None],
) -> None:
    """Store every prepared image as the next member (in record order) and note every rejected one with a reason
    that names no path outside the data root; ``kept``, ``eyes_found``, ``rejected`` and ``warnings`` grow."""
    for chunk_outcomes in outcomes:
        for index, png, reason, warns, side in chunk_outcomes:
            rec = records[index]
            warnings.extend((rec.key, w) for w in warns)
            if png is None:
                rejected.append(Rejected(rec.key, _safe_reason(reason or "unknown error", rec, data_root)))
                continue
            name = member_name(len(kept))
            _add_member(zf, name, png, zipfile.ZIP_STORED)
            kept.append((name, index))
            if side is not None:
                eyes_found[index] = side
        advance(len(chunk_outcomes))


def _dataset_json(
    dataset: str,
    scan: SourceScan,
    records: Sequence[Record],
    splits: Sequence[str],
    kept: Sequence[tuple[str, int]],
    eyes_found: dict[int, str],
    resolution: int,
) -> dict[str, Any]:
    labelled = any(records[i].label is not None for _, i in kept)
    labels = (
        [[name, int(records[i].label)] for name, i in kept if records[i].label is not None]
        if labelled
        else None
    )
    num_classes = scan.num_classes
    if num_classes is None and labels:
        num_classes = max(lab for _, lab in labels) + 1
    meta: dict[str, Any] = {
        "labels": labels,
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "resolution": resolution,
        "source": dataset,
        "num_classes": num_classes,
        "synthetic": scan.synthetic,
        "keys": {name: records[i].key for name, i in kept},
        "splits": {name: splits[i] for name, i in kept},
        "patients": {name: records[i].patient_id for name, i in kept if records[i].patient_id is not None},
        "eyes": {
            name: records[i].eye or eyes_found[i]
            for name, i in kept
            if (records[i].eye or eyes_found.get(i)) is not None
        },
    }
    if scan.attr_names is not None:
        names = list(scan.attr_names)
        meta["attrs"] = {
            "names": names,
            "values": {n: [int(records[i].attrs[a]) for a in names] for n, i in kept if records[i].attrs},
        }
    if scan.factor_names is not None:
        fnames = list(scan.factor_names)
        meta["factors"] = {
            "names": fnames,
            "values": {n: [records[i].factors[f] for f in fnames] for n, i in kept if records[i].factors},
        }
    return meta


def _report(
    *,
    dataset: str,
    data_root: Path,
    out: Path,
    labels: Path | None,
    resolution: int,
    ben_graham: bool,
    workers: int,
    split_seed: int,
    fractions: Sequence[float],
    max_pixels: int,
    scan: SourceScan,
    kept: Sequence[tuple[str, int]],
    records: Sequence[Record],
    splits: Sequence[str],
    rejected: Sequence[Rejected],
    warnings: Sequence[tuple[str, str]],
    label_counts: dict[int, int],
    elapsed_s: float,
    proc_s: float,
    images_per_s: float,
) -> dict[str, Any]:
    split_counts = Counter(splits[i] for _, i in kept)
    reasons = Counter(_reason_kind(r.reason) for r in rejected)
    return {
        "format": "retinagen-prepare-report",
        "version": 1,
        "retinagen_version": __version__,
        "dataset": dataset,
        # Names only: the report may be shared; the absolute paths of this machine stay here.
        "data_root": data_root.name,
        "out": out.name,
        "out_written": True,
        "labels_file": labels.name if labels is not None else None,
        "resolution": resolution,
        "settings": {
            "ben_graham": ben_graham,
            "workers": workers,
            "split_seed": split_seed,
            "split_fractions": list(fractions),
            "max_pixels": max_pixels,
            "domain": scan.domain,
            "png_compression": PNG_COMPRESSION,
        },
        "synthetic": scan.synthetic,
        "n_seen": len(kept) + len(rejected),
        "n_kept": len(kept),
        "n_rejected": len(rejected),
        "n_warnings": len(warnings),
        "n_ignored": len(scan.ignored),
        "label_counts": {str(k): v for k, v in label_counts.items()},
        "split_counts": {s: split_counts.get(s, 0) for s in SPLIT_NAMES},
        "rejected_by_reason": dict(reasons.most_common()),
        "timing": {
            "elapsed_s": round(elapsed_s, 3),
            "processing_s": round(proc_s, 3),
            "images_processed": len(records),
            "images_per_s": round(images_per_s, 2),
        },
        "rejected": [{"file": r.file, "reason": r.reason} for r in rejected],
        "warnings": [{"file": f, "warning": w} for f, w in warnings],
        "ignored": list(scan.ignored),
    }


def _reason_kind(reason: str) -> str:
    """A short category of a rejection reason for the summary (text up to the first ':' or '(')."""
    head = reason.split("(")[0].split(":")[0].strip()
    return head or reason
