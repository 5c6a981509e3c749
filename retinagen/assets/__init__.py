"""Files shipped inside the package: the ready-to-use model the dashboard and `generate` open after install.

``shipped/`` is laid out like a run folder (``config.json``, ``checkpoints/``, ``factors.json``,
``anomaly/scorer.*``, ``metrics.jsonl``, ``samples/``) so every command that takes ``--checkpoint RUN``
or ``--run RUN`` reads it unchanged. How it was made is in ``shipped/RECIPE.md`` and the README.
"""

from __future__ import annotations

from pathlib import Path

from retinagen.errors import RetinagenError
from retinagen.run_dir import RunDir


def shipped_run_dir() -> Path:
    """The shipped model's run folder (read-only: the package may be installed system-wide)."""
    path = Path(__file__).resolve().parent / "shipped"
    if not RunDir(path).checkpoints.is_dir():
        raise RetinagenError(
            f"the shipped model is missing from {path}: reinstall retinagen (pip install -e .) from a full checkout"
        )
    return path
