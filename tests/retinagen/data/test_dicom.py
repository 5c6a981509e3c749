"""Tests for retinagen.data.dicom: fundus DICOM in, RGB out; everything else refused without PHI."""

from __future__ import annotations

import collections
import logging
import os
import struct
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid as dcm_uid
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import get_frame
from pydicom.pixels import convert_color_space, get_decoder

from retinagen.data.dicom import DEFAULT_MAX_PIXELS, DicomImage, read_dicom
from retinagen.data.imageio import read_image
from retinagen.errors import DicomError
from tests.retinagen.data import dicom_fixtures as fx

INFO_KEYS = {
    "modality",
    "sop_class",
    "rows",
    "columns",
    "bits_allocated",
    "bits_stored",
    "samples_per_pixel",
    "photometric",
    "transfer_syntax",
    "frames",
    "laterality",
}


def _assert_no_phi(*texts: str) -> None:
    for text in texts:
        for secret in fx.PHI_STRINGS:
            assert secret not in text, f"PHI {secret!r} leaked into {text!r}"


def _read_checked(path: Path, **kwargs: int) -> DicomImage:
    """read_dicom plus the invariants every accepted image must satisfy, PHI included."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = read_dicom(path, **kwargs)
    assert img.pixels.ndim == 3 and img.pixels.shape[2] == 3
    assert img.pixels.dtype in (np.uint8, np.uint16)
    assert int(img.pixels.max()) <= img.max_value
    assert set(img.info) <= INFO_KEYS
    assert all(isinstance(v, str | int) for v in img.info.values())
    assert (img.info["rows"], img.info["columns"]) == img.pixels.shape[:2]
    assert img.frame == 0 and img.n_frames == img.info["frames"] >= 1
    _assert_no_phi(repr(img), str(img.info), *(str(w.message) for w in caught))
    return img


def _refused(path: Path, **kwargs: int) -> DicomError:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DicomError) as info:
            read_dicom(path, **kwargs)
    err = info.value
    assert path.name in str(err) and err.path == str(path)
    # The original library exception is not chained: its message could quote file content.
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    _assert_no_phi(str(err), repr(err), err.reason, *(str(w.message) for w in caught))
    return err


# --- accepted fundus files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ts", [dcm_uid.ExplicitVRLittleEndian, dcm_uid.ImplicitVRLittleEndian, dcm_uid.ExplicitVRBigEndian]
)
def test_op_8bit_rgb_is_read_exactly(tmp_path: Path, ts: str) -> None:
    img = _read_checked(fx.op8_rgb(tmp_path / "op8.dcm", ts))
    assert img.pixels.dtype == np.uint8 and img.max_value == 255
    np.testing.assert_array_equal(img.pixels, fx.retina_rgb())
    assert img.modality == "OP" and img.sop_class_uid == fx.OP_8BIT and img.photometric == "RGB"
    assert img.info["sop_class"] == "Ophthalmic Photography 8 Bit Image Storage"
    assert img.info["transfer_syntax"] == dcm_uid.UID(ts).name
    assert img.info["laterality"] == "L"


@pytest.mark.parametrize("ts", [dcm_uid.ExplicitVRLittleEndian, dcm_uid.ExplicitVRBigEndian])
def test_op_16bit_keeps_stored_values_and_range(tmp_path: Path, ts: str) -> None:
    img = _read_checked(fx.op16_rgb_12bit(tmp_path / "op16.dcm", ts))
    assert img.pixels.dtype == np.uint16
    assert img.bits_stored == 12 and img.max_value == 4095
    np.testing.assert_array_equal(img.pixels, fx.retina_rgb().astype(np.uint16) * 16)
    assert img.info["laterality"] == "R"


@pytest.mark.parametrize("modality", ["OT", "SC", "XC", None])
def test_secondary_capture_rgb_with_any_fundus_modality(tmp_path: Path, modality: str | None) -> None:
    img = _read_checked(fx.sc_rgb(tmp_path / "sc.dcm", modality=modality))
    np.testing.assert_array_equal(img.pixels, fx.retina_rgb())
    assert img.modality == (modality or "")
    assert "laterality" not in img.info


def test_rle_lossless_is_exact(tmp_path: Path) -> None:
    img = _read_checked(fx.sc_rgb(tmp_path / "rle.dcm", dcm_uid.RLELossless))
    assert img.info["transfer_syntax"] == "RLE Lossless"
    np.testing.assert_array_equal(img.pixels, fx.retina_rgb())


def test_ybr_full_is_converted_to_rgb_once(tmp_path: Path) -> None:
    img = _read_checked(fx.ybr_full(tmp_path / "ybr.dcm"))
    assert img.photometric == "YBR_FULL"  # as stored
    rgb = fx.retina_rgb().astype(np.int16)
    diff = np.abs(img.pixels.astype(np.int16) - rgb)
    assert diff.max() <= 3 and diff.mean() < 1.0  # 8-bit YCbCr round trip
    # Not left in YBR and not converted twice: either would be tens of levels away.
    ybr = convert_color_space(fx.retina_rgb().copy(), "RGB", "YBR_FULL").astype(np.int16)
    assert np.abs(img.pixels.astype(np.int16) - ybr).mean() > 20


def test_monochrome2_is_replicated(tmp_path: Path) -> None:
    img = _read_checked(fx.monochrome(tmp_path / "m2.dcm"))
    green = fx.retina_rgb()[:, :, 1]
    for c in range(3):
        np.testing.assert_array_equal(img.pixels[:, :, c], green)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    img = _read_checked(fx.monochrome(tmp_path / "m1.dcm", "MONOCHROME1"))
    np.testing.assert_array_equal(img.pixels[:, :, 0], 255 - fx.retina_rgb()[:, :, 1])
    assert img.photometric == "MONOCHROME1"


def test_multiframe_returns_frame_zero_and_counts_frames(tmp_path: Path) -> None:
    img = _read_checked(fx.monochrome(tmp_path / "mf.dcm", frames=3))
    assert img.n_frames == 3 and img.info["frames"] == 3 and img.frame == 0
    np.testing.assert_array_equal(img.pixels[:, :, 2], fx.retina_rgb()[:, :, 1])  # frame k = green + k


def test_palette_colour_lut_is_applied(tmp_path: Path) -> None:
    path, expected = fx.palette(tmp_path / "pal.dcm")
    img = _read_checked(path)
    assert img.pixels.dtype == np.uint16 and img.max_value == 65535
    np.testing.assert_array_equal(img.pixels, expected)


def test_jpeg_baseline_ybr_422_close_to_original(tmp_path: Path) -> None:
    img = _read_checked(fx.jpeg_baseline(tmp_path / "jpg.dcm"))
    assert img.photometric == "YBR_FULL_422" and img.info["transfer_syntax"] == "JPEG Baseline (Process 1)"
    diff = np.abs(img.pixels.astype(np.float64) - fx.retina_rgb())
    assert diff.mean() < 3.0  # quality 95, 4:2:2; measured 1.44
    # Channel means within a level: colour handled right (a YBR/RGB mix-up shifts them by tens).
    np.testing.assert_allclose(img.pixels.mean(axis=(0, 1)), fx.retina_rgb().mean(axis=(0, 1)), atol=1.5)


def test_jpeg2000_lossless_through_pillow_is_exact(tmp_path: Path) -> None:
    if "pillow" not in get_decoder(dcm_uid.JPEG2000Lossless).available_plugins:
        pytest.skip("Pillow built without OpenJPEG")
    img = _read_checked(fx.j2k_lossless(tmp_path / "j2k.dcm"))
    np.testing.assert_array_equal(img.pixels, fx.retina_rgb())


def test_jpeg_baseline_uses_pillow_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pylibjpeg (GPL) may be installed in a dev venv but must never be needed or used."""
    decoder = get_decoder(dcm_uid.JPEGBaseline8Bit)
    calls: list[str] = []
    real_pillow = decoder._available["pillow"]

    def spy(src: bytes, runner: object) -> bytes:
        calls.append("pillow")
        return real_pillow(src, runner)

    def forbidden(name: str) -> object:
        def plugin(src: bytes, runner: object) -> bytes:
            calls.append(name)  # recorded: pydicom would swallow an exception and try the next plugin
            raise AssertionError(f"{name} must not be used")

        return plugin

    # The optional plugins are registered (first, so pydicom's own order would pick them) whether or
    # not they are installed here: only naming the plugin in the reader keeps them out.
    monkeypatch.setattr(
        decoder, "_available", {"pylibjpeg": forbidden("pylibjpeg"), "gdcm": forbidden("gdcm"), "pillow": spy}
    )
    img = _read_checked(fx.jpeg_baseline(tmp_path / "jpg.dcm"))
    assert calls == ["pillow"]
    # And with pylibjpeg gone altogether (the shipped environment), the result is the same.
    monkeypatch.delitem(decoder._available, "pylibjpeg", raising=False)
    np.testing.assert_array_equal(read_dicom(tmp_path / "jpg.dcm").pixels, img.pixels)


def _opencv_frame0(path: Path) -> np.ndarray:
    """Frame 0 of a JPEG DICOM file decoded by OpenCV (a project dependency): libjpeg converts the
    JPEG's YCbCr to RGB itself, a path independent of pydicom's colour handling."""
    ds = pydicom.dcmread(path)
    frame = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames", 1)))
    bgr = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_COLOR)
    return bgr[..., ::-1].astype(np.float64)


def test_pillow_jpeg_matches_an_independent_decoder(tmp_path: Path) -> None:
    """A second JPEG decoder agrees (no YBR double conversion, no channel swap: either is > 0.7)."""
    path = fx.jpeg_baseline(tmp_path / "jpg.dcm")
    assert np.abs(read_dicom(path).pixels - _opencv_frame0(path)).mean() < 0.5  # measured 0.0

    # pydicom's real 30-frame YBR_FULL_422 JPEG (an ultrasound), relabelled as a VL photograph.
    ds = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"))
    ds.Modality, ds.SOPClassUID = "XC", fx.VL_PHOTO
    ds.file_meta.MediaStorageSOPClassUID = fx.VL_PHOTO
    ds.save_as(tmp_path / "vl.dcm")
    img = _read_checked(tmp_path / "vl.dcm")
    assert img.n_frames == 30
    reference = _opencv_frame0(tmp_path / "vl.dcm")
    assert np.abs(img.pixels - reference).mean() < 0.5  # measured 0.0; swapped channels: 0.75
    assert np.abs(img.pixels[..., ::-1] - reference).mean() > 0.5  # the margin above can see a swap


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG, RGB
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",  # JPEG, YBR_FULL
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG, YBR_FULL_422
        "SC_rgb_jpeg_lossy_gdcm.dcm",  # JPEG, YBR_FULL
        "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422
        "SC_rgb_gdcm_KY.dcm",  # JPEG 2000
    ],
)
def test_real_encodings_match_lossless_reference(name: str) -> None:
    """pydicom ships one 100x100 test image in many encodings; all decode close to the RLE copy."""
    reference = read_dicom(get_testdata_file("SC_rgb_rle.dcm")).pixels.astype(np.float64)
    assert tuple(reference[50, 50]) == (128, 128, 255)  # a known colour bar of that image
    path = get_testdata_file(name)
    if "gdcm_KY" in name and "pillow" not in get_decoder(dcm_uid.JPEG2000).available_plugins:
        pytest.skip("Pillow built without OpenJPEG")
    img = _read_checked(Path(path))
    assert np.abs(img.pixels - reference).mean() < 3.5  # measured <= 2.83


def test_big_endian_reads_like_little_endian() -> None:
    le = read_dicom(get_testdata_file("SC_rgb_small_odd.dcm")).pixels
    be = read_dicom(get_testdata_file("SC_rgb_small_odd_big_endian.dcm")).pixels
    np.testing.assert_array_equal(le, be)


def test_debug_log_holds_only_technical_fields(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        read_dicom(fx.op8_rgb(tmp_path / "op8.dcm"))
        with pytest.raises(DicomError):
            read_dicom(fx.ct_image(tmp_path / "ct.dcm"))
    assert "Ophthalmic Photography 8 Bit Image Storage" in caplog.text  # the log line exists
    _assert_no_phi(caplog.text)


def test_dicom_image_checks_its_pixels() -> None:
    with pytest.raises(ValueError, match="H, W, 3"):
        DicomImage(np.zeros((4, 4), np.uint8), "OP", fx.OP_8BIT, "RGB", 8, 255)
    with pytest.raises(ValueError):
        DicomImage(np.zeros((4, 4, 3), np.float32), "OP", fx.OP_8BIT, "RGB", 8, 255)


# --- refused files -------------------------------------------------------------------------------


def _truncated(builder: Callable[[Path], Path], keep: float) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        builder(path)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        return path

    return build


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _dicm_then_garbage(path: Path) -> Path:
    garbage = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(128) + b"DICM" + garbage)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _ct_sop_class_with_ot_modality(path: Path) -> Path:
    ds = fx.base_dataset(sop_class=fx.CT_IMAGE, modality="OT")
    return fx.save(fx.with_pixels(ds, fx.retina_rgb(), "RGB", 8), path)


def _signed_grey(path: Path) -> Path:
    ds = fx.base_dataset(sop_class=fx.SC, modality="OT")
    return fx.save(fx.with_pixels(ds, np.zeros((32, 32), np.int16), "MONOCHROME2", 16), path)


def _unknown_modality(path: Path) -> Path:
    ds = fx.base_dataset(sop_class=fx.SC, modality="ZZTOP")
    return fx.save(fx.with_pixels(ds, fx.retina_rgb(), "RGB", 8), path)


def _jpeg_frame_bigger_than_header(path: Path, side: int = 12000) -> Path:
    """Header says 16x16; the JPEG's SOF says side x side (default 144 Mpx): a decompression bomb."""
    rgb = fx.retina_rgb()[:16, :16].copy()
    frame = bytearray(fx.jpeg_baseline_bytes(rgb))
    sof = frame.index(b"\xff\xc0")
    frame[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    ds = fx.base_dataset(sop_class=fx.OP_8BIT, transfer_syntax=dcm_uid.JPEGBaseline8Bit)
    fx.with_encapsulated(ds, [bytes(frame)], rows=16, columns=16, samples=3, photometric="YBR_FULL_422")
    return fx.save(ds, path)


def _jpeg_frame_smaller_than_header(path: Path) -> Path:
    ds = fx.base_dataset(sop_class=fx.OP_8BIT, transfer_syntax=dcm_uid.JPEGBaseline8Bit)
    frame = fx.jpeg_baseline_bytes(fx.retina_rgb()[:16, :16].copy())
    fx.with_encapsulated(ds, [frame], rows=32, columns=32, samples=3, photometric="YBR_FULL_422")
    return fx.save(ds, path)


REFUSALS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "ct": (fx.ct_image, "modality CT (Computed Tomography) is not a fundus photograph"),
    "unknown_modality": (_unknown_modality, "unrecognised modality"),
    "ct_sop_class": (_ct_sop_class_with_ot_modality, "SOP class 'CT Image Storage' is not a fundus"),
    "no_pixel_data": (fx.no_pixel_data, "no Pixel Data"),
    "truncated_native": (_truncated(fx.op8_rgb, 0.5), "truncated"),
    "truncated_header": (_truncated(fx.op8_rgb, 0.002), "no Pixel Data"),  # cut before the pixels
    "truncated_jpeg": (_truncated(fx.jpeg_baseline, 0.5), "could not be decoded"),
    "zero_bytes": (_empty, "empty file (0 bytes)"),
    "random_bytes": (_random_bytes, "not a DICOM file"),
    "dicm_then_garbage": (_dicm_then_garbage, "no Transfer Syntax UID"),
    "huge_header": (fx.huge_header, "60000x60000 = 3600000000 pixels is larger than the limit"),
    "signed": (_signed_grey, "signed pixel data"),
    "jpeg_bomb": (_jpeg_frame_bigger_than_header, "decompression bomb"),
    # 16 Mpx: below Pillow's own bomb limit (89 Mpx), still 65,000 times what the header declares.
    "jpeg_bomb_below_pillow_limit": (lambda p: _jpeg_frame_bigger_than_header(p, 4000), "decompression bomb"),
    "jpeg_size_mismatch": (_jpeg_frame_smaller_than_header, "could not be decoded"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_file_and_reason(tmp_path: Path, case: str) -> None:
    builder, reason = REFUSALS[case]
    path = builder(tmp_path / f"{case}.dcm")
    err = _refused(path)
    assert reason in err.reason


def test_an_unexpected_library_error_is_a_refusal_that_neither_quotes_nor_chains_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DEC-8: an exception nobody foresaw inside the reader (here from pydicom's parser) becomes a
    DicomError that names only its type; its message, which could quote header values, is dropped
    and not chained."""
    import retinagen.data.dicom as dicom_mod

    def broken_dcmread(*args: object, **kwargs: object) -> None:
        raise RuntimeError("PatientName=Jane^Doe")

    monkeypatch.setattr(dicom_mod.pydicom, "dcmread", broken_dcmread)
    err = _refused(fx.op8_rgb(tmp_path / "op8.dcm"))
    assert "RuntimeError" in err.reason and "Jane" not in str(err)


def test_a_bomb_frame_is_refused_before_it_reaches_the_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The frame's own header is compared with Rows x Columns first: Pillow never allocates the bomb."""
    decoder = get_decoder(dcm_uid.JPEGBaseline8Bit)
    calls: list[int] = []
    real_pillow = decoder._available["pillow"]

    def spy(src: bytes, runner: object) -> bytes:
        calls.append(len(src))
        return real_pillow(src, runner)

    monkeypatch.setitem(decoder._available, "pillow", spy)
    for side in (4000, 12000, 60000):
        assert (
            "decompression bomb"
            in _refused(_jpeg_frame_bigger_than_header(tmp_path / f"b{side}.dcm", side)).reason
        )
    assert calls == []
    _read_checked(fx.jpeg_baseline(tmp_path / "ok.dcm"))
    assert len(calls) == 1


def test_reading_in_threads_leaves_the_process_warning_filters_alone(tmp_path: Path) -> None:
    """pydicom's warnings are silenced once at import: a per-read `warnings.catch_warnings()` would swap the
    process-wide filter list while it runs (and its restore can drop filters another thread added)."""
    path = fx.jpeg_baseline(tmp_path / "ok.dcm")
    before = warnings.filters
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while not stop.is_set():
                read_dicom(path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
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


def test_concurrent_reads_cannot_switch_off_each_others_bomb_check(tmp_path: Path) -> None:
    """Dashboard uploads are decoded in threads of one process. The check must not depend on state
    another thread's read can change (as `warnings.catch_warnings` filters are, process-wide)."""
    bomb = _jpeg_frame_bigger_than_header(tmp_path / "bomb.dcm")
    normal_dcm = fx.jpeg_baseline(tmp_path / "normal.dcm")
    normal_png = tmp_path / "normal.png"
    Image.fromarray(fx.retina_rgb()).save(normal_png)
    stop = threading.Event()
    failures: list[str] = []

    def keep_reading(read: Callable[[Path], object], path: Path) -> None:
        while not stop.is_set():
            try:
                read(path)
            except Exception as exc:  # reported by the main thread
                failures.append(f"{path.name}: {exc!r}")
                return

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely, as a loaded server would
    # Two other sessions upload at the same time: a DICOM file and a PNG (read_image).
    others = [
        threading.Thread(target=keep_reading, args=(read_dicom, normal_dcm), daemon=True),
        threading.Thread(target=keep_reading, args=(read_image, normal_png), daemon=True),
    ]
    try:
        for t in others:
            t.start()
        reasons = []
        for _ in range(30):
            with pytest.raises(DicomError) as info:
                read_dicom(bomb)
            reasons.append(info.value.reason)
    finally:
        stop.set()
        for t in others:
            t.join(timeout=30)
        sys.setswitchinterval(switch)
    assert failures == []
    bad = [r for r in reasons if "decompression bomb" not in r]
    assert bad == [], f"{len(bad)}/{len(reasons)} bomb reads were not refused as bombs: {bad[0]}"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "does not exist" in _refused(tmp_path / "absent.dcm").reason
    (tmp_path / "folder.dcm").mkdir()
    assert "not a regular file" in _refused(tmp_path / "folder.dcm").reason


def test_max_pixels_is_checked_before_decoding(tmp_path: Path) -> None:
    path = fx.op8_rgb(tmp_path / "op8.dcm")
    assert "larger than the limit of 65535" in _refused(path, max_pixels=256 * 256 - 1).reason
    assert _read_checked(path, max_pixels=256 * 256).pixels.shape == (256, 256, 3)
    assert DEFAULT_MAX_PIXELS == 8192 * 8192
    with pytest.raises(ValueError):
        read_dicom(path, max_pixels=0)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("SC_rgb_jls_lossy_line.dcm", "'JPEG-LS Lossy (Near-Lossless) Image Compression' is not supported"),
        ("SC_rgb_jpeg_gdcm.dcm", "needs pylibjpeg-libjpeg or GDCM"),
        ("image_dfl.dcm", "'Deflated Explicit VR Little Endian' is not supported"),
        ("SC_rgb_rle_32bit.dcm", "Bits Allocated 32"),
        ("DICOMDIR-empty.dcm", "SOP class 'Media Storage Directory Storage'"),
        ("ExplVR_LitEndNoMeta.dcm", "not a DICOM file"),
    ],
)
def test_real_unsupported_files_are_refused_with_reason(name: str, reason: str) -> None:
    assert reason in _refused(Path(get_testdata_file(name))).reason


# --- every test file pydicom ships ---------------------------------------------------------------


def _category(reason: str) -> str:
    for key in (
        "modality",
        "SOP class",
        "no SOP Class UID",
        "transfer syntax",
        "Transfer Syntax UID",
        "Bits Allocated",
        "not a DICOM file",
        "not a regular file",
        "no Pixel Data",
        "could not be decoded",
        "malformed",
    ):
        if key in reason:
            return key
    return reason


def test_every_pydicom_test_file_is_read_or_refused_cleanly() -> None:
    files = sorted(get_testdata_files())
    assert len(files) > 100
    outcome: collections.Counter[str] = collections.Counter()
    ct_mr_total = ct_mr_modality_refusals = 0
    accepted: list[str] = []
    for name in files:
        path = Path(name)
        modality = None
        if path.is_file():
            try:  # the test's own view of the header, to know which files are CT/MR
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    modality = pydicom.dcmread(path, stop_before_pixels=True, force=True).get("Modality")
            except Exception:
                modality = None
        try:
            img = read_dicom(path)
        except DicomError as err:
            assert err.path == str(path) and path.name in str(err)
            outcome[_category(err.reason)] += 1
            if modality in ("CT", "MR"):
                ct_mr_total += 1
                ct_mr_modality_refusals += err.reason.startswith(f"modality {modality} (")
            continue
        # Anything else escaping read_dicom fails the test right here.
        assert img.pixels.ndim == 3 and img.pixels.shape[2] == 3
        assert img.pixels.dtype in (np.uint8, np.uint16)
        assert modality in (None, "OT", "OP", "XC", "SC")
        outcome["accepted"] += 1
        accepted.append(os.path.basename(name))
        if modality in ("CT", "MR"):
            ct_mr_total += 1
    print(
        "pydicom test files:",
        dict(outcome),
        f"CT/MR refused for modality: {ct_mr_modality_refusals}/{ct_mr_total}",
    )
    assert ct_mr_total >= 50 and ct_mr_modality_refusals == ct_mr_total
    assert {"SC_rgb_rle.dcm", "SC_jpeg_no_color_transform.dcm", "SC_rgb_small_odd_big_endian.dcm"} <= set(
        accepted
    )
    assert outcome["accepted"] >= 20
