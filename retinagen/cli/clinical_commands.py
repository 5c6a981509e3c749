"""``retinagen rebalance``, ``downstream`` and ``anomaly ...``: the clinical uses of a model."""

from __future__ import annotations

from typing import Annotated

import typer

from retinagen.cli.app import (
    AnomalyScorerName,
    Preset,
    Split,
    anomaly_app,
    app,
    usage_error,
)
from retinagen.errors import RetinagenError
from retinagen.options import (
    Assignment,
    Checkpoint,
    Count,
    CountAtLeast2,
    DatasetZip,
    Device,
    FactorMap,
    Grader,
    GradesOrAll,
    JsonOutput,
    Multiplier,
    OutputDir,
    OutputFile,
    Probability,
    ReadableDir,
    ReadablePath,
    RebalanceTarget,
    Scorer,
    ScorerList,
    Seed,
    Switch,
    UnitInterval,
)

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
        usage_error("--gate-threshold and --max-tries-factor need --grader (they set its quality gate)")
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
