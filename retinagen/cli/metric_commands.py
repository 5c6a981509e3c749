"""``retinagen evaluate``, ``compare`` and ``discover``: a checkpoint's metrics and its discovered factors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from retinagen.cli.app import (
    app,
    usage_error,
)
from retinagen.metrics.registry import DEFAULT_METRICS, KNOWN_METRICS, metrics_help
from retinagen.options import (
    AttributeList,
    Checkpoint,
    Count,
    CountAtLeast2,
    DatasetZip,
    Device,
    FactorMap,
    Grade,
    JsonOutput,
    MetricList,
    NonNegativeFloat,
    NonNegativeInt,
    OutputDir,
    OutputFile,
    ReadableFile,
    ReportJson,
    SafetensorsFile,
    Seed,
    Switch,
)

# --------------------------------------------------------------------------------------------------
# Metrics

_DEFAULT_METRICS_TEXT = ",".join(DEFAULT_METRICS)

def _parse_metrics(text: str, known: tuple[str, ...]) -> list[str]:
    """``"fid, mig"`` -> ``["fid", "mig"]``; unknown or no names: usage error (exit 2) listing the valid ones."""
    given = [m.strip() for m in text.split(",") if m.strip()]
    names = [m.lower() for m in given]
    unknown = [g for g, m in zip(given, names, strict=True) if m not in known]
    if unknown or not names:
        usage_error(
            f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(known)}"
        )
    return list(dict.fromkeys(names))  # once each, in the order given


def _training_data_of(tensor_path: Path) -> Path | None:
    """The prepared ZIP a checkpoint was trained on, when it is still on disk.

    The config's ``data.path`` when it is a ZIP file; otherwise (built-in synthetic data, or a folder prepared
    on first use) the one ZIP in the run's ``data/`` folder. None when neither is found.
    """
    import json

    from retinagen.run_dir import RunDir

    try:
        meta = json.loads(tensor_path.with_suffix(".json").read_text(encoding="utf-8"))
        data_path = meta["config"]["data"].get("path")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        data_path = None
    if data_path and Path(data_path).is_file():
        return Path(data_path)
    run = RunDir.of_checkpoint(tensor_path)
    zips = sorted(run.data.glob("*.zip")) if run is not None else []
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
        usage_error("--stats-cache and --no-cache exclude each other")
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
        usage_error(
            f"--data DS.zip is needed: the data {tensor_path.name} was trained on is not on disk "
            "(make a ZIP with `retinagen prepare`, or `retinagen synth` + prepare)"
        )
    typer.echo(f"--data not given: comparing with the checkpoint's training data {data}")
    return data


def _default_factor_map(tensor_path: Path) -> Path | None:
    """RUN/factors.json when it was discovered on this checkpoint; None (discover afresh) otherwise."""
    from retinagen.factor_map import load_factor_map
    from retinagen.fileio import sha256_file
    from retinagen.generation import default_factor_map_path

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
            usage_error(f"--attributes: {exc.args[0]}")
    model = load_model(checkpoint, device, with_discriminator=False)
    if model.spec.n_codes == 0:
        usage_error(f"{model.path}: this model has no latent codes; there is nothing to discover")
    try:
        result = discover_factors(
            model, n=n, steps=steps, seed=seed, probes=probes, progress=progress, grade=grade,
            batch_size=batch_size, min_score=min_score, min_effect=min_effect,
        )
    except ValueError as exc:  # bad numbers (n < 2, ...): the library says which
        usage_error(str(exc))
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
