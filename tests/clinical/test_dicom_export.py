"""Tests for clinical.dicom_export: synthetic DICOM, PS3.15 Basic Profile de-identification, derived export.

PHI sources: pydicom's own test files (real headers with names, IDs, dates, institutions; read
locally, never downloaded) and a dataset built here carrying fake PHI in every place PHI hides:
plain attributes, nested sequences, private blocks, overlays, camera EXIF fields, and person
names / dates outside the profile's table.
"""

from __future__ import annotations

import collections
import copy
import errno
import io
import json
import logging
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid as dcm_uid
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from clinical.dicom_export import (
    BASIC_PROFILE,
    DEIDENTIFICATION_CODE,
    DUMMY_VALUES,
    SYNTHETIC_PATIENT,
    deidentify,
    export_derived_dicom,
    write_synthetic_dicom,
)
from retinagen.data.dicom import read_dicom
from retinagen.errors import BadInputError, DicomError
from tests.outputs import leaks, leaks_in_bytes

SHA = "0123456789abcdef" * 4
CREATED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
# Fixed identifying UIDs of the fake-PHI dataset: none may survive de-identification.
STUDY_UID = "1.2.826.0.1.3680043.8.498.77001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.77002"
INSTANCE_UID = "1.2.826.0.1.3680043.8.498.77003"
FRAME_UID = "1.2.826.0.1.3680043.8.498.77004"
PRIOR_UID = "1.2.826.0.1.3680043.8.498.77005"
SOURCE_UID = "1.2.826.0.1.3680043.8.498.77006"
CONCAT_UID = "1.2.826.0.1.3680043.8.498.77007"  # an instance UID the profile's table does not list
FAKE_UIDS = (STUDY_UID, SERIES_UID, INSTANCE_UID, FRAME_UID, PRIOR_UID, SOURCE_UID, CONCAT_UID)

FAKE_PHI: dict[str, str] = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "PHI-PID-424242",
    "PatientBirthDate": "19610412",
    "PatientBirthTime": "071511",
    "PatientAge": "062Y",
    "PatientSex": "F",
    "PatientSize": "1.73",
    "PatientWeight": "71.5",
    "PatientAddress": "12 Retina Road, Springfield",
    "PatientTelephoneNumbers": "555-0199-777",
    "EthnicGroup": "PHIETHNIC",
    "OtherPatientIDs": "PHI-OTHER-777",
    "OtherPatientNames": "Roe^Janet",
    "PatientMotherBirthName": "Smithers^Mary",
    "MedicalRecordLocator": "MRN-PHI-31337",
    "MilitaryRank": "Captain Phillips",
    "AdditionalPatientHistory": "diabetic since 1999, see chart",
    "PatientComments": "prefers morning visits",
    "InstitutionName": "Saint Phi Eye Hospital",
    "InstitutionAddress": "1 Hospital Way, Phiville",
    "InstitutionalDepartmentName": "Retina Clinic West",
    "ReferringPhysicianName": "Who^Doctor",
    "PerformingPhysicianName": "Strange^Stephen",
    "OperatorsName": "Operator^Olga",
    "PhysiciansOfRecord": "Record^Rita",
    "NameOfPhysiciansReadingStudy": "Reader^Rex",
    "RequestingPhysician": "Requester^Ralph",
    "StationName": "FUNDUSCAM07",
    "DeviceSerialNumber": "SN-PHI-99812",
    "AccessionNumber": "ACC-PHI-987",
    "StudyID": "STUDY-55",
    "StudyDate": "20240229",
    "SeriesDate": "20240228",
    "ContentDate": "20240227",
    "InstanceCreationDate": "20240226",
    "StudyTime": "101530",
    "SeriesTime": "101531",
    "ContentTime": "101544",
    "AcquisitionDateTime": "20240229101533",
    "StudyDescription": "screening for Jane Q",
    "SeriesDescription": "left eye series of Quincy",
    "ImageComments": "patient complained of floaters",
    "ProtocolName": "Quincy protocol",
    "EvaluatorName": "Evaluator^Evelyn",  # PN outside the profile's table: emptied by the safety net
    "ExpiryDate": "20250317",  # DA outside the table
    "CameraOwnerName": "Owner^Olivia",
}
NESTED_PHI = (
    "PHI-SEQ-PID-1234",
    "PHI-ISSUER-XYZ",
    "REQ-PHI-8888",
    "ACC-PHI-SEQ-2",
    "Reviewer^Roberta",
    "20240101",
    "Private note about Jane",
    "PHICORP",
    "PHI-OVERLAY-BYTES",
)


def _phi_strings() -> list[bytes]:
    """Every fake PHI value, plus each person-name component, as bytes; 4 characters or more."""
    out: set[str] = set(FAKE_PHI.values()) | set(NESTED_PHI) | set(FAKE_UIDS)
    for value in list(out):
        if "^" in value:
            out.update(value.split("^"))
    return sorted(v.encode() for v in out if len(v) >= 4)


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Seeded random [h, w, 3] uint8: every byte value occurs, so any pixel change is seen."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _fake_phi_op(path: Path, *, burned_in: str | None = None) -> Path:
    """An Ophthalmic Photography 8-bit file with fake PHI in every hiding place."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OP_8BIT
    meta.MediaStorageSOPInstanceUID = INSTANCE_UID
    meta.TransferSyntaxUID = dcm_uid.ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "FUNDUSCAM07"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = OP_8BIT
    ds.SOPInstanceUID = INSTANCE_UID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FRAME_UID
    ds.SOPInstanceUIDOfConcatenationSource = CONCAT_UID
    ds.Modality = "OP"
    ds.ImageLaterality = "L"
    ds.Manufacturer = "Acme Optics"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for keyword, value in FAKE_PHI.items():
        setattr(ds, keyword, value)
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in

    other = Dataset()
    other.PatientID = "PHI-SEQ-PID-1234"
    other.IssuerOfPatientID = "PHI-ISSUER-XYZ"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.RequestedProcedureID = "REQ-PHI-8888"
    request.AccessionNumber = "ACC-PHI-SEQ-2"
    ds.RequestAttributesSequence = Sequence([request])
    prior = Dataset()
    prior.ReferencedSOPClassUID = OP_8BIT
    prior.ReferencedSOPInstanceUID = PRIOR_UID
    ds.ReferencedImageSequence = Sequence([prior])
    source = Dataset()
    source.ReferencedSOPClassUID = OP_8BIT
    source.ReferencedSOPInstanceUID = SOURCE_UID
    ds.SourceImageSequence = Sequence([source])
    # A sequence the profile keeps, holding a name and a date the table does not list.
    code = Dataset()
    code.CodeValue = "T-AA610"
    code.CodingSchemeDesignator = "SRT"
    code.CodeMeaning = "Retina"
    code.SecondaryReviewerName = "Reviewer^Roberta"
    code.SecondaryReviewDate = "20240101"
    ds.AnatomicRegionSequence = Sequence([code])
    # Private block, also nested inside a kept sequence item.
    block = ds.private_block(0x0009, "PHICORP", create=True)
    block.add_new(0x01, "LO", "Private note about Jane")
    code.private_block(0x0011, "PHICORP", create=True).add_new(0x02, "LO", "PHI-ISSUER-XYZ")
    # An overlay plane (may carry burned-in text) and GPS position of the camera.
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60003000, "OW", b"PHI-OVERLAY-BYTES" + b"\x00" * 15)
    ds.GPSLatitude = [51.0, 30.0, 12.0]
    ds.set_pixel_data(_rgb(), "RGB", 8, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def _all_tags(ds: Dataset) -> list[int]:
    tags: list[int] = []
    for elem in ds.iterall():
        tags.append(int(elem.tag))
    return tags


# --- table ----------------------------------------------------------------------------------------


def test_basic_profile_table_matches_dicom_dictionary() -> None:
    assert len(BASIC_PROFILE) >= 300
    allowed = {"X", "Z", "D", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
    for tag, (keyword, action) in BASIC_PROFILE.items():
        assert keyword_for_tag(tag) == keyword, hex(tag)
        assert action in allowed, (keyword, action)
    must = {
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
        "PatientWeight", "PatientAddress", "EthnicGroup", "OtherPatientIDs", "OtherPatientIDsSequence",
        "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
        "OperatorsName", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "DeviceSerialNumber",
        "ImageComments", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    }  # fmt: skip
    assert must <= {kw for kw, _ in BASIC_PROFILE.values()}


# --- (a) synthetic export -------------------------------------------------------------------------


def test_synthetic_round_trip_pixels_and_required_tags(tmp_path: Path) -> None:
    rgb = _rgb(37, 53, seed=1)  # odd sizes: Pixel Data needs a pad byte
    codes = {"c0": 2, "c4": 0.8, "c7": -0.25}
    out = tmp_path / "sub" / "synth.dcm"
    written = write_synthetic_dicom(
        rgb, out, model_name="InfoStyleGAN MSI(1,1,0)", checkpoint_sha256=SHA, seed=1234, grade=3,
        codes=codes, laterality="L", created=CREATED,
    )  # fmt: skip
    assert written.path == out and out.is_file()

    image = read_dicom(out)
    np.testing.assert_array_equal(image.pixels, rgb)
    assert image.pixels.dtype == np.uint8
    assert image.info["laterality"] == "L"

    raw = out.read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(out, force=False)
    assert ds.file_meta.TransferSyntaxUID == dcm_uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == dcm_uid.SecondaryCaptureImageStorage
    assert ds.SOPClassUID == dcm_uid.SecondaryCaptureImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == written.sop_instance_uid
    assert ds.SyntheticData == "YES"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "NO"
    assert ds.ConversionType == "SYN"
    assert ds.Modality == "OT"
    assert ds.PhotometricInterpretation == "RGB"
    assert (ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (3, 8, 8, 0)
    for needle in ("InfoStyleGAN MSI(1,1,0)", SHA, "seed 1234", "DR grade 3"):
        assert needle in ds.DerivationDescription
    provenance = json.loads(ds.ImageComments)
    assert provenance["codes"] == codes
    assert provenance["checkpoint_sha256"] == SHA and provenance["seed"] == 1234 and provenance["grade"] == 3
    # No patient data: fixed marker name/ID, empty birth date and sex, no identity attributes.
    assert str(ds.PatientName) == SYNTHETIC_PATIENT and ds.PatientID == SYNTHETIC_PATIENT
    assert ds.PatientBirthDate == "" and ds.PatientSex == ""
    for keyword in (
        "PatientAge",
        "PatientAddress",
        "InstitutionName",
        "OtherPatientIDs",
        "PatientIdentityRemoved",
    ):
        assert keyword not in ds
    # The only dates are the creation date.
    dates = {str(e.value) for e in ds.iterall() if e.VR in ("DA", "DT") and e.value}
    assert dates == {"20300102"}
    uids = {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    assert len(uids) == 3
    assert all(u.startswith("2.25.") and dcm_uid.UID(u).is_valid for u in uids)


def test_synthetic_uids_are_fresh_unless_grouped(tmp_path: Path) -> None:
    kwargs = {"model_name": "m", "checkpoint_sha256": SHA, "seed": 0, "grade": None, "codes": {}}
    a = write_synthetic_dicom(_rgb(8, 8), tmp_path / "a.dcm", **kwargs)
    b = write_synthetic_dicom(_rgb(8, 8), tmp_path / "b.dcm", **kwargs)
    assert {a.study_instance_uid, a.series_instance_uid, a.sop_instance_uid}.isdisjoint(
        {b.study_instance_uid, b.series_instance_uid, b.sop_instance_uid}
    )
    study, series = a.study_instance_uid, a.series_instance_uid
    c = write_synthetic_dicom(
        _rgb(8, 8), tmp_path / "c.dcm", study_instance_uid=study, series_instance_uid=series,
        instance_number=2, **kwargs,
    )  # fmt: skip
    ds = pydicom.dcmread(tmp_path / "c.dcm")
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber) == (study, series, 2)
    assert c.sop_instance_uid not in (a.sop_instance_uid, b.sop_instance_uid)
    assert "none (unconditional)" in ds.DerivationDescription


def test_synthetic_real_fundus_round_trip(tmp_path: Path) -> None:
    from skimage import data

    rgb = np.ascontiguousarray(data.retina()[::11, ::11])  # real fundus photograph, 129x129
    write_synthetic_dicom(
        rgb, tmp_path / "f.dcm", model_name="m", checkpoint_sha256=SHA, seed=5, grade=0, codes={}
    )
    np.testing.assert_array_equal(read_dicom(tmp_path / "f.dcm").pixels, rgb)


# --- (c) bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((3, 8, 8), np.uint8),
        np.zeros((8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.uint16),
        np.zeros((0, 8, 3), np.uint8),
        [[[0, 0, 0]]],
    ],
    ids=["2d", "rgba", "chw", "float", "uint16", "empty", "list"],
)
def test_bad_arrays_are_refused_before_writing(tmp_path: Path, arr: object) -> None:
    out = tmp_path / "x.dcm"
    with pytest.raises(ValueError, match=r"image (must|size)"):
        write_synthetic_dicom(arr, out, model_name="m", checkpoint_sha256=SHA, seed=0, grade=0, codes={})  # type: ignore[arg-type]
    source = _fake_phi_op(tmp_path / "src.dcm")
    with pytest.raises(ValueError, match=r"image (must|size)"):
        export_derived_dicom(source, arr, out, derivation_description="x")  # type: ignore[arg-type]
    assert not out.exists()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("checkpoint_sha256", SHA.upper(), "sha256"),
        ("checkpoint_sha256", "abc", "sha256"),
        ("seed", -1, "seed"),
        ("seed", 1.5, "seed"),
        ("grade", 5, "grade"),
        ("grade", True, "grade"),
        ("codes", {"c0": float("nan")}, "finite"),
        ("codes", [1, 2], "mapping"),
        ("model_name", "", "model_name"),
        ("model_name", "x" * 65, "model_name"),
        ("model_name", "a\\b", "backslash"),
        ("laterality", "B", "laterality"),
    ],
)
def test_bad_provenance_is_refused(tmp_path: Path, field: str, value: object, match: str) -> None:
    kwargs: dict[str, object] = {
        "model_name": "m",
        "checkpoint_sha256": SHA,
        "seed": 0,
        "grade": 1,
        "codes": {},
    }
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        write_synthetic_dicom(_rgb(8, 8), tmp_path / "x.dcm", **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def _synth(out: Path, **extra: object) -> object:
    return write_synthetic_dicom(
        _rgb(8, 8),
        out,
        model_name="m",
        checkpoint_sha256=SHA,
        seed=0,
        grade=0,
        codes={},
        **extra,  # type: ignore[arg-type]
    )


def test_output_folder_that_cannot_exist_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_bytes(b"x")
    out = blocker / "img.dcm"
    with pytest.raises(BadInputError) as info:
        _synth(out)
    assert info.value.path == str(out)
    assert "could not write" in info.value.reason and str(blocker) in info.value.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(BadInputError, match="PermissionError"):
            _synth(folder / "img.dcm")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_failure_mid_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk filling up half-way through: no file at the target, no temporary file beside it."""

    def half_then_enospc(self: Dataset, filename: object, *args: object, **kwargs: object) -> None:
        Path(str(filename)).write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Dataset, "save_as", half_then_enospc)
    out = tmp_path / "img.dcm"
    with pytest.raises(BadInputError, match="No space left"):
        _synth(out)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_by_default(tmp_path: Path) -> None:
    out = tmp_path / "img.dcm"
    out.write_bytes(b"precious")
    with pytest.raises(BadInputError, match="already exists"):
        _synth(out)
    assert out.read_bytes() == b"precious"
    _synth(out, overwrite=True)
    assert read_dicom(out).pixels.shape == (8, 8, 3)
    with pytest.raises(BadInputError, match="folder"):
        _synth(tmp_path)  # a folder as target


# --- (b) de-identification ------------------------------------------------------------------------


def _save_bytes(ds: Dataset, original: Dataset) -> bytes:
    """Serialise a de-identified dataset; as a conformant file where its file meta allows."""
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except (AttributeError, ValueError):
        # Inputs with incomplete file meta (no SOP class/instance or transfer syntax): write the
        # dataset in the encoding it was read with.
        implicit_vr, little_endian = original.original_encoding
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, implicit_vr=bool(implicit_vr), little_endian=little_endian is not False)
    return buf.getvalue()


def _input_values(ds: Dataset, phi: set[bytes], uids: set[str], kept: set[bytes]) -> None:
    """Collect, recursively: string values of table attributes (`phi`, >= 4 chars), UIDs the
    profile replaces (`uids`), and values of attributes the profile keeps (`kept`)."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value or []:
                _input_values(item, phi, uids, kept)
            continue
        values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
        texts = [str(v).strip() for v in values if isinstance(v, str | pydicom.valuerep.PersonName)]
        row = BASIC_PROFILE.get(int(tag))
        if row is not None and "U" in row[1].split("/"):
            uids.update(t for t in texts if len(t) >= 4)  # e.g. a placeholder UID "0" identifies nothing
        elif row is not None:
            phi.update(t.encode("utf-8") for t in texts if len(t) >= 4)
            if isinstance(elem.value, bytes) and len(elem.value.strip(b"\x00 ")) >= 4:
                phi.add(elem.value.strip(b"\x00 "))
        elif not tag.is_private and elem.VR not in ("PN", "DA", "DT", "TM", "AS", "UI"):
            kept.update(t.encode("utf-8") for t in texts if t)


def _leaks(
    phi: set[bytes], uids: set[str], kept: set[bytes], out: bytes, new_uids: list[str]
) -> tuple[list[bytes], int]:
    """PHI found in `out`, except values that are themselves dummies or equal to/inside a value
    the input holds in a kept attribute (e.g. Institution Name 'TOSHIBA' = Manufacturer).

    The new UIDs are cut out first: they are random digits, in which a short number such as a
    Study ID '4900' turns up by chance without carrying anything over."""
    for uid in sorted(new_uids, key=len, reverse=True):
        out = out.replace(uid.encode(), b"")
    dummies = [str(v).encode() for v in DUMMY_VALUES.values()]
    leaks: list[bytes] = []
    excused = 0
    for value in phi:
        if value not in out:
            continue
        if any(value in k for k in kept) or any(value in d for d in dummies):
            excused += 1
            continue
        leaks.append(value)
    for uid in uids:
        if re.search(rb"(?<![0-9.])" + re.escape(uid.encode()) + rb"(?![0-9.])", out):
            leaks.append(uid.encode())
    return leaks, excused


def test_every_pydicom_test_file_is_deidentified_without_phi_left() -> None:
    processed = 0
    excused_total = 0
    skipped: collections.Counter[str] = collections.Counter()
    failures: dict[str, object] = {}
    for path in sorted(get_testdata_files()):
        name = os.path.relpath(path, os.path.dirname(get_testdata_file("CT_small.dcm", download=False) or ""))
        if os.path.isdir(path):
            skipped["folder"] += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, force=False)
            except pydicom.errors.InvalidDicomError:
                skipped["not a DICOM file (no DICM preamble)"] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - counted with its reason
                skipped[f"unreadable ({type(exc).__name__})"] += 1
                continue
            phi: set[bytes] = set()
            uids: set[str] = set()
            kept: set[bytes] = set()
            _input_values(ds, phi, uids, kept)
            name_before = str(ds.get("PatientName", ""))
            uid_map: dict[str, str] = {}
            try:
                out = deidentify(ds, uid_map=uid_map)
            except DicomError as exc:
                skipped[f"refused: {exc.reason.split(':')[0]}"] += 1
                assert "DICOMDIR" in exc.reason
                continue
            data = _save_bytes(out, ds)
            reread = pydicom.dcmread(io.BytesIO(data), force=True)
            all_tags = _all_tags(reread)
        processed += 1
        leaks, excused = _leaks(phi, uids, kept, data, list(uid_map.values()))
        excused_total += excused
        if leaks:
            failures[name] = leaks
        assert not [hex(t) for t in all_tags if (t >> 16) % 2 == 1], name
        assert reread.PatientIdentityRemoved == "YES", name
        codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in reread.DeidentificationMethodCodeSequence]
        assert DEIDENTIFICATION_CODE[:2] in codes, name
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            before = str(ds.get(keyword, "") or "")
            if before:
                assert str(reread[keyword].value) != before, (name, keyword)
        meta_uid = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPInstanceUID", "") or "")
        if meta_uid and meta_uid == str(ds.get("SOPInstanceUID", "")):
            assert reread.file_meta.MediaStorageSOPInstanceUID == reread.SOPInstanceUID, name
        assert str(ds.get("PatientName", "")) == name_before, name  # the input is not modified
    assert failures == {}
    assert processed >= 140, (processed, dict(skipped))
    assert skipped["folder"] > 0 and skipped["not a DICOM file (no DICM preamble)"] > 0
    # Coincidences (a removed value equal to a kept one, or to a dummy) stay rare.
    assert excused_total < processed


def test_named_real_files_lose_their_phi() -> None:
    for name, must_go in {
        "CT_small.dcm": [b"CompressedSamples^CT1", b"1CT1", b"JFK IMAGING CENTER", b"20040119"],
        "MR_small.dcm": [b"CompressedSamples^MR1", b"4MR1", b"20040826"],
        "SC_rgb_small_odd.dcm": [b"Lestrade^G", b"Moriarty^James", b"20170101", b"Scaled image"],
    }.items():
        path = get_testdata_file(name, download=False)
        assert path is not None, name
        raw = Path(path).read_bytes()
        assert all(v in raw for v in must_go), name  # the input really holds them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        out = _save_bytes(deidentify(ds), ds)
        assert [v for v in must_go if v in out] == [], name


def test_fake_phi_everywhere_is_removed(tmp_path: Path) -> None:
    path = _fake_phi_op(tmp_path / "phi.dcm")
    raw = path.read_bytes()
    strings = _phi_strings()
    assert all(s in raw for s in strings)  # the fixture really carries every string
    ds = pydicom.dcmread(path)
    uid_map: dict[str, str] = {}
    out = deidentify(ds, uid_map=uid_map)
    data = _save_bytes(out, ds)
    assert [s for s in strings if s in data] == []
    # The input object is untouched.
    assert str(ds.PatientName) == FAKE_PHI["PatientName"] and 0x60003000 in ds
    # Structure kept: pixels, class, modality, laterality, kept sequences (cleaned).
    reread = pydicom.dcmread(io.BytesIO(data))
    np.testing.assert_array_equal(reread.pixel_array, ds.pixel_array)
    assert reread.SOPClassUID == OP_8BIT and reread.Modality == "OP" and reread.ImageLaterality == "L"
    assert reread.Manufacturer == "Acme Optics"
    assert reread.AnatomicRegionSequence[0].CodeMeaning == "Retina"
    assert reread.AnatomicRegionSequence[0].SecondaryReviewerName == ""
    # Type 2 attributes stay present but empty (Z); X attributes are gone.
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "AccessionNumber",
    ):
        assert keyword in reread and not reread[keyword].value, keyword
    # Z/D (Type 1 in some IODs): the dummy value.
    assert reread.PatientID == DUMMY_VALUES["LO"] and reread.ContentDate == DUMMY_VALUES["DA"]
    for keyword in ("PatientAge", "PatientAddress", "OtherPatientIDsSequence", "RequestAttributesSequence"):
        assert keyword not in reread, keyword
    assert not any(0x6000 <= t >> 16 <= 0x60FF for t in _all_tags(reread))
    assert "GPSLatitude" not in reread and "SourceApplicationEntityTitle" not in reread.file_meta
    # UIDs: replaced, consistently (file meta = SOP instance; references use the map too).
    assert set(FAKE_UIDS) <= set(uid_map)
    assert reread.SOPInstanceUID == uid_map[INSTANCE_UID] == reread.file_meta.MediaStorageSOPInstanceUID
    assert reread.StudyInstanceUID == uid_map[STUDY_UID]
    assert reread.SOPInstanceUIDOfConcatenationSource == uid_map[CONCAT_UID]
    assert reread.ReferencedImageSequence[0].ReferencedSOPInstanceUID == uid_map[PRIOR_UID]
    assert reread.ReferencedImageSequence[0].ReferencedSOPClassUID == OP_8BIT  # standard UID kept
    # The record of what was done.
    assert reread.PatientIdentityRemoved == "YES"
    assert any("Basic Profile" in m for m in reread.DeidentificationMethod)
    (code,) = reread.DeidentificationMethodCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == DEIDENTIFICATION_CODE


# Invalid values that pydicom 3 quotes, in a "pydicom" log record and a UserWarning, when it converts
# them (reading_validation_mode WARN, its default); it does not for an invalid DS, DA or TM.
# tag, VR, raw value (a PHI-looking marker), where: (0016,008E) GPS Differential is removed (X),
# the UIDs are replaced (U) at top level and inside Referenced Image Sequence.
_LOGGED_WHEN_CONVERTED = (
    (0x0016008E, "IS", b"Doe^Jane^IS "),
    (0x0020000D, "UI", b"1.2.Doe^Jane^UI"),
    (0x00081155, "UI", b"1.2.Doe^Jane^SQ"),
)


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def test_deferred_values_are_read_and_phi_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PHI-5: values that pydicom logs and warns about when converted are removed or replaced
    without being converted; values deferred by dcmread(defer_size=...) are still removed or carried
    over. The test first shows that converting them does log and warn (else it proves nothing)."""
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.WARN
    path = _fake_phi_op(tmp_path / "phi.dcm")
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag, vr, text in _LOGGED_WHEN_CONVERTED[:2]:
            ds[tag] = _raw(tag, vr, text)
        tag, vr, text = _LOGGED_WHEN_CONVERTED[2]
        ds.ReferencedImageSequence[0][tag] = _raw(tag, vr, text)
        ds.add_new(0x00101040, "LO", "Long address " + "x" * 2000)  # deferred at 1 KB
        ds.save_as(path, enforce_file_format=True)
    markers = [text.strip().decode() for _, _, text in _LOGGED_WHEN_CONVERTED]

    def convert_all() -> None:
        control = pydicom.dcmread(path)
        for tag, _, _ in _LOGGED_WHEN_CONVERTED[:2]:
            control[tag].value  # noqa: B018 - converts
        control.ReferencedImageSequence[0][_LOGGED_WHEN_CONVERTED[2][0]].value  # noqa: B018

    # Control: without retinagen's silencing, converting each value logs and warns with it.
    log = logging.getLogger("pydicom")
    saved = list(log.filters)
    caplog.clear()
    try:
        for f in saved:
            log.removeFilter(f)
        with caplog.at_level("DEBUG", logger="pydicom"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            convert_all()
    finally:
        for f in saved:
            log.addFilter(f)
    warned = "".join(str(w.message) for w in caught)
    assert [m for m in markers if m not in caplog.text] == []
    assert [m for m in markers if m not in warned] == []

    # Once retinagen has read or de-identified a file in this process (a filter and a log filter, added once,
    # so no per-call filter swapping), the same conversions give neither a record nor a warning.
    caplog.clear()
    with caplog.at_level("DEBUG", logger="pydicom"), warnings.catch_warnings(record=True) as caught:
        deidentify(pydicom.dcmread(path))
        convert_all()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []

    caplog.clear()
    with caplog.at_level("DEBUG", logger="pydicom"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lazy = pydicom.dcmread(path, defer_size="1 KB")
        out = deidentify(lazy)
        data = _save_bytes(out, lazy)
    warned = "".join(str(w.message) for w in caught)
    phi = [s.decode() for s in _phi_strings()] + markers
    assert [s for s in phi if s in caplog.text] == []
    assert [s for s in phi if s in warned] == []
    # Nothing converted at all: pydicom's validation warnings are all that its reading logs above DEBUG.
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG] == []
    assert leaks_in_bytes(data, _phi_strings() + [m.encode() for m in markers] + [b"Long address"]) == []
    reread = pydicom.dcmread(io.BytesIO(data))
    assert "GPSDifferential" not in reread and "PatientAddress" not in reread
    assert reread.StudyInstanceUID.startswith("2.25.")
    assert reread.ReferencedImageSequence[0].ReferencedSOPInstanceUID.startswith("2.25.")
    # The deferred Pixel Data (9216 bytes) was read in and kept.
    np.testing.assert_array_equal(reread.pixel_array, _rgb())


def test_deidentify_without_file_meta_and_in_implicit_vr(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_fake_phi_op(tmp_path / "phi.dcm"))
    bare = Dataset(copy.deepcopy(ds))  # no file meta
    out = deidentify(bare)
    assert getattr(out, "file_meta", None) is None  # none invented
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, out, implicit_vr=True, little_endian=True)
    assert leaks_in_bytes(buf.getvalue(), _phi_strings()) == []
    assert out.PatientIdentityRemoved == "YES"


def test_uid_map_is_consistent_across_calls_and_files(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_fake_phi_op(tmp_path / "phi.dcm"))
    shared: dict[str, str] = {}
    first = deidentify(ds, uid_map=shared)
    second = deidentify(ds, uid_map=shared)
    assert first.StudyInstanceUID == second.StudyInstanceUID == shared[STUDY_UID]
    fresh = deidentify(ds)
    assert fresh.StudyInstanceUID != first.StudyInstanceUID
    assert fresh.StudyInstanceUID.startswith("2.25.")


def test_a_uid_met_in_several_places_of_one_file_gets_one_replacement(tmp_path: Path) -> None:
    # PHI-4's "replaced consistently" inside one file: the file meta's instance UID, two sequences
    # referencing the same prior image, a sequence item naming the file's own frame of reference.
    ds = pydicom.dcmread(_fake_phi_op(tmp_path / "phi.dcm"))
    ds.SourceImageSequence[0].ReferencedSOPInstanceUID = PRIOR_UID  # also in ReferencedImageSequence
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = FRAME_UID
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])
    uid_map: dict[str, str] = {}
    out = deidentify(ds, uid_map=uid_map)
    new_prior, new_frame, new_instance = uid_map[PRIOR_UID], uid_map[FRAME_UID], uid_map[INSTANCE_UID]
    assert len({new_prior, new_frame, new_instance, uid_map[STUDY_UID]}) == 4
    # Checked on the returned dataset: pydicom's save_as(enforce_file_format=True) copies the
    # instance UID into the file meta itself and would hide a mismatch.
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == new_instance
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_prior
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == new_prior
    assert out.FrameOfReferenceUID == out.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == new_frame
    # No original UID survives anywhere, file meta included.
    found = {str(e.value) for e in out.iterall() if e.VR == "UI" and e.value}
    found |= {str(e.value) for e in out.file_meta if e.VR == "UI" and e.value}
    assert not found & set(FAKE_UIDS)


def test_burned_in_annotation_is_refused_without_echoing_phi(tmp_path: Path) -> None:
    path = _fake_phi_op(tmp_path / "burned.dcm", burned_in="YES")
    with pytest.raises(DicomError, match="Burned In Annotation") as info:
        deidentify(pydicom.dcmread(path))
    assert not any(s.decode() in str(info.value) for s in _phi_strings())
    with pytest.raises(DicomError, match="Burned In Annotation"):
        export_derived_dicom(path, _rgb(8, 8), tmp_path / "out.dcm", derivation_description="crop")
    assert not (tmp_path / "out.dcm").exists()


# --- derived export -----------------------------------------------------------------------------


def test_export_derived_from_fake_phi_op(tmp_path: Path) -> None:
    source = _fake_phi_op(tmp_path / "src.dcm")
    rgb = _rgb(31, 45, seed=9)
    uid_map: dict[str, str] = {}
    out = tmp_path / "derived" / "fundus.dcm"
    written = export_derived_dicom(
        source, rgb, out, derivation_description="cropped to field of view, resized to 45 px",
        uid_map=uid_map, created=CREATED,
    )  # fmt: skip
    assert leaks([out], _phi_strings()) == []  # raw bytes and every element value as pydicom reads it
    np.testing.assert_array_equal(read_dicom(out).pixels, rgb)

    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == dcm_uid.SecondaryCaptureImageStorage
    assert ds.file_meta.TransferSyntaxUID == dcm_uid.ExplicitVRLittleEndian
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.DerivationDescription == "cropped to field of view, resized to 45 px"
    assert ds.SyntheticData == "NO" and ds.BurnedInAnnotation == "NO" and ds.ConversionType == "WSD"
    assert ds.Modality == "OP" and ds.ImageLaterality == "L"
    assert ds.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert ds.PatientName == "" and ds.PatientID == DUMMY_VALUES["LO"] and ds.StudyDate == ""
    # Same study as the de-identified source, a new series and instance, a reference to the source.
    assert ds.StudyInstanceUID == uid_map[STUDY_UID] == written.study_instance_uid
    assert ds.SeriesInstanceUID not in (uid_map[SERIES_UID], SERIES_UID)
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == uid_map[INSTANCE_UID]
    assert ds.SourceImageSequence[0].ReferencedSOPClassUID == OP_8BIT
    clean_source = deidentify(pydicom.dcmread(source), uid_map=uid_map)
    assert clean_source.SOPInstanceUID == ds.SourceImageSequence[0].ReferencedSOPInstanceUID


def test_export_derived_from_real_pydicom_rgb_file(tmp_path: Path) -> None:
    source = get_testdata_file("SC_rgb_small_odd.dcm", download=False)
    assert source is not None
    src = pydicom.dcmread(source)
    rgb = _rgb(3, 3, seed=4)
    out = tmp_path / "d.dcm"
    export_derived_dicom(source, rgb, out, derivation_description="denoised")
    values = [b"Lestrade^G", b"Lestrade", b"Moriarty^James", b"20170101", b"Scaled image"]
    assert all(v in Path(source).read_bytes() for v in values)  # the source really holds them
    assert leaks([out], [*values, src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID]) == []
    np.testing.assert_array_equal(read_dicom(out).pixels, rgb)


def test_export_derived_refuses_unreadable_sources(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.dcm"
    bogus.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(DicomError, match="not a DICOM file"):
        export_derived_dicom(bogus, _rgb(8, 8), tmp_path / "o.dcm", derivation_description="x")
    with pytest.raises(DicomError, match="does not exist"):
        export_derived_dicom(
            tmp_path / "missing.dcm", _rgb(8, 8), tmp_path / "o.dcm", derivation_description="x"
        )
    with pytest.raises(ValueError, match="derivation_description"):
        export_derived_dicom(bogus, _rgb(8, 8), tmp_path / "o.dcm", derivation_description="")
    assert not (tmp_path / "o.dcm").exists()
