"""Files uploaded through a browser (the dashboard's Anomaly page): checked, then decoded defensively.

An upload is bytes plus a name the browser chose. Neither is trusted:

1. size: at most `MAX_UPLOAD_BYTES` (20 MB) and not empty, checked before anything else;
2. type: from the content's magic bytes only (`retinagen.data.imageio.sniff_format`): PNG, JPEG or DICOM
   (``DICM`` at offset 128). The name's extension is ignored, so a PNG called ``scan.dcm`` is read as a
   PNG and a DICOM file without an extension is accepted; anything else is refused;
3. decoding: `retinagen.data.imageio.decode_image`, which checks the pixel count from the header before
   decoding (decompression bombs are refused, here at `UPLOAD_MAX_PIXELS`), refuses truncated files, and
   sends DICOM to `retinagen.data.dicom.read_dicom` (header and pixel module checked before pixels are
   decoded; no header value is kept, so no patient data leaves it).

The decoders read files, so the bytes are written to a private temporary folder (``tempfile.mkdtemp``:
mode 0700, a fresh random name per upload) under a fixed file name chosen from the sniffed type; the
upload's name is never used as (part of) a path. The folder is removed when decoding ends, whatever
happens. Error messages (`UploadError`) say what is wrong without quoting the upload's name (file names of
medical images often hold patient names), its content, or the temporary path.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from retinagen.checks import Count, check
from retinagen.data.imageio import decode_image, sniff_format
from retinagen.errors import BadInputError

__all__ = [
    "MAX_UPLOAD_BYTES",
    "UPLOAD_LABEL",
    "UPLOAD_MAX_PIXELS",
    "UPLOAD_TYPES",
    "UploadError",
    "UploadedImage",
    "check_upload",
    "decode_upload",
    "read_upload_bytes",
    "with_upload_file",
]

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# 36 MP (6000 x 6000): above any fundus camera's sensor (~24 MP), well below imageio's 64 MP default, so one
# upload never needs more than ~100 MB of RGB pixels.
UPLOAD_MAX_PIXELS = 36_000_000
UPLOAD_TYPES = ("PNG", "JPEG", "DICOM")
# How an upload is named in messages: never by the name the browser sent.
UPLOAD_LABEL = "uploaded file"
# Fixed names inside the private temporary folder, one per accepted type.
_TEMP_NAMES = {"PNG": "upload.png", "JPEG": "upload.jpg", "DICOM": "upload.dcm"}
_SNIFF_BYTES = 132

T = TypeVar("T")


class UploadError(BadInputError):
    """An upload that cannot be used; ``reason`` is safe to show (no name, content or path in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(UPLOAD_LABEL, reason)


@dataclass(frozen=True)
class UploadedImage:
    """A decoded upload.

    pixels: [H, W, 3] RGB, uint8, or uint16 for 16-bit PNGs and DICOM (DICOM keeps its stored range, e.g.
    [0, 4095] for 12-bit). kind: "PNG" | "JPEG" | "DICOM" (from the content). size_bytes: the upload's size.
    """

    pixels: np.ndarray
    kind: str
    size_bytes: int


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def read_upload_bytes(upload: Any, *, max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
    """The bytes of an upload: ``bytes`` / ``bytearray`` / ``memoryview``, or a file-like object (Streamlit's
    ``UploadedFile`` is a ``BytesIO``) read from its start, at most ``max_bytes + 1`` bytes (so an oversized
    stream is detected without reading it whole). Raises `UploadError` when it is too large."""
    if isinstance(upload, bytes | bytearray | memoryview):
        data = bytes(upload)
    elif hasattr(upload, "read"):
        if hasattr(upload, "seek"):
            upload.seek(0)
        data = upload.read(max_bytes + 1)
        if not isinstance(data, bytes | bytearray):
            raise UploadError("the upload did not yield bytes")
        data = bytes(data)
    else:
        raise TypeError(f"upload must be bytes or a binary file object, got {type(upload).__name__}")
    if len(data) > max_bytes:
        raise UploadError(f"too large: more than the {_mb(max_bytes)} limit")
    return data


def check_upload(data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """The upload's type from its content, "PNG" | "JPEG" | "DICOM"; `UploadError` for anything else.

    Checks, in order: not empty, at most ``max_bytes``, magic bytes of an accepted type.
    """
    max_bytes = check(Count, max_bytes, "max_bytes")
    if not data:
        raise UploadError("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise UploadError(f"too large: {_mb(len(data))}, more than the {_mb(max_bytes)} limit")
    fmt = sniff_format(bytes(data[:_SNIFF_BYTES]))
    if fmt in UPLOAD_TYPES:
        return fmt
    if fmt is not None:
        raise UploadError(f"a {fmt} image; only PNG, JPEG and DICOM files are accepted")
    if _looks_like_text(bytes(data[:_SNIFF_BYTES])):
        raise UploadError("not an image: the file holds text; only PNG, JPEG and DICOM files are accepted")
    raise UploadError(
        "not a PNG, JPEG or DICOM file (DICOM needs the standard 128-byte preamble and 'DICM' prefix)"
    )


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return False
    return bool(text) and all(ch.isprintable() or ch in "\r\n\t\f" for ch in text)


def with_upload_file(data: bytes, fn: Callable[[Path], T], *, max_bytes: int = MAX_UPLOAD_BYTES) -> T:
    """Run ``fn(path)`` on the upload written to a private temporary file, then remove it.

    The file is ``<mkdtemp folder, 0700>/upload.{png,jpg,dcm}`` (by the sniffed type); the folder is removed
    after ``fn`` returns or raises. Raises `UploadError` from `check_upload`.
    """
    kind = check_upload(data, max_bytes=max_bytes)
    folder = Path(tempfile.mkdtemp(prefix="retinagen-upload-"))
    try:
        path = folder / _TEMP_NAMES[kind]
        # O_EXCL through mode "xb": the fresh private folder is empty, so this never follows a planted link.
        with open(path, "xb") as fh:
            fh.write(data)
        return fn(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def decode_upload(
    upload: Any, *, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = UPLOAD_MAX_PIXELS
) -> UploadedImage:
    """Check and decode an upload (bytes or a binary file object) to RGB pixels; see the module docstring.

    Raises `UploadError` for every problem with the upload (size, type, a decompression bomb, a truncated or
    malformed image, a DICOM file of another modality or without pixel data, ...); its reason never names
    the upload or the temporary file, and never quotes DICOM header values.
    """
    data = read_upload_bytes(upload, max_bytes=max_bytes)
    kind = check_upload(data, max_bytes=max_bytes)

    def decode(path: Path) -> np.ndarray:
        try:
            return decode_image(path, max_pixels=max_pixels).pixels
        except BadInputError as exc:  # ImageDecodeError, DicomError: the reason names no path
            raise UploadError(exc.reason) from None
        except Exception as exc:  # noqa: BLE001 - decoders promise BadInputError; keep ours even if not
            raise UploadError(f"could not be decoded ({type(exc).__name__})") from None

    pixels = with_upload_file(data, decode, max_bytes=max_bytes)
    return UploadedImage(pixels=pixels, kind=kind, size_bytes=len(data))

