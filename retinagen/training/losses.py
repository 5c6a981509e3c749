"""Loss functions of the MSI objective (paper Eq. 2-4, 6), as pure functions on tensors.

    min_{G,Q} max_D  V(D, G) - beta * L_info(G, Q)                                   (Eq. 4)

* V (Eq. 2) uses D(x) = sigmoid(logit). D maximising V is D minimising `d_logistic_loss`; G uses the
  non-saturating form `g_nonsaturating_loss` (Goodfellow et al.; StyleGAN2), which has the same fixed point.
* L_info = E[log Q(c | x_hat)] + H(C) (Eq. 3/6) in nats; `info_terms` computes it with its parts. G and Q
  maximise it, i.e. minimise ``beta * neg_log_q`` (H(C) is a constant).
* R1 penalty on reals (gamma = 10 in the paper), lazily applied every ``interval`` D steps (StyleGAN2).

Where Q is trained: Q is a head on D's trunk, so its parameters live in D's optimizer and the info loss on
the (detached) fakes is added to D's step; G gets the same loss on its own step, through the fake images.
This is what the reference InfoGAN code does (the MI estimate is subtracted from both the discriminator's
and the generator's loss). It keeps one optimizer per network, lets the trunk learn features useful to Q,
and is still min over G and Q of -beta * L_info: only the adversarial part of D's loss is a maximisation.

Nothing here calls backward() or steps an optimizer; `r1_penalty` takes a gradient with create_graph=True.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retinagen.latent import LatentSample, LatentSpec


def _check_logits(x: torch.Tensor, name: str) -> None:
    if x.ndim != 1:
        raise ValueError(f"{name} must be [N] logits, got shape {tuple(x.shape)}")


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-V(D, G) of Eq. (2): mean softplus(fake) + mean softplus(-real) = -E log D(x) - E log(1 - D(x_hat)).

    real_logits [N], fake_logits [M] (batch sizes may differ). Scalar fp32, >= 0; 2 log 2 at logits 0.
    """
    _check_logits(real_logits, "real_logits")
    _check_logits(fake_logits, "fake_logits")
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -E log D(x_hat) = mean softplus(-fake). Scalar fp32; log 2 at logits 0."""
    _check_logits(fake_logits, "fake_logits")
    return F.softplus(-fake_logits.float()).mean()


def r1_penalty(real_img: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample R1 penalty ||d logit(x) / dx||^2 [N] (Mescheder et al. 2018), differentiable w.r.t. D.

    real_img must have requires_grad=True and real_logits [N] must be computed from it. Each sample's
    logit depends only on its own image except through minibatch stddev, as in StyleGAN2.
    """
    _check_logits(real_logits, "real_logits")
    if not real_img.requires_grad:
        raise ValueError("r1_penalty: real_img must require grad (call real_img.requires_grad_() before D)")
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_img, create_graph=True)
    return grad.float().square().reshape(grad.shape[0], -1).sum(dim=1)


def r1_loss(penalty: torch.Tensor, gamma: float, interval: int = 1) -> torch.Tensor:
    """gamma / 2 * mean(penalty) * interval: lazy regularisation (applied every ``interval`` D steps, scaled up)."""
    if gamma < 0 or interval < 1:
        raise ValueError(f"r1_loss needs gamma >= 0 and interval >= 1, got {gamma}, {interval}")
    return penalty.mean() * (gamma / 2.0 * interval)


@dataclass(frozen=True)
class InfoTerms:
    """The mutual-information lower bound and its parts, all in nats.

    Attributes:
        l_info: L_info = mean_n sum_i log Q(c_i | x_n) + sum_i H(C_i), scalar (Eq. 3/6).
        per_code: [L] the same per code, mean_n log Q(c_i | x_n) + H(C_i).
        l_info_discrete: the categorical and Bernoulli codes' part of l_info, scalar. It is a lower bound
            on I(C_discrete; X_hat) <= H(C_discrete) = ``discrete_bound``: the curve of the paper's Fig. 10.
        discrete_bound: H of the discrete codes (float).
        neg_log_q: -mean_n sum_i w_i log Q(c_i | x_n), scalar: the loss G and Q minimise (times beta);
            w_i = 1 for discrete codes and ``continuous_weight`` for uniform codes (1 = Eq. 4).

    What the uniform codes add: with Q(c | x) = N(c; mu, 1) (paper) each uniform code contributes
    log 2 - log(2 pi) / 2 - E[(c - mu)^2] / 2, i.e. a constant minus half the squared error of Q's mean:
    at most log 2 - log(2 pi) / 2 = -0.226 nats (perfect mean) and -0.393 nats for an uninformative Q
    (mu = 0, E[c^2] = 1/3). So it is negative and is not a bound one can compare with an entropy; with a
    deterministic G the true I(C_i; X_hat) of a continuous code is unbounded. With a learned variance the
    term can become positive and grows as the predicted variance shrinks (clamped in `LatentSpec.log_q`).
    """

    l_info: torch.Tensor
    per_code: torch.Tensor
    l_info_discrete: torch.Tensor
    discrete_bound: float
    neg_log_q: torch.Tensor


def info_terms(
    spec: LatentSpec, q_params: torch.Tensor, sample: LatentSample, continuous_weight: float = 1.0
) -> InfoTerms:
    """L_info (Eq. 3/6) for Q's outputs q_params [N, spec.q_param_dim] on images generated from ``sample``.

    ``continuous_weight`` (>= 0) multiplies the uniform codes' log Q in ``neg_log_q`` only (the reported
    ``l_info``/``per_code`` are unweighted). 1.0 is Eq. (4) as written. InfoGAN (Chen et al. 2016, Sec. 5)
    uses a smaller lambda for continuous codes, whose Gaussian term is a differential-entropy quantity
    on another scale; here the unit-variance Gaussian terms of 10 uniform codes measurably slow the
    discrete codes' learning (pure-info training, 16 px, 300 steps: L_info_discrete 1.6 nats with weight 1,
    4.0 with 0.1, 5.1 with 0).
    """
    if continuous_weight < 0:
        raise ValueError(f"continuous_weight must be >= 0, got {continuous_weight}")
    log_q = spec.log_q(q_params, sample)  # [N, L], fp32
    h = spec.entropy().to(log_q.device)
    per_code = log_q.mean(dim=0) + h
    discrete = spec.discrete_mask.to(log_q.device)
    if continuous_weight == 1.0:
        neg_log_q = -log_q.sum(dim=1).mean()
    else:
        weights = torch.where(discrete, 1.0, float(continuous_weight)).to(log_q.dtype)
        neg_log_q = -(log_q * weights).sum(dim=1).mean()
    return InfoTerms(
        l_info=per_code.sum(),
        per_code=per_code,
        l_info_discrete=per_code[discrete].sum(),
        discrete_bound=spec.discrete_entropy(),
        neg_log_q=neg_log_q,
    )


def grade_ce_loss(class_logits: torch.Tensor, grade: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the auxiliary DR-grade classifier: class_logits [N, K], grade [N] int in [0, K)."""
    if class_logits.ndim != 2 or grade.shape != (class_logits.shape[0],):
        raise ValueError(
            f"grade_ce_loss expects class_logits [N, K] and grade [N], got {tuple(class_logits.shape)}, {tuple(grade.shape)}"
        )
    return F.cross_entropy(class_logits.float(), grade.long())


def mode_seeking_loss(fake_a: torch.Tensor, fake_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor,
                      eps: float = 1e-5, pool: int = 1) -> torch.Tensor:
    """MSGAN's mode-seeking term (Mao et al. 2019, Eq. 3), scalar: mean|z_a - z_b| / (mean|G_a - G_b| + eps).

    fake_a, fake_b [M, C, H, W]: images made from the same codes with the noise latents z_a, z_b [M, Z'].
    Minimising it pushes G to make images that differ when only z' differs (the inverse ratio of the paper,
    bounded above by 1/eps when G ignores z'). ``pool`` > 1 takes the image distance on pool x pool
    averages, so differences finer than that (grain) do not count.
    """
    if fake_a.shape != fake_b.shape or z_a.shape != z_b.shape or fake_a.shape[0] != z_a.shape[0]:
        raise ValueError(
            f"mode_seeking_loss needs paired batches, got images {tuple(fake_a.shape)} / {tuple(fake_b.shape)} "
            f"and latents {tuple(z_a.shape)} / {tuple(z_b.shape)}"
        )
    if fake_a.shape[0] == 0:
        raise ValueError("mode_seeking_loss needs at least one pair")
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    diff = fake_a.float() - fake_b.float()
    if pool > 1:
        diff = F.avg_pool2d(diff, pool)
    d_img = diff.abs().mean()
    d_z = (z_a.float() - z_b.float()).abs().mean()
    return d_z / (d_img + eps)


def _add_weighted(total: torch.Tensor, term: torch.Tensor | None, weight: float, name: str) -> torch.Tensor:
    # A zero weight removes the term entirely (even a NaN one), so beta = 0 really is StyleGAN / a plain GAN.
    if term is None or weight == 0:
        return total
    if term.ndim != 0:
        raise ValueError(f"{name} must be a scalar tensor, got shape {tuple(term.shape)}")
    return total + weight * term.float()


def total_generator_loss(
    fake_logits: torch.Tensor,
    *,
    neg_log_q: torch.Tensor | None = None,
    beta: float = 1.0,
    grade_ce: torch.Tensor | None = None,
    grade_weight: float = 1.0,
    mode_seeking: torch.Tensor | None = None,
    mode_seeking_weight: float = 0.0,
    guide_ce: torch.Tensor | None = None,
    guide_weight: float = 0.0,
) -> torch.Tensor:
    """G's loss: g_nonsaturating(fake) + beta * neg_log_q [+ grade_weight * CE of the grade classifier on fakes]
    [+ mode_seeking_weight * `mode_seeking_loss`] [+ guide_weight * CE of the frozen grade guide on fakes].

    This is Eq. (4) for G: minimising -V (non-saturating form) and -beta * L_info.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if mode_seeking_weight < 0:
        raise ValueError(f"mode_seeking_weight must be >= 0, got {mode_seeking_weight}")
    loss = g_nonsaturating_loss(fake_logits)
    loss = _add_weighted(loss, neg_log_q, beta, "neg_log_q")
    loss = _add_weighted(loss, grade_ce, grade_weight, "grade_ce")
    loss = _add_weighted(loss, mode_seeking, mode_seeking_weight, "mode_seeking")
    return _add_weighted(loss, guide_ce, guide_weight, "guide_ce")


def total_discriminator_loss(
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    *,
    neg_log_q: torch.Tensor | None = None,
    beta: float = 1.0,
    r1: torch.Tensor | None = None,
    grade_ce: torch.Tensor | None = None,
    grade_weight: float = 1.0,
) -> torch.Tensor:
    """D's (and Q's) loss: d_logistic + beta * neg_log_q (Q on detached fakes) [+ r1] [+ grade CE on reals].

    ``r1`` is an already scaled `r1_loss`; ``neg_log_q`` comes from `info_terms` on D's q_params for the
    fakes of this step (see the module docstring for why Q is trained on D's step).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    loss = d_logistic_loss(real_logits, fake_logits)
    loss = _add_weighted(loss, neg_log_q, beta, "neg_log_q")
    loss = _add_weighted(loss, r1, 1.0, "r1")
    return _add_weighted(loss, grade_ce, grade_weight, "grade_ce")
