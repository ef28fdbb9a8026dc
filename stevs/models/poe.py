"""Diagonal Gaussians: Product of Experts, KL divergences and alignment losses.

Everything works on log-variances, clamped to ``[LOGVAR_MIN, LOGVAR_MAX]``, so that
precisions ``exp(-logvar)`` never overflow and a product of many confident experts stays
finite. KL divergences, sampling and the Gaussian likelihood are ``torch.distributions``
(``Normal``, ``kl_divergence``); all divergences are summed over the latent dimension and
returned per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.distributions import Normal, kl_divergence

LOGVAR_MIN = -12.0
LOGVAR_MAX = 8.0

#: alignment losses selectable with ``STevsConfig.align``
ALIGNMENTS = ("sym_kl", "kl_img_spatial", "kl_spatial_img", "mean_mse", "wasserstein")


def clamp_logvar(logvar: Tensor) -> Tensor:
    """Clamp log-variances into the numerically safe range."""
    return logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def product_of_experts(
    mus: Sequence[Tensor],
    logvars: Sequence[Tensor],
    *,
    include_prior: bool = True,
    weights: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Combine Gaussian experts: precisions add, means are precision-weighted.

    ``weights`` (one per expert, broadcastable to the latent, 0 or 1) switch experts off per
    sample. With ``include_prior`` the standard normal N(0, I) joins as an expert, so the
    product is proper even when every other expert is off. Returns ``(mu, logvar)``.
    """
    if not mus and not include_prior:
        raise ValueError("product_of_experts needs at least one expert")
    ref = mus[0] if mus else None
    precisions: list[Tensor] = []
    weighted_mus: list[Tensor] = []
    for i, (mu, logvar) in enumerate(zip(mus, logvars, strict=True)):
        precision = torch.exp(-clamp_logvar(logvar))
        if weights is not None and weights[i] is not None:
            precision = precision * weights[i]
        precisions.append(precision)
        weighted_mus.append(mu * precision)
    if include_prior:
        if ref is None:
            raise ValueError("product_of_experts needs a reference tensor for the prior")
        precisions.append(torch.ones_like(ref))
        weighted_mus.append(torch.zeros_like(ref))
    total_precision = torch.stack(precisions).sum(0)
    mu = torch.stack(weighted_mus).sum(0) / total_precision
    logvar = clamp_logvar(-torch.log(total_precision))
    return mu, logvar


def normal(mu: Tensor, logvar: Tensor) -> Normal:
    """The diagonal Gaussian ``N(mu, exp(logvar))`` with the log-variance clamped.

    Arguments are not validated (``validate_args=False``): the clamp already guarantees a
    positive finite scale, and validation would check every tensor on every training step.
    """
    return Normal(mu, torch.exp(0.5 * clamp_logvar(logvar)), validate_args=False)


def kl_normal(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(q || p) between diagonal Gaussians (``torch.distributions``), summed per sample."""
    return kl_divergence(normal(mu_q, logvar_q), normal(mu_p, logvar_p)).sum(-1)


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q || N(0, I)) (``torch.distributions``), summed over the last dimension."""
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu), validate_args=False)
    return kl_divergence(normal(mu, logvar), prior).sum(-1)


def symmetric_kl(mu_a: Tensor, logvar_a: Tensor, mu_b: Tensor, logvar_b: Tensor) -> Tensor:
    """KL(a || b) + KL(b || a) (Jeffreys divergence), per sample."""
    return kl_normal(mu_a, logvar_a, mu_b, logvar_b) + kl_normal(mu_b, logvar_b, mu_a, logvar_a)


def wasserstein2(mu_a: Tensor, logvar_a: Tensor, mu_b: Tensor, logvar_b: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance between diagonal Gaussians, per sample."""
    sd_a = torch.exp(0.5 * clamp_logvar(logvar_a))
    sd_b = torch.exp(0.5 * clamp_logvar(logvar_b))
    return ((mu_a - mu_b) ** 2 + (sd_a - sd_b) ** 2).sum(-1)


def _mean_distance(mu_a: Tensor, logvar_a: Tensor, mu_b: Tensor, logvar_b: Tensor) -> Tensor:
    """Squared distance of the means only (variances ignored)."""
    return ((mu_a - mu_b) ** 2).sum(-1)


def alignment_loss(name: str) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The alignment divergence ``f(mu_img, logvar_img, mu_spatial, logvar_spatial)``."""
    table: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
        "sym_kl": symmetric_kl,
        "kl_img_spatial": kl_normal,
        "kl_spatial_img": lambda ma, la, mb, lb: kl_normal(mb, lb, ma, la),
        "mean_mse": _mean_distance,
        "wasserstein": wasserstein2,
    }
    if name not in table:
        raise ValueError(f"unknown alignment {name!r}; choose one of {', '.join(ALIGNMENTS)}")
    return table[name]


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """Draw z = mu + sigma * eps (``Normal.rsample``, differentiable in mu and logvar)."""
    return normal(mu, logvar).rsample()


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor, variance_power: float = 0.0) -> Tensor:
    """Gaussian negative log-likelihood (``Normal.log_prob``), summed over the last dimension.

    ``variance_power`` > 0 gives the beta-NLL of Seitzer et al. (ICLR 2022), which
    ``torch.distributions`` does not have: each element's term is weighted by its
    (gradient-stopped) variance to that power, so that values the model calls noisy do not
    stop receiving gradient for their mean (0: the plain NLL; 1: the mean gets exactly the
    squared-error gradient).
    """
    logvar = clamp_logvar(logvar)
    nll = -normal(mean, logvar).log_prob(x)
    if variance_power > 0:
        nll = nll * torch.exp(variance_power * logvar.detach())
    return nll.sum(-1)
