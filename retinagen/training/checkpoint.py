"""Data-only checkpoints: safetensors for tensors, a JSON sidecar for everything else.

A checkpoint ``NAME`` is two files written atomically, in this order:

    NAME.safetensors   every tensor: G., D., G_ema. weights, optimizer moments, RNG states
    NAME.json          schema version, resolved config, latent spec, step, kimg, dataset fingerprint,
                       optimizer hyper-parameters, the sha256 of NAME.safetensors

The JSON is the commit marker: a checkpoint counts only when its JSON exists and the tensor file's
hash matches it, so a process killed mid-snapshot leaves the previous checkpoint as the latest
complete one. Nothing here unpickles: a file that is not safetensors is refused before it is read
(pickle-based ``.pt``/``.pkl`` files can run code when loaded). The file format is `retinagen.artifact`'s;
this module adds the checkpoint's schema, its listing in a run's ``checkpoints/`` and optimizer state.
"""

from __future__ import annotations

import glob
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retinagen.artifact import check_safetensors_header, is_complete, read_artifact, write_artifact
from retinagen.errors import CheckpointError
from retinagen.fileio import atomic_path, atomic_write_json, sha256_file

__all__ = ["check_safetensors_header", "sha256_file"]  # re-exported: older imports of the file helpers

SCHEMA_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d{6,})\.json$")


# --------------------------------------------------------------------------------------------------
# Optimizer state <-> flat tensors + JSON


def flatten_optimizer(prefix: str, state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``prefix.state.<idx>.<key>``) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    return tensors, meta


def unflatten_optimizer(prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    start = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(start):
            idx, key = name[len(start) :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state dict of one module (``G``, ``D``, ``G_ema``) stored under ``prefix.``."""
        p = prefix + "."
        out = {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}
        if not out:
            raise CheckpointError(f"checkpoint has no tensors for {prefix!r}")
        return out

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix + ".") for k in self.tensors)


def save_checkpoint(path_stem: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` atomically; returns the JSON path."""
    stem = Path(path_stem)
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # A snapshot killed mid-write leaves a hidden temporary (".NAME.safetensors.<random>.tmp", fileio's
    # naming) that nothing else removes; writing the same NAME again (a resumed run does) clears it.
    # Only one process (rank 0) writes a run's checkpoints, so such a file is never a live writer's.
    for stale in stem.parent.glob(f".{glob.escape(stem.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    full_meta = dict(meta)
    full_meta.update(
        schema_version=SCHEMA_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        torch_version=torch.__version__,
    )
    header = {"format": "retinagen", "schema_version": str(SCHEMA_VERSION)}
    return write_artifact(stem.with_suffix(".safetensors"), clean, full_meta, header=header)


def copy_checkpoint(meta_path: str | Path, dest_stem: str | Path, extra_meta: Mapping[str, Any]) -> Path:
    """Copy a complete checkpoint to ``<dest_stem>.safetensors`` + ``.json`` (same order and atomicity as
    `save_checkpoint`), adding ``extra_meta`` to its JSON; the tensors are hard-linked where the file system
    allows (no second copy on disk), copied otherwise. Returns the new JSON path."""
    import os
    import shutil

    src_json = Path(meta_path)
    src_tensors = src_json.with_suffix(".safetensors")
    stem = Path(dest_stem)
    tensor_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    meta = json.loads(src_json.read_text(encoding="utf-8"))
    with atomic_path(tensor_path) as tmp:
        try:
            tmp.unlink()  # atomic_path made an empty placeholder; the link takes its name
            os.link(src_tensors, tmp)
        except OSError:
            shutil.copyfile(src_tensors, tmp)
    if sha256_file(tensor_path) != meta.get("tensors_sha256"):
        tensor_path.unlink(missing_ok=True)
        raise CheckpointError(f"{src_tensors}: contents do not match the sha256 in {src_json.name}; not copied")
    meta.update(extra_meta)
    meta["tensors_file"] = tensor_path.name
    atomic_write_json(json_path, meta)
    return json_path


def _accept_checkpoint(meta: dict[str, Any], meta_path: Path) -> None:
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{meta_path}: unsupported checkpoint schema {meta.get('schema_version')}"
            f" (this retinagen reads schema {SCHEMA_VERSION})"
        )


def load_checkpoint(path: str | Path, *, verify_hash: bool = True) -> Checkpoint:
    """Load a checkpoint given its ``.safetensors`` or ``.json`` path (data only, never unpickles)."""
    art = read_artifact(path, accept=_accept_checkpoint, verify_hash=verify_hash)
    return Checkpoint(tensors=art.tensors, meta=art.meta)


def checkpoint_stem(step: int, prefix: str = "ckpt-") -> str:
    """A checkpoint's file stem, ``ckpt-002500`` (``list_checkpoints`` finds those), or ``best-002500``."""
    return f"{prefix}{int(step):06d}"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints (JSON present) in ``folder``, oldest first, as JSON paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name)))
    return [p for _, p in found]


def latest_valid_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint whose tensor file matches its recorded hash; corrupt ones are skipped."""
    return next((p for p in reversed(list_checkpoints(folder)) if is_complete(p)), None)


_MISSING = object()


def config_mismatch(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    sections: tuple[str, ...],
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Keys (``model.resolution``) whose values differ between two resolved configs, within ``sections``.

    ``defaults`` (a resolved default config): a key the stored config lacks (it predates the key) counts
    as its default value, so a run saved before a setting existed resumes while the setting keeps the
    behaviour it had then; set to anything else, it is a difference like any other.
    """
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str, d: Any = _MISSING) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            dm = d if isinstance(d, Mapping) else {}
            for key in sorted(set(a) | set(b)):
                sub_d = dm.get(key, _MISSING)
                av = a.get(key, sub_d if sub_d is not _MISSING else None)
                walk(av, b.get(key), f"{prefix}.{key}" if prefix else key, sub_d)
        elif a != b and not (isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)):
            diffs.append(f"{prefix}: checkpoint {a!r} != config {b!r}")

    for section in sections:
        walk(stored.get(section, {}), current.get(section, {}), section, (defaults or {}).get(section, _MISSING))
    return diffs
