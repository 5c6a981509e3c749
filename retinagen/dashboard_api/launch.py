"""How the dashboard is started: its arguments (``--run``, ``--data``, environment) and the Streamlit command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from retinagen.checks import check, int_in
from retinagen.errors import RetinagenError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
RUN_ENV = "RETINAGEN_DASHBOARD_RUN"  # the run folder when the app is started without --run
DATA_ENV = "RETINAGEN_DASHBOARD_DATA"  # extra dataset ZIPs for the Rebalance page (os.pathsep-separated)
STATE_ENV = "RETINAGEN_DASHBOARD_STATE"  # where to write when the run folder is read-only (or always, if set)


@dataclass(frozen=True)
class AppArgs:
    """What the app was started with: the run folder (None = shipped model) and extra dataset ZIPs."""

    run: Path | None
    data: tuple[Path, ...] = ()


def parse_app_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AppArgs:
    """``--run RUN`` and ``--data ZIP`` (repeatable) after ``streamlit run apps/dashboard.py --``.

    Unknown arguments are ignored (under a test runner ``sys.argv`` is the runner's). Without ``--run``, the
    ``RETINAGEN_DASHBOARD_RUN`` environment variable, else None (the shipped model). Paths come only from
    the command line or environment of the server process, never from the browser.
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--data", type=Path, action="append", default=[])
    args, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    run = args.run or (Path(env[RUN_ENV]) if env.get(RUN_ENV) else None)
    data = list(args.data)
    if env.get(DATA_ENV):
        data += [Path(p) for p in env[DATA_ENV].split(os.pathsep) if p]
    return AppArgs(run, tuple(data))


def app_path() -> Path:
    """The dashboard's Streamlit script, ``apps/dashboard.py`` of the installed package.

    Found without importing ``apps`` (the UI layer sits above this module and imports it)."""
    import importlib.util

    spec = importlib.util.find_spec("apps")
    origin = spec.origin if spec is not None else None
    path = Path(origin).resolve().parent / "dashboard.py" if origin else Path("apps") / "dashboard.py"
    if not path.is_file():
        raise RetinagenError(f"{path}: the dashboard app is missing; reinstall retinagen from a full checkout")
    return path


def streamlit_command(
    run: Path | None, *, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, data: Sequence[Path] = (),
    max_upload_mb: int = 20,
) -> list[str]:
    """The ``python -m streamlit run apps/dashboard.py ...`` command line `retinagen dashboard` starts.

    Headless (no browser opened by the server), bound to ``host`` (localhost by default: the dashboard has no
    login, so exposing it is an explicit choice), no usage statistics (the machines may be offline), no file
    watcher, uploads capped at ``max_upload_mb`` by the server as well as by `retinagen.data.uploads`, no
    full garbage collection after every rerun (it alone costs ~300 ms per widget change with torch loaded).
    """
    port = check(int_in(1, 65535), port, "--port", RetinagenError)
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.headless", "true",
        "--server.address", host,
        "--server.port", str(port),
        "--server.maxUploadSize", str(max_upload_mb),
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",  # no "Deploy" or developer menu for clinicians
        # Streamlit runs gc.collect(2) after every rerun; with torch, sklearn and pandas loaded that takes ~300 ms
        # on a CPU and delays the next slider change by as much. Python's own generational GC still runs.
        "--runner.postScriptGC", "false",
        "--",
    ]
    if run is not None:
        cmd += ["--run", str(run)]
    for d in data:
        cmd += ["--data", str(d)]
    return cmd
