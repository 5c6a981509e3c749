"""The fundus encoder behind fd_fundus: training, data-only save/load, the extractor registry, FD sanity."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from retinagen.data.dataset import ZipImageDataset
from retinagen.errors import CheckpointError, RetinagenError
from retinagen.metrics.encoder import (
    ENCODER_ENV_VAR,
    ENCODER_SCHEMA,
    EXTRACTOR_NAME,
    FundusEncoderExtractor,
    load_fundus_encoder,
    train_fundus_encoder,
)
from retinagen.metrics.fid import (
    MetricUnavailable,
    RealSource,
    create_extractor,
    feature_stats,
    features_from_dataset,
    features_from_source,
    fidelity_metrics,
    frechet_distance,
    registered_extractors,
)
from retinagen.training.checkpoint import sha256_file


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """16 px images and a small CNN: intra-op threads only add synchronisation (badly so on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder_path(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("encoder") / "enc"
    return train_fundus_encoder(synth_zip_16, out, epochs=3, batch_size=8, seed=0, progress=False)


def _real_uint8(zip_path: Path) -> torch.Tensor:
    ds = ZipImageDataset(zip_path)
    return torch.stack([torch.from_numpy(ds.read_uint8(i).transpose(2, 0, 1).copy()) for i in range(len(ds))])


def _fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def test_training_writes_a_data_only_encoder_with_its_description(
    encoder_path: Path, synth_zip_16: Path
) -> None:
    assert encoder_path.suffix == ".safetensors" and encoder_path.is_file()
    meta = json.loads(encoder_path.with_suffix(".json").read_text())
    assert meta["schema"] == ENCODER_SCHEMA
    assert meta["tensors_sha256"] == sha256_file(encoder_path)
    assert meta["data"]["fingerprint"] == ZipImageDataset(synth_zip_16).fingerprint()
    # Synthetic, graded data: supervised DR grade + factor regression, never the random seeds or the grade twice.
    assert meta["objective"] == ["dr_grade", "factors"]
    factors = meta["config"]["factor_names"]
    assert "pigmentation" in factors and "glare" in factors
    assert not any("seed" in f for f in factors) and "grade" not in factors
    assert meta["config"]["input_size"] == 16 and meta["config"]["feature_dim"] == 128
    assert len(meta["training"]["history"]) == 3
    assert all(
        np.isfinite(v) for h in meta["training"]["history"] for k, v in h.items() if k.startswith("loss/")
    )
    # The file holds tensors only: safetensors' header is JSON, no pickle opcodes.
    assert encoder_path.read_bytes()[8:9] == b"{"


def test_same_seed_same_encoder_and_the_global_rng_is_untouched(
    encoder_path: Path, synth_zip_16: Path, tmp_path: Path
) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = train_fundus_encoder(
        synth_zip_16, tmp_path / "again", epochs=3, batch_size=8, seed=0, progress=False
    )
    assert torch.equal(torch.rand(3), before)
    assert sha256_file(again) == sha256_file(encoder_path)
    other = train_fundus_encoder(
        synth_zip_16, tmp_path / "other", epochs=3, batch_size=8, seed=1, progress=False
    )
    assert sha256_file(other) != sha256_file(encoder_path)


def test_save_load_round_trip_gives_identical_features(encoder_path: Path, synth_zip_16: Path) -> None:
    imgs = _real_uint8(synth_zip_16)
    a = load_fundus_encoder(encoder_path)
    b = load_fundus_encoder(encoder_path.with_suffix(".json"))  # either file names the encoder
    assert isinstance(a, FundusEncoderExtractor) and not a.training
    assert a.weights_id == sha256_file(encoder_path) == b.weights_id
    fa, fb = a(imgs), b(imgs)
    assert fa.shape == (len(imgs), 128) and fa.dtype == torch.float32
    assert torch.equal(fa, fb)
    assert torch.isfinite(fa).all() and fa.std(dim=0).max() > 0  # features vary across images


def test_features_do_not_depend_on_the_batch_size(encoder_path: Path, synth_zip_16: Path) -> None:
    ext = load_fundus_encoder(encoder_path)
    ds = ZipImageDataset(synth_zip_16)
    whole = features_from_dataset(ds, ext, batch_size=len(ds), progress=False)
    ones = features_from_dataset(ds, ext, batch_size=1, progress=False)
    fives = features_from_dataset(ds, ext, batch_size=5, progress=False)
    np.testing.assert_allclose(ones, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fives, whole, rtol=1e-5, atol=1e-6)
    # Same in training mode: GroupNorm has no batch statistics.
    ext.net.train()
    with torch.no_grad():
        imgs = _real_uint8(synth_zip_16)
        np.testing.assert_allclose(ext.net(imgs[:3]).numpy(), ext.net(imgs).numpy()[:3], rtol=1e-5, atol=1e-6)


def test_any_resolution_is_resized_to_the_input_size(encoder_path: Path, synth_zip_16: Path) -> None:
    ext = load_fundus_encoder(encoder_path)
    imgs = _real_uint8(synth_zip_16)[:6]
    big = torch.nn.functional.interpolate(imgs.float(), size=(48, 48), mode="nearest").round().to(torch.uint8)
    f16, f48 = ext(imgs), ext(big)
    assert f48.shape == f16.shape == (6, 128)
    # Enlarged x3 then resized back inside the extractor (antialiased, so slightly blurred): each enlarged
    # image's nearest neighbour in feature space is its own original.
    dist = torch.cdist(f48.double(), f16.double())
    own = dist.diagonal()
    others = (dist + torch.eye(6, dtype=torch.float64) * 1e9).min(dim=1).values
    assert (own < others).all(), (own, others)
    non_square = torch.zeros(2, 3, 20, 30, dtype=torch.uint8)
    assert ext(non_square).shape == (2, 128)
    with pytest.raises(ValueError, match="uint8"):
        ext(imgs.float())


def test_frechet_distance_sanity_in_encoder_space(encoder_path: Path, synth_zip_16: Path) -> None:
    ext = load_fundus_encoder(encoder_path)
    real = _real_uint8(synth_zip_16)
    with torch.no_grad():
        f_real = ext(real).numpy().astype(np.float64)
        g = torch.Generator().manual_seed(0)
        jitter = (
            (real.float() + torch.randn(real.shape, generator=g) * 2.0).round().clamp(0, 255).to(torch.uint8)
        )
        noise = torch.randint(0, 256, real.shape, generator=g, dtype=torch.uint8)
        f_jitter = ext(jitter).numpy().astype(np.float64)
        f_noise = ext(noise).numpy().astype(np.float64)
    assert _fd(f_real, f_real) == pytest.approx(0.0, abs=1e-6)
    fd_jitter, fd_noise = _fd(f_real, f_jitter), _fd(f_real, f_noise)
    assert fd_jitter > 0
    assert fd_noise > 50 * fd_jitter


def test_pickles_tampered_files_and_missing_descriptions_are_refused(
    encoder_path: Path, tmp_path: Path
) -> None:
    net_state = load_fundus_encoder(encoder_path).net.state_dict()
    pickled = tmp_path / "evil.safetensors"
    torch.save(net_state, pickled)
    pickled.with_suffix(".json").write_text(encoder_path.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="refused"):
        load_fundus_encoder(pickled)
    # Valid safetensors whose bytes differ from the recorded hash.
    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(encoder_path.read_bytes())
    data[-1] ^= 0x01
    tampered.write_bytes(bytes(data))
    tampered.with_suffix(".json").write_text(encoder_path.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="sha256"):
        load_fundus_encoder(tampered)
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(encoder_path.read_bytes())
    with pytest.raises(CheckpointError, match="missing"):
        load_fundus_encoder(lonely)
    # A JSON that is not an encoder description (e.g. a GAN checkpoint's).
    other = tmp_path / "other.safetensors"
    other.write_bytes(encoder_path.read_bytes())
    other.with_suffix(".json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(CheckpointError, match="not a fundus encoder"):
        load_fundus_encoder(other)


def test_registered_as_fd_fundus_for_fid_and_torch_fidelity(
    encoder_path: Path, synth_zip_16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert EXTRACTOR_NAME in registered_extractors()
    monkeypatch.delenv(ENCODER_ENV_VAR, raising=False)
    with pytest.raises(MetricUnavailable, match="fundus encoder"):
        create_extractor(EXTRACTOR_NAME)
    ext = create_extractor(EXTRACTOR_NAME, weights=encoder_path)
    assert ext.name == EXTRACTOR_NAME and ext.weights_id == sha256_file(encoder_path)
    monkeypatch.setenv(ENCODER_ENV_VAR, str(encoder_path))
    assert create_extractor(EXTRACTOR_NAME).weights_id == ext.weights_id

    real = RealSource.from_zip(synth_zip_16)
    ds = real.dataset

    def shifted(n: int, seed: int, start: int) -> np.ndarray:
        # "Generated" images: real ones, brightened, image i depending only on (seed, i).
        idx = [(seed * 7 + i) % len(ds) for i in range(start, start + n)]
        return np.stack(
            [np.clip(ds.read_uint8(i).astype(np.int16) + 25, 0, 255).astype(np.uint8) for i in idx]
        )

    tf = fidelity_metrics(
        real,
        shifted,
        16,
        extractor=EXTRACTOR_NAME,
        weights=encoder_path,
        kid_subset_size=8,
        kid_subsets=5,
        seed=1,
    )
    fr = features_from_dataset(ds, ext, progress=False)
    fg = features_from_source(shifted, ext, 16, seed=1, progress=False)
    ours = _fd(fr, fg)
    assert ours > 0
    assert tf["fid"] == pytest.approx(ours, rel=1e-3)
    assert np.isfinite(tf["kid_mean"])


def _write_unlabelled_zip(path: Path, n: int = 12, res: int = 16) -> Path:
    """An NVlabs-style ZIP without labels or factors (dataset.json: labels null)."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            img = np.zeros((res, res, 3), np.uint8)
            cv2.circle(
                img, (res // 2, res // 2), res // 2 - 1, tuple(int(c) for c in rng.integers(60, 200, 3)), -1
            )
            ok, buf = cv2.imencode(".png", img[:, :, ::-1])
            assert ok
            zf.writestr(f"img{i:03d}.png", buf.tobytes())
        zf.writestr("dataset.json", json.dumps({"labels": None, "resolution": res}))
    return path


def test_unlabelled_data_falls_back_to_rotation_prediction(tmp_path: Path) -> None:
    data = _write_unlabelled_zip(tmp_path / "plain.zip")
    path = train_fundus_encoder(data, tmp_path / "rot", epochs=2, batch_size=4, progress=False)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["objective"] == ["rotation"]
    assert meta["data"]["images"] == "all images" and meta["validation"] == {}
    assert load_fundus_encoder(path)(_real_uint8(data)).shape == (12, 128)


def test_min_steps_adds_epochs_for_small_datasets(synth_zip_16: Path, tmp_path: Path) -> None:
    path = train_fundus_encoder(
        synth_zip_16, tmp_path / "e", epochs=1, batch_size=8, min_steps=10, progress=False
    )
    training = json.loads(path.with_suffix(".json").read_text())["training"]
    n_train = json.loads(path.with_suffix(".json").read_text())["data"]["n_train"]
    per_epoch = math.ceil(n_train / 8)
    assert training["epochs"] == math.ceil(10 / per_epoch) and training["steps"] >= 10
    assert len(training["history"]) == training["epochs"]


def test_bad_arguments(tmp_path: Path, synth_zip_16: Path) -> None:
    with pytest.raises(RetinagenError, match="not found"):
        train_fundus_encoder(tmp_path / "nope.zip", tmp_path / "e", epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_fundus_encoder(synth_zip_16, tmp_path / "e", epochs=0, progress=False)
    with pytest.raises(ValueError, match="min_steps"):
        train_fundus_encoder(synth_zip_16, tmp_path / "e", min_steps=-1, progress=False)
    with pytest.raises(MetricUnavailable, match="not found"):
        create_extractor(EXTRACTOR_NAME, weights=tmp_path / "missing.safetensors")
