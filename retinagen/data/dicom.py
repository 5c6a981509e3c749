"""Safe reading of fundus photographs stored as DICOM.

`read_dicom(path)` returns one RGB frame and a handful of technical, non-identifying facts, or
raises `DicomError(path, reason)`. It never returns or mentions patient data.

What is accepted
    SOP classes: Ophthalmic Photography 8/16 Bit, VL Photographic, Secondary Capture (single- and
    multi-frame). Modality (0008,0060) must be OP, XC, OT or SC, or absent.
    Transfer syntaxes: Implicit/Explicit VR Little Endian, Explicit VR Big Endian, RLE Lossless
    (pydicom's own decoder), JPEG Baseline and JPEG 2000 (Pillow's decoder; Pillow is a project
    dependency, pylibjpeg/GDCM are not and are never used even when installed).
    Photometric interpretations: RGB, YBR_FULL, YBR_FULL_422 (converted to RGB once, by pydicom),
    MONOCHROME2 (replicated to 3 channels), MONOCHROME1 (inverted, then replicated), PALETTE COLOR
    (the file's colour LUT applied). Bits Allocated 8 or 16, unsigned, 1 or 3 samples per pixel.

Safety
    * The header is read first with ``stop_before_pixels=True`` (``force=False``: a file without the
      DICM preamble is refused) and every check below runs on it before a byte of pixel data is
      decoded. Rows x Columns is bounded (``max_pixels``) so a tiny file cannot ask for gigabytes
      (decompression bomb). A compressed (JPEG / JPEG 2000) frame carries its own width and height:
      they are read from the frame's header (Pillow's ``Image.open``, which decodes nothing) and a
      frame wider or taller than Columns x Rows is refused before the decoder allocates it. The
      check compares numbers it was handed; it does not depend on ``warnings`` filters or
      ``PIL.Image.MAX_IMAGE_PIXELS`` (both process-wide), so concurrent reads in other threads
      cannot switch it off.
    * Deflated transfer syntax is refused from the file meta alone, before the zlib stream (the whole
      dataset) is inflated.
    * Only frame 0 is decoded, streamed from the open file (a 1000-frame file costs one frame).
    * Nothing here evaluates or unpickles anything. Elements other than the technical ones are never
      accessed, so pydicom never converts (or warns about) patient fields; pydicom's warnings (and
      its WARNING log records) are silenced for the process because they may quote element values.
    * Error reasons and `DicomImage.info` only quote values from fixed vocabularies (modality codes,
      SOP class / transfer syntax names from the DICOM dictionary, photometric terms, L/R); any
      other value is described, never echoed. Library exception messages are not forwarded (only
      their type), because they could quote file content.

Threads: reads are safe to run concurrently. pydicom's warnings are silenced by one filter installed at
import (and its WARNING log records by one logging filter), never by a per-call
`warnings.catch_warnings`, which swaps the process-wide filter list and is not thread-safe.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array

from retinagen.errors import DicomError
from retinagen.fileio import regular_file_stat

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FUNDUS_MODALITIES",
    "FUNDUS_SOP_CLASSES",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "DicomImage",
    "read_dicom",
]

logger = logging.getLogger(__name__)

#: Largest Rows x Columns accepted, checked from the header before decoding.
DEFAULT_MAX_PIXELS: int = 8192 * 8192

#: SOP Class UID -> name, for the image types a fundus camera (or a PACS export of one) writes.
FUNDUS_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}

#: Modality (0008,0060) values accepted. SC is not a DICOM defined term but real exports use it.
#: The modality is checked against this union, not per SOP class: a VL Photographic image saved
#: with OP, or an OP image saved as Secondary Capture with XC, is still a fundus photograph.
FUNDUS_MODALITIES: frozenset[str] = frozenset({"OP", "XC", "OT", "SC"})

# Transfer syntax -> pydicom decoding plugin ("" = natively encoded, no plugin). Forcing the plugin
# keeps behaviour identical whether or not optional GPL/extra decoders happen to be installed.
_DECODING_PLUGIN: dict[str, str] = {
    dcm_uid.ImplicitVRLittleEndian: "",
    dcm_uid.ExplicitVRLittleEndian: "",
    dcm_uid.ExplicitVRBigEndian: "",
    dcm_uid.RLELossless: "pydicom",
    dcm_uid.JPEGBaseline8Bit: "pillow",
    dcm_uid.JPEG2000Lossless: "pillow",
    dcm_uid.JPEG2000: "pillow",
}
SUPPORTED_TRANSFER_SYNTAXES: frozenset[str] = frozenset(_DECODING_PLUGIN)
_SUPPORTED_TS_TEXT = "uncompressed (little/big endian), RLE Lossless, JPEG Baseline, JPEG 2000"

# Which (non-dependency) package would decode a refused transfer syntax; named in the error.
_OTHER_DECODERS: dict[str, str] = {
    dcm_uid.JPEGExtended12Bit: "pylibjpeg-libjpeg or GDCM",
    dcm_uid.JPEGLossless: "pylibjpeg-libjpeg or GDCM",
    dcm_uid.JPEGLosslessSV1: "pylibjpeg-libjpeg or GDCM",
    dcm_uid.JPEGLSLossless: "pyjpegls, pylibjpeg-libjpeg or GDCM",
    dcm_uid.JPEGLSNearLossless: "pyjpegls, pylibjpeg-libjpeg or GDCM",
    dcm_uid.HTJ2KLossless: "pylibjpeg-openjpeg",
    dcm_uid.HTJ2KLosslessRPCL: "pylibjpeg-openjpeg",
    dcm_uid.HTJ2K: "pylibjpeg-openjpeg",
}

# DICOM modality defined terms (PS3.3 C.7.3.1.1.1), used to name a refused modality. A value not
# in this table is never echoed (a free-text field could hold anything, a name included).
_MODALITY_NAMES: dict[str, str] = {
    "AR": "Autorefraction",
    "ASMT": "Content Assessment Results",
    "AU": "Audio",
    "BDUS": "Bone Densitometry (ultrasound)",
    "BI": "Biomagnetic Imaging",
    "BMD": "Bone Densitometry (X-ray)",
    "CR": "Computed Radiography",
    "CT": "Computed Tomography",
    "CTPROTOCOL": "CT Protocol",
    "DG": "Diaphanography",
    "DOC": "Document",
    "DX": "Digital Radiography",
    "ECG": "Electrocardiography",
    "EPS": "Cardiac Electrophysiology",
    "ES": "Endoscopy",
    "FID": "Fiducials",
    "GM": "General Microscopy",
    "HC": "Hard Copy",
    "HD": "Hemodynamic Waveform",
    "IO": "Intra-oral Radiography",
    "IOL": "Intraocular Lens Data",
    "IVOCT": "Intravascular Optical Coherence Tomography",
    "IVUS": "Intravascular Ultrasound",
    "KER": "Keratometry",
    "KO": "Key Object Selection",
    "LEN": "Lensometry",
    "LS": "Laser Surface Scan",
    "MG": "Mammography",
    "MR": "Magnetic Resonance",
    "M3D": "Model for 3D Manufacturing",
    "NM": "Nuclear Medicine",
    "OAM": "Ophthalmic Axial Measurements",
    "OCT": "Optical Coherence Tomography (non-ophthalmic)",
    "OP": "Ophthalmic Photography",
    "OPM": "Ophthalmic Mapping",
    "OPT": "Ophthalmic Tomography",
    "OPTBSV": "Ophthalmic Tomography B-scan Volume Analysis",
    "OPTENF": "Ophthalmic Tomography En Face",
    "OPV": "Ophthalmic Visual Field",
    "OSS": "Optical Surface Scan",
    "OT": "Other",
    "PLAN": "Plan",
    "PR": "Presentation State",
    "PT": "Positron Emission Tomography",
    "PX": "Panoramic X-Ray",
    "REG": "Registration",
    "RESP": "Respiratory Waveform",
    "RF": "Radio Fluoroscopy",
    "RG": "Radiographic Imaging",
    "RTDOSE": "Radiotherapy Dose",
    "RTIMAGE": "Radiotherapy Image",
    "RTPLAN": "Radiotherapy Plan",
    "RTRECORD": "RT Treatment Record",
    "RTSTRUCT": "Radiotherapy Structure Set",
    "RWV": "Real World Value Map",
    "SC": "Secondary Capture",
    "SEG": "Segmentation",
    "SM": "Slide Microscopy",
    "SMR": "Stereometric Relationship",
    "SR": "SR Document",
    "SRF": "Subjective Refraction",
    "STAIN": "Automated Slide Stainer",
    "TG": "Thermography",
    "US": "Ultrasound",
    "VA": "Visual Acuity",
    "XA": "X-Ray Angiography",
    "XC": "External-camera Photography",
}

_RGB_LIKE = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422"})
# YBR_ICT/YBR_RCT only occur with JPEG 2000, where Pillow returns RGB directly.
_J2K_COLOUR = frozenset({"YBR_ICT", "YBR_RCT"})
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"})
_KNOWN_PHOTOMETRIC = (
    _RGB_LIKE | _J2K_COLOUR | _GREY | {"YBR_PARTIAL_420", "YBR_PARTIAL_422", "HSV", "ARGB", "CMYK"}
)

# Header values bigger than this stay on disk (read lazily, which this module never does): a huge
# private blob in the header costs nothing.
_DEFER_SIZE = "2 MB"

_PIXEL_DATA_TAG = 0x7FE00010
_FLOAT_PIXEL_TAGS = {0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data"}


@dataclass(frozen=True)
class DicomImage:
    """One decoded frame of a fundus DICOM file and its non-identifying technical facts.

    pixels:       [H, W, 3] RGB, uint8 (Bits Allocated 8) or uint16 (16), values in [0, max_value].
                  Grey images are replicated to 3 channels; MONOCHROME1 is inverted first, so
                  bright always means more light. Values are as stored (a 12-bit image stays in
                  [0, 4095]): divide by `max_value` to get [0, 1].
    modality:     Modality (0008,0060), "" when the file has none (allowed for Secondary Capture).
    sop_class_uid: SOP Class UID (a standard UID naming the image type, not an identifier).
    photometric:  Photometric Interpretation as stored in the file (before conversion to RGB).
    bits_stored:  Bits Stored (0028,0101) as stored.
    max_value:    largest value `pixels` can hold: 2**bits_stored - 1, or that of the palette LUT.
    frame:        index of the decoded frame (always 0).
    n_frames:     Number of Frames in the file (1 for single-frame images).
    info:         only technical, non-identifying fields: modality, sop_class (name), rows,
                  columns, bits_allocated, bits_stored, samples_per_pixel, photometric,
                  transfer_syntax (name), frames, and laterality ("L"/"R") when the file has it.
    """

    pixels: np.ndarray = field(repr=False)
    modality: str
    sop_class_uid: str
    photometric: str
    bits_stored: int
    max_value: int
    frame: int = 0
    n_frames: int = 1
    info: dict[str, str | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = self.pixels
        if p.ndim != 3 or p.shape[2] != 3 or p.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"pixels must be [H, W, 3] uint8/uint16, got {p.shape} {p.dtype}")

    def __repr__(self) -> str:
        h, w, _ = self.pixels.shape
        return (
            f"DicomImage(pixels=<{h}x{w}x3 {self.pixels.dtype}>, modality={self.modality!r}, "
            f"sop_class_uid={self.sop_class_uid!r}, photometric={self.photometric!r}, "
            f"bits_stored={self.bits_stored}, max_value={self.max_value}, frame={self.frame}, "
            f"n_frames={self.n_frames}, info={self.info!r})"
        )


class _DropWarningRecords(logging.Filter):
    """pydicom logs every warning it issues (`pydicom.misc.warn_and_log`); those texts can quote element values."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


_PYDICOM_WARNINGS = r"pydicom(\.|$)"


def silence_pydicom() -> None:
    """Silence pydicom's warnings and its WARNING log records for this process (idempotent).

    Its value-validation and parsing warnings can quote element values, patient data among them. One module
    filter, added at import and re-added by each reader if a `warnings.catch_warnings` block around the import
    (pytest's collection, say) dropped it; never a per-read `warnings.catch_warnings`, which swaps the
    process-wide filter list and is not thread-safe (the dashboard reads several sessions' uploads at once).
    pydicom attributes its warnings to its own modules (`warn_and_log` warns at its caller inside pydicom).
    """
    if not any(f[0] == "ignore" and f[3] is not None and f[3].pattern == _PYDICOM_WARNINGS for f in warnings.filters):
        warnings.filterwarnings("ignore", module=_PYDICOM_WARNINGS)
    log = logging.getLogger("pydicom")
    if not any(isinstance(f, _DropWarningRecords) for f in log.filters):
        log.addFilter(_DropWarningRecords())


silence_pydicom()


def read_dicom(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DicomImage:
    """Read frame 0 of a fundus DICOM file as RGB; refuse anything else with `DicomError`.

    Args:
        path: the file.
        max_pixels: largest Rows x Columns accepted (checked before decoding). Default 8192**2.

    Returns:
        `DicomImage` with `pixels` [H, W, 3] uint8/uint16 RGB.

    Raises:
        DicomError: for every problem with the file (missing, empty, not DICOM, truncated, malformed,
            wrong modality or SOP class, no pixel data, unsupported encoding/bit depth, too large).
            Its message names the file and says why, without quoting patient data. No other
            exception type escapes for a bad file.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    p = Path(path)
    regular_file_stat(p, DicomError)
    silence_pydicom()
    try:
        image = _read(p, max_pixels)
    except DicomError:
        raise
    except Exception as exc:
        # Any library-internal failure is a property of the file. `from None`: the original
        # message could quote file content, so it is not chained into tracebacks either.
        raise DicomError(p, f"could not be read as a DICOM image ({type(exc).__name__})") from None
    logger.debug("read DICOM %s: %s", p.name, image.info)
    return image


def _read(p: Path, max_pixels: int) -> DicomImage:
    ts = _check_file_meta(p)
    with p.open("rb") as f:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=False, defer_size=_DEFER_SIZE)
        except InvalidDicomError:
            raise DicomError(p, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
        except Exception as exc:
            raise DicomError(p, f"malformed DICOM header ({type(exc).__name__})") from None
        # dcmread(stop_before_pixels=True) leaves the file at the pixel data element (pydicom's own
        # frame reader relies on the same), or at the end when there is none.
        pixel_pos = f.tell()
        pixel_tag = _peek_tag(f, little_endian=ts != dcm_uid.ExplicitVRBigEndian)

        modality = _check_modality(p, ds)
        sop_class = _check_sop_class(p, ds)
        _check_transfer_syntax(p, ts)

        if pixel_tag in _FLOAT_PIXEL_TAGS:
            raise DicomError(
                p, f"holds {_FLOAT_PIXEL_TAGS[pixel_tag]}, not a photograph's integer Pixel Data"
            )
        if pixel_tag != _PIXEL_DATA_TAG:
            raise DicomError(p, "has no Pixel Data (7FE0,0010): nothing to read as an image")

        geom = _check_pixel_module(p, ds, max_pixels)
        if not dcm_uid.UID(ts).is_encapsulated:
            _check_native_length(p, ts, os.fstat(f.fileno()).st_size, pixel_pos, geom)
        elif _DECODING_PLUGIN[ts] == "pillow":
            _check_compressed_frame_size(p, f, ds, pixel_pos, geom)

        try:
            arr = pixel_array(f, index=0, decoding_plugin=_DECODING_PLUGIN[ts])
        except Exception as exc:
            raise _undecodable(p, exc) from None

    rgb, max_value = _to_rgb(p, arr, ds, geom)
    info: dict[str, str | int] = {
        "modality": modality,
        "sop_class": FUNDUS_SOP_CLASSES[sop_class],
        "rows": geom.rows,
        "columns": geom.columns,
        "bits_allocated": geom.bits_allocated,
        "bits_stored": geom.bits_stored,
        "samples_per_pixel": geom.samples_per_pixel,
        "photometric": geom.photometric,
        "transfer_syntax": dcm_uid.UID(ts).name,
        "frames": geom.n_frames,
    }
    laterality = _laterality(ds)
    if laterality:
        info["laterality"] = laterality
    return DicomImage(
        pixels=rgb,
        modality=modality,
        sop_class_uid=sop_class,
        photometric=geom.photometric,
        bits_stored=geom.bits_stored,
        max_value=max_value,
        frame=0,
        n_frames=geom.n_frames,
        info=info,
    )


_BOMB_REASON = "compressed frame claims more pixels than Rows x Columns (decompression bomb)"


def _undecodable(p: Path, exc: BaseException) -> DicomError:
    # Pillow's own bomb check (at its process-wide MAX_IMAGE_PIXELS) may still fire first: say so.
    # pydicom wraps plugin failures in a RuntimeError whose text lists them.
    if isinstance(exc, Image.DecompressionBombWarning | Image.DecompressionBombError) or (
        "decompression bomb" in str(exc).lower()
    ):
        return DicomError(p, _BOMB_REASON)
    return DicomError(
        p, f"pixel data could not be decoded; the file may be truncated or corrupt ({type(exc).__name__})"
    )


def _check_compressed_frame_size(p: Path, f: BinaryIO, ds: Dataset, pixel_pos: int, geom: _Geometry) -> None:
    """Refuse frame 0 of JPEG / JPEG 2000 pixel data when its own header is bigger than Columns x Rows.

    Pillow sizes its output buffer from the frame's header, not from the DICOM header, so a 16 x 16
    image whose JPEG SOF says 12000 x 12000 would allocate 432 MB. ``Image.open`` parses the header
    only; the numbers are compared here, with no process-wide setting involved.
    """
    # Encapsulated pixel data is always explicit VR little endian: tag, VR, 2 reserved bytes and an
    # undefined length (0xFFFFFFFF), then the Basic Offset Table item.
    f.seek(pixel_pos)
    head = f.read(12)
    if len(head) < 12 or struct.unpack("<L", head[8:12])[0] != 0xFFFFFFFF:
        raise DicomError(p, "pixel data could not be decoded; its encapsulation is malformed")
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        frame = get_frame(f, 0, number_of_frames=geom.n_frames, extended_offsets=offsets)
        with Image.open(io.BytesIO(frame), formats=("JPEG", "JPEG2000")) as im:
            width, height = im.size
    except Exception as exc:
        raise _undecodable(p, exc) from None
    finally:
        f.seek(pixel_pos)
    if width > geom.columns or height > geom.rows:
        raise DicomError(p, _BOMB_REASON)


def _check_file_meta(p: Path) -> str:
    """Read only the preamble and file meta group; return the transfer syntax UID."""
    try:
        meta: FileMetaDataset = read_file_meta_info(p)
    except InvalidDicomError:
        raise DicomError(p, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except Exception as exc:
        raise DicomError(p, f"malformed DICOM file meta information ({type(exc).__name__})") from None
    ts = str(meta.get("TransferSyntaxUID", "") or "").strip()
    if not ts:
        raise DicomError(p, "file meta information has no Transfer Syntax UID (0002,0010)")
    if ts == dcm_uid.DeflatedExplicitVRLittleEndian:
        # pydicom would inflate the whole dataset before any header check could run.
        raise DicomError(
            p,
            "transfer syntax 'Deflated Explicit VR Little Endian' is not supported: the whole dataset is "
            f"zlib-compressed and cannot be checked before inflating; supported: {_SUPPORTED_TS_TEXT}",
        )
    return ts


def _peek_tag(f: BinaryIO, *, little_endian: bool) -> int | None:
    pos = f.tell()
    raw = f.read(4)
    f.seek(pos)
    if len(raw) < 4:
        return None
    group, elem = struct.unpack("<HH" if little_endian else ">HH", raw)
    return (group << 16) | elem


def element_text(ds: Dataset, keyword: str) -> str:
    """A short CS/UI value as a stripped, case-preserving string ('' when absent/empty; a multi-valued
    element gives its first value). Use it only on technical elements: it converts the value."""
    value = ds.get(keyword, None)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else ""
    return str(value).strip()


def _check_modality(p: Path, ds: Dataset) -> str:
    modality = element_text(ds, "Modality").upper()
    if modality == "" or modality in FUNDUS_MODALITIES:
        return modality
    if modality in _MODALITY_NAMES:
        what = f"modality {modality} ({_MODALITY_NAMES[modality]})"
    else:
        what = "an unrecognised modality code"
    raise DicomError(p, f"{what} is not a fundus photograph; supported: OP, XC, SC/OT secondary capture")


def _check_sop_class(p: Path, ds: Dataset) -> str:
    sop = element_text(ds, "SOPClassUID")
    if not sop:
        sop = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "").strip()
    if not sop:
        raise DicomError(p, "has no SOP Class UID (0008,0016): cannot tell what kind of image it is")
    if sop in FUNDUS_SOP_CLASSES:
        return sop
    # Only standard UIDs (in pydicom's dictionary) are named: an unknown UID is never echoed.
    known = dcm_uid.UID(sop).name if sop in dcm_uid.UID_dictionary else None
    what = f"SOP class '{known}'" if known else "an unrecognised SOP Class UID"
    raise DicomError(
        p,
        f"{what} is not a fundus photograph type; supported: Ophthalmic Photography 8/16 Bit, "
        "VL Photographic, Secondary Capture",
    )


def _check_transfer_syntax(p: Path, ts: str) -> None:
    if ts in _DECODING_PLUGIN:
        plugin = _DECODING_PLUGIN[ts]
        if plugin and plugin not in get_decoder(ts).available_plugins:
            need = (
                "Pillow built with libjpeg"
                if ts == dcm_uid.JPEGBaseline8Bit
                else "Pillow built with OpenJPEG"
            )
            raise DicomError(
                p, f"transfer syntax '{dcm_uid.UID(ts).name}' needs {need}, which is not available here"
            )
        return
    name = dcm_uid.UID(ts).name if ts in dcm_uid.UID_dictionary else None
    what = f"transfer syntax '{name}'" if name else "an unrecognised transfer syntax"
    if ts in _OTHER_DECODERS:
        how = f"decoding it needs {_OTHER_DECODERS[ts]}, which retinagen does not depend on"
    else:
        how = "retinagen has no decoder for it"
    raise DicomError(p, f"{what} is not supported: {how}; supported: {_SUPPORTED_TS_TEXT}")


@dataclass(frozen=True)
class _Geometry:
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    photometric: str
    n_frames: int
    planar: int


def _int(p: Path, ds: Dataset, keyword: str, tag: str, default: int | None = None) -> int:
    value = ds.get(keyword, None)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None or value == "":
        if default is not None:
            return default
        raise DicomError(p, f"{keyword} {tag} is missing")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DicomError(p, f"{keyword} {tag} is not an integer") from None
    return number


def _check_pixel_module(p: Path, ds: Dataset, max_pixels: int) -> _Geometry:
    rows = _int(p, ds, "Rows", "(0028,0010)")
    columns = _int(p, ds, "Columns", "(0028,0011)")
    if rows < 1 or columns < 1:
        raise DicomError(p, f"image size {rows}x{columns} is empty")
    if rows * columns > max_pixels:
        raise DicomError(
            p,
            f"image of {rows}x{columns} = {rows * columns} pixels is larger than the limit of {max_pixels} "
            "(decompression-bomb defence; pass a larger max_pixels if the image is genuine)",
        )
    spp = _int(p, ds, "SamplesPerPixel", "(0028,0002)")
    bits_allocated = _int(p, ds, "BitsAllocated", "(0028,0100)")
    bits_stored = _int(p, ds, "BitsStored", "(0028,0101)", default=bits_allocated)
    signed = _int(p, ds, "PixelRepresentation", "(0028,0103)", default=0)
    planar = _int(p, ds, "PlanarConfiguration", "(0028,0006)", default=0)
    n_frames = _int(p, ds, "NumberOfFrames", "(0028,0008)", default=1)
    n_frames = max(n_frames, 1)  # 0 is non-conformant but common; pydicom treats it as 1 too

    photometric = element_text(ds, "PhotometricInterpretation").upper()
    if not photometric:
        raise DicomError(p, "Photometric Interpretation (0028,0004) is missing")
    if photometric not in _KNOWN_PHOTOMETRIC:
        raise DicomError(p, "has an unrecognised Photometric Interpretation")

    if bits_allocated not in (8, 16):
        raise DicomError(p, f"unsupported bit depth: Bits Allocated {bits_allocated} (supported: 8 or 16)")
    if not 1 <= bits_stored <= bits_allocated:
        raise DicomError(p, f"Bits Stored {bits_stored} does not fit Bits Allocated {bits_allocated}")
    if signed != 0:
        raise DicomError(p, "signed pixel data (Pixel Representation 1) is not a photograph's; unsupported")
    if spp not in (1, 3):
        raise DicomError(p, f"unsupported Samples per Pixel {spp} (supported: 1 grey/palette or 3 colour)")
    if spp == 3 and photometric not in _RGB_LIKE | _J2K_COLOUR:
        raise DicomError(p, f"Photometric Interpretation {photometric} is not supported for colour images")
    if spp == 1 and photometric not in _GREY:
        raise DicomError(p, f"Photometric Interpretation {photometric} is not supported for 1-sample images")
    if photometric.startswith("YBR") and bits_allocated != 8:
        raise DicomError(p, f"{photometric} with {bits_allocated}-bit samples is not supported (8-bit only)")
    return _Geometry(rows, columns, spp, bits_allocated, bits_stored, photometric, n_frames, planar)


def _check_native_length(p: Path, ts: str, file_size: int, pixel_pos: int, geom: _Geometry) -> None:
    """For uncompressed data, say 'truncated' plainly when frame 0's bytes are not in the file."""
    explicit = ts != dcm_uid.ImplicitVRLittleEndian
    header = 12 if explicit else 8  # OB/OW: tag 4 + VR 2 + reserved 2 + length 4; implicit: 4 + 4
    samples = geom.rows * geom.columns * geom.samples_per_pixel
    if geom.photometric == "YBR_FULL_422":
        samples = samples * 2 // 3  # stored 4:2:2-subsampled (Y Y Cb Cr per pixel pair)
    frame_bytes = math.ceil(samples * geom.bits_allocated / 8)
    remaining = file_size - pixel_pos - header
    if remaining < frame_bytes:
        raise DicomError(
            p,
            f"file is truncated: frame 0 needs {frame_bytes} bytes of pixel data but only "
            f"{max(remaining, 0)} remain",
        )


def _to_rgb(p: Path, arr: np.ndarray, ds: Dataset, geom: _Geometry) -> tuple[np.ndarray, int]:
    """Decoded frame -> ([H, W, 3] uint8/uint16 RGB, max value). pydicom already made YBR into RGB."""
    expected = (geom.rows, geom.columns) if geom.samples_per_pixel == 1 else (geom.rows, geom.columns, 3)
    if arr.shape != expected:
        raise DicomError(p, f"decoded frame has shape {arr.shape}, header says {expected}")
    max_value = (1 << geom.bits_stored) - 1
    dtype = np.uint8 if geom.bits_allocated == 8 else np.uint16

    if geom.photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)[..., :3]  # drop an alpha LUT if present
            lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as exc:
            raise DicomError(p, f"palette colour lookup table is invalid ({type(exc).__name__})") from None
        if lut_bits not in (8, 16):
            raise DicomError(p, f"palette LUT entries of {lut_bits} bits are not supported")
        dtype = np.uint8 if lut_bits == 8 else np.uint16
        max_value = (1 << lut_bits) - 1
        return np.ascontiguousarray(rgb, dtype=dtype), max_value

    # Stored values above 2**bits_stored - 1 should not exist (pydicom masks unused high bits for
    # native data); clip anyway so `max_value` is a true bound for compressed data too.
    arr = np.minimum(arr, max_value).astype(dtype, copy=False)
    if geom.samples_per_pixel == 3:
        return np.ascontiguousarray(arr), max_value
    if geom.photometric == "MONOCHROME1":
        arr = (max_value - arr).astype(dtype)  # MONOCHROME1: 0 is white
    return np.repeat(arr[:, :, None], 3, axis=2), max_value


def _laterality(ds: Dataset) -> str:
    """'L' or 'R' from Image Laterality (0020,0062), else Laterality (0020,0060); '' otherwise."""
    for keyword in ("ImageLaterality", "Laterality"):
        try:
            value = element_text(ds, keyword).upper()
        except Exception:
            continue
        if value in ("L", "R"):
            return value
    return ""
