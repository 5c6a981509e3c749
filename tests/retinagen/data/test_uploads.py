"""Browser uploads (retinagen/data/uploads.py): size and type checks, defensive decoding, private temp files."""

from __future__ import annotations

import io
import os
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinagen.data import uploads as up
from retinagen.errors import BadInputError
from tests.retinagen.data import dicom_fixtures as dfx


def _encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture()
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile at an empty folder so a test can see every temporary file an upload leaves."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(side: int = 60000) -> bytes:
    """A tiny PNG whose header claims side x side RGB pixels (3.6 billion for 60000): a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        _png_chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ accepted files


def test_png_jpeg_and_dicom_are_decoded_and_typed_by_content(tmp_path: Path, private_tmp: Path) -> None:
    rgb = dfx.retina_rgb(64)
    png = up.decode_upload(_encode(rgb, "PNG"))
    assert png.kind == "PNG" and png.pixels.shape == (64, 64, 3) and np.array_equal(png.pixels, rgb)
    jpeg = up.decode_upload(io.BytesIO(_encode(rgb, "JPEG", quality=95)))  # a file object, as Streamlit gives
    assert jpeg.kind == "JPEG" and jpeg.pixels.shape == (64, 64, 3)
    assert np.abs(jpeg.pixels.astype(int) - rgb).mean() < 6
    dcm = up.decode_upload(dfx.op8_rgb(tmp_path / "a.dcm").read_bytes())
    assert dcm.kind == "DICOM" and dcm.pixels.shape == (256, 256, 3) and np.array_equal(dcm.pixels, dfx.retina_rgb())
    twelve = up.decode_upload(dfx.op16_rgb_12bit(tmp_path / "b").read_bytes())  # no extension at all
    assert twelve.pixels.dtype == np.uint16 and int(twelve.pixels.max()) <= 4095
    assert list(private_tmp.iterdir()) == []  # every private folder was removed


def test_the_temporary_file_is_private_and_named_by_type_never_by_the_upload(private_tmp: Path) -> None:
    seen: dict[str, object] = {}

    def look(path: Path) -> str:
        seen["name"] = path.name
        seen["mode"] = stat.S_IMODE(path.parent.stat().st_mode)
        seen["inside"] = path.parent.parent == private_tmp
        return path.read_bytes()[:8].hex()

    data = _encode(dfx.retina_rgb(32), "JPEG")
    assert up.with_upload_file(data, look) == data[:8].hex()
    assert seen == {"name": "upload.jpg", "mode": 0o700, "inside": True}
    with pytest.raises(RuntimeError):
        up.with_upload_file(data, lambda p: (_ for _ in ()).throw(RuntimeError("boom")))
    assert list(private_tmp.iterdir()) == []  # removed after a failure too


# ------------------------------------------------------------------------------------------ refused files


def test_empty_and_oversized_uploads_are_refused_before_decoding(private_tmp: Path) -> None:
    with pytest.raises(up.UploadError, match="empty"):
        up.decode_upload(b"")
    png = _encode(dfx.retina_rgb(64), "PNG")
    with pytest.raises(up.UploadError, match="too large"):
        up.decode_upload(png, max_bytes=len(png) - 1)
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * up.MAX_UPLOAD_BYTES  # default limit: 20 MB
    with pytest.raises(up.UploadError, match="20.0 MB limit"):
        up.check_upload(big)
    # A stream is read only up to the limit + 1 byte: an oversized upload is never read whole.
    stream = io.BytesIO(b"\xff\xd8\xff" + b"\0" * 5000)
    with pytest.raises(up.UploadError, match="too large"):
        up.read_upload_bytes(stream, max_bytes=1000)
    assert stream.tell() == 1001
    assert list(private_tmp.iterdir()) == []  # nothing was written


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"GIF89a" + b"\0" * 200, "a GIF image; only PNG, JPEG and DICOM"),
        (b"II*\x00" + b"\0" * 200, "a TIFF image; only PNG, JPEG and DICOM"),
        (b"BM" + b"\0" * 200, "a BMP image"),
        (b"patient,grade\nDoe^Jane,3\n", "holds text"),
        (bytes(range(256)) * 4, "not a PNG, JPEG or DICOM"),
        (b"\0" * 127 + b"DICM" + b"\0" * 50, "not a PNG, JPEG or DICOM"),  # DICM one byte early
    ],
)
def test_wrong_magic_bytes_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(up.UploadError, match=match):
        up.decode_upload(data)


def test_a_decompression_bomb_is_refused_from_its_header(private_tmp: Path) -> None:
    bomb = _bomb_png()
    assert len(bomb) < 200
    with pytest.raises(up.UploadError, match="possible decompression bomb"):
        up.decode_upload(bomb)
    # Below imageio's 64 MP default but above the upload limit (36 MP): still refused.
    with pytest.raises(up.UploadError, match="exceeds the limit of 36,000,000"):
        up.decode_upload(_bomb_png(7000))
    assert list(private_tmp.iterdir()) == []


def test_truncated_images_are_refused() -> None:
    png = _encode(dfx.retina_rgb(64), "PNG")
    with pytest.raises(up.UploadError, match="PNG"):
        up.decode_upload(png[: len(png) // 2])
    jpeg = _encode(dfx.retina_rgb(64), "JPEG")
    with pytest.raises(up.UploadError, match="JPEG"):
        up.decode_upload(jpeg[: len(jpeg) // 3])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (dfx.ct_image, "not a fundus photograph"),
        (dfx.no_pixel_data, "no Pixel Data"),
        (dfx.huge_header, "decompression-bomb defence"),
    ],
)
def test_malformed_or_foreign_dicom_is_refused_without_echoing_phi(
    tmp_path: Path, private_tmp: Path, build, match: str
) -> None:
    data = build(tmp_path / "x.dcm").read_bytes()
    assert any(s.encode() in data for s in dfx.PHI_STRINGS)  # the file does carry PHI
    with pytest.raises(up.UploadError, match=match) as info:
        up.decode_upload(data)
    msg = str(info.value)
    assert msg.startswith(f"{up.UPLOAD_LABEL}: ")
    assert not any(s in msg for s in dfx.PHI_STRINGS)
    assert str(private_tmp) not in msg and "upload.dcm" not in msg  # no temporary path either
    assert list(private_tmp.iterdir()) == []


def test_a_truncated_dicom_file_is_refused_without_echoing_phi(tmp_path: Path) -> None:
    data = dfx.op8_rgb(tmp_path / "x.dcm").read_bytes()
    for cut in (200, len(data) // 2, len(data) - 10):
        with pytest.raises(up.UploadError) as info:
            up.decode_upload(data[:cut])
        assert not any(s in str(info.value) for s in dfx.PHI_STRINGS)


def test_upload_error_is_a_bad_input_error_naming_no_file() -> None:
    err = up.UploadError("reason")
    assert isinstance(err, BadInputError) and err.path == up.UPLOAD_LABEL and err.reason == "reason"
    with pytest.raises(TypeError):
        up.read_upload_bytes(12345)
    with pytest.raises(ValueError, match="max_bytes"):
        up.check_upload(b"x", max_bytes=0)
    assert os.sep not in up.UPLOAD_LABEL
