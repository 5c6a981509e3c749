"""The output-search helper finds what a raw byte search misses (so "never in the outputs" tests can fail)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, PngImagePlugin
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.outputs import leaks, leaks_in_bytes

SECRET = "Doe^Jane-PHI-0123456789"


def _png_with_ztxt() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SECRET * 4, zip=True)  # zTXt: deflated
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _deflated_dicom() -> bytes:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = SECRET * 2
    seq = pydicom.Dataset()
    seq.CodeMeaning = SECRET
    ds.AnatomicRegionSequence = [seq]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_secrets_hidden_by_compression_are_found(tmp_path: Path) -> None:
    png, dcm = _png_with_ztxt(), _deflated_dicom()
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dataset.json", json.dumps({"who": SECRET}))
    outer = tmp_path / "out" / "data.zip"
    outer.parent.mkdir()
    with zipfile.ZipFile(outer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("inner.zip", inner.getvalue())
        zf.writestr("a.png", png)
    (tmp_path / "out" / "x.dcm").write_bytes(dcm)
    for data in (outer.read_bytes(), png, dcm):
        assert SECRET.encode() not in data  # a raw search would miss every one of them
    where = {w for w, _ in leaks([tmp_path / "out"], [SECRET])}
    assert any(w.endswith("data.zip!inner.zip!dataset.json") for w in where), where
    assert any("data.zip!a.png[" in w for w in where), where
    assert any(w.endswith("x.dcm[dicom]") for w in where), where
    assert leaks_in_bytes(dcm, [SECRET.encode()]) and not leaks([tmp_path / "out"], ["Not-There-At-All"])
