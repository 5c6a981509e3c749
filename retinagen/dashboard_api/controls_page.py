"""The Controls and Review pages: one image or traversal per seed and code values, DICOM export, ACM review sets."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from retinagen.checks import Seed, check, int_in
from retinagen.dashboard_api.run import DashboardRun
from retinagen.errors import BadInputError, RetinagenError
from retinagen.generation import (
    LoadedModel,
    generate_images,
    image_seed,
    run_generator,
    sample_latents,
    traversal_values,
)

REVIEW_DIR = "reviews"


@dataclass(frozen=True)
class CodeControl:
    """One latent code as a widget: kind "uniform" (slider in [-1, 1]), "bernoulli" (toggle) or
    "categorical" (select among ``classes``); ``label`` names the discovered attribute when there is one."""

    index: int
    name: str
    kind: str
    label: str
    attribute: str | None
    classes: int


def code_controls(run: DashboardRun) -> list[CodeControl]:
    """One `CodeControl` per latent code, in code order."""
    spec = run.model.spec
    out = []
    for i, (name, kind) in enumerate(zip(spec.code_names, spec.code_kinds, strict=True)):
        classes = spec.categorical[i] if kind == "categorical" else (2 if kind == "bernoulli" else 0)
        out.append(CodeControl(i, name, kind, run.code_label(i), run.code_attribute(i), classes))
    return out


def _check_seed(seed: int) -> int:
    return check(Seed, seed, "seed", RetinagenError)


def seed_code_values(model: LoadedModel, seed: int, grade: int | None = None) -> dict[int, float]:
    """The code values of the seed's own latent sample (image 0 of ``generate_images(model, 1, seed)``)."""
    sample, _ = sample_latents(model, [image_seed(_check_seed(seed), 0)], grade)
    return {i: float(v) for i, v in enumerate(sample.values()[0].tolist())}


def render_image(model: LoadedModel, seed: int, grade: int | None = None,
                 codes: Mapping[int, float] | None = None) -> np.ndarray:
    """Image 0 of ``retinagen generate --seed SEED --grade G --set ...``: uint8 [R, R, 3].

    ``codes`` maps code index -> value (a class index, 0/1, or a number in [-1, 1]); unset codes keep the
    seed's own values. Raises `CodeValueError` (a `RetinagenError`) for a value out of range.
    """
    imgs, _ = generate_images(model, 1, _check_seed(seed), grade=grade, codes=codes)
    return imgs[0]


@torch.no_grad()
def traversal_sheet(model: LoadedModel, seed: int, grade: int | None, codes: Mapping[int, float] | None,
                    factor: int, *, steps: int = 7, samples: int = 4) -> tuple[np.ndarray, list[float]]:
    """A side-by-side traversal of one code: uint8 [S*R, V*R, 3] and the V code values (left to right).

    Row 0 is the image of `render_image` (the same seed, grade and ``codes``); rows 1..S-1 are images 1..S-1 of
    the same seed with their own codes. Every row sets code ``factor`` to each value of
    `retinagen.generation.traversal_values` (every class, 0/1, or ``steps`` values over [-1, 1]).
    """
    spec = model.spec
    idx = spec.code_index(factor)
    samples = check(int_in(1, 16), samples, "samples", RetinagenError)
    steps = check(int_in(2, 15), steps, "steps", RetinagenError)
    seed = _check_seed(seed)
    sample, grades = sample_latents(model, [image_seed(seed, i) for i in range(samples)], grade)
    row0 = torch.zeros(samples, dtype=torch.bool)
    row0[0] = True
    for c, v in (codes or {}).items():
        current = sample.values()[:, c].to(torch.float64)
        sample = spec.with_code(sample, c, torch.where(row0, torch.tensor(float(v), dtype=torch.float64), current),
                                allow_extrapolation=True)
    values = traversal_values(spec, idx, steps)
    parts = [spec.with_code(sample, idx, v, allow_extrapolation=True) for v in values]
    # One generator call for the whole sheet: [V * S] latents, value-major.
    batch = type(sample)(
        spec,
        torch.cat([p.z_noise for p in parts]),
        torch.cat([p.cat for p in parts]),
        torch.cat([p.bern for p in parts]),
        torch.cat([p.unif for p in parts]),
    )
    g = None if grades is None else grades.repeat(len(values))
    imgs = run_generator(model, batch, g)
    r = model.resolution
    u8 = ((imgs.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sheet = u8.reshape(len(values), samples, r, r, 3).transpose(1, 2, 0, 3, 4).reshape(samples * r, len(values) * r, 3)
    return np.ascontiguousarray(sheet), list(values)


def upscale(img: np.ndarray, size: int, method: str = "nearest") -> np.ndarray:
    """uint8 [H, W, 3] scaled so its longer side is ``size`` px: "nearest" (pixels stay visible) or "bicubic"."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"img must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    interp = {"nearest": cv2.INTER_NEAREST, "bicubic": cv2.INTER_CUBIC}.get(method)
    if interp is None:
        raise ValueError(f"method must be 'nearest' or 'bicubic', got {method!r}")
    h, w = img.shape[:2]
    scale = size / max(h, w)
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)


def dicom_bytes(model: LoadedModel, img: np.ndarray, seed: int, grade: int | None,
                codes: Mapping[int, float]) -> bytes:
    """The image as a Secondary Capture DICOM file marked synthetic (`clinical.dicom_export.write_synthetic_dicom`).

    Records the model, checkpoint sha256, the image's own seed (``image_seed(seed, 0)``, as `retinagen generate
    --dicom` does), the grade and every code value; new UIDs, no patient data. Written to a private temporary
    folder that is removed before returning.
    """
    from clinical.dicom_export import write_synthetic_dicom

    values = seed_code_values(model, seed, grade)
    values.update({int(k): float(v) for k, v in codes.items()})
    names = model.spec.code_names
    folder = Path(tempfile.mkdtemp(prefix="retinagen-dicom-"))
    try:
        path = folder / "synthetic.dcm"
        write_synthetic_dicom(
            img, path, model_name=model.cfg.msi_name, checkpoint_sha256=model.sha256,
            seed=image_seed(_check_seed(seed), 0), grade=grade if model.num_classes else None,
            codes={names[i]: v for i, v in sorted(values.items())},
        )
        return path.read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure_latency(model: LoadedModel, *, n: int = 50, grade: int | None = None) -> dict[str, float]:
    """Median / p95 / max of `render_image` in ms over ``n`` changes of one slider (a uniform code when the
    model has one), after one warm-up call."""
    spec = model.spec
    idx = next((i for i, k in enumerate(spec.code_kinds) if k == "uniform"), None)
    if grade is None and model.num_classes:
        grade = 0
    render_image(model, 0, grade)
    times = []
    for j in range(n):
        codes = {} if idx is None else {idx: -1.0 + 2.0 * j / max(n - 1, 1)}
        t = time.perf_counter()
        render_image(model, 0, grade, codes)
        times.append(1000 * (time.perf_counter() - t))
    arr = np.asarray(times)
    return {"median_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95)), "max_ms": float(arr.max()),
            "n": float(n), "resolution": float(model.resolution)}


def review_store(run: DashboardRun) -> Any:
    """The run's review database (`retinagen.metrics.review_store.ReviewStore`) in its state folder."""
    from retinagen.metrics.review_store import DB_NAME, ReviewStore

    return ReviewStore(run.state_dir / DB_NAME)


def start_review_set(run: DashboardRun, code: int, *, n: int, steps: int, seed: int, grade: int | None,
                     reviewer: str) -> Any:
    """Write the strips of a new ACM review set (`retinagen.metrics.acm.write_review_set`) and record it.

    The strips go to ``STATE/reviews/set-<random>/``; the set is recorded only once they are all written, so
    every set in the database has its strips. Returns the `ReviewSet`.
    """
    from retinagen.metrics.acm import write_review_set
    from retinagen.metrics.review_store import check_reviewer

    who = check_reviewer(reviewer)
    n = check(int_in(1, 200), n, "N", RetinagenError)
    seed = _check_seed(seed)
    store = review_store(run)
    rel = Path(REVIEW_DIR) / f"set-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    index = write_review_set(run.model, code, store.folder / rel, n=n, steps=steps, seed=seed, grade=grade,
                             progress=False)
    meta = json.loads(index.read_text(encoding="utf-8"))
    return store.create_set(
        code=run.model.spec.code_names[code], code_index=code, code_kind=run.model.spec.code_kinds[code], n=n,
        steps=int(meta["steps"]), seed=seed, grade=grade, values=meta["values"],
        checkpoint_sha256=run.model.sha256, folder=rel.as_posix(), created_by=who,
        attribute=run.code_attribute(code),
    )


def review_strip_paths(store: Any, review_set: Any) -> list[Path]:
    """The strip PNGs of a set, sample 0..n-1 (from its ``review.json``)."""
    from retinagen.metrics.acm import REVIEW_INDEX_NAME

    folder = store.set_folder(review_set)
    try:
        meta = json.loads((folder / REVIEW_INDEX_NAME).read_text(encoding="utf-8"))
        files = [folder / Path(s["file"]).name for s in sorted(meta["samples"], key=lambda s: s["index"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(folder, f"the review set's strips cannot be read ({type(exc).__name__})") from None
    return files
