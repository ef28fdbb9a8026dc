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
from torch.distributions import NegativeBinomial

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


def negative_binomial(log_mu: Tensor, log_theta: Tensor) -> NegativeBinomial:
    """``torch.distributions.NegativeBinomial`` of mean ``exp(log_mu)``, inverse dispersion theta.

    torch counts successes before ``total_count`` failures with success log-odds ``logits``,
    whose mean is ``total_count * exp(logits)``: so ``total_count = theta`` and ``logits =
    log(mu) - log(theta)``. Arguments are not validated (a check of every tensor per step).
    """
    return NegativeBinomial(
        total_count=torch.exp(log_theta), logits=log_mu - log_theta, validate_args=False
    )


def negative_binomial_nll(
    counts: Tensor, library_size: Tensor, rate_logit: Tensor, log_theta: Tensor
) -> Tensor:
    """NB(mu = library_size * exp(rate_logit), theta) negative log-likelihood, summed per spot."""
    log_mu = torch.log(library_size.clamp_min(1.0)).unsqueeze(-1) + rate_logit
    return -negative_binomial(log_mu, log_theta).log_prob(counts).sum(-1)


def sample_negative_binomial(mu: Tensor, log_theta: Tensor) -> Tensor:
    """Counts drawn from NB(mu, theta) (torch's Gamma-Poisson sampler)."""
    return negative_binomial(torch.log(mu.clamp_min(1e-8)), log_theta).sample()
