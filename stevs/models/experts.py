"""Encoders: MLPs, Gaussian heads, Fourier features and the spatial expert."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stevs.models.poe import clamp_logvar


def mlp(
    in_dim: int, hidden: int, out_dim: int, *, layers: int = 2, dropout: float = 0.1
) -> nn.Sequential:
    """``layers`` hidden blocks (Linear, LayerNorm, GELU, Dropout) then a Linear to out_dim."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        blocks += [nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout)]
        dim = hidden
    blocks.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*blocks)


class GaussianHead(nn.Module):
    """Features -> diagonal Gaussian (mu, logvar) over the latent.

    The log-variance starts at ``init_logvar`` (bias of the output layer): with unit
    variance at the start, the decoder sees mostly sampling noise and a small panel's VAE
    learns far slower than a plain regression on the same budget; starting narrow lets the
    KL term widen the posterior where the data allow it.
    """

    def __init__(
        self,
        in_dim: int,
        latent_dim: int,
        hidden: int = 256,
        layers: int = 2,
        dropout: float = 0.1,
        init_logvar: float = -4.0,
    ) -> None:
        super().__init__()
        self.net = mlp(in_dim, hidden, 2 * latent_dim, layers=layers, dropout=dropout)
        self.latent_dim = latent_dim
        with torch.no_grad():
            self.net[-1].bias[latent_dim:].fill_(init_logvar)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(features).chunk(2, dim=-1)
        return mu, clamp_logvar(logvar)


class FourierFeatures(nn.Module):
    """(N, 2) coordinates in [-1, 1] -> [x, sin(2^k pi x), cos(2^k pi x)] for k < n_freqs."""

    def __init__(self, n_freqs: int = 6) -> None:
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(n_freqs)) * math.pi)
        self.out_dim = 2 + 4 * n_freqs

    def forward(self, coords: Tensor) -> Tensor:
        angles = coords.float().unsqueeze(-1) * self.freqs  # (N, 2, F)
        return torch.cat([coords.float(), angles.sin().flatten(1), angles.cos().flatten(1)], dim=1)


class SpatialEncoder(nn.Module):
    """Per-slide normalised coordinates -> Fourier features -> MLP feature vector."""

    def __init__(self, hidden: int = 128, n_freqs: int = 6, dropout: float = 0.1) -> None:
        super().__init__()
        self.fourier = FourierFeatures(n_freqs)
        self.net = mlp(self.fourier.out_dim, hidden, hidden, layers=1, dropout=dropout)
        self.out_dim = hidden

    def forward(self, coords: Tensor) -> Tensor:
        return self.net(self.fourier(coords))
