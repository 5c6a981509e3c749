"""The one saved-file format: ``NAME.safetensors`` (the tensors) and ``NAME.json`` (what they are).

Model checkpoints, the fundus encoder, the DR grader and the anomaly scorer are all stored this way:
the tensor file is written atomically first, then the JSON, which records the tensor file's name and
SHA-256 and so is the commit marker (a write killed half-way leaves no JSON, so nothing counts).
Reading refuses anything that is not safetensors before a parser sees it (pickle-based ``.pt``/``.pkl``
files can run code when loaded), a JSON that is missing or unreadable, and a tensor file whose hash
differs from the recorded one. Each kind checks its own fields of the JSON (``accept``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinagen.errors import CheckpointError
from retinagen.fileio import atomic_path, atomic_write_json, sha256_file

PICKLE_MAGIC = (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05")


def check_safetensors_header(path: str | Path) -> None:
    """Refuse anything that is not a safetensors file before handing it to a parser.

    A safetensors file starts with an 8-byte little-endian header length followed by a JSON object.
    Pickles (``torch.save`` output, a ZIP or a raw pickle stream) fail this check.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or n > size - 8:
        kind = "a pickle/torch.save file" if head[:2] in PICKLE_MAGIC else "not safetensors"
        raise CheckpointError(
            f"{path}: refused: {kind}. retinagen loads only data-only safetensors checkpoints "
            "(pickle-based files can run code when loaded)"
        )


def artifact_paths(path: str | Path) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, ``NAME.json`` or ``NAME.safetensors``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_file(tensors: Mapping[str, Any], filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' torch writer, imported on first use so that reading this module does not load torch."""
    from safetensors.torch import save_file as save_torch

    save_torch(dict(tensors), filename, metadata=metadata)


def write_artifact(
    path: str | Path,
    tensors: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    header: Mapping[str, str] | None = None,
    numpy: bool = False,
) -> Path:
    """Write the tensors (torch, or numpy arrays with ``numpy=True``) then the JSON; returns the JSON path.

    ``header`` goes into the safetensors file's own metadata; the JSON gets ``tensors_file`` and
    ``tensors_sha256`` added to ``meta``.
    """
    tensor_path, json_path = artifact_paths(path)
    with atomic_path(tensor_path) as tmp:
        if numpy:
            from safetensors.numpy import save_file as save_numpy

            save_numpy(dict(tensors), str(tmp), metadata=dict(header or {}))
        else:
            save_file(dict(tensors), str(tmp), metadata=dict(header or {}))
    full = dict(meta)
    full.update(tensors_file=tensor_path.name, tensors_sha256=sha256_file(tensor_path))
    atomic_write_json(json_path, full)
    return json_path


@dataclass
class Artifact:
    """What `read_artifact` found: the tensors, the JSON, both paths and the tensor file's SHA-256 ("" unverified)."""

    tensors: dict[str, Any]
    meta: dict[str, Any]
    tensor_path: Path
    json_path: Path
    sha256: str


def read_artifact_meta(path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """(tensor file, JSON file, the JSON's object) of an artifact, after checking the tensor file's header; no
    tensor is read or hashed. `CheckpointError` names the file and the reason."""
    tensor_path, json_path = artifact_paths(path)
    check_safetensors_header(tensor_path)
    if not json_path.is_file():
        raise CheckpointError(f"{tensor_path}: its metadata file {json_path.name} is missing (an incomplete write?)")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{json_path}: metadata is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{json_path}: metadata is not a JSON object")
    return tensor_path, json_path, meta


def read_artifact(
    path: str | Path,
    *,
    accept: Callable[[dict[str, Any], Path], None] | None = None,
    numpy: bool = False,
    verify_hash: bool = True,
) -> Artifact:
    """Read an artifact written by `write_artifact` (given ``NAME``, ``NAME.json`` or ``NAME.safetensors``).

    ``accept(meta, json_path)`` raises `CheckpointError` when the JSON is not of the expected kind; it runs
    before the tensors are hashed or read.
    """
    tensor_path, json_path, meta = read_artifact_meta(path)
    if accept is not None:
        accept(meta, json_path)
    digest = sha256_file(tensor_path) if verify_hash else ""
    if verify_hash and meta.get("tensors_sha256") != digest:
        raise CheckpointError(f"{tensor_path}: contents do not match the sha256 in {json_path.name} (corrupt or replaced)")
    from safetensors import SafetensorError

    if numpy:
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensor_path}: cannot read tensors ({type(exc).__name__})") from None
    return Artifact(tensors=tensors, meta=meta, tensor_path=tensor_path, json_path=json_path, sha256=digest)


def is_complete(json_path: str | Path) -> bool:
    """Whether an artifact's JSON exists, reads, and records the SHA-256 its tensor file has now."""
    tensor_path, json_path = artifact_paths(json_path)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        check_safetensors_header(tensor_path)
        return isinstance(meta, dict) and meta.get("tensors_sha256") == sha256_file(tensor_path)
    except (OSError, ValueError, CheckpointError):
        return False
