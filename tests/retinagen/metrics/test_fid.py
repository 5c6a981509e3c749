"""Fréchet distance, KID, feature extractors, Inception weights resolution, the stats cache, torch-fidelity path."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from retinagen.errors import RetinagenError
from retinagen.metrics import extractors as extmod
from retinagen.metrics.fid import (
    FeatureExtractor,
    MetricUnavailable,
    RealSource,
    StatsAccumulator,
    StatsCache,
    create_extractor,
    feature_stats,
    features_from_dataset,
    features_from_source,
    fid_repeated,
    fidelity_metrics,
    frechet_distance,
    images_to_uint8_nchw,
    kid,
    real_statistics,
    register_extractor,
    resolve_inception_weights,
    state_dict_sha256,
    stats_cache_key,
)

TINY = "test-tiny"
RES = 16


class TinyExtractor(FeatureExtractor):
    """A fixed random conv net + colour statistics: deterministic, per-image, 14-d."""

    def __init__(self, weights: str | Path | None = None) -> None:
        g = torch.Generator().manual_seed(1234)
        conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
        super().__init__(TINY, 14, "")
        self.conv = conv
        self.weights_id = state_dict_sha256(self)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return torch.cat([h, x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


register_extractor(TINY, TinyExtractor, overwrite=True)


def _real_dataset(n: int, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """Smooth random 'images' in [-1, 1] with labels, like ZipImageDataset items."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        base = torch.rand(3, 4, 4, generator=g) * 1.6 - 0.8
        img = nn.functional.interpolate(base[None], size=(RES, RES), mode="bilinear", align_corners=False)[0]
        out.append((img.clamp(-1, 1), i % 5))
    return out


def _fake_source(shift: float = 0.0):
    """An ImageSource: image i of seed s depends only on (s, i)."""

    def source(n: int, seed: int, start: int) -> np.ndarray:
        imgs = []
        for i in range(start, start + n):
            rng = np.random.default_rng([seed, i])
            base = rng.uniform(0, 255, size=(4, 4, 3)) * 0.7 + 30 + shift
            img = np.kron(base, np.ones((RES // 4, RES // 4, 1)))
            imgs.append(np.clip(img, 0, 255).astype(np.uint8))
        return np.stack(imgs)

    return source


# ============================================================================= Fréchet distance math
@pytest.mark.parametrize(
    "mu1,s1,mu2,s2", [(0.0, 1.0, 0.0, 1.0), (1.5, 2.0, -0.5, 0.3), (3.0, 0.01, 3.0, 4.0)]
)
def test_frechet_1d_closed_form(mu1: float, s1: float, mu2: float, s2: float) -> None:
    expected = (mu1 - mu2) ** 2 + s1 + s2 - 2 * math.sqrt(s1 * s2)
    got = frechet_distance(np.array([mu1]), np.array([[s1]]), np.array([mu2]), np.array([[s2]]))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(1)
    d = 12
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_self_zero_and_symmetric_with_singular_covariances() -> None:
    rng = np.random.default_rng(2)
    # N < D: both covariances are singular (rank 9 in 32 dims), the usual case for small evaluation sets.
    xa, xb = rng.normal(size=(10, 32)), rng.normal(loc=0.3, size=(10, 32))
    mu_a, s_a = feature_stats(xa)
    mu_b, s_b = feature_stats(xb)
    assert frechet_distance(mu_a, s_a, mu_a, s_a) == pytest.approx(0.0, abs=1e-8)
    ab, ba = frechet_distance(mu_a, s_a, mu_b, s_b), frechet_distance(mu_b, s_b, mu_a, s_a)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-9)


def test_frechet_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))


def test_feature_stats_match_numpy_and_need_two_rows() -> None:
    x = np.random.default_rng(3).normal(size=(40, 5)).astype(np.float32)
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(x[:1])


def test_stats_accumulator_is_batch_size_independent() -> None:
    # A large common offset: a naive sum of x x^T would lose the covariance to cancellation.
    x = np.random.default_rng(4).normal(size=(101, 6)) + 1e4
    mu, sigma = feature_stats(x)
    for bs in (7, 50, 101):
        acc = StatsAccumulator(6)
        for s in range(0, len(x), bs):
            acc.add(x[s : s + bs])
        m2, s2 = acc.stats()
        assert acc.n == 101
        np.testing.assert_allclose(m2, mu, rtol=1e-12)
        np.testing.assert_allclose(s2, sigma, rtol=1e-8, atol=1e-10)


# ============================================================================================== KID
def test_kid_near_zero_for_same_distribution_and_positive_for_shifted() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same_mean, same_std = kid(a, b, subset_size=100, subsets=20, seed=0)
    shifted_mean, _ = kid(a, b + 0.5, subset_size=100, subsets=20, seed=0)
    assert abs(same_mean) < 0.01
    assert same_std >= 0
    assert shifted_mean > 0.05
    assert shifted_mean > 10 * abs(same_mean)


def test_kid_matches_torch_fidelity_on_same_features_and_seed() -> None:
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(60, 8)).astype(np.float32), (rng.normal(size=(50, 8)) + 0.2).astype(np.float32)
    mine = kid(a, b, subset_size=20, subsets=7, seed=11)
    theirs = kid_features_to_metric(
        torch.from_numpy(a),
        torch.from_numpy(b),
        kid_subsets=7,
        kid_subset_size=20,
        rng_seed=11,
        verbose=False,
    )
    assert mine[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)
    assert mine[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-5)


def test_kid_checks_subset_size() -> None:
    a = np.zeros((5, 3))
    with pytest.raises(ValueError, match="subset_size"):
        kid(a, a, subset_size=6)


# ============================================================================ extractors and images
def test_images_to_uint8_layouts() -> None:
    f = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert images_to_uint8_nchw(f).flatten().tolist() == [0, 128, 255]
    hwc = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    nchw = images_to_uint8_nchw(hwc)
    assert nchw.shape == (2, 3, 4, 5) and nchw[1, 2, 3, 4] == hwc[1, 3, 4, 2]
    with pytest.raises(ValueError):
        images_to_uint8_nchw(np.zeros((2, 4, 4, 3), dtype=np.float32))


def test_extractor_registry_and_shape_checks() -> None:
    ext = create_extractor(TINY)
    out = ext(torch.zeros(3, 3, RES, RES, dtype=torch.uint8))
    assert out.shape == (3, 14) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="uint8"):
        ext(torch.zeros(1, 3, RES, RES))
    with pytest.raises(ValueError, match="already registered"):
        register_extractor(TINY, TinyExtractor)
    with pytest.raises(MetricUnavailable, match="no feature extractor"):
        create_extractor("no-such-extractor")


def test_dataset_features_do_not_depend_on_batch_size() -> None:
    ds = _real_dataset(50)
    ext = create_extractor(TINY)
    f7 = features_from_dataset(ds, ext, batch_size=7, progress=False)
    f50 = features_from_dataset(ds, ext, batch_size=50, progress=False)
    np.testing.assert_allclose(f7, f50, rtol=1e-5, atol=1e-6)
    (m7, s7), (m50, s50) = feature_stats(f7), feature_stats(f50)
    np.testing.assert_allclose(m7, m50, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s7, s50, rtol=1e-4, atol=1e-8)
    g7 = features_from_source(_fake_source(), ext, 30, seed=3, batch_size=7, progress=False)
    g50 = features_from_source(_fake_source(), ext, 30, seed=3, batch_size=50, progress=False)
    np.testing.assert_allclose(g7, g50, rtol=1e-5, atol=1e-6)


# ===================================================================================== Inception weights
@pytest.fixture
def no_weights_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(extmod.INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_missing_inception_weights_message_names_all_three_ways(no_weights_anywhere: Path) -> None:
    with pytest.raises(MetricUnavailable) as info:
        resolve_inception_weights()
    msg = str(info.value)
    assert isinstance(info.value, RetinagenError)
    assert "--inception-weights" in msg
    assert "RETINAGEN_INCEPTION_WEIGHTS" in msg
    assert str(no_weights_anywhere / "torch" / "hub" / "checkpoints") in msg
    assert extmod.INCEPTION_WEIGHTS_FILENAME in msg
    # The same error surfaces from every entry point that needs Inception; nothing is downloaded.
    with pytest.raises(MetricUnavailable, match="--inception-weights"):
        create_extractor("inception-v3")
    with pytest.raises(MetricUnavailable, match="RETINAGEN_INCEPTION_WEIGHTS"):
        fidelity_metrics(RealSource(_real_dataset(4), "x"), _fake_source(), 4)


def test_inception_weights_resolution_order(
    no_weights_anywhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = no_weights_anywhere / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / extmod.INCEPTION_WEIGHTS_FILENAME).write_bytes(b"hub")
    assert resolve_inception_weights() == hub / extmod.INCEPTION_WEIGHTS_FILENAME
    env_file = no_weights_anywhere / "env.pth"
    env_file.write_bytes(b"env")
    monkeypatch.setenv(extmod.INCEPTION_ENV_VAR, str(env_file))
    assert resolve_inception_weights() == env_file
    arg_file = no_weights_anywhere / "arg.pth"
    arg_file.write_bytes(b"arg")
    assert resolve_inception_weights(arg_file) == arg_file
    # A given path that does not exist is an error, not a silent fall-back to another file.
    with pytest.raises(MetricUnavailable, match="is not a file"):
        resolve_inception_weights(no_weights_anywhere / "typo.pth")


def test_inception_weights_with_wrong_hash_are_refused(no_weights_anywhere: Path) -> None:
    bad = no_weights_anywhere / extmod.INCEPTION_WEIGHTS_FILENAME
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(MetricUnavailable, match="SHA-256"):
        extmod.verify_inception_weights(bad)


class _NotATensor:
    pass


def test_inception_weights_that_are_not_plain_tensors_are_refused(
    no_weights_anywhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = no_weights_anywhere / "pickled.pth"
    torch.save({"obj": _NotATensor()}, bad)
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    monkeypatch.setattr(extmod, "INCEPTION_SHA256_PREFIX", digest[:8])
    with pytest.raises(MetricUnavailable, match="plain tensors"):
        extmod.verify_inception_weights(bad)
    # Loads with weights_only=True but is not a dict of tensors: torch-fidelity must not get it either.
    not_a_state_dict = no_weights_anywhere / "mixed.pth"
    torch.save({"w": torch.zeros(1), "n": 3}, not_a_state_dict)
    digest = hashlib.sha256(not_a_state_dict.read_bytes()).hexdigest()
    monkeypatch.setattr(extmod, "INCEPTION_SHA256_PREFIX", digest[:8])
    with pytest.raises(MetricUnavailable, match="not a state dict of tensors"):
        extmod.verify_inception_weights(not_a_state_dict)


def test_inception_extractor_runs_offline_with_a_local_file(
    no_weights_anywhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random Inception weights in a local file (hash check patched to accept them) -> 2048-d features, no download."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def no_download(*args: object, **kwargs: object) -> dict:
        raise AssertionError("tried to download")

    with monkeypatch.context() as m:
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        state = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    g = torch.Generator().manual_seed(0)
    for key, w in state.items():
        if key.endswith("conv.weight"):  # He init, so activations neither vanish nor explode over 90 layers
            state[key] = torch.randn(w.shape, generator=g) * math.sqrt(2.0 / w[0].numel())
    path = no_weights_anywhere / "random-inception.pth"
    torch.save(state, path)
    monkeypatch.setattr(extmod, "INCEPTION_SHA256_PREFIX", hashlib.sha256(path.read_bytes()).hexdigest()[:8])
    monkeypatch.setattr(tfi, "load_state_dict_from_url", no_download)
    monkeypatch.setenv(extmod.INCEPTION_ENV_VAR, str(path))
    ext = create_extractor("inception-v3")
    source = _fake_source()
    out = ext(images_to_uint8_nchw(source(2, 0, 0)))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    assert ext.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    # torch-fidelity's own Inception reads the same local file (KID only: its FID eigendecomposes 2048^2 slowly).
    real = RealSource(_real_dataset(4), "test-real")
    tf = fidelity_metrics(real, source, 4, fid=False, kid_subset_size=4, kid_subsets=3, seed=1)
    fr = features_from_dataset(real.dataset, ext, progress=False)
    fg = features_from_source(source, ext, 4, seed=1, progress=False)
    ours = kid(fr, fg, 4, 3, seed=1)[0]
    assert ours > 1e-4  # features are informative, not all zero
    assert tf["kid_mean"] == pytest.approx(ours, rel=1e-3)


# ===================================================================== torch-fidelity and the full path
def test_torch_fidelity_path_matches_our_frechet_distance_and_kid() -> None:
    real = RealSource(_real_dataset(40), "test-real")
    source = _fake_source(shift=20)
    n = 24
    tf = fidelity_metrics(
        real, source, n, extractor=TINY, kid_subset_size=16, kid_subsets=5, seed=2, batch_size=10
    )
    ext = create_extractor(TINY)
    fr = features_from_dataset(real.dataset, ext, progress=False)
    fg = features_from_source(source, ext, n, seed=2, progress=False)
    ours = frechet_distance(*feature_stats(fr), *feature_stats(fg))
    assert ours > 0.01
    assert tf["fid"] == pytest.approx(ours, rel=1e-4)
    assert tf["kid_mean"] == pytest.approx(kid(fr, fg, 16, 5, seed=2)[0], rel=1e-4)


def test_stats_cache_hit_returns_identical_stats_and_changed_key_misses(tmp_path: Path) -> None:
    ext = create_extractor(TINY)
    real = RealSource(_real_dataset(30), "fingerprint-a")
    cache = StatsCache(tmp_path / "stats")
    first = real_statistics(real, ext, cache=cache, progress=False)
    assert not first.from_cache
    files = list((tmp_path / "stats").glob("*.npz"))
    assert [f.stem for f in files] == [first.key]
    with np.load(files[0], allow_pickle=False) as z:  # data only
        assert set(z.files) == {"mu", "sigma", "n", "key", "features"}
    second = real_statistics(real, ext, cache=cache, progress=False)
    assert second.from_cache
    np.testing.assert_array_equal(second.mu, first.mu)
    np.testing.assert_array_equal(second.sigma, first.sigma)
    np.testing.assert_array_equal(second.features, first.features)
    # Any change of data, subset size or extractor weights is a different key, hence a miss.
    other_data = real_statistics(RealSource(real.dataset, "fingerprint-b"), ext, cache=cache, progress=False)
    subset = real_statistics(real, ext, n=20, cache=cache, progress=False)
    assert not other_data.from_cache and not subset.from_cache and subset.n == 20
    base = ("fp", TINY, ext.weights_id, RES, 30)
    assert stats_cache_key(*base) != stats_cache_key("fp", TINY, "other-weights", RES, 30)
    assert stats_cache_key(*base) != stats_cache_key("fp", TINY, ext.weights_id, 32, 30)
    assert stats_cache_key(*base) == stats_cache_key(*base)
    # A corrupt cache file is a miss (recomputed and rewritten), not a crash.
    cache.path(first.key).write_bytes(b"not an npz")
    again = real_statistics(real, ext, cache=cache, progress=False)
    assert not again.from_cache
    np.testing.assert_allclose(again.mu, first.mu)


def test_fid_repeated_mean_std_and_batch_size_independence(tmp_path: Path) -> None:
    real = RealSource(_real_dataset(40), "test-real")
    kwargs = dict(
        extractor=TINY,
        seed=5,
        cache=tmp_path,
        with_kid=True,
        kid_subset_size=10,
        kid_subsets=4,
        progress=False,
    )
    r7 = fid_repeated(real, _fake_source(shift=10), 20, repeats=3, batch_size=7, **kwargs)
    r50 = fid_repeated(real, _fake_source(shift=10), 20, repeats=3, batch_size=50, **kwargs)
    assert not r7["real_stats_cached"] and r50["real_stats_cached"]
    assert r7["seeds"] == [5, 6, 7] and len(r7["values"]) == 3
    assert len(set(r7["values"])) == 3  # different seeds, different estimates
    np.testing.assert_allclose(r7["values"], r50["values"], rtol=1e-4)
    assert r7["mean"] == pytest.approx(np.mean(r7["values"]))
    assert r7["std"] == pytest.approx(np.std(r7["values"], ddof=1))
    assert len(r7["kid"]["values"]) == 3
    # A farther generator scores worse.
    far = fid_repeated(real, _fake_source(shift=80), 20, repeats=2, batch_size=20, **kwargs)
    assert far["mean"] > r7["mean"]


def test_fid_repeated_straight_from_a_tiny_model(tmp_path: Path) -> None:
    from retinagen.config import load_run_config
    from retinagen.generation import LoadedModel
    from retinagen.networks.build import build_g, latent_spec

    cfg = load_run_config("synthfundus", preset="smoke")
    torch.manual_seed(0)
    model = LoadedModel(
        cfg=cfg,
        spec=latent_spec(cfg.latent),
        G=build_g(cfg).eval().requires_grad_(False),
        D=None,
        meta={},
        path=tmp_path / "none",
        sha256="0" * 64,
        device=torch.device("cpu"),
    )
    assert model.resolution == RES
    real = RealSource(_real_dataset(20), "test-real")
    res = fid_repeated(real, model, 12, repeats=2, extractor=TINY, cache=False, batch_size=5, progress=False)
    assert len(res["values"]) == 2 and all(v > 0 for v in res["values"])
    again = fid_repeated(
        real, model, 12, repeats=2, extractor=TINY, cache=False, batch_size=12, progress=False
    )
    np.testing.assert_allclose(res["values"], again["values"], rtol=1e-4)


def test_real_source_from_a_prepared_zip(synth_zip_16: Path, tmp_path: Path) -> None:
    from retinagen.data.dataset import ZipImageDataset

    real = RealSource.from_zip(synth_zip_16)
    train = RealSource.from_zip(synth_zip_16, split="train")
    assert real.resolution == RES and real.fingerprint != train.fingerprint
    ds = ZipImageDataset(synth_zip_16)
    # The uint8 fast path reads the stored bytes; the float items round-trip to the same bytes.
    ext = create_extractor(TINY)
    direct = features_from_dataset(ds, ext, indices=range(8), progress=False)
    via_items = features_from_dataset([ds[i] for i in range(8)], ext, progress=False)
    np.testing.assert_allclose(direct, via_items, rtol=1e-6, atol=1e-7)
    res = fid_repeated(
        synth_zip_16, _fake_source(), 16, repeats=2, extractor=TINY, cache=tmp_path, progress=False
    )
    assert res["n_real"] == len(ds) and all(v > 0 for v in res["values"])
