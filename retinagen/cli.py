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
from typing import Annotated

import typer

from retinagen.errors import RetinagenError

app = typer.Typer(
    name="retinagen",
    help="InfoStyleGAN for retinal fundus images: discover and control attributes, rebalance DR data, score anomalies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
anomaly_app = typer.Typer(help="Anomaly scoring from Q-encoder and discriminator features.", no_args_is_help=True)
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


class Preset(str, Enum):
    smoke = "smoke"
    cpu = "cpu"
    gpu = "gpu"


def _not_built(command: str, issue: str) -> None:
    """A sub-command whose feature is not built yet says so and exits 2; it does not pretend."""
    typer.echo(f"retinagen {command}: not built yet ({issue}).", err=True)
    raise typer.Exit(code=2)


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
    out: Annotated[Path, typer.Option(help="Output folder (EyePACS layout: train/*.jpeg, trainLabels.csv, factors.csv).")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 500,
    resolution: Annotated[int, typer.Option(help="Image side in pixels (16-1024).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same images.")] = 0,
    grades: Annotated[
        str | None, typer.Option(help="DR grade probabilities 0-4, comma separated (default EyePACS-like).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: up to 2).")] = None,
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
    data_root: Annotated[Path, typer.Option(help="Folder holding the raw dataset.")],
    resolution: Annotated[int, typer.Option(help="Output image side in pixels.")],
    out: Annotated[Path, typer.Option(help="Output ZIP (NVlabs dataset layout); a .report.json is written beside it.")],
    labels: Annotated[Path | None, typer.Option(help="Labels CSV (image,label) for --dataset folder/dicom.")] = None,
    ben_graham: Annotated[bool, typer.Option(help="Apply Ben Graham local-contrast normalisation.")] = False,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: up to 2).")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the patient-level train/val/test split.")] = 0,
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
    data: Annotated[Path | None, typer.Option(help="Prepared dataset ZIP (or folder for synthfundus).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config layered on top (e.g. configs/msi/*.yaml).")] = None,
    preset: Annotated[Preset | None, typer.Option(help="Sizes: smoke (seconds), cpu (minutes), gpu (paper).")] = None,
    kimg: Annotated[float | None, typer.Option(help="Training length in thousands of images.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Run folder to resume from.")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override, e.g. --set loss.beta=0.5")] = None,
) -> None:
    """Train an MSI(S, beta, d) model (InfoStyleGAN by default)."""
    import time as _time

    from retinagen.config import deep_merge, load_run_config, parse_overrides
    from retinagen.training.loop import load_run_config_from_dir
    from retinagen.training.loop import train as run_training

    if resume is not None:
        if config is not None or preset is not None or set_ or data is not None:
            raise RetinagenError("--resume continues a run with its own config; only --kimg may be changed")
        cfg = load_run_config_from_dir(resume)
        if kimg is not None:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"kimg": kimg})})
        run_dir = resume
    else:
        flag_layer: dict = {}
        if data is not None:
            flag_layer.setdefault("data", {})["path"] = str(data)
        if kimg is not None:
            flag_layer.setdefault("train", {})["kimg"] = kimg
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
    summary = run_training(cfg, run_dir, resume=resume is not None)
    if summary.last_checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
        from retinagen.generation import load_model, write_traversal_grids

        model = load_model(summary.last_checkpoint, with_discriminator=False)
        write_traversal_grids(model, run_dir / "traversals")
    state = "stopped" if summary.stopped_early else "finished"
    typer.echo(
        f"{state}: {summary.images_seen / 1000:.2f} kimg in {summary.elapsed_s:.0f} s ({summary.images_per_s:.1f} img/s); "
        f"run folder {run_dir} (checkpoints/, samples/, traversals/, metrics.jsonl)"
    )
    if summary.stopped_early:
        typer.echo(f"resume with: retinagen train --resume {run_dir}")


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint (.safetensors).")],
    n: Annotated[int, typer.Option(help="Number of images.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    grade: Annotated[int | None, typer.Option(help="DR grade 0-4 (conditional models).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Fix a code, e.g. --set c4=0.8")] = None,
) -> None:
    """Generate images from a checkpoint (PNGs + manifest.csv marking every image synthetic)."""
    from retinagen.generation import load_model, parse_code_settings, write_generated

    model = load_model(checkpoint, with_discriminator=False)
    codes = parse_code_settings(model.spec, set_, model.factor_names)
    manifest = write_generated(model, out, n, seed, grade=grade, codes=codes)
    typer.echo(f"wrote {n} images and {manifest}")


@app.command()
def traverse(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint (.safetensors).")],
    factor: Annotated[int, typer.Option(help="Index of the code c_i to vary.")],
    out: Annotated[Path, typer.Option(help="Output PNG grid.")],
    steps: Annotated[int, typer.Option(help="Values of the code (rows).")] = 7,
    samples: Annotated[int, typer.Option(help="Other latents resampled (columns).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Write a Figure-1-style traversal grid: rows vary one code, columns resample the rest."""
    from retinagen.fileio import atomic_write_bytes
    from retinagen.generation import load_model, png_bytes, traversal_grid

    model = load_model(checkpoint, with_discriminator=False)
    if not 0 <= factor < model.spec.n_codes:
        raise RetinagenError(f"--factor {factor}: this model has codes 0..{model.spec.n_codes - 1}")
    grid = traversal_grid(model, factor, steps=steps, samples=samples, seed=seed)
    atomic_write_bytes(out, png_bytes(grid))
    typer.echo(f"wrote {out} ({model.spec.code_kinds[factor]} code c{factor}: rows are its values, columns are samples)")


# --------------------------------------------------------------------------------------------------
# Metrics


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint (.safetensors).")],
    data: Annotated[Path, typer.Option(help="Prepared dataset ZIP.")],
    out: Annotated[Path, typer.Option(help="REPORT.json (REPORT.md is written beside it).")],
    metrics: Annotated[str, typer.Option(help="Comma-separated: fid,kid,mig,acm,fd_fundus")] = "fid,kid,mig,acm,fd_fundus",
) -> None:
    """Measure quality (FID/KID, fundus FD) and control (MIG, ACM)."""
    _not_built("evaluate", "issue 4: measuring control and quality")


@app.command()
def discover(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint (.safetensors).")],
    out: Annotated[Path, typer.Option(help="FACTORS.json")],
) -> None:
    """Find which code c_i controls which measurable attribute."""
    _not_built("discover", "issue 4: measuring control and quality")


# --------------------------------------------------------------------------------------------------
# Clinical


@app.command()
def rebalance(
    checkpoint: Annotated[Path, typer.Option(help="DR-grade conditional checkpoint.")],
    data: Annotated[Path, typer.Option(help="Prepared real dataset ZIP.")],
    target: Annotated[str, typer.Option(help="uniform | counts:N0,N1,N2,N3,N4")],
    out: Annotated[Path, typer.Option(help="Output folder for synthetic images + manifest.csv.")],
) -> None:
    """Generate DR-grade-controlled synthetic images to rebalance a training set."""
    _not_built("rebalance", "issue 5: clinical modules")


@app.command()
def downstream(
    real: Annotated[Path, typer.Option(help="Prepared real dataset ZIP.")],
    synthetic: Annotated[Path, typer.Option(help="Folder written by `retinagen rebalance`.")],
    out: Annotated[Path, typer.Option(help="REPORT.json")],
) -> None:
    """Train DR graders on real / real+synthetic / synthetic and compare them on held-out real data."""
    _not_built("downstream", "issue 5: clinical modules")


@anomaly_app.command("fit")
def anomaly_fit(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint (.safetensors).")],
    data: Annotated[Path, typer.Option(help="Prepared dataset ZIP of normal images.")],
    out: Annotated[Path, typer.Option(help="Scorer output path.")],
) -> None:
    """Fit an anomaly scorer on normal images."""
    _not_built("anomaly fit", "issue 5: clinical modules")


@anomaly_app.command("score")
def anomaly_score(
    scorer: Annotated[Path, typer.Option(help="Scorer written by `anomaly fit`.")],
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG/DICOM files or folders.")],
    out: Annotated[Path, typer.Option(help="Output CSV.")],
) -> None:
    """Score images: anomaly score, percentile among normals, flag."""
    _not_built("anomaly score", "issue 5: clinical modules")


@anomaly_app.command("evaluate")
def anomaly_evaluate(
    scorer: Annotated[Path, typer.Option(help="Scorer written by `anomaly fit`.")],
    normal: Annotated[Path, typer.Option(help="Folder of normal images.")],
    abnormal: Annotated[Path, typer.Option(help="Folder of abnormal images.")],
    out: Annotated[Path, typer.Option(help="REPORT.json")],
) -> None:
    """Report AUROC, AUPR and F1 of a scorer."""
    _not_built("anomaly evaluate", "issue 5: clinical modules")


@app.command()
def dashboard(run: Annotated[Path | None, typer.Option(help="Run folder (default: the shipped model).")] = None) -> None:
    """Open the Streamlit dashboard."""
    _not_built("dashboard", "issue 6: the Streamlit dashboard")


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps project errors to exit code 2 and bugs to exit code 1.

    Usage errors (unknown option, bad choice) are reported by the CLI library itself with exit code 2.
    """
    try:
        app(args=argv, prog_name="retinagen")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except RetinagenError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception:  # noqa: BLE001 - the last line of defence: a bug, reported as such
        traceback.print_exc()
        typer.echo("internal error (a bug in retinagen; please report it with the traceback above)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
