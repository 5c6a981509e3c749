"""Progressive growing: the stage schedule, and G and D at each stage (what they read, what they skip)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retinagen.config import load_run_config, parse_overrides
from retinagen.errors import ConfigError
from retinagen.latent import LatentSpec
from retinagen.networks.discriminator import Discriminator
from retinagen.networks.generator import StyleGenerator, build_generator
from retinagen.networks.grow import grow_resolutions, grow_stage, set_grow_stage

SPEC = LatentSpec(z_dim=24, categorical=(3,), n_bernoulli=2, n_uniform=3)
TINY = {"channel_base": 128, "channel_max": 16}


def test_the_schedule_holds_fades_and_ends_at_full_resolution() -> None:
    assert grow_resolutions(8, 32) == [8, 16, 32]
    stage = [grow_stage(k, 8, 32, stable_kimg=4, fade_kimg=2) for k in (0, 3.99, 4, 5, 6, 9.99, 10, 11, 12, 500)]
    assert stage == [(8, 1.0), (8, 1.0), (16, 0.0), (16, 0.5), (16, 1.0), (16, 1.0), (32, 0.0), (32, 0.5),
                     (32, 1.0), (32, 1.0)]  # fmt: skip
    assert grow_stage(0, 8, 32, stable_kimg=0, fade_kimg=0) == (32, 1.0)  # no time per stage: full at once
    for bad in (3, 6, 32, 64):
        with pytest.raises(ValueError, match="power of two"):
            grow_resolutions(bad, 32)


def _pair(seed: int = 0) -> tuple[StyleGenerator, Discriminator]:
    torch.manual_seed(seed)
    g = StyleGenerator(SPEC, 32, w_dim=16, mapping_layers=2, grow_from=8, **TINY)
    d = Discriminator(32, q_param_dim=SPEC.q_param_dim, mbstd_group=2, grow_from=8, **TINY)
    return g, d


def _fakes(g: StyleGenerator) -> torch.Tensor:
    s = SPEC.sample(4, torch.Generator().manual_seed(1), torch.device("cpu"))
    return g(s.z_noise, s.code(), noise_mode="const")


def test_below_full_resolution_g_and_d_skip_the_blocks_not_grown_yet() -> None:
    g, d = _pair()
    set_grow_stage(g, 8, 1.0)
    set_grow_stage(d, 8, 1.0)
    img = _fakes(g)
    assert img.shape == (4, 3, 32, 32)
    # The 8 px image upsampled twice: every 2x2 ... 4x4 cell is an interpolation, no detail of its own.
    with torch.no_grad():
        for block in g.synthesis.blocks[2:]:  # the 16 and 32 px blocks
            for p in block.parameters():
                p.add_(1.0)
        for p in list(d.from_rgb.parameters()) + list(d.blocks[0].parameters()) + list(d.blocks[1].parameters()):
            p.add_(1.0)
    assert torch.equal(_fakes(g), img)
    x = torch.randn(4, 3, 32, 32)
    logits = d(x).logits
    # D reads the 8 px average of its input only: detail that averages to 0 over 4x4 cells is not seen.
    noise = torch.randn_like(x)
    detail = noise - F.interpolate(F.avg_pool2d(noise, 4), scale_factor=4.0, mode="nearest")
    x2 = x + detail
    assert torch.allclose(d(x2).logits, logits, atol=1e-5)
    # And gradients reach only the parameters in use.
    (d(img).logits.sum() + _fakes(g).sum()).backward()
    assert all(p.grad is None for p in g.synthesis.blocks[2].parameters())
    assert all(p.grad is None for p in d.from_rgb.parameters())
    assert all(p.grad is not None for p in d.from_rgb_low["8"].parameters())


def test_a_fade_starts_where_the_last_stage_ended_and_ends_at_the_next() -> None:
    g, d = _pair()
    x = torch.randn(4, 3, 32, 32)
    for low, high in ((8, 16), (16, 32)):
        for net in (g, d):
            set_grow_stage(net, low, 1.0)
        before_g, before_d = _fakes(g), d(x).logits
        for net in (g, d):
            set_grow_stage(net, high, 0.0)
        torch.testing.assert_close(_fakes(g), before_g)
        torch.testing.assert_close(d(x).logits, before_d, atol=1e-5, rtol=1e-5)
        for net in (g, d):
            set_grow_stage(net, high, 1.0 - 1e-7)
        nearly_g, nearly_d = _fakes(g), d(x).logits
        for net in (g, d):
            set_grow_stage(net, high, 1.0)
        torch.testing.assert_close(_fakes(g), nearly_g, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d(x).logits, nearly_d, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(_fakes(g), before_g, atol=1e-3)  # the new block draws something


def test_at_full_resolution_the_grown_networks_are_the_plain_ones() -> None:
    g, d = _pair()
    set_grow_stage(g, 32, 1.0)
    set_grow_stage(d, 32, 1.0)
    plain_g = StyleGenerator(SPEC, 32, w_dim=16, mapping_layers=2, **TINY)
    plain_d = Discriminator(32, q_param_dim=SPEC.q_param_dim, mbstd_group=2, **TINY)
    plain_g.load_state_dict({k: v for k, v in g.state_dict().items() if ".grow." not in k})
    plain_d.load_state_dict({k: v for k, v in d.state_dict().items() if "grow." not in k and "from_rgb_low" not in k})
    img = _fakes(g)
    assert torch.equal(_fakes(plain_g), img)
    assert torch.equal(plain_d(img).logits, d(img).logits)


def test_the_stage_travels_with_the_state_dict() -> None:
    g, d = _pair()
    set_grow_stage(g, 16, 0.25)
    img = _fakes(g)
    g2, _ = _pair()
    assert g2.synthesis.grow is not None and g2.synthesis.grow.res == 8
    g2.load_state_dict(g.state_dict())
    assert (g2.synthesis.grow.res, g2.synthesis.grow.fading) == (16, True)
    assert torch.equal(_fakes(g2), img)
    with pytest.raises(ValueError, match="not one of"):
        set_grow_stage(g, 64, 1.0)


def test_growing_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ValueError, match="style generator"):
        build_generator(style=False, latent=SPEC, resolution=32, grow_from=8, **TINY)

    def cfg(*sets: str):
        return load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(list(sets)))

    assert cfg("model.grow_from=4").model.grow_from == 4
    for bad, match in ((["model.grow_from=16"], "below resolution"), (["model.grow_from=12"], "power of two"),
                       (["model.grow_from=8", "model.style=false"], "style: true"),
                       (["model.grow_fade_kimg=-1"], "grow_fade_kimg")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            cfg(*bad)
