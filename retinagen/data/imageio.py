"""Safe reading of user-supplied image files, and path safety for file names that come from CSVs.

`read_image(path)` returns ``[H, W, 3]`` RGB, ``uint8`` or ``uint16``, or raises
`ImageDecodeError(path, reason)` with a reason a person can act on. No raw Pillow / OpenCV
exception escapes; anything unexpected from a decoder becomes ``ImageDecodeError`` naming only the
exception's type (library messages can quote absolute paths or file content).

What is checked, in order, before a pixel is decoded
    1. the path is a regular, non-empty file;
    2. the first bytes are sniffed: DICOM (``DICM`` at offset 128, or a ``.dcm``/``.dicom`` name)
       goes to `retinagen.data.dicom.read_dicom`; content that is not PNG / JPEG / TIFF / BMP / GIF /
       WebP / PPM is refused ("not an image") -- text gets its own, clearer reason;
    3. Pillow opens the file restricted to those formats (so no exotic plugin ever parses user
       data) and the width x height from the header is compared with ``max_pixels`` (our own
       limit, default 64 MP, below Pillow's global one) -- a decompression bomb is refused before
       it is decoded; Pillow's `DecompressionBombError` is caught too;
    4. ``.load()`` decodes everything; ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at False (its
       default; it is process-global and this module never sets it), so a truncated file raises
       instead of being silently padded with grey.

Extension vs content
    The content decides how a file is read. A real image whose extension names another format
    (a PNG called ``.jpeg``) is read and a warning is returned by `decode_image` (prepare's report
    lists it); a file whose content is not an image is refused whatever its name says.

Conversions
    Grey, 1-bit and palette images are expanded to RGB; CMYK and YCbCr are converted to RGB;
    alpha (RGBA, LA, PA, palette transparency) is composited on black, the colour of a fundus
    image's surround; 16-bit images stay ``uint16`` (PNG/TIFF with 16-bit colour are decoded by
    OpenCV, because Pillow reduces them to 8 bits). EXIF orientation is applied, as a viewer shows
    the photograph. Multi-frame files (GIF, TIFF) give their first frame, with a warning.
    Float (``F``) and 32-bit integer images beyond the 16-bit range are refused as unsupported.

`resolve_inside(root, relative)` is how every path read from a CSV becomes a file: absolute paths,
``..`` escapes and symlinks that resolve outside the root raise `UnsafePathError`.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retinagen.checks import Count, check
from retinagen.errors import BadInputError, DicomError, ImageDecodeError, UnsafePathError
from retinagen.fileio import regular_file_stat

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "decode_image",
    "is_dicom_file",
    "read_image",
    "resolve_inside",
    "sniff_format",
]

# 64 MP: a 8000 x 8000 photograph; a fundus camera's largest sensor is about 24 MP.
DEFAULT_MAX_PIXELS = 64_000_000

# Our own max_pixels is the limit; Pillow's warning (at its global limit) would only be noise, and its hard
# error (at twice that limit) is caught where images are decoded. Set once here, not per call: a
# `warnings.catch_warnings()` around each decode swaps the process-wide filter list, which is not thread-safe
# (the dashboard decodes uploads of several sessions at once, and a restore can drop another thread's filters).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Extensions a dataset folder is scanned for (lower case), and the format each one promises.
EXTENSION_FORMATS: dict[str, str] = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".png": "PNG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WEBP",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".pbm": "PPM",
    ".pnm": "PPM",
}
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
IMAGE_EXTENSIONS = frozenset(EXTENSION_FORMATS) | DICOM_EXTENSIONS

# Pillow plugins allowed to parse user files (multi-picture "MPO" JPEGs come through the JPEG one).
_PIL_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP", "PPM")
_SNIFF_BYTES = 132  # enough for the DICOM preamble + "DICM"


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and what was noticed while reading it.

    pixels:   [H, W, 3] RGB, uint8 or uint16 (16-bit sources keep their 16 bits; DICOM keeps its
              stored range, e.g. [0, 4095] for 12-bit).
    format:   the format the content was read as ("JPEG", "PNG", ..., "DICOM").
    warnings: non-fatal notes (extension does not match content, first of several frames used).
    laterality: "left" / "right" when the file says (DICOM Image Laterality), else None.
    """

    pixels: np.ndarray
    format: str
    warnings: tuple[str, ...] = ()
    laterality: str | None = None


def sniff_format(head: bytes) -> str | None:
    """Image format from a file's first bytes (>= 132 for DICOM), or None if it is none we read."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) >= 2 and head[0] == ord("P") and head[1] in b"123456":
        return "PPM"
    return None


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character may be cut at the end of the sample; retry without the tail.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\r\n\t\f" for ch in text)


def is_dicom_file(path: str | Path) -> bool:
    """True if the file has a DICOM extension or the ``DICM`` magic at offset 128 (never raises)."""
    p = Path(path)
    if p.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError:
        return False
    return sniff_format(head) == "DICOM"


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB: [H, W, 3] uint8, or uint16 for 16-bit sources and DICOM.

    Raises ImageDecodeError (or DicomError for DICOM files) with the reason for any bad file.
    """
    return decode_image(path, max_pixels=max_pixels).pixels


def decode_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Like `read_image`, also returning the detected format and any warnings."""
    max_pixels = check(Count, max_pixels, "max_pixels")
    p = Path(path)
    regular_file_stat(p, ImageDecodeError)
    try:
        with open(p, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as exc:
        raise ImageDecodeError(p, f"file cannot be read ({type(exc).__name__})") from None

    fmt = sniff_format(head)
    ext = p.suffix.lower()
    if fmt == "DICOM" or (fmt is None and ext in DICOM_EXTENSIONS):
        return _decode_dicom(p, ext, max_pixels)
    if fmt is None:
        if _looks_like_text(head):
            raise ImageDecodeError(p, "not an image: the file holds text")
        raise ImageDecodeError(
            p, "not an image: content is not PNG, JPEG, TIFF, BMP, GIF, WebP, PPM or DICOM"
        )

    notes: list[str] = []
    expected = EXTENSION_FORMATS.get(ext)
    if ext in DICOM_EXTENSIONS or (expected is not None and expected != fmt):
        notes.append(f"extension {ext} does not match the content ({fmt}); read as {fmt}")
    pixels, extra = _decode_raster(p, fmt, head, max_pixels)
    return DecodedImage(pixels=pixels, format=fmt, warnings=tuple(notes + extra))


def _decode_dicom(p: Path, ext: str, max_pixels: int) -> DecodedImage:
    # Imported here: pydicom is only needed when a dataset holds DICOM files.
    from retinagen.data.dicom import read_dicom

    notes = (
        [] if ext in DICOM_EXTENSIONS else [f"extension {ext or '(none)'} does not match the content (DICOM)"]
    )
    try:
        img = read_dicom(p, max_pixels=max_pixels)
    except DicomError:
        raise
    except BadInputError:
        raise
    except Exception as exc:  # read_dicom promises DicomError only; keep our promise even if not
        raise DicomError(p, f"could not be read as a DICOM image ({type(exc).__name__})") from None
    side = {"L": "left", "R": "right"}.get(str(img.info.get("laterality", "")))
    return DecodedImage(pixels=img.pixels, format="DICOM", warnings=tuple(notes), laterality=side)


def _png_header(head: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, which the format requires to come first."""
    if len(head) >= 26 and head[12:16] == b"IHDR":
        return head[24], head[25]
    return None


def _check_pixel_count(p: Path, width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(p, f"header gives an empty image ({width} x {height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            p,
            f"image too large: {width} x {height} = {width * height:,} pixels exceeds the "
            f"limit of {max_pixels:,} (possible decompression bomb)",
        )


def _decode_raster(p: Path, fmt: str, head: bytes, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    if fmt == "PNG" and len(head) >= 24 and head[12:16] == b"IHDR":
        # Our limit from the raw IHDR first, so the reason quotes the size even for images so big
        # that Pillow's own bomb check would refuse them inside Image.open.
        width, height = struct.unpack(">II", head[16:24])
        _check_pixel_count(p, width, height, max_pixels)
    try:
        with Image.open(p, formats=_PIL_FORMATS) as im:
            _check_pixel_count(p, *im.size, max_pixels)
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            if n_frames > 1:
                notes.append(f"file has {n_frames} frames; the first was used")
            im.load()
            if _needs_opencv_16bit(im, fmt, head):
                # Pillow has validated the file (CRCs, truncation); OpenCV keeps the 16 bits.
                # EXIF orientation is not applied on this path (rare in 16-bit PNG/TIFF).
                arr = _decode_16bit_with_opencv(p)
            else:
                arr = _to_rgb_array(p, _exif_upright(im, notes))
    except BadInputError:
        raise
    except Image.DecompressionBombError:
        raise ImageDecodeError(
            p,
            "image too large: Pillow's decompression-bomb limit was exceeded (possible decompression bomb)",
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(p, f"not a readable {fmt} image (the header is damaged)") from None
    except (OSError, SyntaxError, EOFError, struct.error) as exc:
        text = str(exc).lower()
        if "truncated" in text or isinstance(exc, EOFError):
            raise ImageDecodeError(p, f"truncated {fmt} file (the data ends early)") from None
        raise ImageDecodeError(p, f"corrupt {fmt} file ({type(exc).__name__})") from None
    except MemoryError:
        raise ImageDecodeError(p, "not enough memory to decode the image") from None
    except Exception as exc:
        raise ImageDecodeError(p, f"could not decode {fmt} file ({type(exc).__name__})") from None
    return arr, notes


def _exif_upright(im: Image.Image, notes: list[str]) -> Image.Image:
    """Apply the EXIF orientation tag; a damaged EXIF block is ignored with a warning."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:
        notes.append(f"EXIF orientation could not be read ({type(exc).__name__}); image used as stored")
        return im


def _needs_opencv_16bit(im: Image.Image, fmt: str, head: bytes) -> bool:
    """True for 16-bit-per-sample colour PNG/TIFF, which Pillow would reduce to 8 bits."""
    if fmt == "PNG":
        ihdr = _png_header(head)
        # colour types 2 (RGB) and 6 (RGBA); 16-bit grey (0) and grey+alpha (4) Pillow keeps / handles.
        return ihdr is not None and ihdr[0] == 16 and ihdr[1] in (2, 4, 6)
    if fmt == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)
        if isinstance(bits, tuple) and len(bits) >= 3 and all(b == 16 for b in bits):
            return True
    return False


def _decode_16bit_with_opencv(p: Path) -> np.ndarray:
    data = np.fromfile(p, dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageDecodeError(p, "could not decode 16-bit image")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint16:
        arr = arr.astype(np.uint16) if arr.dtype == np.uint8 else arr
        if arr.dtype != np.uint16:
            raise ImageDecodeError(p, f"unsupported sample type {arr.dtype}")
    c = arr.shape[2]
    if c == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    if c == 2:  # grey + alpha
        return _composite_on_black(np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1], 65535)
    if c == 3:
        return np.ascontiguousarray(arr[:, :, ::-1])  # BGR -> RGB
    if c == 4:
        return _composite_on_black(arr[:, :, 2::-1], arr[:, :, 3], 65535)
    raise ImageDecodeError(p, f"unsupported number of channels ({c})")


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray, full: int) -> np.ndarray:
    """rgb * alpha / full, rounded, in rgb's dtype (what the image looks like over black)."""
    wide = rgb.astype(np.uint32) * alpha.astype(np.uint32)[:, :, None]
    out = (wide + full // 2) // full
    return np.ascontiguousarray(out.astype(rgb.dtype))


def _grey_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))


def _to_rgb_array(p: Path, im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("L", "1"):
        return _grey_to_rgb(np.asarray(im.convert("L"), dtype=np.uint8))
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return _grey_to_rgb(np.asarray(im).astype(np.uint16))
    if mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageDecodeError(p, "unsupported image: 32-bit integer values outside the 16-bit range")
        return _grey_to_rgb(a.astype(np.uint16))
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        return _composite_on_black(rgba[:, :, :3], rgba[:, :, 3], 255)
    if mode in ("P", "CMYK", "YCbCr", "RGBX"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    raise ImageDecodeError(p, f"unsupported image mode {mode!r} (float or exotic pixel format)")


# --------------------------------------------------------------------------------------------------
# Path safety


def resolve_inside(root: str | Path, relative: str) -> Path:
    """Resolve a file name from a CSV (relative to ``root``) to a real path that stays inside ``root``.

    Refuses with `UnsafePathError` (path = the name as given, so reports never quote the user's
    absolute root): an empty name, an absolute path (POSIX or Windows, incl. drive letters and UNC),
    a name with a NUL byte, and any name whose fully resolved path (``..`` and symlinks followed)
    is not inside the resolved root. ``..`` that stays inside the root is allowed. Returns the
    resolved path (the file that will actually be read); it need not exist.
    """
    if not isinstance(relative, str):
        raise TypeError(f"relative must be a str, got {type(relative).__name__}")
    name = relative.strip()
    if not name:
        raise UnsafePathError(relative, "empty file name")
    if "\x00" in name:
        raise UnsafePathError(relative.replace("\x00", "\\0"), "file name contains a NUL byte")
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
    ):
        raise UnsafePathError(relative, "absolute path refused: file names must be relative to the data root")
    root_resolved = Path(root).resolve()
    # Backslashes are separators in CSVs written on Windows; a POSIX name rarely holds one.
    candidate = root_resolved.joinpath(*PureWindowsPath(name).parts) if "\\" in name else root_resolved / name
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        raise UnsafePathError(relative, f"path cannot be resolved ({type(exc).__name__})") from None
    if not resolved.is_relative_to(root_resolved):
        if _has_symlink(root_resolved, candidate):
            raise UnsafePathError(relative, "a symlink points outside the data root")
        raise UnsafePathError(relative, "path escapes the data root")
    return resolved


def _has_symlink(root: Path, candidate: Path) -> bool:
    """True if any existing component of ``candidate`` below ``root`` is a symlink."""
    try:
        rel = candidate.relative_to(root)
    except ValueError:
        return False
    cur = root
    for part in rel.parts:
        if part == "..":
            return False
        cur = cur / part
        if os.path.islink(cur):
            return True
    return False
