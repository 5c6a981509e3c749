"""Write fundus images as DICOM: synthetic images, and de-identified images derived from real DICOM.

Three entry points:

* `write_synthetic_dicom(rgb, path, model_name=..., checkpoint_sha256=..., seed=..., grade=..., codes=...)`
  writes a generated image as a **Secondary Capture** object marked synthetic.
* `deidentify(ds)` returns a copy of a real dataset de-identified with the DICOM PS3.15 Annex E
  **Basic Application Level Confidentiality Profile** (table `BASIC_PROFILE`).
* `export_derived_dicom(source, rgb, out_path, derivation_description=...)` writes an image computed
  from a real DICOM file (e.g. the preprocessed fundus) as a de-identified Secondary Capture that
  keeps the (de-identified, consistently re-UIDed) patient/study context of its source.

Every file is written with Explicit VR Little Endian, a conformant file meta group (128-byte
preamble, ``DICM``), 8-bit RGB pixels, and atomically (`retinagen.fileio`): a reader never sees a
half-written file and a failed write leaves nothing behind. Files round-trip through
`retinagen.data.dicom.read_dicom` to the same pixels.

Why Secondary Capture and not Ophthalmic Photography 8 Bit
    The OP 8 Bit IOD requires acquisition facts (Type 1/2 Ophthalmic Photographic Parameters:
    acquisition device type, illumination, light path filters, detector type, pupil dilation,
    horizontal field of view, ...). A generated or post-processed image has none of these, so an
    OP object would have to invent them. Secondary Capture is the IOD for images made by software:
    its SC Equipment module records *Conversion Type* ``SYN`` (synthetic image) or ``WSD``
    (workstation), and `read_dicom` accepts it like OP. Modality is ``OT`` for synthetic images
    (no ophthalmic camera was involved) and the source's modality for derived ones.

What is never written
    No real patient data in synthetic files: Patient's Name and Patient ID are the fixed value
    ``SYNTHETIC`` (not empty, so a PACS neither rejects the files nor merges them with a real
    "unknown" patient, and anyone browsing by patient sees at once what they are); birth date and
    sex are empty. The only dates are the creation date/time of the file itself.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as dcm_uid
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from clinical.ps315_basic_profile import ACTIONS, BASIC_PROFILE  # the profile table, as data
from retinagen import __version__
from retinagen.checks import Count, Seed, check, int_in
from retinagen.data.dicom import element_text, silence_pydicom
from retinagen.errors import BadInputError, DicomError
from retinagen.fileio import atomic_write_with

__all__ = [
    "BASIC_PROFILE",
    "DEIDENTIFICATION_CODE",
    "DUMMY_VALUES",
    "SYNTHETIC_PATIENT",
    "WrittenDicom",
    "deidentify",
    "export_derived_dicom",
    "write_synthetic_dicom",
]

#: Patient's Name and Patient ID of every synthetic image (see the module docstring for why).
SYNTHETIC_PATIENT = "SYNTHETIC"

#: (Code Value, Coding Scheme Designator, Code Meaning) recorded in Deidentification Method Code
#: Sequence (0012,0064). Only the Basic Profile itself: no profile option (Clean Pixel Data, Retain
#: Longitudinal ..., Retain Safe Private, ...) is implemented, so none is claimed.
DEIDENTIFICATION_CODE: tuple[str, str, str] = ("113100", "DCM", "Basic Application Confidentiality Profile")

# In the file meta group the only identifying elements are the instance UID (U) and the AE titles
# of whoever sent or stored the file; the meta group is rebuilt rather than cleaned.
_META_KEEP = ("MediaStorageSOPClassUID", "TransferSyntaxUID")

# Dummy values for action D, by VR: plainly not real, valid for the VR's length/charset rules.
_DUMMY_TEXT = "DEIDENTIFIED"
#: Dummy value written for action D, by VR (numeric VRs get 0, others are emptied).
DUMMY_VALUES: dict[str, Any] = {
    "AE": _DUMMY_TEXT, "AS": "000Y", "CS": _DUMMY_TEXT, "DA": "19000101", "DT": "19000101000000",
    "DS": "0", "IS": "0", "LO": _DUMMY_TEXT, "LT": _DUMMY_TEXT, "PN": _DUMMY_TEXT, "SH": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT, "TM": "000000", "UC": _DUMMY_TEXT, "UT": _DUMMY_TEXT,
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0,
}  # fmt: skip
# Outside the table, values of these VRs are emptied anyway: every person name, date and time is
# identifying or a re-identification key, whichever attribute holds it (stricter than the profile).
_ALWAYS_EMPTY_VRS = frozenset({"PN", "DA", "DT", "TM", "AS"})
# Free-text VRs: inside a sequence whose action is D they get the dummy value.
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT", "UR", "AE"})
# UI values that name a standard thing (a class, a syntax, a coding scheme), not an instance; kept.
_KEPT_UID_KEYWORDS = frozenset(
    {"TransferSyntaxUID", "ReferencedTransferSyntaxUIDInFile", "CodingSchemeUID", "ContextUID",
     "MappingResourceUID", "ImplementationClassUID"}
)  # fmt: skip

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LATERALITY = frozenset({"L", "R"})
# Bounds from the DICOM VRs the values are written into (PS3.5 Table 6.2-1).
_MAX_LO = 64
_MAX_ST = 1024
_MAX_LT = 10240


@dataclass(frozen=True)
class WrittenDicom:
    """What `write_synthetic_dicom` / `export_derived_dicom` wrote: the file and its new UIDs."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


# --- synthetic images ----------------------------------------------------------------------------


def write_synthetic_dicom(
    rgb_uint8: np.ndarray,
    path: str | Path,
    *,
    model_name: str,
    checkpoint_sha256: str,
    seed: int,
    grade: int | None,
    codes: Mapping[str, float],
    laterality: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    created: datetime | None = None,
    overwrite: bool = False,
) -> WrittenDicom:
    """Write one generated fundus image as a Secondary Capture DICOM file marked synthetic.

    Args:
        rgb_uint8: [H, W, 3] uint8 RGB in [0, 255], 1 <= H, W <= 65535 (the generator's output).
        path: output file; its folder is created. An existing file is an error unless `overwrite`.
        model_name: the generator's name (e.g. "InfoStyleGAN MSI(1,1,0)"), <= 64 printable chars.
        checkpoint_sha256: sha256 of the checkpoint tensors, 64 lowercase hex digits.
        seed: the image seed (>= 0) that reproduces the latent sample.
        grade: the DR grade (0..4) the image was conditioned on, or None for an unconditional model.
        codes: latent code name -> value (finite numbers) used for the image, e.g. {"c0": 2, "c5": 0.8}.
        laterality: "L"/"R" written as Image Laterality (0020,0062) when the model controls it.
        study_instance_uid, series_instance_uid: pass the same values (e.g. `generate_uid(None)`)
            to group a batch into one study/series; fresh UIDs are generated when None.
        instance_number: Instance Number (0020,0013), >= 1.
        created: creation time written as Content/Instance Creation/Study/Series date and time (the
            only dates in the file); default now (UTC).
        overwrite: replace an existing file.

    Returns:
        `WrittenDicom` with the path and the UIDs written.

    The file holds: SOP class Secondary Capture Image Storage, Conversion Type SYN, Modality OT,
    Synthetic Data (0008,001C) YES, Image Type DERIVED\\SECONDARY, Burned In Annotation NO,
    Recognizable Visual Features NO, Derivation Description naming model, checkpoint hash, seed and
    grade, Image Comments with the full provenance as JSON (codes included), Patient's Name and
    Patient ID "SYNTHETIC", no other patient attribute values, fresh 2.25 (UUID-derived) UIDs.
    The pixels are not reproducible from the file's bytes alone (UIDs and dates differ per write)
    but are exactly `rgb_uint8`.

    Raises:
        ValueError: bad array (shape, dtype, size) or provenance argument.
        BadInputError: the file cannot be written (folder not creatable/writable, target exists or is
            a folder); nothing is left at `path` or beside it.
    """
    arr = _check_rgb(rgb_uint8)
    _check_text("model_name", model_name, _MAX_LO)
    if not isinstance(checkpoint_sha256, str) or not _SHA256.match(checkpoint_sha256):
        raise ValueError("checkpoint_sha256 must be 64 lowercase hex digits (a sha256 hexdigest)")
    seed = check(Seed, seed, "seed")
    if grade is not None:
        grade = check(int_in(0, 4), grade, "grade (a DR grade, or None)")
    clean_codes = _check_codes(codes)
    if laterality is not None and laterality not in _LATERALITY:
        raise ValueError(f"laterality must be 'L', 'R' or None, got {laterality!r}")
    instance_number = check(Count, instance_number, "instance_number")
    study_uid = _check_or_new_uid("study_instance_uid", study_instance_uid)
    series_uid = _check_or_new_uid("series_instance_uid", series_instance_uid)
    when = _creation_time(created)

    grade_text = "none (unconditional)" if grade is None else str(int(grade))
    derivation = (
        f"Synthetic fundus image generated by retinagen {__version__}, model {model_name}, "
        f"checkpoint sha256 {checkpoint_sha256}, seed {int(seed)}, DR grade {grade_text}; "
        "latent codes in Image Comments (JSON)"
    )
    provenance = {
        "generator": "retinagen",
        "version": __version__,
        "model": model_name,
        "checkpoint_sha256": checkpoint_sha256,
        "seed": int(seed),
        "grade": None if grade is None else int(grade),
        "codes": clean_codes,
        "synthetic": True,
    }
    comments = json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    if len(comments) > _MAX_LT:
        raise ValueError(
            f"provenance JSON is {len(comments)} characters, more than Image Comments holds ({_MAX_LT})"
        )

    sop_uid = _new_uid()
    ds = _secondary_capture(sop_uid, study_uid, series_uid, when)
    ds.PatientName = SYNTHETIC_PATIENT
    ds.PatientID = SYNTHETIC_PATIENT
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _da(when)
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _tm(when)
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "retinagen synthetic fundus images"
    ds.SeriesDescription = f"synthetic, DR grade {grade_text}"[:_MAX_LO]
    ds.Modality = "OT"
    ds.ConversionType = "SYN"  # SC Equipment: "Synthetic Image"
    ds.SyntheticData = "YES"
    ds.RecognizableVisualFeatures = "NO"  # no patient behind the image to recognise
    ds.DerivationDescription = derivation
    ds.ImageComments = comments
    ds.InstanceNumber = instance_number
    if laterality is not None:
        ds.ImageLaterality = laterality
    _set_rgb_pixels(ds, arr)
    _write(ds, Path(path), overwrite)
    return WrittenDicom(Path(path), sop_uid, series_uid, study_uid)


# --- de-identification ---------------------------------------------------------------------------


def deidentify(ds: Dataset, *, uid_map: MutableMapping[str, str] | None = None) -> Dataset:
    """Return a de-identified copy of `ds` (PS3.15 Annex E Basic Profile); `ds` is not changed.

    What is done, recursively into every sequence item:

    * every attribute of `BASIC_PROFILE` is removed (X), emptied (Z), given a dummy value (D:
      `DUMMY_VALUES` by VR, e.g. ``DEIDENTIFIED``, ``19000101``) or has its UID replaced (U). Where
      the standard allows several actions ("X/Z/D": whichever the IOD needs) the one that keeps the
      most IODs valid is used: U, else D, else Z, else X (so Patient ID, Z/D, becomes
      ``DEIDENTIFIED``). A sequence with action D (e.g. Content Sequence) keeps its items, but every
      text value in them, free text and code values alike, gets the dummy value;
    * all private attributes (odd groups, creators included), curves (50xx), overlays (60xx),
      group lengths, command/meta elements misplaced in the body, and public attributes of VR UN
      (not in the data dictionary, so not classifiable) are removed;
    * stricter than the profile: every other person name, age, date, time and date-time is emptied,
      every other UID that is not a well-known standard UID (SOP classes, transfer syntaxes, coding
      schemes) is replaced, and birth/death dates in alternative calendars are removed;
    * UIDs are replaced by new 2.25 (UUID-derived) UIDs through `uid_map`: the same input UID always
      gets the same new UID, so references inside a file and, when the caller passes one dict for
      several files, across files (one study's images stay one study) still match. The map links old
      to new UIDs: keep it secret or discard it;
    * Patient Identity Removed (0012,0062) = YES, De-identification Method (0012,0063) and
      De-identification Method Code Sequence (0012,0064) with 113100 (Basic Application
      Confidentiality Profile, DCM) are added (existing entries are kept: an earlier tool's options
      stay recorded), Longitudinal Temporal Information Modified (0028,0303) = REMOVED;
    * the file meta group keeps Media Storage SOP Class UID and Transfer Syntax UID, gets the new
      Media Storage SOP Instance UID, and drops everything else (source AE titles, private info).

    Pixel data are copied unchanged, so a dataset whose Burned In Annotation (0028,0301) is YES is
    refused: the profile then requires the Clean Pixel Data option, which is not implemented. A
    DICOMDIR is refused too (its Referenced File IDs are folder names, often patient IDs). The
    returned object is a plain `Dataset` (no file name of the original attached); with a file meta
    group holding a Transfer Syntax UID, `save_as(..., enforce_file_format=True)` writes it.

    Args:
        ds: a dataset as read by `pydicom.dcmread` (any modality, any transfer syntax).
        uid_map: old UID -> new UID, filled in as UIDs are met; default a fresh dict for this call.

    Raises:
        DicomError: Burned In Annotation is YES, or `ds` is a DICOMDIR. Messages never quote values.
    """
    if uid_map is None:
        uid_map = {}
    silence_pydicom()  # value warnings quote element values (patient data among them)
    meta = getattr(ds, "file_meta", None)
    sop_classes = {_raw_text(ds, 0x00080016), _raw_text(meta, 0x00020002) if meta is not None else ""}
    if dcm_uid.MediaStorageDirectoryStorage in sop_classes:
        raise DicomError(
            None,
            "a DICOMDIR (Media Storage Directory) is a file-set index whose file paths may be patient "
            "IDs; de-identify the files it lists and build a new DICOMDIR instead",
        )
    burned = _raw_text(ds, 0x00280301).upper()
    if burned == "YES":
        raise DicomError(
            None,
            "Burned In Annotation (0028,0301) is YES: the pixels may show patient identity; the Basic "
            "Profile then needs the Clean Pixel Data option, which retinagen does not implement",
        )
    work = copy.deepcopy(ds)
    # Cleaned while still a FileDataset, so values deferred by dcmread(defer_size=...) can be
    # read from the source file; the kept ones are read in before the file name is dropped.
    _clean_dataset(work, uid_map, strict=False)
    _load_deferred(work)
    # Dataset(other) shares `other`'s element dict: a plain Dataset over the private copy, which
    # drops FileDataset's file name, timestamp and preamble (a path can name the patient).
    out = Dataset(work)
    _add_deidentification_record(out)
    if meta is not None:
        out.file_meta = _clean_file_meta(meta, out, uid_map)
    return out


def export_derived_dicom(
    source_dicom_path: str | Path,
    rgb_uint8: np.ndarray,
    out_path: str | Path,
    *,
    derivation_description: str,
    uid_map: MutableMapping[str, str] | None = None,
    created: datetime | None = None,
    overwrite: bool = False,
) -> WrittenDicom:
    """Write an image computed from a real DICOM file (e.g. its preprocessed fundus) de-identified.

    The source's header (never its pixels) is read and passed through `deidentify` with `uid_map`;
    the output is a new Secondary Capture instance (Conversion Type WSD, Image Type
    DERIVED\\SECONDARY, Synthetic Data NO) in a new series of the source's de-identified study. It
    keeps from the source only: the Patient module as emptied by the profile, the re-mapped Study
    Instance UID, the emptied study identifiers and dates, Modality, laterality and body part; the
    Source Image Sequence references the source's SOP class and its *re-mapped* SOP Instance UID, so
    with one shared `uid_map` the derived image points at the de-identified copy of its source.

    The caller vouches that `rgb_uint8` shows no burned-in text (Burned In Annotation NO is written;
    retinagen's fundus preprocessing keeps only the circular field of view, where cameras do not
    print text). A source marked Burned In Annotation YES is refused. Recognizable Visual Features
    is written YES: a retina's vessel pattern is a biometric, which the Basic Profile does not clean.

    Args:
        source_dicom_path: the real DICOM file the image was computed from.
        rgb_uint8: [H, W, 3] uint8 RGB in [0, 255].
        out_path: output file (folder created; existing file an error unless `overwrite`).
        derivation_description: what was done to the source, e.g. "crop to field of view, resize
            512", <= 1024 characters (stored verbatim: put no patient data in it).
        uid_map: old -> new UID map shared with `deidentify` calls for the same study (see there).
        created: creation time for Content/Instance Creation date and time; default now (UTC).
        overwrite: replace an existing file.

    Raises:
        ValueError: bad array or description.
        DicomError: the source cannot be read as DICOM, or is marked Burned In Annotation YES.
        BadInputError: the output cannot be written (nothing is left behind).
    """
    arr = _check_rgb(rgb_uint8)
    _check_text("derivation_description", derivation_description, _MAX_ST)
    if uid_map is None:
        uid_map = {}
    when = _creation_time(created)
    source = _read_header(Path(source_dicom_path))
    clean = deidentify(source, uid_map=uid_map)

    study_uid = str(clean.get("StudyInstanceUID", "") or "") or _new_uid()
    series_uid = _new_uid()
    sop_uid = _new_uid()
    ds = _secondary_capture(sop_uid, study_uid, series_uid, when)
    # Type 2 patient/study attributes: present, with whatever the profile left (empty).
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    ):  # fmt: skip
        setattr(ds, keyword, element_text(clean, keyword))
    ds.ContentDate = _da(when)
    ds.ContentTime = _tm(when)
    modality = element_text(clean, "Modality").upper()
    ds.Modality = modality if modality else "OT"
    for keyword in ("ImageLaterality", "Laterality", "BodyPartExamined"):
        value = element_text(clean, keyword)
        if value:
            setattr(ds, keyword, value)
    for keyword in (
        "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    ):  # fmt: skip
        if keyword in clean:
            ds[keyword] = copy.deepcopy(clean[keyword])
    source_class = str(clean.get("SOPClassUID", "") or "")
    source_instance = str(clean.get("SOPInstanceUID", "") or "")
    if source_class and source_instance:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source_class
        ref.ReferencedSOPInstanceUID = source_instance
        ds.SourceImageSequence = Sequence([ref])
    ds.ConversionType = "WSD"  # SC Equipment: "Workstation" (computed from an existing image)
    ds.SyntheticData = "NO"
    ds.RecognizableVisualFeatures = "YES"
    ds.DerivationDescription = derivation_description
    ds.SeriesDescription = "retinagen derived image"
    ds.InstanceNumber = 1
    _set_rgb_pixels(ds, arr)
    _write(ds, Path(out_path), overwrite)
    return WrittenDicom(Path(out_path), sop_uid, series_uid, study_uid)


# --- helpers: argument checks --------------------------------------------------------------------


def _check_rgb(rgb: Any) -> np.ndarray:
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"image must be a numpy array [H, W, 3] uint8, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {tuple(rgb.shape)}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"image must be uint8 in [0, 255], got dtype {rgb.dtype}")
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    if not (1 <= h <= 65535 and 1 <= w <= 65535):  # Rows/Columns are US
        raise ValueError(f"image size {h}x{w} is outside DICOM's 1..65535 rows/columns")
    return np.ascontiguousarray(rgb)


def _check_text(name: str, value: Any, max_len: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > max_len:
        raise ValueError(f"{name} is {len(value)} characters, the DICOM field holds at most {max_len}")
    if any(ch in value for ch in "\\\r\n\t\x00"):
        # A backslash is DICOM's value separator; control characters are not allowed in LO/ST.
        raise ValueError(f"{name} must not contain backslashes or control characters")


def _check_codes(codes: Any) -> dict[str, float | int]:
    if not isinstance(codes, Mapping):
        raise ValueError(f"codes must be a mapping name -> number, got {type(codes).__name__}")
    clean: dict[str, float | int] = {}
    for key, value in codes.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"code names must be non-empty strings, got {key!r}")
        if isinstance(value, bool | np.bool_):
            clean[key] = int(value)
            continue
        if isinstance(value, int | np.integer):
            clean[key] = int(value)
            continue
        if isinstance(value, float | np.floating) and math.isfinite(float(value)):
            clean[key] = float(value)
            continue
        raise ValueError(f"code {key!r} must be a finite number, got {value!r}")
    return clean


def _check_or_new_uid(name: str, value: str | None) -> str:
    if value is None:
        return _new_uid()
    if not isinstance(value, str) or not dcm_uid.UID(value).is_valid:
        raise ValueError(f"{name} must be a valid DICOM UID (digits and dots, <= 64 chars)")
    return value


def _creation_time(created: datetime | None) -> datetime:
    if created is None:
        return datetime.now(timezone.utc)
    if not isinstance(created, datetime):
        raise ValueError(f"created must be a datetime, got {type(created).__name__}")
    return created


def _new_uid() -> str:
    # prefix=None: "2.25." + the integer of a random UUID (ISO/IEC 9834-8); needs no org root.
    return str(dcm_uid.generate_uid(prefix=None))


def _da(when: datetime) -> str:
    return when.strftime("%Y%m%d")


def _tm(when: datetime) -> str:
    return when.strftime("%H%M%S")


# --- helpers: building and writing ---------------------------------------------------------------


def _secondary_capture(sop_uid: str, study_uid: str, series_uid: str, when: datetime) -> Dataset:
    """The modules every output shares: SOP Common, General Series/Image, General/SC Equipment."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dcm_uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = dcm_uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: model names and descriptions are free text
    ds.SOPClassUID = dcm_uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceCreationDate = _da(when)
    ds.InstanceCreationTime = _tm(when)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesNumber = 1
    ds.PatientOrientation = ""
    ds.Manufacturer = "retinagen"
    ds.SoftwareVersions = __version__
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"  # pixels stored uncompressed, as given
    return ds


def _set_rgb_pixels(ds: Dataset, arr: np.ndarray) -> None:
    # Rows, Columns, Samples per Pixel 3, Planar Configuration 0, Bits 8/8/7, unsigned.
    ds.set_pixel_data(arr, "RGB", 8, generate_instance_uid=False)


def _write(ds: Dataset, path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise BadInputError(path, "output path is an existing folder, not a file")
    if path.exists() and not overwrite:
        raise BadInputError(path, "output file already exists (pass overwrite=True to replace it)")

    def writer(tmp: Path) -> None:
        ds.save_as(tmp, enforce_file_format=True)

    try:
        atomic_write_with(path, writer)
    except OSError as exc:
        # atomic_write_with removed its temporary file; OSError messages quote only paths.
        raise BadInputError(
            path,
            f"could not write the DICOM file into folder {path.parent} ({type(exc).__name__}: {exc.strerror})",
        ) from exc


def _read_header(path: Path) -> Dataset:
    if not path.is_file():
        raise DicomError(path, "source DICOM file does not exist or is not a regular file")
    silence_pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except pydicom.errors.InvalidDicomError:
        raise DicomError(
            path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
        ) from None
    except Exception as exc:
        # The library's message could quote file content: only its type is forwarded.
        raise DicomError(path, f"malformed DICOM header ({type(exc).__name__})") from None




# --- helpers: de-identification ------------------------------------------------------------------


def _resolve_action(action: str) -> str:
    """One concrete action for a table entry: U, else D, else Z, else X (see `deidentify`)."""
    options = set(action.replace("*", "").split("/"))
    for choice in ("U", "D", "Z", "X"):
        if choice in options:
            return choice
    raise AssertionError(f"unknown profile action {action!r}")


def _is_repeating_group_to_drop(tag: BaseTag) -> bool:
    group = tag.group
    return (0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF) and group % 2 == 0


def _vr_of(tag: BaseTag, elem: DataElement | RawDataElement) -> str:
    """The element's VR; for implicit-VR or UN raw elements, the dictionary's ("UN" if unknown)."""
    vr = elem.VR
    if vr in (None, "UN"):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return "UN"
    return str(vr)


def _raw_text(ds: Dataset, tag: int) -> str:
    """A short text value read without pydicom's value conversion (which may log the value)."""
    if tag not in ds:
        return ""
    elem = ds.get_item(tag)
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value).strip()


def _uid_values(elem: DataElement | RawDataElement) -> list[str]:
    value = elem.value
    if value is None:
        return []
    if isinstance(value, bytes):
        parts = value.decode("ascii", "replace").split("\\")
    elif isinstance(value, MultiValue | list | tuple):
        parts = [str(v) for v in value]
    else:
        parts = str(value).split("\\")
    return [p.strip("\x00 ") for p in parts]


def _map_uid(old: str, uid_map: MutableMapping[str, str]) -> str:
    if not old:
        return old
    new = uid_map.get(old)
    if new is None:
        new = _new_uid()
        uid_map[old] = new
    return new


def _replace_uids(
    dset: Dataset, tag: BaseTag, elem: DataElement | RawDataElement, uid_map: MutableMapping[str, str]
) -> None:
    new = [_map_uid(v, uid_map) for v in _uid_values(elem)]
    value: Any = new[0] if len(new) == 1 else (new or "")
    dset[tag] = DataElement(tag, "UI", value)


def _keeps_uid(tag: BaseTag, value: str) -> bool:
    """A UI value outside the table is kept if it names a standard thing, not an instance."""
    keyword = keyword_for_tag(tag)
    return keyword.endswith("ClassUID") or keyword in _KEPT_UID_KEYWORDS or value in dcm_uid.UID_dictionary


def _set_value(dset: Dataset, tag: BaseTag, vr: str, value: Any) -> None:
    # A new element replaces the old without converting (and possibly logging) the old value.
    dset[tag] = DataElement(tag, vr, value)


def _empty(dset: Dataset, tag: BaseTag, vr: str) -> None:
    if vr == "SQ":
        _set_value(dset, tag, vr, Sequence([]))
    elif vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"):
        _set_value(dset, tag, vr, b"")
    else:
        _set_value(dset, tag, vr, None)


def _dummy(dset: Dataset, tag: BaseTag, vr: str) -> None:
    if vr in DUMMY_VALUES:
        _set_value(dset, tag, vr, DUMMY_VALUES[vr])
    else:
        _empty(dset, tag, vr)


def _clean_dataset(dset: Dataset, uid_map: MutableMapping[str, str], *, strict: bool) -> None:
    """De-identify `dset` in place, recursing into sequences (see `deidentify`).

    strict: inside a sequence whose action is D: free text gets the dummy value too.
    """
    for tag in sorted(dset.keys()):
        tag = Tag(tag)
        if (
            tag.is_private
            or tag.element == 0x0000  # group lengths: stale after editing
            or tag.group in (0x0000, 0x0002)  # command / meta elements do not belong in the body
            or _is_repeating_group_to_drop(tag)
        ):
            del dset[tag]
            continue
        # keep_deferred: a large value to be removed is never read (nor converted, nor logged).
        elem = dset.get_item(tag, keep_deferred=True)
        vr = _vr_of(tag, elem)
        row = ACTIONS.get(int(tag))
        if row is not None:
            action = _resolve_action(row[1])
            if action == "X":
                del dset[tag]
            elif action == "Z":
                _empty(dset, tag, vr)
            elif action == "U" and vr != "SQ":
                _replace_uids(dset, tag, elem, uid_map)
            elif vr == "SQ":  # U* or D on a sequence: keep the items, clean them
                _clean_sequence(dset, tag, uid_map, strict=strict or action == "D")
            else:  # D
                _dummy(dset, tag, vr)
            continue
        if vr == "UN":
            del dset[tag]  # not in the dictionary: cannot tell whether it identifies
        elif vr == "SQ":
            _clean_sequence(dset, tag, uid_map, strict=strict)
        elif vr == "UI":
            values = _uid_values(elem)
            if not all(_keeps_uid(tag, v) for v in values if v):
                _replace_uids(dset, tag, elem, uid_map)
        elif vr in _ALWAYS_EMPTY_VRS:
            _empty(dset, tag, vr)
        elif strict and vr in _TEXT_VRS:
            _dummy(dset, tag, vr)


def _load_deferred(dset: Dataset) -> None:
    for tag in list(dset.keys()):
        raw = dset.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            dset[tag]  # noqa: B018 - reads the deferred value from the source file


def _clean_sequence(dset: Dataset, tag: BaseTag, uid_map: MutableMapping[str, str], *, strict: bool) -> None:
    try:
        items = dset[tag].value
    except Exception:
        del dset[tag]  # a sequence pydicom cannot parse cannot be checked: drop it
        return
    for item in items or []:
        _clean_dataset(item, uid_map, strict=strict)


def _add_deidentification_record(out: Dataset) -> None:
    out.PatientIdentityRemoved = "YES"
    ours = [
        f"PS3.15 E.1 Basic Profile (retinagen {__version__})",
        "all private attributes removed",
        "all PN, AS, DA, DT, TM values emptied",
        "UIDs replaced by 2.25 UUID UIDs",
    ]
    previous: list[str] = []
    if "DeidentificationMethod" in out:
        value = out.DeidentificationMethod
        previous = [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]
    out.DeidentificationMethod = [v for v in previous if v] + ours

    codes = list(out.get("DeidentificationMethodCodeSequence", None) or [])
    value, scheme, meaning = DEIDENTIFICATION_CODE
    if not any(
        str(c.get("CodeValue", "")) == value and str(c.get("CodingSchemeDesignator", "")) == scheme
        for c in codes
    ):
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = scheme
        item.CodeMeaning = meaning
        codes.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    out.LongitudinalTemporalInformationModified = "REMOVED"


def _clean_file_meta(meta: Dataset, out: Dataset, uid_map: MutableMapping[str, str]) -> FileMetaDataset:
    clean = FileMetaDataset()
    for keyword in _META_KEEP:
        if keyword in meta:
            clean[keyword] = copy.deepcopy(meta[keyword])
    if "MediaStorageSOPClassUID" not in clean and "SOPClassUID" in out:
        clean.MediaStorageSOPClassUID = out.SOPClassUID
    old_instance = _raw_text(meta, 0x00020003)
    if old_instance:
        clean.MediaStorageSOPInstanceUID = _map_uid(old_instance, uid_map)
    elif "SOPInstanceUID" in out:
        clean.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return clean
