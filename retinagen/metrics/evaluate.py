"""``retinagen evaluate``: every metric that can run here, for one checkpoint, as REPORT.json + REPORT.md.

`evaluate_checkpoint` measures, for a trained model and the prepared dataset it is compared with:

* **image quality** (the paper's Table 1): FID and KID on Inception-v3 features (mean ± std over ``repeats``
  estimates of ``n_samples`` generated images each, `retinagen.metrics.fid.fid_repeated`), and ``fd_fundus``:
  the same Fréchet distance and KID on the project's own fundus encoder (`retinagen.metrics.encoder`).
  Without the Inception weights file FID and KID are marked ``skipped`` with the message that names the three
  ways to provide it, and the rest of the report still runs. Without an encoder file one is trained on the
  dataset and cached (see below);
* **disentanglement** (Table 2): MIG and max I(V_k; C_i) (Eq. 15-16, `retinagen.metrics.mig`) with Q run on the
  real labelled images. V_k: the DR grade (when labelled), CelebA's attributes (when present) and, for
  synthetic data, the ground-truth factors of ``dataset.json``, discretised: a factor with at most
  ``factor_bins`` distinct values keeps them, any other is cut into ``factor_bins`` equal-count bins at its
  quantiles over the images used (the bin edges are written to the report). Seeds (identifiers, not
  properties of the picture), constant factors and ``grade`` (the DR grade column already) are left out;
* **attribute control** (Table 3): the factor map from ``retinagen discover`` (given, or discovered here with
  `retinagen.metrics.discovery.discover_factors` and written beside the report), then for every attribute
  probe the ACM (`retinagen.metrics.acm`) of the code discovery assigned to it, or of the code with the
  highest discovery score for it when none was assigned (marked ``assigned: false``). ACM uses latents drawn
  with ``seed + 1``, so it is not scored on the samples discovery chose the code on; its thresholds are the
  discovery's, in units of each attribute's spread (``min_effect`` and ``tolerance`` times the map's
  ``attribute_std``). Categorical classes are visited in the map's ``class_order`` for that attribute;
* **training curve** (Figure 10): L_info of the discrete codes against its bound H(C), from the run's
  ``metrics.jsonl`` when the checkpoint lies in a run folder (``RUN/checkpoints/ckpt-*.safetensors``);
* **traversal grids** of the top ``top_factors`` codes (assigned codes first, then by discovery score).

Output: ``out_json`` (REPORT.json, written atomically), ``REPORT.md`` beside it (same stem), and PNG images in
``<stem>_files/`` linked from the Markdown by relative paths. Every number written is measured in this run
(or read from the run's own log); a metric that cannot run says ``skipped`` and why.

The fundus encoder, when none is given, is trained with `train_fundus_encoder` (``encoder_epochs`` epochs,
at least ``encoder_min_steps`` optimizer steps, on at most ``encoder_max_images`` images, seed 0) and cached in the statistics cache folder (default
``~/.cache/retinagen/stats``), keyed by the dataset fingerprint and the training settings, so every model
evaluated against the same data is scored with the same encoder (fd_fundus values are only comparable with
the same encoder; `compare_reports` checks this). Its cost grows with the square of the resolution (the
encoder's input is the dataset's resolution, at most 128 px) and with the number of steps; the README gives
the measured evaluation times.

The metrics are a registry (`retinagen.metrics.registry`: names and descriptions, read by the CLI and the
dashboard; one runner per group here). REPORT.md, reading reports back and `compare_reports`:
`retinagen.metrics.report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retinagen.errors import BadInputError, RetinagenError
from retinagen.fileio import atomic_write_json, atomic_write_text
from retinagen.metrics.fid import MetricUnavailable, RealSource, StatsCache, create_extractor
from retinagen.metrics.mig import DEFAULT_UNIFORM_BINS
from retinagen.metrics.registry import DEFAULT_METRICS, KNOWN_METRICS, METRICS
from retinagen.metrics.report import REPORT_SCHEMA, compare_reports, load_report, render_markdown
from retinagen.metrics.sections import (
    acm_plot,
    acm_section,
    discretise_factor,
    fundus_encoder_for,
    grids_section,
    linfo_section,
    mi_plot,
    mig_section,
    quality_section,
    real_attribute_labels,
    skipped,
)
from retinagen.reporting import jsonable
from retinagen.run_dir import RunDir

__all__ = [
    "DEFAULT_METRICS",
    "KNOWN_METRICS",
    "REPORT_SCHEMA",
    "compare_reports",
    "discretise_factor",
    "evaluate_checkpoint",
    "load_report",
    "real_attribute_labels",
    "render_markdown",
]

_MAX_DEFAULT_SAMPLES = 10_000


# ========================================================================================= the registry
_GROUP_RUNNERS: dict[str, Callable[[_Evaluation, set[str]], dict[str, Any]]] = {}


def _runner(group: str) -> Callable:
    """Decorator: ``runner(evaluation, wanted) -> {section name: section}`` computes the metrics of ``group``
    (`retinagen.metrics.registry.METRICS`); it is called once when any of them is requested."""

    def deco(fn: Callable[[_Evaluation, set[str]], dict[str, Any]]) -> Callable:
        _GROUP_RUNNERS[group] = fn
        return fn

    return deco


@dataclass
class _Evaluation:
    """What every metric runner of one `evaluate_checkpoint` call reads: the model, the data, the settings."""

    model: Any
    dataset: Any
    real: RealSource
    data_zip: Path
    n_gen: int
    repeats: int
    seed: int
    cache: Any
    cache_root: Path
    files: Path
    rel: str
    batch_size: int
    progress: bool
    device: str | torch.device
    factor_map_path: str | Path | None
    discovered_path: Path
    options: dict[str, Any]
    timings: dict[str, float]
    fmap: dict[str, Any] | None = None
    fmap_info: dict[str, Any] = field(default_factory=dict)
    _fmap_done: bool = False

    def timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.perf_counter() - t0, 3)

    def factor_map(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The factor map ACM and the grids share: given, or discovered once (timed as ``discovery``)."""
        if not self._fmap_done:
            t0 = time.perf_counter()
            o = self.options
            self.fmap, self.fmap_info = _factor_map_for(
                self.model, self.factor_map_path, self.discovered_path, o["discovery_n"], o["discovery_steps"],
                self.seed, self.progress, self.batch_size,
            )
            self._fmap_done = True
            self.timed("discovery", t0)
        return self.fmap, self.fmap_info


@_runner("inception")
def _run_inception(ev: _Evaluation, wanted: set[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        inception = create_extractor("inception-v3", ev.options["inception_weights"], ev.device)
        fd, kd = quality_section("inception-v3", inception, ev.real, ev.model, ev.n_gen, ev.repeats, ev.seed, ev.cache,
                          ev.batch_size, ev.progress)
    except MetricUnavailable as exc:
        fd = kd = skipped(str(exc))
    ev.timed("fid_kid", t0)
    return {name: sec for name, sec in (("fid", fd), ("kid", kd)) if name in wanted}


@_runner("mig")
def _run_mig(ev: _Evaluation, wanted: set[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    o = ev.options
    sec = mig_section(ev.model, ev.dataset, o["factor_bins"], o["mig_bins"], o["mig_limit"], ev.seed, ev.batch_size,
                       ev.progress)
    if sec["status"] == "ok":
        sec["plot"] = mi_plot(sec, ev.files, ev.rel)
    ev.timed("mig", t0)
    return {"mig": sec}


@_runner("acm")
def _run_acm(ev: _Evaluation, wanted: set[str]) -> dict[str, Any]:
    fmap, fmap_info = ev.factor_map()
    t0 = time.perf_counter()
    if fmap is None:
        sec = skipped("the model has no latent codes to control attributes")
    else:
        o = ev.options
        sec = acm_section(ev.model, fmap, o["acm_n"], o["acm_steps"], ev.seed + 1, ev.batch_size, ev.progress)
        sec["factor_map"] = fmap_info
        if sec["status"] == "ok":
            sec["plot"] = acm_plot(sec, ev.files, ev.rel)
    ev.timed("acm", t0)
    return {"acm": sec}


@_runner("fd_fundus")
def _run_fd_fundus(ev: _Evaluation, wanted: set[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    o = ev.options
    encoder, enc_info = fundus_encoder_for(o["fundus_encoder"], ev.data_zip, ev.real.fingerprint, ev.cache_root,
                                        o["encoder_epochs"], o["encoder_min_steps"], o["encoder_max_images"],
                                        ev.device, ev.progress)
    ev.timed("fd_fundus_encoder", t0)
    t0 = time.perf_counter()
    fd, kd = quality_section("fd_fundus", encoder, ev.real, ev.model, ev.n_gen, ev.repeats, ev.seed, ev.cache,
                      ev.batch_size, ev.progress)
    ev.timed("fd_fundus", t0)
    return {"fd_fundus": {"status": "ok", "fd": fd, "kid": kd, "encoder": enc_info}}


_unrun = sorted({m.group for m in METRICS.values()} - set(_GROUP_RUNNERS))
if _unrun:  # a metric added to the registry without its runner
    raise ImportError(f"retinagen.metrics.registry lists metric groups with no runner: {', '.join(_unrun)}")


# ============================================================================================= the run
def _check_evaluate_args(metrics: Sequence[str], repeats: int, acm_n: int, top_factors: int, batch_size: int,
                         n_samples: int | None) -> list[str]:
    """The requested metrics, with every count checked before any work starts."""
    wanted = [m.strip() for m in metrics]
    unknown = [m for m in wanted if m not in KNOWN_METRICS]
    if unknown or not wanted:
        raise RetinagenError(
            f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(KNOWN_METRICS)}"
        )
    if repeats < 1 or acm_n < 1 or top_factors < 0 or batch_size < 1:
        raise RetinagenError("repeats, acm_n and batch_size must be >= 1, top_factors >= 0")
    if n_samples is not None and n_samples < 2:
        raise RetinagenError(f"--n-samples must be >= 2, got {n_samples}")
    return wanted


def _factor_map_for(model: Any, factor_map: str | Path | None, discovered_path: Path, discovery_n: int,
                    discovery_steps: int, seed: int, progress: bool, batch_size: int
                    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The factor map ACM and the traversal grids use, and what the report says about it: the given one
    (with a warning when it was discovered on another checkpoint), else one discovered now and written to
    ``discovered_path``; (None, {}) for a model without codes."""
    from retinagen.metrics.discovery import discover_factors, load_factor_map, save_factor_map

    if factor_map is not None:
        fmap = load_factor_map(factor_map)
        info: dict[str, Any] = {"path": str(factor_map), "discovered_now": False}
        if fmap.get("checkpoint_sha256") not in (None, model.sha256):
            info["warning"] = "the factor map was discovered on another checkpoint"
        return fmap, info
    if model.spec.n_codes == 0:
        return None, {}
    result = discover_factors(model, n=discovery_n, steps=discovery_steps, seed=seed, progress=progress,
                              batch_size=batch_size)
    save_factor_map(result, discovered_path)
    return load_factor_map(discovered_path), {"path": discovered_path.name, "discovered_now": True}


def _model_and_data(model: Any, dataset: Any, data_zip: Path, fingerprint: str) -> dict[str, Any]:
    """The report's ``model`` and ``data`` sections: what was evaluated against what."""
    return {
        "model": {
            "msi": model.cfg.msi_name,
            "msi_tuple": list(model.cfg.msi),
            "checkpoint": str(model.path),
            "checkpoint_sha256": model.sha256,
            "step": model.meta.get("step"),
            "kimg": model.meta.get("kimg"),
            "resolution": model.resolution,
            "dataset": model.cfg.data.dataset,
            "codes": list(model.spec.code_names),
            "code_kinds": list(model.spec.code_kinds),
            "conditional": model.num_classes > 0,
        },
        "data": {
            "path": str(data_zip),
            "fingerprint": fingerprint,
            "n_images": len(dataset),
            "resolution": dataset.resolution,
            "synthetic": bool(dataset.meta.get("synthetic") or "factors" in dataset.meta),
            "num_classes": dataset.num_classes,
        },
    }


# The evaluation options REPORT.json's ``settings`` records, in this order.
_RECORDED_OPTIONS = ("acm_n", "acm_steps", "discovery_n", "discovery_steps", "mig_bins", "factor_bins",
                     "encoder_epochs", "encoder_min_steps", "encoder_max_images")


def _stats_cache(stats_cache: str | Path | None | bool, files: Path) -> tuple[Any, Path]:
    """(cache, folder the encoder and statistics go to): the statistics cache, or none (False) with the
    report's image folder holding a trained encoder."""
    if stats_cache is False:
        cache_root = files
        cache: Any = False
    else:
        store = StatsCache(None if stats_cache is None or stats_cache is True else stats_cache)
        cache, cache_root = store, store.root
    cache_root.mkdir(parents=True, exist_ok=True)
    return cache, cache_root


def _report_folders(out_json: Path, data_zip: Path) -> tuple[Path, str]:
    """Check the report path and the data; create the report's image folder: (folder, its name)."""
    if out_json.suffix.lower() != ".json":
        raise BadInputError(out_json, "the report path must end in .json (REPORT.md is written beside it)")
    if not data_zip.is_file():
        raise BadInputError(data_zip, "dataset ZIP not found (make one with retinagen prepare)")
    files = out_json.parent / f"{out_json.stem}_files"
    files.mkdir(parents=True, exist_ok=True)
    return files, files.name


def _assemble_report(ev: _Evaluation, out_json: Path, settings: dict[str, Any], sections: dict[str, Any],
                     fmap_info: dict[str, Any] | None, linfo: Any, grids: Any) -> dict[str, Any]:
    """REPORT.json's content, in its documented key order (without ``total_seconds``)."""
    from retinagen import __version__

    return {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "retinagen_version": __version__,
        **_model_and_data(ev.model, ev.dataset, ev.data_zip, ev.real.fingerprint),
        "settings": settings,
        "metrics": sections,
        "factor_map": fmap_info or None,
        "linfo": linfo,
        "traversals": grids,
        "files": {"markdown": out_json.with_suffix(".md").name, "images": ev.rel},
        "timings_s": ev.timings,
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_zip: str | Path,
    out_json: str | Path,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_samples: int | None = None,
    repeats: int = 5,
    inception_weights: str | Path | None = None,
    fundus_encoder: str | Path | None = None,
    factor_map: str | Path | None = None,
    acm_n: int = 100,
    seed: int = 0,
    progress: bool = True,
    stats_cache: str | Path | None | bool = None,
    encoder_epochs: int = 12,
    encoder_min_steps: int = 800,
    encoder_max_images: int | None = 4000,
    discovery_n: int = 32,
    discovery_steps: int = 5,
    acm_steps: int = 7,
    mig_limit: int | None = None,
    mig_bins: int = DEFAULT_UNIFORM_BINS,
    factor_bins: int = 4,
    top_factors: int = 4,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Evaluate a checkpoint against a prepared dataset; writes REPORT.json, REPORT.md and PNGs; returns the report.

    Args:
        checkpoint: a checkpoint file or a run folder (its newest complete checkpoint).
        data_zip: the prepared dataset ZIP the model is compared with (real images, labels, factors).
        out_json: the report path (e.g. ``REPORT.json``); ``REPORT.md`` and ``REPORT_files/`` go beside it.
        metrics: any of ``fid``, ``kid``, ``mig``, ``acm``, ``fd_fundus``.
        n_samples: generated images per FD/KID estimate (default: as many as real images, at most 10000).
        repeats: FD/KID estimates, each from a different seed (paper: 5).
        inception_weights: the Inception-v3 weights file for FID/KID (else $RETINAGEN_INCEPTION_WEIGHTS, else the
            torch hub cache; absent: FID/KID skipped with the message).
        fundus_encoder: an encoder from `train_fundus_encoder`; None: train one on ``data_zip`` (cached).
        factor_map: FACTORS.json from ``retinagen discover``; None: discover here (``discovery_n`` latents,
            ``discovery_steps`` values per uniform code) and write ``<stem>_FACTORS.json`` beside the report.
        acm_n, acm_steps: ACM samples per attribute and values per uniform code.
        seed: FD/KID generation seeds ``seed .. seed + repeats - 1``, discovery ``seed``, ACM ``seed + 1``.
        stats_cache: real-statistics and encoder cache folder; None: ``~/.cache/retinagen/stats``; False: no
            statistics cache and the encoder is kept in the report's image folder.
        encoder_epochs, encoder_min_steps, encoder_max_images: training of the encoder when none is given
            (`train_fundus_encoder`'s epochs, min_steps and max_images; seed 0).
        mig_limit: Q on at most this many real images (seeded random subset; default all).
        mig_bins: bins of a uniform code's range for MI; factor_bins: bins of a continuous factor.
        top_factors: traversal grids of this many codes.
        batch_size: generator / feature / Q batch size (Q's output depends on it: keep it fixed across models).
    Returns:
        The report (what REPORT.json holds).
    """
    from retinagen.data.dataset import ZipImageDataset
    from retinagen.generation import load_model

    t_start = time.perf_counter()
    wanted = _check_evaluate_args(metrics, repeats, acm_n, top_factors, batch_size, n_samples)
    out_json, data_zip = Path(out_json), Path(data_zip)
    files, rel = _report_folders(out_json, data_zip)

    t0 = time.perf_counter()
    model = load_model(checkpoint, device)
    dataset = ZipImageDataset(data_zip)
    real = RealSource(dataset, f"{dataset.fingerprint()}:all", data_zip.name)
    timings = {"load": round(time.perf_counter() - t0, 3)}
    n_gen = n_samples if n_samples is not None else min(len(dataset), _MAX_DEFAULT_SAMPLES)
    n_gen = max(n_gen, 2)
    cache, cache_root = _stats_cache(stats_cache, files)

    ev = _Evaluation(
        model=model, dataset=dataset, real=real, data_zip=data_zip, n_gen=n_gen, repeats=repeats, seed=seed,
        cache=cache, cache_root=cache_root, files=files, rel=rel, batch_size=batch_size, progress=progress,
        device=device, factor_map_path=factor_map, discovered_path=out_json.parent / f"{out_json.stem}_FACTORS.json",
        options={
            "inception_weights": inception_weights, "fundus_encoder": fundus_encoder,
            "encoder_epochs": encoder_epochs, "encoder_min_steps": encoder_min_steps,
            "encoder_max_images": encoder_max_images, "mig_limit": mig_limit, "mig_bins": mig_bins,
            "factor_bins": factor_bins, "acm_n": acm_n, "acm_steps": acm_steps, "discovery_n": discovery_n,
            "discovery_steps": discovery_steps,
        },
        timings=timings,
    )
    sections: dict[str, Any] = {}
    for group in dict.fromkeys(METRICS[m].group for m in KNOWN_METRICS if m in wanted):
        sections.update(_GROUP_RUNNERS[group](ev, set(wanted)))
    fmap, fmap_info = ev.factor_map() if top_factors > 0 else (ev.fmap, ev.fmap_info)
    # ---- L_info curve, traversal grids ----
    t0 = time.perf_counter()
    linfo = linfo_section(RunDir.of_checkpoint(model.path), model.meta.get("step"), files, rel)
    ev.timed("linfo", t0)
    t0 = time.perf_counter()
    if top_factors > 0 and model.spec.n_codes > 0:
        grids = grids_section(model, fmap, top_factors, seed, files, rel, progress)
    else:
        grids = skipped("no latent codes" if model.spec.n_codes == 0 else "top_factors = 0")
    ev.timed("traversals", t0)

    settings = {"metrics": wanted, "n_samples": n_gen, "repeats": repeats, "seed": seed,
                **{k: ev.options[k] for k in _RECORDED_OPTIONS}, "batch_size": batch_size, "device": str(device)}
    report = _assemble_report(ev, out_json, settings, sections, fmap_info, linfo, grids)
    report["total_seconds"] = round(time.perf_counter() - t_start, 3)
    report = jsonable(report)
    atomic_write_json(out_json, report)
    atomic_write_text(out_json.with_suffix(".md"), render_markdown(report))
    return report
