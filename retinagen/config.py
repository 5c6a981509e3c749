"""Typed, validated run configs.

A run's config is assembled from YAML layers, later layers overriding earlier ones key by key:

    built-in defaults  <-  configs/<dataset>.yaml  <-  configs/presets/<preset>.yaml
                       <-  --config YAML (e.g. configs/msi/msi_s0_b1_d0.yaml)  <-  command-line flags

and validated once, at load: an unknown key or a bad value is a `ConfigError` that names the key
(``train.batch_size: Input should be greater than 0``). The resolved config is written as JSON next
to every run (``config.json``) and inside every checkpoint, so a run can always be reproduced.

No string class names, no ``-1`` meaning "auto": choices are explicit literals (``device: auto``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retinagen.errors import ConfigError

# The seeds of the fixed judges' synthetic sets (`retinagen.metrics.judges`): their train set and their
# reference set. No training data may be rendered with them, or the judges would have seen a run's data.
JUDGE_SEEDS = (7_340_033, 7_340_034)

DATASETS = ("synthfundus", "eyepacs", "aptos", "celeba", "folder")
PRESETS = ("smoke", "cpu", "gpu")


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _off_means_off(cls, data: Any) -> Any:
        # YAML 1.1 (safe_load) reads an unquoted `off` as false: for every choice field that has an "off"
        # choice (train.amp, augment.mode), `--set train.amp=off` and `amp: off` mean "off".
        if not isinstance(data, Mapping):
            return data
        offs = [k for k, f in cls.model_fields.items() if get_origin(f.annotation) is Literal and "off" in get_args(f.annotation)]
        if not any(data.get(k) is False for k in offs):
            return data
        return {**data, **{k: "off" for k in offs if data.get(k) is False}}


class DataConfig(_Strict):
    dataset: Literal["synthfundus", "eyepacs", "aptos", "celeba", "folder"] = "synthfundus"
    # A prepared ZIP (``retinagen prepare``) or, for synthfundus, nothing: the built-in data are
    # synthesised and prepared into the run folder on first use.
    path: str | None = None
    split: Literal["train", "all"] = "train"
    # Built-in synthetic fundus data (used when dataset == synthfundus and path is None).
    synth_n: int = Field(2000, ge=16, le=1_000_000)
    synth_seed: int = Field(0, ge=0)
    # How often each DR grade is shown in training, real images and fake grades alike: in proportion to
    # count ** (1 - grade_balance). 0: the data's frequencies; 1: every grade equally often (rare grades'
    # images repeated). Conditional models only; generation still draws grades by the data's frequencies.
    grade_balance: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("synth_seed")
    @classmethod
    def _not_a_judge_seed(cls, v: int) -> int:
        if v in JUDGE_SEEDS:
            raise ValueError(f"{v} is one of the fixed judges' seeds {JUDGE_SEEDS}: training data must not be the judges' data")
        return v


class LatentConfig(_Strict):
    """The latent Z = (Z', C). Paper default: 1 categorical(3) + 7 Bernoulli + 10 uniform, |Z| = 512."""

    z_dim: int = Field(512, ge=4, le=4096)
    categorical: tuple[int, ...] = (3,)
    n_bernoulli: int = Field(7, ge=0, le=256)
    n_uniform: int = Field(10, ge=0, le=256)
    # Q models uniform codes as Gaussians with fixed unit variance (paper); learned is an option.
    learned_variance: bool = False

    @field_validator("categorical")
    @classmethod
    def _categorical_sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 2 for k in v):
            raise ValueError("every categorical code needs at least 2 categories")
        return v

    @property
    def code_dim(self) -> int:
        return sum(self.categorical) + self.n_bernoulli + self.n_uniform

    @property
    def discrete_only(self) -> bool:
        return self.n_uniform == 0

    @model_validator(mode="after")
    def _room_for_noise(self) -> LatentConfig:
        if self.code_dim >= self.z_dim:
            raise ValueError(
                f"z_dim ({self.z_dim}) must exceed the code width ({self.code_dim}) so that Z' has at least one dim"
            )
        return self


class ModelConfig(_Strict):
    style: bool = True  # S in MSI(S, beta, d): style generator (1) or InfoGAN direct input (0)
    resolution: int = 64
    w_dim: int = Field(512, ge=8, le=2048)
    mapping_layers: int = Field(8, ge=1, le=16)
    # StyleGAN's 0.01 slows the mapping network 100x; short CPU runs need it faster for the codes to
    # reach the image at all (the paper's Figure 10 notes InfoStyleGAN's L_info rises only gradually).
    mapping_lr_multiplier: float = Field(0.01, gt=0.0, le=1.0)
    # How (Z', C) enter G: "balanced" standardises the codes and gives them the same input energy as Z'
    # (without it, L_info stays at ~0 nats: the codes are drowned by Z'); "raw" is plain concat(Z', C).
    code_input: Literal["balanced", "raw"] = "balanced"
    g_channel_base: int = Field(16384, ge=16)
    g_channel_max: int = Field(512, ge=4)
    d_channel_base: int = Field(16384, ge=16)
    d_channel_max: int = Field(512, ge=4)
    # DR-grade conditioning: label embedding in the mapping network, projection in D.
    conditional: bool = False
    # Where the grade enters G (style generator): "mapping" (StyleGAN2-ADA: the embedding joins z) or
    # "layers" (also a learned per-block offset of w for each grade, starting at 0).
    grade_entry: Literal["mapping", "layers"] = "mapping"
    num_classes: int = Field(5, ge=2, le=1000)
    mbstd_group: int = Field(4, ge=1, le=64)
    aux_classifier: bool = False
    # Progressive growing (`retinagen.networks.grow`): train first at this resolution, then fade in each
    # next one over grow_fade_kimg and train it for grow_stable_kimg, up to `resolution`. None: off.
    grow_from: int | None = None
    grow_stable_kimg: float = Field(4.0, ge=0.0)
    grow_fade_kimg: float = Field(2.0, ge=0.0)

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 8 or v > 1024 or 2 ** int(round(math.log2(v))) != v:
            raise ValueError("must be a power of two between 8 and 1024")
        return v

    @model_validator(mode="after")
    def _growable(self) -> ModelConfig:
        g = self.grow_from
        if g is None:
            return self
        if g < 4 or g >= self.resolution or 2 ** int(round(math.log2(g))) != g:
            raise ValueError(f"grow_from must be a power of two from 4 up to below resolution ({self.resolution}), got {g}")
        if not self.style:
            raise ValueError("grow_from needs style: true (progressive growing uses the style generator's skip network)")
        return self


class LossConfig(_Strict):
    beta: float = Field(1.0, ge=0.0, le=100.0)  # beta in Eq. (4); 0 gives StyleGAN / a plain GAN
    r1_gamma: float = Field(10.0, ge=0.0)
    r1_interval: int = Field(16, ge=1)  # lazy R1: every N discriminator steps, scaled by N
    grade_weight: float = Field(1.0, ge=0.0)  # auxiliary DR-grade classifier loss, when enabled
    # A frozen DR grader (a fundus encoder .safetensors with a grade head, trained on the run's labelled
    # training images) whose cross-entropy on the fakes, times grade_guide_weight, joins G's loss
    # (`retinagen.training.grade_guide`). Needs model.conditional. None: off.
    grade_guide: str | None = None
    grade_guide_weight: float = Field(1.0, ge=0.0)
    # The guide reads each fake through a random flip, 90-degree turn, shift, scale, rotation and colour change,
    # each with this probability (the grade does not change under any of them): G cannot then satisfy the
    # guide with a mark at a fixed place or orientation. 0: the guide reads the fakes as they are.
    grade_guide_augment: float = Field(0.0, ge=0.0, le=1.0)
    # Weight of the uniform codes' log Q inside L_info (1 = Eq. 3 as written). Below 1 it stops the
    # unbounded Gaussian term from dominating the bounded discrete one in short runs.
    info_continuous_weight: float = Field(1.0, ge=0.0, le=1.0)
    # G's share of the info term rises linearly from 0 to beta over this many kimg (0: beta from the start);
    # Q still learns at full beta on D's step, so it reads the codes by the time G is asked to keep them.
    beta_rampup_kimg: float = Field(0.0, ge=0.0)
    # Share of Q's loss gradient (D's step) that reaches D's shared trunk: 1 is InfoGAN (Q and D train
    # the trunk together), 0 trains only the Q head on it; G's step always gets the whole info gradient.
    q_trunk_scale: float = Field(1.0, ge=0.0, le=1.0)
    # Mode seeking (Mao et al. 2019, MSGAN) on G's step: the batch is drawn in pairs that share codes (and
    # grade) and differ in z', and G also minimises mode_seeking * mean|z'1 - z'2| / mean|G1 - G2|, so z'
    # keeps a share of the images' variety against the info term, which rewards images that depend on the
    # codes alone. 0 turns it off (the pairs are not drawn).
    mode_seeking: float = Field(0.0, ge=0.0, le=100.0)
    # The pair's image distance is taken on images average-pooled by this factor (1: pixels, MSGAN): with
    # pixels, G measurably meets the term with z'-dependent grain; pooled, only larger structure counts.
    mode_seeking_pool: int = Field(1, ge=1, le=64)


class OptimConfig(_Strict):
    lr_g: float = Field(0.002, gt=0.0, le=1.0)
    lr_d: float = Field(0.002, gt=0.0, le=1.0)
    beta1: float = Field(0.0, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)


class TrainConfig(_Strict):
    batch_size: int = Field(32, ge=1, le=8192)
    kimg: float = Field(20000.0, gt=0.0)  # training length in thousands of real images shown
    # Wall-clock budget (training time over all sessions, snapshot scoring excluded): the run ends cleanly
    # at the first step past it, with a snapshot, as if kimg had been reached. None: kimg alone decides.
    max_minutes: float | None = Field(None, gt=0.0)
    ema_kimg: float = Field(10.0, ge=0.0)
    ema_rampup: float | None = Field(0.05, ge=0.0)
    snapshot_kimg: float = Field(200.0, gt=0.0)
    keep_checkpoints: int = Field(3, ge=1)  # newest snapshots kept in RUN/checkpoints
    sample_kimg: float = Field(50.0, gt=0.0)
    log_every_steps: int = Field(10, ge=1)
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, off on CPU
    compile: bool = False
    # One G forward per step: the D phase's fakes (drawn with G's graph kept) are also the G phase's,
    # instead of a second draw. G is unchanged between the phases, so each loss is the same function; the
    # two phases see the same latents instead of independent ones, and one G forward is saved.
    reuse_fakes: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(2, ge=0, le=64)
    seed: int = Field(0, ge=0)
    sample_grid: tuple[int, int] = (8, 4)  # columns x rows of the fixed-seed sample grid
    # Generated images per snapshot scored by the fixed judges (fd_fundus, precision/recall, grade fidelity,
    # L_info; `retinagen.metrics.quality`); the best snapshot by fd_fundus is kept. 0: no scoring.
    quality_n: int = Field(256, ge=0, le=50_000)

    @field_validator("quality_n")
    @classmethod
    def _quality_n_enough(cls, v: int) -> int:
        if 0 < v < 128:
            raise ValueError("must be 0 (no scoring) or at least 128 (the judges' 128 features need more images)")
        return v


AugmentName = Literal["xflip", "rot90", "translate", "scale", "rotate", "aniso", "brightness", "contrast", "saturation"]


class AugmentConfig(_Strict):
    """Adaptive discriminator augmentation (`retinagen.training.augment`): what D sees, real and fake."""

    mode: Literal["off", "fixed", "ada"] = "off"
    p: float = Field(0.0, ge=0.0, le=1.0)  # the fixed strength, or ADA's starting one
    target: float = Field(0.6, gt=0.0, lt=1.0)  # ADA: r_t = E[sign(D(real))] is steered towards this
    speed_kimg: float = Field(500.0, gt=0.0)  # ADA: p can go from 0 to 1 in this many thousand images
    interval: int = Field(4, ge=1)  # ADA: steps between adjustments of p
    transforms: tuple[AugmentName, ...] = ("translate", "scale", "rotate", "aniso", "brightness", "contrast", "saturation")
    # What Q reads: the clean fakes (one more pass of D's trunk per phase; the codes may then carry what
    # the augmentations change, e.g. brightness) or the augmented ones D judges.
    q_input: Literal["clean", "augmented"] = "clean"


class RunConfig(_Strict):
    data: DataConfig = DataConfig()
    latent: LatentConfig = LatentConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()

    @property
    def msi(self) -> tuple[int, float, int]:
        """(S, beta, d) of the paper's MSI family."""
        return (int(self.model.style), self.loss.beta, int(self.latent.discrete_only))

    @property
    def msi_name(self) -> str:
        s, beta, d = self.msi
        return f"MSI(S={s}, β={beta:g}, d={d})"

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------
# Loading and merging


def configs_dir() -> Path:
    """The folder holding the YAML presets (``configs/`` at the project's top level)."""
    here = Path(__file__).resolve().parent.parent / "configs"
    if here.is_dir():
        return here
    raise ConfigError(f"configs folder not found at {here}; install retinagen from its source tree (pip install -e .)")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out: dict[str, Any] = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a YAML text file (byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    if "\x00" in text:  # UTF-8 decodes NUL bytes; a YAML file never holds them
        raise ConfigError(f"{path}: not a YAML text file (it holds NUL bytes)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, latent, model, ...)")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.kimg=5", "loss.beta=0"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: bad value: {exc}") from exc
        # A key given twice, or both as a value and as a section (a.b=1 with a.b.c=2), is ambiguous: refuse it
        # rather than let the later item silently win or fail deep inside the merge.
        node = out
        for depth, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {item!r} conflicts with an earlier --set of {where} to a value")
            node = child
        if keys[-1] in node:
            raise ConfigError(f"override {item!r} conflicts with an earlier --set of {'.'.join(keys)}")
        node[keys[-1]] = value
    return out


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = "unknown key (not allowed)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return f"invalid config ({source}):\n" + "\n".join(lines)


def validate_config(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_run_config(
    dataset: str | None = None,
    *,
    preset: str | None = None,
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Assemble and validate a run config from its layers (see the module docstring)."""
    layers: list[tuple[str, dict[str, Any]]] = []
    root = configs_dir()
    if dataset is not None:
        if dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        layers.append((f"configs/{dataset}.yaml", read_yaml(root / f"{dataset}.yaml")))
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        layers.append((f"configs/presets/{preset}.yaml", read_yaml(root / "presets" / f"{preset}.yaml")))
    if config is not None:
        layers.append((str(config), read_yaml(config)))
    if overrides:
        layers.append(("command line", dict(overrides)))
    merged: dict[str, Any] = {}
    for source, layer in layers:
        # Validate each layer on its own first, so an unknown key names the file it came from.
        validate_config(deep_merge(merged, layer), source)
        merged = deep_merge(merged, layer)
    if dataset is not None:
        merged = deep_merge(merged, {"data": {"dataset": dataset}})
    return validate_config(merged, " <- ".join(s for s, _ in layers) or "defaults")


def config_from_json(text: str | Mapping[str, Any], source: str = "config.json") -> RunConfig:
    data = json.loads(text) if isinstance(text, str) else dict(text)
    return validate_config(data, source)
