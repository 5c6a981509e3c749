"""``retinagen train``, ``generate`` and ``traverse``: training a model and drawing from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from retinagen.cli.app import (
    Preset,
    TrainDataset,
    app,
)
from retinagen.errors import RetinagenError
from retinagen.options import (
    Assignment,
    Checkpoint,
    ConfigOverrides,
    ConfigYaml,
    Count,
    CountAtLeast2,
    Dataset,
    FactorMap,
    Grade,
    OutputDir,
    OutputFile,
    PositiveFloat,
    RunFolder,
    Seed,
    Switch,
    Text,
)
from retinagen.run_dir import RunDir

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
        ck_dir = RunDir(run_dir).checkpoints
        if ck_dir.is_dir() and any(ck_dir.iterdir()):
            raise RetinagenError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, or pick a new --out")
    from retinagen.training.grade_guide import check_grade_guide

    check_grade_guide(cfg.loss.grade_guide, cfg.model.conditional)  # before the judges are built (minutes)
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
        write_traversal_grids(model, RunDir(run_dir).traversals)
    state = "stopped" if summary.stopped_early else (
        f"time budget of {cfg.train.max_minutes:g} min reached" if summary.budget_reached else "finished")
    typer.echo(
        f"{state}: {summary.images_seen / 1000:.2f} kimg in {summary.elapsed_s:.0f} s ({summary.images_per_s:.1f} img/s); "
        f"run folder {run_dir} (checkpoints/, samples/, traversals/, metrics.jsonl)"
    )
    from retinagen.training.snapshots import BEST_PREFIX

    best = sorted(RunDir(run_dir).checkpoints.glob(f"{BEST_PREFIX}*.json"))
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
