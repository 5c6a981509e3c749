"""MIG (Eq. 15-16) and I(V_k; C_i) on constructed Q posteriors with known answers."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retinagen.latent import LatentSpec
from retinagen.metrics.mig import (
    code_posteriors,
    label_entropies,
    max_mi,
    mig,
    mig_report,
    mutual_information_matrix,
    q_params_for_dataset,
)

LOG2 = math.log(2.0)
BIG = 30.0  # a logit this large is a certain prediction


def _balanced_binary(n: int, k: int, seed: int = 0) -> np.ndarray:
    """[n, k] labels, each column a balanced 0/1 permutation (exact p(v) = 1/2)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(n) % 2) for _ in range(k)], axis=1)


def test_perfectly_disentangled_posterior_gives_mig_one() -> None:
    spec = LatentSpec(z_dim=32, categorical=(3,), n_bernoulli=3, n_uniform=0)
    # A full factorial design (every combination 25 times): the attributes are exactly independent in the data,
    # so a code that carries one attribute carries exactly nothing about the others.
    labels = np.array(list(itertools.product(range(3), range(2), range(2), range(2))) * 25)  # [600, 4]
    n = len(labels)
    three = labels[:, 0]  # a 3-valued attribute carried by the categorical code; attribute k <-> code c_k
    q = np.zeros((n, spec.q_param_dim))
    q[np.arange(n), three] = BIG  # categorical logits: certain of the right class
    q[:, 3:6] = np.where(labels[:, 1:] == 1, BIG, -BIG)  # Bernoulli logits
    rep = mig_report(spec, q, labels, attribute_names=["v3", "a", "b", "c"])
    assert rep.mig == pytest.approx(1.0, abs=1e-6)
    assert rep.mig_normalized == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(np.diag(rep.mi_paper), [math.log(3), LOG2, LOG2, LOG2], atol=1e-6)
    off = rep.mi_normalized - np.diag(np.diag(rep.mi_normalized))
    assert np.abs(off).max() < 1e-9  # uninformative codes carry nothing about other attributes
    assert rep.max_mi == pytest.approx(math.log(3), abs=1e-6)
    assert rep.best_codes() == {"v3": "c0", "a": "c1", "b": "c2", "c": "c3"}
    assert rep.to_json()["mig"] == rep.mig


def test_independent_posterior_gives_mig_zero() -> None:
    spec = LatentSpec(z_dim=32, categorical=(3,), n_bernoulli=4, n_uniform=2)
    n = 400
    labels = _balanced_binary(n, 3, seed=1)
    # Q ignores the image: the same (prior-matching) prediction for every x.
    q = np.zeros((n, spec.q_param_dim))
    rep = mig_report(spec, q, labels)
    assert rep.mig == pytest.approx(0.0, abs=1e-9)
    assert rep.mig_normalized == pytest.approx(0.0, abs=1e-9)
    assert rep.max_mi_normalized == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(rep.mi_paper[:, :5], 0.0, atol=1e-9)  # discrete codes: uniform Q = the prior
    # Uniform codes: N(0, 1) binned over [-1, 1] is more concentrated than the uniform prior, which the paper's
    # estimator counts as information (log bins - H(binned Q)); the normalised estimator does not.
    post, h_prior = code_posteriors(spec, q, bins=20)[-1]
    offset = h_prior + float((post[0] * np.log(post[0])).sum())
    assert offset > 0
    np.testing.assert_allclose(rep.mi_paper[:, 5:], offset, rtol=1e-9)


def test_posterior_that_varies_but_independently_of_labels_gives_small_mig() -> None:
    spec = LatentSpec(z_dim=32, categorical=(), n_bernoulli=4, n_uniform=0)
    n = 4000
    rng = np.random.default_rng(2)
    labels = _balanced_binary(n, 2, seed=3)
    q = rng.normal(scale=3.0, size=(n, 4))  # confident but random, unrelated to the labels
    rep = mig_report(spec, q, labels)
    assert rep.max_mi_normalized < 5e-3
    assert abs(rep.mig_normalized) < 1e-2


def test_max_mi_of_a_perfect_binary_pair_is_log2() -> None:
    spec = LatentSpec(z_dim=16, categorical=(), n_bernoulli=2, n_uniform=0)
    labels = _balanced_binary(200, 1)
    q = np.stack([np.where(labels[:, 0] == 1, BIG, -BIG), np.zeros(200)], axis=1)
    mi = mutual_information_matrix(spec, q, labels)
    assert max_mi(mi) == pytest.approx(LOG2, abs=1e-9)
    assert mi.shape == (1, 2)


def test_two_codes_sharing_the_information_give_mig_zero_with_max_mi_positive() -> None:
    spec = LatentSpec(z_dim=16, categorical=(), n_bernoulli=3, n_uniform=0)
    labels = _balanced_binary(300, 1)
    logit = np.where(labels[:, 0] == 1, BIG, -BIG)
    q = np.stack([logit, -logit, np.zeros(300)], axis=1)  # c0 and c1 both determine the attribute
    rep = mig_report(spec, q, labels)
    assert rep.mig == pytest.approx(0.0, abs=1e-9)
    assert rep.max_mi == pytest.approx(LOG2, abs=1e-9)


def test_paper_estimator_credits_a_constant_confident_q_and_normalised_does_not() -> None:
    """The documented difference: I_paper - I_norm = H(C_i) - H(mean_x Q(C_i | x))."""
    spec = LatentSpec(z_dim=16, categorical=(), n_bernoulli=1, n_uniform=0)
    labels = _balanced_binary(100, 1)
    q = np.full((100, 1), BIG)  # always "c = 1", whatever the image
    assert mutual_information_matrix(spec, q, labels)[0, 0] == pytest.approx(LOG2, abs=1e-9)
    assert mutual_information_matrix(spec, q, labels, normalized=True)[0, 0] == pytest.approx(0.0, abs=1e-9)


def test_partial_information_matches_a_hand_computed_value() -> None:
    spec = LatentSpec(z_dim=16, categorical=(), n_bernoulli=1, n_uniform=0)
    labels = np.array([0, 0, 1, 1])[:, None]
    p = np.array([0.2, 0.4, 0.9, 0.7])  # Q(c = 1 | x)
    q = np.log(p / (1 - p))[:, None]

    def h(x: float) -> float:
        return -(x * math.log(x) + (1 - x) * math.log(1 - x))

    cond = 0.5 * h(0.3) + 0.5 * h(0.8)  # q_0 = mean(0.2, 0.4), q_1 = mean(0.9, 0.7)
    assert mutual_information_matrix(spec, q, labels)[0, 0] == pytest.approx(LOG2 - cond, abs=1e-12)
    norm = mutual_information_matrix(spec, q, labels, normalized=True)[0, 0]
    assert norm == pytest.approx(h(0.55) - cond, abs=1e-12)


def test_uniform_code_binning_converges_to_the_continuous_mutual_information() -> None:
    """Unit-variance Gaussian Q with mean +-0.8 by a binary label vs. numerical integration of the continuous MI."""
    spec = LatentSpec(z_dim=16, categorical=(), n_bernoulli=0, n_uniform=1)
    labels = _balanced_binary(100, 1)
    q = np.where(labels == 1, 0.8, -0.8).astype(np.float64)
    c = np.linspace(-1, 1, 200001)

    def trunc_pdf(mu: float) -> np.ndarray:
        f = np.exp(-0.5 * (c - mu) ** 2)
        return f / np.trapezoid(f, c)

    def diff_entropy(f: np.ndarray) -> float:
        return float(-np.trapezoid(f * np.log(f), c))

    fp, fm = trunc_pdf(0.8), trunc_pdf(-0.8)
    exact = diff_entropy(0.5 * (fp + fm)) - 0.5 * (diff_entropy(fp) + diff_entropy(fm))
    fine = mutual_information_matrix(spec, q, labels, bins=400, normalized=True)[0, 0]
    coarse = mutual_information_matrix(spec, q, labels, bins=20, normalized=True)[0, 0]
    assert 0.01 < exact < LOG2
    assert fine == pytest.approx(exact, rel=1e-3)
    assert coarse == pytest.approx(exact, rel=0.05)
    # The paper's estimator converges to its continuous formula with the truncated Q: log 2 - mean_v h(q_v).
    paper_limit = LOG2 - 0.5 * (diff_entropy(fp) + diff_entropy(fm))
    paper = mutual_information_matrix(spec, q, labels, bins=400)[0, 0]
    assert paper == pytest.approx(paper_limit, abs=1e-4)
    assert paper > fine  # it also credits Q for being narrower than the prior


def test_uniform_code_with_learned_tiny_variance_is_a_perfect_binary_code() -> None:
    spec = LatentSpec(z_dim=16, categorical=(), n_bernoulli=0, n_uniform=2, learned_variance=True)
    labels = _balanced_binary(200, 1)
    mean0 = np.where(labels[:, 0] == 1, 0.5, -0.5)
    q = np.stack(
        [mean0, np.zeros(200), np.full(200, -8.0), np.zeros(200)], axis=1
    )  # means, then log-variances
    mi = mutual_information_matrix(spec, q, labels, bins=20, normalized=True)
    assert mi[0, 0] == pytest.approx(LOG2, abs=1e-6)
    assert mi[0, 1] == pytest.approx(0.0, abs=1e-9)
    post, h = code_posteriors(spec, q, bins=20)[0]
    assert post.shape == (200, 20) and h == pytest.approx(math.log(20))
    np.testing.assert_allclose(post.sum(axis=1), 1.0, atol=1e-12)


def test_code_posteriors_are_stable_far_outside_the_support() -> None:
    spec = LatentSpec(z_dim=16, categorical=(), n_bernoulli=0, n_uniform=1, learned_variance=True)
    q = np.array([[-50.0, -8.0], [50.0, -8.0], [-3.0, 0.0], [0.0, 0.0]])
    post, _ = code_posteriors(spec, q, bins=10)[0]
    assert np.isfinite(post).all()
    np.testing.assert_allclose(post.sum(axis=1), 1.0, atol=1e-12)
    assert post[0, 0] == pytest.approx(1.0) and post[1, -1] == pytest.approx(1.0)
    assert post[2, 0] > post[2, -1]  # the lower tail puts more mass in the lowest bin


def test_mig_formula_on_a_hand_made_matrix() -> None:
    mi = np.array([[0.6, 0.1, 0.2], [0.3, 0.3, 0.0], [0.2, 0.1, 0.0]])
    h = np.array([0.69, 0.5, 0.0])  # the third attribute is constant: left out
    assert mig(mi, h) == pytest.approx(((0.6 - 0.2) / 0.69 + 0.0 / 0.5) / 2)
    assert max_mi(mi) == 0.6
    with pytest.raises(ValueError, match="constant"):
        mig(mi, np.zeros(3))
    with pytest.raises(ValueError, match="L >= 2"):
        mig(mi[:, :1], h)
    with pytest.raises(ValueError, match="label_entropies"):
        mig(mi, h[:2])


def test_labels_any_integer_values_and_entropies() -> None:
    lab = np.array([[-1, 0], [1, 0], [-1, 0], [1, 0]])  # CelebA-style -1/1, and a constant column
    np.testing.assert_allclose(label_entropies(lab), [LOG2, 0.0])
    spec = LatentSpec(z_dim=16, categorical=(), n_bernoulli=2, n_uniform=0)
    with pytest.raises(ValueError, match="N = 4"):
        mutual_information_matrix(spec, np.zeros((4, 2)), lab[:3])
    with pytest.raises(ValueError, match="integers"):
        mutual_information_matrix(spec, np.zeros((4, 2)), np.full((4, 1), 0.5))
    with pytest.raises(ValueError, match="q_params"):
        mutual_information_matrix(spec, np.zeros((4, 3)), lab)


def test_q_params_for_dataset_runs_q_in_batches() -> None:
    from retinagen.config import load_run_config
    from retinagen.networks.build import build_d, latent_spec

    cfg = load_run_config("synthfundus", preset="smoke")
    torch.manual_seed(0)
    disc = build_d(cfg)
    spec = latent_spec(cfg.latent)
    r = cfg.model.resolution
    g = torch.Generator().manual_seed(0)
    ds = [(torch.rand(3, r, r, generator=g) * 2 - 1, i % 5) for i in range(10)]
    q, labels = q_params_for_dataset(disc, ds, batch_size=4, progress=False)
    assert q.shape == (10, spec.q_param_dim) and labels.shape == (10, 1)
    assert labels[:, 0].tolist() == [i % 5 for i in range(10)]
    assert disc.training  # mode restored
    q2, lab2 = q_params_for_dataset(
        disc, ds, batch_size=4, limit=8, label_fn=lambda it: [it[1], it[1] % 2], progress=False
    )
    np.testing.assert_allclose(q2, q[:8], rtol=1e-5, atol=1e-6)
    assert lab2.shape == (8, 2)
    rep = mig_report(spec, q, labels)
    assert np.isfinite(rep.mig) and rep.mi_paper.shape == (1, spec.n_codes)

    class NoD:
        D = None

    with pytest.raises(ValueError, match="no discriminator"):
        q_params_for_dataset(NoD(), ds, progress=False)


def test_mig_on_a_prepared_zip_with_a_tiny_discriminator(synth_zip_16: Path) -> None:
    from retinagen.config import load_run_config
    from retinagen.data.dataset import ZipImageDataset
    from retinagen.networks.build import build_d, latent_spec

    cfg = load_run_config("synthfundus", preset="smoke")
    torch.manual_seed(0)
    disc = build_d(cfg).eval()
    ds = ZipImageDataset(synth_zip_16)
    q, labels = q_params_for_dataset(disc, ds, batch_size=8, progress=False)
    assert q.shape == (len(ds), disc.q_param_dim) and labels.shape == (len(ds), 1)
    np.testing.assert_array_equal(labels[:, 0], ds.labels)
    rep = mig_report(latent_spec(cfg.latent), q, labels, attribute_names=["dr_grade"])
    assert rep.mi_paper.shape == (1, 18) and np.isfinite(rep.mig)
    assert 0.0 <= rep.max_mi_normalized <= rep.label_entropies[0] + 1e-9
