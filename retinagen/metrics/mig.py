"""Mutual Information Gap (MIG) and max I(V_k; C_i) from Q on real labelled images (paper, Eq. 15-16, Table 2).

The paper estimates the mutual information between a ground-truth attribute V_k (a CelebA attribute, the DR
grade, a discretised synthetic-fundus factor) and a latent code C_i with the auxiliary network Q run on real
images x:

    I(V_k; C_i) = E_{v ~ p(v), c' ~ Q(C_i | v)} [ log sum_{x in X_v} Q(c' | x) p(x | v) ] + H(C_i),

with p(x | v) uniform over the images X_v labelled v. Then

    MIG = 1/K sum_k ( I(V_k; C_{i(k)}) - max_{i != i(k)} I(V_k; C_i) ) / H(V_k),   i(k) = argmax_i I(V_k; C_i).

Derivation for a discrete code (categorical, Bernoulli; what this module computes exactly, no sampling).
With p(x | v) = 1/|X_v| the inner sum is the *aggregate posterior of the class*,

    q_v(c) := sum_{x in X_v} Q(c | x) / |X_v|,

and Q(C_i | V_k = v) in the outer expectation is that same q_v. So, with p(v) = |X_v| / N,

    E_{v, c' ~ q_v} log q_v(c') = sum_v p(v) sum_c q_v(c) log q_v(c) = -sum_v p(v) H(q_v),

    I_paper(V_k; C_i) = H(C_i) - sum_v p(v) H(q_v),

where H(C_i) is the *prior* entropy of the code (log k for a categorical(k) code, log 2 for a Bernoulli(0.5) one).

Difference from a true mutual information. Under the joint p(v) q_v(c) the mutual information is

    I_norm(V_k; C_i) = H(q̄) - sum_v p(v) H(q_v),    q̄(c) = sum_v p(v) q_v(c) = mean_x Q(c | x),

i.e. the same formula with the entropy of the *empirical marginal* q̄ of Q's predictions in place of the prior
entropy. The two agree exactly when Q's aggregate posterior on real images matches the prior (q̄ = p(C_i)).
Otherwise I_paper - I_norm = H(C_i) - H(q̄) >= 0 (a uniform prior has the largest entropy): the paper's estimator
credits a code whose Q is confidently constant on real images (q_v = q̄ = a point mass gives I_paper = H(C_i),
I_norm = 0), and the offset differs between codes, so it does not cancel in the gap. This module reports the
paper's estimator as the main metric (``mi_paper``, ``mig``) and the properly normalised one alongside
(``mi_normalized``, ``mig_normalized``); I_norm is in [0, min(H(V_k), H(C_i))].

Uniform codes. Q models c ~ Uniform(-1, 1) with a Gaussian N(mu(x), s(x)^2) (s = 1 in the paper). We
discretise: [-1, 1] is cut into ``bins`` equal bins (default 20) and Q(bin b | x) is the Gaussian's mass in bin b
renormalised over [-1, 1] (the prior's support; Q's tails beyond it carry no information about a code that cannot
lie there). The code then is a categorical variable over bins with a uniform prior, H(C_i) = log(bins), and both
estimators above apply exactly. Why not a Monte Carlo estimate of the continuous formula: with differential
entropies and Q's untruncated Gaussians the paper's formula is not a mutual information at all
(h(N(mu, 1)) = 0.5 log(2 pi e) = 1.42 nats > log 2 = H(U(-1, 1)), so it is negative for every code), and sampling
adds noise to a metric compared across models. As bins -> infinity, I_norm converges to the mutual information
between V_k and the continuous code under the truncated-Gaussian Q, and I_paper to log 2 - sum_v p(v) h(q_v)
(the paper's formula with the truncation, >= 0). Like its discrete counterpart, I_paper also counts a Q that is
narrower than the prior as information even when it ignores the image (an image-independent N(0, 1) gives
I_paper = log(bins) - H(binned N(0, 1)) = 0.010 nats at 20 bins, I_norm = 0).
With s = 1 and means inside [-1, 1], Q's posteriors are broad, so uniform codes carry little information by
this measure whatever the generator does: expect small values (the paper's Table 2 reports max I = 5.9e-2).

All quantities are in nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from retinagen.latent import LatentSpec
from retinagen.progress import progress_bar

__all__ = [
    "DEFAULT_UNIFORM_BINS",
    "MIGResult",
    "code_posteriors",
    "label_entropies",
    "max_mi",
    "mig",
    "mig_report",
    "mutual_information_matrix",
    "q_params_for_dataset",
]

DEFAULT_UNIFORM_BINS = 20
_EPS = 1e-12


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of probability vectors along ``axis``; 0 log 0 = 0."""
    p = np.clip(p, 0.0, 1.0)
    return -(p * np.log(np.where(p > _EPS, p, 1.0))).sum(axis=axis)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF in float64."""
    return torch.special.ndtr(torch.from_numpy(np.asarray(z, dtype=np.float64))).numpy()


def code_posteriors(
    spec: LatentSpec, q_params: np.ndarray | torch.Tensor, bins: int = DEFAULT_UNIFORM_BINS
) -> list[tuple[np.ndarray, float]]:
    """Per code i: (Q(C_i | x) as probabilities [N, M_i] (float64), prior entropy H(C_i) in nats).

    Categorical: softmax of the logits (M = k, H = log k). Bernoulli: [1 - sigmoid(l), sigmoid(l)] (M = 2,
    H = log 2). Uniform: the Gaussian N(mu, s^2) (s = 1, or exp(logvar / 2) with a learned variance) integrated
    over ``bins`` equal bins of [-1, 1] and renormalised over [-1, 1] (M = bins, H = log bins).
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    qp = torch.as_tensor(np.asarray(q_params) if not isinstance(q_params, torch.Tensor) else q_params)
    qp = qp.detach().cpu().to(torch.float64)
    if not torch.isfinite(qp).all():
        raise ValueError("q_params contain NaN or inf")
    q = spec.split_q_params(qp)
    out: list[tuple[np.ndarray, float]] = []
    for logits in q.cat_logits:
        out.append((torch.softmax(logits, dim=1).numpy(), math.log(logits.shape[1])))
    p1 = torch.sigmoid(q.bern_logits).numpy()
    for j in range(spec.n_bernoulli):
        out.append((np.stack([1.0 - p1[:, j], p1[:, j]], axis=1), math.log(2.0)))
    mean = q.unif_mean.numpy()
    std = np.ones_like(mean) if q.unif_logvar is None else np.exp(0.5 * q.unif_logvar.numpy())
    edges = np.linspace(-1.0, 1.0, bins + 1)
    for j in range(spec.n_uniform):
        z = (edges[None, :] - mean[:, j : j + 1]) / std[:, j : j + 1]  # [N, bins + 1]
        # Bin mass Phi(z_hi) - Phi(z_lo); for means below 0 the same as Phi(-z_lo) - Phi(-z_hi), which avoids
        # subtracting two numbers close to 1 when the whole interval lies in the upper tail.
        upper = np.diff(_normal_cdf(z), axis=1)
        lower = -np.diff(_normal_cdf(-z), axis=1)
        mass = np.where(mean[:, j : j + 1] < 0, lower, upper)
        total = mass.sum(axis=1, keepdims=True)
        # A mean far outside [-1, 1] with a tiny variance leaves ~0 mass inside: put it all in the nearest bin.
        far = total[:, 0] < 1e-300
        if far.any():
            mass[far] = 0.0
            mass[far, np.where(mean[far, j] < 0, 0, bins - 1)] = 1.0
            total[far] = 1.0
        out.append((mass / total, math.log(bins)))
    return out


def _check_labels(labels: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim == 1:
        lab = lab[:, None]
    if lab.ndim != 2 or lab.shape[0] != n:
        raise ValueError(f"labels must be [N, K] with N = {n}, got shape {lab.shape}")
    if lab.shape[1] < 1:
        raise ValueError("labels need at least one attribute column")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise ValueError("labels must be integers (discretise continuous attributes first)")
        lab = lab.astype(np.int64)
    return lab


def label_entropies(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Empirical entropy H(V_k) [K] (nats) of each label column of labels [N, K] (or [N])."""
    lab = _check_labels(labels, np.asarray(labels).shape[0])
    out = np.zeros(lab.shape[1])
    for k in range(lab.shape[1]):
        _, counts = np.unique(lab[:, k], return_counts=True)
        out[k] = float(_entropy(counts / counts.sum()))
    return out


def _mi_both(
    spec: LatentSpec, q_params: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(I_paper [K, L], I_norm [K, L], labels [N, K])."""
    posts = code_posteriors(spec, q_params, bins)
    n = int(q_params.shape[0])
    lab = _check_labels(labels, n)
    if n < 1:
        raise ValueError("need at least one image")
    if not posts:
        raise ValueError("the latent spec has no codes")
    k_attr, n_codes = lab.shape[1], len(posts)
    mi_paper = np.zeros((k_attr, n_codes))
    mi_norm = np.zeros((k_attr, n_codes))
    for k in range(k_attr):
        _, inverse, counts = np.unique(lab[:, k], return_inverse=True, return_counts=True)
        onehot = np.zeros((n, len(counts)))
        onehot[np.arange(n), inverse.reshape(-1)] = 1.0
        p_v = counts / n  # [V]
        for i, (probs, h_prior) in enumerate(posts):
            q_v = (onehot.T @ probs) / counts[:, None]  # aggregate posterior per label value [V, M]
            cond = float(p_v @ _entropy(q_v))  # sum_v p(v) H(q_v)
            q_bar = p_v @ q_v  # = mean_x Q(c | x)
            mi_paper[k, i] = h_prior - cond
            # Clamp rounding (I_norm >= 0 by concavity of entropy).
            mi_norm[k, i] = max(float(_entropy(q_bar)) - cond, 0.0)
    return mi_paper, mi_norm, lab


def mutual_information_matrix(
    spec: LatentSpec,
    q_params: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    bins: int = DEFAULT_UNIFORM_BINS,
    normalized: bool = False,
) -> np.ndarray:
    """I(V_k; C_i) [K, L] in nats: the paper's estimator (default) or the normalised one (see module docstring).

    Args:
        spec: the model's latent spec (decides how q_params split into codes).
        q_params: Q's output on real images [N, spec.q_param_dim].
        labels: ground-truth attributes [N, K] (or [N]), integer values from a small set (any ints, e.g. -1/1).
        bins: bins of [-1, 1] for uniform codes.
        normalized: use the empirical marginal entropy H(mean_x Q(C_i | x)) instead of the prior H(C_i).
    """
    paper, norm, _ = _mi_both(spec, q_params, labels, bins)
    return norm if normalized else paper


def mig(mi: np.ndarray, label_entropies: np.ndarray | Sequence[float]) -> float:
    """Eq. 15: mean over attributes k of (largest - second largest I(V_k; C_i) over codes i) / H(V_k).

    Attributes with H(V_k) = 0 (constant in the data) carry no information to gap and are left out of the mean.
    Needs at least two codes and one non-constant attribute.
    """
    m = np.asarray(mi, dtype=np.float64)
    h = np.asarray(label_entropies, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"mi must be [K, L] with L >= 2 codes, got shape {m.shape}")
    if h.shape != (m.shape[0],):
        raise ValueError(f"label_entropies must be [{m.shape[0]}], got shape {h.shape}")
    if not np.isfinite(m).all() or not np.isfinite(h).all():
        raise ValueError("mi and label_entropies must be finite")
    keep = h > 1e-12
    if not keep.any():
        raise ValueError("every attribute is constant (H(V_k) = 0): MIG is undefined")
    top2 = -np.sort(-m[keep], axis=1)[:, :2]
    return float(np.mean((top2[:, 0] - top2[:, 1]) / h[keep]))


def max_mi(mi: np.ndarray) -> float:
    """max over k, i of I(V_k; C_i) (Table 2's third column)."""
    m = np.asarray(mi, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mi must be a non-empty [K, L] array, got shape {m.shape}")
    return float(m.max())


@dataclass
class MIGResult:
    """MIG and MI tables for one model on one labelled dataset (all in nats except the unitless MIG)."""

    mi_paper: np.ndarray  # [K, L]
    mi_normalized: np.ndarray  # [K, L]
    label_entropies: np.ndarray  # [K]
    mig: float
    max_mi: float
    mig_normalized: float
    max_mi_normalized: float
    attribute_names: list[str]
    code_names: list[str]
    n_images: int
    uniform_bins: int

    def best_codes(self, normalized: bool = False) -> dict[str, str]:
        """Attribute name -> the code with the largest I(V_k; C_i)."""
        m = self.mi_normalized if normalized else self.mi_paper
        return {a: self.code_names[int(np.argmax(m[k]))] for k, a in enumerate(self.attribute_names)}

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict for REPORT.json."""
        return {
            "mig": self.mig,
            "max_mi": self.max_mi,
            "mig_normalized": self.mig_normalized,
            "max_mi_normalized": self.max_mi_normalized,
            "n_images": self.n_images,
            "uniform_bins": self.uniform_bins,
            "attributes": self.attribute_names,
            "codes": self.code_names,
            "label_entropies": self.label_entropies.tolist(),
            "mi_paper": self.mi_paper.tolist(),
            "mi_normalized": self.mi_normalized.tolist(),
            "best_code": self.best_codes(),
        }


def mig_report(
    spec: LatentSpec,
    q_params: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    attribute_names: Sequence[str] | None = None,
    bins: int = DEFAULT_UNIFORM_BINS,
) -> MIGResult:
    """Both MI tables, MIG and max MI for Q's output q_params [N, P] and labels [N, K] (see `mutual_information_matrix`)."""
    paper, norm, lab = _mi_both(spec, q_params, labels, bins)
    h = label_entropies(lab)
    names = list(attribute_names) if attribute_names is not None else [f"v{k}" for k in range(lab.shape[1])]
    if len(names) != lab.shape[1]:
        raise ValueError(f"{len(names)} attribute names for {lab.shape[1]} label columns")
    return MIGResult(
        mi_paper=paper,
        mi_normalized=norm,
        label_entropies=h,
        mig=mig(paper, h),
        max_mi=max_mi(paper),
        mig_normalized=mig(norm, h),
        max_mi_normalized=max_mi(norm),
        attribute_names=names,
        code_names=list(spec.code_names),
        n_images=int(lab.shape[0]),
        uniform_bins=bins,
    )


def _label_row(label: Any) -> np.ndarray:
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    return np.atleast_1d(np.asarray(label)).reshape(-1)


def _item_labels(item: tuple[Any, ...], label_fn: Callable[[tuple[Any, ...]], Any] | None) -> Any:
    if label_fn is not None:
        return label_fn(item)
    # (img, label, attrs) from ZipImageDataset(return_attrs=True): the attributes; else the label.
    return item[2] if len(item) > 2 else item[1]


@torch.no_grad()
def q_params_for_dataset(
    model: Any,
    dataset: Any,
    *,
    batch_size: int = 64,
    limit: int | None = None,
    label_fn: Callable[[tuple[Any, ...]], Sequence[int] | np.ndarray | int] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Run Q (``D.forward(img).q_params``) over a labelled image dataset: (q_params [N, P], labels [N, K]).

    Args:
        model: a `retinagen.generation.LoadedModel` (its ``D`` is used) or a `Discriminator`.
        dataset: items ``(img float [3, R, R] in [-1, 1], label)`` or ``(img, label, attrs)`` (``ZipImageDataset``,
            with ``return_attrs=True`` for CelebA's 40 attributes).
        limit: use the first ``limit`` images only.
        label_fn: maps a whole item to its attribute vector (e.g. a synthetic-factor discretiser). Default: the
            attributes ``item[2]`` when the item has them, else the label ``item[1]`` (the DR grade; -1 marks an
            unlabelled image and would count as a class of its own, so filter those datasets first).
    Q's output depends on the rest of the batch through D's minibatch-stddev layer (as in training), so the
    result depends on ``batch_size``; keep it fixed when comparing models. No DR grade is passed: the grade only
    enters D's adversarial logit (projection), never Q.
    """
    disc = getattr(model, "D", model)
    if disc is None:
        raise ValueError("this checkpoint has no discriminator/Q weights; MIG needs Q")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else next(disc.parameters()).device
    was_training = disc.training
    disc.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    qs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    try:
        with progress_bar(n, "Q on real images", enabled=progress) as bar:
            for start in range(0, n, batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, n))]
                imgs = torch.stack([torch.as_tensor(it[0]) for it in items]).to(dev, torch.float32)
                out = disc(imgs)
                qs.append(out.q_params.float().cpu().numpy())
                for it in items:
                    labels.append(_label_row(_item_labels(tuple(it), label_fn)))
                bar.advance(len(items))
    finally:
        disc.train(was_training)
    if not qs:
        raise ValueError("the dataset is empty")
    widths = {len(r) for r in labels}
    if len(widths) != 1:
        raise ValueError(f"labels have different lengths across images: {sorted(widths)}")
    return np.concatenate(qs), np.stack(labels).astype(np.int64)
