"""Inputs: fundus files to model-range images, with a status per file.

Files go through the training preprocessing, as `retinagen prepare` runs it: `decode_image` (DICOM
pixels only, no header value kept), `preprocess_fundus` (FOV detection, crop, resize, mask; Ben Graham when the
dataset was prepared with it) and `to_model_range`. An image with no detectable fundus is reported as
``no_fundus`` and not scored; an unreadable file is reported with its reason and the batch goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retinagen.data.imageio import IMAGE_EXTENSIONS, decode_image, is_dicom_file
from retinagen.data.preprocess import preprocess_fundus, to_model_range
from retinagen.errors import (
    BadInputError,
    NoFundusError,
)


@dataclass
class InputImage:
    """One input file after reading and preprocessing.

    status: "ok" (``image`` is float32 [3, R, R] in [-1, 1]), "no_fundus" (decoded, but the FOV detector
    found no fundus) or "unreadable" (not decodable: ``reason`` says why). ``file`` is the path as given.
    """

    file: str
    status: str
    reason: str = ""
    image: torch.Tensor | None = field(default=None, repr=False)


def read_fundus_file(path: str | Path, resolution: int, *, ben_graham: bool = False) -> torch.Tensor:
    """Read a fundus photograph or DICOM file and preprocess it exactly as `retinagen prepare` does.

    Returns float32 [3, resolution, resolution] in [-1, 1]. Decoding is `decode_image`, which sends DICOM
    to `retinagen.data.dicom.read_dicom` (pixels only: no header value leaves it) and everything else to
    the safe raster reader; then `preprocess_fundus` and `to_model_range`. Raises `NoFundusError` (no
    field of view), `DicomError` (bad DICOM) or `ImageDecodeError` (any other undecodable file), each
    naming the file.
    """
    p = Path(path)
    pixels = decode_image(p).pixels  # [H, W, 3] uint8, or uint16 for 16-bit sources and DICOM
    try:
        u8 = preprocess_fundus(pixels, resolution, ben_graham=ben_graham)
    except NoFundusError as exc:
        raise NoFundusError(p, exc.reason) from None
    return to_model_range(u8)


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the image/DICOM files under them (recursively, sorted).

    A file inside a folder counts when its extension is an image/DICOM one or its content starts like
    DICOM (files without extension are common in DICOM exports). A path that does not exist is kept, so
    that it is reported as unreadable rather than silently dropped.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
                if f.suffix.lower() in IMAGE_EXTENSIONS or is_dicom_file(f):
                    out.append(f)
        else:
            out.append(p)
    return out


def load_inputs(
    paths: Sequence[str | Path], resolution: int, *, ben_graham: bool = False
) -> list[InputImage]:
    """`read_fundus_file` on every path; failures become statuses, never exceptions (the batch goes on)."""
    results: list[InputImage] = []
    for p in paths:
        try:
            img = read_fundus_file(p, resolution, ben_graham=ben_graham)
        except NoFundusError as exc:
            results.append(InputImage(str(p), "no_fundus", exc.reason))
        except BadInputError as exc:  # ImageDecodeError, DicomError, UnsafePathError
            results.append(InputImage(str(p), "unreadable", exc.reason))
        else:
            results.append(InputImage(str(p), "ok", "", img))
    return results
