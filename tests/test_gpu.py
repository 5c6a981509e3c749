"""CUDA checks: `python -m pytest -m gpu` on a machine with an NVIDIA GPU.

Skipped (with the reason) where CUDA is absent, and deselected from the default run by the `gpu` marker.
Each test is small (16 px smoke preset, seconds on a GPU) so the set runs in a short device session.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retinagen.config import load_run_config, parse_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine"),
]


def _cfg(data: Path, *extra: str):
    return load_run_config("synthfundus", preset="smoke",
                           overrides=parse_overrides([f"data.path={data}", "train.device=cuda", *extra]))


def _losses(run: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_bf16_autocast_training_steps_on_cuda(synth_zip_16: Path, tmp_path: Path) -> None:
    from retinagen.training.loop import Trainer, train

    cfg = _cfg(synth_zip_16, "train.amp=bf16")
    assert Trainer(cfg, tmp_path / "probe", log=False).amp_dtype == torch.bfloat16
    summary = train(cfg, tmp_path / "run", progress=False)
    rows = _losses(tmp_path / "run")
    assert summary.steps == len(rows) == 8
    for key in ("loss/G", "loss/D", "info/L_info"):
        assert all(math.isfinite(r[key]) for r in rows if key in r), key


def test_compiled_training_on_cuda_matches_eager_losses(synth_zip_16: Path, tmp_path: Path) -> None:
    from retinagen.training.loop import train

    train(_cfg(synth_zip_16, "train.amp=off"), tmp_path / "eager", progress=False, max_steps=3)
    train(_cfg(synth_zip_16, "train.amp=off", "train.compile=true"), tmp_path / "compiled", progress=False,
          max_steps=3)
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss/G"] == pytest.approx(a["loss/G"], rel=1e-2, abs=1e-3)
        assert b["loss/D"] == pytest.approx(a["loss/D"], rel=1e-2, abs=1e-3)


def test_generation_on_cuda_is_deterministic(synth_zip_16: Path, tmp_path: Path) -> None:
    from retinagen.generation import generate_images, load_model
    from retinagen.training.loop import train

    train(_cfg(synth_zip_16), tmp_path / "run", progress=False, max_steps=2)
    model = load_model(tmp_path / "run", device="cuda", with_discriminator=False)
    a, info_a = generate_images(model, 6, seed=11)
    b, info_b = generate_images(model, 6, seed=11)
    c, _ = generate_images(model, 6, seed=12)
    assert a.shape == (6, 16, 16, 3) and (a == b).all() and (info_a["values"] == info_b["values"]).all()
    assert not (a == c).all()


def test_torchrun_one_process_trains_over_nccl(synth_zip_16: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 1` joins an NCCL process group and averages gradients through it."""
    launcher, count = tmp_path / "count.py", tmp_path / "calls.txt"
    launcher.write_text(
        "import atexit, sys\n"
        "import torch.distributed as dist\n"
        "calls, real, out = [], dist.all_reduce, sys.argv.pop(1)\n"
        "def counting(*a, **k):\n"
        "    calls.append(dist.get_backend())\n"
        "    return real(*a, **k)\n"
        "dist.all_reduce = counting\n"
        "atexit.register(lambda: open(out, 'w').write(' '.join(calls)))\n"
        "from retinagen.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(launcher),
           str(count), "train", "--preset", "smoke", "--data", str(synth_zip_16), "--out", str(run),
           "--set", "train.device=cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    backends = count.read_text().split()
    assert len(backends) >= 16 and set(backends) == {"nccl"}, backends
    assert (run / "checkpoints").is_dir() and _losses(run)


def test_resume_on_cuda_continues_the_run(synth_zip_16: Path, tmp_path: Path) -> None:
    """8 steps in one go and 4 + 4 with a resume between them end at the same weights: bit for bit where
    the GPU's kernels are deterministic, and within float rounding otherwise (the message says which)."""
    from retinagen.training.checkpoint import latest_valid_checkpoint, load_checkpoint
    from retinagen.training.loop import train

    cfg = _cfg(synth_zip_16)
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "halves", progress=False, max_steps=4)
    train(cfg, tmp_path / "halves", resume=True, progress=False)
    a = load_checkpoint(latest_valid_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = load_checkpoint(latest_valid_checkpoint(tmp_path / "halves" / "checkpoints"))
    assert a.meta["step"] == b.meta["step"] == 8
    names = [k for k in a.tensors if k.startswith(("G.", "D.")) and a.tensors[k].is_floating_point()
             and not k.endswith(("mapping.w_avg", "mapping.w_avg_class"))]
    exact = all(torch.equal(a.tensors[k], b.tensors[k]) for k in names)
    from retinagen.training.loop import Trainer

    init = Trainer(cfg, tmp_path / "init", log=False)
    start = {f"G.{k}": v.cpu() for k, v in init.G.state_dict().items()}
    start.update({f"D.{k}": v.cpu() for k, v in init.D.state_dict().items()})
    diff = sum(float((a.tensors[k].double() - b.tensors[k].double()).square().sum()) for k in names)
    moved = sum(float((a.tensors[k].double() - start[k].double()).square().sum()) for k in names)
    rel = (diff / moved) ** 0.5  # how far the two runs disagree, relative to how far training moved them
    print(f"CUDA resume: bit-exact {exact}, relative difference of the updates {rel:.2e}")
    assert exact or rel < 1e-2, rel
    assert torch.equal(a.tensors["rng.latent"], b.tensors["rng.latent"])
