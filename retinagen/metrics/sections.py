"""The sections of an evaluation report, each computed from a model and the data it is compared with.

FD/KID on a feature extractor over repeats (`quality_section`), the fundus encoder a run is scored with
(`fundus_encoder_for`), MIG of Q on real labelled images (`mig_section`; factors discretised by
`discretise_factor`), ACM of the factor map's attributes (`acm_section`), the L_info curve from the run's
log (`linfo_section`), traversal grids (`grids_section`), and the plots REPORT.md links. A section that
cannot run is ``skipped(reason)``. `retinagen.metrics.evaluate` runs them; `retinagen.metrics.quality`
reuses MIG and ACM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinagen.fileio import atomic_write_bytes
from retinagen.metrics.fid import RealSource, fid_repeated
from retinagen.progress import progress_bar
from retinagen.reporting import figure_png
from retinagen.run_dir import RunDir, step_of

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
def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def _figure(width: float, height: float) -> Any:
    # The object API with an Agg canvas: no pyplot, so no global backend switch and no GUI.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


# ============================================================================================ sections
def quality_section(
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


def fundus_encoder_for(
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


def mig_section(
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
        return skipped("the checkpoint holds no discriminator / Q weights; MIG needs Q")
    if model.spec.n_codes < 2:
        return skipped(f"the model has {model.spec.n_codes} latent code(s); MIG needs at least 2")
    rows, labels, names, how = real_attribute_labels(dataset, factor_bins)
    if labels.size == 0:
        return skipped("the dataset has no labelled images (no DR grades, attributes or factors)")
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


def acm_section(
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
        return {**skipped("no attribute of the factor map could be scored"), "not_scored": not_scored}
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


def linfo_section(run: RunDir | None, ckpt_step: Any, files: Path, rel: str) -> dict[str, Any]:
    """Figure 10 from the run's log, up to the evaluated checkpoint's step (later lines: training went on)."""
    if run is None or not run.metrics.is_file():
        return skipped("the checkpoint is not inside a run folder with metrics.jsonl")
    kimg, l_disc, h_disc, l_all = [], [], [], []
    later = 0
    limit = int(ckpt_step) if isinstance(ckpt_step, int | float) and not isinstance(ckpt_step, bool) else None
    for _, rec in run.log():  # a line cut by a crash mid-write reads as None
        if rec is None or "info/L_info_discrete" not in rec or "info/H_discrete" not in rec:
            continue
        step = step_of(rec)
        if limit is not None and step is not None and step > limit:
            later += 1
            continue
        kimg.append(float(rec.get("kimg", len(kimg))))
        l_disc.append(float(rec["info/L_info_discrete"]))
        h_disc.append(float(rec["info/H_discrete"]))
        l_all.append(float(rec.get("info/L_info", float("nan"))))
    if not kimg:
        return skipped(f"{run.metrics} has no info/L_info_discrete entries up to this checkpoint")
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
        "run_dir": str(run.root),
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


def grids_section(
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


def mi_plot(mig: Mapping[str, Any], files: Path, rel: str) -> str:
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


def acm_plot(acm: Mapping[str, Any], files: Path, rel: str) -> str:
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
