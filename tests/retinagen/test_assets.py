"""The shipped model: how it is built (make_shipped) and that the copy inside the package works."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retinagen.config import load_run_config
from retinagen.errors import CheckpointError, RetinagenError
from retinagen.training.checkpoint import latest_valid_checkpoint, load_checkpoint
from retinagen.training.loop import train


@pytest.fixture(scope="module")
def smoke_run(smoke_run_master: Path, synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's smoke run with its prepared ZIP in RUN/data, as `retinagen train` leaves one."""
    run = Path(shutil.copytree(smoke_run_master, tmp_path_factory.mktemp("ship") / "run"))
    (run / "data").mkdir(exist_ok=True)
    shutil.copy(synth_zip_16, run / "data" / synth_zip_16.name)
    return run


def test_make_shipped_builds_a_relocatable_inference_only_folder(smoke_run: Path, tmp_path: Path) -> None:
    from clinical.anomaly import load_scorer, load_scorer_model
    from retinagen.assets.make_shipped import make_shipped
    from retinagen.generation import generate_images, load_model
    from retinagen.metrics.discovery import load_factor_map

    built = make_shipped(smoke_run, tmp_path / "shipped", discover_n=4)
    moved = Path(shutil.move(str(built), tmp_path / "elsewhere"))  # as if installed somewhere else
    ck = load_checkpoint(latest_valid_checkpoint(moved / "checkpoints"))
    assert ck.has("G_ema") and ck.has("D") and not ck.has("G")
    assert not any(k.startswith(("opt", "rng")) for k in ck.tensors) and ck.meta["inference_only"] is True
    model = load_model(moved)
    imgs, _ = generate_images(model, 2, seed=0)
    assert imgs.shape[0] == 2
    assert load_factor_map(moved / "factors.json")["checkpoint_sha256"] == model.sha256
    scorer = load_scorer(moved / "anomaly" / "scorer")
    assert load_scorer_model(scorer).sha256 == model.sha256  # its recorded checkpoint path is relative
    assert "retinagen train --dataset synthfundus --preset cpu" in (moved / "RECIPE.md").read_text()
    with pytest.raises(CheckpointError):  # training state was dropped: resuming says so
        train(load_run_config("synthfundus", preset="smoke"), moved, resume=True, progress=False)


def test_make_shipped_refuses_runs_it_cannot_ship(tmp_path: Path, smoke_run: Path) -> None:
    from retinagen.assets.make_shipped import make_shipped

    with pytest.raises(RetinagenError, match="no complete checkpoint"):
        make_shipped(tmp_path, tmp_path / "out")
    no_data = Path(shutil.copytree(smoke_run, tmp_path / "nodata"))
    shutil.rmtree(no_data / "data")
    with pytest.raises(RetinagenError, match="prepared ZIP"):
        make_shipped(no_data, tmp_path / "out")


def test_the_shipped_model_in_the_package_works() -> None:
    from clinical.anomaly import load_scorer, load_scorer_model
    from retinagen.assets import shipped_run_dir
    from retinagen.generation import generate_images, load_model

    run = shipped_run_dir()
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    assert size <= 25 * 2**20  # the README's bound: at most 25 MiB
    model = load_model(run)
    assert model.cfg.msi == (1, 1.0, 0) and model.D is not None
    imgs, _ = generate_images(model, 2, seed=0, grade=2)
    assert imgs.shape[1:] == (64, 64, 3)
    assert load_scorer_model(load_scorer(run / "anomaly" / "scorer")).sha256 == model.sha256


def test_the_recipe_command_rebuilds_the_runs_config(smoke_run: Path) -> None:
    import json
    import shlex

    from retinagen.assets.make_shipped import train_command
    from retinagen.config import parse_overrides

    stored = json.loads((smoke_run / "config.json").read_text())
    stored["augment"]["mode"], stored["model"]["grow_from"] = "ada", 4  # settings the cpu preset lacks
    stored["train"]["max_minutes"] = None
    args = shlex.split(train_command(stored, "x"))
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert "--set augment.mode=ada" in train_command(stored, "x")
    overrides = parse_overrides(sets)
    overrides.setdefault("train", {}).update(kimg=float(args[args.index("--kimg") + 1]), max_minutes=None)
    rebuilt = load_run_config("synthfundus", preset="cpu", overrides=overrides)
    got, want = rebuilt.model_dump(mode="json"), dict(stored)
    got["data"].pop("path"), want["data"].pop("path")
    assert got == want


def test_make_shipped_picks_the_best_or_a_named_checkpoint(smoke_run: Path, tmp_path: Path) -> None:
    from retinagen.assets.make_shipped import make_shipped, pick_checkpoint
    from retinagen.generation import load_model
    from retinagen.run_dir import RunDir
    from retinagen.training.checkpoint import copy_checkpoint, list_checkpoints

    run = Path(shutil.copytree(smoke_run, tmp_path / "run"))
    src = RunDir(run)
    for old in src.checkpoints.glob("best-*"):
        old.unlink()
    first, newest = list_checkpoints(src.checkpoints)[0], latest_valid_checkpoint(src.checkpoints)
    assert pick_checkpoint(src) == newest
    assert pick_checkpoint(src, first.stem) == first
    with pytest.raises(RetinagenError, match="no complete best snapshot"):
        pick_checkpoint(src, "best")
    best = copy_checkpoint(first, src.checkpoints / "best-000001", {"quality": {"fd_fundus": 1.0}})
    assert pick_checkpoint(src, "best") == best
    built = make_shipped(run, tmp_path / "shipped", discover_n=4, checkpoint="best")  # loads as any shipped folder
    assert load_model(built).sha256 != load_model(run).sha256  # the first checkpoint's, not the newest's
    assert "--checkpoint best" in (built / "RECIPE.md").read_text()
    best.with_suffix(".safetensors").write_bytes(b"truncated")
    with pytest.raises(RetinagenError, match="no complete best snapshot"):
        pick_checkpoint(src, "best")
    with pytest.raises(RetinagenError, match="no complete checkpoint named 'ckpt-999999'"):
        pick_checkpoint(src, "ckpt-999999")
