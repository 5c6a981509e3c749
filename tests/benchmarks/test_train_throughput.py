"""benchmarks/train_throughput.py --baseline: the working tree against a git revision, one process per tree."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the project's git checkout"
)


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--widths", "cpu", "--resolutions", "8",
         "--batch", "4", "--threads", "1", "--peak-n", "256", *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


def _worktrees() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout


@pytest.mark.slow  # 8 Python processes, each importing torch and building a trainer: 1-4 minutes
def test_baseline_times_both_trees_and_compares_their_weights() -> None:
    before = _worktrees()
    proc = _bench("--baseline", "HEAD", "--repeats", "2", "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(ln for ln in proc.stdout.splitlines() if re.match(r"\s+8\s+cpu\s+4\s", ln))
    base, cur, ratio, lo, hi = (float(v) for v in re.findall(r"\d+\.\d+", row)[:5])
    assert base > 0 and cur > 0 and lo <= ratio <= hi
    assert abs(ratio - cur / base) < 0.5 * ratio  # the median ratio is of the same order as the medians' ratio
    found = re.search(r"(\d\.\de[+-]\d\d), rel (\d\.\de[+-]\d\d|nan)\s*$", row)
    assert found, row  # the weights of both trees were compared: max difference, relative update difference
    if not subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "retinagen"],
                          capture_output=True, text=True).stdout.strip():
        # HEAD and a clean working tree compute the same step
        assert float(found.group(1)) == 0.0 and float(found.group(2)) == 0.0
    assert "2 repeats" in proc.stdout
    assert _worktrees() == before  # the temporary worktree is gone


def test_a_revision_that_does_not_exist_is_an_error_and_leaves_no_worktree() -> None:
    before = _worktrees()
    proc = _bench("--baseline", "no-such-revision-xyz", "--repeats", "1", "--steps", "1")
    assert proc.returncode == 2 and "not a git revision" in proc.stderr, proc.stderr[-2000:]
    assert _worktrees() == before


def test_set_ab_times_a_setting_against_the_defaults_and_refuses_a_bad_key() -> None:
    proc = _bench("--set-ab", "train.reuse_fakes=true", "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(ln for ln in proc.stdout.splitlines() if re.match(r"\s+8\s+cpu\s+4\s", ln))
    eager, other, ratio, lo, hi = (float(v) for v in re.findall(r"\d+\.\d+", row)[:5])
    assert eager > 0 and other > 0 and lo <= ratio <= hi and "with --set-ab" in proc.stdout
    bad = _bench("--set-ab", "train.no_such_key=1")
    assert bad.returncode == 2 and "--set-ab" in bad.stderr and "no_such_key" in bad.stderr
