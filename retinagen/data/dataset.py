"""Reading a prepared dataset: a ZIP of PNGs + ``dataset.json`` (see `retinagen.data.prepare`).

`ZipImageDataset` is a torch ``Dataset`` of ``(img, label)`` pairs, ``img`` float32 ``[3, R, R]``
in [-1, 1], ``label`` int64 (-1 when unlabelled). The ZIP is opened lazily, once per process: a
``zipfile.ZipFile`` handle must not be shared across a ``fork`` (the file offset is shared), so
each DataLoader worker opens its own the first time it reads. Nothing is unpickled: the index is
JSON, the images PNG.

NVlabs-format ZIPs made by other tools (``dataset.json`` with only ``labels``) are read too; the
resolution then comes from the first image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from retinagen.checks import Count, check
from retinagen.data.preprocess import to_model_range
from retinagen.errors import RetinagenError

__all__ = ["ZipImageDataset", "read_dataset_json"]

_SPLITS = ("train", "val", "test")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# What reading a damaged member raises: a bad CRC (BadZipFile), a corrupt deflate stream (zlib.error), a
# truncated one (EOFError), or the disk (OSError).
_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)
# dataset.json is an index (names, labels, a few dicts); 1 GB would mean a broken or hostile file.
_MAX_JSON_BYTES = 1 << 30


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path, "r")
    except FileNotFoundError:
        raise RetinagenError(f"{path}: dataset file does not exist") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise RetinagenError(f"{path}: not a readable ZIP dataset ({type(e).__name__})") from None


def _valid_label_pairs(labels: Any) -> bool:
    return isinstance(labels, list) and all(
        isinstance(x, list)
        and len(x) == 2
        and isinstance(x[0], str)
        and isinstance(x[1], int)
        and not isinstance(x[1], bool)
        for x in labels
    )


def _read_json_member(zf: zipfile.ZipFile, path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        info = zf.getinfo("dataset.json")
    except KeyError:
        raise RetinagenError(
            f"{path}: no dataset.json in the ZIP; make datasets with `retinagen prepare`"
        ) from None
    if info.file_size > _MAX_JSON_BYTES:
        raise RetinagenError(f"{path}: dataset.json is implausibly large ({info.file_size:,} bytes)")
    try:
        raw = zf.read(info)
        meta = json.loads(raw.decode("utf-8"))
    except (*_MEMBER_ERRORS, UnicodeDecodeError, ValueError) as e:
        raise RetinagenError(f"{path}: dataset.json cannot be read ({_damage(e)})") from None
    if not isinstance(meta, dict):
        raise RetinagenError(f"{path}: dataset.json must hold a JSON object")
    labels = meta.get("labels")
    if labels is not None and not _valid_label_pairs(labels):
        raise RetinagenError(f"{path}: dataset.json 'labels' must be null or a list of [name, int] pairs")
    return meta, raw


def _damage(e: BaseException) -> str:
    """What is wrong with a member, in words (zlib's and zipfile's own messages are terse but exact)."""
    if isinstance(e, zlib.error):
        return f"corrupt compressed data: {e}"
    if isinstance(e, EOFError):
        return "truncated compressed data"
    if isinstance(e, zipfile.BadZipFile):
        return f"damaged: {e}"
    return type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}"


def per_image_table(block: Any, names_in_zip: Sequence[str]) -> tuple[list[str], np.ndarray] | None:
    """``dataset.json``'s ``{"names": [...], "values": {file: [...]}}`` block -> (names, [N, K] float64,
    NaN where a file has no row or a malformed one); None when the block is absent or not that shape."""
    if not (isinstance(block, dict) and isinstance(block.get("names"), list) and isinstance(block.get("values"), dict)):
        return None
    names = [str(x) for x in block["names"]]
    arr = np.full((len(names_in_zip), len(names)), np.nan)
    for r, fname in enumerate(names_in_zip):
        v = block["values"].get(fname)
        if isinstance(v, list) and len(v) == len(names):
            arr[r] = np.asarray(v, dtype=np.float64)
    return names, arr


def read_dataset_json(path: str | Path) -> dict[str, Any]:
    """The ``dataset.json`` of a prepared dataset ZIP, validated (``labels``: null or [name, int] pairs)."""
    p = Path(path)
    with _open_zip(p) as zf:
        meta, _ = _read_json_member(zf, p)
    return meta


def _png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's first 24 bytes, None if it is not a PNG."""
    if len(head) < 24 or not head.startswith(_PNG_MAGIC) or head[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", head[16:24])
    return w, h


class ZipImageDataset(Dataset):
    """Images of a prepared dataset ZIP.

    Args:
        path: the ZIP written by ``retinagen prepare``.
        split: "train" / "val" / "test" to keep only that split, None for all images.
        return_attrs: also return the binary attributes (CelebA) as int64 [A] (0/1).

    Items: ``(img, label)`` or ``(img, label, attrs)``; img float32 [3, R, R] in [-1, 1]; label int64
    scalar tensor, -1 when unlabelled.

    Attributes: resolution, names (member names), labels (np.int64 [N], -1 unlabelled), num_classes
    (0 when unlabelled), attr_names, meta (the whole dataset.json).
    """

    def __init__(self, path: str | Path, *, split: str | None = None, return_attrs: bool = False) -> None:
        self.path = Path(path)
        if split is not None and split not in _SPLITS:
            raise RetinagenError(f"split must be one of {', '.join(_SPLITS)} or None, got {split!r}")
        self.split = split
        self.return_attrs = return_attrs
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None

        with _open_zip(self.path) as zf:
            meta, raw = _read_json_member(zf, self.path)
            members = {i.filename for i in zf.infolist() if not i.is_dir()}
            pngs = sorted(n for n in members if n.lower().endswith(".png"))
            label_pairs = meta.get("labels")
            if label_pairs is not None:
                names = [n for n, _ in label_pairs]
                missing = [n for n in names if n not in members]
                if missing:
                    raise RetinagenError(
                        f"{self.path}: dataset.json lists {len(missing)} images the ZIP does not hold, "
                        f"e.g. {missing[0]}"
                    )
                label_of = dict(label_pairs)
                if len(label_of) != len(names):
                    raise RetinagenError(f"{self.path}: dataset.json lists an image twice in 'labels'")
            else:
                names, label_of = pngs, {}
            if not names:
                raise RetinagenError(f"{self.path}: the dataset holds no images")
            resolution = meta.get("resolution")
            if resolution is None:
                resolution = self._first_size(zf, names[0])
            resolution = check(Count, resolution, f"{self.path}: dataset.json 'resolution'", RetinagenError)
            self.resolution: int = resolution
            self._check_header(zf, names[0])

        self.meta: dict[str, Any] = meta
        self._json_bytes = raw
        splits = meta.get("splits") or {}
        if split is not None:
            if not splits:
                raise RetinagenError(
                    f"{self.path}: dataset.json has no 'splits'; cannot select split {split!r}"
                )
            names = [n for n in names if splits.get(n) == split]
            if not names:
                raise RetinagenError(f"{self.path}: split {split!r} is empty")
        self.names: list[str] = names
        self.labels: np.ndarray = np.array([label_of.get(n, -1) for n in names], dtype=np.int64)
        if (self.labels < -1).any():
            raise RetinagenError(f"{self.path}: labels must be >= 0")
        n_cls = meta.get("num_classes")
        max_label = int(self.labels.max()) if self.labels.size else -1
        if label_pairs is None:
            self.num_classes = 0
        elif isinstance(n_cls, int) and not isinstance(n_cls, bool) and n_cls > 0:
            all_max = max((lab for _, lab in label_pairs), default=-1)
            if all_max >= n_cls:
                raise RetinagenError(f"{self.path}: a label ({all_max}) is >= num_classes ({n_cls})")
            self.num_classes = n_cls
        else:
            self.num_classes = max(lab for _, lab in label_pairs) + 1 if label_pairs else max_label + 1

        attrs = meta.get("attrs")
        self.attr_names: list[str] = (
            list(attrs["names"]) if isinstance(attrs, dict) and "names" in attrs else []
        )
        self._attrs: np.ndarray | None = None
        if return_attrs:
            if not self.attr_names:
                raise RetinagenError(f"{self.path}: return_attrs=True but dataset.json has no 'attrs'")
            values = attrs.get("values", {})
            arr = np.full((len(names), len(self.attr_names)), -1, dtype=np.int64)
            for k, n in enumerate(names):
                v = values.get(n)
                if v is not None:
                    if len(v) != len(self.attr_names):
                        raise RetinagenError(
                            f"{self.path}: attrs of {n} have {len(v)} values, expected {len(self.attr_names)}"
                        )
                    arr[k] = v
            self._attrs = arr

    # -- validation helpers ------------------------------------------------------------------------

    def _head(self, zf: zipfile.ZipFile, name: str) -> bytes:
        try:
            with zf.open(name) as fh:
                return fh.read(24)
        except _MEMBER_ERRORS as e:
            raise RetinagenError(f"{self.path}: cannot read member {name} ({_damage(e)})") from None

    def _first_size(self, zf: zipfile.ZipFile, name: str) -> int:
        size = _png_size(self._head(zf, name))
        if size is None or size[0] != size[1]:
            raise RetinagenError(f"{self.path}: {name} is not a square PNG; cannot infer the resolution")
        return size[0]

    def _check_header(self, zf: zipfile.ZipFile, name: str) -> None:
        size = _png_size(self._head(zf, name))
        if size is None:
            raise RetinagenError(f"{self.path}: member {name} is not a PNG image")
        if size != (self.resolution, self.resolution):
            raise RetinagenError(
                f"{self.path}: member {name} is {size[0]} x {size[1]}, expected "
                f"{self.resolution} x {self.resolution} (dataset.json 'resolution')"
            )

    def validate(self) -> None:
        """Check every member's PNG header (size); reads 24 bytes per image."""
        zf = self._zipfile()
        for n in self.names:
            self._check_header(zf, n)

    # -- Dataset -----------------------------------------------------------------------------------

    def _zipfile(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if self._zip is None or self._pid != pid:
            # A handle inherited through fork shares its file offset with the parent: open our own.
            self._zip = _open_zip(self.path)
            self._pid = pid
        return self._zip

    def __len__(self) -> int:
        return len(self.names)

    def read_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` as stored: uint8 [R, R, 3] RGB."""
        name = self.names[index]
        try:
            data = self._zipfile().read(name)
        except KeyError:
            raise RetinagenError(f"{self.path}: member {name} is missing from the ZIP") from None
        except _MEMBER_ERRORS as e:
            raise RetinagenError(f"{self.path}: cannot read member {name} ({_damage(e)})") from None
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise RetinagenError(f"{self.path}: member {name} is not a decodable PNG")
        if img.shape != (self.resolution, self.resolution, 3):
            raise RetinagenError(
                f"{self.path}: member {name} is {img.shape[1]} x {img.shape[0]}, expected "
                f"{self.resolution} x {self.resolution}"
            )
        return np.ascontiguousarray(img[:, :, ::-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        img = to_model_range(self.read_uint8(index))
        label = torch.tensor(self.labels[index], dtype=torch.int64)
        if self.return_attrs:
            assert self._attrs is not None
            return img, label, torch.from_numpy(self._attrs[index].copy())
        return img, label

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_zip"] = None  # never pickle an open file; the receiving process opens its own
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- summaries ---------------------------------------------------------------------------------

    def label_counts(self) -> dict[int, int]:
        """Images per class {0: n0, ..., num_classes-1: n}; empty when unlabelled."""
        if self.num_classes == 0:
            return {}
        counts = np.bincount(self.labels[self.labels >= 0], minlength=self.num_classes)
        return {k: int(c) for k, c in enumerate(counts)}

    def fingerprint(self) -> str:
        """sha256 of dataset.json and the ZIP's size: identifies the dataset in checkpoints."""
        h = hashlib.sha256()
        h.update(self._json_bytes)
        h.update(str(self.path.stat().st_size).encode())
        return h.hexdigest()
