"""Config layering and validation: every preset loads, bad keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from retinagen.config import (
    DATASETS,
    PRESETS,
    RunConfig,
    config_from_json,
    configs_dir,
    deep_merge,
    load_run_config,
    parse_overrides,
)
from retinagen.errors import ConfigError

MSI_FILES = sorted((configs_dir() / "msi").glob("*.yaml"))


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_every_dataset_and_preset_loads(dataset: str, preset: str | None) -> None:
    cfg = load_run_config(dataset, preset=preset)
    assert cfg.data.dataset == dataset
    assert cfg.latent.code_dim < cfg.latent.z_dim


def test_paper_values_in_eyepacs_and_celeba() -> None:
    eye = load_run_config("eyepacs")
    assert (eye.model.resolution, eye.train.batch_size, eye.model.conditional) == (512, 32, True)
    assert eye.latent.z_dim == 512 and eye.latent.categorical == (3,) and eye.latent.n_bernoulli == 7
    assert eye.latent.n_uniform == 10 and eye.loss.r1_gamma == 10.0 and eye.optim.lr_g == 0.003
    assert eye.train.kimg == 20000
    celeba = load_run_config("celeba")
    assert (celeba.model.resolution, celeba.train.batch_size, celeba.model.conditional) == (128, 128, False)
    assert celeba.train.kimg == 55000


def test_msi_variants_name_themselves() -> None:
    names = {p.stem: load_run_config("synthfundus", preset="smoke", config=p).msi for p in MSI_FILES}
    assert names == {
        "msi_s0_b1_d0": (0, 1.0, 0),
        "msi_s1_b0_d0": (1, 0.0, 0),
        "msi_s1_b1_d0": (1, 1.0, 0),
        "msi_s1_b1_d1": (1, 1.0, 1),
    }
    cfg = load_run_config("synthfundus", preset="smoke", config=MSI_FILES[2])
    assert cfg.msi_name == "MSI(S=1, β=1, d=0)"


def test_layer_order_preset_then_config_then_flags(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  batch_size: 7\n  kimg: 3\n")
    cfg = load_run_config("eyepacs", preset="cpu", config=user, overrides=parse_overrides(["train.kimg=5"]))
    assert cfg.model.resolution == 32  # preset overrides the dataset's 512
    assert cfg.train.batch_size == 7  # --config overrides the preset
    assert cfg.train.kimg == 5  # flags override everything


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError) as err:
        load_run_config("synthfundus", config=bad)
    assert "train.batch_sise" in str(err.value) and "unknown key" in str(err.value)
    assert "bad.yaml" in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.batch_size=0", "train.batch_size"),
        ("model.resolution=100", "model.resolution"),
        ("loss.beta=-1", "loss.beta"),
        ("latent.categorical=[1]", "latent.categorical"),
        ("train.amp=fp8", "train.amp"),
        ("latent.z_dim=10", "latent"),  # codes (20 dims) leave no room for noise
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config("synthfundus", overrides=parse_overrides([override]))
    assert key in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(config=broken)
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(config=tmp_path / "nope.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(config=scalar)
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_run_config("mnist")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["beta"])


def test_resolved_config_round_trips_through_json() -> None:
    cfg = load_run_config("eyepacs", preset="gpu")
    again = config_from_json(cfg.model_dump_json())
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_deep_merge_does_not_mutate() -> None:
    base = {"a": {"b": 1, "c": 2}}
    merged = deep_merge(base, {"a": {"b": 3}})
    assert merged == {"a": {"b": 3, "c": 2}} and base == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize("section, key", [("train", "amp"), ("augment", "mode")])
def test_off_unquoted_means_off(section: str, key: str, tmp_path: Path) -> None:
    """YAML reads an unquoted `off` as false; `--set train.amp=off` and `amp: off` must still mean "off"."""
    got = load_run_config("synthfundus", overrides=parse_overrides([f"{section}.{key}=off"]))
    assert getattr(getattr(got, section), key) == "off"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{section}:\n  {key}: off\n")
    assert getattr(getattr(load_run_config("synthfundus", config=cfg), section), key) == "off"
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        load_run_config("synthfundus", overrides=parse_overrides([f"{section}.{key}=on"]))  # true is not a mode


def test_the_main_job_is_bounded_in_time_and_kimg() -> None:
    # The README main job must end inside 10 minutes on the slowest machine of its kind: a training budget.
    cfg = load_run_config("synthfundus", preset="cpu")
    assert cfg.train.kimg == 24 and cfg.train.max_minutes is not None and cfg.train.max_minutes <= 7.5
