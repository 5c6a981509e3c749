"""One quality row of a checkpoint, scored by the fixed judges (`retinagen.metrics.judges`).

`score_checkpoint` is what ``benchmarks/quality.py`` prints per snapshot and what training logs at each
snapshot (``quick=True``: the cheap part). The row holds:

* ``fd_fundus``, ``precision``, ``recall``: ``n`` generated images against the judges' reference set, in
  the judges' feature space; a grade-conditional model is asked for the reference's grade mix (the training
  data's frequencies when the reference's grades are unknown);
* ``fidelity`` per requested grade, ``group_fidelity`` per grade group (0-1, 2, 3-4; `dr_scale.GRADE_GROUPS`)
  and ``referable_agreement`` (conditional models): the judge grader's verdicts on another ``n`` images with
  every grade asked for equally often, and ``grade_shift`` on them (`grade_shift`: a grade drawn as a shift of
  the whole image rather than as lesions);
* ``L_info_discrete`` against ``H_discrete``: Q's mutual-information lower bound of the discrete codes on
  ``n`` fresh generated images (the paper's Fig. 10, at this checkpoint rather than from the training log);
* ``z_share``, ``code_share`` (models with codes, on up to 128 pairs): how much of the images' variety the
  noise latent z' and the codes each make (`variety_shares`);
* ``mig`` (not quick): Q on the judges' reference images, against their ground-truth factors;
* ``acm`` (not quick): per attribute of a factor map discovered here (pigmentation, glare, field of view,
  brightness, ...), the share of samples whose attribute follows the code.
Every figure depends only on the checkpoint, the judges and ``seed``: two runs scored by one judge id are
comparable.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from retinagen.checks import Count, check
from retinagen.metrics.judges import Judges, JudgeSpec, get_judges

QUICK_N = 256  # images per quick (training-time) score
ACM_ATTRIBUTES = ("pigmentation", "glare", "fov_area", "brightness")


def grade_counts(probs: Any, n: int) -> list[int]:
    """``n`` split over grades in proportion to ``probs`` (largest remainders; sums to ``n``)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 1 or not len(p) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"grade probabilities must be finite, >= 0 and of a positive sum, got {probs!r}")
    n = check(Count, n, "n")
    exact = p / p.sum() * n
    counts = np.floor(exact).astype(int)
    for g in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[g] += 1
    return [int(c) for c in counts]


def grade_shift(images: np.ndarray, grades: np.ndarray) -> float:
    """How far the asked grades' mean images lie apart: the mean over grades of the mean absolute difference
    (grey levels) between a grade's mean image and the mean of the grade means. Real fundi differ by small
    lesions at random places (2.2-4.5 on 100 images per grade at 32 px); a model that marks a grade with a
    shift of the whole image scores far more. It includes the means' sampling noise (fewer images, more)."""
    present = [g for g in np.unique(grades) if g >= 0]
    if len(present) < 2:
        return float("nan")
    means = np.stack([images[grades == g].astype(np.float64).mean(0) for g in present])
    return float(np.abs(means - means.mean(0, keepdims=True)).mean())


def _generate(model: Any, n: int, seed: int, counts: list[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` images of ``model`` (uint8 [N, R, R, 3]) and the grade each was asked for (conditional models):
    every grade equally often, or ``counts[g]`` of grade g. Image i of grade g is the same whatever the counts."""
    from retinagen.generation import generate_images

    if model.num_classes == 0:
        imgs, _ = generate_images(model, n, seed)
        return imgs, None
    return _generate_sets(model, n, seed, [counts if counts is not None else grade_counts(np.ones(model.num_classes), n)])[0]


def _generate_sets(model: Any, n: int, seed: int, sets: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Several sets of a conditional model's images, set s with ``sets[s][g]`` of grade g: each grade's images
    are generated once (as many as the largest set asks) and each set takes its first ones."""
    from retinagen.generation import generate_images

    made = {}
    for g in range(model.num_classes):
        k = max(counts[g] for counts in sets)
        if k:
            made[g] = generate_images(model, k, seed, grade=g, start=g * n)[0]
    out = []
    for counts in sets:
        parts = [(made[g][:k], np.full(k, g, np.int64)) for g, k in enumerate(counts) if k]
        out.append((np.concatenate([p for p, _ in parts]), np.concatenate([q for _, q in parts])))
    return out


@torch.no_grad()
def info_at_checkpoint(model: Any, n: int, seed: int, batch_size: int = 64) -> dict[str, float]:
    """L_info (discrete codes, and all codes) of Q on ``n`` fresh samples of ``model``, with its bound H(C)."""
    from retinagen.generation import image_seed, run_generator, sample_latents
    from retinagen.training.losses import info_terms

    if model.D is None or model.spec.n_codes == 0:
        return {}
    sample, grades = sample_latents(model, [image_seed(seed + 7, i) for i in range(n)])
    imgs = run_generator(model, sample, grades, batch_size=batch_size)
    q = []
    for start in range(0, n, batch_size):
        g = None if grades is None else grades[start : start + batch_size].to(model.device)
        q.append(model.D(imgs[start : start + batch_size].to(model.device), g).q_params.float().cpu())
    terms = info_terms(model.spec, torch.cat(q), sample)
    return {
        "L_info_discrete": float(terms.l_info_discrete),
        "H_discrete": float(terms.discrete_bound),
        "L_info": float(terms.l_info),
    }


@torch.no_grad()
def variety_shares(model: Any, n: int, seed: int, batch_size: int = 64) -> dict[str, float]:
    """How much of the images' variety the noise latent z' and the codes each make, on ``n`` pairs:
    ``z_share`` = E|G(z'_A, c_A) - G(z'_B, c_A)|^2 / E|G(z'_A, c_A) - G(z'_B, c_B)|^2 and ``code_share`` the
    same with c changed instead (grade and per-pixel noise held fixed). A G that ignores z' has z_share 0:
    measured on the cpu preset, z_share falls from ~0.55 to 0.17-0.30 as Q learns the codes, and recall with it
    (docs/ablations.md). Across seeds 0-2 at 128 pairs it varied 0.200-0.206 and 0.357-0.441 on two
    checkpoints (at 64 pairs 0.192-0.199 and 0.314-0.464). Empty for a model without codes."""
    from retinagen.generation import image_seed, run_generator, sample_latents
    from retinagen.latent import LatentSample

    if model.spec.n_codes == 0 or n < 1:
        return {}
    a, grades = sample_latents(model, [image_seed(seed + 11, i) for i in range(n)])
    b, _ = sample_latents(model, [image_seed(seed + 13, i) for i in range(n)])

    def draw(z: LatentSample, c: LatentSample) -> torch.Tensor:
        return run_generator(model, LatentSample(model.spec, z.z_noise, c.cat, c.bern, c.unif), grades,
                             batch_size=batch_size)

    xa, xb = draw(a, a), draw(b, b)
    total = float((xa - xb).pow(2).mean())
    if total <= 0:
        return {"z_share": 0.0, "code_share": 0.0}
    return {
        "z_share": float((xa - draw(b, a)).pow(2).mean()) / total,
        "code_share": float((xa - draw(a, b)).pow(2).mean()) / total,
    }


def score_checkpoint(
    model: Any,
    judges: Judges,
    *,
    n: int = 1000,
    seed: int = 0,
    quick: bool = False,
    mig: bool = True,
    acm: bool = True,
    acm_n: int = 50,
    batch_size: int = 64,
    progress: bool = False,
    fidelity: bool = True,
) -> dict[str, Any]:
    """The quality row of a loaded model (see the module docstring); ``quick`` leaves MIG and ACM out,
    ``fidelity`` False the grade fidelity (and the equal-grade images it is judged on)."""
    if model.resolution != judges.resolution:
        raise ValueError(
            f"the model draws {model.resolution} px images but these judges judge {judges.resolution} px: "
            f"use judges built at {model.resolution} px"
        )
    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "judge": judges.judge_id,
        "msi": model.cfg.msi_name,
        "kimg": model.meta.get("kimg"),
        "train_seconds": model.meta.get("train_seconds"),
        "checkpoint_sha256": model.sha256,
    }
    if model.num_classes == 0:
        row.update(judges.score(_generate(model, n, seed)[0]))
    else:
        # fd_fundus, precision and recall on images of the reference's grade mix (an equal mix would put a model
        # that draws each grade faithfully far from a reference of mostly grade 0); fidelity on equal grades.
        mix = judges.reference_grade_probs(model.num_classes)
        if mix is None:
            mix = model.meta.get("grade_probs") or np.ones(model.num_classes)
        sets = [grade_counts(mix, n)] + ([grade_counts(np.ones(model.num_classes), n)] if fidelity else [])
        made = _generate_sets(model, n, seed, sets)
        row.update(judges.score(made[0][0]))
        if fidelity:
            imgs, grades = made[1]
            row.update(judges.fidelity(imgs, grades))
            row["grade_shift"] = grade_shift(imgs, grades)
    row.update(info_at_checkpoint(model, min(n, 512), seed, batch_size))
    row.update(variety_shares(model, min(n, 128), seed, batch_size))  # 128 pairs: 5.5 s of a 14.4 s score, 1 busy thread
    if not quick and mig:
        row["mig"] = _mig(model, judges, batch_size, seed, progress)
    if not quick and acm:
        row["acm"] = _acm(model, acm_n, seed, batch_size, progress)
    row["score_seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _mig(model: Any, judges: Judges, batch_size: int, seed: int, progress: bool) -> float | None:
    from retinagen.data.dataset import ZipImageDataset
    from retinagen.metrics.sections import mig_section

    sec = mig_section(model, ZipImageDataset(judges.reference_zip), 4, 10, None, seed, batch_size, progress)
    return float(sec["mig"]) if sec.get("status") == "ok" else None


def _acm(model: Any, acm_n: int, seed: int, batch_size: int, progress: bool) -> dict[str, float]:
    """ACM (%) per attribute of `ACM_ATTRIBUTES` that the discovered factor map has a code for."""
    from retinagen.metrics.discovery import discover_factors
    from retinagen.metrics.sections import acm_section

    if model.spec.n_codes == 0:
        return {}
    fmap = discover_factors(model, n=32, steps=5, seed=seed, progress=progress, batch_size=batch_size).to_json()
    sec = acm_section(model, fmap, acm_n, 7, seed + 1, batch_size, progress)
    if sec.get("status") != "ok":
        return {}
    out = {r["attribute"]: float(r["percent"]) for r in sec["rows"] if r["attribute"] in ACM_ATTRIBUTES}
    return {k: v for k, v in out.items() if math.isfinite(v)}


class SnapshotScorer:
    """The training-time quick score (``train.quality_n`` images): `retinagen.training.loop.train` calls it
    on each snapshot it writes. On the built-in synthetic data the judges' own reference set is the real
    data; on any other fundus dataset the reference is up to ``n_reference`` images of the run's training
    ZIP (in the judges' feature space) and grade fidelity is left out (the judge grader knows synthetic
    lesions only)."""

    def __init__(self, cfg: Any, *, judges: Judges | None = None, judges_dir: Any = None,
                 progress: bool = True, n_reference: int = 1000) -> None:
        self.n = int(cfg.train.quality_n)
        self.synthetic = cfg.data.dataset == "synthfundus"
        self.n_reference = n_reference
        self.judges = judges or get_judges(JudgeSpec(resolution=cfg.model.resolution), judges_dir, progress=progress)
        self._run_judges: Judges | None = self.judges if self.synthetic else None

    def _judges_for(self, data_zip: Any) -> Judges:
        if self._run_judges is None:
            from retinagen.data.dataset import ZipImageDataset

            ds = ZipImageDataset(data_zip)
            idx = np.linspace(0, len(ds) - 1, min(len(ds), self.n_reference)).round().astype(int)
            imgs = np.stack([np.asarray(ds.read_uint8(int(i))) for i in idx])
            grades = np.asarray(ds.labels, np.int64)[idx]
            self._run_judges = self.judges.with_reference(self.judges.features(imgs), f"training data ({len(idx)})",
                                                          grades)
        return self._run_judges

    def __call__(self, checkpoint: Any, data_zip: Any) -> dict[str, Any]:
        from retinagen.generation import load_model

        model = load_model(checkpoint)
        return score_checkpoint(model, self._judges_for(data_zip), n=self.n, seed=0, quick=True,
                                fidelity=self.synthetic)
