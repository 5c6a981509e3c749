"""benchmarks/quality.py's table: one row per scored checkpoint, grade groups beside the per-grade fidelity."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402


def _row(**extra: object) -> dict:
    return {"label": "a", "msi": "MSI(S=1, β=1, d=0)", "kimg": 24.0, "train_seconds": 600.0, "fd_fundus": 9.04,
            "precision": 0.2, "recall": 0.05, "L_info_discrete": 3.7, "H_discrete": 5.95, **extra}


def test_group_fidelity_columns_follow_the_per_grade_ones() -> None:
    row = _row(fidelity={"0": 0.5, "3": 0.05}, group_fidelity={"0-1": 0.9, "3-4": 0.018}, referable_agreement=0.4,
               grade_shift=13.23)
    head, _, body = quality.table([row]).splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    cells = [c.strip() for c in body.strip("|").split("|")]
    assert cols[7:13] == ["fidelity g0", "fidelity g3", "group 0-1", "group 3-4", "referable agr.", "grade shift"]
    assert cells[7:13] == ["0.500", "0.050", "0.900", "0.018", "0.400", "13.2"]


def test_an_unconditional_model_has_no_grade_columns() -> None:
    head = quality.table([_row()]).splitlines()[0]
    assert "fidelity" not in head and "group" not in head and "referable" not in head
