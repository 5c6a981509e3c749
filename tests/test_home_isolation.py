"""No test reads or writes the real home folder: per-user caches and state point into a temporary one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import HOME_VARIABLES, REAL_HOME_VARIABLE

REAL_HOME = Path(os.environ[REAL_HOME_VARIABLE])


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def test_every_per_user_folder_the_product_uses_is_outside_the_real_home() -> None:
    import torch

    from retinagen import dashboard_api as api
    from retinagen.metrics.extractors import _hub_checkpoints_dir
    from retinagen.metrics.fid import default_stats_cache_dir

    fake = Path(os.environ["HOME"])
    assert not _inside(fake, REAL_HOME) and fake.name.startswith("retinagen-test-home-")
    for name in HOME_VARIABLES:
        assert _inside(Path(os.environ[name]), fake), name
    used = {
        "real-data statistics cache": default_stats_cache_dir(),
        "Inception weights (torch hub)": Path(_hub_checkpoints_dir()),
        "torch hub": Path(torch.hub.get_dir()),
        "dashboard state": api.state_dir_for(Path("/nonexistent-run"), "0" * 64, os.environ, in_run_folder=False),
    }
    for what, path in used.items():
        assert _inside(path, fake) and not _inside(path, REAL_HOME), (what, path)


def test_a_process_a_test_starts_sees_the_same_home() -> None:
    code = "from pathlib import Path; from retinagen.metrics.fid import default_stats_cache_dir; print(default_stats_cache_dir())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert _inside(Path(out), Path(os.environ["HOME"])) and not _inside(Path(out), REAL_HOME), out


def test_no_retinagen_path_variable_of_the_developer_reaches_the_tests() -> None:
    assert [n for n in os.environ if n.startswith("RETINAGEN_") and n != REAL_HOME_VARIABLE] == []
