"""Factor discovery: which latent code c_i moves which measurable attribute (``retinagen discover``).

For every code of the model's `LatentSpec`, ``n`` latents are drawn (same seeds as image 0..n-1 of
``generate_images(model, n, seed)``) and the code alone is traversed across its range: every class of a
categorical code, 0 / 1 of a Bernoulli code, ``steps`` values over [-1, 1] of a uniform code; the other
codes and the noise stay fixed per sample. Every attribute probe (`retinagen.metrics.attributes`, plus
``dr_grade`` from a grader when one is given) is measured on every image, giving per (code, attribute)
a curve [n, V]. From it:

* effect: mean over samples of (value at the last code value - value at the first), divided by the
  attribute's standard deviation over every image generated in the run: a standardized effect, signed.
  That standard deviation is floored at ``min_spread`` times the probe's typical spread across fundus
  photographs (`AttributeProbe.spread`), so an attribute the model hardly varies at all (no lesions
  anywhere, say) cannot show large standardized "effects" made of noise;
* consistency: the ACM rule (`retinagen.metrics.acm.acm_from_curves`): the fraction of samples whose
  curve moves monotonically in the majority direction by at least ``min_effect`` standard deviations
  (steps against it up to ``tolerance`` standard deviations count as ties);
* direction: that majority direction, +1 or -1;
* score = |effect| * consistency.

Categorical classes have no order: their classes are sorted by the attribute's mean (over samples),
so the curve runs from the class with the lowest mean to the highest (direction +1; the order is
reported as ``class_order``).

Assignment: (code, attribute) pairs are taken greedily by score, each code and each attribute at most
once, and only while the score is at least ``min_score``; codes that control nothing measurable stay
unassigned (``"attribute": null``). The JSON factor map (``save_factor_map``, ``load_factor_map``) is
what ``generate --set melanin=0.8`` (`factor_aliases`, `attribute_codes`) and the dashboard read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from retinagen.checks import Count, CountAtLeast2, check
from retinagen.factor_map import (  # the map's file format lives there; re-exported for callers of this module
    FACTOR_MAP_SCHEMA,
    attribute_codes,
    factor_aliases,
    load_factor_map,
    save_factor_map,
)
from retinagen.metrics.acm import acm_from_curves
from retinagen.metrics.attributes import ATTRIBUTES, measure, resolve_attribute
from retinagen.progress import progress_bar

__all__ = [
    "DR_GRADE",
    "FACTOR_MAP_SCHEMA",
    "DiscoveryResult",
    "ProbeFn",
    "attribute_codes",
    "discover_factors",
    "factor_aliases",
    "format_table",
    "load_factor_map",
    "save_factor_map",
]

DR_GRADE = "dr_grade"  # the attribute name of the grader's expected DR grade

# A probe or grader: generated images float [N, 3, R, R] in [-1, 1] (CPU) -> one float per image [N].
ProbeFn = Callable[[torch.Tensor], Any]


@dataclass
class DiscoveryResult:
    """Everything `discover_factors` measured; ``to_json()`` is the factor map.

    Arrays are indexed [code, attribute] in the order of ``code_names`` and ``attributes``.
    ``curves[code][attribute]``: [n, V] attribute values along the traversal, in the order of
    ``values[code]`` (the natural order of the code values; categorical classes sorted by the mean
    are in ``class_order[code]``).
    """

    code_names: list[str]
    code_kinds: list[str]
    attributes: list[str]
    values: dict[str, list[float]]
    curves: dict[str, dict[str, np.ndarray]]
    effect: np.ndarray
    consistency: np.ndarray
    direction: np.ndarray
    class_order: dict[str, dict[str, list[int]]]
    assignment: dict[str, str | None]
    attribute_std: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> np.ndarray:
        """|effect| * consistency, [codes, attributes]."""
        return np.abs(self.effect) * self.consistency

    def table(self) -> list[dict[str, Any]]:
        """Every (code, attribute) pair as a row, sorted by score (highest first)."""
        rows = []
        score = self.score
        for i, code in enumerate(self.code_names):
            for j, attr in enumerate(self.attributes):
                rows.append(
                    {
                        "code": code,
                        "kind": self.code_kinds[i],
                        "attribute": attr,
                        "effect": float(self.effect[i, j]),
                        "consistency": float(self.consistency[i, j]),
                        "direction": int(self.direction[i, j]),
                        "score": float(score[i, j]),
                        "assigned": self.assignment.get(code) == attr,
                    }
                )
        rows.sort(key=lambda r: (-r["score"], r["code"], r["attribute"]))
        return rows

    def to_json(self) -> dict[str, Any]:
        """The factor map (see the module docstring), JSON-able."""
        score = self.score
        codes: dict[str, Any] = {}
        for i, code in enumerate(self.code_names):
            per_attr = {}
            for j, attr in enumerate(self.attributes):
                entry: dict[str, Any] = {
                    "effect": _num(self.effect[i, j]),
                    "consistency": _num(self.consistency[i, j]),
                    "direction": int(self.direction[i, j]),
                    "score": _num(score[i, j]),
                }
                if code in self.class_order:
                    entry["class_order"] = list(self.class_order[code][attr])
                per_attr[attr] = entry
            assigned = self.assignment.get(code)
            best = self.attributes[int(np.argmax(score[i]))] if score[i].max(initial=0.0) > 0 else None
            shown = assigned if assigned is not None else best
            codes[code] = {
                "attribute": assigned,
                "kind": self.code_kinds[i],
                "best": best,
                **(
                    {k: per_attr[shown][k] for k in ("effect", "consistency", "direction", "score")}
                    if shown
                    else {}
                ),
                "values": [float(v) for v in self.values[code]],
                "all": per_attr,
            }
        return {
            "schema": FACTOR_MAP_SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.params,
            "attribute_std": {k: _num(v) for k, v in self.attribute_std.items()},
            "codes": codes,
            "attributes": {attr: code for code, attr in self.assignment.items() if attr is not None},
        }


def _num(x: float) -> float:
    v = float(x)
    return v if math.isfinite(v) else 0.0


# ============================================================================================ discovery
def _probe_fns(
    probes: Iterable[str] | Mapping[str, ProbeFn] | None, grader: ProbeFn | None
) -> tuple[list[str], dict[str, ProbeFn]]:
    """(names of built-in probes measured together, extra name -> callable)."""
    builtin: list[str] = []
    extra: dict[str, ProbeFn] = {}
    if probes is None:
        builtin = list(ATTRIBUTES)
    elif isinstance(probes, Mapping):
        for name, fn in probes.items():
            if not callable(fn):
                raise TypeError(f"probe {name!r} is not callable")
            extra[str(name)] = fn
    else:
        builtin = [resolve_attribute(p) for p in probes]
    if grader is not None:
        if not callable(grader):
            raise TypeError(
                "grader must be a callable: images [N, 3, R, R] in [-1, 1] -> expected DR grade [N]"
            )
        if DR_GRADE in extra:
            raise ValueError(f"a probe is named {DR_GRADE!r}, the grader's attribute; rename it")
        extra[DR_GRADE] = grader
    names = builtin + [k for k in extra if k not in builtin]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"probes must name at least one attribute, each once; got {names}")
    return builtin, extra


def _measure_all(imgs: torch.Tensor, builtin: list[str], extra: dict[str, ProbeFn]) -> dict[str, np.ndarray]:
    out = measure(imgs, builtin) if builtin else {}
    for name, fn in extra.items():
        with torch.no_grad():
            v = fn(imgs)
        arr = (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(np.float64)
        arr = arr.reshape(-1)
        if arr.shape != (imgs.shape[0],):
            raise ValueError(f"probe {name!r} returned {arr.shape[0]} values for {imgs.shape[0]} images")
        if not np.isfinite(arr).all():
            raise ValueError(f"probe {name!r} returned NaN or inf")
        out[name] = arr
    return out


def discover_factors(
    model: Any,
    n: int = 32,
    steps: int = 5,
    seed: int = 0,
    probes: Iterable[str] | Mapping[str, ProbeFn] | None = None,
    grader: ProbeFn | None = None,
    progress: bool = True,
    *,
    grade: int | None = None,
    batch_size: int = 64,
    min_effect: float = 0.25,
    tolerance: float = 0.05,
    min_score: float = 0.5,
    min_spread: float = 0.25,
) -> DiscoveryResult:
    """Traverse every code of ``model`` and measure every attribute (see the module docstring).

    Args:
        model: a `retinagen.generation.LoadedModel` (or any object with ``spec``, ``G``, ``device``,
            ``num_classes``, ``meta`` and ``resolution`` used the same way).
        n: latents per code, >= 2. steps: values of a uniform code, >= 2. seed: latent seed.
        probes: built-in attribute names (default: all of ``ATTRIBUTES``; synonyms allowed) or a
            mapping name -> callable(images [N, 3, R, R] in [-1, 1]) -> [N].
        grader: optional callable with the same signature returning the expected DR grade; measured
            as the attribute ``"dr_grade"``.
        progress: show a progress bar (images generated).
        grade: fix the DR grade of a conditional model (default: sampled per latent).
        batch_size: generator batch size (does not change the result).
        min_effect, tolerance: the ACM thresholds, in standard deviations of each attribute.
        min_score: smallest |effect| * consistency that assigns an attribute to a code.
        min_spread: floor of each built-in attribute's standard deviation, as a fraction of its
            typical spread (`AttributeProbe.spread`); custom probes and the grader have no floor.
    """
    from retinagen.generation import image_seed, run_generator, sample_latents, traversal_values

    n, steps = check(CountAtLeast2, n, "n"), check(CountAtLeast2, steps, "steps")
    batch_size = check(Count, batch_size, "batch_size")
    if min(min_effect, tolerance, min_score, min_spread) < 0:
        raise ValueError("min_effect, tolerance, min_score and min_spread must be >= 0")
    builtin, extra = _probe_fns(probes, grader)
    attributes = builtin + [k for k in extra if k not in builtin]
    spec = model.spec
    seeds = [image_seed(seed, i) for i in range(n)]
    sample, grades = sample_latents(model, seeds, grade)
    code_values = {name: traversal_values(spec, i, steps) for i, name in enumerate(spec.code_names)}
    total = n * sum(len(v) for v in code_values.values())

    curves: dict[str, dict[str, np.ndarray]] = {}
    with progress_bar(total, "discover factors", unit="img", enabled=progress) as bar:
        for i, code in enumerate(spec.code_names):
            vals = code_values[code]
            n_vals = len(vals)
            # All values of this code in one run of rows (value-major: row v * n + j is sample j at value v),
            # generated and measured in chunks of batch_size: few, full generator calls.
            rows = torch.arange(n).repeat(n_vals)
            traversed = spec.with_code(
                sample[rows],
                i,
                torch.tensor(vals, dtype=torch.float64).repeat_interleave(n),
                allow_extrapolation=True,
            )
            row_grades = None if grades is None else grades[rows]
            flat = {a: np.zeros(n * n_vals) for a in attributes}
            for start in range(0, n * n_vals, batch_size):
                stop = min(start + batch_size, n * n_vals)
                g = None if row_grades is None else row_grades[start:stop]
                imgs = run_generator(model, traversed[start:stop], g, batch_size=batch_size)
                for a, arr in _measure_all(imgs, builtin, extra).items():
                    flat[a][start:stop] = arr
                bar.advance(stop - start)
            curves[code] = {a: v.reshape(n_vals, n).T.copy() for a, v in flat.items()}

    return _summarise(
        spec.code_names,
        list(spec.code_kinds),
        attributes,
        code_values,
        curves,
        min_effect=min_effect,
        tolerance=tolerance,
        min_score=min_score,
        std_floor={a: min_spread * ATTRIBUTES[a].spread for a in builtin},
        params={
            "checkpoint_sha256": getattr(model, "sha256", None),
            "n": n,
            "steps": steps,
            "seed": seed,
            "grade": grade,
            "min_effect": min_effect,
            "tolerance": tolerance,
            "min_score": min_score,
            "min_spread": min_spread,
        },
    )


def _summarise(
    code_names: list[str],
    code_kinds: list[str],
    attributes: list[str],
    values: dict[str, list[float]],
    curves: dict[str, dict[str, np.ndarray]],
    *,
    min_effect: float,
    tolerance: float,
    min_score: float,
    std_floor: Mapping[str, float],
    params: dict[str, Any],
) -> DiscoveryResult:
    """Effects, consistencies and the greedy assignment from the measured curves."""
    n_codes, n_attr = len(code_names), len(attributes)
    effect = np.zeros((n_codes, n_attr))
    consistency = np.zeros((n_codes, n_attr))
    direction = np.ones((n_codes, n_attr), dtype=np.int64)
    class_order: dict[str, dict[str, list[int]]] = {}
    std = {
        a: max(float(np.concatenate([curves[c][a].ravel() for c in code_names]).std()), std_floor.get(a, 0.0))
        for a in attributes
    }
    for i, code in enumerate(code_names):
        for j, attr in enumerate(attributes):
            cur = curves[code][attr]
            if code_kinds[i] == "categorical":
                # Classes have no order: run from the class with the lowest mean attribute to the highest.
                order = [int(k) for k in np.argsort(cur.mean(axis=0), kind="stable")]
                class_order.setdefault(code, {})[attr] = order
                cur = cur[:, order]
            s = std[attr]
            if s <= 1e-12:  # the attribute never changes anywhere: nothing to control
                continue
            acm = acm_from_curves(cur, min_effect * s, tolerance=tolerance * s)
            effect[i, j] = float((cur[:, -1] - cur[:, 0]).mean() / s)
            consistency[i, j] = acm.percent / 100.0
            direction[i, j] = acm.direction
    result = DiscoveryResult(
        code_names=list(code_names),
        code_kinds=code_kinds,
        attributes=attributes,
        values={k: list(v) for k, v in values.items()},
        curves=curves,
        effect=effect,
        consistency=consistency,
        direction=direction,
        class_order=class_order,
        assignment={},
        attribute_std=std,
        params=params,
    )
    result.assignment = _assign(result.score, code_names, attributes, min_score)
    return result


def _assign(
    score: np.ndarray, code_names: list[str], attributes: list[str], min_score: float
) -> dict[str, str | None]:
    """Greedy one-to-one matching by score; pairs under ``min_score`` are never matched."""
    assignment: dict[str, str | None] = {c: None for c in code_names}
    taken: set[str] = set()
    order = sorted(
        ((score[i, j], i, j) for i in range(len(code_names)) for j in range(len(attributes))),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    for s, i, j in order:
        if s < min_score:
            break
        code, attr = code_names[i], attributes[j]
        if assignment[code] is None and attr not in taken:
            assignment[code] = attr
            taken.add(attr)
    return assignment


def format_table(result: DiscoveryResult, top: int | None = 20, assigned_only: bool = False) -> str:
    """The ranked (code, attribute) table as fixed-width text (``*`` marks assigned pairs)."""
    rows = [r for r in result.table() if r["assigned"] or not assigned_only]
    if top is not None:
        rows = rows[:top]
    lines = [
        f"{'code':<6} {'kind':<11} {'attribute':<16} {'effect':>8} {'consist':>8} {'dir':>4} {'score':>7}"
    ]
    for r in rows:
        mark = "*" if r["assigned"] else " "
        lines.append(
            f"{r['code']:<6} {r['kind']:<11} {r['attribute']:<16} {r['effect']:>8.2f} "
            f"{r['consistency']:>8.2f} {r['direction']:>+4d} {r['score']:>7.2f} {mark}"
        )
    return "\n".join(lines)
