"""benchmarks/code_carriers.py: which frequencies carry the codes, how much of the variety z' makes."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from retinagen.latent import LatentSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import code_carriers  # noqa: E402

SPEC = LatentSpec(z_dim=8, categorical=(2,), n_bernoulli=0, n_uniform=0)
R = 16
CHECKER = (torch.arange(R).view(-1, 1) + torch.arange(R).view(1, -1)) % 2 * 2.0 - 1.0  # +-1 at Nyquist


def _sign(code: torch.Tensor) -> torch.Tensor:
    return (code[:, 1] * 2 - 1).view(-1, 1, 1, 1)  # the categorical(2) code as -1 / +1


def _content_g(z: torch.Tensor, code: torch.Tensor, grade: object) -> torch.Tensor:
    """Codes in the image's brightness; z' ignored."""
    return (0.5 * _sign(code)).expand(-1, 3, R, R).clone()


def _grain_g(z: torch.Tensor, code: torch.Tensor, grade: object) -> torch.Tensor:
    """Codes in a checkerboard's sign; z' sets a smooth brightness."""
    ramp = torch.linspace(-1, 1, R).view(1, 1, 1, R)
    return 0.3 * _sign(code) * CHECKER + 0.3 * torch.tanh(z[:, :1]).view(-1, 1, 1, 1) * ramp.expand(-1, 3, R, R)


def _q(read: str):
    def d(img: torch.Tensor, grade: object) -> SimpleNamespace:
        s = img.mean(dim=(1, 2, 3)) if read == "mean" else (img * CHECKER).mean(dim=(1, 2, 3))
        return SimpleNamespace(q_params=torch.stack([-20 * s, 20 * s], dim=1))
    return d


def test_codes_in_the_content_survive_the_blur_and_follow_image_a() -> None:
    r = code_carriers.score_models(_content_g, _q("mean"), SPEC, 0, 64, 1.0)
    log2 = math.log(2)
    assert r["clean"] == pytest.approx(log2, abs=0.01) and r["blur"] == pytest.approx(log2, abs=0.01)
    assert r["hyb_a"] == pytest.approx(log2, abs=0.01) and r["hyb_b"] < -1.0
    assert r["z_share"] == 0.0 and r["c_share"] > 0.9 and r["hf"] < 1e-6


def test_codes_in_grain_vanish_under_the_blur_and_follow_image_b() -> None:
    r = code_carriers.score_models(_grain_g, _q("checker"), SPEC, 0, 64, 1.0)
    assert r["clean"] == pytest.approx(math.log(2), abs=0.01)
    assert abs(r["blur"]) < 0.05  # Q is left guessing: log Q = log 1/2 = -H(C)
    assert r["hyb_b"] == pytest.approx(math.log(2), abs=0.05) and r["hyb_a"] < 0.1
    assert 0.0 < r["z_share"] < 1.0 and r["hf"] > 0.3


def test_hf_share_of_smooth_and_noisy_images() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 3, 32, 32, generator=g)
    smooth = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32)
    assert code_carriers.hf_share(noise, 1.0) > 0.5 > 0.01 > code_carriers.hf_share(smooth, 1.0)


def test_a_run_of_the_trainer_gets_one_row_per_checkpoint(synth_zip_16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from retinagen.config import load_run_config, parse_overrides
    from retinagen.training.loop import train

    cfg = load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(
        ["train.kimg=0.032", "train.snapshot_kimg=0.016", "train.keep_checkpoints=5", f"data.path={synth_zip_16}"]))
    train(cfg, tmp_path / "run", progress=False)
    code_carriers.main([str(tmp_path / "run"), "--n", "8", "--grid", str(tmp_path / "z.png")])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 0.0")]
    assert [ln.split(" | ")[0] for ln in rows] == ["| 0.016", "| 0.032"]
    from PIL import Image

    with Image.open(tmp_path / "z_run.png") as im:  # 2 snapshots x 8 images, 16 px drawn at 64
        assert im.size == (8 * 64, 2 * 64)
    with pytest.raises(SystemExit, match="--n must be"):
        code_carriers.main([str(tmp_path / "run"), "--n", "1"])
    with pytest.raises(SystemExit, match="no checkpoints"):
        code_carriers.main([str(tmp_path)])
