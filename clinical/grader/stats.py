"""Metrics of a DR grader's predictions, pure functions on arrays: confusion matrix, quadratic weighted kappa,
balanced accuracy, per-grade recall, referable-DR AUROC, and percentile-bootstrap 95 % intervals over test
images (the same resamples for every arm, so differences get paired intervals).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from retinagen.dr_scale import NUM_GRADES, REFERABLE_GRADE

# --------------------------------------------------------------------------------------------------
# Metrics (pure functions on arrays)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_GRADES) -> np.ndarray:
    """int64 [K, K], rows = true grade, columns = predicted grade."""
    t, p = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred must have the same shape")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"grades must be in 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _qwk_weights(k: int) -> np.ndarray:
    i = np.arange(k)
    return (i[:, None] - i[None, :]).astype(np.float64) ** 2


def kappa_from_confusion(cm: np.ndarray) -> np.ndarray | float:
    """Quadratic weighted kappa of confusion matrices ``[..., K, K]``; nan where undefined.

    kappa = 1 - sum(W O) / sum(W E), W_ij = (i - j)^2, E = outer(row sums, column sums) / n: the
    formula of `sklearn.metrics.cohen_kappa_score(weights="quadratic")`, vectorised for the bootstrap.
    Undefined (0 / 0) when every true and predicted grade is one and the same grade.
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[-1]
    w = _qwk_weights(k)
    n = cm.sum(axis=(-1, -2))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = cm.sum(-1)[..., :, None] * cm.sum(-2)[..., None, :] / n[..., None, None]
        num = (w * cm).sum(axis=(-1, -2))
        den = (w * expected).sum(axis=(-1, -2))
        out = np.where(den > 0, 1 - num / np.where(den > 0, den, 1), np.nan)
    return float(out) if out.ndim == 0 else out


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_GRADES) -> float | None:
    """Quadratic weighted kappa (sklearn ``cohen_kappa_score``); None when undefined (see `kappa_from_confusion`)."""
    from sklearn.metrics import cohen_kappa_score

    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.size == 0 or np.isnan(kappa_from_confusion(confusion_matrix(t, p, num_classes))):
        return None
    return float(cohen_kappa_score(t, p, labels=list(range(num_classes)), weights="quadratic"))


def per_grade_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_GRADES) -> list[float | None]:
    """Recall (sensitivity) of each grade; None for a grade absent from ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(1)
    return [float(cm[k, k] / support[k]) if support[k] else None for k in range(num_classes)]


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_GRADES) -> float | None:
    """Mean recall over the grades present in ``y_true`` (sklearn's definition); None when empty."""
    rec = [r for r in per_grade_recall(y_true, y_pred, num_classes) if r is not None]
    return float(np.mean(rec)) if rec else None


def referable_scores(proba: np.ndarray) -> np.ndarray:
    """P(grade >= 2) = sum of the probabilities of grades 2-4: float [N]."""
    return np.asarray(proba, dtype=np.float64)[:, REFERABLE_GRADE:].sum(1)


def referable_auroc(y_true: np.ndarray, proba: np.ndarray) -> tuple[float | None, str | None]:
    """(AUROC of P(grade >= 2) for referable DR, None) or (None, reason) when only one class is present."""
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(y_true) >= REFERABLE_GRADE
    if pos.all() or not pos.any():
        which = "referable (grade >= 2)" if pos.any() else "non-referable (grade < 2)"
        return None, f"undefined: the test set holds only {which} images"
    return float(roc_auc_score(pos, referable_scores(proba))), None


def bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """int64 [B, n]: ``n_bootstrap`` resamples of 0..n-1 with replacement, from ``seed``."""
    if n < 1 or n_bootstrap < 1:
        raise ValueError("bootstrap needs n >= 1 and n_bootstrap >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB007]))
    return rng.integers(0, n, size=(n_bootstrap, n), dtype=np.int64)


def bootstrap_samples(statistic: Callable[[np.ndarray], float | None], indices: np.ndarray) -> np.ndarray:
    """float64 [B]: ``statistic(idx)`` for each resample row; nan where it returns None / nan."""
    out = np.full(len(indices), np.nan)
    for b, idx in enumerate(indices):
        v = statistic(idx)
        if v is not None:
            out[b] = v
    return out


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None, int]:
    """(low, high, n_valid): the percentile interval of the finite samples; (None, None, 0) if none."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None, None, 0
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(s, [a, 100 - a])
    return float(lo), float(hi), int(s.size)


def _metric_samples(y_true: np.ndarray, proba: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric on every resample (nan where undefined): arrays [B]."""
    from sklearn.metrics import roc_auc_score

    k = NUM_GRADES
    y_pred = proba.argmax(1)
    t, p = y_true[indices], y_pred[indices]  # [B, n]
    b = len(indices)
    flat = (np.arange(b)[:, None] * k * k + t * k + p).ravel()
    cm = np.bincount(flat, minlength=b * k * k).reshape(b, k, k)
    support = cm.sum(2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diagonal(cm, axis1=1, axis2=2) / np.maximum(support, 1), np.nan)
    present = np.isfinite(recall)
    n_present = present.sum(1)
    bacc = np.where(n_present > 0, np.where(present, recall, 0).sum(1) / np.maximum(n_present, 1), np.nan)
    out = {"qwk": kappa_from_confusion(cm), "balanced_accuracy": bacc}
    for g in range(k):
        out[f"recall_{g}"] = recall[:, g]
    pos = y_true >= REFERABLE_GRADE
    score = referable_scores(proba)

    def auc(idx: np.ndarray) -> float | None:
        yy = pos[idx]
        return float(roc_auc_score(yy, score[idx])) if yy.any() and not yy.all() else None

    out["auroc_referable"] = bootstrap_samples(auc, indices)
    return out


def _entry(value: float | None, samples: np.ndarray, level: float, reason: str | None = None) -> dict[str, Any]:
    lo, hi, nv = percentile_interval(samples, level)
    e: dict[str, Any] = {"value": value, "low": lo if value is not None else None,
                         "high": hi if value is not None else None, "n_valid_resamples": nv if value is not None else 0}
    if value is None:
        e["reason"] = reason or "undefined on the test set"
    return e


def evaluate_predictions(
    y_true: np.ndarray, proba: np.ndarray, *, indices: np.ndarray, level: float = 0.95
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Point metrics with percentile-bootstrap intervals over the resamples ``indices`` [B, n].

    Returns ``(metrics, samples)``: metrics ``{"qwk", "balanced_accuracy", "auroc_referable": {value,
    low, high, n_valid_resamples[, reason]}, "recall": {"0".."4": ...}, "confusion_matrix": [[...]]}``
    (value None with a reason where undefined: a grade absent from the test set has no recall, AUROC
    needs both referable and non-referable images); samples: the per-resample arrays (for paired
    differences between arms evaluated on the same ``indices``).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape != (len(y_true), NUM_GRADES):
        raise ValueError(f"proba must be [N, {NUM_GRADES}] for N = {len(y_true)} labels, got {proba.shape}")
    y_pred = proba.argmax(1)
    samples = _metric_samples(y_true, proba, indices)
    qwk = quadratic_weighted_kappa(y_true, y_pred)
    bacc = balanced_accuracy(y_true, y_pred)
    auc, auc_reason = referable_auroc(y_true, proba)
    recall = per_grade_recall(y_true, y_pred)
    metrics = {
        "qwk": _entry(qwk, samples["qwk"], level, "undefined: one grade only in both truth and prediction"),
        "balanced_accuracy": _entry(bacc, samples["balanced_accuracy"], level),
        "auroc_referable": _entry(auc, samples["auroc_referable"], level, auc_reason),
        "recall": {str(g): _entry(r, samples[f"recall_{g}"], level, f"grade {g} is absent from the test set")
                   for g, r in enumerate(recall)},
        "confusion_matrix": confusion_matrix(y_true, y_pred).tolist(),
    }
    return metrics, samples


def _delta(a: np.ndarray, b: np.ndarray, va: float | None, vb: float | None, level: float) -> dict[str, Any]:
    value = None if va is None or vb is None else va - vb
    return _entry(value, a - b, level, "undefined for one of the two arms")
