"""The ``retinagen`` command line.

Exit codes: 0 success, 2 bad usage or bad input (a `RetinagenError`), 1 internal error (a bug).
Heavy imports (torch, monai) happen inside the commands, so ``retinagen --help`` is instant.
"""

from __future__ import annotations

import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from retinagen.errors import RetinagenError
from retinagen.metrics.registry import DEFAULT_METRICS, KNOWN_METRICS, metrics_help
from retinagen.options import (
    Assignment,
    AttributeList,
    Checkpoint,
    ConfigOverrides,
    ConfigYaml,
    Count,
    CountAtLeast2,
    Dataset,
    DatasetZip,
    Device,
    FactorMap,
    Grade,
    GradeProbs,
    Grader,
    GradesOrAll,
    JsonOutput,
    MetricList,
    Multiplier,
    NonNegativeFloat,
    NonNegativeInt,
    OutputDir,
    OutputFile,
    Port,
    PositiveFloat,
    PreparedResolution,
    Probability,
    ReadableDir,
    ReadableFile,
    ReadablePath,
    RebalanceTarget,
    ReportJson,
    RunFolder,
    SafetensorsFile,
    Scorer,
    ScorerList,
    Seed,
    Switch,
    SynthResolution,
    Text,
    UnitInterval,
    ValidatingTyper,
)

# Every command's options are validated by their kinds (retinagen.options) before the command runs.
app = ValidatingTyper(
    name="retinagen",
    help="InfoStyleGAN for retinal fundus images: discover and control attributes, rebalance DR data, score anomalies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
anomaly_app = ValidatingTyper(help="Anomaly scoring from Q-encoder and discriminator features.", no_args_is_help=True)
app.add_typer(anomaly_app, name="anomaly")


class PrepareDataset(str, Enum):
    eyepacs = "eyepacs"
    aptos = "aptos"
    celeba = "celeba"
    folder = "folder"
    dicom = "dicom"


class TrainDataset(str, Enum):
    synthfundus = "synthfundus"
    eyepacs = "eyepacs"
    aptos = "aptos"
    celeba = "celeba"
    folder = "folder"


class AnomalyScorerName(str, Enum):
    mahalanobis = "mahalanobis"
    knn = "knn"
    fanogan = "fanogan"


class Split(str, Enum):
    train = "train"
    val = "val"
    test = "test"


class Preset(str, Enum):
    smoke = "smoke"
    cpu = "cpu"
    gpu = "gpu"


def _parse_grades(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise RetinagenError(f"--grades must be comma-separated numbers, got {text!r}") from None
    return values


# --------------------------------------------------------------------------------------------------
# Data


@app.command()
def synth(
    out: Annotated[OutputDir, typer.Option(help="Output folder (EyePACS layout: train/*.jpeg, trainLabels.csv, factors.csv).")],
    n: Annotated[Count, typer.Option(help="Number of images.")] = 500,
    resolution: Annotated[SynthResolution, typer.Option(help="Image side in pixels (16-1024).")] = 64,
    seed: Annotated[Seed, typer.Option(help="Seed: the same seed gives the same images.")] = 0,
    grades: Annotated[
        GradeProbs | None, typer.Option(help="DR grade probabilities 0-4, comma separated (default EyePACS-like).")
    ] = None,
    workers: Annotated[Count | None, typer.Option(help="Worker processes (default: up to 2).")] = None,
) -> None:
    """Write the built-in procedural fundus dataset with ground-truth factors."""
    parsed = _parse_grades(grades)
    from retinagen.data.synthetic import DEFAULT_GRADE_PROBS, write_synth_dataset

    probs = parsed or DEFAULT_GRADE_PROBS
    summary = write_synth_dataset(out, n=n, resolution=resolution, seed=seed, grade_probs=probs, workers=workers)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary.grade_counts.items()))
    typer.echo(
        f"wrote {summary.n} images at {summary.resolution} px to {out} in {summary.elapsed_s:.1f} s "
        f"({summary.images_per_s:.0f} img/s); grades {{{counts}}}"
    )


@app.command()
def prepare(
    dataset: Annotated[PrepareDataset, typer.Option(help="Source layout of --data-root.")],
    data_root: Annotated[ReadableDir, typer.Option(help="Folder holding the raw dataset.")],
    resolution: Annotated[PreparedResolution, typer.Option(help="Output image side in pixels.")],
    out: Annotated[OutputFile, typer.Option(help="Output ZIP (NVlabs dataset layout); a .report.json is written beside it.")],
    labels: Annotated[ReadableFile | None, typer.Option(help="Labels CSV (image,label) for --dataset folder/dicom.")] = None,
    ben_graham: Annotated[Switch, typer.Option(help="Apply Ben Graham local-contrast normalisation.")] = False,
    workers: Annotated[Count | None, typer.Option(help="Worker processes (default: up to 2).")] = None,
    split_seed: Annotated[Seed, typer.Option(help="Seed of the patient-level train/val/test split.")] = 0,
) -> None:
    """Preprocess a raw dataset into a ZIP of PNGs + dataset.json, with a report of every rejected file."""
    from retinagen.data.prepare import prepare_dataset

    summary = prepare_dataset(
        dataset.value,
        data_root,
        resolution,
        out,
        labels=labels,
        ben_graham=ben_graham,
        workers=workers,
        split_seed=split_seed,
    )
    typer.echo(
        f"kept {summary.n_kept} of {summary.n_seen} images, rejected {summary.n_rejected} "
        f"({summary.images_per_s:.0f} img/s); report: {summary.report_path}"
    )


# --------------------------------------------------------------------------------------------------
# Training and generation


@app.command()
def train(
    dataset: Annotated[TrainDataset, typer.Option(help="Dataset preset (configs/<dataset>.yaml).")] = TrainDataset.synthfundus,
    data: Annotated[Dataset | None, typer.Option(help="Prepared dataset ZIP (or folder for synthfundus).")] = None,
    config: Annotated[ConfigYaml | None, typer.Option(help="YAML config layered on top (e.g. configs/msi/*.yaml).")] = None,
    preset: Annotated[Preset | None, typer.Option(help="Sizes: smoke (seconds), cpu (minutes), gpu (paper).")] = None,
    kimg: Annotated[PositiveFloat | None, typer.Option(help="Training length in thousands of images.")] = None,
    minutes: Annotated[PositiveFloat | None, typer.Option(help="Wall-clock budget: end cleanly (snapshot, grids) after this many training minutes; kimg stays the upper bound.")] = None,
    out: Annotated[OutputDir | None, typer.Option(help="Run folder.")] = None,
    resume: Annotated[RunFolder | None, typer.Option(help="Run folder to resume from.")] = None,
    seed: Annotated[Seed | None, typer.Option(help="Training seed.")] = None,
    set_: Annotated[ConfigOverrides | None, typer.Option("--set", help="Config override, e.g. --set loss.beta=0.5")] = None,
) -> None:
    """Train an MSI(S, beta, d) model (InfoStyleGAN by default)."""
    import time as _time

    from retinagen.config import deep_merge, load_run_config, parse_overrides
    from retinagen.training.loop import load_run_config_from_dir
    from retinagen.training.loop import train as run_training

    if resume is not None:
        if config is not None or preset is not None or set_ or data is not None:
            raise RetinagenError("--resume continues a run with its own config; only --kimg and --minutes may be changed")
        cfg = load_run_config_from_dir(resume)
        changes = {k: v for k, v in (("kimg", kimg), ("max_minutes", minutes)) if v is not None}
        if changes:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=changes)})
        run_dir = resume
    else:
        flag_layer: dict = {}
        if data is not None:
            flag_layer.setdefault("data", {})["path"] = str(data)
        if kimg is not None:
            flag_layer.setdefault("train", {})["kimg"] = kimg
        if minutes is not None:
            flag_layer.setdefault("train", {})["max_minutes"] = minutes
        if seed is not None:
            flag_layer.setdefault("train", {})["seed"] = seed
        cfg = load_run_config(
            dataset.value,
            preset=preset.value if preset else None,
            config=config,
            overrides=deep_merge(flag_layer, parse_overrides(set_)),
        )
        s, b, dd = cfg.msi
        run_dir = out or Path("runs") / f"{dataset.value}-msi-s{s}-b{b:g}-d{dd}-{_time.strftime('%Y%m%d-%H%M%S')}"
        ck_dir = run_dir / "checkpoints"
        if ck_dir.is_dir() and any(ck_dir.iterdir()):
            raise RetinagenError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, or pick a new --out")
    scorer = None
    if cfg.train.quality_n and cfg.data.dataset != "celeba" and int(os.environ.get("RANK", "0")) == 0:
        from retinagen.metrics.quality import SnapshotScorer

        scorer = SnapshotScorer(cfg)  # builds the fixed judges once per resolution (minutes), then cached
        typer.echo(f"scoring each snapshot on {cfg.train.quality_n} images with judges {scorer.judges.judge_id} "
                   "(metrics.jsonl quality/*; --set train.quality_n=0 turns it off)", err=True)
    summary = run_training(cfg, run_dir, resume=resume is not None, snapshot_score=scorer)
    # Stopped by a signal: the snapshot is written; skip the grids (a scheduler's SIGKILL follows its SIGTERM).
    if summary.last_checkpoint is not None and summary.stop_signal is None and int(os.environ.get("RANK", "0")) == 0:
        from retinagen.generation import load_model, write_traversal_grids

        model = load_model(summary.last_checkpoint, with_discriminator=False)
        write_traversal_grids(model, run_dir / "traversals")
    state = "stopped" if summary.stopped_early else (
        f"time budget of {cfg.train.max_minutes:g} min reached" if summary.budget_reached else "finished")
    typer.echo(
        f"{state}: {summary.images_seen / 1000:.2f} kimg in {summary.elapsed_s:.0f} s ({summary.images_per_s:.1f} img/s); "
        f"run folder {run_dir} (checkpoints/, samples/, traversals/, metrics.jsonl)"
    )
    best = sorted((run_dir / "checkpoints").glob("best-*.json"))
    if best:
        typer.echo(f"best snapshot by fd_fundus: {best[-1].with_suffix('.safetensors')}")
    if summary.stopped_early:
        typer.echo(f"resume with: retinagen train --resume {run_dir}")
    if summary.stop_signal is not None:
        # 130 (SIGINT) / 143 (SIGTERM), as a shell reports a process killed by the signal: `train && evaluate`
        # does not evaluate an unfinished model, and requeue scripts can tell a stop from a finished run.
        raise typer.Exit(code=128 + summary.stop_signal)


@app.command()
def generate(
    checkpoint: Annotated[Checkpoint, typer.Option(help="Checkpoint (.safetensors) or run folder (its newest checkpoint).")],
    n: Annotated[Count, typer.Option(help="Number of images.")],
    out: Annotated[OutputDir, typer.Option(help="Output folder.")],
    grade: Annotated[Grade | None, typer.Option(help="DR grade 0-4 (conditional models).")] = None,
    seed: Annotated[Seed, typer.Option(help="Seed.")] = 0,
    set_: Annotated[
        list[Assignment] | None,
        typer.Option(
            "--set",
            help="Fix a code to a value: by name (--set c4=0.8) or by discovered attribute (--set melanin=0.8, "
            "resolved through the factor map). The value is the code's own: a class, 0/1, or -1..1.",
        ),
    ] = None,
    factors: Annotated[
        FactorMap | None,
        typer.Option(help="Factor map from `retinagen discover` (default: RUN/factors.json of the checkpoint's run)."),
    ] = None,
    dicom: Annotated[
        Switch,
        typer.Option(help="Also write each image as DICOM (Secondary Capture, SyntheticData=YES, no patient data)."),
    ] = False,
) -> None:
    """Generate images from a checkpoint (PNGs + manifest.csv marking every image synthetic)."""
    from retinagen.generation import load_model, parse_code_settings, resolve_code_name, write_generated

    model = load_model(checkpoint, with_discriminator=False)
    names = [item.split("=", 1)[0] for item in set_ or []]
    fmap = _factor_map_for(model, factors, names)
    codes = parse_code_settings(model.spec, set_, model.factor_names, factor_map=fmap)
    for name in dict.fromkeys(x.strip() for x in names):
        idx = resolve_code_name(model.spec, name, model.factor_names, fmap)
        if name != model.spec.code_names[idx]:  # say which code an attribute name set
            typer.echo(f"--set {name}: sets {model.spec.code_kinds[idx]} code {model.spec.code_names[idx]} "
                       f"= {codes[idx]:g}")
    also_write = _dicom_writer(model, out) if dicom else None
    manifest = write_generated(model, out, n, seed, grade=grade, codes=codes, also_write=also_write)
    typer.echo(f"wrote {n} images{' (PNG + DICOM)' if dicom else ''} and {manifest}")


def _dicom_writer(model: Any, out: Path) -> Any:
    """``also_write`` callback: the PNG's twin ``<name>.dcm``, one DICOM series per command."""
    from pydicom.uid import generate_uid

    from clinical.dicom_export import write_synthetic_dicom

    study, series = generate_uid(None), generate_uid(None)
    count = iter(range(1, 1 << 31))

    def write(rgb: Any, row: dict[str, Any]) -> None:
        codes = dict(item.split("=", 1) for item in row["codes"].split())
        write_synthetic_dicom(
            rgb, out / Path(row["file"]).with_suffix(".dcm"), model_name=row["model"],
            checkpoint_sha256=row["checkpoint_sha256"], seed=row["seed"],
            grade=row["level"] if model.num_classes else None, codes={k: float(v) for k, v in codes.items()},
            study_instance_uid=study, series_instance_uid=series, instance_number=next(count), overwrite=True,
        )

    return write


@app.command()
def traverse(
    checkpoint: Annotated[Checkpoint, typer.Option(help="Checkpoint (.safetensors) or run folder (its newest checkpoint).")],
    factor: Annotated[
        Text,
        typer.Option(help="The code to vary: its index (4), name (c4) or discovered attribute (melanin, via the factor map)."),
    ],
    out: Annotated[OutputFile, typer.Option(help="Output PNG grid.")],
    steps: Annotated[CountAtLeast2, typer.Option(help="Values of the code (rows).")] = 7,
    samples: Annotated[Count, typer.Option(help="Other latents resampled (columns).")] = 8,
    seed: Annotated[Seed, typer.Option(help="Seed.")] = 0,
    factors: Annotated[
        FactorMap | None,
        typer.Option(help="Factor map from `retinagen discover` (default: RUN/factors.json of the checkpoint's run)."),
    ] = None,
) -> None:
    """Write a Figure-1-style traversal grid: rows vary one code, columns resample the rest."""
    from retinagen.fileio import atomic_write_bytes
    from retinagen.generation import load_model, png_bytes, resolve_code_name, traversal_grid

    model = load_model(checkpoint, with_discriminator=False)
    fmap = _factor_map_for(model, factors, [factor])
    idx = resolve_code_name(model.spec, factor, model.factor_names, fmap, flag="--factor")
    grid = traversal_grid(model, idx, steps=steps, samples=samples, seed=seed)
    atomic_write_bytes(out, png_bytes(grid))
    code = model.spec.code_names[idx]
    label = "" if factor.strip() in (code, str(idx)) else f" = {factor.strip()}"
    typer.echo(f"wrote {out} ({model.spec.code_kinds[idx]} code {code}{label}: rows are its values, columns are samples)")


def _factor_map_for(model: Any, path: Path | None, names: list[str]) -> dict[str, Any] | None:
    """The factor map to resolve attribute ``names`` with, or None when none is needed or none exists.

    Read when ``path`` is given, or when some name is neither a code index nor a code name (an attribute);
    the default is the checkpoint run's ``factors.json``. A map discovered on another checkpoint is used with
    a warning (its codes may control other attributes in this one).
    """
    from retinagen.generation import find_factor_map

    plain = {*model.spec.code_names, *(str(i) for i in range(model.spec.n_codes))}
    if path is None and all(name.strip() in plain for name in names):
        return None
    found = find_factor_map(model, path)
    if found is None:
        return None
    fmap, where = found
    sha = fmap.get("checkpoint_sha256")
    if sha not in (None, model.sha256):
        typer.echo(
            f"warning: {where} was discovered on another checkpoint (sha256 {str(sha)[:12]}…, this one "
            f"{model.sha256[:12]}…); rerun `retinagen discover` if the attributes look wrong",
            err=True,
        )
    return fmap


# --------------------------------------------------------------------------------------------------
# Metrics

_DEFAULT_METRICS_TEXT = ",".join(DEFAULT_METRICS)

def _parse_metrics(text: str, known: tuple[str, ...]) -> list[str]:
    """``"fid, mig"`` -> ``["fid", "mig"]``; unknown or no names: usage error (exit 2) listing the valid ones."""
    given = [m.strip() for m in text.split(",") if m.strip()]
    names = [m.lower() for m in given]
    unknown = [g for g, m in zip(given, names, strict=True) if m not in known]
    if unknown or not names:
        _usage_error(
            f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(known)}"
        )
    return list(dict.fromkeys(names))  # once each, in the order given


def _usage_error(message: str) -> NoReturn:
    """One line on stderr and exit code 2 (the format `main` uses for a RetinagenError)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _training_data_of(tensor_path: Path) -> Path | None:
    """The prepared ZIP a checkpoint was trained on, when it is still on disk.

    The config's ``data.path`` when it is a ZIP file; otherwise (built-in synthetic data, or a folder prepared
    on first use) the one ZIP in the run's ``data/`` folder. None when neither is found.
    """
    import json

    from retinagen.generation import run_folder_of

    try:
        meta = json.loads(tensor_path.with_suffix(".json").read_text(encoding="utf-8"))
        data_path = meta["config"]["data"].get("path")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        data_path = None
    if data_path and Path(data_path).is_file():
        return Path(data_path)
    run = run_folder_of(tensor_path)
    zips = sorted((run / "data").glob("*.zip")) if run is not None else []
    return zips[0] if len(zips) == 1 else None


def _fmt_pm(sec: dict[str, Any] | None, digits: int = 4) -> str:
    """``mean ± std (repeats × n images)`` of an FD/KID section; a skipped one by its reason's first sentence."""
    if not sec:
        return "not run"
    if sec.get("status") != "ok":
        return "skipped: " + str(sec.get("reason", "")).split(". ")[0]
    return f"{sec['mean']:.{digits}g} ± {sec['std']:.2g}  ({sec['repeats']} × {sec['n_samples']} images)"


def _report_summary(report: dict[str, Any]) -> list[str]:
    """A few lines of `report`'s headline numbers, for the terminal (REPORT.md has everything)."""
    sec = report["metrics"]
    rows: list[tuple[str, str]] = []
    for key in ("fid", "kid"):
        if key in sec:
            rows.append((key.upper(), _fmt_pm(sec[key])))
    if "fd_fundus" in sec:
        fdf = sec["fd_fundus"]
        rows.append(("fd_fundus FD", _fmt_pm(fdf.get("fd"))))
        rows.append(("fd_fundus KID", _fmt_pm(fdf.get("kid"))))
    if "mig" in sec:
        mig = sec["mig"]
        if mig.get("status") == "ok":
            rows.append(("MIG", f"{mig['mig']:.4f}  (max I {mig['max_mi']:.4g} nats; {len(mig['attributes'])} attributes, "
                                f"{mig['n_images']} real images)"))
        else:
            rows.append(("MIG", f"skipped: {mig.get('reason')}"))
    if "acm" in sec:
        acm = sec["acm"]
        if acm.get("status") == "ok":
            for r in acm["rows"]:
                mark = "" if r["assigned"] else ", unassigned"
                rows.append((f"ACM {r['attribute']}", f"{r['percent']:.1f} ± {r['margin95']:.1f} %  ({r['code']}{mark})"))
        else:
            rows.append(("ACM", f"skipped: {acm.get('reason')}"))
    lin = report.get("linfo") or {}
    if lin.get("status") == "ok":
        rows.append(("L_info (discrete)", f"{lin['L_info_discrete_last']:.3f} of bound H(C) {lin['H_discrete']:.3f} nats"))
    width = max(len(k) for k, _ in rows) if rows else 0
    return [f"  {k:<{width}}  {v}" for k, v in rows]


@app.command()
def evaluate(
    checkpoint: Annotated[Checkpoint, typer.Option(help="Checkpoint (.safetensors) or run folder (its newest checkpoint).")],
    out: Annotated[JsonOutput, typer.Option(help="REPORT.json (REPORT.md and REPORT_files/ are written beside it).")],
    data: Annotated[
        DatasetZip | None,
        typer.Option(
            help="Prepared dataset ZIP to compare with (default: the ZIP the checkpoint was trained on, if found).",
        ),
    ] = None,
    metrics: Annotated[MetricList, typer.Option(help=metrics_help())] = _DEFAULT_METRICS_TEXT,
    inception_weights: Annotated[
        ReadableFile | None,
        typer.Option(
            help="Inception-v3 weights for FID/KID (weights-inception-2015-12-05-6726825d.pth); else "
            "$RETINAGEN_INCEPTION_WEIGHTS, else $TORCH_HOME/hub/checkpoints; absent: FID/KID skipped.",
        ),
    ] = None,
    fundus_encoder: Annotated[
        SafetensorsFile | None,
        typer.Option(help="Fundus encoder for fd_fundus (default: train one on --data, cached)."),
    ] = None,
    factors: Annotated[
        FactorMap | None,
        typer.Option(
            help="FACTORS.json from `retinagen discover` (default: RUN/factors.json when it was discovered on this "
            "checkpoint, else discovered now and written beside the report).",
        ),
    ] = None,
    n_samples: Annotated[
        CountAtLeast2 | None, typer.Option(help="Generated images per FID/KID estimate (default: as many as real images, <= 10000).")
    ] = None,
    repeats: Annotated[Count, typer.Option(help="FID/KID estimates, each with its own seed (paper: 5).")] = 5,
    acm_n: Annotated[Count, typer.Option(help="ACM: latents per attribute (paper: 100).")] = 100,
    acm_steps: Annotated[CountAtLeast2, typer.Option(help="ACM: values of a uniform code along a traversal.")] = 7,
    seed: Annotated[Seed, typer.Option(help="Seed: FID/KID use seed..seed+repeats-1, discovery seed, ACM seed+1.")] = 0,
    discovery_n: Annotated[CountAtLeast2, typer.Option(help="Factor discovery (without --factors): latents per code.")] = 32,
    discovery_steps: Annotated[CountAtLeast2, typer.Option(help="Factor discovery: values of a uniform code.")] = 5,
    top_factors: Annotated[NonNegativeInt, typer.Option(help="Traversal grids in the report (top codes).")] = 4,
    mig_limit: Annotated[CountAtLeast2 | None, typer.Option(help="MIG: Q on at most this many real images (default all).")] = None,
    mig_bins: Annotated[CountAtLeast2, typer.Option(help="MIG: bins of a uniform code's range.")] = 20,
    factor_bins: Annotated[CountAtLeast2, typer.Option(help="MIG: quantile bins of a continuous ground-truth factor.")] = 4,
    encoder_epochs: Annotated[Count, typer.Option(help="fd_fundus encoder training (when none is given): epochs.")] = 12,
    encoder_min_steps: Annotated[NonNegativeInt, typer.Option(help="fd_fundus encoder training: at least this many steps.")] = 800,
    encoder_max_images: Annotated[CountAtLeast2 | None, typer.Option(help="fd_fundus encoder training: image limit.")] = 4000,
    stats_cache: Annotated[
        OutputDir | None, typer.Option(help="Cache of real-image statistics and encoders (default ~/.cache/retinagen/stats).")
    ] = None,
    no_cache: Annotated[
        Switch, typer.Option("--no-cache", help="No statistics cache; a trained encoder is kept in the report's folder.")
    ] = False,
    batch_size: Annotated[Count, typer.Option(help="Generator / feature / Q batch size (keep it fixed across models).")] = 64,
    device: Annotated[Device, typer.Option(help="cpu or cuda[:i].")] = "cpu",
    progress: Annotated[Switch, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Measure quality (FID/KID, fundus FD) and control (MIG, ACM); write REPORT.json + REPORT.md."""
    from retinagen.generation import resolve_checkpoint
    from retinagen.metrics.evaluate import evaluate_checkpoint
    from retinagen.metrics.fid import MetricUnavailable, resolve_inception_weights

    wanted = _parse_metrics(metrics, KNOWN_METRICS)
    if no_cache and stats_cache is not None:
        _usage_error("--stats-cache and --no-cache exclude each other")
    tensor_path = resolve_checkpoint(checkpoint)
    data = data if data is not None else _default_evaluation_data(tensor_path)
    if factors is None and ("acm" in wanted or top_factors > 0):
        factors = _default_factor_map(tensor_path)
    if "fid" in wanted or "kid" in wanted:
        try:
            resolve_inception_weights(inception_weights)
        except MetricUnavailable as exc:  # said once up front; the report records it and runs the rest
            typer.echo(f"warning: FID/KID will be skipped. {exc}", err=True)
    report = evaluate_checkpoint(
        tensor_path,
        data,
        out,
        metrics=wanted,
        n_samples=n_samples,
        repeats=repeats,
        inception_weights=inception_weights,
        fundus_encoder=fundus_encoder,
        factor_map=factors,
        acm_n=acm_n,
        seed=seed,
        progress=progress,
        stats_cache=False if no_cache else stats_cache,
        encoder_epochs=encoder_epochs,
        encoder_min_steps=encoder_min_steps,
        encoder_max_images=encoder_max_images,
        discovery_n=discovery_n,
        discovery_steps=discovery_steps,
        acm_steps=acm_steps,
        mig_limit=mig_limit,
        mig_bins=mig_bins,
        factor_bins=factor_bins,
        top_factors=top_factors,
        batch_size=batch_size,
        device=device,
    )
    md = out.with_suffix(".md")
    typer.echo(f"{report['model']['msi']} at step {report['model']['step']} against {Path(report['data']['path']).name} "
               f"({report['data']['n_images']} images), {report['total_seconds']:.1f} s:")
    for line in _report_summary(report):
        typer.echo(line)
    fm = (report.get("factor_map") or {}).get("path")
    if fm and (report.get("factor_map") or {}).get("discovered_now"):
        typer.echo(f"factor map discovered now: {out.parent / fm}")
    typer.echo(f"wrote {out} and {md} (images in {out.parent / (out.stem + '_files')})")


def _default_evaluation_data(tensor_path: Path) -> Path:
    """The ZIP the checkpoint was trained on, when it is on disk; else a usage error asking for --data."""
    data = _training_data_of(tensor_path)
    if data is None:
        _usage_error(
            f"--data DS.zip is needed: the data {tensor_path.name} was trained on is not on disk "
            "(make a ZIP with `retinagen prepare`, or `retinagen synth` + prepare)"
        )
    typer.echo(f"--data not given: comparing with the checkpoint's training data {data}")
    return data


def _default_factor_map(tensor_path: Path) -> Path | None:
    """RUN/factors.json when it was discovered on this checkpoint; None (discover afresh) otherwise."""
    from retinagen.factor_map import load_factor_map
    from retinagen.generation import default_factor_map_path
    from retinagen.training.checkpoint import sha256_file

    candidate = default_factor_map_path(tensor_path)
    if not candidate.is_file():
        return None
    if load_factor_map(candidate).get("checkpoint_sha256") == sha256_file(tensor_path):
        typer.echo(f"using the factor map {candidate}")
        return candidate
    typer.echo(f"{candidate} was discovered on another checkpoint: discovering factors afresh "
               "(pass --factors to use it anyway)")
    return None


@app.command()
def compare(
    reports: Annotated[list[ReportJson], typer.Argument(help="REPORT.json files written by `retinagen evaluate`.")],
    out: Annotated[OutputFile | None, typer.Option(help="Also write the table to this Markdown file.")] = None,
) -> None:
    """Compare evaluation reports side by side: FID, fd_fundus, MIG, max I, best ACM (a Markdown table)."""
    from retinagen.fileio import atomic_write_text
    from retinagen.metrics.report import compare_reports, load_report

    table = compare_reports([load_report(p) for p in reports])
    typer.echo(table, nl=False)
    if out is not None:
        atomic_write_text(out, table)
        typer.echo(f"wrote {out}")


@app.command()
def discover(
    checkpoint: Annotated[Checkpoint, typer.Option(help="Checkpoint (.safetensors) or run folder (its newest checkpoint).")],
    out: Annotated[
        OutputFile | None,
        typer.Option(help="FACTORS.json (default: RUN/factors.json, where generate/traverse/evaluate look for it)."),
    ] = None,
    n: Annotated[CountAtLeast2, typer.Option(help="Latents per code (>= 2).")] = 32,
    steps: Annotated[CountAtLeast2, typer.Option(help="Values of a uniform code along its traversal (>= 2).")] = 5,
    seed: Annotated[Seed, typer.Option(help="Latent seed.")] = 0,
    grade: Annotated[Grade | None, typer.Option(help="Fix the DR grade of a conditional model (default: sampled).")] = None,
    attributes: Annotated[
        AttributeList | None, typer.Option(help="Comma-separated attribute probes (default: all), e.g. melanin,glare.")
    ] = None,
    min_score: Annotated[NonNegativeFloat, typer.Option(help="Smallest |effect| x consistency that assigns an attribute.")] = 0.5,
    min_effect: Annotated[NonNegativeFloat, typer.Option(help="Smallest monotone change counted consistent, in SDs.")] = 0.25,
    top: Annotated[Count, typer.Option(help="Rows of the ranked table printed.")] = 20,
    batch_size: Annotated[Count, typer.Option(help="Generator batch size (does not change the result).")] = 64,
    device: Annotated[Device, typer.Option(help="cpu or cuda[:i].")] = "cpu",
    progress: Annotated[Switch, typer.Option(help="Progress bar on stderr.")] = True,
) -> None:
    """Find which code c_i controls which measurable attribute; write the factor map (FACTORS.json)."""
    from retinagen.generation import default_factor_map_path, load_model
    from retinagen.metrics.attributes import resolve_attribute
    from retinagen.metrics.discovery import discover_factors, format_table, save_factor_map

    probes = None
    if attributes is not None:
        try:
            probes = [resolve_attribute(a.strip()) for a in attributes.split(",") if a.strip()]
        except KeyError as exc:
            _usage_error(f"--attributes: {exc.args[0]}")
    model = load_model(checkpoint, device, with_discriminator=False)
    if model.spec.n_codes == 0:
        _usage_error(f"{model.path}: this model has no latent codes; there is nothing to discover")
    try:
        result = discover_factors(
            model, n=n, steps=steps, seed=seed, probes=probes, progress=progress, grade=grade,
            batch_size=batch_size, min_score=min_score, min_effect=min_effect,
        )
    except ValueError as exc:  # bad numbers (n < 2, ...): the library says which
        _usage_error(str(exc))
    path = save_factor_map(result, out or default_factor_map_path(model.path))
    typer.echo(format_table(result, top=top))
    assigned = {c: a for c, a in result.assignment.items() if a is not None}
    if assigned:
        typer.echo("assigned (* above): " + ", ".join(f"{c} -> {a}" for c, a in assigned.items()))
        code, attr = next(iter(assigned.items()))
        value = "0.8" if model.spec.code_kinds[model.spec.code_names.index(code)] == "uniform" else "1"
        typer.echo(f"e.g. retinagen generate --checkpoint {checkpoint} --set {attr}={value} --n 16 --out DIR")
    else:
        typer.echo(f"no code controls an attribute consistently enough (score >= {min_score:g})")
    typer.echo(f"wrote {path}")


# --------------------------------------------------------------------------------------------------
# Clinical


@app.command()
def rebalance(
    checkpoint: Annotated[Checkpoint, typer.Option(help="DR-grade conditional checkpoint (.safetensors) or run folder.")],
    data: Annotated[DatasetZip, typer.Option(help="Prepared real dataset ZIP (`retinagen prepare`); its train split is counted.")],
    target: Annotated[
        RebalanceTarget,
        typer.Option(help="uniform (every grade up to the largest) | counts:G=N,... (synthetic images per grade, "
                          "e.g. counts:0=0,1=500,2=300) | ratio:R (every grade up to R x the largest, 0 < R <= 1)."),
    ],
    out: Annotated[
        OutputDir,
        typer.Option(help="Output folder (not inside the real data's folder): train/*.png, manifest.csv, "
                          "trainLabels.csv + labels.csv (merged real + synthetic), rebalance_report.json."),
    ],
    seed: Annotated[Seed, typer.Option(help="Seed: same seed, same images; rerun to resume.")] = 0,
    grader: Annotated[
        Grader | None, typer.Option(help="DR grader checkpoint (`retinagen downstream` writes them) for the quality gate.")
    ] = None,
    gate_threshold: Annotated[
        UnitInterval | None, typer.Option(help="Keep an image only if the grader gives its grade at least this probability [default: 0.5].")
    ] = None,
    max_tries_factor: Annotated[
        Multiplier | None, typer.Option(help="With --grader: at most ceil(requested x this) tries per grade [default: 4].")
    ] = None,
    steer: Annotated[
        list[Assignment] | None,
        typer.Option(help="Steer a code: NAME=spread (even over its range) or NAME=VALUE (fixed); NAME is a code "
                          "(c4) or a discovered attribute (pigmentation, via the factor map). Repeatable."),
    ] = None,
    factors: Annotated[
        FactorMap | None,
        typer.Option(help="Factor map from `retinagen discover` (default: RUN/factors.json of the checkpoint's run)."),
    ] = None,
    copy_real: Annotated[
        Switch, typer.Option(help="Copy the real training images into OUT/train and write the merged label files.")
    ] = True,
    real_root: Annotated[
        list[ReadableDir] | None, typer.Option(help="Raw real data folder(s) OUT must not be inside (the ZIP's folder always is).")
    ] = None,
    batch_size: Annotated[Count, typer.Option(help="Images per generator / grader batch.")] = 64,
    device: Annotated[Device, typer.Option(help="Torch device for the generator and grader (cpu, cuda, cuda:1).")] = "cpu",
    progress: Annotated[Switch, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Generate DR-grade-controlled synthetic images to rebalance a training set (quality-gated, resumable)."""
    from clinical.rebalance import DEFAULT_MAX_TRIES_FACTOR
    from clinical.rebalance import rebalance as run_rebalance

    if grader is None and (gate_threshold is not None or max_tries_factor is not None):
        _usage_error("--gate-threshold and --max-tries-factor need --grader (they set its quality gate)")
    summary = run_rebalance(
        checkpoint,
        data,
        out,
        target=target,
        seed=seed,
        steer=steer,
        factors=factors,
        grader=grader,
        gate_threshold=0.5 if gate_threshold is None else gate_threshold,
        max_tries_factor=DEFAULT_MAX_TRIES_FACTOR if max_tries_factor is None else max_tries_factor,
        copy_real=copy_real,
        real_roots=real_root or (),
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    typer.echo("grade  real  requested  generated  tries  rejected  after")
    for g, (r, q, n, t, x) in enumerate(zip(summary.real_counts, summary.requested, summary.generated,
                                              summary.tries, summary.rejected, strict=True)):
        typer.echo(f"{g:>5}  {r:>4}  {q:>9}  {n:>9}  {t:>5}  {x:>8}  {r + n:>5}")
    for warning in summary.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(
        f"{sum(summary.generated)} synthetic images ({summary.written} written, {summary.reused} verified and kept, "
        f"{summary.images_per_s:.1f} img/s); report: {summary.report_path}"
    )
    if not summary.target_met:
        typer.echo(
            f"warning: target not met (shortfall per grade {summary.shortfall}); the gate rejected too many tries "
            "-- raise --max-tries-factor or lower --gate-threshold and rerun into a new folder",
            err=True,
        )


@app.command()
def downstream(
    real: Annotated[DatasetZip, typer.Option(help="Prepared real dataset ZIP with DR grades (`retinagen prepare`).")],
    synthetic: Annotated[ReadableDir, typer.Option(help="Folder of synthetic PNGs + manifest.csv (`retinagen rebalance`).")],
    out: Annotated[JsonOutput, typer.Option(help="REPORT.json (REPORT.md, REPORT_files/ and graders/ are written beside it).")],
    preset: Annotated[
        Preset, typer.Option(help="Grader size: smoke (seconds), cpu (small DenseNet, 32 px, minutes), gpu (DenseNet121, 256 px).")
    ] = Preset.cpu,
    seed: Annotated[Seed, typer.Option(help="Seed: grader init, batch order, augmentation, split (if the ZIP has none), bootstrap.")] = 0,
    n_bootstrap: Annotated[Count, typer.Option(help="Bootstrap resamples of the test set for the 95 % intervals.")] = 1000,
    test_fraction: Annotated[Probability, typer.Option(help="Test share of patients when the ZIP has no test split.")] = 0.2,
    device: Annotated[Device | None, typer.Option(help="cpu or cuda[:i] (default: CUDA when available).")] = None,
    progress: Annotated[Switch, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Train DR graders on real / real+synthetic / synthetic and compare them on held-out real data."""
    from clinical.grader import run_downstream, summary_lines

    report = run_downstream(
        real,
        synthetic,
        out.parent,
        preset=preset.value,
        seed=seed,
        n_bootstrap=n_bootstrap,
        test_fraction=test_fraction,
        device=device,
        report_name=out.name,
        progress=progress,
    )
    sp, sy = report["split"], report["synthetic"]
    typer.echo(
        f"test: {sp['n_test']} real images ({sp['method']} split, {sp['n_test_patients']} patients); "
        f"synthetic: {sy['kept']} kept, {sy['n_skipped']} skipped"
    )
    for line in summary_lines(report):
        typer.echo(line)
    typer.echo(f"wrote {out}, {out.with_suffix('.md')} and graders in {out.parent / 'graders'}")


@anomaly_app.command("fit")
def anomaly_fit(
    checkpoint: Annotated[
        Checkpoint, typer.Option(help="Checkpoint (.safetensors) or run folder; must hold D and Q.")
    ],
    data: Annotated[DatasetZip, typer.Option(help="Prepared dataset ZIP holding the reference normal images.")],
    out: Annotated[OutputFile, typer.Option(help="Scorer path: writes OUT.safetensors + OUT.json.")],
    scorer: Annotated[
        AnomalyScorerName, typer.Option(help="Density / reconstruction model.")
    ] = AnomalyScorerName.mahalanobis,
    fpr: Annotated[
        Probability, typer.Option(help="False-positive rate the threshold is calibrated to on held-out normals.")
    ] = 0.05,
    normal_grades: Annotated[
        GradesOrAll,
        typer.Option(help="Labels that count as normal, comma separated, or 'all' (unlabelled data: all)."),
    ] = "0",
    split: Annotated[
        Split | None, typer.Option(help="Use only this split of the ZIP: train, val or test.")
    ] = None,
    calibration_fraction: Annotated[
        Probability, typer.Option(help="Share of the normals held out for calibration.")
    ] = 0.25,
    max_images: Annotated[
        CountAtLeast2 | None, typer.Option(help="Use at most this many normals (seeded subset).")
    ] = None,
    seed: Annotated[
        Seed, typer.Option(help="Seed of the fit/calibration split (and of f-AnoGAN's encoder).")
    ] = 0,
    option: Annotated[
        list[Assignment] | None,
        typer.Option("--option", help="Scorer option KEY=VALUE, e.g. --option k=10, --option steps=50"),
    ] = None,
) -> None:
    """Fit an anomaly scorer on normal images and calibrate its threshold."""
    from clinical.anomaly import fit_scorer, parse_options
    from retinagen.generation import load_model

    grades = (
        None if normal_grades.strip().lower() == "all" else _parse_int_list(normal_grades, "--normal-grades")
    )
    model = load_model(checkpoint, with_discriminator=True)
    fitted = fit_scorer(
        model,
        data,
        method=scorer.value,
        options=parse_options(option),
        fpr=fpr,
        normal_grades=grades,
        split=None if split is None else split.value,
        calibration_fraction=calibration_fraction,
        seed=seed,
        max_images=max_images,
    )
    meta = fitted.save(out)
    info = fitted.info
    typer.echo(
        f"fitted {scorer.value} on {info['n_fit']} normal images ({info['normals']}), threshold {fitted.threshold:.4g} "
        f"calibrated on {info['n_calibration']} held-out normals (FPR there {info['calibration_fpr']:.3f}, target {fpr:g}); "
        f"wrote {meta} and {meta.with_suffix('.safetensors')}"
    )


def _parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    from retinagen.options import parse_grades

    try:
        return parse_grades(text)
    except ValueError as exc:
        raise RetinagenError(f"{flag}: {exc}") from None


@anomaly_app.command("score")
def anomaly_score(
    scorer: Annotated[
        Scorer, typer.Option(help="Scorer written by `anomaly fit` (OUT, OUT.json or OUT.safetensors).")
    ],
    images: Annotated[
        list[ReadablePath], typer.Argument(help="PNG/JPEG/DICOM files or folders (searched recursively).")
    ],
    out: Annotated[
        OutputFile, typer.Option(help="Output CSV: file, flag, score, percentile, threshold, top_features, reason.")
    ],
    checkpoint: Annotated[
        Checkpoint | None,
        typer.Option(help="The checkpoint the scorer was fitted on (default: the path it recorded)."),
    ] = None,
    batch_size: Annotated[Count, typer.Option(help="Images scored per batch.")] = 64,
) -> None:
    """Score images: anomaly score, percentile among normals, flag, and the features that drove it."""
    from collections import Counter

    from clinical.anomaly import expand_inputs, load_scorer, load_scorer_model, score_files, write_scores_csv

    fitted = load_scorer(scorer)
    if not expand_inputs(images):
        raise RetinagenError("no image or DICOM files found in the given paths")
    model = load_scorer_model(fitted, checkpoint)
    results = score_files(fitted, model, images, batch_size=batch_size)
    write_scores_csv(results, out, fitted.threshold)
    n = Counter(r.flag for r in results)
    typer.echo(
        f"scored {len(results)} files with {fitted.method.name}: {n['anomaly']} anomalous, {n['normal']} normal, "
        f"{n['no_fundus']} with no detectable fundus (not scored), {n['unreadable']} unreadable; wrote {out}"
    )


@anomaly_app.command("evaluate")
def anomaly_evaluate(
    scorer: Annotated[Scorer, typer.Option(help="Scorer written by `anomaly fit`.")],
    normal: Annotated[ReadableDir, typer.Option(help="Folder of normal images (PNG/JPEG/DICOM).")],
    abnormal: Annotated[ReadableDir, typer.Option(help="Folder of abnormal images (PNG/JPEG/DICOM).")],
    out: Annotated[JsonOutput, typer.Option(help="REPORT.json")],
    checkpoint: Annotated[
        Checkpoint | None,
        typer.Option(help="The checkpoint the scorer was fitted on (default: the path it recorded)."),
    ] = None,
) -> None:
    """Report image AUROC, AUPR and F1 at the calibrated threshold (no-fundus images count as flagged)."""
    from clinical.anomaly import evaluate as evaluate_scorer
    from clinical.anomaly import load_scorer, load_scorer_model
    from retinagen.fileio import atomic_write_json

    for flag, folder in (("--normal", normal), ("--abnormal", abnormal)):
        if not folder.is_dir():
            raise RetinagenError(f"{flag} {folder}: not a folder")
    fitted = load_scorer(scorer)
    model = load_scorer_model(fitted, checkpoint)
    report = evaluate_scorer(fitted, [normal], [abnormal], model=model)
    atomic_write_json(out, report)
    m = report["metrics"]
    if m["auroc"] is None:
        raise RetinagenError("nothing to evaluate: one of the folders has no scorable or no-fundus images")
    typer.echo(
        f"AUROC {m['auroc']:.3f}, AUPR {m['aupr']:.3f}, F1 {m['f1']:.3f} at threshold {fitted.threshold:.4g} "
        f"(TPR {m['tpr']:.3f}, FPR {m['fpr']:.3f}) on {m['n_normal']} normal / {m['n_abnormal']} abnormal images; "
        f"wrote {out}"
    )


@anomaly_app.command("benchmark")
def anomaly_benchmark(
    checkpoint: Annotated[
        Checkpoint, typer.Option(help="Checkpoint (.safetensors) or run folder of a fundus model.")
    ],
    data: Annotated[
        DatasetZip, typer.Option(help="Prepared, DR-graded fundus ZIP (e.g. the run's synthetic data).")
    ],
    out: Annotated[JsonOutput, typer.Option(help="REPORT.json (a Markdown table REPORT.md is written beside it).")],
    scorers: Annotated[ScorerList, typer.Option(help="Comma-separated scorers.")] = "mahalanobis,knn,fanogan",
    max_per_type: Annotated[
        CountAtLeast2 | None, typer.Option(help="Cap every image set (bounds f-AnoGAN's time).")
    ] = None,
    fpr: Annotated[Probability, typer.Option(help="Calibrated false-positive rate.")] = 0.05,
    seed: Annotated[Seed, typer.Option(help="Seed of subsets, corruptions and crops.")] = 0,
) -> None:
    """AUROC per anomaly type (referable DR, faces, natural images, corrupted fundus) per scorer."""
    from clinical.anomaly import benchmark_markdown, run_benchmark
    from retinagen.fileio import atomic_write_json, atomic_write_text

    names = tuple(s.strip() for s in scorers.split(",") if s.strip())
    result = run_benchmark(checkpoint, data, scorers=names, fpr=fpr, seed=seed, max_per_type=max_per_type)
    atomic_write_json(out, result)
    md = benchmark_markdown(result)
    atomic_write_text(out.with_suffix(".md"), md)
    typer.echo(md)
    typer.echo(f"wrote {out} and {out.with_suffix('.md')}")


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


# --------------------------------------------------------------------------------------------------


def _usage_error_line(exc: Exception) -> str:
    """A typer/click usage error (unknown option, bad choice, missing option) as one ``error:`` line."""
    ctx = getattr(exc, "ctx", None)
    message = " ".join(str(exc.format_message()).split()).replace("Value error, ", "")  # type: ignore[attr-defined]
    hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return f"error: {message}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad usage and project errors exit 2 with one ``error:`` line, bugs exit 1 with a traceback.

    Exit codes: 0 success; 1 internal error (a bug); 2 bad usage or bad input; 130 / 143 a `train` stopped by
    SIGINT (Ctrl-C) / SIGTERM after writing its snapshot (128 + the signal's number, as a shell reports it).
    """
    click_exceptions = _click_exceptions()
    try:
        # standalone_mode=False: usage errors come back here as exceptions, so they get the same one-line
        # format as every other bad input instead of click's multi-line box.
        result = app(args=argv, prog_name="retinagen", standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except click_exceptions.NoArgsIsHelpError as exc:
        typer.echo(exc.format_message(), err=True)
        return 2
    except click_exceptions.ClickException as exc:
        typer.echo(_usage_error_line(exc), err=True)
        return exc.exit_code if exc.exit_code else 2
    except typer.Abort:
        typer.echo("interrupted", err=True)
        return 130
    except RetinagenError as exc:
        first, *rest = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        typer.echo(f"error: {first} {'; '.join(rest)}".rstrip(), err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, reported as such
        from retinagen.fileio import storage_error_message

        # A full disk or an unwritable output is the machine's state, not a bug: one line, exit 2.
        # A failed write() names no file; then the command's --out is named instead.
        args = list(sys.argv[1:] if argv is None else argv)
        out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), None) or next(
            (nxt for a, nxt in zip(args, args[1:], strict=False) if a == "--out"), None
        )
        if (message := storage_error_message(exc, writing=out)) is not None:
            typer.echo(f"error: {message}", err=True)
            return 2
        traceback.print_exc()
        typer.echo("internal error (a bug in retinagen; please report it with the traceback above)", err=True)
        return 1
    # A command's exit code: typer.Exit(code) comes back as the return value in non-standalone mode.
    return result if isinstance(result, int) else 0


def _click_exceptions() -> Any:
    """The click exception module typer uses: its vendored copy (typer >= 0.2x) or click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer depends on click
        from click import exceptions
    if not hasattr(exceptions, "NoArgsIsHelpError"):  # click < 8.2 prints the help itself
        exceptions.NoArgsIsHelpError = type("NoArgsIsHelpError", (Exception,), {})
    return exceptions


if __name__ == "__main__":
    sys.exit(main())
