"""Fuzzing the image and DICOM readers and the fundus preprocessing (issue 6, item 5).

Random bytes, and real PNG / JPEG / TIFF / GIF / DICOM files mutated by hypothesis (bit flips,
boundary values, inserted / deleted / duplicated runs, truncation; PNG chunk CRCs optionally
recomputed so mutations reach the decoder instead of stopping at the checksum), go through

    retinagen.data.imageio.decode_image  (every format, DICOM included through the sniffer)
    retinagen.data.dicom.read_dicom      (DICOM seeds)
    retinagen.data.fundus.preprocess_fundus on whatever decodes.

What must hold for every input: the only exceptions are the project's own (`RetinagenError`
subclasses) and they name the file (and, for DICOM, quote no patient data); a decoded image is
``[H, W, 3]`` uint8/uint16 and preprocesses to ``[32, 32, 3]`` uint8 or is refused as "no fundus";
no call takes longer than `PER_CALL_S` seconds (a SIGALRM guard turns a hang in Python code into a
failure; the slow variant runs the whole fuzz in a subprocess with a hard timeout, which also
catches a hang inside C code).

Seeds are real: ``skimage.data.retina()`` (a fundus photograph) downscaled and encoded, DICOM files
built from it, and the Secondary Capture / MR / RT files that ship with pydicom.

The number of inputs tried is printed at the end of the module (run with ``-s``) and written to
``<pytest basetemp>/fuzz_counts.json`` (and to ``$RETINAGEN_FUZZ_REPORT`` when set).
Environment: ``RETINAGEN_FUZZ_SCALE`` multiplies the number of examples (default 1: 2,100 inputs, a smoke
level that keeps the default suite short; the slow variant runs 50x);
``RETINAGEN_FUZZ_FULL_LIMITS=1`` uses the readers' default pixel limit instead of 4 MP.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import uid as dcm_uid
from pydicom.data import get_testdata_file

from retinagen.data.dicom import read_dicom
from retinagen.data.fundus import preprocess_fundus
from retinagen.data.imageio import DEFAULT_MAX_PIXELS, decode_image
from retinagen.errors import BadInputError, DicomError, NoFundusError, RetinagenError
from tests.retinagen.data import dicom_fixtures as dfx

SCALE = max(1, int(os.environ.get("RETINAGEN_FUZZ_SCALE", "1")))
FULL_LIMITS = os.environ.get("RETINAGEN_FUZZ_FULL_LIMITS") == "1"
# 4 MP keeps the default suite fast (a mutated header may ask for a big canvas that Pillow allocates
# before finding the data short); the slow variant uses the readers' real default (64 MP).
MAX_PIXELS = DEFAULT_MAX_PIXELS if FULL_LIMITS else 4_000_000
PER_CALL_S = 5.0
OUT_RES = 32

# Pillow warns about damaged EXIF / TIFF tags it skips; expected here, and only noise in the report.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

COUNTS: collections.Counter[str] = collections.Counter()
SLOWEST: dict[str, float] = {}  # target -> longest single call, seconds


@cache
def _work() -> Path:
    """Scratch folder for the fuzzed files (one file rewritten per input); removed after the module."""
    return Path(tempfile.mkdtemp(prefix="retinagen-fuzz-"))


def _settings(n: int) -> settings:
    return settings(
        max_examples=n * SCALE,
        deadline=None,  # PER_CALL_S is enforced per call below, with a clearer message
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        print_blob=True,
    )


# --------------------------------------------------------------------------------------------------
# Seeds


@cache
def _retina(size: int) -> np.ndarray:
    from skimage import data

    return cv2.resize(data.retina(), (size, size), interpolation=cv2.INTER_AREA)


def _pil_bytes(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@cache
def image_seeds() -> dict[str, bytes]:
    """name (with the extension the file gets) -> bytes of a small real fundus image."""
    rgb = _retina(40)
    ok, png16 = cv2.imencode(".png", (rgb[..., ::-1].astype(np.uint16) * 257))
    assert ok
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    return {
        "rgb8.png": _pil_bytes(rgb, "PNG"),
        "rgb16.png": png16.tobytes(),
        "rgba.png": _pil_bytes(rgba, "PNG"),
        "palette.png": _palette_png(rgb),
        "grey.png": _pil_bytes(rgb[..., 1], "PNG"),
        "baseline.jpg": _pil_bytes(rgb, "JPEG", quality=90),
        "progressive.jpg": _pil_bytes(rgb, "JPEG", quality=80, progressive=True),
        "exif.jpg": _exif_jpeg(rgb),
        "rgb.tif": _pil_bytes(rgb, "TIFF", compression="tiff_deflate"),
        "rgb.gif": _pil_bytes(rgb, "GIF"),
    }


def _palette_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).quantize(16).save(buf, "PNG")
    return buf.getvalue()


def _exif_jpeg(rgb: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees; the reader applies it
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=85, exif=exif.tobytes())
    return buf.getvalue()


@cache
def dicom_seeds() -> dict[str, bytes]:
    """name -> bytes of a small DICOM file: fundus files built here, and pydicom's own test files."""
    rgb = _retina(32)
    built: dict[str, Callable[[], object]] = {
        "op8_explicit_le": lambda: dfx.with_pixels(dfx.base_dataset(), rgb, "RGB", 8),
        "op16_12bit_implicit_le": lambda: dfx.with_pixels(
            dfx.base_dataset(sop_class=dfx.OP_16BIT, transfer_syntax=dcm_uid.ImplicitVRLittleEndian),
            rgb.astype(np.uint16) * 16, "RGB", 12,
        ),
        "mono_big_endian": lambda: dfx.with_pixels(
            dfx.base_dataset(sop_class=dfx.SC, modality="OT", transfer_syntax=dcm_uid.ExplicitVRBigEndian),
            rgb[..., 1].copy(), "MONOCHROME2", 8,
        ),
        "jpeg_baseline": lambda: dfx.with_encapsulated(
            dfx.base_dataset(transfer_syntax=dcm_uid.JPEGBaseline8Bit), [dfx.jpeg_baseline_bytes(rgb, 90)],
            rows=32, columns=32, samples=3, photometric="YBR_FULL_422",
        ),
        "j2k_lossless": lambda: dfx.with_encapsulated(
            dfx.base_dataset(transfer_syntax=dcm_uid.JPEG2000Lossless), [dfx.j2k_lossless_bytes(rgb)],
            rows=32, columns=32, samples=3, photometric="RGB",
        ),
    }
    seeds: dict[str, bytes] = {}
    for name, build in built.items():
        buf = io.BytesIO()
        build().save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
        seeds[name] = buf.getvalue()
    for name in (
        "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd_jpeg.dcm", "SC_rgb_rle.dcm",
        "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small.dcm", "rtplan.dcm",
    ):
        path = get_testdata_file(name, download=False)  # shipped with pydicom; never downloaded
        if path is not None:
            seeds[name] = Path(path).read_bytes()
    return seeds


# --------------------------------------------------------------------------------------------------
# Mutations

_INTERESTING = [
    b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff", b"\x7f\xff", b"\x80\x00", b"\x00\x80",
    b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x01\x00",
    b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    """(seed name, the seed's bytes after 1-6 random mutations), positions biased to the header."""
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name])
    for _ in range(draw(st.integers(1, 6))):
        n = len(data)
        head = min(n, 1024)
        pos = draw(st.one_of(st.integers(0, max(0, head - 1)), st.integers(0, max(0, n - 1))))
        op = draw(st.sampled_from(["flip", "byte", "interesting", "insert", "delete", "duplicate", "truncate"]))
        if op == "flip" and n:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            data[pos] = draw(st.integers(0, 255))
        elif op == "interesting":
            value = draw(st.sampled_from(_INTERESTING))
            data[pos : pos + len(value)] = value
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 256))]
        elif op == "duplicate" and n:
            length = draw(st.integers(1, 512))
            data[pos:pos] = data[pos : pos + length]
        elif op == "truncate":
            del data[pos:]
    if draw(st.booleans()):  # keep the signature intact half the time, so the input goes deeper
        magic = seeds[name][: 132 if name.endswith(".dcm") or "." not in name else 8]
        data[: len(magic)] = magic
    if name.endswith(".png") and draw(st.booleans()):
        data = bytearray(_fix_png_crcs(bytes(data)))
    return name, bytes(data)


def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC that can be found, so a mutation reaches the decoder proper."""
    out = bytearray(data)
    pos = 8
    while pos + 12 <= len(out):
        (length,) = struct.unpack(">I", out[pos : pos + 4])
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(out[pos + 4 : end]) & 0xFFFFFFFF)
        pos = end + 4
    return bytes(out)


_MAGICS = [
    b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"II*\x00", b"MM\x00*", b"BM", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n", b"P5 1 1 65535\n",
    bytes(128) + b"DICM", b"",
]


# --------------------------------------------------------------------------------------------------
# The properties


class _Hang(BaseException):
    """Raised by the alarm inside a call that runs too long (BaseException: readers catch Exception)."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise _Hang(f"call still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _check_refusal(exc: RetinagenError, path: Path, data: bytes) -> None:
    """A refusal is one of ours, names the file, and quotes no patient data of a DICOM seed."""
    assert isinstance(exc, BadInputError), f"{type(exc).__name__}: {exc}"
    assert exc.path == str(path), exc
    text = str(exc)
    assert text.startswith(f"{path}: ") and len(text) > len(f"{path}: ") + 5, text
    for phi in dfx.PHI_STRINGS:
        assert phi not in text, f"patient data {phi!r} in {text!r}"


def _check_pixels(pixels: np.ndarray) -> None:
    assert isinstance(pixels, np.ndarray) and pixels.ndim == 3 and pixels.shape[2] == 3, pixels.shape
    assert pixels.dtype in (np.uint8, np.uint16) and pixels.shape[0] >= 1 and pixels.shape[1] >= 1
    assert pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS


def _preprocess(pixels: np.ndarray, kind: str) -> None:
    try:
        out = preprocess_fundus(pixels, OUT_RES)
    except NoFundusError as exc:
        assert str(exc).startswith("no fundus found"), exc
        COUNTS[f"{kind}:decoded,no fundus"] += 1
    else:
        assert out.shape == (OUT_RES, OUT_RES, 3) and out.dtype == np.uint8
        COUNTS[f"{kind}:decoded,preprocessed"] += 1


def _exercise(kind: str, data: bytes, suffix: str, reader: str = "decode_image") -> None:
    """Write ``data`` to a file and put it through ``reader`` and the preprocessing."""
    path = _work() / f"input{suffix}"
    path.write_bytes(data)
    t0 = time.perf_counter()
    with _time_limit(PER_CALL_S):
        try:
            if reader == "read_dicom":
                pixels = read_dicom(path, max_pixels=MAX_PIXELS).pixels
            else:
                pixels = decode_image(path, max_pixels=MAX_PIXELS).pixels
        except RetinagenError as exc:
            _check_refusal(exc, path, data)
            if reader == "read_dicom":
                assert isinstance(exc, DicomError), exc
            COUNTS[f"{kind}:refused"] += 1
        else:
            _check_pixels(pixels)
            _preprocess(pixels, kind)
    elapsed = time.perf_counter() - t0
    assert elapsed < PER_CALL_S, f"{kind}: one call took {elapsed:.1f} s"
    COUNTS[f"{kind}:total"] += 1
    SLOWEST[kind] = max(SLOWEST.get(kind, 0.0), elapsed)


@pytest.fixture(scope="module", autouse=True)
def _report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t0
    if _work.cache_info().currsize:
        shutil.rmtree(_work(), ignore_errors=True)
    totals = {k.split(":")[0]: v for k, v in COUNTS.items() if k.endswith(":total")}
    if not totals:  # only the slow test ran here; its child process wrote the report
        return
    report = {
        "inputs": sum(totals.values()),
        "by_target": totals,
        "outcomes": dict(sorted(COUNTS.items())),
        "seconds": round(elapsed, 1),
        "slowest_call_s": {k: round(v, 3) for k, v in sorted(SLOWEST.items())},
        "scale": SCALE,
        "max_pixels": MAX_PIXELS,
    }
    text = json.dumps(report, indent=1)
    (tmp_path_factory.getbasetemp() / "fuzz_counts.json").write_text(text)
    if os.environ.get("RETINAGEN_FUZZ_REPORT"):
        Path(os.environ["RETINAGEN_FUZZ_REPORT"]).write_text(text)
    print(f"\nfuzz: {report['inputs']} inputs in {elapsed:.1f} s {totals}\n{text}")


# --------------------------------------------------------------------------------------------------
# Tests (default suite: about 10 s on 2 shared CPU cores)


def test_seeds_are_valid_before_mutation() -> None:
    """The fuzz starts from files the readers accept (or refuse for a stated reason), else it tests little."""
    for name, data in image_seeds().items():
        path = _work() / f"seed{Path(name).suffix}"
        path.write_bytes(data)
        pixels = decode_image(path).pixels
        assert pixels.shape[:2] == (40, 40), name
        preprocess_fundus(pixels, OUT_RES)
    accepted = []
    for name, data in dicom_seeds().items():
        path = _work() / "seed.dcm"
        path.write_bytes(data)
        try:
            accepted.append((name, read_dicom(path).pixels.shape))
        except DicomError as exc:
            assert name in ("MR_small.dcm", "rtplan.dcm"), (name, exc)  # not photographs: refused by design
    assert len(accepted) >= 10, accepted


@_settings(200)
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".png", ".jpg", ".dcm", ".tif", "", ".txt"]))
@example(data=b"", suffix=".png")
@example(data=bytes(128) + b"DICM", suffix=".dcm")
def test_random_bytes(data: bytes, suffix: str) -> None:
    _exercise("random", data, suffix)


@_settings(400)
@given(magic=st.sampled_from(_MAGICS), rest=st.binary(max_size=2048), suffix=st.sampled_from([".png", ".dcm", ""]))
def test_random_bytes_behind_a_format_signature(magic: bytes, rest: bytes, suffix: str) -> None:
    _exercise("signature", magic + rest, suffix)


def _strip_png(width: int = 12672, height: int = 32) -> bytes:
    """Regression: an image many times wider than high made detect_fov shrink its short side to 0 px
    and cv2.resize raise cv2.error (found by this fuzz: a mutated JPEG header gave 15621x40 px)."""
    return _pil_bytes(np.full((height, width, 3), 120, np.uint8), "PNG")


@_settings(800)
@given(case=mutated(image_seeds()))
@example(case=("strip.png", _strip_png()))
@example(case=("tall-strip.png", _strip_png(40, 15621)))
def test_mutated_images(case: tuple[str, bytes]) -> None:
    name, data = case
    _exercise("image", data, Path(name).suffix)


@_settings(700)
@given(case=mutated(dicom_seeds()), through_sniffer=st.booleans())
def test_mutated_dicom(case: tuple[str, bytes], through_sniffer: bool) -> None:
    _, data = case
    if through_sniffer:  # decode_image hands DICOM to read_dicom by content, with no .dcm needed
        _exercise("dicom", data, ".bin", reader="decode_image")
    else:
        _exercise("dicom", data, ".dcm", reader="read_dicom")


@pytest.mark.slow
def test_long_fuzz_in_a_subprocess_with_a_hard_timeout(tmp_path: Path) -> None:
    """50x the examples at the readers' real pixel limit, in a child process killed after 20 minutes,
    so even a hang inside C code (where the alarm cannot interrupt) fails the test."""
    report = tmp_path / "counts.json"
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RETINAGEN_FUZZ_SCALE": "50",
        "RETINAGEN_FUZZ_FULL_LIMITS": "1", "RETINAGEN_FUZZ_REPORT": str(report),
    }
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow"]
    try:
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
                              text=True, timeout=1200)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"fuzz run still going after {exc.timeout} s (a hang?):\n{(exc.stdout or '')[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    counts = json.loads(report.read_text())
    print(f"\nlong fuzz: {counts['inputs']} inputs in {counts['seconds']} s {counts['by_target']}, "
          f"slowest call {max(counts['slowest_call_s'].values()):.2f} s")
    assert counts["inputs"] >= 50 * (200 + 400 + 800 + 700)
