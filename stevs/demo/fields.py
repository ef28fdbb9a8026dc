"""Numerical helpers of the demo: seeded random streams, smooth noise, bilinear sampling."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream for (seed, key...)."""
    return np.random.default_rng([seed, *key])


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise over the last two axes, standardised per leading index."""
    noise = rng.standard_normal(shape)
    sigmas = (0.0,) * (len(shape) - 2) + (sigma, sigma)
    field = ndimage.gaussian_filter(noise, sigma=sigmas, mode="reflect")
    field -= field.mean(axis=(-2, -1), keepdims=True)
    field /= field.std(axis=(-2, -1), keepdims=True) + 1e-12
    return field.astype(np.float32)


def _axis_weights(n_src: int, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left neighbour index and weight of linear interpolation at ``coords`` (source px)."""
    coords = np.clip(coords, 0.0, n_src - 1.0)
    left = np.minimum(np.floor(coords).astype(np.intp), max(n_src - 2, 0))
    weight = (coords - left).astype(np.float32)
    return left, weight


def bilinear_grid(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``grid`` (C, h, w) on the outer product of source coordinates -> (C, R, Q)."""
    i0, wy = _axis_weights(grid.shape[1], rows)
    j0, wx = _axis_weights(grid.shape[2], cols)
    i1 = np.minimum(i0 + 1, grid.shape[1] - 1)
    j1 = np.minimum(j0 + 1, grid.shape[2] - 1)
    by_row = grid[:, i0, :] * (1.0 - wy)[None, :, None] + grid[:, i1, :] * wy[None, :, None]
    return by_row[:, :, j0] * (1.0 - wx) + by_row[:, :, j1] * wx


def bilinear_points(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``grid`` (C, h, w) at paired source coordinates -> (C, N)."""
    i0, wy = _axis_weights(grid.shape[1], rows)
    j0, wx = _axis_weights(grid.shape[2], cols)
    i1 = np.minimum(i0 + 1, grid.shape[1] - 1)
    j1 = np.minimum(j0 + 1, grid.shape[2] - 1)
    top = grid[:, i0, j0] * (1.0 - wx) + grid[:, i0, j1] * wx
    bottom = grid[:, i1, j0] * (1.0 - wx) + grid[:, i1, j1] * wx
    return top * (1.0 - wy) + bottom * wy
