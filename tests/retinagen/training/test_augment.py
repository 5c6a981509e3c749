"""Adaptive discriminator augmentation: the transforms, the p controller, and p across a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from retinagen.config import load_run_config, parse_overrides
from retinagen.errors import ConfigError
from retinagen.training.augment import DEFAULT_TRANSFORMS, TRANSFORMS, AugmentPipe
from retinagen.training.checkpoint import latest_valid_checkpoint, load_checkpoint
from retinagen.training.loop import train


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fundus_like(n: int = 8, res: int = 32) -> torch.Tensor:
    """Bright discs on black, in [-1, 1], each with its own colour."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
    disc = ((xx**2 + yy**2) < 0.6).float()
    colour = torch.rand(n, 3, 1, 1, generator=_gen(5)) * 0.8 + 0.1
    return (disc * colour) * 2 - 1


def test_p_zero_is_the_identity_and_p_one_changes_every_image() -> None:
    x = _fundus_like()
    assert torch.equal(AugmentPipe(p=0.0)(x, _gen()), x)
    y = AugmentPipe(p=1.0)(x, _gen())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ((y - x).abs().flatten(1).amax(1) > 0.05).all()


@pytest.mark.parametrize("name", TRANSFORMS)
def test_each_transform_alone_changes_images_and_is_deterministic(name: str) -> None:
    x = _fundus_like()
    pipe = AugmentPipe([name], p=1.0)
    a, b = pipe(x, _gen(1)), pipe(x, _gen(1))
    assert torch.equal(a, b)
    changed = (a - x).abs().flatten(1).amax(1) > 1e-3
    # The discs here are symmetric under mirroring and quarter turns, so those two are seen on images made
    # asymmetric first. xflip mirrors with probability p / 2 (it never leaks); rot90 draws k = 0 a quarter of
    # the time.
    if name in ("xflip", "rot90"):
        x = x.clone()
        x[:, :, :, :4] = 1.0
        a = pipe(x, _gen(1))
        changed = (a - x).abs().flatten(1).amax(1) > 1e-3
        assert 0 < changed.sum() < len(x), (name, changed)
    else:
        assert changed.all(), name


def test_geometric_transforms_pad_with_black_and_gradients_pass() -> None:
    black = -torch.ones(4, 3, 32, 32)
    out = AugmentPipe(["rotate", "scale", "translate", "aniso"], p=1.0)(black, _gen())
    assert torch.allclose(out, black, atol=1e-6)  # the surround that comes in from outside is black, not grey
    x = _fundus_like(4).requires_grad_(True)
    AugmentPipe(p=1.0)(x, _gen()).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # G's gradient reaches through the augmentation


def test_processes_augment_their_rows_as_one_process_would() -> None:
    x = _fundus_like(8)
    pipe = AugmentPipe(p=0.7)
    whole = pipe(x, _gen(3))
    halves = torch.cat([pipe(x[:4], _gen(3), rank=0, world=2), pipe(x[4:], _gen(3), rank=1, world=2)])
    assert torch.allclose(whole, halves, atol=1e-6)


def test_ada_raises_p_for_an_overfitting_d_and_lowers_it_otherwise() -> None:
    pipe = AugmentPipe(p=0.0, mode="ada", target=0.6, speed_kimg=1.0, interval=4)
    step_size = 16 * 4 / 1000.0
    confident = torch.full((16,), 3.0)  # D is sure of every real image: r_t = 1 > 0.6
    for step in range(1, 41):
        pipe.accumulate(confident)
        pipe.adjust(step, batch=16)
    assert pipe.last_rt == 1.0 and pipe.p == pytest.approx(10 * step_size)
    unsure = torch.tensor([1.0, -1.0] * 8)  # r_t = 0 < 0.6
    for step in range(41, 400):
        pipe.accumulate(unsure)
        pipe.adjust(step, batch=16)
    assert pipe.p == 0.0 and pipe.last_rt == 0.0  # clamped, never negative
    fixed = AugmentPipe(p=0.3, mode="fixed")
    for step in range(1, 9):
        fixed.accumulate(confident)
        fixed.adjust(step, batch=16)
    assert fixed.p == 0.3


def test_unknown_transforms_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown augmentation"):
        AugmentPipe(["sharpen"])
    with pytest.raises(ConfigError, match="transforms"):
        load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(["augment.transforms=[sharpen]"]))
    assert load_run_config("synthfundus", preset="smoke").augment.transforms == DEFAULT_TRANSFORMS


def _ada_cfg(data: Path, *extra: str):
    # speed 0.05 kimg: p moves 0.32 per adjustment of 4 steps x 4 images, so a smoke run sees it move.
    sets = [f"data.path={data}", "augment.mode=ada", "augment.speed_kimg=0.05", "augment.target=0.1", *extra]
    return load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(sets))


@pytest.mark.parametrize("q_input", ["clean", "augmented"])
def test_ada_in_training_logs_p_and_resumes_exactly(synth_zip_16: Path, tmp_path: Path, q_input: str) -> None:
    cfg = _ada_cfg(synth_zip_16, f"augment.q_input={q_input}", "augment.p=0.5")
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "halves", progress=False, max_steps=4)
    train(cfg, tmp_path / "halves", resume=True, progress=False)
    a = load_checkpoint(latest_valid_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = load_checkpoint(latest_valid_checkpoint(tmp_path / "halves" / "checkpoints"))
    assert a.meta["step"] == b.meta["step"] == 8
    assert "augment.state" in a.tensors
    for key in (k for k in a.tensors if k != "rng.torch_cpu"):
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    rows = [json.loads(x) for x in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    ps = [r["augment/p"] for r in rows if "augment/p" in r]
    assert len(ps) == 8 and all(0.0 <= p <= 1.0 for p in ps)
    assert len(set(ps)) > 1  # p moved (every 4 steps)
    assert "augment/rt" in rows[-1]


def test_augmentation_off_leaves_training_as_it_was(synth_zip_16: Path, tmp_path: Path) -> None:
    """mode off: no augment state, nothing drawn from the latent stream (the same weights as fixed p = 0)."""
    base = [f"data.path={synth_zip_16}"]
    off = load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(base))
    zero = load_run_config("synthfundus", preset="smoke",
                           overrides=parse_overrides([*base, "augment.mode=fixed", "augment.p=0"]))
    train(off, tmp_path / "off", progress=False, max_steps=3)
    train(zero, tmp_path / "zero", progress=False, max_steps=3)
    a = load_checkpoint(latest_valid_checkpoint(tmp_path / "off" / "checkpoints"))
    b = load_checkpoint(latest_valid_checkpoint(tmp_path / "zero" / "checkpoints"))
    assert "augment.state" not in a.tensors and "augment.state" in b.tensors
    for key in (k for k in a.tensors if k.startswith(("G.", "D."))):
        assert torch.equal(a.tensors[key], b.tensors[key]), key
