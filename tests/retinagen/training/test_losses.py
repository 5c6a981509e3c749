"""Loss functions: known values, monotonicity, R1 on an analytic D, L_info for perfect and uninformative Q."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retinagen.latent import LatentSpec
from retinagen.training.losses import (
    d_logistic_loss,
    g_nonsaturating_loss,
    grade_ce_loss,
    info_terms,
    mode_seeking_loss,
    r1_loss,
    r1_penalty,
    total_discriminator_loss,
    total_generator_loss,
)

LOG2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def test_logistic_losses_at_zero_logits() -> None:
    z = torch.zeros(5)
    assert math.isclose(float(d_logistic_loss(z, torch.zeros(3))), 2 * LOG2, rel_tol=1e-6)
    assert math.isclose(float(g_nonsaturating_loss(z)), LOG2, rel_tol=1e-6)


def test_d_loss_is_minus_v_of_eq2() -> None:
    real, fake = torch.randn(7), torch.randn(4)
    v = torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean()
    assert torch.allclose(d_logistic_loss(real, fake), -v, atol=1e-5)
    assert torch.allclose(g_nonsaturating_loss(fake), -torch.log(torch.sigmoid(fake)).mean(), atol=1e-5)


def test_d_loss_monotonic() -> None:
    real, fake = torch.zeros(4), torch.zeros(4)
    base = float(d_logistic_loss(real, fake))
    assert float(d_logistic_loss(real + 1, fake)) < base
    assert float(d_logistic_loss(real, fake - 1)) < base
    assert float(d_logistic_loss(real - 1, fake + 1)) > base
    assert float(g_nonsaturating_loss(fake + 1)) < float(g_nonsaturating_loss(fake))


def test_logit_shape_checks() -> None:
    with pytest.raises(ValueError):
        d_logistic_loss(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError):
        g_nonsaturating_loss(torch.zeros(4, 1))


def test_r1_penalty_on_linear_d() -> None:
    """D(x) = sum(w * x): grad = w for every sample, penalty = ||w||^2, and it is differentiable in w."""
    w = torch.randn(3, 4, 4, requires_grad=True)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).flatten(1).sum(1)
    pen = r1_penalty(x, logits)
    assert pen.shape == (5,)
    assert torch.allclose(pen, w.detach().square().sum().expand(5), rtol=1e-5)
    (g,) = torch.autograd.grad(pen.mean(), w)
    assert torch.allclose(g, 2 * w.detach(), rtol=1e-5)
    assert torch.allclose(r1_loss(pen, gamma=10.0, interval=16), pen.mean() * 5.0 * 16)
    with pytest.raises(ValueError):
        r1_penalty(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError):
        r1_loss(pen, gamma=-1.0)


def _perfect_q(spec: LatentSpec, sample, scale: float = 40.0) -> torch.Tensor:
    parts = [F.one_hot(sample.cat[:, j], k).float() * scale for j, k in enumerate(spec.categorical)]
    parts.append((sample.bern * 2 - 1) * scale)
    parts.append(sample.unif.clone())  # exact means
    return torch.cat(parts, dim=1)


def test_info_terms_perfect_q_reaches_discrete_entropy() -> None:
    spec = LatentSpec(z_dim=64, categorical=(3, 4), n_bernoulli=5, n_uniform=3)
    s = spec.sample(64, torch.Generator().manual_seed(0))
    t = info_terms(spec, _perfect_q(spec, s), s)
    h_disc = math.log(3) + math.log(4) + 5 * LOG2
    assert t.discrete_bound == pytest.approx(h_disc)
    assert float(t.l_info_discrete) == pytest.approx(h_disc, abs=1e-4)
    # each uniform code with an exact Gaussian mean contributes log 2 - log(2 pi)/2
    assert torch.allclose(t.per_code[-3:], torch.full((3,), LOG2 - HALF_LOG_2PI), atol=1e-6)
    assert float(t.l_info) == pytest.approx(h_disc + 3 * (LOG2 - HALF_LOG_2PI), abs=1e-4)
    assert float(t.neg_log_q) == pytest.approx(3 * HALF_LOG_2PI, abs=1e-4)


def test_info_terms_uninformative_q_is_zero_for_discrete_codes() -> None:
    spec = LatentSpec(z_dim=64, categorical=(3,), n_bernoulli=7, n_uniform=10)
    s = spec.sample(20000, torch.Generator().manual_seed(1))
    t = info_terms(spec, torch.zeros(20000, spec.q_param_dim), s)
    assert abs(float(t.l_info_discrete)) < 1e-5
    assert torch.allclose(t.per_code[:8], torch.zeros(8), atol=1e-5)
    # mu = 0 for U(-1, 1): E[-c^2/2] = -1/6
    assert torch.allclose(t.per_code[8:], torch.full((10,), LOG2 - HALF_LOG_2PI - 1 / 6), atol=0.01)
    # neg_log_q and l_info differ by the total prior entropy
    assert float(t.l_info + t.neg_log_q) == pytest.approx(float(spec.entropy().sum()), abs=1e-4)


def test_info_terms_between_bounds_and_differentiable() -> None:
    spec = LatentSpec(z_dim=32, categorical=(3,), n_bernoulli=2, n_uniform=0)
    s = spec.sample(32, torch.Generator().manual_seed(2))
    q = (_perfect_q(spec, s, scale=1.0) + 0.3 * torch.randn(32, spec.q_param_dim)).requires_grad_()
    t = info_terms(spec, q, s)
    assert 0 < float(t.l_info_discrete.detach()) < t.discrete_bound
    t.neg_log_q.backward()
    assert q.grad is not None and float(q.grad.abs().sum()) > 0


def test_beta_weights_the_info_term() -> None:
    fake, real = torch.randn(6), torch.randn(6)
    nlq = torch.tensor(1.7)
    g0 = g_nonsaturating_loss(fake)
    assert torch.equal(total_generator_loss(fake, neg_log_q=torch.tensor(float("nan")), beta=0.0), g0)
    assert torch.allclose(total_generator_loss(fake, neg_log_q=nlq, beta=2.0), g0 + 3.4)
    both = total_generator_loss(fake, neg_log_q=nlq, beta=2.0, guide_ce=torch.tensor(0.6), guide_weight=5.0)
    assert torch.allclose(both, g0 + 3.4 + 3.0)  # the frozen grade guide's CE, weighted
    assert torch.equal(total_generator_loss(fake, guide_ce=torch.tensor(float("nan")), guide_weight=0.0), g0)
    d0 = d_logistic_loss(real, fake)
    assert torch.equal(
        total_discriminator_loss(real, fake, neg_log_q=torch.tensor(float("nan")), beta=0.0), d0
    )
    total = total_discriminator_loss(
        real,
        fake,
        neg_log_q=nlq,
        beta=1.0,
        r1=torch.tensor(0.5),
        grade_ce=torch.tensor(2.0),
        grade_weight=0.5,
    )
    assert torch.allclose(total, d0 + 1.7 + 0.5 + 1.0)
    with pytest.raises(ValueError):
        total_generator_loss(fake, neg_log_q=torch.ones(3), beta=1.0)
    with pytest.raises(ValueError):
        total_generator_loss(fake, neg_log_q=nlq, beta=-1.0)


def test_grade_ce_loss() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    grade = torch.tensor([0, 2])
    expected = 0.5 * (-math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(3))
    assert float(grade_ce_loss(logits, grade)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        grade_ce_loss(logits, torch.tensor([0]))


def test_info_terms_continuous_weight_scales_only_the_uniform_codes_in_the_loss() -> None:
    spec = LatentSpec(z_dim=64, categorical=(3,), n_bernoulli=4, n_uniform=5)
    s = spec.sample(32, torch.Generator().manual_seed(3))
    q = torch.randn(32, spec.q_param_dim, generator=torch.Generator().manual_seed(4))
    full, half, zero = (info_terms(spec, q, s, continuous_weight=w) for w in (1.0, 0.5, 0.0))
    log_q = spec.log_q(q, s)
    disc, unif = -log_q[:, :5].sum(1).mean(), -log_q[:, 5:].sum(1).mean()
    assert float(full.neg_log_q) == pytest.approx(float(disc + unif), rel=1e-5)
    assert float(half.neg_log_q) == pytest.approx(float(disc + 0.5 * unif), rel=1e-5)
    assert float(zero.neg_log_q) == pytest.approx(float(disc), rel=1e-5)
    # the reported L_info is the unweighted bound
    assert torch.equal(half.l_info, full.l_info) and torch.equal(zero.per_code, full.per_code)
    with pytest.raises(ValueError, match="continuous_weight"):
        info_terms(spec, q, s, continuous_weight=-0.1)


def _pure_info_run(code_input: str, continuous_weight: float, steps: int = 150) -> float:
    """G (S=0) and D/Q at 16 px trained jointly on neg_log_q only; mean L_info_discrete of the last 20 steps."""
    from retinagen.networks.discriminator import Discriminator
    from retinagen.networks.generator import build_generator

    spec = LatentSpec(z_dim=64, categorical=(3,), n_bernoulli=7, n_uniform=10)
    torch.manual_seed(0)
    tiny = {"channel_base": 256, "channel_max": 16}
    g = build_generator(False, latent=spec, resolution=16, code_input=code_input, **tiny)
    d = Discriminator(16, q_param_dim=spec.q_param_dim, **tiny)
    opt = torch.optim.Adam([*g.parameters(), *d.parameters()], lr=5e-3, betas=(0.0, 0.99))
    rng = torch.Generator().manual_seed(0)
    hist = []
    for _ in range(steps):
        s = spec.sample(16, rng)
        t = info_terms(spec, d(g.generate(s, noise_mode="const")).q_params, s, continuous_weight)
        opt.zero_grad()
        t.neg_log_q.backward()
        opt.step()
        hist.append(float(t.l_info_discrete.detach()))
    return sum(hist[-20:]) / 20


def test_pure_information_training_learns_the_discrete_codes() -> None:
    # Regression test for "L_info_discrete stays at 0": an autoencoder-like objective must be learnt in
    # tens of steps. Measured: 2.3 nats with the balanced code input and continuous weight 0.1; with the
    # raw concat(Z', C) input and the unweighted loss (the old behaviour) 0.02 nats.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest and immune to a busy machine
    try:
        learnt = _pure_info_run("balanced", 0.1)
        old = _pure_info_run("raw", 1.0)
    finally:
        torch.set_num_threads(threads)
    assert learnt > 1.2, learnt
    assert old < 0.5, old


def test_beta_rampup_scales_only_g_s_info_term(tmp_path) -> None:
    from retinagen.config import load_run_config, parse_overrides
    from retinagen.training.loop import Trainer

    cfg = load_run_config("synthfundus", preset="smoke",
                          overrides=parse_overrides(["loss.beta=2", "loss.beta_rampup_kimg=0.1"]))
    t = Trainer(cfg, tmp_path, progress=False)
    assert t.g_info_weight() == 0.0
    t.images_seen = 50
    assert t.g_info_weight() == pytest.approx(1.0)
    t.images_seen = 500
    assert t.g_info_weight() == 2.0
    plain = Trainer(load_run_config("synthfundus", preset="smoke", overrides=parse_overrides(["loss.beta=2"])),
                    tmp_path, progress=False)
    assert plain.g_info_weight() == 2.0


def test_mode_seeking_loss_is_the_latent_over_the_image_distance() -> None:
    z_a, z_b = torch.zeros(2, 4), torch.full((2, 4), 2.0)
    a = torch.zeros(2, 3, 4, 4)
    near, far = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), 1.0)
    assert float(mode_seeking_loss(a, near, z_a, z_b, eps=0.0)) == pytest.approx(4.0)
    assert float(mode_seeking_loss(a, far, z_a, z_b, eps=0.0)) == pytest.approx(2.0)  # more different: lower
    assert float(mode_seeking_loss(a, a, z_a, z_b)) == pytest.approx(2.0 / 1e-5)  # G ignoring z: bounded
    x = near.clone().requires_grad_(True)
    mode_seeking_loss(a, x, z_a, z_b).backward()
    assert (x.grad < 0).all()  # the gradient pushes the pair apart
    # pooled, a pair that differs only in grain (a +-1 checkerboard) counts as the same image
    checker = ((torch.arange(4).view(-1, 1) + torch.arange(4)) % 2 * 2.0 - 1.0).expand(2, 3, 4, 4)
    assert float(mode_seeking_loss(a, checker, z_a, z_b, eps=0.0)) == pytest.approx(2.0)
    assert float(mode_seeking_loss(a, checker, z_a, z_b, pool=2)) == pytest.approx(2.0 / 1e-5)
    assert float(mode_seeking_loss(a, far, z_a, z_b, eps=0.0, pool=2)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="pool"):
        mode_seeking_loss(a, far, z_a, z_b, pool=0)
    with pytest.raises(ValueError, match="paired batches"):
        mode_seeking_loss(a, near[:1], z_a, z_b)
    with pytest.raises(ValueError, match="at least one pair"):
        mode_seeking_loss(a[:0], a[:0], z_a[:0], z_b[:0])


def test_generator_loss_adds_the_mode_seeking_term_with_its_weight() -> None:
    logits = torch.zeros(4)
    base = total_generator_loss(logits)
    ms = torch.tensor(3.0)
    assert float(total_generator_loss(logits, mode_seeking=ms, mode_seeking_weight=0.5)) == pytest.approx(float(base) + 1.5)
    # weight 0 removes the term, even a NaN one
    assert float(total_generator_loss(logits, mode_seeking=torch.tensor(float("nan")))) == pytest.approx(float(base))
    with pytest.raises(ValueError, match="mode_seeking_weight"):
        total_generator_loss(logits, mode_seeking=ms, mode_seeking_weight=-1.0)
