"""The GPU check script's own logic, on a CPU machine: its steps run under a limit, each step's exit
status is logged, a failed step does not stop the ones after it, and the script's exit status counts them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_a_failed_step_is_logged_counted_and_does_not_stop_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "gpu.log"
    env = {**os.environ, "PYTHON": sys.executable, "ONLY": "generate-throughput-256 environment"}
    proc = subprocess.run(["bash", str(SCRIPT), str(log), str(tmp_path / "work")], capture_output=True, text=True,
                          env=env, cwd=SCRIPT.parents[1], timeout=120)
    text = log.read_text()
    # Without CUDA the generation benchmark refuses (argparse: exit 2); the environment step may pass or not.
    assert "=== generate-throughput-256: exit 2" in text, text[-2000:]
    assert "--device cuda: CUDA is not available" in text
    assert "=== pytest-gpu: skipped (not in ONLY)" in text and "=== done:" in text
    failed = int(text.rsplit("=== done: ", 1)[1].split()[0])
    assert proc.returncode == failed >= 1
