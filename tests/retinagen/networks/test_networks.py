"""Networks: layers (equalized lr, modulated conv, resampling, noise, minibatch stddev), G (S=1, S=0), D + Q."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retinagen.latent import LatentSample, LatentSpec
from retinagen.networks.discriminator import Discriminator
from retinagen.networks.generator import (
    DirectGenerator,
    MappingNetwork,
    StyleGenerator,
    balanced_input,
    build_generator,
    channels_at,
    standardize_code,
)
from retinagen.networks.layers import (
    Downsample2d,
    EqualizedConv2d,
    EqualizedLinear,
    MinibatchStdDev,
    NoiseInjection,
    Upsample2d,
    lrelu,
    modulated_conv2d,
)
from retinagen.training.losses import g_nonsaturating_loss, info_terms

SPEC = LatentSpec(z_dim=24, categorical=(3,), n_bernoulli=2, n_uniform=3)
TINY = {"channel_base": 128, "channel_max": 16}  # 16 channels at 4-8 px, 8 at 16 px, 4 at 32, 2 at 64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_g(style: bool, resolution: int = 16, num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_generator(
        style, latent=SPEC, resolution=resolution, w_dim=16, mapping_layers=2, num_classes=num_classes, **TINY
    )


def make_d(resolution: int = 16, num_classes: int = 0, aux: bool = False) -> Discriminator:
    torch.manual_seed(1)
    return Discriminator(
        resolution, q_param_dim=SPEC.q_param_dim, num_classes=num_classes, aux_classifier=aux, **TINY
    )


# ------------------------------------------------------------------------------------------- layers
def test_lrelu_gain() -> None:
    x = torch.tensor([-1.0, 2.0])
    assert torch.allclose(lrelu(x), torch.tensor([-0.2, 2.0]) * math.sqrt(2))


def test_equalized_linear_runtime_scaling() -> None:
    torch.manual_seed(0)
    lin = EqualizedLinear(256, 128, bias_init=0.5, lr_multiplier=0.01)
    # stored weights are N(0, 1/lr^2); the runtime gain lr/sqrt(fan_in) gives effective N(0, 1/fan_in)
    assert abs(float(lin.weight.detach().std()) * 0.01 - 1.0) < 0.02
    x = torch.randn(64, 256)
    eff_w = lin.weight * 0.01 / math.sqrt(256)
    assert torch.allclose(lin(x), F.linear(x, eff_w, lin.bias * 0.01), atol=1e-5)
    assert torch.allclose(lin(torch.zeros(1, 256)), torch.full((1, 128), 0.5))  # effective bias = bias_init
    # unit-variance input -> ~unit-variance output, whatever the lr multiplier
    with torch.no_grad():
        y = lin(torch.randn(4096, 256)) - 0.5
    assert abs(float(y.var()) - 1.0) < 0.1
    with pytest.raises(ValueError):
        lin(torch.zeros(2, 255))


def test_equalized_conv_runtime_scaling() -> None:
    torch.manual_seed(0)
    conv = EqualizedConv2d(8, 4, 3)
    x = torch.randn(2, 8, 10, 10)
    ref = F.conv2d(x, conv.weight / math.sqrt(8 * 9), conv.bias, padding=1)
    assert torch.allclose(conv(x), ref, atol=1e-5)
    with pytest.raises(ValueError):
        conv(torch.zeros(2, 7, 10, 10))


def test_upsample_is_bilinear_and_downsample_keeps_constants() -> None:
    x = torch.randn(2, 3, 8, 8)
    up = Upsample2d()(x)
    assert up.shape == (2, 3, 16, 16)
    assert torch.allclose(
        up, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), atol=1e-5
    )
    down = Downsample2d()
    assert down(x).shape == (2, 3, 4, 4)
    assert torch.allclose(down(torch.full((1, 2, 8, 8), 3.0)), torch.full((1, 2, 4, 4), 3.0))
    with pytest.raises(ValueError):
        down(torch.zeros(1, 1, 7, 8))


def test_modulated_conv_matches_per_sample_reference() -> None:
    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 5, 6, 6), torch.randn(4, 5, 3, 3), torch.rand(3, 5) + 0.5
    for demod in (True, False):
        y = modulated_conv2d(x, weight, styles, demodulate=demod)
        for n in range(3):
            w = weight * styles[n].reshape(1, 5, 1, 1)
            if demod:
                w = w / w.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
            assert torch.allclose(y[n : n + 1], F.conv2d(x[n : n + 1], w, padding=1), atol=1e-5)
    with pytest.raises(ValueError):
        modulated_conv2d(x, weight, styles[:, :4])


def test_modulated_conv_demodulation_gives_unit_std() -> None:
    """Demodulated kernels have unit norm per output channel: unit-variance i.i.d. input -> unit-variance output."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 48, 48)
    weight = torch.randn(16, 64, 3, 3)
    styles = torch.rand(2, 64) * 3 + 0.1  # wildly different scales per sample and channel
    y = modulated_conv2d(x, weight, styles, demodulate=True)[:, :, 1:-1, 1:-1]  # interior: no zero padding
    std = y.std(dim=(2, 3))
    assert torch.allclose(std, torch.ones_like(std), atol=0.06)
    y_raw = modulated_conv2d(x, weight, styles, demodulate=False)
    assert float(y_raw.std()) > 5  # without demodulation the scale follows the styles


def test_modulated_conv_under_bf16_autocast_keeps_fp32_demod() -> None:
    torch.manual_seed(0)
    x, weight, styles = torch.randn(2, 8, 8, 8), torch.randn(4, 8, 3, 3), torch.rand(2, 8) + 0.5
    ref = modulated_conv2d(x, weight, styles)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = modulated_conv2d(x, weight, styles)
    assert torch.isfinite(y).all()
    assert torch.allclose(y.float(), ref, atol=0.1, rtol=0.05)


def test_noise_injection_modes() -> None:
    layer = NoiseInjection(8)
    x = torch.zeros(2, 3, 8, 8)
    assert torch.equal(layer(x, "random"), x)  # strength starts at 0
    with torch.no_grad():
        layer.strength.fill_(1.0)
    assert torch.equal(layer(x, "none"), x)
    c = layer(x, "const")
    assert torch.equal(c[0, 0], layer.noise_const) and torch.equal(c[1, 2], layer.noise_const)
    assert torch.equal(layer(x, "random", _gen(3)), layer(x, "random", _gen(3)))
    assert not torch.equal(layer(x, "random", _gen(3)), layer(x, "random", _gen(4)))
    with pytest.raises(ValueError):
        layer(x, "fixed")


@pytest.mark.parametrize(
    ("n", "groups"), [(8, [[0, 1, 2, 3], [4, 5, 6, 7]]), (6, [[0, 1, 2, 3], [4, 5]]), (5, [[0, 1, 2, 3, 4]])]
)
def test_minibatch_stddev_groups(n: int, groups: list[list[int]]) -> None:
    torch.manual_seed(0)
    x = torch.randn(n, 4, 3, 3)
    y = MinibatchStdDev(group_size=4)(x)
    assert y.shape == (n, 5, 3, 3)
    assert torch.equal(y[:, :4], x)
    for g in groups:
        expected = (x[g].var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        for i in g:
            assert torch.allclose(y[i, 4], expected.expand(3, 3), atol=1e-6)


def test_minibatch_stddev_single_sample_and_channels() -> None:
    y = MinibatchStdDev(group_size=4)(torch.randn(1, 4, 2, 2))
    assert float(y[0, 4].abs().max()) < 1e-3
    assert MinibatchStdDev(group_size=2, num_channels=2)(torch.randn(3, 4, 2, 2)).shape == (3, 6, 2, 2)
    with pytest.raises(ValueError):
        MinibatchStdDev(num_channels=3)(torch.randn(2, 4, 2, 2))


# ---------------------------------------------------------------------------------------- generators
def test_channel_widths_fall_with_resolution() -> None:
    widths = [channels_at(r, 16384, 512) for r in (4, 8, 16, 32, 64, 128, 256)]
    assert widths == [512, 512, 512, 512, 256, 128, 64]
    with pytest.raises(ValueError):
        channels_at(1024, 512, 512)


@pytest.mark.parametrize("style", [True, False])
@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_shapes_g_and_d(style: bool, resolution: int, num_classes: int) -> None:
    g = make_g(style, resolution, num_classes)
    d = make_d(resolution, num_classes, aux=num_classes > 0)
    s = SPEC.sample(3, _gen())
    grade = torch.tensor([0, 4, 2]) if num_classes else None
    img = g(s.z_noise, s.code(), grade)
    assert img.shape == (3, 3, resolution, resolution) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    out = d(img, grade)
    assert out.logits.shape == (3,)
    assert out.q_params.shape == (3, SPEC.q_param_dim)
    if num_classes:
        assert out.class_logits is not None and out.class_logits.shape == (3, num_classes)
    else:
        assert out.class_logits is None
    feats = d.features(img)
    assert list(feats)[0] == f"rgb{resolution}" and "h" in feats and "q_params" in feats
    assert all(v.ndim == 2 and v.shape[0] == 3 for v in feats.values())
    assert all(torch.isfinite(v).all() for v in feats.values())
    assert len([k for k in feats if k.startswith("block")]) == int(math.log2(resolution)) - 2


@pytest.mark.parametrize("style", [True, False])
def test_gradients_reach_every_parameter(style: bool) -> None:
    num_classes = 3
    g, d = make_g(style, 16, num_classes), make_d(16, num_classes, aux=True)
    for m in g.modules():  # noise strengths start at 0; make them matter so they get a gradient signal
        if isinstance(m, NoiseInjection):
            m.strength.data.fill_(0.1)
    s = SPEC.sample(4, _gen())
    grade = torch.tensor([0, 1, 2, 1])
    fake = g(s.z_noise, s.code(), grade)
    out = d(fake, grade)
    info = info_terms(SPEC, out.q_params, s)
    (g_nonsaturating_loss(out.logits) + info.neg_log_q + F.cross_entropy(out.class_logits, grade)).backward()
    for name, p in [*g.named_parameters(), *d.named_parameters()]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0, name


def test_style_generator_determinism_and_noise() -> None:
    g = make_g(True, 16)
    for m in g.modules():
        if isinstance(m, NoiseInjection):
            m.strength.data.fill_(0.5)
    s = SPEC.sample(2, _gen(1))
    g.eval()
    a = g(s.z_noise, s.code(), noise_mode="const")
    assert torch.equal(a, g(s.z_noise, s.code(), noise_mode="const"))
    r1 = g(s.z_noise, s.code(), noise_mode="random", noise_generator=_gen(9))
    assert torch.equal(r1, g(s.z_noise, s.code(), noise_mode="random", noise_generator=_gen(9)))
    assert not torch.allclose(r1, g(s.z_noise, s.code(), noise_mode="random", noise_generator=_gen(10)))
    assert not torch.allclose(a, g(s.z_noise, s.code(), noise_mode="none"))


@pytest.mark.parametrize("style", [True, False])
def test_different_codes_give_different_images(style: bool) -> None:
    g = make_g(style, 16).eval()
    s = SPEC.sample(2, _gen(2))
    base = g(s.z_noise, s.code(), noise_mode="const")
    for name, value in [("c0", 2), ("c1", 1), ("c5", -0.9)]:
        other = SPEC.with_code(s, name, value)
        if torch.equal(other.code(), s.code()):
            other = SPEC.with_code(s, name, 0)
        img = g.generate(other, noise_mode="const")
        changed = (img - base).abs().flatten(1).amax(dim=1)
        rows = (other.code() != s.code()).any(dim=1)
        assert bool((changed[rows] > 1e-4).all()), name
        assert bool((changed[~rows] == 0).all()), name


def test_mapping_w_avg_and_truncation() -> None:
    torch.manual_seed(0)
    m = MappingNetwork(8, 6, num_layers=2, num_classes=3, w_avg_beta=0.0)
    z, grade = torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    m.eval()
    m(z, grade)
    assert torch.equal(m.w_avg, torch.zeros(6))  # eval mode: no update
    m.train()
    w = m(z, grade)
    assert torch.allclose(m.w_avg, w.mean(0))  # beta 0: the average is the last batch's
    assert torch.allclose(m.w_avg_class[1], w[2:4].mean(0))
    m(z[:2], grade[:2])  # only grade 0 present: the other grades' averages stay
    assert torch.allclose(m.w_avg_class[1], w[2:4].mean(0))
    m.eval()
    w0 = m(z, grade, truncation_psi=0.0)
    assert torch.allclose(w0[2], m.w_avg_class[1]) and torch.allclose(w0[3], m.w_avg_class[1])
    wh = m(z, grade, truncation_psi=0.5)
    assert torch.allclose(wh, 0.5 * (m(z, grade) + m.w_avg_class[grade]), atol=1e-6)


@pytest.mark.parametrize("style", [True, False])
def test_truncation_psi_zero_removes_noise_dependence(style: bool) -> None:
    g = make_g(style, 8).eval()
    s = SPEC.sample(3, _gen(5))
    same_code = SPEC.with_code(SPEC.with_code(SPEC.with_code(s, 0, 1), 1, 1), 2, 0)
    for i in range(3, SPEC.n_codes):
        same_code = SPEC.with_code(same_code, i, 0.25)
    img = g(same_code.z_noise, same_code.code(), truncation_psi=0.0, noise_mode="const")
    # Only Z' differs between rows; psi = 0 maps every row to the same point (w = w_avg, or Z' = 0).
    assert torch.allclose(img[0], img[1], atol=1e-5) and torch.allclose(img[0], img[2], atol=1e-5)
    assert not torch.allclose(img[0], g(same_code.z_noise, same_code.code(), noise_mode="const")[0])


def test_generator_input_validation() -> None:
    g, gc = make_g(True, 8), make_g(True, 8, num_classes=5)
    s = SPEC.sample(2, _gen())
    z, c = s.z_noise, s.code()
    bad_calls = [
        lambda: g(z[:, :-1], c),
        lambda: g(z, c[:, :-1]),
        lambda: g(z, c[:1]),
        lambda: g(z, c, torch.tensor([0, 1])),  # unconditional with a grade
        lambda: gc(z, c),  # conditional without a grade
        lambda: gc(z, c, torch.tensor([0, 5])),  # grade out of range
        lambda: gc(z, c, torch.tensor([0.0, 1.0])),  # not integers
        lambda: gc(z, c, torch.tensor([0])),  # wrong length
        lambda: g(z, c, noise_mode="fixed"),
        lambda: make_g(False, 8)(z, c, noise_mode="fixed"),
        lambda: StyleGenerator(SPEC, 12),
        lambda: StyleGenerator(SPEC, 4),
        lambda: DirectGenerator(SPEC, 2048),
        lambda: g.generate(LatentSpec(z_dim=30).sample(2)),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()


def test_build_generator_picks_variant() -> None:
    assert isinstance(make_g(True), StyleGenerator)
    direct = make_g(False)  # w_dim / mapping_layers are dropped for S = 0
    assert isinstance(direct, DirectGenerator)
    assert not any("mapping" in n for n, _ in direct.named_parameters())


# ------------------------------------------------------------------------------------- discriminator
def test_discriminator_validation_and_options() -> None:
    d = make_d(16, num_classes=3)
    with pytest.raises(ValueError):
        d(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError):
        d(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError):
        d(torch.zeros(2, 3, 16, 16), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        Discriminator(16, q_param_dim=4, aux_classifier=True, **TINY)
    no_q = Discriminator(16, q_param_dim=0, **TINY)
    assert no_q(torch.zeros(2, 3, 16, 16)).q_params.shape == (2, 0)


def test_projection_conditioning_changes_logits_only() -> None:
    d = make_d(16, num_classes=3)
    torch.nn.init.normal_(d.embed.weight)
    img = torch.randn(4, 3, 16, 16)
    plain, proj = d(img), d(img, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(plain.q_params, proj.q_params)
    h = d.features(img)["h"]
    e = d.embed(F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float())
    assert torch.allclose(proj.logits - plain.logits, (e * h).sum(1) / math.sqrt(h.shape[1]), atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_discriminator_any_batch_size(n: int) -> None:
    out = make_d(8)(torch.randn(n, 3, 8, 8))
    assert out.logits.shape == (n,) and torch.isfinite(out.logits).all()


def test_channels_last_matches_contiguous() -> None:
    d = make_d(32, num_classes=2, aux=True)
    img = torch.randn(4, 3, 32, 32)
    ref = d(img, torch.tensor([0, 1, 1, 0]))
    cl_in = d(img.to(memory_format=torch.channels_last), torch.tensor([0, 1, 1, 0]))
    d_cl = make_d(32, num_classes=2, aux=True).to(memory_format=torch.channels_last)
    cl_both = d_cl(img.to(memory_format=torch.channels_last), torch.tensor([0, 1, 1, 0]))
    for out in (cl_in, cl_both):
        for a, b in zip(ref, out, strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    g = make_g(True, 16).eval()
    g_cl = make_g(True, 16).to(memory_format=torch.channels_last).eval()
    s = SPEC.sample(2, _gen())
    assert torch.allclose(
        g(s.z_noise, s.code(), noise_mode="const"), g_cl(s.z_noise, s.code(), noise_mode="const"), atol=1e-5
    )


def test_modulated_conv_fused_and_unfused_agree() -> None:
    from retinagen.networks.layers import modulated_conv2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 9, 9, generator=g)
    w = torch.randn(4, 6, 3, 3, generator=g)
    s = torch.rand(5, 6, generator=g) + 0.5
    for demod in (True, False):
        a = modulated_conv2d(x, w, s, demodulate=demod, fused=True)
        b = modulated_conv2d(x, w, s, demodulate=demod, fused=False)
        assert a.shape == b.shape == (5, 4, 9, 9)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_modulated_conv_forms_have_the_same_gradients() -> None:
    """Training takes the unfused form, generation may take the grouped one: both must be one function."""
    from retinagen.networks.layers import modulated_conv2d

    grads = []
    for fused in (True, False):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 6, 8, 8, generator=g).requires_grad_(True)
        w = torch.randn(4, 6, 3, 3, generator=g).requires_grad_(True)
        s = (torch.rand(3, 6, generator=g) + 0.5).requires_grad_(True)
        (modulated_conv2d(x, w, s, fused=fused) * torch.arange(4.0).reshape(1, 4, 1, 1)).sum().backward()
        grads.append((x.grad, w.grad, s.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_the_default_modulated_conv_form_depends_on_grad_mode_and_size_only() -> None:
    from retinagen.networks.layers import fused_modconv_default

    big, small = torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 32, 32)
    assert not fused_modconv_default(big) and not fused_modconv_default(small)  # training: unfused
    with torch.no_grad():
        assert fused_modconv_default(big) and not fused_modconv_default(small)
    assert not fused_modconv_default(torch.zeros(1, 1, 64, 64, device="meta"))  # not a CPU tensor


# ------------------------------------------------------------------------ how the codes enter G
PAPER_LIKE = LatentSpec(z_dim=128, categorical=(3,), n_bernoulli=7, n_uniform=10)  # the cpu preset's latent


def test_standardize_code_is_zero_mean_unit_variance_and_affine() -> None:
    s = PAPER_LIKE.sample(20000, _gen(3))
    x = standardize_code(s.code(), PAPER_LIKE)
    assert x.shape == (20000, PAPER_LIKE.code_dim)
    assert torch.allclose(x.mean(0), torch.zeros(PAPER_LIKE.code_dim), atol=0.03)
    assert torch.allclose(x.var(0), torch.ones(PAPER_LIKE.code_dim), atol=0.05)
    # Known values: bits 0/1 -> -1/+1, one-hot of 3 -> (onehot - 1/3) * 3 / sqrt(2), u -> sqrt(3) u.
    one = PAPER_LIKE.from_values(
        torch.zeros(1, PAPER_LIKE.noise_dim), torch.tensor([[1.0] + [0, 1] * 3 + [1] + [0.5] * 10])
    )
    y = standardize_code(one.code(), PAPER_LIKE)[0]
    k = 3
    assert torch.allclose(y[:3], (torch.tensor([0.0, 1.0, 0.0]) - 1 / k) * k / math.sqrt(k - 1))
    assert torch.equal(y[3:10], torch.tensor([-1.0, 1, -1, 1, -1, 1, 1]))
    assert torch.allclose(y[10:], torch.full((10,), 0.5 * math.sqrt(3.0)))
    with pytest.raises(ValueError):
        standardize_code(s.code()[:, :-1], PAPER_LIKE)


def test_balanced_input_gives_the_codes_as_much_energy_as_the_noise() -> None:
    # Root cause of "L_info stays at 0": with the raw concat(Z', C) the codes carried ~5 % of the input
    # variance (the discrete ones ~2 %: 0/1 bits and one-hot columns next to 108 unit-variance noise dims).
    s = PAPER_LIKE.sample(4096, _gen(4))
    nd = PAPER_LIKE.noise_dim
    x = balanced_input(s.z_noise, s.code(), PAPER_LIKE)
    assert x.shape == (4096, PAPER_LIKE.z_dim)
    assert float(x.square().mean()) == pytest.approx(1.0, rel=0.02)
    var = x.var(0)
    share = float(var[nd:].sum() / var.sum())
    assert share == pytest.approx(0.5, abs=0.02)
    raw = F.normalize(torch.cat([s.z_noise, s.code()], 1), dim=1)
    raw_var = raw.var(0)
    assert float(raw_var[nd:].sum() / raw_var.sum()) < 0.06
    assert float(raw_var[nd : nd + 10].sum() / raw_var.sum()) < 0.025
    # noise_scale (direct-G truncation) scales the noise block only.
    x0 = balanced_input(s.z_noise, s.code(), PAPER_LIKE, noise_scale=0.0)
    assert torch.equal(x0[:, :nd], torch.zeros_like(x0[:, :nd])) and torch.allclose(x0[:, nd:], x[:, nd:])


@pytest.mark.parametrize("style", [True, False])
@torch.no_grad()
def test_a_code_moves_the_image_about_as_much_as_the_noise(style: bool) -> None:
    # At initialisation, flipping one Bernoulli code must change the image by a sizeable fraction of what
    # redrawing Z' does; with code_input="raw" the ratio was ~0.1 (Q then cannot find the codes).
    ratios = {}
    for code_input in ("balanced", "raw"):
        torch.manual_seed(0)
        g = build_generator(
            style, latent=PAPER_LIKE, resolution=8, w_dim=32, mapping_layers=2, code_input=code_input, **TINY
        ).eval()
        s = PAPER_LIKE.sample(64, _gen(6))
        base = g.generate(s, noise_mode="const")
        flip = PAPER_LIKE.with_code(s, "c1", 1 - s.bern[:, 0])
        redraw = PAPER_LIKE.sample(64, _gen(7))
        noise = LatentSample(PAPER_LIKE, redraw.z_noise, s.cat, s.bern, s.unif)
        d_code = (g.generate(flip, noise_mode="const") - base).abs().mean()
        d_noise = (g.generate(noise, noise_mode="const") - base).abs().mean()
        ratios[code_input] = float(d_code / d_noise)
    assert ratios["balanced"] > 0.25, ratios
    assert ratios["raw"] < ratios["balanced"] / 2, ratios


def test_code_input_raw_keeps_the_old_input_and_bad_values_are_rejected() -> None:
    torch.manual_seed(0)
    g = StyleGenerator(SPEC, 8, w_dim=16, mapping_layers=2, code_input="raw", **TINY).eval()
    s = SPEC.sample(3, _gen(8))
    w = g.mapping(torch.cat([s.z_noise, s.code()], 1))
    expected = g.synthesis(w, noise_mode="const")
    assert torch.allclose(g.generate(s, noise_mode="const"), expected)
    for bad in ("", "scaled", "RAW"):
        with pytest.raises(ValueError, match="code_input"):
            StyleGenerator(SPEC, 8, code_input=bad)
        with pytest.raises(ValueError, match="code_input"):
            DirectGenerator(SPEC, 8, code_input=bad)


@pytest.mark.parametrize("style", [True, False])
def test_config_code_input_reaches_the_generator(style: bool) -> None:
    from retinagen.config import ConfigError, load_run_config, parse_overrides
    from retinagen.networks.build import build_g

    base = [f"model.style={str(style).lower()}", "model.resolution=8", "model.g_channel_base=64", "model.g_channel_max=8"]

    def cfg(*extra: str):
        return load_run_config(preset="smoke", overrides=parse_overrides([*base, *extra]))

    assert build_g(cfg()).code_input == "balanced"
    assert build_g(cfg("model.code_input=raw")).code_input == "raw"
    with pytest.raises(ConfigError):
        cfg("model.code_input=loud")
    with pytest.raises(ConfigError):
        cfg("loss.info_continuous_weight=-0.5")


def test_grade_entry_layers_starts_as_mapping_and_moves_only_its_grade() -> None:
    torch.manual_seed(0)
    g_map = StyleGenerator(SPEC, 16, w_dim=16, mapping_layers=2, num_classes=5, **TINY).eval()
    g_lay = StyleGenerator(SPEC, 16, w_dim=16, mapping_layers=2, num_classes=5, grade_entry="layers", **TINY).eval()
    missing = g_lay.load_state_dict(g_map.state_dict(), strict=False).missing_keys
    assert missing == ["synthesis.grade_offsets"]
    assert g_lay.synthesis.grade_offsets.shape == (len(g_lay.synthesis.blocks), 5, 16)
    s = SPEC.sample(10, _gen(3))
    grade = torch.arange(10) % 5
    same = g_map.generate(s, grade, noise_mode="const")
    assert torch.equal(g_lay.generate(s, grade, noise_mode="const"), same)  # zero offsets: the mapping model
    with torch.no_grad():
        g_lay.synthesis.grade_offsets[1:, 3] = 0.5  # grade 3, every block but the 4x4 one
    moved = g_lay.generate(s, grade, noise_mode="const")
    changed = (moved - same).abs().flatten(1).amax(1) > 1e-4
    assert changed.tolist() == (grade == 3).tolist()
    # The offsets learn: G's loss has a gradient on the rows of the grades in the batch only.
    g_lay.train()
    g_lay.zero_grad()
    g_lay.generate(s, torch.tensor([0, 2] * 5), noise_mode="const").square().mean().backward()
    row_grad = g_lay.synthesis.grade_offsets.grad.abs().sum(dim=(0, 2))
    assert (row_grad[[0, 2]] > 0).all() and (row_grad[[1, 3, 4]] == 0).all()
    with pytest.raises(ValueError, match="grade_entry"):
        StyleGenerator(SPEC, 16, num_classes=5, grade_entry="every")


def test_config_grade_entry_reaches_the_generator() -> None:
    from retinagen.config import load_run_config, parse_overrides
    from retinagen.networks.build import build_g

    cfg = load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(["model.grade_entry=layers"]))
    assert build_g(cfg).synthesis.grade_offsets is not None
    cfg = load_run_config("synthfundus", preset="smoke")
    assert build_g(cfg).synthesis.grade_offsets is None  # default: the grade enters through the mapping only
    cfg = load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(
        ["model.grade_entry=layers", "model.conditional=false"]))
    assert build_g(cfg).synthesis.grade_offsets is None  # nothing to enter
    cfg = load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(
        ["model.grade_entry=layers", "model.style=false"]))
    build_g(cfg)  # InfoGAN's generator has no synthesis layers to enter: the key is ignored


def test_q_grad_scale_scales_only_the_trunk_share_of_qs_gradient() -> None:
    torch.manual_seed(0)
    d = make_d()
    img = torch.randn(4, 3, 16, 16)
    grads = {}
    for s in (1.0, 0.5, 0.0):
        d.zero_grad()
        out = d(img, q_grad_scale=s)
        out.q_params.square().sum().backward()
        grads[s] = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in d.named_parameters()}
        assert torch.equal(out.q_params, d(img).q_params)  # the values never change
    trunk = [n for n in grads[1.0] if not n.startswith(("q_head", "out", "embed", "class_head"))]
    head = [n for n in grads[1.0] if n.startswith("q_head")]
    assert any(grads[1.0][n].abs().sum() > 0 for n in trunk)
    for n in trunk:
        assert torch.allclose(grads[0.5][n], 0.5 * grads[1.0][n], atol=1e-6) and not grads[0.0][n].any()
    for n in head:  # the Q head learns as before
        assert torch.allclose(grads[0.0][n], grads[1.0][n])
