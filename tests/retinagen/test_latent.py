"""LatentSpec: dimensions, sampling, code layout, with_code validation, log Q and entropies vs closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from retinagen.errors import ConfigError
from retinagen.latent import LOGVAR_MAX, LOGVAR_MIN, CodeValueError, LatentSpec


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_paper_default_dimensions() -> None:
    spec = LatentSpec.paper_default()
    assert spec == LatentSpec()
    assert spec.code_dim == 3 + 7 + 10
    assert spec.noise_dim == 512 - 20
    assert spec.n_codes == 18
    assert spec.q_param_dim == 20
    assert LatentSpec(learned_variance=True).q_param_dim == 30
    assert spec.code_names == tuple(f"c{i}" for i in range(18))
    assert spec.code_kinds == ("categorical",) + ("bernoulli",) * 7 + ("uniform",) * 10
    assert spec.discrete_mask.tolist() == [True] * 8 + [False] * 10


def test_multiple_categoricals_dimensions() -> None:
    spec = LatentSpec(z_dim=64, categorical=[4, 2], n_bernoulli=1, n_uniform=2)  # a list, as YAML gives
    assert spec.categorical == (4, 2)
    assert spec.code_dim == 4 + 2 + 1 + 2
    assert spec.n_codes == 5
    assert spec.q_param_dim == 9
    hash(spec)  # frozen and hashable


@pytest.mark.parametrize(
    "kwargs",
    [
        {"z_dim": 20},  # code_dim is 20: no room for Z'
        {"categorical": (1,)},
        {"n_bernoulli": -1},
        {"n_uniform": -2},
    ],
)
def test_invalid_specs_raise(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        LatentSpec(**kwargs)


def test_discrete_only_has_no_uniform_codes() -> None:
    spec = LatentSpec.discrete_only(z_dim=128, categorical=(3,), n_bernoulli=7)
    assert spec.n_uniform == 0
    assert "uniform" not in spec.code_kinds
    assert bool(spec.discrete_mask.all())
    assert spec.code_dim == 10 and spec.q_param_dim == 10
    s = spec.sample(5, _gen())
    assert s.unif.shape == (5, 0)
    # d = 1: all of L_info's entropy is discrete
    assert math.isclose(float(spec.entropy().sum()), spec.discrete_entropy(), rel_tol=1e-6)


def test_dict_roundtrip_and_unknown_key() -> None:
    spec = LatentSpec(z_dim=100, categorical=(3, 5), n_bernoulli=2, n_uniform=4, learned_variance=True)
    assert LatentSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="n_gaussian"):
        LatentSpec.from_dict({**spec.to_dict(), "n_gaussian": 3})


def test_sample_shapes_ranges_and_layout() -> None:
    spec = LatentSpec(z_dim=64, categorical=(3, 4), n_bernoulli=3, n_uniform=5)
    s = spec.sample(2000, _gen(1))
    assert s.z_noise.shape == (2000, spec.noise_dim) and s.z_noise.dtype == torch.float32
    assert s.cat.shape == (2000, 2) and s.cat.dtype == torch.int64
    assert s.bern.shape == (2000, 3) and s.unif.shape == (2000, 5)
    assert int(s.cat[:, 0].min()) == 0 and int(s.cat[:, 0].max()) == 2
    assert int(s.cat[:, 1].min()) == 0 and int(s.cat[:, 1].max()) == 3
    assert set(s.bern.unique().tolist()) == {0.0, 1.0}
    assert float(s.unif.min()) >= -1.0 and float(s.unif.max()) <= 1.0
    # Loose moment checks (2000 samples): N(0,1), Bernoulli(0.5), U(-1,1) with variance 1/3.
    assert abs(float(s.z_noise.mean())) < 0.02 and abs(float(s.z_noise.std()) - 1) < 0.02
    assert abs(float(s.bern.mean()) - 0.5) < 0.03
    assert abs(float(s.unif.var()) - 1 / 3) < 0.03
    counts = torch.bincount(s.cat[:, 1], minlength=4).float() / 2000
    assert float((counts - 0.25).abs().max()) < 0.05

    code = s.code()
    assert code.shape == (2000, spec.code_dim)
    # one-hot blocks, then bits, then uniform values
    assert torch.equal(code[:, :3].argmax(1), s.cat[:, 0]) and torch.all(code[:, :3].sum(1) == 1)
    assert torch.equal(code[:, 3:7].argmax(1), s.cat[:, 1]) and torch.all(code[:, 3:7].sum(1) == 1)
    assert torch.equal(code[:, 7:10], s.bern)
    assert torch.equal(code[:, 10:], s.unif)
    vals = s.values()
    assert vals.shape == (2000, spec.n_codes)
    assert torch.equal(vals[:, :2], s.cat.float()) and torch.equal(vals[:, 2:5], s.bern)
    assert torch.equal(vals[:, 5:], s.unif)


def test_sample_determinism_and_seed_dependence() -> None:
    spec = LatentSpec(z_dim=32, n_uniform=4, n_bernoulli=3)
    a, b, c = spec.sample(8, _gen(7)), spec.sample(8, _gen(7)), spec.sample(8, _gen(8))
    for name in ("z_noise", "cat", "bern", "unif"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.z_noise, c.z_noise)
    assert not torch.equal(a.unif, c.unif)


def test_sample_slicing_and_from_values_roundtrip() -> None:
    spec = LatentSpec(z_dim=32, categorical=(3, 2), n_bernoulli=2, n_uniform=2)
    s = spec.sample(6, _gen(2))
    assert len(s[:2]) == 2 and torch.equal(s[2:4].unif, s.unif[2:4])
    t = spec.from_values(s.z_noise, s.values())
    assert torch.equal(t.code(), s.code()) and torch.equal(t.cat, s.cat)
    with pytest.raises(ValueError):
        spec.from_values(s.z_noise, s.values()[:, :-1])
    bad = s.values().clone()
    bad[:, 0] = 3  # categorical(3) has classes 0..2
    with pytest.raises(CodeValueError):
        spec.from_values(s.z_noise, bad)


@pytest.mark.parametrize("n", [1, 6, 7])
def test_paired_codes_share_codes_and_keep_every_noise_latent(n: int) -> None:
    spec = LatentSpec(z_dim=32, categorical=(3, 2), n_bernoulli=2, n_uniform=2)
    s = spec.sample(n, _gen(3))
    p = s.with_paired_codes()
    m = n // 2
    assert torch.equal(p.z_noise, s.z_noise) and len(p) == n
    assert torch.equal(p.code()[m : 2 * m], s.code()[:m]) and torch.equal(p.code()[:m], s.code()[:m])
    assert torch.equal(p.code()[2 * m :], s.code()[2 * m :])  # an odd last row keeps its own codes


def test_with_code_sets_one_code_and_copies() -> None:
    spec = LatentSpec(z_dim=64)
    s = spec.sample(4, _gen(3))
    t = spec.with_code(s, "c12", 0.8)  # the 5th uniform code (1 cat + 7 bern come first)
    assert torch.allclose(t.unif[:, 4], torch.full((4,), 0.8))
    others = [i for i in range(10) if i != 4]
    assert torch.equal(t.unif[:, others], s.unif[:, others])
    assert torch.equal(t.z_noise, s.z_noise) and torch.equal(t.cat, s.cat) and torch.equal(t.bern, s.bern)
    assert not torch.allclose(s.unif[:, 4], torch.full((4,), 0.8))  # the original is unchanged
    assert torch.equal(spec.with_code(s, 0, 2).cat[:, 0], torch.full((4,), 2))
    assert torch.equal(spec.with_code(s, "c1", 0).bern[:, 0], torch.zeros(4))
    per_row = spec.with_code(s, 17, torch.tensor([-1.0, -0.5, 0.5, 1.0]))
    assert torch.equal(per_row.unif[:, 9], torch.tensor([-1.0, -0.5, 0.5, 1.0]))


@pytest.mark.parametrize(
    ("code", "value", "ok_with_extrapolation"),
    [
        ("c0", 3, False),  # categorical(3): 0..2
        ("c0", 1.5, False),
        ("c0", -1, False),
        ("c1", 0.5, True),  # Bernoulli: 0/1, or [0, 1] when extrapolating
        ("c1", 2.0, False),
        ("c8", 1.2, True),  # uniform: [-1, 1], or [-2, 2] when extrapolating
        ("c8", -2.5, False),
        ("c8", float("nan"), False),
    ],
)
def test_with_code_validation(code: str, value: float, ok_with_extrapolation: bool) -> None:
    spec = LatentSpec(z_dim=64)
    s = spec.sample(2, _gen())
    with pytest.raises(CodeValueError):
        spec.with_code(s, code, value)
    if ok_with_extrapolation:
        spec.with_code(s, code, value, allow_extrapolation=True)
    else:
        with pytest.raises(CodeValueError):
            spec.with_code(s, code, value, allow_extrapolation=True)


def test_code_value_error_is_config_and_value_error() -> None:
    spec = LatentSpec(z_dim=64)
    for bad in ("c18", "x4", 18, -1):
        with pytest.raises(ConfigError):
            spec.code_index(bad)
        with pytest.raises(ValueError):
            spec.code_index(bad)


def test_log_q_matches_closed_forms() -> None:
    spec = LatentSpec(z_dim=64, categorical=(3, 5), n_bernoulli=4, n_uniform=3)
    s = spec.sample(16, _gen(4))
    q = torch.randn(16, spec.q_param_dim, generator=_gen(5)) * 2
    lq = spec.log_q(q, s).double().numpy()
    assert lq.shape == (16, spec.n_codes)
    qn = q.double().numpy()
    cat = s.cat.numpy()
    exp = np.zeros_like(lq)
    exp[:, 0] = special.log_softmax(qn[:, 0:3], axis=1)[np.arange(16), cat[:, 0]]
    exp[:, 1] = special.log_softmax(qn[:, 3:8], axis=1)[np.arange(16), cat[:, 1]]
    exp[:, 2:6] = stats.bernoulli.logpmf(s.bern.numpy(), special.expit(qn[:, 8:12]))
    exp[:, 6:9] = stats.norm.logpdf(s.unif.double().numpy(), loc=qn[:, 12:15], scale=1.0)
    np.testing.assert_allclose(lq, exp, rtol=1e-5, atol=1e-5)


def test_log_q_learned_variance_and_clamp() -> None:
    spec = LatentSpec(z_dim=32, categorical=(), n_bernoulli=0, n_uniform=2, learned_variance=True)
    s = spec.sample(8, _gen(6))
    mu = torch.randn(8, 2, generator=_gen(7)) * 0.3
    logvar = torch.tensor([[-1.0, 0.5]]).expand(8, 2)
    lq = spec.log_q(torch.cat([mu, logvar], 1), s).double().numpy()
    exp = stats.norm.logpdf(
        s.unif.double().numpy(), loc=mu.double().numpy(), scale=np.exp(0.5 * logvar.double().numpy())
    )
    np.testing.assert_allclose(lq, exp, rtol=1e-5, atol=1e-5)
    # a collapsing variance is clamped: log Q stays finite and equals the value at the clamp
    extreme = spec.log_q(torch.cat([mu, torch.full((8, 2), -100.0)], 1), s)
    at_clamp = spec.log_q(torch.cat([mu, torch.full((8, 2), LOGVAR_MIN)], 1), s)
    assert torch.isfinite(extreme).all() and torch.allclose(extreme, at_clamp)
    assert torch.allclose(
        spec.log_q(torch.cat([mu, torch.full((8, 2), 100.0)], 1), s),
        spec.log_q(torch.cat([mu, torch.full((8, 2), LOGVAR_MAX)], 1), s),
    )


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_log_q_categorical_is_a_distribution(k: int, seed: int) -> None:
    """Summing Q(c | x) over every class gives 1, whatever the logits."""
    spec = LatentSpec(z_dim=16, categorical=(k,), n_bernoulli=1, n_uniform=0)
    s = spec.sample(3, _gen(seed))
    q = torch.randn(3, spec.q_param_dim, generator=_gen(seed + 1)) * 5
    total = sum(spec.log_q(q, spec.with_code(s, 0, j))[:, 0].exp() for j in range(k))
    bern = sum(spec.log_q(q, spec.with_code(s, 1, b))[:, 1].exp() for b in (0, 1))
    assert torch.allclose(total, torch.ones(3), atol=1e-5)
    assert torch.allclose(bern, torch.ones(3), atol=1e-5)


def test_log_q_shape_errors() -> None:
    spec = LatentSpec(z_dim=64)
    s = spec.sample(4, _gen())
    with pytest.raises(ValueError):
        spec.log_q(torch.zeros(4, spec.q_param_dim + 1), s)
    with pytest.raises(ValueError):
        spec.log_q(torch.zeros(3, spec.q_param_dim), s)
    with pytest.raises(ValueError):
        LatentSpec(z_dim=65).log_q(torch.zeros(4, spec.q_param_dim), s)


def test_entropies_match_closed_forms() -> None:
    spec = LatentSpec(z_dim=64, categorical=(3, 5), n_bernoulli=2, n_uniform=2)
    h = spec.entropy().double().numpy()
    expected = [
        stats.entropy(np.full(3, 1 / 3)),
        stats.entropy(np.full(5, 1 / 5)),
        stats.bernoulli(0.5).entropy(),
        stats.bernoulli(0.5).entropy(),
        stats.uniform(loc=-1, scale=2).entropy(),
        stats.uniform(loc=-1, scale=2).entropy(),
    ]
    np.testing.assert_allclose(h, expected, rtol=1e-6)
    assert math.isclose(spec.discrete_entropy(), math.log(3) + math.log(5) + 2 * math.log(2), rel_tol=1e-12)
    assert math.isclose(LatentSpec().discrete_entropy(), math.log(3) + 7 * math.log(2), rel_tol=1e-12)


def test_q_estimate() -> None:
    spec = LatentSpec(z_dim=32, categorical=(3,), n_bernoulli=1, n_uniform=1)
    q = torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.25], [3.0, 0.0, 1.0, 100.0, -0.5]])
    est = spec.q_estimate(q)
    assert torch.allclose(est, torch.tensor([[1.0, 0.5, 0.25], [0.0, 1.0, -0.5]]))
