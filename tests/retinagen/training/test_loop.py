"""The training loop: smoke runs of every MSI variant, exact resume, clear errors, stop signals (DDP on gloo:
test_distributed.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from retinagen.config import configs_dir, load_run_config, parse_overrides
from retinagen.errors import CheckpointError, RetinagenError
from retinagen.networks.build import build_g
from retinagen.training.checkpoint import latest_valid_checkpoint, load_checkpoint
from retinagen.training.loop import StreamSampler, Trainer, load_run_config_from_dir, train

MSI = sorted((configs_dir() / "msi").glob("*.yaml"))


def _cfg(data: Path, *extra: str, config: Path | None = None):
    return load_run_config(
        "synthfundus", preset="smoke", config=config, overrides=parse_overrides([f"data.path={data}", *extra])
    )


@pytest.mark.parametrize("variant", MSI, ids=[p.stem for p in MSI])
def test_every_msi_variant_trains_a_smoke_run(variant: Path, synth_zip_16: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_zip_16, config=variant)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary.steps == 8 and summary.images_seen == 32
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(r["loss/G"])) for r in lines)
    assert "info/L_info" in lines[-1] and lines[-1]["info/H_discrete"] == pytest.approx(
        __import__("math").log(3) + 7 * __import__("math").log(2)
    )
    assert any("loss/R1" in r for r in lines)  # lazy R1 ran (every 16 steps, including step 0)
    ck = latest_valid_checkpoint(tmp_path / "run" / "checkpoints")
    assert ck is not None and load_checkpoint(ck).meta["msi"] == cfg.msi_name
    assert (tmp_path / "run" / "config.json").is_file()
    assert (tmp_path / "run" / "samples" / "reals.png").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("fakes-*.png"))[-1] == "fakes-000008.png"


def test_resume_is_exact(synth_zip_16: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_zip_16)
    train(cfg, tmp_path / "straight", progress=False)
    half = train(cfg, tmp_path / "halves", progress=False, max_steps=4)
    assert half.stopped_early and half.steps == 4
    train(cfg, tmp_path / "halves", resume=True, progress=False)
    a = load_checkpoint(latest_valid_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = load_checkpoint(latest_valid_checkpoint(tmp_path / "halves" / "checkpoints"))
    assert a.meta["step"] == b.meta["step"] == 8
    # Weights, EMA, optimizer moments and the training generator's state all match bit for bit. The
    # process-global torch RNG is not used by training (DataLoader draws its base seed from it when an
    # iterator starts, which differs between one run and two), so it is left out.
    compared = [k for k in a.tensors if k != "rng.torch_cpu"]
    assert any(k.startswith("G_ema.") for k in compared) and "rng.latent" in compared
    for key in compared:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    # The metrics log has each step once after the resume.
    steps = [json.loads(x)["step"] for x in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_with_another_config_is_refused(synth_zip_16: Path, tmp_path: Path) -> None:
    train(_cfg(synth_zip_16), tmp_path / "run", progress=False, max_steps=2)
    other = _cfg(synth_zip_16, "model.w_dim=48")
    with pytest.raises(CheckpointError, match="model.w_dim"):
        train(other, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(_cfg(synth_zip_16), tmp_path / "empty", resume=True, progress=False)


def test_wrong_resolution_and_missing_data(synth_zip_16: Path, tmp_path: Path) -> None:
    with pytest.raises(RetinagenError, match="16 px but model.resolution is 32"):
        train(_cfg(synth_zip_16, "model.resolution=32"), tmp_path / "r", progress=False)
    with pytest.raises(RetinagenError, match="not found"):
        train(_cfg(tmp_path / "nope.zip"), tmp_path / "r2", progress=False)
    eyepacs = load_run_config("eyepacs", preset="smoke")
    with pytest.raises(RetinagenError, match="retinagen prepare"):
        train(eyepacs, tmp_path / "r3", progress=False)


def test_stream_sampler_resumes_and_splits_ranks() -> None:
    full = StreamSampler(10, seed=1, batch=4, rank=0, world=1)
    it = iter(full)
    stream = [next(it) for _ in range(24)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    later = iter(StreamSampler(10, seed=1, batch=4, rank=0, world=1, start=8))
    assert [next(later) for _ in range(16)] == stream[8:24]
    r0 = iter(StreamSampler(10, seed=1, batch=4, rank=0, world=2))
    r1 = iter(StreamSampler(10, seed=1, batch=4, rank=1, world=2))
    merged = []
    for _ in range(3):
        merged += [next(r0), next(r0), next(r1), next(r1)]
    assert merged == stream[:12]


def test_cli_train_generate_traverse(synth_zip_16: Path, tmp_path: Path) -> None:
    from retinagen.cli import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--data", str(synth_zip_16), "--out", str(run)]) == 0
    assert len(list((run / "traversals").glob("c*.png"))) == 18
    # A second train into the same folder is refused (resume instead).
    assert main(["train", "--preset", "smoke", "--data", str(synth_zip_16), "--out", str(run)]) == 2
    out = tmp_path / "gen"
    assert main(["generate", "--checkpoint", str(run), "--n", "5", "--out", str(out), "--grade", "2",
                 "--set", "c4=1", "--seed", "7"]) == 0
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert manifest[0].startswith("file,level,synthetic,seed,codes,checkpoint_sha256")
    assert len(manifest) == 6 and all(",2,1," in row for row in manifest[1:]) and "c4=1" in manifest[1]
    again = tmp_path / "gen2"
    assert main(["generate", "--checkpoint", str(run), "--n", "5", "--out", str(again), "--grade", "2",
                 "--set", "c4=1", "--seed", "7"]) == 0
    for p in sorted(out.glob("*.png")):
        assert p.read_bytes() == (again / p.name).read_bytes()  # same seed, same images
    assert main(["generate", "--checkpoint", str(run), "--n", "2", "--out", str(out), "--set", "c0=5"]) == 2
    assert main(["generate", "--checkpoint", str(run), "--n", "2", "--out", str(out), "--grade", "9"]) == 2
    grid = tmp_path / "grid.png"
    assert main(["traverse", "--checkpoint", str(run), "--factor", "12", "--out", str(grid), "--steps", "5",
                 "--samples", "3"]) == 0
    from PIL import Image

    assert Image.open(grid).size == (3 * 16, 5 * 16)
    assert main(["traverse", "--checkpoint", str(run), "--factor", "99", "--out", str(grid)]) == 2
    bogus = tmp_path / "bogus.safetensors"
    torch.save({"x": torch.zeros(1)}, bogus)
    assert main(["generate", "--checkpoint", str(bogus), "--n", "1", "--out", str(out)]) == 2


# A launcher for torchrun that trains like `python -m retinagen.cli`, then trains the same run again in the same
# processes with the gradient all_reduce turned off, into the folder in argv[1]: the control run showing that
# the DDP test below fails when processes stop averaging gradients (one launch: no second start-up of torchrun
# and its workers).
def _start_training(cmd: list[str], env: dict[str, str], run: Path, timeout_s: float) -> subprocess.Popen[str]:
    """Start a training process in its own session and return once it has logged its first step."""
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not (run / "metrics.jsonl").is_file() or (run / "metrics.jsonl").stat().st_size == 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
    except BaseException:
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_stop_signal_to_the_whole_process_group_saves_a_snapshot(signame: str, synth_zip_16: Path, tmp_path: Path) -> None:
    """Ctrl-C signals every process of the terminal's group, and schedulers (SLURM) or `pkill -f` send
    SIGTERM to every process of a job, DataLoader workers included: the run must still stop cleanly with
    a snapshot (with SIGTERM it used to die with 'DataLoader worker ... killed by signal: Terminated')."""
    import signal

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "retinagen.cli", "train", "--dataset", "synthfundus", "--preset", "smoke",
           "--data", str(synth_zip_16), "--kimg", "100", "--out", str(run), "--set", "train.workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = _start_training(cmd, env, run, timeout_s=120)
    try:
        os.killpg(proc.pid, getattr(signal, signame))
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # 130 / 143 (128 + the signal) after the snapshot, never 0: `train && evaluate` must not evaluate a stopped run.
    assert proc.returncode == 128 + getattr(signal, signame), out
    assert "stopped:" in out and "resume with: retinagen train --resume" in out
    assert latest_valid_checkpoint(run / "checkpoints") is not None


def test_smoke_preset_synthesises_its_own_data(tmp_path: Path) -> None:
    """`retinagen train --dataset synthfundus --preset smoke` with no --data: synth + prepare + train."""
    summary = train(load_run_config("synthfundus", preset="smoke"), tmp_path / "run", progress=False)
    assert summary.last_checkpoint is not None
    zips = list((tmp_path / "run" / "data").glob("*.zip"))
    assert len(zips) == 1
    # Rendered above the model's 16 px: the FOV detector keeps (nearly) every image, frame-cut ones included.
    report = json.loads(zips[0].with_suffix(".report.json").read_text())
    assert report["n_seen"] == 64 and report["n_kept"] >= 62, report["rejected_by_reason"]


def test_a_time_budget_ends_the_run_cleanly(synth_zip_16: Path, tmp_path: Path) -> None:
    from retinagen.cli import main

    # 0.002 min = 0.12 s of training: far fewer than the 10,000 images asked for.
    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--data", str(synth_zip_16), "--out", str(run), "--kimg", "10",
                 "--minutes", "0.002"]) == 0
    last = load_checkpoint(latest_valid_checkpoint(run / "checkpoints"))
    # It stopped at the first step past the budget (a smoke step takes ~30 ms; 2,500 were asked for).
    assert 0 < last.meta["step"] < 100 and last.meta["train_seconds"] >= 0.12
    assert (run / "traversals").is_dir() and any((run / "traversals").iterdir())  # a finished run's grids
    assert json.loads((run / "config.json").read_text())["train"]["max_minutes"] == 0.002
    # Resuming with the budget spent trains no further step; a larger budget continues.
    cfg = load_run_config_from_dir(run)
    again = train(cfg, run, resume=True, progress=False)
    assert again.budget_reached and again.steps == last.meta["step"]
    more = (last.meta["train_seconds"] + 1.0) / 60.0
    assert main(["train", "--resume", str(run), "--minutes", f"{more:.4f}"]) == 0
    assert load_checkpoint(latest_valid_checkpoint(run / "checkpoints")).meta["step"] > last.meta["step"]


def test_the_step_optimises_the_tested_total_losses(
    synth_zip_16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's D and G losses are `total_discriminator_loss` / `total_generator_loss` (the functions
    test_losses.py checks), not sums of its own: replacing them changes what the optimisers see."""
    from retinagen.training import losses

    cfg = _cfg(synth_zip_16, "model.aux_classifier=true", "loss.r1_gamma=0")  # R1 is its own lazy step
    trainer = Trainer(cfg, tmp_path / "run", log=False)
    trainer.grade_probs = torch.full((5,), 0.2)  # set from the dataset's grade counts in a real run
    real = torch.zeros(4, 3, cfg.model.resolution, cfg.model.resolution)
    grade = torch.tensor([0, 1, 2, 3])
    calls: dict[str, list[dict[str, Any]]] = {"D": [], "G": []}
    real_d, real_g = losses.total_discriminator_loss, losses.total_generator_loss

    def spy_d(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["D"].append(kwargs)
        return real_d(*args, **kwargs) * 0.0  # a zero loss: D must not move

    def spy_g(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["G"].append(kwargs)
        return real_g(*args, **kwargs) * 0.0

    monkeypatch.setattr(losses, "total_discriminator_loss", spy_d)
    monkeypatch.setattr(losses, "total_generator_loss", spy_g)
    d_before = {k: v.clone() for k, v in trainer.D.state_dict().items()}
    g_before = {k: v.clone() for k, v in trainer.G.state_dict().items()}
    trainer.train_step(real, grade)
    assert len(calls["D"]) == len(calls["G"]) == 1
    assert calls["D"][0]["neg_log_q"] is not None and calls["D"][0]["grade_ce"] is not None
    assert calls["G"][0]["neg_log_q"] is not None and calls["G"][0]["grade_ce"] is not None
    assert calls["D"][0]["beta"] == calls["G"][0]["beta"] == cfg.loss.beta
    # Adam with a zero gradient leaves every weight where it was: nothing else fed the optimisers.
    assert all(torch.equal(v, d_before[k]) for k, v in trainer.D.state_dict().items())
    moved = [k for k, v in trainer.G.state_dict().items() if not torch.equal(v, g_before[k])]
    assert all("w_avg" in k for k in moved), moved  # only the mapping network's tracked average


def test_a_run_saved_before_newer_settings_existed_resumes(synth_zip_16: Path, tmp_path: Path) -> None:
    """Settings added since a run was saved (absent from its checkpoint and config.json) take their
    defaults, which keep the old behaviour, so the run resumes instead of being refused as another config."""
    cfg = _cfg(synth_zip_16, "train.kimg=0.016")
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    newer = {"loss": ("q_trunk_scale", "beta_rampup_kimg", "mode_seeking", "mode_seeking_pool"), "model": ("grade_entry", "grow_from", "grow_stable_kimg", "grow_fade_kimg")}
    ck_json = latest_valid_checkpoint(run / "checkpoints")
    for path, key in ((ck_json, "config"), (run / "config.json", None)):
        doc = json.loads(path.read_text())
        conf = doc[key] if key else doc
        for section, names in newer.items():
            for name in names:
                del conf[section][name]
        path.write_text(json.dumps(doc))
    again = train(load_run_config_from_dir(run).model_copy(update={"train": cfg.train.model_copy(update={"kimg": 0.032})}),
                  run, resume=True, progress=False)
    assert again.images_seen == 32 and again.steps == 8
    # A setting changed since the save is still refused.
    changed = load_run_config_from_dir(run).model_copy(
        update={"loss": cfg.loss.model_copy(update={"q_trunk_scale": 0.5}), "train": cfg.train.model_copy(update={"kimg": 0.048})})
    with pytest.raises(CheckpointError, match="q_trunk_scale"):
        train(changed, run, resume=True, progress=False)


def test_q_trunk_scale_applies_on_ds_step_only(synth_zip_16: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(_cfg(synth_zip_16, "loss.q_trunk_scale=0.25"), tmp_path / "run", log=False)
    trainer.grade_probs = torch.full((5,), 0.2)
    seen: list[float] = []
    forward = type(trainer.D).forward

    def spy(self: Any, img: torch.Tensor, grade: Any = None, *, q_grad_scale: float = 1.0) -> Any:
        seen.append(q_grad_scale)
        return forward(self, img, grade, q_grad_scale=q_grad_scale)

    monkeypatch.setattr(type(trainer.D), "forward", spy)
    res = trainer.cfg.model.resolution
    trainer.train_step(torch.zeros(4, 3, res, res), torch.tensor([0, 1, 2, 3]))
    # D's step: fakes with the scale, reals without; lazy R1 (step 0) without; G's step without.
    assert seen == [0.25, 1.0, 1.0, 1.0], seen


def test_step_statistics_stay_on_the_device_until_read(synth_zip_16: Path, tmp_path: Path) -> None:
    """No host sync per step: the losses come back as 0-d tensors; `read_stats` turns them into the floats
    metrics.jsonl logs, in the same order, with the Python values (augment p, H(C)) kept."""
    cfg = _cfg(synth_zip_16, "model.aux_classifier=true", "augment.mode=ada")
    trainer = Trainer(cfg, tmp_path / "run", log=False)
    trainer.grade_probs = torch.full((5,), 0.2)
    stats = trainer.train_step(torch.zeros(4, 3, cfg.model.resolution, cfg.model.resolution), torch.tensor([0, 1, 2, 3]))
    assert isinstance(stats["loss/D"], torch.Tensor) and stats["loss/D"].ndim == 0
    assert not stats["loss/G"].requires_grad and isinstance(stats["augment/p"], float)
    floats = Trainer.read_stats(stats)
    assert list(floats) == list(stats) and all(type(v) is float for v in floats.values())
    assert floats["loss/D"] == pytest.approx(float(stats["loss/D"])) and floats["augment/p"] == stats["augment/p"]
    assert floats["info/H_discrete"] == stats["info/H_discrete"]


def test_reused_fakes_are_one_g_forward_with_the_same_update(synth_zip_16: Path, tmp_path: Path) -> None:
    """train.reuse_fakes: one G forward per step, and the step is the ordinary step whose G phase happens to
    draw the D phase's latents and noise again (G is unchanged in between, so the kept graph gives G's true
    gradient)."""
    cfg_reuse = _cfg(synth_zip_16, "model.aux_classifier=true", "train.reuse_fakes=true")
    cfg_plain = _cfg(synth_zip_16, "model.aux_classifier=true")
    reuse, plain = Trainer(cfg_reuse, tmp_path / "a", log=False), Trainer(cfg_plain, tmp_path / "b", log=False)
    for t in (reuse, plain):
        t.grade_probs = torch.full((5,), 0.2)
    forwards = {"reuse": 0, "plain": 0}
    for name, t in (("reuse", reuse), ("plain", plain)):
        run_g = t._run_G

        def counting(*a: Any, _run_g: Any = run_g, _name: str = name, **k: Any) -> torch.Tensor:
            forwards[_name] += 1
            return _run_g(*a, **k)

        t._run_G = counting  # type: ignore[method-assign]
    first: list[Any] = []
    draw = plain._sample_fakes

    def same_latents_twice(n: int) -> Any:  # the plain step's G phase gets the D phase's latents again
        if not first:
            first.append(draw(n))
        return first[0]

    plain._sample_fakes = same_latents_twice  # type: ignore[method-assign]
    noise: list[Any] = []
    draw_noise = plain.G.draw_noise

    def same_noise_twice(*a: Any, **k: Any) -> Any:
        if not noise:
            noise.append(draw_noise(*a, **k))
        return noise[0]

    plain.G.draw_noise = same_noise_twice  # type: ignore[method-assign]
    res = cfg_plain.model.resolution
    real = torch.rand(4, 3, res, res, generator=torch.Generator().manual_seed(3)) * 2 - 1
    grade = torch.tensor([0, 1, 2, 3])
    reuse.train_step(real, grade)
    plain.train_step(real, grade)
    assert forwards == {"reuse": 1, "plain": 2}
    # (Left out: the running means of w, which every forward updates and no loss reads.)
    for module in ("G", "D"):
        a, b = getattr(reuse, module).state_dict(), getattr(plain, module).state_dict()
        for k in a:
            if not k.endswith(("w_avg", "w_avg_class")):
                assert torch.allclose(a[k], b[k], atol=1e-6), (module, k)
    start = Trainer(cfg_plain, tmp_path / "c", log=False).G.parameters()
    moved = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(reuse.G.parameters(), start, strict=True))
    assert moved > 1e-4  # G did take a step


def test_mode_seeking_pairs_the_codes_and_reaches_gs_loss(
    synth_zip_16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With loss.mode_seeking the fakes come in pairs that share codes and grade and differ in z'; G's loss
    gets the MSGAN term of exactly those pairs, with its weight; without it no pairs are drawn."""
    from retinagen.training import losses

    cfg = _cfg(synth_zip_16, "loss.mode_seeking=2.5", "loss.mode_seeking_pool=2")
    trainer = Trainer(cfg, tmp_path / "run", log=False)
    trainer.grade_probs = torch.full((5,), 0.2)
    sample, grade = trainer._sample_fakes(5)
    assert torch.equal(sample.cat[:2], sample.cat[2:4]) and torch.equal(sample.unif[:2], sample.unif[2:4])
    assert torch.equal(grade[:2], grade[2:4]) and not torch.equal(sample.z_noise[:2], sample.z_noise[2:4])
    calls: list[dict[str, Any]] = []
    real_g = losses.total_generator_loss

    def spy_g(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs)
        return real_g(*args, **kwargs)

    pools: list[int] = []
    real_ms = losses.mode_seeking_loss

    def spy_ms(*args: Any, **kwargs: Any) -> torch.Tensor:
        pools.append(kwargs["pool"])
        return real_ms(*args, **kwargs)

    monkeypatch.setattr(losses, "total_generator_loss", spy_g)
    monkeypatch.setattr(losses, "mode_seeking_loss", spy_ms)
    res = cfg.model.resolution
    stats = trainer.train_step(torch.zeros(4, 3, res, res), torch.tensor([0, 1, 2, 3]))
    assert calls[0]["mode_seeking_weight"] == 2.5 and calls[0]["mode_seeking"] is not None and pools == [2]
    assert torch.isfinite(calls[0]["mode_seeking"]) and float(stats["loss/mode_seeking"]) > 0

    plain = Trainer(_cfg(synth_zip_16), tmp_path / "plain", log=False)
    plain.grade_probs = torch.full((5,), 0.2)
    s2, _ = plain._sample_fakes(4)
    assert not torch.equal(s2.unif[:2], s2.unif[2:4])
    stats = plain.train_step(torch.zeros(4, 3, res, res), torch.tensor([0, 1, 2, 3]))
    assert "loss/mode_seeking" not in stats


def test_mode_seeking_needs_two_images_per_process_and_a_pool_inside_the_image(synth_zip_16: Path,
                                                                              tmp_path: Path) -> None:
    with pytest.raises(RetinagenError, match="mode_seeking needs at least 2 images per process"):
        Trainer(_cfg(synth_zip_16, "loss.mode_seeking=1", "train.batch_size=1"), tmp_path / "run", log=False)
    with pytest.raises(RetinagenError, match="mode_seeking_pool 32 is larger than the 16 px"):
        Trainer(_cfg(synth_zip_16, "loss.mode_seeking=1", "loss.mode_seeking_pool=32"), tmp_path / "run", log=False)


def test_progressive_growing_steps_through_its_stages_and_resumes_exactly(synth_zip_16: Path, tmp_path: Path) -> None:
    grow = ("model.grow_from=4", "model.grow_stable_kimg=0.008", "model.grow_fade_kimg=0.004")
    cfg = _cfg(synth_zip_16, *grow)
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "halves", progress=False, max_steps=3)  # stops inside the 8 px fade
    mid = load_checkpoint(latest_valid_checkpoint(tmp_path / "halves" / "checkpoints"))
    assert int(mid.tensors["G_ema.synthesis.grow.stage_res"]) == 8 and float(mid.tensors["D.grow.alpha"]) < 1
    train(cfg, tmp_path / "halves", resume=True, progress=False)
    a = load_checkpoint(latest_valid_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = load_checkpoint(latest_valid_checkpoint(tmp_path / "halves" / "checkpoints"))
    for key in (k for k in a.tensors if k != "rng.torch_cpu"):
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    # 4 images a step: 2 steps at 4 px, the 8 px fade (1 step), 2 steps at 8 px, the 16 px fade, then 16 px.
    assert [(r["grow/resolution"], r["grow/alpha"]) for r in rows] == [
        (4, 1.0), (4, 1.0), (8, 0.0), (8, 1.0), (8, 1.0), (16, 0.0), (16, 1.0), (16, 1.0)]
    # The upper blocks learn only once grown: after 2 steps at 4 px the 16 px block is still its init.
    early = train(cfg, tmp_path / "early", progress=False, max_steps=2).last_checkpoint
    assert early is not None
    torch.manual_seed(cfg.train.seed)  # the trainer's parameter init
    init = build_g(cfg).state_dict()["synthesis.blocks.2.conv1.weight"]
    key = "G.synthesis.blocks.2.conv1.weight"
    assert torch.equal(load_checkpoint(early).tensors[key], init) and not torch.equal(a.tensors[key], init)
