"""Safe image reading (`read_image` / `decode_image`) and path safety (`resolve_inside`)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from retinagen.data.imageio import (
    IMAGE_EXTENSIONS,
    decode_image,
    is_dicom_file,
    read_image,
    resolve_inside,
    sniff_format,
)
from retinagen.errors import BadInputError, DicomError, ImageDecodeError, UnsafePathError
from tests.retinagen.data import dicom_fixtures as dfx


@cache
def retina(size: int = 96) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.retina()).resize((size, size), Image.Resampling.BOX))


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose IHDR claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------------
# Good images of every mode


def test_rgb_jpeg_reads_as_uint8_rgb(tmp_path: Path) -> None:
    p = tmp_path / "a.jpeg"
    p.write_bytes(jpeg_bytes(retina(), quality=98))
    d = decode_image(p)
    assert d.pixels.shape == (96, 96, 3) and d.pixels.dtype == np.uint8
    assert d.format == "JPEG" and d.warnings == ()
    # Channel order is RGB (a fundus is red-dominant), values close to the source.
    assert d.pixels[..., 0].mean() > d.pixels[..., 2].mean()
    assert np.abs(d.pixels.astype(int) - retina().astype(int)).mean() < 3


def test_16bit_rgb_png_keeps_16_bits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 65536, size=(20, 30, 3), dtype=np.uint16)
    p = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(p), a[:, :, ::-1])
    out = read_image(p)
    assert out.dtype == np.uint16 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, a)


def test_16bit_rgba_png_is_composited_on_black(tmp_path: Path) -> None:
    a = np.full((4, 5, 3), 40000, np.uint16)
    alpha = np.zeros((4, 5), np.uint16)
    alpha[:, 2:] = 65535
    p = tmp_path / "rgba16.png"
    assert cv2.imwrite(str(p), np.dstack([a, alpha]))
    out = read_image(p)
    assert out.dtype == np.uint16
    assert (out[:, :2] == 0).all() and (out[:, 2:] == 40000).all()


def test_16bit_grey_png(tmp_path: Path) -> None:
    g = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(g).save(p)
    out = read_image(p)
    assert out.dtype == np.uint16 and out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 128
    rgba[0, 0, 3] = 0
    rgba[0, 1, 3] = 255
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(p)
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (6, 6, 3)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [200, 100, 50])
    np.testing.assert_array_equal(out[3, 3], [100, 50, 25])  # round(200 * 128 / 255) = 100


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("LA", (200, 255), (200, 200, 200)),
        ("CMYK", (0, 255, 0, 0), (255, 0, 255)),
        ("P", 0, (0, 0, 0)),
    ],
)
def test_other_modes_become_rgb(
    tmp_path: Path, mode: str, value: object, expected: tuple[int, int, int]
) -> None:
    ext = ".jpg" if mode == "CMYK" else ".png"
    p = tmp_path / f"m{ext}"
    Image.new(mode, (5, 4), value).save(p)
    out = read_image(p)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[2, 2], expected)


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 250, 10, 10] + [0] * (256 * 3 - 6))
    im.info["transparency"] = 1
    p = tmp_path / "pt.png"
    im.save(p, transparency=1)
    assert (read_image(p) == 0).all()  # fully transparent red over black


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255  # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW for display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    out = read_image(p)
    assert out.shape == (20, 10, 3)
    assert out[:10].mean() > 200 and out[10:].mean() < 50  # white half now on top


def test_multi_frame_uses_first_with_warning(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    p = tmp_path / "two.tif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    d = decode_image(p)
    assert tuple(d.pixels[0, 0]) == (255, 0, 0)
    assert any("2 frames" in w for w in d.warnings)


def test_png_with_jpeg_extension_is_read_with_a_warning(tmp_path: Path) -> None:
    p = tmp_path / "actually_png.jpeg"
    p.write_bytes(png_bytes(retina()))
    d = decode_image(p)
    assert d.format == "PNG"
    np.testing.assert_array_equal(d.pixels, retina())  # lossless: read by content, not by name
    assert len(d.warnings) == 1 and ".jpeg" in d.warnings[0] and "PNG" in d.warnings[0]


# ------------------------------------------------------------------------------------------------
# Bad files: each refused with ImageDecodeError and a specific reason


def reason_of(path: Path, **kw: int) -> str:
    with pytest.raises(ImageDecodeError) as ei:
        read_image(path, **kw)
    assert ei.value.path == str(path)
    return ei.value.reason


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpeg"
    p.write_bytes(b"")
    assert reason_of(p) == "empty file (0 bytes)"


def test_missing_file_and_folder(tmp_path: Path) -> None:
    assert "does not exist" in reason_of(tmp_path / "nope.png")
    assert "not a regular file" in reason_of(tmp_path)


@pytest.mark.parametrize("keep", [0.97, 0.5, 0.1, 400])
def test_truncated_jpeg_is_refused(tmp_path: Path, keep: float) -> None:
    data = jpeg_bytes(retina())
    n = int(len(data) * keep) if keep < 1 else int(keep)
    p = tmp_path / "cut.jpeg"
    p.write_bytes(data[:n])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    r = reason_of(p)
    assert "truncated" in r or "corrupt" in r


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    data = png_bytes(retina())
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    assert "truncated" in reason_of(p) or "corrupt" in reason_of(p)


def test_text_named_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpeg"
    p.write_text("patient 10 left eye, grade 2\n")
    assert reason_of(p) == "not an image: the file holds text"


def test_binary_junk(tmp_path: Path) -> None:
    p = tmp_path / "junk.png"
    p.write_bytes(bytes(range(256)) * 4)
    assert reason_of(p).startswith("not an image")


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(50_000, 50_000))
    assert p.stat().st_size < 200
    r = reason_of(p)
    assert "50000 x 50000" in r and "decompression bomb" in r
    # Our own limit applies below Pillow's: a real 300 x 200 image with max_pixels 10 000.
    q = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(q)
    assert "300 x 200" in reason_of(q, max_pixels=10_000)
    assert read_image(q, max_pixels=60_000).shape == (200, 300, 3)


def test_bomb_in_a_format_we_do_not_parse_ourselves(tmp_path: Path) -> None:
    # BMP header claiming 10000 x 10000: Pillow reads the size from the header, our check refuses it.
    # 100 MP is above our 64 MP limit but below Pillow's own bomb error (2 x 89 MP), so only our check
    # can refuse it (its reason quotes the size).
    header = (
        b"BM"
        + struct.pack("<IHHI", 54, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, 10000, 10000, 1, 24, 0, 0, 0, 0, 0, 0)
    )
    p = tmp_path / "bomb.bmp"
    p.write_bytes(header + b"\x00" * 16)
    r = reason_of(p)
    assert "too large" in r and "10000 x 10000" in r


def test_float_image_is_unsupported(tmp_path: Path) -> None:
    p = tmp_path / "f.tif"
    Image.new("F", (4, 4), 0.5).save(p)
    assert "unsupported image mode 'F'" in reason_of(p)


def test_mutated_files_never_leak_library_exceptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random byte damage: the outcome is an image or ImageDecodeError, never a raw exception.

    The reason names the decoder's exception type, never its message (DEC-8): a message that could
    quote file content or a path is raised from inside Pillow's decoder and must not reach the reason.
    """
    secret = "SECRET-/home/patient/Jane Doe"
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(retina(48)))
    for exc_type in (OSError, SyntaxError, ValueError):

        def leaky_load(self: object, exc_type: type[Exception] = exc_type) -> None:
            raise exc_type(secret)

        with monkeypatch.context() as m:
            m.setattr(ImageFile.ImageFile, "load", leaky_load)
            with pytest.raises(ImageDecodeError) as info:
                read_image(good)
        assert secret not in str(info.value) and exc_type.__name__ in info.value.reason
    rng = np.random.default_rng(1)
    sources = {".jpeg": jpeg_bytes(retina(48)), ".png": png_bytes(retina(48))}
    for k in range(60):
        ext = ".jpeg" if k % 2 else ".png"
        buf = bytearray(sources[ext])
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 8))):
            buf[pos] = int(rng.integers(0, 256))
        if k % 3 == 0:
            buf = buf[: int(rng.integers(1, len(buf)))]
        p = tmp_path / f"m{k}{ext}"
        p.write_bytes(bytes(buf))
        try:
            out = read_image(p)
        except ImageDecodeError as e:
            assert e.reason and str(tmp_path) not in e.reason
        else:
            assert out.ndim == 3 and out.shape[2] == 3


# ------------------------------------------------------------------------------------------------
# DICOM dispatch


def test_dicom_is_dispatched_by_extension_and_by_magic(tmp_path: Path) -> None:
    p = dfx.op8_rgb(tmp_path / "eye.dcm")
    d = decode_image(p)
    assert d.format == "DICOM" and d.pixels.shape == (256, 256, 3) and d.laterality == "left"
    q = tmp_path / "eye_no_ext"
    q.write_bytes(p.read_bytes())
    assert is_dicom_file(q)
    d2 = decode_image(q)
    np.testing.assert_array_equal(d2.pixels, d.pixels)
    r = tmp_path / "eye.png"  # DICOM content under an image extension: read by content, warned
    r.write_bytes(p.read_bytes())
    d3 = decode_image(r)
    assert d3.format == "DICOM" and any("DICOM" in w for w in d3.warnings)


def test_ct_dicom_is_refused_with_the_modality(tmp_path: Path) -> None:
    p = dfx.ct_image(tmp_path / "ct.dcm")
    with pytest.raises(DicomError) as ei:
        read_image(p)
    assert "CT" in ei.value.reason
    assert isinstance(ei.value, BadInputError)
    for phi in dfx.PHI_STRINGS:
        assert phi not in str(ei.value)


def test_sniff_format() -> None:
    assert sniff_format(b"\xff\xd8\xff\xe0" + b"\0" * 20) == "JPEG"
    assert sniff_format(b"\x89PNG\r\n\x1a\n") == "PNG"
    assert sniff_format(b"\0" * 128 + b"DICM") == "DICOM"
    assert sniff_format(b"GIF89a") == "GIF"
    assert sniff_format(b"RIFF\0\0\0\0WEBP") == "WEBP"
    assert sniff_format(b"hello") is None
    assert sniff_format(b"") is None
    assert ".jpeg" in IMAGE_EXTENSIONS and ".dcm" in IMAGE_EXTENSIONS


# ------------------------------------------------------------------------------------------------
# resolve_inside


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    return root


def test_resolve_inside_accepts_relative_names(tree: Path) -> None:
    assert resolve_inside(tree, "a/x.png") == (tree / "a" / "x.png").resolve()
    assert resolve_inside(tree, "a/../a/x.png") == (tree / "a" / "x.png").resolve()
    assert resolve_inside(tree, "a\\x.png") == (tree / "a" / "x.png").resolve()
    assert resolve_inside(tree, "a/new.png") == (tree / "a" / "new.png").resolve()  # need not exist


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../secret.png", "escapes"),
        ("a/../../secret.png", "escapes"),
        ("..\\secret.png", "escapes"),
        ("/etc/passwd", "absolute"),
        ("C:\\Windows\\win.ini", "absolute"),
        ("\\\\server\\share\\x.png", "absolute"),
        ("", "empty"),
        ("a/x\x00.png", "NUL"),
    ],
)
def test_resolve_inside_refuses_escapes(tree: Path, name: str, why: str) -> None:
    with pytest.raises(UnsafePathError) as ei:
        resolve_inside(tree, name)
    assert why in ei.value.reason
    assert str(tree) not in str(ei.value)  # the error quotes the name as given, not our root


def test_resolve_inside_refuses_symlinks_out_of_root(tree: Path) -> None:
    os.symlink(tree.parent / "secret.png", tree / "link.png")
    os.symlink(tree.parent, tree / "up")
    os.symlink(tree / "a" / "x.png", tree / "inner.png")
    for name in ("link.png", "up/secret.png"):
        with pytest.raises(UnsafePathError) as ei:
            resolve_inside(tree, name)
        assert "symlink" in ei.value.reason
    assert resolve_inside(tree, "inner.png") == (tree / "a" / "x.png").resolve()  # link inside: fine


def test_decoding_in_threads_leaves_the_process_warning_filters_alone(tmp_path: Path) -> None:
    """The dashboard decodes several sessions' uploads at once: a per-call `warnings.catch_warnings()` swaps the
    process-wide filter list while it runs (and a restore can drop another thread's filters), so decoding must
    not touch it."""
    import threading
    import warnings

    path = tmp_path / "a.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(path)
    before = warnings.filters
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while not stop.is_set():
                read_image(path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    swapped = 0
    for _ in range(20_000):
        swapped += warnings.filters is not before
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert swapped == 0 and warnings.filters is before
