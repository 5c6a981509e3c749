"""``retinagen dashboard``: the Streamlit review app."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from retinagen.cli.app import (
    app,
)
from retinagen.errors import RetinagenError
from retinagen.options import (
    Checkpoint,
    DatasetZip,
    Port,
    Text,
)


@app.command()
def dashboard(
    run: Annotated[Checkpoint | None, typer.Option(help="Run folder or checkpoint (default: the shipped model).")] = None,
    port: Annotated[Port, typer.Option(help="Port to serve on.")] = 8501,
    host: Annotated[
        Text, typer.Option(help="Address to bind. The default keeps it on this machine: the dashboard has no login.")
    ] = "127.0.0.1",
    data: Annotated[
        list[DatasetZip] | None, typer.Option(help="Prepared dataset ZIP for the Rebalance page (repeatable).")
    ] = None,
) -> None:
    """Serve the Streamlit dashboard (Controls, Review, Rebalance, Anomaly, Training & metrics); Ctrl+C stops it."""
    import importlib.util
    import subprocess

    from retinagen.dashboard_api import resolve_run_dir, streamlit_command
    from retinagen.errors import BadInputError

    if importlib.util.find_spec("streamlit") is None:
        raise RetinagenError("the dashboard needs Streamlit, which is not installed: pip install streamlit")
    run_dir = resolve_run_dir(run)  # a bad --run fails here, with its reason, before a server starts
    for d in data or []:
        if not d.is_file():
            raise BadInputError(d, "dataset ZIP not found")
    cmd = streamlit_command(None if run is None else run.resolve(), port=port, host=host,
                            data=[d.resolve() for d in data or []])
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    typer.echo(f"retinagen dashboard: {run_dir} on {url}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach it can use the dashboard (no login)", err=True)
    if os.name == "posix":
        # The server replaces this process, so a SIGTERM from a supervisor (or Ctrl+C) reaches it directly and no
        # orphaned server is left behind.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)
    try:
        code = subprocess.call(cmd)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code=code)
