"""``retinagen synth`` and ``retinagen prepare``: the built-in synthetic data and prepared dataset ZIPs."""

from __future__ import annotations

from typing import Annotated

import typer

from retinagen.cli.app import (
    PrepareDataset,
    app,
    parse_grades,
)
from retinagen.options import (
    Count,
    GradeProbs,
    OutputDir,
    OutputFile,
    PreparedResolution,
    ReadableDir,
    ReadableFile,
    Seed,
    Switch,
    SynthResolution,
)

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
    workers: Annotated[Count | None, typer.Option(
        help="Worker processes (default: up to 2, 1 under OMP_NUM_THREADS=1).")] = None,
) -> None:
    """Write the built-in procedural fundus dataset with ground-truth factors."""
    parsed = parse_grades(grades)
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
    workers: Annotated[Count | None, typer.Option(
        help="Worker processes (default: up to 2, 1 under OMP_NUM_THREADS=1).")] = None,
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
