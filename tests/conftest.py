"""Shared fixtures: a tiny prepared synthetic fundus dataset, built once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REAL_HOME_VARIABLE = "RETINAGEN_TEST_REAL_HOME"  # the user's real home, kept for tests/test_home_isolation.py
# Where a program keeps per-user files: every test (and every process a test starts) gets a fresh folder
# for each, so no test reads a developer's caches (statistics, Inception weights, dashboard state) or
# writes into them.
HOME_VARIABLES = ("HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
                  "TORCH_HOME", "MPLCONFIGDIR")
_fake_home: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Point HOME and the per-user cache/state/config variables at a temporary folder for the whole session.

    Set before any test module is imported, so a path computed at import time is covered too."""
    os.environ.setdefault(REAL_HOME_VARIABLE, str(Path.home()))
    home = Path(tempfile.mkdtemp(prefix="retinagen-test-home-"))
    _fake_home.append(str(home))
    for name in HOME_VARIABLES:
        target = home if name == "HOME" else home / name.lower()
        target.mkdir(exist_ok=True)
        os.environ[name] = str(target)
    # A developer's own settings of the product's path variables (weights, encoder, dashboard run) stay out too.
    for name in [n for n in os.environ if n.startswith("RETINAGEN_") and n != REAL_HOME_VARIABLE]:
        del os.environ[name]
    _share_the_cores()


def _share_the_cores() -> None:
    """In a pytest-xdist worker: this worker's share of the cores as its torch (OpenMP) threads, for itself and
    for every process its tests start. Without it each of N workers runs as many threads as there are cores and
    the oversubscribed cores make the whole run slower than one process (2 workers x 2 threads on 2 cores: 354 s
    against ~260-280 s in one process; 2 x 1 on another machine of that kind: 259 s against 359 s)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    import cv2
    import torch

    torch.set_num_threads(int(threads))
    cv2.setNumThreads(int(threads))  # OpenCV's own thread pool ignores OMP_NUM_THREADS


# The test files that take longest, longest first (per-file sums of `--durations=0` on a default run). Under
# `--dist loadfile --no-loadscope-reorder` (pyproject's addopts) pytest-xdist hands out whole files in collection
# order, the next one to whichever worker is nearly done, so starting with the longest keeps every worker busy to
# the end instead of one finishing the DDP or browser file while the other waits. Files not named keep their
# order after these. tests/test_suite_order.py checks that every name here is still a file.
LONGEST_FIRST = (
    "tests/retinagen/training/test_distributed.py",
    "tests/apps/test_browser.py",
    "tests/retinagen/metrics/test_judges_validation.py",
    "tests/retinagen/training/test_loop.py",
    "tests/apps/test_dashboard.py",
    "tests/retinagen/data/test_fov_sweep.py",
    "tests/retinagen/metrics/test_judges.py",
    "tests/retinagen/training/test_compile.py",
    "tests/benchmarks/test_train_throughput.py",
    "tests/clinical/test_rebalance.py",
    "tests/retinagen/test_fuzz.py",
    "tests/retinagen/data/test_fundus.py",
    "tests/retinagen/training/test_losses.py",
    "tests/retinagen/test_faults.py",
    "tests/retinagen/metrics/test_fid.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the files of LONGEST_FIRST first, in that order; a stable sort keeps every file's own test order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_unconfigure(config: pytest.Config) -> None:
    for home in _fake_home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_zip_16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 synthetic fundus images at 16 px, prepared into a ZIP (labels: DR grades)."""
    from retinagen.data.prepare import prepare_dataset
    from retinagen.data.synthetic import write_synth_dataset

    root = tmp_path_factory.mktemp("synth16")
    write_synth_dataset(root / "raw", n=64, resolution=32, seed=3, workers=1, progress=False)
    out = root / "synth16.zip"
    prepare_dataset("eyepacs", root / "raw", 16, out, workers=1, progress=False)
    return out


# The judges' smallest useful spec: 16 px, seconds to build (tests of building, loading and scoring).
TINY_JUDGES = {"resolution": 16, "n_train": 160, "n_reference": 96, "epochs": 1, "min_steps": 10}


@pytest.fixture(scope="session")
def tiny_judges_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The judges of the TINY_JUDGES spec, built once per test run (read-only: copy before changing a file).

    Under pytest-xdist the first worker to ask builds them in the run's shared temporary folder and the others
    wait for it on a file lock (the build is deterministic, so which worker builds does not matter)."""
    import fcntl

    import torch

    from retinagen.metrics.judges import JudgeSpec, build_judges

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, shared by its workers (pytest-NNN/popen-gwK -> pytest-NNN)
    target = root / "tiny_judges" / "judges"
    with open(root / "tiny_judges.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "judges.json").is_file():
            return target
        before = torch.get_num_threads()
        torch.set_num_threads(2)  # the build is deterministic for a given thread count; tests rebuild with 2
        try:
            return build_judges(JudgeSpec(**TINY_JUDGES), target, progress=False)
        finally:
            torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_run_master(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke-preset run trained once per session on `synth_zip_16` (read-only: tests that write into a run
    use a copy, `shutil.copytree(smoke_run_master, ...)`)."""
    from retinagen.config import load_run_config, parse_overrides
    from retinagen.training.loop import train

    cfg = load_run_config("synthfundus", preset="smoke", overrides=parse_overrides([f"data.path={synth_zip_16}"]))
    run = tmp_path_factory.mktemp("smoke_master") / "run"
    train(cfg, run, progress=False)
    return run
