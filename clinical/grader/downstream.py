"""Downstream proof of synthetic rebalancing: the same grader trained three ways, tested on held-out real data.

`run_downstream` trains ``real_only``, ``real_plus_synthetic`` and ``synthetic_only`` with the same architecture,
steps, batch size, optimiser and seed, evaluates them on one patient-split real test set (QWK, balanced accuracy,
per-grade recall, referable AUROC, each with a bootstrap interval and paired differences from ``real_only``),
and writes ``REPORT.json``, ``REPORT.md``, confusion PNGs and the graders, atomically.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinical.grader.data import GradedImages, load_synthetic_folder, split_real
from clinical.grader.model import (
    ARCH_DESCRIPTIONS,
    LOSS_DESCRIPTIONS,
    GraderConfig,
    _predict_dataset,
    grader_config,
    save_grader,
    train_grader,
)
from clinical.grader.stats import _delta, bootstrap_indices, evaluate_predictions
from retinagen import __version__
from retinagen.data.dataset import ZipImageDataset
from retinagen.dr_scale import NUM_GRADES
from retinagen.errors import ConfigError
from retinagen.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from retinagen.reporting import figure_png, jsonable

ARMS = ("real_only", "real_plus_synthetic", "synthetic_only")
ARM_TITLES = {"real_only": "real only", "real_plus_synthetic": "real + synthetic", "synthetic_only": "synthetic only"}
REPORT_FORMAT = "retinagen-downstream"
REPORT_VERSION = 1

# --------------------------------------------------------------------------------------------------
# Report


def confusion_png(cm: Sequence[Sequence[int]], title: str) -> bytes:
    """A confusion-matrix plot (colour: row-normalised recall; text: counts) as PNG bytes."""
    from matplotlib.figure import Figure

    m = np.asarray(cm, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig = Figure(figsize=(4.2, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    k = m.shape[0]
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=9,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true grade")
    return figure_png(fig)


def _fmt(e: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    v = f.format(e["value"])
    if e.get("low") is None:
        return v
    return f"{v} [{f.format(e['low'])}, {f.format(e['high'])}]"


def render_markdown(report: Mapping[str, Any]) -> str:
    """REPORT.md: inputs, the three arms with 95 % intervals, per-grade recall, differences, plots."""
    sp, sy, gr, bs = report["split"], report["synthetic"], report["grader"], report["bootstrap"]
    arms = report["arms"]
    lines = [
        "# Downstream DR grading: real vs real + synthetic vs synthetic",
        "",
        f"Real data `{report['real']['file']}`: {sp['n_train']} training and {sp['n_test']} held-out test images "
        f"(split: {sp['method']}; {sp['n_test_patients']} test patients, {sp['patients_in_both']} on both sides, "
        f"{sp['dropped_for_leakage']} training images dropped for leakage). Test grades: "
        + ", ".join(f"{k}: {v}" for k, v in sp["test_counts"].items()) + ".",
        "",
        f"Synthetic data `{sy['folder']}`: {sy['kept']} images kept of {sy['manifest_rows']} manifest rows "
        f"({sy['n_skipped']} skipped). Grades: " + ", ".join(f"{k}: {v}" for k, v in sy["counts"].items()) + ".",
        "",
        f"Grader: {gr['network']} at {gr['config']['resolution']} px; every arm {gr['config']['steps']} steps x batch "
        f"{gr['config']['batch_size']}, AdamW lr {gr['config']['lr']:g}, {gr['loss']}; augmentation: {gr['augmentation']}; "
        f"seed {gr['seed']}; device {gr['device']}.",
        "",
        f"Intervals: {bs['level']:.0%} percentile bootstrap over the {sp['n_test']} test images, {bs['n']} resamples "
        f"(seed {bs['seed']}), the same resamples for every arm.",
        "",
        "| Arm | Train images (real + synthetic) | Epochs | QWK | Balanced accuracy | AUROC referable (grade >= 2) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm, a in arms.items():
        m = a["metrics"]
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | {a['n_train_real']} + {a['n_train_synthetic']} | {a['epochs']:.1f} "
                     f"| {_fmt(m['qwk'])} | {_fmt(m['balanced_accuracy'])} | {_fmt(m['auroc_referable'])} |")
    lines += ["", "Recall per grade (n/a: the grade is absent from the test set):", "",
              "| Arm | " + " | ".join(f"grade {g} (n={sp['test_counts'][str(g)]})" for g in range(NUM_GRADES)) + " |",
              "| --- |" + " --- |" * NUM_GRADES]
    for arm, a in arms.items():
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | "
                     + " | ".join(_fmt(a["metrics"]["recall"][str(g)], 2) for g in range(NUM_GRADES)) + " |")
    deltas = {arm: a["delta_vs_real_only"] for arm, a in arms.items() if a.get("delta_vs_real_only")}
    if deltas:
        lines += ["", "Difference from real only (paired bootstrap; an interval excluding 0 is a clear difference):", "",
                  "| Arm | QWK | Balanced accuracy | AUROC referable |", "| --- | --- | --- | --- |"]
        for arm, d in deltas.items():
            lines.append(f"| {ARM_TITLES.get(arm, arm)} | {_fmt(d['qwk'], signed=True)} | "
                         f"{_fmt(d['balanced_accuracy'], signed=True)} | {_fmt(d['auroc_referable'], signed=True)} |")
    undefined = [f"{ARM_TITLES.get(arm, arm)} {name}: {a['metrics'][name]['reason']}"
                 for arm, a in arms.items() for name in ("qwk", "balanced_accuracy", "auroc_referable")
                 if a["metrics"][name]["value"] is None]
    if undefined:
        lines += ["", "Undefined metrics:", ""] + [f"- {u}" for u in undefined]
    lines += ["", "Confusion matrices (rows: true grade, columns: predicted; colour: fraction of the row):", ""]
    lines += [f"![{ARM_TITLES.get(arm, arm)}]({a['confusion_png']})" for arm, a in arms.items()]
    if sy["skipped"]:
        lines += ["", f"Skipped synthetic rows ({sy['n_skipped']}; first 20):", ""]
        lines += [f"- line {s['line']} `{s['file']}`: {s['reason']}" for s in sy["skipped"][:20]]
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", f"retinagen {report['retinagen_version']}, {report['created']}, {report['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per arm for a terminal: QWK, balanced accuracy and AUROC with intervals."""
    return [f"{ARM_TITLES.get(arm, arm):17s} QWK {_fmt(a['metrics']['qwk'])}  bal.acc {_fmt(a['metrics']['balanced_accuracy'])}"
            f"  AUROC(>=2) {_fmt(a['metrics']['auroc_referable'])}" for arm, a in report["arms"].items()]


def run_downstream(
    real_zip: str | Path,
    synthetic_dir: str | Path,
    out_dir: str | Path,
    *,
    preset: str = "cpu",
    seed: int = 0,
    n_bootstrap: int = 1000,
    config: GraderConfig | None = None,
    test_fraction: float = 0.2,
    device: str | None = None,
    report_name: str = "REPORT.json",
    save_graders: bool = True,
    level: float = 0.95,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the three arms, evaluate them on the real test set, write the report; returns it (as in REPORT.json).

    Args:
        real_zip: prepared dataset with DR grades (``retinagen prepare``).
        synthetic_dir: folder with PNGs + ``manifest.csv`` (``retinagen rebalance`` / ``generate``).
        out_dir: where ``report_name`` (REPORT.json), its ``.md``, ``<stem>_files/confusion-<arm>.png``
            and ``graders/<arm>.safetensors`` (+ .json) go.
        preset: `PRESETS` key (ignored when ``config`` is given); device overrides its device.
        seed: grader initialisation, batch order and augmentation (the same for every arm), the
            patient split when the ZIP has none, and the bootstrap resamples.
        n_bootstrap: resamples of the test set for the intervals.
        test_fraction: test share of patients when the split is made here.
    """
    t_start = time.perf_counter()
    if n_bootstrap < 1:
        raise ConfigError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    cfg = config if config is not None else grader_config(preset)
    if device is not None:
        cfg = replace(cfg, device=device)
    out_dir = Path(out_dir)
    json_path = out_dir / report_name
    files = out_dir / f"{json_path.stem}_files"

    real = ZipImageDataset(real_zip)
    split = split_real(real, seed=seed, test_fraction=test_fraction)
    synth = load_synthetic_folder(synthetic_dir, progress=progress)

    res = cfg.resolution
    train_real = GradedImages.from_zip(real, split.train, res)
    test = GradedImages.from_zip(real, split.test, res)
    synth_imgs = synth.images(res)
    for part, what in ((train_real, "real train"), (synth_imgs, "synthetic"), (test, "real test")):
        if part.nbytes <= cfg.cache_max_bytes:
            part.load(progress=progress, description=f"load {what} images")
    arm_data = {
        "real_only": train_real,
        "real_plus_synthetic": train_real.concat(synth_imgs),
        "synthetic_only": synth_imgs,
    }
    y_test = test.labels
    indices = bootstrap_indices(len(y_test), n_bootstrap, seed)

    arms: dict[str, Any] = {}
    samples: dict[str, dict[str, np.ndarray]] = {}
    dev_name = ""
    for arm in ARMS:
        arms[arm], samples[arm], dev_name = _run_arm(arm, arm_data[arm], test, cfg, seed, indices, level, files,
                                                     out_dir if save_graders else None, real_zip, real, synth, progress)

    for arm in ARMS[1:]:
        a, r = arms[arm]["metrics"], arms["real_only"]["metrics"]
        arms[arm]["delta_vs_real_only"] = {
            name: _delta(samples[arm][name], samples["real_only"][name], a[name]["value"], r[name]["value"], level)
            for name in ("qwk", "balanced_accuracy", "auroc_referable")
        }

    notes = _notes(split, synth)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "retinagen_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "real": {"file": Path(real_zip).name, "fingerprint": real.fingerprint(), "resolution": real.resolution,
                 "n_images": len(real)},
        "split": split.summary(real.labels),
        "synthetic": synth.summary(),
        "grader": {
            "preset": None if config is not None else preset,
            "network": ARCH_DESCRIPTIONS[cfg.arch],
            "config": cfg.to_json(),
            "loss": LOSS_DESCRIPTIONS[cfg.loss],
            "augmentation": cfg.augmentation_description(),
            "optimizer": "AdamW, linear warm-up then cosine decay to 0",
            "seed": seed,
            "device": dev_name,
            "torch_threads": torch.get_num_threads(),
        },
        "bootstrap": {"n": n_bootstrap, "seed": seed, "level": level,
                      "method": "percentile; test images resampled with replacement; the same resamples for every arm"},
        "arms": arms,
        "notes": notes,
        "total_seconds": time.perf_counter() - t_start,
    }
    report = jsonable(report)
    atomic_write_json(json_path, report)
    atomic_write_text(json_path.with_suffix(".md"), render_markdown(report))
    return report


def _run_arm(arm: str, data: GradedImages, test: GradedImages, cfg: GraderConfig, seed: int, indices: np.ndarray,
             level: float, files: Path, graders_dir: Path | None, real_zip: str | Path, real: ZipImageDataset,
             synth: Any, progress: bool) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """Train one arm's grader, test it, draw its confusion matrix and (with ``graders_dir``) save it: its report
    entry, its bootstrap samples (for the paired differences) and the device it trained on."""
    grader = train_grader(data, cfg, seed=seed, progress=progress, description=f"train {arm}")
    proba = _predict_dataset(grader, test, cfg, progress, f"test {arm}")
    metrics, samples = evaluate_predictions(test.labels, proba, indices=indices, level=level)
    png_name = f"confusion-{arm}.png"
    title = f"{ARM_TITLES[arm]}: QWK {_fmt(metrics['qwk'])}"
    atomic_write_bytes(files / png_name, confusion_png(metrics["confusion_matrix"], title))
    tr = grader.meta["training"]
    entry: dict[str, Any] = {
        "n_train": tr["n_images"],
        "n_train_real": tr["n_real"],
        "n_train_synthetic": tr["n_synthetic"],
        "train_counts": tr["counts"],
        "epochs": tr["epochs"],
        "train_seconds": tr["seconds"],
        "train_cpu_seconds": tr["cpu_seconds"],
        "final_loss": tr["final_loss"],
        "metrics": metrics,
        "confusion_png": f"{files.name}/{png_name}",
    }
    if graders_dir is not None:
        grader.meta["trained_on"] = {"arm": arm, "real": Path(real_zip).name, "real_fingerprint": real.fingerprint(),
                                     "synthetic": synth.folder.name}
        saved = save_grader(grader, graders_dir / "graders" / arm)
        entry["grader_file"] = str(saved.relative_to(graders_dir))
    return entry, samples, str(grader.device)


def _notes(split: Any, synth: Any) -> list[str]:
    notes = [
        "Synthetic images must come from a generator trained on the real training split only "
        "(`retinagen train` uses the ZIP's train split by default); a generator that saw test images would leak them.",
        "Every arm starts from the same initial weights and trains for the same number of steps and batch size, "
        "so the arms differ only in their training images.",
    ]
    if split.dropped_for_leakage:
        notes.append(f"{split.dropped_for_leakage} training images were dropped: their patient is in the test set.")
    if synth.unlisted:
        notes.append(f"{synth.unlisted} PNG files in the synthetic folder are not in manifest.csv and were ignored.")
    return notes
