"""The latent vector Z = (Z', C): Gaussian noise Z' plus named latent codes C = (C_1, ..., C_L).

The paper (Sec. 2, 4.1) splits the generator input into standard normal noise Z' and a vector of
independent latent factors C with p(C) = prod_i p(C_i): categorical codes (uniform over k classes),
Bernoulli(0.5) codes and Uniform(-1, 1) codes. The auxiliary network Q predicts, for every code, the
parameters of Q(C_i | x): logits for categorical and Bernoulli codes, and for uniform codes the mean
of a Gaussian with fixed unit variance (paper) or, as an option, a mean and a learned log-variance.

Layouts (all fixed, so that checkpoints and Q heads agree):

* named codes, in order: the categorical codes, then the Bernoulli codes, then the uniform codes;
  they are called ``c0 .. c{L-1}`` in that order (``--set c4=0.8`` names them this way);
* ``code`` (what the generator sees, width ``code_dim``): one-hot blocks for the categorical codes,
  then the Bernoulli bits as 0/1, then the uniform values in [-1, 1];
* ``q_params`` (what Q outputs, width ``q_param_dim``): categorical logits (one block per code),
  then one logit per Bernoulli code, then one mean per uniform code, then (only with
  ``learned_variance``) one log-variance per uniform code.

Everything here is measured in nats.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from retinagen.checks import check, int_in
from retinagen.errors import ConfigError

CodeKind = Literal["categorical", "bernoulli", "uniform"]

# Traversals may push a uniform code past its training range to exaggerate an attribute; beyond this
# the generator is far outside anything it was trained on.
UNIFORM_EXTRAPOLATION_LIMIT = 2.0
# Learned log-variances are clamped so that a collapsing variance cannot send log Q to +inf.
LOGVAR_MIN = -8.0
LOGVAR_MAX = 8.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class CodeValueError(ConfigError, ValueError):
    """A value given for a latent code is out of its range, or the code does not exist.

    A `ConfigError` (the CLI reports it as a bad flag, exit code 2) and a `ValueError` (for library use).
    """


@dataclass(frozen=True)
class LatentSpec:
    """Shape of Z = (Z', C).

    Args:
        z_dim: total width |Z| = |Z'| + code_dim (the paper's "512 dimension latent vector for (Z', C)").
        categorical: number of categories of each categorical code (each >= 2).
        n_bernoulli: number of Bernoulli(0.5) codes.
        n_uniform: number of Uniform(-1, 1) codes.
        learned_variance: Q predicts a log-variance for each uniform code instead of assuming 1.
    """

    z_dim: int = 512
    categorical: tuple[int, ...] = (3,)
    n_bernoulli: int = 7
    n_uniform: int = 10
    learned_variance: bool = False

    def __post_init__(self) -> None:
        # YAML and JSON give lists; keep the dataclass hashable and immutable.
        object.__setattr__(self, "categorical", tuple(int(k) for k in self.categorical))
        if any(k < 2 for k in self.categorical):
            raise ConfigError(
                f"latent.categorical: every categorical code needs >= 2 categories, got {self.categorical}"
            )
        if self.n_bernoulli < 0:
            raise ConfigError(f"latent.n_bernoulli must be >= 0, got {self.n_bernoulli}")
        if self.n_uniform < 0:
            raise ConfigError(f"latent.n_uniform must be >= 0, got {self.n_uniform}")
        if self.z_dim <= self.code_dim:
            raise ConfigError(
                f"latent.z_dim ({self.z_dim}) must exceed the code width ({self.code_dim}) so that Z' has >= 1 dim"
            )

    # ----------------------------------------------------------------------------------- constructors
    @classmethod
    def paper_default(cls) -> LatentSpec:
        """1 categorical(3) + 7 Bernoulli + 10 uniform codes in a 512-dim Z (paper, Sec. 4.1)."""
        return cls()

    @classmethod
    def discrete_only(
        cls, z_dim: int = 512, categorical: tuple[int, ...] = (3,), n_bernoulli: int = 7
    ) -> LatentSpec:
        """The d = 1 variant of MSI(S, beta, d): categorical and Bernoulli codes only."""
        return cls(z_dim=z_dim, categorical=tuple(categorical), n_bernoulli=n_bernoulli, n_uniform=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for checkpoint metadata)."""
        return {
            "z_dim": self.z_dim,
            "categorical": list(self.categorical),
            "n_bernoulli": self.n_bernoulli,
            "n_uniform": self.n_uniform,
            "learned_variance": self.learned_variance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentSpec:
        """Inverse of `to_dict`; unknown keys are an error naming the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"latent: unknown key(s) {unknown}")
        return cls(**data)

    # ------------------------------------------------------------------------------------ dimensions
    @property
    def n_categorical(self) -> int:
        return len(self.categorical)

    @property
    def code_dim(self) -> int:
        """Width of the code vector fed to the generator (one-hot + bits + uniform values)."""
        return sum(self.categorical) + self.n_bernoulli + self.n_uniform

    @property
    def noise_dim(self) -> int:
        """Width of Z'."""
        return self.z_dim - self.code_dim

    @property
    def n_codes(self) -> int:
        """Number of named codes L."""
        return self.n_categorical + self.n_bernoulli + self.n_uniform

    @property
    def n_discrete(self) -> int:
        return self.n_categorical + self.n_bernoulli

    @property
    def q_param_dim(self) -> int:
        """Width of Q's output (see the module docstring for the layout)."""
        return sum(self.categorical) + self.n_bernoulli + self.n_uniform * (2 if self.learned_variance else 1)

    @property
    def code_names(self) -> tuple[str, ...]:
        return tuple(f"c{i}" for i in range(self.n_codes))

    @property
    def code_kinds(self) -> tuple[CodeKind, ...]:
        return (
            ("categorical",) * self.n_categorical
            + ("bernoulli",) * self.n_bernoulli
            + ("uniform",) * self.n_uniform
        )

    @property
    def discrete_mask(self) -> torch.Tensor:
        """[L] bool, True for categorical and Bernoulli codes."""
        return torch.tensor([k != "uniform" for k in self.code_kinds], dtype=torch.bool)

    def code_index(self, index_or_name: int | str) -> int:
        """Index i of code ``c{i}`` given ``i`` or ``"c{i}"``; raises `CodeValueError` if there is no such code."""
        if isinstance(index_or_name, str):
            name = index_or_name.strip()
            if name not in self.code_names:
                raise CodeValueError(f"no latent code named {name!r}; codes are c0..c{self.n_codes - 1}")
            return self.code_names.index(name)
        index = check(int_in(), index_or_name, "code index (or a name like 'c4')", CodeValueError)
        if not 0 <= index < self.n_codes:
            raise CodeValueError(f"code index {index} out of range [0, {self.n_codes})")
        return index

    # ----------------------------------------------------------------------------------- sampling
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> LatentSample:
        """Draw n samples of (Z', C) from the prior.

        Random numbers are drawn on the generator's device (CPU when no generator is given) and then
        moved to ``device``, so a CPU generator with the same seed gives the same latents on any device.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        src = generator.device if generator is not None else torch.device("cpu")
        dst = torch.device(device) if device is not None else src
        z_noise = torch.randn(n, self.noise_dim, generator=generator, device=src)
        cat = torch.zeros(n, self.n_categorical, dtype=torch.int64, device=src)
        for j, k in enumerate(self.categorical):
            cat[:, j] = torch.randint(0, k, (n,), generator=generator, device=src)
        bern = torch.randint(0, 2, (n, self.n_bernoulli), generator=generator, device=src).to(torch.float32)
        unif = torch.rand(n, self.n_uniform, generator=generator, device=src) * 2.0 - 1.0
        return LatentSample(self, z_noise.to(dst), cat.to(dst), bern.to(dst), unif.to(dst))

    def from_values(
        self, z_noise: torch.Tensor, values: torch.Tensor, allow_extrapolation: bool = False
    ) -> LatentSample:
        """Build a sample from Z' [N, noise_dim] and per-code values [N, L] (category index as float)."""
        if z_noise.ndim != 2 or z_noise.shape[1] != self.noise_dim:
            raise ValueError(f"z_noise must be [N, {self.noise_dim}], got {tuple(z_noise.shape)}")
        if values.ndim != 2 or values.shape != (z_noise.shape[0], self.n_codes):
            raise ValueError(
                f"values must be [{z_noise.shape[0]}, {self.n_codes}], got {tuple(values.shape)}"
            )
        nc, nb = self.n_categorical, self.n_bernoulli
        for i in range(self.n_codes):
            self._check_value(i, values[:, i], allow_extrapolation)
        return LatentSample(
            self,
            z_noise,
            values[:, :nc].round().to(torch.int64),
            values[:, nc : nc + nb].to(torch.float32),
            values[:, nc + nb :].to(torch.float32),
        )

    def _check_value(self, i: int, value: torch.Tensor, allow_extrapolation: bool) -> None:
        kind = self.code_kinds[i]
        v = value.detach().to(torch.float64)
        if not torch.isfinite(v).all():
            raise CodeValueError(f"c{i}: value must be finite")
        if kind == "categorical":
            k = self.categorical[i]
            if not (v == v.round()).all() or (v < 0).any() or (v > k - 1).any():
                raise CodeValueError(
                    f"c{i} is categorical with {k} classes: value must be an integer in 0..{k - 1}"
                )
        elif kind == "bernoulli":
            if allow_extrapolation:
                if (v < 0).any() or (v > 1).any():
                    raise CodeValueError(
                        f"c{i} is Bernoulli: value must lie in [0, 1] (0/1 without extrapolation)"
                    )
            elif not ((v == 0) | (v == 1)).all():
                raise CodeValueError(f"c{i} is Bernoulli: value must be 0 or 1")
        else:
            lim = UNIFORM_EXTRAPOLATION_LIMIT if allow_extrapolation else 1.0
            if (v.abs() > lim).any():
                raise CodeValueError(f"c{i} is Uniform(-1, 1): value must lie in [-{lim:g}, {lim:g}]")

    def with_code(
        self,
        sample: LatentSample,
        index_or_name: int | str,
        value: float | int | torch.Tensor,
        *,
        allow_extrapolation: bool = False,
    ) -> LatentSample:
        """A copy of ``sample`` with code ``index_or_name`` set to ``value`` for every row (or per row for a [N] tensor).

        Valid values: categorical -> integer class index; Bernoulli -> 0 or 1 (any value in [0, 1] with
        ``allow_extrapolation``); uniform -> [-1, 1] ([-2, 2] with ``allow_extrapolation``, for traversals
        that exaggerate an attribute). Raises `CodeValueError` otherwise.
        """
        if sample.spec != self:
            raise ValueError("sample was drawn from a different LatentSpec")
        i = self.code_index(index_or_name)
        n = sample.n
        v = torch.as_tensor(value, dtype=torch.float64)
        if v.ndim == 0:
            v = v.expand(n)
        if v.shape != (n,):
            raise ValueError(f"value must be a scalar or a [{n}] tensor, got shape {tuple(v.shape)}")
        self._check_value(i, v, allow_extrapolation)
        cat, bern, unif = sample.cat.clone(), sample.bern.clone(), sample.unif.clone()
        nc, nb = self.n_categorical, self.n_bernoulli
        if i < nc:
            cat[:, i] = v.round().to(torch.int64).to(cat.device)
        elif i < nc + nb:
            bern[:, i - nc] = v.to(bern.dtype).to(bern.device)
        else:
            unif[:, i - nc - nb] = v.to(unif.dtype).to(unif.device)
        return LatentSample(self, sample.z_noise.clone(), cat, bern, unif)

    # ------------------------------------------------------------------------- Q(C | x) and entropy
    def split_q_params(self, q_params: torch.Tensor) -> QParams:
        """Split Q's output [N, q_param_dim] into its named parts (see the module docstring)."""
        if q_params.ndim != 2 or q_params.shape[1] != self.q_param_dim:
            raise ValueError(f"q_params must be [N, {self.q_param_dim}], got {tuple(q_params.shape)}")
        sizes = [*self.categorical, self.n_bernoulli, self.n_uniform]
        if self.learned_variance:
            sizes.append(self.n_uniform)
        parts = list(torch.split(q_params, sizes, dim=1))
        cat_logits = tuple(parts[: self.n_categorical])
        bern_logits = parts[self.n_categorical]
        unif_mean = parts[self.n_categorical + 1]
        unif_logvar = (
            parts[self.n_categorical + 2].clamp(LOGVAR_MIN, LOGVAR_MAX) if self.learned_variance else None
        )
        return QParams(cat_logits, bern_logits, unif_mean, unif_logvar)

    def log_q(self, q_params: torch.Tensor, sample: LatentSample) -> torch.Tensor:
        """Per-code log Q(c_i | x) [N, L] for the codes in ``sample``, in nats, computed in fp32.

        * categorical: log-softmax of the logits at the sampled class;
        * Bernoulli: log sigmoid(l) for c = 1 and log sigmoid(-l) for c = 0 (= -BCE-with-logits);
        * uniform: log N(c; mu, 1) = -(c - mu)^2 / 2 - log(2 pi) / 2 (paper), or with a learned, clamped
          log-variance s: -(c - mu)^2 / (2 e^s) - s / 2 - log(2 pi) / 2.
        """
        if sample.spec != self:
            raise ValueError("sample was drawn from a different LatentSpec")
        q = self.split_q_params(q_params.float())
        if q_params.shape[0] != sample.n:
            raise ValueError(f"q_params has {q_params.shape[0]} rows but the sample has {sample.n}")
        cols: list[torch.Tensor] = []
        for j, logits in enumerate(q.cat_logits):
            cols.append(F.log_softmax(logits, dim=1).gather(1, sample.cat[:, j : j + 1]))
        bern = sample.bern.float()
        cols.append(-F.binary_cross_entropy_with_logits(q.bern_logits, bern, reduction="none"))
        diff2 = (sample.unif.float() - q.unif_mean) ** 2
        if q.unif_logvar is None:
            cols.append(-0.5 * diff2 - _HALF_LOG_2PI)
        else:
            cols.append(-0.5 * diff2 * torch.exp(-q.unif_logvar) - 0.5 * q.unif_logvar - _HALF_LOG_2PI)
        return torch.cat(cols, dim=1)

    def q_estimate(self, q_params: torch.Tensor) -> torch.Tensor:
        """Point estimate of every code from Q [N, L]: argmax class (as float), P(c = 1), or the mean."""
        q = self.split_q_params(q_params.float())
        cols = [logits.argmax(dim=1, keepdim=True).float() for logits in q.cat_logits]
        cols.append(torch.sigmoid(q.bern_logits))
        cols.append(q.unif_mean)
        return torch.cat(cols, dim=1)

    def entropy(self) -> torch.Tensor:
        """Prior entropy H(C_i) per code [L] (fp32, nats).

        log k for categorical(k), log 2 for Bernoulli(0.5) and the differential entropy log(2) of
        U(-1, 1) (= log of the interval's length). The last is not an upper bound on anything: see
        `retinagen.training.losses.info_terms`.
        """
        h = [math.log(k) for k in self.categorical] + [math.log(2.0)] * (self.n_bernoulli + self.n_uniform)
        return torch.tensor(h, dtype=torch.float32)

    def discrete_entropy(self) -> float:
        """H of the discrete codes, sum_i log k_i + n_bernoulli log 2: the upper bound on the discrete part of
        L_info (paper, Figure 10)."""
        return float(sum(math.log(k) for k in self.categorical) + self.n_bernoulli * math.log(2.0))


@dataclass(frozen=True)
class QParams:
    """Q's output split by code kind; shapes [N, k_j] per categorical code, [N, n_bern], [N, n_unif]."""

    cat_logits: tuple[torch.Tensor, ...]
    bern_logits: torch.Tensor
    unif_mean: torch.Tensor
    unif_logvar: torch.Tensor | None


def pair_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows m..2m-1 of ``t`` replaced by rows 0..m-1 (m = N // 2; an odd last row kept): the pairs of the
    mode-seeking term (`LatentSample.with_paired_codes`, and the grades that go with them)."""
    m = t.shape[0] // 2
    return torch.cat([t[:m], t[:m], t[2 * m :]])


@dataclass(frozen=True)
class LatentSample:
    """A batch of latents drawn from a `LatentSpec`.

    Attributes:
        spec: the spec it was drawn from.
        z_noise: Z' [N, noise_dim], standard normal.
        cat: categorical class indices [N, n_categorical] int64.
        bern: Bernoulli bits [N, n_bernoulli] float 0/1.
        unif: uniform codes [N, n_uniform] float in [-1, 1].
    """

    spec: LatentSpec
    z_noise: torch.Tensor
    cat: torch.Tensor
    bern: torch.Tensor
    unif: torch.Tensor

    def __post_init__(self) -> None:
        n = self.z_noise.shape[0]
        s = self.spec
        expected = {
            "z_noise": (n, s.noise_dim),
            "cat": (n, s.n_categorical),
            "bern": (n, s.n_bernoulli),
            "unif": (n, s.n_uniform),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"LatentSample.{name} must be {list(shape)}, got {list(got)}")
        if self.cat.dtype != torch.int64:
            raise ValueError(f"LatentSample.cat must be int64, got {self.cat.dtype}")

    @property
    def n(self) -> int:
        return int(self.z_noise.shape[0])

    def __len__(self) -> int:
        return self.n

    @property
    def device(self) -> torch.device:
        return self.z_noise.device

    def to(self, device: torch.device | str) -> LatentSample:
        return LatentSample(
            self.spec,
            self.z_noise.to(device),
            self.cat.to(device),
            self.bern.to(device),
            self.unif.to(device),
        )

    def __getitem__(self, index: slice | torch.Tensor) -> LatentSample:
        """Rows of the batch (a slice or an index tensor)."""
        return LatentSample(
            self.spec, self.z_noise[index], self.cat[index], self.bern[index], self.unif[index]
        )

    def with_paired_codes(self) -> LatentSample:
        """The same noise latents with rows m..2m-1 given the codes of rows 0..m-1 (m = N // 2; an odd
        last row keeps its own): pairs that differ in z' only, for the mode-seeking term."""
        return LatentSample(self.spec, self.z_noise, pair_rows(self.cat), pair_rows(self.bern), pair_rows(self.unif))

    def code(self) -> torch.Tensor:
        """Generator code input C [N, code_dim]: one-hot blocks, then Bernoulli 0/1, then uniform values."""
        parts = [
            F.one_hot(self.cat[:, j], k).to(self.z_noise.dtype) for j, k in enumerate(self.spec.categorical)
        ]
        parts += [self.bern.to(self.z_noise.dtype), self.unif.to(self.z_noise.dtype)]
        return torch.cat(parts, dim=1)

    def values(self) -> torch.Tensor:
        """Per-code values [N, L] (category index as float, bits, uniform values), in code order."""
        return torch.cat([self.cat.to(torch.float32), self.bern.float(), self.unif.float()], dim=1)
