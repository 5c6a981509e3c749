"""The run the dashboard shows: finding its folder, loading model, factor map and scorer, where it may write."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinagen.dashboard_api.launch import STATE_ENV
from retinagen.errors import BadInputError, RetinagenError
from retinagen.generation import (
    LoadedModel,
    find_factor_map,
    load_model,
    resolve_checkpoint,
)
from retinagen.run_dir import RunDir
from retinagen.training.checkpoint import list_checkpoints

SCORER_STEM = Path("anomaly") / "scorer"
REBALANCE_DIR = "dashboard_rebalance"
REVIEW_DIR = "reviews"

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
        run_dir = RunDir.of_checkpoint(ck)
        return run_dir.root if run_dir is not None else ck.parent
    if not p.is_dir():
        raise BadInputError(p, "run folder not found")
    if not (list_checkpoints(RunDir(p).checkpoints) or list_checkpoints(p)):
        raise BadInputError(p, "no checkpoint in this run folder (expected checkpoints/ckpt-*.safetensors + .json)")
    return p


def checkpoint_key(run_dir: str | Path) -> str:
    """A cheap identity of a run's newest checkpoint, for caching: the sha256 its JSON records.

    Reads one small JSON (no hashing of the tensor file); falls back to the file's size and mtime. The model
    loaded under this key is still verified in full by `load_model`.
    """
    run_dir = Path(run_dir)
    metas = list_checkpoints(RunDir(run_dir).checkpoints) or list_checkpoints(run_dir)
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
