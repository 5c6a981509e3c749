"""Read everything a command wrote, decoded, for "X never appears in the outputs" tests.

Searching a file's raw bytes misses what is stored compressed: a ZIP member written with DEFLATE
(``dataset.json`` in a prepared dataset), a PNG's zTXt/iTXt text chunk, a deflated DICOM data set. The
helpers here yield one text per place a value could be read back from: every file under the given
paths as bytes (latin-1, so no byte is lost), every ZIP member decompressed (nested ZIPs and ``.npz``
files too), every PNG text chunk decompressed, and every DICOM element value as pydicom reads it.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DICOM_MAGIC_AT = 128


def decoded_texts(*paths: Path) -> Iterator[tuple[str, str]]:
    """(where, text) for every file under ``paths`` and everything inside each file, decoded."""
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            yield from _texts_of(str(f), f.read_bytes())


def leaks(paths: Iterable[Path], needles: Iterable[str | bytes]) -> list[tuple[str, str]]:
    """(where, needle) for each needle found anywhere in the decoded outputs; empty when none is."""
    paths = list(paths)
    texts = list(decoded_texts(*paths))
    assert texts, f"nothing to search under {paths}"  # a search of nothing proves nothing
    found = []
    for n in needles:
        text = n.decode("latin-1") if isinstance(n, bytes) else n
        found += [(where, text) for where, t in texts if text in t]
    return found


def leaks_in_bytes(data: bytes, needles: Iterable[str | bytes], where: str = "<bytes>") -> list[tuple[str, str]]:
    """The same search over bytes a test holds in memory (a DICOM data set saved to a buffer)."""
    texts = list(_texts_of(where, data))
    found = []
    for n in needles:
        text = n.decode("latin-1") if isinstance(n, bytes) else n
        found += [(w, text) for w, t in texts if text in t]
    return found


def _texts_of(where: str, data: bytes) -> Iterator[tuple[str, str]]:
    yield where, data.decode("latin-1")
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                yield from _texts_of(f"{where}!{info.filename}", zf.read(info))
    elif data.startswith(PNG_MAGIC):
        yield from _png_text(where, data)
    elif data[DICOM_MAGIC_AT : DICOM_MAGIC_AT + 4] == b"DICM":
        yield from _dicom_values(where, data)


def _png_text(where: str, data: bytes) -> Iterator[tuple[str, str]]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # text chunks after the image data are read only once the pixels are
        for key, value in getattr(im, "text", {}).items():
            yield f"{where}[{key}]", f"{key}\n{value}"
        for key, value in im.info.items():
            if isinstance(value, bytes | str):
                text = value.decode("latin-1") if isinstance(value, bytes) else value
                yield f"{where}[info {key}]", f"{key}\n{text}"


def _dicom_values(where: str, data: bytes) -> Iterator[tuple[str, str]]:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    values = []
    for elem in ds.iterall():
        if elem.tag == 0x7FE00010 or elem.VR == "SQ":  # Pixel Data is not text; a sequence's items come next
            continue
        values.append(str(elem.value))  # values only: keywords such as EvaluatorName are not data
    for elem in ds.file_meta.iterall() if hasattr(ds, "file_meta") else ():
        values.append(str(elem.value))
    yield f"{where}[dicom]", "\n".join(values)
