"""Decoders: latent -> per-gene distribution of (standardised) normalised expression.

``GaussianDecoder`` models the normalised targets directly (mean and log-variance per gene).
``NegativeBinomialDecoder`` adds a count likelihood: the rate of gene g in a spot is
``library_size * exp(rate_logit_g)``, with a learnt per-gene inverse dispersion; its
``normalised`` mean is ``log1p(target_sum * exp(rate_logit))``, i.e. log1p_cp10k units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stevs.models.experts import mlp
from stevs.models.poe import clamp_logvar


class GaussianDecoder(nn.Module):
    """z -> (mean, logvar) per gene."""

    def __init__(
        self, latent_dim: int, n_genes: int, hidden: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.body = mlp(latent_dim, hidden, hidden, layers=1, dropout=dropout)
        self.mean = nn.Linear(hidden, n_genes)
        self.logvar = nn.Linear(hidden, n_genes)

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        h = F.gelu(self.body(z))
        return {"mean": self.mean(h), "logvar": clamp_logvar(self.logvar(h))}


class NegativeBinomialDecoder(GaussianDecoder):
    """Gaussian head on normalised targets plus a negative binomial head on raw counts."""

    def __init__(
        self, latent_dim: int, n_genes: int, hidden: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__(latent_dim, n_genes, hidden, dropout)
        self.rate_logit = nn.Linear(hidden, n_genes)
        nn.init.constant_(self.rate_logit.bias, -8.0)  # ~ 3 per 10k counts
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        h = F.gelu(self.body(z))
        return {
            "mean": self.mean(h),
            "logvar": clamp_logvar(self.logvar(h)),
            "rate_logit": self.rate_logit(h).clamp(-30.0, 5.0),
            "log_theta": self.log_theta.clamp(-10.0, 10.0).expand(z.shape[0], -1),
        }


def negative_binomial_nll(
    counts: Tensor, library_size: Tensor, rate_logit: Tensor, log_theta: Tensor
) -> Tensor:
    """NB(mu = library_size * exp(rate_logit), theta) negative log-likelihood, summed per spot."""
    log_mu = torch.log(library_size.clamp_min(1.0)).unsqueeze(-1) + rate_logit
    theta = torch.exp(log_theta)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    log_prob = (
        theta * (log_theta - log_theta_mu)
        + counts * (log_mu - log_theta_mu)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1.0)
    )
    return -log_prob.sum(-1)


def sample_negative_binomial(mu: Tensor, log_theta: Tensor) -> Tensor:
    """Counts drawn from NB(mu, theta) via its Gamma-Poisson mixture."""
    theta = torch.exp(log_theta)
    rate = torch.distributions.Gamma(theta, theta / mu.clamp_min(1e-8)).sample()
    return torch.poisson(rate)
