"""Rebalancing targets, code steering, and the seeds and names of synthetic tries.

Targets (`parse_target`, parsed strictly): ``uniform`` raises every grade to the largest one's count;
``counts:0=0,1=500,2=300`` asks for exactly these synthetic images per grade; ``ratio:R`` raises every grade to
at least ceil(R x the largest count). Steering (`parse_steer`): ``{"pigmentation": "spread"}`` spreads a code
evenly over each grade's images (a base-2 van der Corput sequence for a uniform code, cycling classes for a
discrete one), ``{"c4": 0.8}`` fixes it. Try T of grade G uses the latent of ``image_seed(seed, G * 2**32 + T)``,
so every image is a function of (checkpoint, seed, grade, try, steering) alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinagen.errors import ConfigError
from retinagen.generation import (
    LoadedModel,
    find_factor_map,
    image_seed,
    parse_code_settings,
    resolve_code_name,
)

GRADE_STRIDE = 2**32  # try T of grade G is image index G * GRADE_STRIDE + T of the seeded run


# --------------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class RebalanceTarget:
    """A parsed ``--target``: kind "uniform" | "counts" | "ratio"; ``counts`` grade -> synthetic images."""

    kind: str
    counts: tuple[tuple[int, int], ...] = ()
    ratio: float = 1.0

    def canonical(self) -> str:
        """The target as a normalised string (what the report records and a resume compares)."""
        if self.kind == "counts":
            return "counts:" + ",".join(f"{g}={n}" for g, n in self.counts)
        if self.kind == "ratio":
            return f"ratio:{self.ratio:g}"
        return "uniform"


_TARGET_HELP = "expected 'uniform', 'counts:G=N,...' (e.g. counts:0=0,1=500,2=300) or 'ratio:R' with 0 < R <= 1"


def parse_target(text: str, num_classes: int = 5) -> RebalanceTarget:
    """``"uniform"`` / ``"counts:0=0,1=500"`` / ``"ratio:0.5"`` -> `RebalanceTarget`; `ConfigError` otherwise.

    Strict: the kind is lower case, counts are non-negative integers for grades 0..num_classes-1, each
    grade at most once, no empty items; the ratio is a finite number in (0, 1]. Spaces around items are
    allowed.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--target: empty; {_TARGET_HELP}")
    raw = text.strip()
    kind, sep, rest = raw.partition(":")
    kind = kind.strip()
    if kind == "uniform":
        if sep:
            raise ConfigError(f"--target {raw!r}: 'uniform' takes no value; {_TARGET_HELP}")
        return RebalanceTarget("uniform")
    if kind == "ratio":
        value = rest.strip()
        try:
            ratio = float(value)
        except ValueError:
            raise ConfigError(f"--target {raw!r}: ratio {value!r} is not a number; {_TARGET_HELP}") from None
        if not sep or not math.isfinite(ratio) or not 0 < ratio <= 1:
            raise ConfigError(f"--target {raw!r}: the ratio must be a number in (0, 1], got {value!r}")
        return RebalanceTarget("ratio", ratio=ratio)
    if kind == "counts":
        if not sep or not rest.strip():
            raise ConfigError(f"--target {raw!r}: no counts given; {_TARGET_HELP}")
        counts: dict[int, int] = {}
        for item in rest.split(","):
            item = item.strip()
            if not item:
                raise ConfigError(f"--target {raw!r}: empty item (a stray comma?); {_TARGET_HELP}")
            g_text, eq, n_text = item.partition("=")
            g_text, n_text = g_text.strip(), n_text.strip()
            if not eq or not re.fullmatch(r"\d+", g_text) or not re.fullmatch(r"\d+", n_text):
                raise ConfigError(
                    f"--target {raw!r}: item {item!r} must be GRADE=COUNT with non-negative integers"
                )
            g, n = int(g_text), int(n_text)
            if g >= num_classes:
                raise ConfigError(f"--target {raw!r}: grade {g} is not a grade of this model (0..{num_classes - 1})")
            if g in counts:
                raise ConfigError(f"--target {raw!r}: grade {g} is given twice")
            counts[g] = n
        return RebalanceTarget("counts", counts=tuple(sorted(counts.items())))
    raise ConfigError(f"--target {raw!r}: unknown kind {kind!r}; {_TARGET_HELP}")


def synthetic_counts(target: RebalanceTarget, real_counts: Sequence[int]) -> list[int]:
    """Synthetic images per grade [K] that take ``real_counts`` [K] to ``target`` (never negative)."""
    real = [int(c) for c in real_counts]
    top = max(real, default=0)
    if target.kind == "uniform":
        goal = [top] * len(real)
    elif target.kind == "ratio":
        # The small epsilon keeps 0.5 * 26 = 13 from becoming 14 through float rounding.
        floor_ = math.ceil(target.ratio * top - 1e-9)
        goal = [max(c, floor_) for c in real]
    else:
        given = dict(target.counts)
        return [given.get(g, 0) for g in range(len(real))]
    return [max(0, g - c) for g, c in zip(goal, real, strict=True)]


# --------------------------------------------------------------------------------------------------
# Steering


@dataclass(frozen=True)
class SteerPlan:
    """Resolved steering: ``fixed`` code index -> value, ``spread`` code indices; ``labels`` for reports."""

    fixed: dict[int, float] = field(default_factory=dict)
    spread: tuple[int, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)  # "c4 (pigmentation)" -> "spread" / "0.8"

    def canonical(self) -> dict[str, str]:
        """Code name -> "spread" or the fixed value: what the report records and a resume compares."""
        return self.labels


def _steer_items(steer: Mapping[str, Any] | Sequence[str] | None) -> list[tuple[str, str]]:
    if not steer:
        return []
    if isinstance(steer, Mapping):
        return [(str(k).strip(), str(v).strip()) for k, v in steer.items()]
    if isinstance(steer, str):
        raise ConfigError(f"--steer {steer!r}: give a list of NAME=spread|VALUE items or a mapping")
    items = []
    for item in steer:
        name, eq, value = str(item).partition("=")
        if not eq or not name.strip() or not value.strip():
            raise ConfigError(f"--steer {item!r}: expected NAME=spread or NAME=VALUE (e.g. pigmentation=spread, c4=0.8)")
        items.append((name.strip(), value.strip()))
    return items


def parse_steer(
    model: LoadedModel,
    steer: Mapping[str, Any] | Sequence[str] | None,
    factors: str | Path | None = None,
) -> SteerPlan:
    """Resolve steering requests against ``model``'s codes (and its factor map for attribute names).

    ``steer``: ``{"pigmentation": "spread", "c4": 0.8}`` or ``["pigmentation=spread", "c4=0.8"]``. Values
    are ``spread`` or the code's own value (class index, 0/1, or a number in [-1, 1]; see
    `retinagen.generation.parse_code_settings`). ``factors``: a factor map file (default: the checkpoint's,
    read only when a name is not a plain code name). Raises `ConfigError` (`CodeValueError`) naming the item.
    """
    items = _steer_items(steer)
    if not items:
        return SteerPlan()
    spec = model.spec
    plain = {*spec.code_names, *(str(i) for i in range(spec.n_codes))}
    fmap = None
    if factors is not None or any(name not in plain for name, _ in items):
        found = find_factor_map(model, factors)
        fmap = found[0] if found is not None else None
    fixed: dict[int, float] = {}
    spread: list[int] = []
    labels: dict[str, str] = {}
    for name, value in items:
        idx = resolve_code_name(spec, name, model.factor_names, fmap, flag="--steer")
        code = spec.code_names[idx]
        if idx in fixed or idx in spread:
            raise ConfigError(f"--steer {name}={value}: code {code} is steered twice")
        key = code if name in plain else f"{code} ({name})"
        if value.lower() == "spread":
            spread.append(idx)
            labels[key] = "spread"
        else:
            try:
                fixed.update(parse_code_settings(spec, {name: value}, model.factor_names, factor_map=fmap))
            except ConfigError as exc:  # its messages name generate's flag; this one is --steer
                raise type(exc)(str(exc).replace("--set ", "--steer ", 1)) from None
            labels[key] = f"{fixed[idx]:g}"
    return SteerPlan(fixed=fixed, spread=tuple(spread), labels=labels)


def _van_der_corput(t: int) -> float:
    """The base-2 radical inverse of t in [0, 1): 0, 1/2, 1/4, 3/4, 1/8, ... (every prefix evenly spread)."""
    x, denom = 0.0, 1.0
    while t:
        denom *= 2.0
        x += (t & 1) / denom
        t >>= 1
    return x


def _spread_offset(seed: int, grade: int, code: int) -> float:
    """A seeded offset in [0, 1) so different seeds spread over different (still even) values."""
    return float(np.random.default_rng(np.random.SeedSequence([seed, grade, code, 0x5EED])).random())


def spread_value(model: LoadedModel, code: int, seed: int, grade: int, t: int) -> float:
    """The value a ``spread`` code takes on try ``t`` of ``grade``: even over [-1, 1) or cycling over classes."""
    kind = model.spec.code_kinds[code]
    u = _spread_offset(seed, grade, code)
    if kind == "uniform":
        return -1.0 + 2.0 * ((_van_der_corput(t) + u) % 1.0)
    n_classes = model.spec.categorical[code] if kind == "categorical" else 2
    return float((t + int(u * n_classes)) % n_classes)


# --------------------------------------------------------------------------------------------------
# Names and seeds


def try_seed(seed: int, grade: int, t: int) -> int:
    """The latent seed of try ``t`` of ``grade``: `image_seed` of image ``grade * GRADE_STRIDE + t``."""
    return image_seed(seed, grade * GRADE_STRIDE + t)


def synthetic_name(grade: int, t: int) -> str:
    """File stem of try ``t`` of ``grade``: ``synth_g2_000041``."""
    return f"synth_g{grade}_{t:06d}"
