"""What the Streamlit dashboard (``apps/dashboard.py``) calls: every computation behind its pages.

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

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from retinagen.dr_scale import GRADE_NAMES, grade_label  # re-exported: the pages call api.grade_label
from retinagen.errors import BadInputError, NoFundusError, RetinagenError
from retinagen.generation import (
    LoadedModel,
    find_factor_map,
    generate_images,
    image_seed,
    load_model,
    resolve_checkpoint,
    run_folder_of,
    run_generator,
    sample_latents,
    traversal_values,
)
from retinagen.metrics.registry import METRICS
from retinagen.training.checkpoint import list_checkpoints

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

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
RUN_ENV = "RETINAGEN_DASHBOARD_RUN"  # the run folder when the app is started without --run
DATA_ENV = "RETINAGEN_DASHBOARD_DATA"  # extra dataset ZIPs for the Rebalance page (os.pathsep-separated)
STATE_ENV = "RETINAGEN_DASHBOARD_STATE"  # where to write when the run folder is read-only (or always, if set)
SCORER_STEM = Path("anomaly") / "scorer"
REBALANCE_DIR = "dashboard_rebalance"
REVIEW_DIR = "reviews"
# A browser request may not start an arbitrarily large job; bigger rebalances belong to `retinagen rebalance`.
MAX_DASHBOARD_REBALANCE = 5000
MAX_REPORTS = 50

_ATTRIBUTE_DISPLAY = {
    "pigmentation": "pigmentation (melanin)",
    "fov_area": "field of view",
    "vessel_contrast": "vessel contrast",
    "vessel_density": "vessel density",
    "lesion_load": "lesion load",
    "dr_grade": "DR grade",
}


def attribute_label(attribute: str) -> str:
    """A display name for a factor-map attribute (``fov_area`` -> ``field of view``)."""
    return _ATTRIBUTE_DISPLAY.get(attribute, attribute.replace("_", " "))


# ===================================================================================== app arguments
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
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RetinagenError(f"--port must be an integer in 1..65535, got {port!r}")
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


# ========================================================================================= the run
def resolve_run_dir(run: str | Path | None) -> Path:
    """The run folder to open: ``run`` (a run folder, or a checkpoint file inside one), or the shipped model.

    Cheap (no hashing): the checkpoint itself is verified by `load_run`. Raises `BadInputError` naming the path
    when it does not exist or holds no checkpoint.
    """
    if run is None:
        from retinagen.assets import shipped_run_dir

        return shipped_run_dir()
    p = Path(run).expanduser()
    if p.is_file():
        ck = resolve_checkpoint(p)
        return run_folder_of(ck) or ck.parent
    if not p.is_dir():
        raise BadInputError(p, "run folder not found")
    if not (list_checkpoints(p / "checkpoints") or list_checkpoints(p)):
        raise BadInputError(p, "no checkpoint in this run folder (expected checkpoints/ckpt-*.safetensors + .json)")
    return p


def checkpoint_key(run_dir: str | Path) -> str:
    """A cheap identity of a run's newest checkpoint, for caching: the sha256 its JSON records.

    Reads one small JSON (no hashing of the tensor file); falls back to the file's size and mtime. The model
    loaded under this key is still verified in full by `load_model`.
    """
    run_dir = Path(run_dir)
    metas = list_checkpoints(run_dir / "checkpoints") or list_checkpoints(run_dir)
    if not metas:
        return "none"
    newest = metas[-1]
    try:
        sha = json.loads(newest.read_text(encoding="utf-8")).get("tensors_sha256")
        if isinstance(sha, str) and sha:
            return sha
    except (OSError, ValueError):
        pass
    st = newest.stat()
    return f"{newest.name}:{st.st_size}:{st.st_mtime_ns}"


@dataclass
class DashboardRun:
    """A loaded run, shared by all sessions. ``*_error`` say why an optional part could not be used."""

    folder: Path
    model: LoadedModel
    state_dir: Path
    factor_map: dict[str, Any] | None = None
    factor_map_path: Path | None = None
    factor_map_error: str | None = None
    scorer: Any = None  # clinical.anomaly.AnomalyScorer
    scorer_path: Path | None = None
    scorer_error: str | None = None
    datasets: list[Path] = field(default_factory=list)
    graders: list[Path] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def conditional(self) -> bool:
        return self.model.num_classes > 0

    def code_attribute(self, index: int) -> str | None:
        """The attribute the factor map assigns to code ``index`` (None when unassigned or no map)."""
        if self.factor_map is None:
            return None
        entry = self.factor_map.get("codes", {}).get(self.model.spec.code_names[index], {})
        attr = entry.get("attribute") if isinstance(entry, dict) else None
        return attr if isinstance(attr, str) else None

    def code_label(self, index: int) -> str:
        """``c4 · pigmentation (melanin)`` when the map names the code, else ``c4``."""
        name = self.model.spec.code_names[index]
        attr = self.code_attribute(index)
        return f"{name} · {attribute_label(attr)}" if attr else name


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def state_dir_for(run_dir: Path, sha256: str, environ: Mapping[str, str] | None = None, *,
                  in_run_folder: bool = True) -> Path:
    """Where the dashboard writes for this run (module docstring); created on first use by the writer.

    ``in_run_folder=False`` (the shipped model) never writes into the run folder, even a writable one: in an
    editable install that folder is part of the source tree.
    """
    env = os.environ if environ is None else environ
    if env.get(STATE_ENV):
        return Path(env[STATE_ENV]).expanduser() / sha256[:16]
    if in_run_folder and _writable_dir(run_dir):
        return run_dir
    base = Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "retinagen" / "dashboard" / sha256[:16]


def _find_datasets(run_dir: Path, model: LoadedModel, extra: Sequence[Path]) -> list[Path]:
    """Dataset ZIPs the Rebalance page may use: RUN/data/*.zip, the run config's data.path, ``extra``."""
    cands = sorted((run_dir / "data").glob("*.zip")) if (run_dir / "data").is_dir() else []
    if model.cfg.data.path and str(model.cfg.data.path).endswith(".zip"):
        cands.append(Path(model.cfg.data.path))
    cands += [Path(p) for p in extra]
    out: list[Path] = []
    seen: set[Path] = set()
    for c in cands:
        try:
            r = c.resolve()
        except OSError:
            continue
        if r.is_file() and r not in seen:
            seen.add(r)
            out.append(r)
    return out


def _find_graders(run_dir: Path) -> list[Path]:
    """DR grader checkpoints in the run folder (``grader*.safetensors``, ``grader/*.safetensors``)."""
    found = sorted(run_dir.glob("grader*.safetensors")) + sorted((run_dir / "grader").glob("*.safetensors"))
    return [p for p in found if p.with_suffix(".json").is_file()]


def load_run(run: str | Path | None, *, data: Sequence[Path] = (), device: str = "cpu",
             environ: Mapping[str, str] | None = None) -> DashboardRun:
    """Load a run for the dashboard: model (G_ema + D/Q), factor map and anomaly scorer when present.

    A factor map or scorer that cannot be used (corrupt, fitted on another checkpoint) is reported in
    ``factor_map_error`` / ``scorer_error`` and the rest of the dashboard works without it.
    """
    run_dir = resolve_run_dir(run)
    # A checkpoint file given explicitly is loaded as given; a folder gives its newest complete checkpoint.
    target = Path(run) if run is not None and Path(run).is_file() else run_dir
    model = load_model(target, device, with_discriminator=True)
    out = DashboardRun(folder=run_dir, model=model,
                       state_dir=state_dir_for(run_dir, model.sha256, environ, in_run_folder=run is not None))
    try:
        found = find_factor_map(model)
        if found is not None:
            out.factor_map, out.factor_map_path = found
            sha = out.factor_map.get("checkpoint_sha256")
            if sha and sha != model.sha256:
                out.factor_map_error = (
                    f"{found[1].name} was discovered on another checkpoint (sha256 {str(sha)[:12]}...); its names "
                    "may not fit this model: rerun `retinagen discover`"
                )
    except RetinagenError as exc:
        out.factor_map_error = str(exc)
    scorer_json = run_dir / SCORER_STEM.with_suffix(".json")
    if scorer_json.is_file() and model.D is None:
        out.scorer_error = f"{model.path.name} holds no discriminator, which anomaly scoring needs"
    elif scorer_json.is_file():
        from clinical.anomaly import load_scorer

        try:
            out.scorer = load_scorer(scorer_json, model)
            out.scorer_path = scorer_json
        except RetinagenError as exc:
            out.scorer_error = str(exc)
    out.datasets = _find_datasets(run_dir, model, data)
    out.graders = _find_graders(run_dir)
    return out


# ================================================================================= controls page
@dataclass(frozen=True)
class CodeControl:
    """One latent code as a widget: kind "uniform" (slider in [-1, 1]), "bernoulli" (toggle) or
    "categorical" (select among ``classes``); ``label`` names the discovered attribute when there is one."""

    index: int
    name: str
    kind: str
    label: str
    attribute: str | None
    classes: int


def code_controls(run: DashboardRun) -> list[CodeControl]:
    """One `CodeControl` per latent code, in code order."""
    spec = run.model.spec
    out = []
    for i, (name, kind) in enumerate(zip(spec.code_names, spec.code_kinds, strict=True)):
        classes = spec.categorical[i] if kind == "categorical" else (2 if kind == "bernoulli" else 0)
        out.append(CodeControl(i, name, kind, run.code_label(i), run.code_attribute(i), classes))
    return out


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise RetinagenError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def seed_code_values(model: LoadedModel, seed: int, grade: int | None = None) -> dict[int, float]:
    """The code values of the seed's own latent sample (image 0 of ``generate_images(model, 1, seed)``)."""
    sample, _ = sample_latents(model, [image_seed(_check_seed(seed), 0)], grade)
    return {i: float(v) for i, v in enumerate(sample.values()[0].tolist())}


def render_image(model: LoadedModel, seed: int, grade: int | None = None,
                 codes: Mapping[int, float] | None = None) -> np.ndarray:
    """Image 0 of ``retinagen generate --seed SEED --grade G --set ...``: uint8 [R, R, 3].

    ``codes`` maps code index -> value (a class index, 0/1, or a number in [-1, 1]); unset codes keep the
    seed's own values. Raises `CodeValueError` (a `RetinagenError`) for a value out of range.
    """
    imgs, _ = generate_images(model, 1, _check_seed(seed), grade=grade, codes=codes)
    return imgs[0]


@torch.no_grad()
def traversal_sheet(model: LoadedModel, seed: int, grade: int | None, codes: Mapping[int, float] | None,
                    factor: int, *, steps: int = 7, samples: int = 4) -> tuple[np.ndarray, list[float]]:
    """A side-by-side traversal of one code: uint8 [S*R, V*R, 3] and the V code values (left to right).

    Row 0 is the image of `render_image` (the same seed, grade and ``codes``); rows 1..S-1 are images 1..S-1 of
    the same seed with their own codes. Every row sets code ``factor`` to each value of
    `retinagen.generation.traversal_values` (every class, 0/1, or ``steps`` values over [-1, 1]).
    """
    spec = model.spec
    idx = spec.code_index(factor)
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= 16:
        raise RetinagenError(f"samples must be an integer in 1..16, got {samples!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 15:
        raise RetinagenError(f"steps must be an integer in 2..15, got {steps!r}")
    seed = _check_seed(seed)
    sample, grades = sample_latents(model, [image_seed(seed, i) for i in range(samples)], grade)
    row0 = torch.zeros(samples, dtype=torch.bool)
    row0[0] = True
    for c, v in (codes or {}).items():
        current = sample.values()[:, c].to(torch.float64)
        sample = spec.with_code(sample, c, torch.where(row0, torch.tensor(float(v), dtype=torch.float64), current),
                                allow_extrapolation=True)
    values = traversal_values(spec, idx, steps)
    parts = [spec.with_code(sample, idx, v, allow_extrapolation=True) for v in values]
    # One generator call for the whole sheet: [V * S] latents, value-major.
    batch = type(sample)(
        spec,
        torch.cat([p.z_noise for p in parts]),
        torch.cat([p.cat for p in parts]),
        torch.cat([p.bern for p in parts]),
        torch.cat([p.unif for p in parts]),
    )
    g = None if grades is None else grades.repeat(len(values))
    imgs = run_generator(model, batch, g)
    r = model.resolution
    u8 = ((imgs.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sheet = u8.reshape(len(values), samples, r, r, 3).transpose(1, 2, 0, 3, 4).reshape(samples * r, len(values) * r, 3)
    return np.ascontiguousarray(sheet), list(values)


def upscale(img: np.ndarray, size: int, method: str = "nearest") -> np.ndarray:
    """uint8 [H, W, 3] scaled so its longer side is ``size`` px: "nearest" (pixels stay visible) or "bicubic"."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"img must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    interp = {"nearest": cv2.INTER_NEAREST, "bicubic": cv2.INTER_CUBIC}.get(method)
    if interp is None:
        raise ValueError(f"method must be 'nearest' or 'bicubic', got {method!r}")
    h, w = img.shape[:2]
    scale = size / max(h, w)
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)


def dicom_bytes(model: LoadedModel, img: np.ndarray, seed: int, grade: int | None,
                codes: Mapping[int, float]) -> bytes:
    """The image as a Secondary Capture DICOM file marked synthetic (`clinical.dicom_export.write_synthetic_dicom`).

    Records the model, checkpoint sha256, the image's own seed (``image_seed(seed, 0)``, as `retinagen generate
    --dicom` does), the grade and every code value; new UIDs, no patient data. Written to a private temporary
    folder that is removed before returning.
    """
    from clinical.dicom_export import write_synthetic_dicom

    values = seed_code_values(model, seed, grade)
    values.update({int(k): float(v) for k, v in codes.items()})
    names = model.spec.code_names
    folder = Path(tempfile.mkdtemp(prefix="retinagen-dicom-"))
    try:
        path = folder / "synthetic.dcm"
        write_synthetic_dicom(
            img, path, model_name=model.cfg.msi_name, checkpoint_sha256=model.sha256,
            seed=image_seed(_check_seed(seed), 0), grade=grade if model.num_classes else None,
            codes={names[i]: v for i, v in sorted(values.items())},
        )
        return path.read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure_latency(model: LoadedModel, *, n: int = 50, grade: int | None = None) -> dict[str, float]:
    """Median / p95 / max of `render_image` in ms over ``n`` changes of one slider (a uniform code when the
    model has one), after one warm-up call."""
    spec = model.spec
    idx = next((i for i, k in enumerate(spec.code_kinds) if k == "uniform"), None)
    if grade is None and model.num_classes:
        grade = 0
    render_image(model, 0, grade)
    times = []
    for j in range(n):
        codes = {} if idx is None else {idx: -1.0 + 2.0 * j / max(n - 1, 1)}
        t = time.perf_counter()
        render_image(model, 0, grade, codes)
        times.append(1000 * (time.perf_counter() - t))
    arr = np.asarray(times)
    return {"median_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95)), "max_ms": float(arr.max()),
            "n": float(n), "resolution": float(model.resolution)}


# ==================================================================================== review page
def review_store(run: DashboardRun) -> Any:
    """The run's review database (`retinagen.metrics.review_store.ReviewStore`) in its state folder."""
    from retinagen.metrics.review_store import DB_NAME, ReviewStore

    return ReviewStore(run.state_dir / DB_NAME)


def start_review_set(run: DashboardRun, code: int, *, n: int, steps: int, seed: int, grade: int | None,
                     reviewer: str) -> Any:
    """Write the strips of a new ACM review set (`retinagen.metrics.acm.write_review_set`) and record it.

    The strips go to ``STATE/reviews/set-<random>/``; the set is recorded only once they are all written, so
    every set in the database has its strips. Returns the `ReviewSet`.
    """
    from retinagen.metrics.acm import write_review_set
    from retinagen.metrics.review_store import check_reviewer

    who = check_reviewer(reviewer)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 200:
        raise RetinagenError(f"N must be an integer in 1..200, got {n!r}")
    seed = _check_seed(seed)
    store = review_store(run)
    rel = Path(REVIEW_DIR) / f"set-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    index = write_review_set(run.model, code, store.folder / rel, n=n, steps=steps, seed=seed, grade=grade,
                             progress=False)
    meta = json.loads(index.read_text(encoding="utf-8"))
    return store.create_set(
        code=run.model.spec.code_names[code], code_index=code, code_kind=run.model.spec.code_kinds[code], n=n,
        steps=int(meta["steps"]), seed=seed, grade=grade, values=meta["values"],
        checkpoint_sha256=run.model.sha256, folder=rel.as_posix(), created_by=who,
        attribute=run.code_attribute(code),
    )


def review_strip_paths(store: Any, review_set: Any) -> list[Path]:
    """The strip PNGs of a set, sample 0..n-1 (from its ``review.json``)."""
    from retinagen.metrics.acm import REVIEW_INDEX_NAME

    folder = store.set_folder(review_set)
    try:
        meta = json.loads((folder / REVIEW_INDEX_NAME).read_text(encoding="utf-8"))
        files = [folder / Path(s["file"]).name for s in sorted(meta["samples"], key=lambda s: s["index"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(folder, f"the review set's strips cannot be read ({type(exc).__name__})") from None
    return files


# ================================================================================= rebalance page
def grade_histogram(dataset: str | Path) -> tuple[list[int], str]:
    """Images per DR grade in the training split of a prepared ZIP (all images without splits), and the split.

    The same images `clinical.rebalance.rebalance` counts. Raises `BadInputError` for an unlabelled dataset.
    """
    from retinagen.data.dataset import ZipImageDataset, read_dataset_json

    dataset = Path(dataset)
    split = "train" if (read_dataset_json(dataset).get("splits") or {}) else None
    ds = ZipImageDataset(dataset, split=split)
    if ds.num_classes == 0:
        raise BadInputError(dataset, "the dataset has no DR grades; rebalancing needs a graded dataset")
    labels = ds.labels[ds.labels >= 0]
    return np.bincount(labels, minlength=ds.num_classes).astype(int).tolist(), split or "all"


def rebalance_target(kind: str, *, counts: Mapping[int, int] | None = None, ratio: float | None = None,
                     num_classes: int = 5) -> str:
    """The ``--target`` string of a dashboard choice, validated by `clinical.rebalance.parse_target`."""
    from clinical.rebalance import parse_target

    if kind == "uniform":
        text = "uniform"
    elif kind == "counts":
        text = "counts:" + ",".join(f"{int(g)}={int(n)}" for g, n in sorted((counts or {}).items()))
    elif kind == "ratio":
        text = f"ratio:{ratio!r}"
    else:
        raise RetinagenError(f"unknown target kind {kind!r}; expected uniform, counts or ratio")
    return parse_target(text, num_classes).canonical()


def rebalance_plan(real_counts: Sequence[int], target: str) -> list[int]:
    """Synthetic images per grade that ``target`` asks for (`clinical.rebalance.synthetic_counts`)."""
    from clinical.rebalance import parse_target, synthetic_counts

    return synthetic_counts(parse_target(target, len(real_counts)), real_counts)


class RebalanceJob:
    """`clinical.rebalance.rebalance` in a background thread, into a fresh folder under the run's state folder.

    ``progress()`` counts the synthetic PNGs written so far (each is written atomically when kept), so a page can
    poll it; ``result`` is the `RebalanceSummary` once done, ``error`` the message of a `RetinagenError`.
    """

    def __init__(self, out: Path, total: int, thread: threading.Thread) -> None:
        self.out = out
        self.total = total
        self._thread = thread
        self.result: Any = None
        self.error: str | None = None

    @classmethod
    def start(cls, run: DashboardRun, dataset: str | Path, target: str, *, seed: int = 0,
              grader: Path | None = None, gate_threshold: float = 0.5, copy_real: bool = False) -> RebalanceJob:
        """Check the request, then start. ``dataset`` must be one of ``run.datasets`` and ``grader`` one of
        ``run.graders`` (the browser picks from lists; it never types a path)."""
        from clinical.rebalance import rebalance

        dataset = Path(dataset).resolve()
        if dataset not in run.datasets:
            raise RetinagenError(f"{dataset.name}: not one of this run's datasets")
        if grader is not None and Path(grader) not in run.graders:
            raise RetinagenError(f"{Path(grader).name}: not one of this run's graders")
        if not run.conditional:
            raise RetinagenError(f"{run.model.path.name} is not DR-grade conditional; it cannot rebalance grades")
        real, _ = grade_histogram(dataset)
        need = rebalance_plan(real, target)
        if sum(need) > MAX_DASHBOARD_REBALANCE:
            raise RetinagenError(
                f"this target asks for {sum(need):,} synthetic images; the dashboard makes at most "
                f"{MAX_DASHBOARD_REBALANCE:,} per run: use `retinagen rebalance` for more"
            )
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = run.state_dir / REBALANCE_DIR / f"{stamp}-{uuid.uuid4().hex[:6]}"
        job: RebalanceJob

        def work() -> None:
            try:
                job.result = rebalance(run.model, dataset, out, target=target, seed=_check_seed(seed),
                                       grader=grader, gate_threshold=gate_threshold, copy_real=copy_real,
                                       progress=False)
            except RetinagenError as exc:
                job.error = str(exc)
            except OSError as exc:
                job.error = f"{out}: {exc.strerror or exc}"
            except Exception as exc:  # noqa: BLE001 - a bug must still end the job visibly, not look like success
                job.error = f"internal error ({type(exc).__name__}: {exc}); please report it"

        job = cls(out, sum(need), threading.Thread(target=work, name="retinagen-rebalance", daemon=True))
        job._thread.start()
        return job

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the job; True when it has finished."""
        self._thread.join(timeout)
        return self.done

    def progress(self) -> tuple[int, int]:
        """(synthetic images written so far, images requested)."""
        folder = self.out / "train"
        n = sum(1 for _ in folder.glob("synth_g*_*.png")) if folder.is_dir() else 0
        return min(n, self.total), self.total

    def report(self) -> dict[str, Any] | None:
        """The finished run's ``rebalance_report.json`` (None before)."""
        from clinical.rebalance import REPORT_FILE

        path = self.out / REPORT_FILE
        if not self.done or not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))


def gate_table(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-grade rows of a rebalance report: real, requested, generated, tries, rejected, rejection rate,
    shortfall, mean gate probability (None without a gate)."""
    rows = []
    for r in report.get("per_grade", []):
        rows.append({
            "grade": grade_label(int(r["grade"])), "real": r["real"], "requested": r["requested"],
            "generated": r["generated"], "tries": r["tries"], "rejected": r["rejected"],
            "rejection rate": r.get("rejection_rate"), "shortfall": r["shortfall"],
            "mean gate prob": r.get("mean_gate_prob"),
        })
    return rows


# =================================================================================== anomaly page
@dataclass
class UploadAnalysis:
    """What the Anomaly page shows for one upload (all arrays are uint8 RGB unless said otherwise).

    status: "ok" (scored, or preprocessed when the run has no scorer) or "no_fundus" (``reason`` says why).
    preview: the decoded upload, longer side <= 512 px, with the detected FOV circle drawn.
    prepared: [R, R, 3], what the scorer sees (crop, resize, mask). heatmap: float [g, g] >= 0, the score drop
    when each region is replaced by its smoothed surroundings (None when not computed); overlay: the heat map
    over ``prepared``.
    """

    kind: str
    status: str
    reason: str = ""
    preview: np.ndarray | None = None
    fov: Any = None
    prepared: np.ndarray | None = None
    score: float | None = None
    percentile: float | None = None
    flagged: bool | None = None
    threshold: float | None = None
    top_features: list[tuple[str, float]] = field(default_factory=list)
    heatmap: np.ndarray | None = None
    overlay: np.ndarray | None = None
    heatmap_note: str = ""


def _preview(pixels: np.ndarray, fov: Any, side: int = 512) -> np.ndarray:
    """uint8 RGB preview (longer side <= ``side``) of decoded pixels, with the FOV circle when given."""
    from retinagen.data.fundus import to_rgb_float

    rgb = (np.clip(to_rgb_float(pixels), 0, 1) * 255 + 0.5).astype(np.uint8)
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if fov is not None:
        centre = (round((fov.cx + 0.5) * scale - 0.5), round((fov.cy + 0.5) * scale - 0.5))
        cv2.circle(small, centre, max(1, round(fov.radius * scale)), (0, 255, 0), max(1, round(2 * max(small.shape) / 512)))
    return np.ascontiguousarray(small)


HEATMAP_METHODS = ("mahalanobis", "knn")  # feature-only scorers: one batch of occluded images is cheap


def occlusion_heatmap(run: DashboardRun, prepared: np.ndarray, grid: int = 4) -> np.ndarray:
    """Occlusion sensitivity of the anomaly score: float [grid, grid] >= 0.

    Each cell of the prepared image uint8 [R, R, 3] is replaced in turn by a strongly smoothed copy of the image
    (Gaussian, sigma R / 8, masked: what an unremarkable fundus would show there), and all grid^2 copies are
    scored in one batch. Cell value = max(0, score(image) - score(occluded copy)): how much of the score that
    region explains. Only for feature-only scorers (`HEATMAP_METHODS`); `RetinagenError` otherwise.
    """
    from clinical.anomaly import FeatureExtractor
    from retinagen.data.fundus import circular_mask, to_model_range

    scorer = run.scorer
    if scorer is None:
        raise RetinagenError("this run has no anomaly scorer")
    if scorer.method.name not in HEATMAP_METHODS:
        raise RetinagenError(f"no heat map for the {scorer.method.name} scorer (one inversion per region)")
    r = prepared.shape[0]
    if prepared.shape != (r, r, 3) or prepared.dtype != np.uint8:
        raise ValueError(f"prepared must be uint8 [R, R, 3], got {prepared.dtype} {prepared.shape}")
    if isinstance(grid, bool) or not isinstance(grid, int) or not 2 <= grid <= r:
        raise ValueError(f"grid must be an integer in 2..{r}, got {grid!r}")
    smooth = cv2.GaussianBlur(prepared.astype(np.float32), (0, 0), sigmaX=r / 8.0)
    smooth = (np.clip(smooth, 0, 255) + 0.5).astype(np.uint8) * circular_mask(r, r)[:, :, None].astype(np.uint8)
    edges = np.linspace(0, r, grid + 1).round().astype(int)
    copies = []
    for i in range(grid):
        for j in range(grid):
            c = prepared.copy()
            ys, xs = slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1])
            c[ys, xs] = smooth[ys, xs]
            copies.append(to_model_range(c))
    batch = torch.stack([to_model_range(prepared), *copies])
    with run.lock:
        scores = scorer.score_images(run.model, batch, extractor=FeatureExtractor(run.model)).score
    return np.maximum(scores[0] - scores[1:], 0.0).reshape(grid, grid)


def heatmap_overlay(prepared: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heat map [g, g] (scaled to its maximum) in the JET colour map over ``prepared`` uint8 [R, R, 3]."""
    r = prepared.shape[0]
    top = float(heat.max())
    norm = heat / top if top > 0 else np.zeros_like(heat)
    big = cv2.resize(norm.astype(np.float32), (r, r), interpolation=cv2.INTER_NEAREST)
    colour = cv2.cvtColor(cv2.applyColorMap((big * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (prepared.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha + 0.5).astype(np.uint8)


def analyse_upload(run: DashboardRun, upload: Any, *, heatmap_grid: int | None = 4) -> UploadAnalysis:
    """Check, decode, preprocess and score one upload (bytes or a binary file object).

    Raises `retinagen.data.uploads.UploadError` for a file that is not an acceptable, decodable PNG / JPEG /
    DICOM. A decodable image without a fundus is not an error: status "no_fundus" with the detector's reason.
    """
    from clinical.anomaly import FeatureExtractor
    from retinagen.data.fundus import detect_fov, preprocess_fundus, to_model_range
    from retinagen.data.uploads import decode_upload

    up = decode_upload(upload)
    try:
        fov = detect_fov(up.pixels)
    except NoFundusError as exc:
        return UploadAnalysis(up.kind, "no_fundus", exc.reason, preview=_preview(up.pixels, None))
    res = run.model.resolution
    ben_graham = bool(run.scorer.ben_graham) if run.scorer is not None else False
    prepared = preprocess_fundus(up.pixels, res, ben_graham=ben_graham, fov=fov)
    out = UploadAnalysis(up.kind, "ok", preview=_preview(up.pixels, fov), fov=fov, prepared=prepared)
    if run.scorer is None:
        out.reason = run.scorer_error or "this run has no anomaly scorer (anomaly/scorer.json)"
        return out
    with run.lock:
        batch = run.scorer.score_images(run.model, to_model_range(prepared)[None],
                                        extractor=FeatureExtractor(run.model))
    out.score, out.percentile = float(batch.score[0]), float(batch.percentile[0])
    out.flagged, out.threshold = bool(batch.flagged[0]), float(run.scorer.threshold)
    out.top_features = list(batch.top[0])
    if heatmap_grid:
        try:
            out.heatmap = occlusion_heatmap(run, prepared, min(heatmap_grid, res))
            out.overlay = heatmap_overlay(prepared, out.heatmap)
        except RetinagenError as exc:
            out.heatmap_note = str(exc)
    return out


# ===================================================================== training & metrics page
def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, float]], int]:
    """The numeric fields of every line of ``metrics.jsonl`` (rows), and the number of unreadable lines."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                bad += 1  # e.g. the last line of a run killed mid-write
                continue
            if not isinstance(obj, dict):
                bad += 1
                continue
            rows.append({k: float(v) for k, v in obj.items()
                         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))})
    return rows, bad


LOSS_KEYS = ("loss/D", "loss/G")
# Per-snapshot scores of the fixed judges (training's quality/* lines); fd_fundus apart (its own scale).
QUALITY_FD_KEY = "quality/fd_fundus"
QUALITY_SHARE_KEYS = ("quality/precision", "quality/recall", "quality/referable_agreement")
INFO_KEYS = ("info/L_info_discrete", "info/H_discrete", "info/L_info")


def sample_grids(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``samples/fakes-<step>.png`` grids as (training step, path), oldest first."""
    folder = Path(run_dir) / "samples"
    out = []
    for p in folder.glob("fakes-*.png") if folder.is_dir() else []:
        digits = p.stem.split("-", 1)[1]
        if digits.isdigit():
            out.append((int(digits), p))
    return sorted(out)


def find_reports(run_dir: str | Path, *, max_depth: int = 3) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """Evaluation reports (``REPORT.json`` / ``*.json`` with the evaluation schema) up to ``max_depth`` folders
    below the run folder: (path, report) pairs newest first, and notes on files that could not be read."""
    from retinagen.metrics.report import load_report

    root = Path(run_dir)
    found, notes = [], []
    for path in sorted(root.rglob("REPORT.json")):
        if len(path.relative_to(root).parts) > max_depth + 1:
            continue
        try:
            found.append((path, load_report(path)))
        except BadInputError as exc:
            notes.append(f"{path.relative_to(root)}: {exc.reason}")
        if len(found) >= MAX_REPORTS:
            break
    found.sort(key=lambda pr: str(pr[1].get("created", "")), reverse=True)
    return found, notes


def _ms(sec: Mapping[str, Any] | None) -> str:
    if not sec:
        return "not run"
    if sec.get("status") != "ok":
        return "skipped"
    return f"{sec['mean']:.4g} ± {sec['std']:.2g}"


def report_tables(report: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Rows for the dashboard's tables from an evaluation report: ``quality`` (FID, KID, fd_fundus),
    ``mig`` (MIG and max I), ``acm`` (per attribute: code, ACM %, 95 % margin), ``notes`` (every metric of
    `retinagen.metrics.registry.METRICS` that was skipped or not requested, with what it measures)."""
    m = report.get("metrics", {})
    model = report.get("model", {})
    name = str(model.get("msi", "model"))
    fdf = m.get("fd_fundus") or {}
    quality = [{
        "model": name, "kimg": model.get("kimg"), "FID": _ms(m.get("fid")), "KID": _ms(m.get("kid")),
        "fd_fundus FD": _ms(fdf.get("fd")) if fdf.get("status") == "ok" else _ms(fdf or None),
        "fd_fundus KID": _ms(fdf.get("kid")) if fdf.get("status") == "ok" else _ms(fdf or None),
    }]
    mig_rows = []
    mig = m.get("mig")
    if mig and mig.get("status") == "ok":
        mig_rows.append({"model": name, "MIG": mig["mig"], "max I": mig["max_mi"],
                         "MIG (normalised)": mig.get("mig_normalized"), "max I (normalised)": mig.get("max_mi_normalized")})
    acm_rows = []
    acm = m.get("acm")
    if acm and acm.get("status") == "ok":
        for r in acm.get("rows", []):
            acm_rows.append({"attribute": r["attribute"], "code": f"{r['code']} ({r['kind']})",
                             "assigned": bool(r.get("assigned")), "ACM %": r["percent"], "± 95 %": r["margin95"],
                             "n": r["n"], "direction": r.get("direction")})
    notes = []
    for k, info in METRICS.items():  # every metric evaluate knows, so one not requested is visible too
        sec = m.get(k)
        if not isinstance(sec, dict):
            notes.append({"metric": k, "measures": info.description, "reason": f"not requested (--metrics {k})"})
        elif sec.get("status") not in (None, "ok"):
            notes.append({"metric": k, "measures": info.description, "reason": str(sec.get("reason", ""))})
    return {"quality": quality, "mig": mig_rows, "acm": acm_rows, "notes": notes}


def read_png(path: str | Path) -> np.ndarray:
    """A PNG the run wrote (sample grids, strips) as uint8 RGB, through the safe reader."""
    from retinagen.data.imageio import read_image

    arr = read_image(path)
    if arr.dtype != np.uint8:
        arr = (arr >> 8).astype(np.uint8)
    return arr

