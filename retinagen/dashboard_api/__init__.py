"""What the Streamlit dashboard (``apps/dashboard.py``) calls: every computation behind its pages.

One module per page (``controls_page``, ``rebalance_page``, ``anomaly_page``, ``training_page``), the run
it shows (``run``) and how it is started (``launch``); this package re-exports their public names.

The dashboard holds no model logic; it draws widgets and calls these functions, which call the library
(`retinagen.generation`, `retinagen.metrics`, `clinical.*`). Each is usable (and tested) without Streamlit.

    run = load_run("runs/cpu")                                 # model + factor map + anomaly scorer + files
    img = render_image(run.model, seed=0, grade=2, codes={4: 0.8})        # uint8 [R, R, 3], a few ms at 32 px
    grid, values = traversal_sheet(run.model, seed=0, grade=2, codes={}, factor=4, steps=7, samples=4)
    result = analyse_upload(run, uploaded_bytes)               # FOV, preprocessed image, score, heat map
    job = RebalanceJob.start(run, dataset, "uniform"); job.progress()   # background rebalance, polled

Run folders
    ``load_run`` takes a run folder (``config.json``, ``checkpoints/``, optionally ``factors.json``,
    ``anomaly/scorer.{json,safetensors}``, ``metrics.jsonl``, ``samples/``, evaluation reports, ``data/*.zip``)
    or a checkpoint file; None means the shipped model (`retinagen.assets.shipped_run_dir`). What the
    dashboard writes (the review database, rebalanced sets) goes to `DashboardRun.state_dir`: the run folder
    when it is writable, else (and always for the shipped model, which lives inside the package) a per-user
    folder keyed by the checkpoint's sha256, ``~/.local/state/retinagen/dashboard/<sha256[:16]>``, or
    ``$RETINAGEN_DASHBOARD_STATE/<sha256[:16]>`` when that variable is set.

Sharing between sessions
    A `DashboardRun` is shared by every browser session (the app caches it per run folder and checkpoint
    sha256). Generation only reads the networks. Feature extraction for anomaly scoring switches D's
    minibatch-stddev group size for the duration of a call (`clinical.anomaly.per_image_statistics`), so it
    runs under ``DashboardRun.lock``; uploads and their results are never stored in a shared object.
"""

from __future__ import annotations

from retinagen.dashboard_api.anomaly_page import (
    HEATMAP_METHODS,
    UploadAnalysis,
    analyse_upload,
    heatmap_overlay,
    occlusion_heatmap,
)
from retinagen.dashboard_api.controls_page import (
    REVIEW_DIR,
    CodeControl,
    code_controls,
    dicom_bytes,
    measure_latency,
    render_image,
    review_store,
    review_strip_paths,
    seed_code_values,
    start_review_set,
    traversal_sheet,
    upscale,
)
from retinagen.dashboard_api.launch import (
    DATA_ENV,
    DEFAULT_HOST,
    DEFAULT_PORT,
    RUN_ENV,
    STATE_ENV,
    AppArgs,
    app_path,
    parse_app_args,
    streamlit_command,
)
from retinagen.dashboard_api.rebalance_page import (
    MAX_DASHBOARD_REBALANCE,
    REBALANCE_DIR,
    RebalanceJob,
    gate_table,
    grade_histogram,
    rebalance_plan,
    rebalance_target,
)
from retinagen.dashboard_api.run import (
    SCORER_STEM,
    DashboardRun,
    attribute_label,
    checkpoint_key,
    load_run,
    resolve_run_dir,
    state_dir_for,
)
from retinagen.dashboard_api.training_page import (
    INFO_KEYS,
    LOSS_KEYS,
    MAX_REPORTS,
    QUALITY_FD_KEY,
    QUALITY_SHARE_KEYS,
    find_reports,
    read_metrics,
    read_png,
    report_tables,
    sample_grids,
)
from retinagen.dr_scale import GRADE_NAMES, grade_label  # the pages call api.grade_label

__all__ = [
    "DATA_ENV",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "GRADE_NAMES",
    "HEATMAP_METHODS",
    "INFO_KEYS",
    "LOSS_KEYS",
    "MAX_DASHBOARD_REBALANCE",
    "MAX_REPORTS",
    "QUALITY_FD_KEY",
    "QUALITY_SHARE_KEYS",
    "REBALANCE_DIR",
    "REVIEW_DIR",
    "RUN_ENV",
    "SCORER_STEM",
    "STATE_ENV",
    "AppArgs",
    "CodeControl",
    "DashboardRun",
    "RebalanceJob",
    "UploadAnalysis",
    "analyse_upload",
    "app_path",
    "attribute_label",
    "checkpoint_key",
    "code_controls",
    "dicom_bytes",
    "find_reports",
    "gate_table",
    "grade_histogram",
    "grade_label",
    "heatmap_overlay",
    "load_run",
    "measure_latency",
    "occlusion_heatmap",
    "parse_app_args",
    "read_metrics",
    "read_png",
    "rebalance_plan",
    "rebalance_target",
    "render_image",
    "report_tables",
    "resolve_run_dir",
    "review_store",
    "review_strip_paths",
    "sample_grids",
    "seed_code_values",
    "start_review_set",
    "state_dir_for",
    "streamlit_command",
    "traversal_sheet",
    "upscale",
]
