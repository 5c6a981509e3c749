"""What every dashboard page shares: the loaded run (cached for all sessions) and small display helpers.

No model logic here: loading, generation and scoring are `retinagen.dashboard_api` functions.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from retinagen import dashboard_api as api
from retinagen.errors import RetinagenError

# Page files, relative to apps/dashboard.py, with their titles and URL paths (the URL path is the file stem,
# so `AppTest.switch_page("views/<stem>.py")` and a browser's /<stem> open the same page). The folder is not
# called pages/: Streamlit treats a pages/ folder beside the main script as an old-style multipage app, and a
# link straight to /anomaly would then run the page without the main script (no run summary, wrong menu).
PAGES = (
    ("views/controls.py", "Controls", ":material/tune:"),
    ("views/review.py", "Review", ":material/fact_check:"),
    ("views/rebalance.py", "Rebalance", ":material/balance:"),
    ("views/anomaly.py", "Anomaly", ":material/troubleshoot:"),
    ("views/training.py", "Training & metrics", ":material/monitoring:"),
)


@st.cache_resource(show_spinner="Loading the model ...", max_entries=4)
def _load(run: str | None, checkpoint_key: str, data: tuple[str, ...]) -> api.DashboardRun:
    """One `DashboardRun` per (run argument, checkpoint sha256, datasets), shared by every session.

    ``checkpoint_key`` is part of the cache key only: a new checkpoint in the run folder loads a new model.
    """
    del checkpoint_key
    return api.load_run(run, data=[Path(d) for d in data])


def require_upload_limit() -> None:
    """Stop the app when the server would accept uploads over the dashboard's limit (UP-1).

    Streamlit holds an upload in memory before the app sees it, so the app's own byte check alone would let a
    server started with a looser ``server.maxUploadSize`` (Streamlit's default is 200 MB) take in far more.
    """
    from retinagen.data.uploads import MAX_UPLOAD_BYTES

    limit_mb = MAX_UPLOAD_BYTES // (1024 * 1024)
    server_mb = st.get_option("server.maxUploadSize")
    if server_mb > limit_mb:
        st.error(f"This server accepts uploads of up to {server_mb} MB; the dashboard allows {limit_mb} MB. "
                 f"Start it with `retinagen dashboard`, or with `streamlit run apps/dashboard.py "
                 f"--server.maxUploadSize {limit_mb}` (the repository's .streamlit/config.toml sets it when "
                 "started from the repository's folder).")
        st.stop()


def get_run() -> api.DashboardRun:
    """The run this server was started on (command line / environment only, never the browser).

    Shows the error and stops the page when the run cannot be opened.
    """
    args = api.parse_app_args()
    try:
        run_dir = api.resolve_run_dir(args.run)
        return _load(None if args.run is None else str(args.run), api.checkpoint_key(run_dir),
                     tuple(str(d) for d in args.data))
    except RetinagenError as exc:
        st.error(f"The run cannot be opened: {exc}")
        st.stop()
        raise  # unreachable: st.stop() ends the script run


def show_image(img, caption: str | None = None, *, size: int = 384, method: str = "nearest") -> None:
    """A small model image, scaled up so it is visible (nearest keeps its pixels honest)."""
    st.image(api.upscale(img, size, method), caption=caption)


def grade_options(run: api.DashboardRun) -> list[int]:
    return list(range(run.model.num_classes))
