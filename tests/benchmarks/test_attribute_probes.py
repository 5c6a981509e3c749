"""benchmarks/attribute_probes.py: each probe's Spearman rho with the synthetic ground truth, per seed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import attribute_probes  # noqa: E402


def test_prints_one_row_per_seed_and_the_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert attribute_probes.main(["--n", "40", "--seeds", "0,1", "--resolutions", "64"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if re.match(r"\s*64\s+\d\s", ln)]
    assert [r[1] for r in rows] == ["0", "1"] and all(len(r) == 2 + 6 + 1 for r in rows)
    rho = {name: float(v) for name, v in zip(attribute_probes.ATTRIBUTES, rows[0][2:8], strict=True)}
    assert rho["fov_area"] > 0.95 and rho["glare"] > 0.8  # the probes follow their factors even on 40 images
    span = next(ln for ln in out.splitlines() if re.match(r"\s*64\s+all\s", ln))
    assert len(re.findall(r"-?\d\.\d\d--?\d\.\d\d", span)) == 6
    with pytest.raises(SystemExit):
        attribute_probes.main(["--n", "2"])
