"""Builders for small fundus DICOM files used by the DICOM tests.

Every file carries fake PHI (`PHI_STRINGS`) so tests can prove none of it leaks into results,
error messages or logs. Pixel content comes from the real fundus photograph shipped with
scikit-image (`skimage.data.retina()`, 1411x1411 RGB), downscaled.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
SC_MF_GREY_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

# Fixed (not random) identifying UIDs: they must never appear in anything read_dicom returns.
STUDY_UID = "1.2.826.0.1.3680043.8.498.10001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.10002"
INSTANCE_UID = "1.2.826.0.1.3680043.8.498.10003"

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "PHI-123456",
    "PatientBirthDate": "19700101",
    "InstitutionName": "Saint Phi Eye Hospital",
    "AccessionNumber": "ACC-PHI-987",
    "StudyDate": "20240229",
    "ReferringPhysicianName": "Who^Doctor",
}
PHI_STRINGS: tuple[str, ...] = (
    *PHI.values(),
    "Doe",
    "Jane",
    "123456",
    STUDY_UID,
    SERIES_UID,
    INSTANCE_UID,
)


@cache
def retina_rgb(size: int = 256) -> np.ndarray:
    """skimage's real fundus photograph, [size, size, 3] uint8 (area-downscaled with Pillow)."""
    from skimage import data

    img = Image.fromarray(data.retina()).resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def base_dataset(
    *,
    sop_class: str = OP_8BIT,
    modality: str | None = "OP",
    transfer_syntax: str = dcm_uid.ExplicitVRLittleEndian,
    laterality: str | None = "L",
) -> Dataset:
    """A dataset with file meta, fake PHI and identifying UIDs, no pixel data yet."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = INSTANCE_UID
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = INSTANCE_UID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    if modality is not None:
        ds.Modality = modality
    if laterality is not None:
        ds.ImageLaterality = laterality
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    return ds


def with_pixels(ds: Dataset, arr: np.ndarray, photometric: str, bits_stored: int) -> Dataset:
    """Natively encoded pixel data; keeps the fixed SOP Instance UID.

    pydicom's set_pixel_data refuses big endian, so for Explicit VR Big Endian the elements are
    set as little endian and the Pixel Data bytes then replaced by their big-endian form.
    """
    ts = ds.file_meta.TransferSyntaxUID
    big_endian = ts == dcm_uid.ExplicitVRBigEndian
    if big_endian:
        ds.file_meta.TransferSyntaxUID = dcm_uid.ExplicitVRLittleEndian
    ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = ts  # set_pixel_data may reset it to Explicit VR LE
    if big_endian:
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    return ds


def with_encapsulated(
    ds: Dataset, frames: list[bytes], *, rows: int, columns: int, samples: int, photometric: str
) -> Dataset:
    """Encapsulated (compressed) 8-bit pixel data from already-encoded frames."""
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def jpeg_baseline_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    """JPEG Baseline with 4:2:2 chroma subsampling and a JFIF header, i.e. DICOM YBR_FULL_422."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, subsampling=1)  # 1 = 4:2:2
    return buf.getvalue()


def j2k_lossless_bytes(rgb: np.ndarray) -> bytes:
    """Raw JPEG 2000 codestream (no JP2 box), reversible, no colour transform: DICOM RGB."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG2000", irreversible=False, no_jp2=True, mct=0)
    return buf.getvalue()


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# --- ready-made fixtures -------------------------------------------------------------------------


def op8_rgb(path: Path, transfer_syntax: str = dcm_uid.ExplicitVRLittleEndian) -> Path:
    ds = base_dataset(sop_class=OP_8BIT, modality="OP", transfer_syntax=transfer_syntax)
    return save(with_pixels(ds, retina_rgb(), "RGB", 8), path)


def op16_rgb_12bit(path: Path, transfer_syntax: str = dcm_uid.ExplicitVRLittleEndian) -> Path:
    """OP 16-bit, Bits Stored 12: values retina * 16 in [0, 4080]."""
    ds = base_dataset(sop_class=OP_16BIT, modality="OP", laterality="R", transfer_syntax=transfer_syntax)
    return save(with_pixels(ds, retina_rgb().astype(np.uint16) * 16, "RGB", 12), path)


def sc_rgb(
    path: Path, transfer_syntax: str = dcm_uid.ExplicitVRLittleEndian, modality: str | None = "OT"
) -> Path:
    ds = base_dataset(sop_class=SC, modality=modality, transfer_syntax=transfer_syntax, laterality=None)
    with_pixels(ds, retina_rgb(), "RGB", 8)
    if transfer_syntax == dcm_uid.RLELossless:
        ds.file_meta.TransferSyntaxUID = dcm_uid.ExplicitVRLittleEndian
        ds.compress(dcm_uid.RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    return save(ds, path)


def ybr_full(path: Path) -> Path:
    from pydicom.pixels import convert_color_space

    ybr = convert_color_space(retina_rgb().copy(), "RGB", "YBR_FULL")
    ds = base_dataset(sop_class=VL_PHOTO, modality="XC")
    return save(with_pixels(ds, ybr, "YBR_FULL", 8), path)


def monochrome(path: Path, photometric: str = "MONOCHROME2", frames: int = 1) -> Path:
    """Green channel (the fundus channel with the most vessel contrast); frame k = green + k."""
    green = retina_rgb()[:, :, 1]
    stack = np.stack([np.clip(green.astype(np.int16) + k, 0, 255).astype(np.uint8) for k in range(frames)])
    sop = SC_MF_GREY_BYTE if frames > 1 else SC
    ds = base_dataset(sop_class=sop, modality="OT", laterality=None)
    return save(with_pixels(ds, stack if frames > 1 else stack[0], photometric, 8), path)


def palette(path: Path) -> tuple[Path, np.ndarray]:
    """8-bit indices with a 16-bit RGB palette; returns the expected [H, W, 3] uint16 image."""
    rng = np.random.default_rng(7)
    index = rng.integers(0, 256, size=(64, 80), dtype=np.uint8)
    ramp = np.arange(256, dtype=np.uint16)
    red, green, blue = ramp * 257, (255 - ramp) * 257, (ramp // 2) * 257
    ds = base_dataset(sop_class=SC, modality="OT")
    with_pixels(ds, index, "PALETTE COLOR", 8)
    for colour, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    expected = np.stack([red[index], green[index], blue[index]], axis=-1)
    return save(ds, path), expected


def jpeg_baseline(path: Path, quality: int = 95) -> Path:
    rgb = retina_rgb()
    ds = base_dataset(sop_class=OP_8BIT, modality="OP", transfer_syntax=dcm_uid.JPEGBaseline8Bit)
    ds.LossyImageCompression = "01"
    frame = jpeg_baseline_bytes(rgb, quality)
    with_encapsulated(
        ds, [frame], rows=rgb.shape[0], columns=rgb.shape[1], samples=3, photometric="YBR_FULL_422"
    )
    return save(ds, path)


def j2k_lossless(path: Path) -> Path:
    rgb = retina_rgb()
    ds = base_dataset(sop_class=OP_8BIT, modality="OP", transfer_syntax=dcm_uid.JPEG2000Lossless)
    frame = j2k_lossless_bytes(rgb)
    with_encapsulated(ds, [frame], rows=rgb.shape[0], columns=rgb.shape[1], samples=3, photometric="RGB")
    return save(ds, path)


def ct_image(path: Path) -> Path:
    ds = base_dataset(sop_class=CT_IMAGE, modality="CT", laterality=None)
    hu = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    return save(with_pixels(ds, hu, "MONOCHROME2", 12), path)


def no_pixel_data(path: Path) -> Path:
    ds = base_dataset()
    with_pixels(ds, retina_rgb(), "RGB", 8)
    del ds.PixelData
    return save(ds, path)


def huge_header(path: Path, rows: int = 60000, columns: int = 60000) -> Path:
    """Header claims rows x columns RGB, but only 16 bytes of pixel data follow."""
    ds = base_dataset()
    with_pixels(ds, retina_rgb()[:4, :4], "RGB", 8)
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = bytes(16)
    return save(ds, path)
