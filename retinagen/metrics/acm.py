"""Attribute Control Metric (ACM; paper Sec. 4.3, Table 3): how consistently one code moves one attribute.

The paper picks a code c_i, samples N = 100 latents, varies c_i for each and counts the samples in which the
attribute is "actually controlled consistently", reporting the percentage with a 95 % margin. It does not say
how consistency was judged (by eye, for EyePACS). This module makes that operational, in two ways that share
the same traversals (same seed -> same N latents, same code values):

* automated: an attribute function (a measurable probe of the image, e.g. pigmentation) is evaluated along each
  sample's traversal, giving a curve values[n, v]. A sample is *consistent* when its curve moves monotonically in
  the majority direction of all samples (steps against that direction no larger than ``tolerance`` count as
  ties) and its total change direction * (last - first) is at least ``min_effect`` (and above ``tolerance``, so
  a flat curve never counts);
* review: the traversal strips are written as PNGs for a person to mark consistent / not, and the ACM comes from
  those marks (`acm_from_marks`); storage of the marks is the caller's (e.g. the dashboard's database).

percent = 100 * consistent / N, margin95 = 100 * 1.96 * sqrt(p (1 - p) / N), the normal-approximation half-width
the paper reports (N = 100: 96 % -> 3.84 %, 71 % -> 8.89 %; 97 % -> 3.34 %, which the paper prints as 3.4 %).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retinagen.checks import check, int_in
from retinagen.fileio import atomic_write_bytes, atomic_write_json
from retinagen.progress import progress_bar

__all__ = [
    "REVIEW_INDEX_NAME",
    "ACMResult",
    "AttributeFn",
    "acm_for_code",
    "acm_from_curves",
    "acm_from_marks",
    "attribute_curves",
    "margin95",
    "write_review_set",
]

REVIEW_INDEX_NAME = "review.json"
_REVIEW_SCHEMA = "retinagen.acm_review/1"
_Z95 = 1.96

# An attribute probe: images uint8 [N, R, R, 3] (RGB) -> one float per image [N].
AttributeFn = Callable[[np.ndarray], np.ndarray]


def margin95(p: float, n: int) -> float:
    """Half-width of the 95 % normal-approximation interval of a proportion p in [0, 1] from n samples: 1.96 sqrt(p(1-p)/n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return float(_Z95 * np.sqrt(p * (1.0 - p) / n))


@dataclass
class ACMResult:
    """ACM of one code on one attribute.

    percent: consistent samples in percent; margin95: 95 % half-width in percentage points; n: samples;
    consistent: [n] bool per sample; direction: +1 (attribute rises with the code), -1 (falls) or 0 (from a
    person's marks, where no direction is measured); effect: [n] signed total change last - first (curves only).
    """

    percent: float
    margin95: float
    n: int
    consistent: np.ndarray
    direction: int
    effect: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "percent": self.percent,
            "margin95": self.margin95,
            "n": self.n,
            "n_consistent": int(self.consistent.sum()),
            "direction": self.direction,
        }
        if self.effect is not None:
            out["median_effect"] = float(np.median(self.effect))
        return out


def _result(consistent: np.ndarray, direction: int, effect: np.ndarray | None = None) -> ACMResult:
    n = int(consistent.shape[0])
    p = float(consistent.mean())
    return ACMResult(100.0 * p, 100.0 * margin95(p, n), n, consistent, direction, effect)


def acm_from_curves(
    values: np.ndarray | torch.Tensor, min_effect: float, *, tolerance: float = 1e-6
) -> ACMResult:
    """ACM from attribute curves values [N, V]: the attribute of sample n at the v-th code value (in order).

    Majority direction: the sign shared by most samples' total change (last - first); +1 on a tie. A sample is
    consistent when every step moves in that direction or against it by at most ``tolerance`` (ties), and its
    total change in that direction is >= ``min_effect`` and > ``tolerance``.

    Args:
        values: [N, V] finite, N >= 1, V >= 2.
        min_effect: smallest total change (in the attribute's units) that counts as control; >= 0.
        tolerance: largest step against the direction still counted as a tie; >= 0.
    """
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    v = v.astype(np.float64)
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 2:
        raise ValueError(f"values must be [N, V] with N >= 1 and V >= 2, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or inf")
    if min_effect < 0 or tolerance < 0:
        raise ValueError(f"min_effect and tolerance must be >= 0, got {min_effect} and {tolerance}")
    effect = v[:, -1] - v[:, 0]
    ups, downs = int((effect > 0).sum()), int((effect < 0).sum())
    direction = 1 if ups >= downs else -1
    steps = np.diff(v, axis=1) * direction
    monotone = (steps >= -tolerance).all(axis=1)
    moved = effect * direction
    consistent = monotone & (moved >= min_effect) & (moved > tolerance)
    return _result(consistent, direction, effect)


def acm_from_marks(marks: Mapping[int, bool] | Sequence[bool]) -> ACMResult:
    """ACM from a person's review: one consistent / not mark per sample (a list, or sample index -> mark).

    Only marked samples count (a dict may cover part of a review set); direction is 0 (not measured).
    """
    if isinstance(marks, Mapping):
        items = [marks[k] for k in sorted(marks)]
        for k in marks:
            check(int_in(), k, "a mark key (an integer sample index)")
    else:
        items = list(marks)
    if not items:
        raise ValueError("no marks given")
    flags = []
    for m in items:
        is_flag = isinstance(m, bool | np.bool_) or (isinstance(m, int | np.integer) and int(m) in (0, 1))
        if is_flag:
            flags.append(bool(m))
        else:
            raise ValueError(f"each mark must be True/False (or 1/0), got {m!r}")
    return _result(np.asarray(flags, dtype=bool), 0)


# ============================================================================ traversals of a model
def _traversal_setup(
    model: Any, code_index: int | str, n: int, steps: int, seed: int, grade: int | None
) -> tuple[int, list[float], Any, torch.Tensor | None, list[int]]:
    from retinagen.generation import image_seed, sample_latents, traversal_values

    if n < 1 or steps < 2:
        raise ValueError(f"need n >= 1 and steps >= 2, got n={n}, steps={steps}")
    idx = model.spec.code_index(code_index)
    values = traversal_values(model.spec, idx, steps)
    seeds = [image_seed(seed, i) for i in range(n)]
    # Per-image seeds: sample j is the same latent as image j of `generate_images(model, n, seed)`.
    sample, grades = sample_latents(model, seeds, grade)
    return idx, values, sample, grades, seeds


def _traversal_chunks(
    model: Any,
    code_index: int | str,
    n: int,
    steps: int,
    seed: int,
    grade: int | None,
    batch_size: int,
    progress: bool,
    description: str,
) -> Any:
    """Yield (start, values, images uint8 [V, m, R, R, 3]) for samples start .. start+m-1."""
    from retinagen.generation import run_generator

    idx, values, sample, grades, _ = _traversal_setup(model, code_index, n, steps, seed, grade)
    with progress_bar(n * len(values), description, enabled=progress) as bar:
        for start in range(0, n, batch_size):
            part = sample[slice(start, start + batch_size)]
            g = None if grades is None else grades[start : start + batch_size]
            rows = []
            for val in values:
                s = model.spec.with_code(part, idx, val, allow_extrapolation=True)
                imgs = run_generator(model, s, g, batch_size=batch_size)
                rows.append(
                    ((imgs.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                )
                bar.advance(part.n)
            yield start, values, np.stack(rows)


def attribute_curves(
    model: Any,
    code_index: int | str,
    attribute_fn: AttributeFn,
    *,
    n: int = 100,
    steps: int = 7,
    seed: int = 0,
    grade: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[np.ndarray, list[float]]:
    """Attribute along each of ``n`` traversals of one code: (values [n, V], the V code values).

    Uniform codes visit ``steps`` points over [-1, 1]; Bernoulli codes 0, 1; categorical codes every class
    (`retinagen.generation.traversal_values`). ``attribute_fn`` gets uint8 [m, R, R, 3] and returns [m] floats.
    """
    curves = np.zeros((n, 0))
    code_values: list[float] = []
    for start, code_values, imgs in _traversal_chunks(
        model, code_index, n, steps, seed, grade, batch_size, progress, "ACM traversals"
    ):
        if curves.shape[1] == 0:
            curves = np.zeros((n, len(code_values)))
        m = imgs.shape[1]
        for v in range(len(code_values)):
            a = np.asarray(attribute_fn(imgs[v]), dtype=np.float64).reshape(-1)
            if a.shape != (m,):
                raise ValueError(f"attribute_fn returned shape {a.shape} for {m} images; expected [{m}]")
            curves[start : start + m, v] = a
    return curves, list(code_values)


def acm_for_code(
    model: Any,
    code_index: int | str,
    attribute_fn: AttributeFn,
    *,
    n: int = 100,
    steps: int = 7,
    seed: int = 0,
    min_effect: float,
    tolerance: float = 1e-6,
    grade: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> ACMResult:
    """Automated ACM of code ``code_index`` on the attribute measured by ``attribute_fn`` (see `acm_from_curves`).

    ``model`` is a `retinagen.generation.LoadedModel`; ``min_effect`` is in the attribute's units.
    """
    curves, _ = attribute_curves(
        model,
        code_index,
        attribute_fn,
        n=n,
        steps=steps,
        seed=seed,
        grade=grade,
        batch_size=batch_size,
        progress=progress,
    )
    return acm_from_curves(curves, min_effect, tolerance=tolerance)


def write_review_set(
    model: Any,
    code_index: int | str,
    out_dir: str | Path,
    *,
    n: int = 100,
    steps: int = 7,
    seed: int = 0,
    grade: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> Path:
    """Write the traversals of `acm_for_code` (same seed -> same samples) for a person to mark; returns the index.

    ``out_dir`` gets ``strip_000.png`` ... (sample j's images left to right in code-value order, uint8 RGB
    [R, V * R, 3], no text metadata) and ``review.json``: data only (code, values, seeds, grades, checkpoint
    hash, file names). Everything is generated, so there is no patient information to leak.
    """
    from retinagen.generation import png_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx, values, _, grades, seeds = _traversal_setup(model, code_index, n, steps, seed, grade)
    samples: list[dict[str, Any]] = []
    for start, _, imgs in _traversal_chunks(
        model, idx, n, steps, seed, grade, batch_size, progress, "ACM review strips"
    ):
        v, m, r = imgs.shape[0], imgs.shape[1], imgs.shape[2]
        for j in range(m):
            strip = imgs[:, j].transpose(1, 0, 2, 3).reshape(r, v * r, 3)
            name = f"strip_{start + j:03d}.png"
            atomic_write_bytes(out / name, png_bytes(np.ascontiguousarray(strip)))
            samples.append(
                {
                    "index": start + j,
                    "file": name,
                    "seed": int(seeds[start + j]),
                    "grade": None if grades is None else int(grades[start + j]),
                }
            )
    index = {
        "schema": _REVIEW_SCHEMA,
        "code": model.spec.code_names[idx],
        "code_index": idx,
        "code_kind": model.spec.code_kinds[idx],
        "values": [float(x) for x in values],
        "n": n,
        "steps": len(values),
        "seed": seed,
        "grade": grade,
        "checkpoint_sha256": getattr(model, "sha256", None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "instructions": "Mark each strip consistent if the attribute changes monotonically in one direction from left to right.",
        "samples": samples,
    }
    path = out / REVIEW_INDEX_NAME
    atomic_write_json(path, index)
    return path
