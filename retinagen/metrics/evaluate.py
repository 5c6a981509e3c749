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

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinagen.errors import BadInputError, RetinagenError
from retinagen.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from retinagen.metrics.fid import MetricUnavailable, RealSource, StatsCache, create_extractor, fid_repeated
from retinagen.metrics.mig import DEFAULT_UNIFORM_BINS
from retinagen.metrics.registry import DEFAULT_METRICS, KNOWN_METRICS, METRICS
from retinagen.metrics.report import REPORT_SCHEMA, compare_reports, load_report, render_markdown
from retinagen.progress import progress_bar
from retinagen.reporting import figure_png, jsonable

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
_GRID_MIN_CELL = (
    64  # traversal grid images are enlarged (nearest neighbour) to at least this many px per image
)


# ================================================================================== real labels (MIG)
def discretise_factor(values: np.ndarray, bins: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A continuous factor [N] -> integer classes [N] and how they were made.

    At most ``bins`` distinct values: the values' ranks (``{"kind": "values", "values": [...]}``). Otherwise
    equal-count bins cut at the ``k / bins`` quantiles (``{"kind": "quantile", "edges": [...]}``; a value equal
    to an edge goes to the lower bin; tied quantiles, e.g. many zero lesion counts, merge bins, so there may be
    fewer than ``bins`` classes: with half the values 0, class 0 is exactly the zeros).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError("values must be a non-empty finite array")
    uniq = np.unique(v)
    if len(uniq) <= bins:
        return np.searchsorted(uniq, v).astype(np.int64), {"kind": "values", "values": uniq.tolist()}
    edges = np.unique(np.quantile(v, np.arange(1, bins) / bins))
    # side="left": class = number of edges strictly below the value, so a point mass at an edge (e.g. the many
    # zeros of a lesion count) stays in its own bin instead of merging with the values above it.
    classes = np.searchsorted(edges, v, side="left").astype(np.int64)
    return classes, {"kind": "quantile", "bins": bins, "edges": edges.tolist()}


def real_attribute_labels(
    dataset: Any, factor_bins: int = 4
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """Ground-truth attributes V_k of a `ZipImageDataset` for MIG: (rows [N'], labels [N', K], names, how).

    Columns: ``dr_grade`` (when the dataset has graded images), CelebA attributes (0/1), and the synthetic
    factors discretised with `discretise_factor`. Rows: the images that have every column (unlabelled
    images, grade -1, are left out). ``how`` maps each column to its description.
    """
    from retinagen.data.dataset import per_image_table

    meta = dataset.meta if isinstance(getattr(dataset, "meta", None), dict) else {}
    names_in_zip = list(dataset.names)
    cols: list[np.ndarray] = []  # float columns with NaN for missing
    names: list[str] = []
    how: dict[str, Any] = {}
    labels = np.asarray(dataset.labels, dtype=np.float64)
    has_grade = int(getattr(dataset, "num_classes", 0)) > 0 and (labels >= 0).any()
    if has_grade:
        cols.append(np.where(labels >= 0, labels, np.nan))
        names.append("dr_grade")
        how["dr_grade"] = {"kind": "label", "num_classes": int(dataset.num_classes)}
    if (table := per_image_table(meta.get("attrs"), names_in_zip)) is not None:
        anames, arr = table
        for j, a in enumerate(anames):
            cols.append(arr[:, j])
            names.append(a)
            how[a] = {"kind": "attribute"}
    factor_cols: list[tuple[str, np.ndarray]] = []
    if (table := per_image_table(meta.get("factors"), names_in_zip)) is not None:
        fnames, arr = table
        for j, f in enumerate(fnames):
            if "seed" in f.lower() or (f == "grade" and has_grade):
                continue
            factor_cols.append((f, arr[:, j]))
    # Rows with every label and factor present; factors are discretised on exactly those rows.
    all_cols = cols + [c for _, c in factor_cols]
    if not all_cols:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.int64), [], {}
    ok = np.all(np.isfinite(np.stack(all_cols, axis=1)), axis=1)
    rows = np.flatnonzero(ok)
    out_cols = [c[rows] for c in cols]
    for f, c in factor_cols:
        vals = c[rows]
        if len(rows) == 0 or np.ptp(vals) == 0:
            continue  # constant here: H(V_k) = 0, nothing to measure
        classes, desc = discretise_factor(vals, factor_bins)
        if len(np.unique(classes)) < 2:
            continue
        out_cols.append(classes.astype(np.float64))
        names.append(f)
        how[f] = {"kind": "factor", **desc}
    if not out_cols or len(rows) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.int64), [], {}
    lab = np.stack(out_cols, axis=1).astype(np.int64)
    return rows.astype(np.int64), lab, names, how


class _LabelledImages(torch.utils.data.Dataset):
    """Items ``(img [3, R, R] in [-1, 1], grade, attributes [K])`` of chosen rows, resized to R when needed."""

    def __init__(self, dataset: Any, rows: np.ndarray, labels: np.ndarray, resolution: int) -> None:
        self.dataset = dataset
        self.rows = rows
        self.labels = labels
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img, grade = self.dataset[int(self.rows[i])][:2]
        if img.shape[-1] != self.resolution:
            img = torch.nn.functional.interpolate(
                img[None], size=(self.resolution, self.resolution), mode="bilinear", antialias=True
            )[0]
        return img, torch.as_tensor(grade), torch.from_numpy(self.labels[i])


# ========================================================================================== helpers
def _skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def _figure(width: float, height: float) -> Any:
    # The object API with an Agg canvas: no pyplot, so no global backend switch and no GUI.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _run_dir_of(checkpoint: Path) -> Path | None:
    """The run folder of a checkpoint (``RUN/checkpoints/ckpt-*.safetensors`` or ``RUN/ckpt-*``), if any."""
    for cand in (checkpoint.parent.parent, checkpoint.parent):
        if (cand / "metrics.jsonl").is_file():
            return cand
    return None


# ============================================================================================ sections
def _quality(
    name: str,
    extractor: Any,
    real: RealSource,
    model: Any,
    n_samples: int,
    repeats: int,
    seed: int,
    cache: Any,
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(FD section, KID section) for one extractor."""
    kid_size = min(1000, n_samples, len(real.dataset))
    res = fid_repeated(
        real,
        model,
        n_samples,
        repeats,
        extractor=extractor,
        seed=seed,
        with_kid=True,
        kid_subset_size=kid_size,
        cache=cache,
        batch_size=batch_size,
        progress=progress,
    )
    common = {
        "n_samples": n_samples,
        "n_real": res["n_real"],
        "repeats": repeats,
        "seeds": res["seeds"],
        "extractor": name,
        "weights_sha256": extractor.weights_id,
    }
    fd = {"status": "ok", "mean": res["mean"], "std": res["std"], "values": res["values"], **common}
    fd["real_stats_cached"] = res["real_stats_cached"]
    k = res["kid"]
    kid_sec = {"status": "ok", "mean": k["mean"], "std": k["std"], "values": k["values"], **common}
    kid_sec["subset_size"] = kid_size
    return fd, kid_sec


def _fundus_encoder(
    given: str | Path | None,
    data_zip: Path,
    fingerprint: str,
    cache_root: Path,
    epochs: int,
    min_steps: int,
    max_images: int | None,
    device: str | torch.device,
    progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """(extractor, info): the given encoder, or one trained on ``data_zip`` (cached by data + settings)."""
    from retinagen.errors import CheckpointError
    from retinagen.metrics.encoder import encoder_cache_key, load_fundus_encoder, train_fundus_encoder

    info: dict[str, Any] = {}
    if given is not None:
        ext = load_fundus_encoder(given, device)
        info.update(path=str(ext.path), trained_now=False, source="given")
    else:
        settings = {"epochs": epochs, "min_steps": min_steps, "max_images": max_images, "seed": 0}
        key = encoder_cache_key(fingerprint, **settings)
        path = cache_root / f"fundus-encoder-{key[:24]}.safetensors"
        ext = None
        if path.is_file():
            try:
                ext = load_fundus_encoder(path, device)
                info.update(path=str(path), trained_now=False, source="read from the cache")
            except CheckpointError:
                ext = None  # a damaged cache entry is rebuilt
        if ext is None:
            t0 = time.perf_counter()
            train_fundus_encoder(
                data_zip,
                path,
                epochs=epochs,
                min_steps=min_steps,
                max_images=max_images,
                seed=0,
                device=device,
                progress=progress,
            )
            ext = load_fundus_encoder(path, device)
            info.update(
                path=str(path),
                trained_now=True,
                source="trained for this report",
                train_seconds=time.perf_counter() - t0,
            )
    meta = ext.meta
    info.update(
        weights_sha256=ext.weights_id,
        objective=meta.get("objective"),
        input_size=meta.get("config", {}).get("input_size"),
        feature_dim=ext.feature_dim,
        trained_on=meta.get("data", {}),
        trained_on_this_data=meta.get("data", {}).get("fingerprint") == fingerprint.split(":")[0],
        training_seconds=meta.get("training", {}).get("seconds"),
        validation=meta.get("validation", {}),
    )
    return ext, info


def _mig_section(
    model: Any,
    dataset: Any,
    factor_bins: int,
    mig_bins: int,
    mig_limit: int | None,
    seed: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    from retinagen.metrics.mig import mig_report, q_params_for_dataset

    if model.D is None:
        return _skipped("the checkpoint holds no discriminator / Q weights; MIG needs Q")
    if model.spec.n_codes < 2:
        return _skipped(f"the model has {model.spec.n_codes} latent code(s); MIG needs at least 2")
    rows, labels, names, how = real_attribute_labels(dataset, factor_bins)
    if labels.size == 0:
        return _skipped("the dataset has no labelled images (no DR grades, attributes or factors)")
    if mig_limit is not None and mig_limit < len(rows):
        pick = np.sort(np.random.default_rng([seed, 15]).choice(len(rows), size=mig_limit, replace=False))
        rows, labels = rows[pick], labels[pick]
    view = _LabelledImages(dataset, rows, labels, model.resolution)
    q, lab = q_params_for_dataset(model, view, batch_size=batch_size, progress=progress)
    res = mig_report(model.spec, q, lab, attribute_names=names, bins=mig_bins)
    out = {"status": "ok", **res.to_json(), "discretisation": how, "factor_bins": factor_bins}
    out["q_batch_size"] = batch_size
    return out


def _attribute_std(fmap: Mapping[str, Any], attr: str) -> float:
    from retinagen.metrics.attributes import ATTRIBUTES

    std = fmap.get("attribute_std", {}).get(attr)
    if isinstance(std, int | float) and std > 0:
        return float(std)
    return float(ATTRIBUTES[attr].spread) if attr in ATTRIBUTES else 0.0


def _acm_targets(fmap: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per attribute of the map: the code to score (assigned, else the best-scoring one) and its discovery entry."""
    codes = fmap.get("codes", {})
    attrs_seen: list[str] = []
    for entry in codes.values():
        for a in entry.get("all", {}):
            if a not in attrs_seen:
                attrs_seen.append(a)
    assigned = dict(fmap.get("attributes", {}))
    out = []
    for attr in attrs_seen:
        if attr in assigned:
            code, is_assigned = assigned[attr], True
        else:
            scored = [(c, e.get("all", {}).get(attr, {}).get("score", 0.0)) for c, e in codes.items()]
            scored = [(c, s) for c, s in scored if isinstance(s, int | float)]
            if not scored:
                continue
            code = max(scored, key=lambda t: t[1])[0]
            is_assigned = False
        entry = codes.get(code, {}).get("all", {}).get(attr, {})
        out.append(
            {
                "attribute": attr,
                "code": code,
                "kind": codes.get(code, {}).get("kind"),
                "assigned": is_assigned,
                "discovery": {k: entry.get(k) for k in ("effect", "consistency", "direction", "score")},
                "class_order": entry.get("class_order"),
            }
        )
    return out


def _acm_section(
    model: Any,
    fmap: Mapping[str, Any],
    acm_n: int,
    acm_steps: int,
    seed: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    from retinagen.metrics.acm import acm_from_curves, attribute_curves
    from retinagen.metrics.attributes import ATTRIBUTES

    min_effect_sd = float(fmap.get("min_effect", 0.25))
    tolerance_sd = float(fmap.get("tolerance", 0.05))
    rows: list[dict[str, Any]] = []
    not_scored: list[dict[str, str]] = []
    for target in _acm_targets(fmap):
        attr, code = target["attribute"], target["code"]
        if attr not in ATTRIBUTES:
            not_scored.append(
                {"attribute": attr, "reason": "no measurable probe here (e.g. dr_grade needs the grader)"}
            )
            continue
        if code not in model.spec.code_names:
            not_scored.append({"attribute": attr, "reason": f"code {code} is not a code of this model"})
            continue
        std = _attribute_std(fmap, attr)
        curves, values = attribute_curves(
            model,
            code,
            ATTRIBUTES[attr].fn,
            n=acm_n,
            steps=acm_steps,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
        order = target.get("class_order")
        if (
            target["kind"] == "categorical"
            and isinstance(order, list)
            and sorted(order) == list(range(len(values)))
        ):
            curves = curves[:, order]  # classes have no order: the discovery's (by mean attribute) is used
        res = acm_from_curves(curves, min_effect_sd * std, tolerance=tolerance_sd * std)
        rows.append(
            {
                **{k: target[k] for k in ("attribute", "code", "kind", "assigned", "discovery")},
                **res.to_json(),
                "min_effect": min_effect_sd * std,
                "tolerance": tolerance_sd * std,
                "code_values": values if order is None else [values[i] for i in order],
            }
        )
    if not rows:
        return {**_skipped("no attribute of the factor map could be scored"), "not_scored": not_scored}
    return {
        "status": "ok",
        "rows": rows,
        "not_scored": not_scored,
        "seed": seed,
        "n": acm_n,
        "steps": acm_steps,
        "min_effect_sd": min_effect_sd,
        "tolerance_sd": tolerance_sd,
    }


def _linfo_section(run_dir: Path | None, ckpt_step: Any, files: Path, rel: str) -> dict[str, Any]:
    """Figure 10 from the run's log, up to the evaluated checkpoint's step (later lines: training went on)."""
    if run_dir is None:
        return _skipped("the checkpoint is not inside a run folder with metrics.jsonl")
    kimg, l_disc, h_disc, l_all = [], [], [], []
    later = 0
    limit = int(ckpt_step) if isinstance(ckpt_step, int | float) and not isinstance(ckpt_step, bool) else None
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            if not isinstance(rec, dict) or "info/L_info_discrete" not in rec or "info/H_discrete" not in rec:
                continue
            if limit is not None and isinstance(rec.get("step"), int) and rec["step"] > limit:
                later += 1
                continue
            kimg.append(float(rec.get("kimg", len(kimg))))
            l_disc.append(float(rec["info/L_info_discrete"]))
            h_disc.append(float(rec["info/H_discrete"]))
            l_all.append(float(rec.get("info/L_info", float("nan"))))
    if not kimg:
        return _skipped(
            f"{run_dir / 'metrics.jsonl'} has no info/L_info_discrete entries up to this checkpoint"
        )
    h = h_disc[-1]
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(kimg, l_disc, lw=1.0, alpha=0.5 if len(kimg) > 50 else 1.0, label="L_info (discrete codes)")
    if len(kimg) > 50:
        # An exponential moving average shows the trend under the per-step noise.
        ema, acc = [], l_disc[0]
        for v in l_disc:
            acc = 0.95 * acc + 0.05 * v
            ema.append(acc)
        ax.plot(kimg, ema, lw=1.8, label="L_info (EMA 0.95)")
    ax.axhline(h, color="k", ls="--", lw=1.0, label=f"bound H(C) = {h:.3f} nats")
    ax.set_xlabel("kimg")
    ax.set_ylabel("nats")
    ax.set_title("L_info of the discrete codes against its bound H(C)")
    ax.legend(loc="best", fontsize=8)
    atomic_write_bytes(files / "linfo.png", figure_png(fig))
    tail = l_disc[-max(1, len(l_disc) // 10) :]
    return {
        "status": "ok",
        "file": f"{rel}/linfo.png",
        "run_dir": str(run_dir),
        "n_points": len(kimg),
        "kimg_last": kimg[-1],
        "later_points_left_out": later,
        "H_discrete": h,
        "L_info_discrete_last": l_disc[-1],
        "L_info_discrete_tail_mean": float(np.mean(tail)),
        "L_info_discrete_max": float(np.max(l_disc)),
        "tail_fraction_of_bound": float(np.mean(tail) / h) if h > 0 else None,
        "L_info_last": l_all[-1] if math.isfinite(l_all[-1]) else None,
    }


def _top_codes(model: Any, fmap: Mapping[str, Any] | None, k: int) -> list[dict[str, Any]]:
    names = list(model.spec.code_names)
    codes = (fmap or {}).get("codes", {})

    def key(c: str) -> tuple[int, float, int]:
        e = codes.get(c, {})
        return (0 if e.get("attribute") else 1, -float(e.get("score", 0.0) or 0.0), names.index(c))

    out = []
    for c in sorted(names, key=key)[:k]:
        e = codes.get(c, {})
        out.append(
            {
                "code": c,
                "kind": model.spec.code_kinds[names.index(c)],
                "attribute": e.get("attribute"),
                "best": e.get("best"),
                "effect": e.get("effect"),
                "consistency": e.get("consistency"),
                "score": e.get("score"),
            }
        )
    return out


def _grids_section(
    model: Any, fmap: Mapping[str, Any] | None, k: int, seed: int, files: Path, rel: str, progress: bool
) -> dict[str, Any]:
    from retinagen.generation import png_bytes, traversal_grid, traversal_values

    tops = _top_codes(model, fmap, k)
    with progress_bar(len(tops), "traversal grids", unit="grid", enabled=progress) as bar:
        for t in tops:
            grid = traversal_grid(model, t["code"], steps=7, samples=8, seed=seed)
            r = model.resolution
            scale = max(1, math.ceil(_GRID_MIN_CELL / r))
            if scale > 1:
                grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
            name = f"traversal_{t['code']}.png"
            atomic_write_bytes(files / name, png_bytes(np.ascontiguousarray(grid)))
            idx = model.spec.code_names.index(t["code"])
            t.update(
                file=f"{rel}/{name}", values=traversal_values(model.spec, idx, 7), samples=8, upscale=scale
            )
            bar.advance(1)
    return {"status": "ok", "grids": tops, "seed": seed}


def _mi_plot(mig: Mapping[str, Any], files: Path, rel: str) -> str:
    mi = np.asarray(mig["mi_paper"], dtype=np.float64)
    attrs, codes = mig["attributes"], mig["codes"]
    fig = _figure(max(4.0, 0.45 * len(codes) + 2.5), max(2.5, 0.32 * len(attrs) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mi, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(codes)), codes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(attrs)), attrs, fontsize=7)
    ax.set_xlabel("code C_i")
    ax.set_title("I(V_k; C_i) from Q on real images (nats)")
    fig.colorbar(im, ax=ax)
    atomic_write_bytes(files / "mi.png", figure_png(fig))
    return f"{rel}/mi.png"


def _acm_plot(acm: Mapping[str, Any], files: Path, rel: str) -> str:
    rows = acm["rows"]
    fig = _figure(6.0, 0.4 * len(rows) + 1.2)
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"{r['attribute']} ({r['code']}{'' if r['assigned'] else ', unassigned'})" for r in rows]
    ax.barh(
        range(len(rows)),
        [r["percent"] for r in rows],
        xerr=[r["margin95"] for r in rows],
        color=["tab:blue" if r["assigned"] else "tab:gray" for r in rows],
        capsize=3,
    )
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()  # first row at the top, as in the table
    ax.set_xlim(0, 100)
    ax.set_xlabel("ACM: consistently controlled samples (%) with 95 % margin")
    atomic_write_bytes(files / "acm.png", figure_png(fig))
    return f"{rel}/acm.png"


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
        fd, kd = _quality("inception-v3", inception, ev.real, ev.model, ev.n_gen, ev.repeats, ev.seed, ev.cache,
                          ev.batch_size, ev.progress)
    except MetricUnavailable as exc:
        fd = kd = _skipped(str(exc))
    ev.timed("fid_kid", t0)
    return {name: sec for name, sec in (("fid", fd), ("kid", kd)) if name in wanted}


@_runner("mig")
def _run_mig(ev: _Evaluation, wanted: set[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    o = ev.options
    sec = _mig_section(ev.model, ev.dataset, o["factor_bins"], o["mig_bins"], o["mig_limit"], ev.seed, ev.batch_size,
                       ev.progress)
    if sec["status"] == "ok":
        sec["plot"] = _mi_plot(sec, ev.files, ev.rel)
    ev.timed("mig", t0)
    return {"mig": sec}


@_runner("acm")
def _run_acm(ev: _Evaluation, wanted: set[str]) -> dict[str, Any]:
    fmap, fmap_info = ev.factor_map()
    t0 = time.perf_counter()
    if fmap is None:
        sec = _skipped("the model has no latent codes to control attributes")
    else:
        o = ev.options
        sec = _acm_section(ev.model, fmap, o["acm_n"], o["acm_steps"], ev.seed + 1, ev.batch_size, ev.progress)
        sec["factor_map"] = fmap_info
        if sec["status"] == "ok":
            sec["plot"] = _acm_plot(sec, ev.files, ev.rel)
    ev.timed("acm", t0)
    return {"acm": sec}


@_runner("fd_fundus")
def _run_fd_fundus(ev: _Evaluation, wanted: set[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    o = ev.options
    encoder, enc_info = _fundus_encoder(o["fundus_encoder"], ev.data_zip, ev.real.fingerprint, ev.cache_root,
                                        o["encoder_epochs"], o["encoder_min_steps"], o["encoder_max_images"],
                                        ev.device, ev.progress)
    ev.timed("fd_fundus_encoder", t0)
    t0 = time.perf_counter()
    fd, kd = _quality("fd_fundus", encoder, ev.real, ev.model, ev.n_gen, ev.repeats, ev.seed, ev.cache,
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
    if out_json.suffix.lower() != ".json":
        raise BadInputError(out_json, "the report path must end in .json (REPORT.md is written beside it)")
    if not data_zip.is_file():
        raise BadInputError(data_zip, "dataset ZIP not found (make one with retinagen prepare)")
    out_dir = out_json.parent
    files = out_dir / f"{out_json.stem}_files"
    rel = files.name
    files.mkdir(parents=True, exist_ok=True)

    timings: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    model = load_model(checkpoint, device)
    dataset = ZipImageDataset(data_zip)
    real = RealSource(dataset, f"{dataset.fingerprint()}:all", data_zip.name)
    timed("load", t0)
    n_gen = n_samples if n_samples is not None else min(len(dataset), _MAX_DEFAULT_SAMPLES)
    n_gen = max(n_gen, 2)
    if stats_cache is False:
        cache: Any = False
        cache_root = files
    else:
        store = StatsCache(None if stats_cache is None or stats_cache is True else stats_cache)
        cache, cache_root = store, store.root
    cache_root.mkdir(parents=True, exist_ok=True)

    ev = _Evaluation(
        model=model, dataset=dataset, real=real, data_zip=data_zip, n_gen=n_gen, repeats=repeats, seed=seed,
        cache=cache, cache_root=cache_root, files=files, rel=rel, batch_size=batch_size, progress=progress,
        device=device, factor_map_path=factor_map, discovered_path=out_dir / f"{out_json.stem}_FACTORS.json",
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
    linfo = _linfo_section(_run_dir_of(model.path), model.meta.get("step"), files, rel)
    timed("linfo", t0)
    t0 = time.perf_counter()
    if top_factors > 0 and model.spec.n_codes > 0:
        grids = _grids_section(model, fmap, top_factors, seed, files, rel, progress)
    else:
        grids = _skipped("no latent codes" if model.spec.n_codes == 0 else "top_factors = 0")
    timed("traversals", t0)

    from retinagen import __version__

    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "retinagen_version": __version__,
        **_model_and_data(model, dataset, data_zip, real.fingerprint),
        "settings": {
            "metrics": wanted,
            "n_samples": n_gen,
            "repeats": repeats,
            "seed": seed,
            "acm_n": acm_n,
            "acm_steps": acm_steps,
            "discovery_n": discovery_n,
            "discovery_steps": discovery_steps,
            "mig_bins": mig_bins,
            "factor_bins": factor_bins,
            "encoder_epochs": encoder_epochs,
            "encoder_min_steps": encoder_min_steps,
            "encoder_max_images": encoder_max_images,
            "batch_size": batch_size,
            "device": str(device),
        },
        "metrics": sections,
        "factor_map": fmap_info or None,
        "linfo": linfo,
        "traversals": grids,
        "files": {"markdown": out_json.with_suffix(".md").name, "images": rel},
        "timings_s": timings,
    }
    report["total_seconds"] = round(time.perf_counter() - t_start, 3)
    report = jsonable(report)
    atomic_write_json(out_json, report)
    atomic_write_text(out_json.with_suffix(".md"), render_markdown(report))
    return report
