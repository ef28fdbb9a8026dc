"""Hand-made colour and texture features of H&E patches: the ``ridge_color`` probe's input.

RGB and HSV statistics, Ruifrok-Johnston H&E stain concentrations, gradient magnitude and
grey-level local variance at two scales. No deep model at all: the floor any deep model must
clear.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import color

#: Ruifrok & Johnston (2001) stain OD vectors, rows haematoxylin, eosin, DAB (as in skimage)
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True))


def _hsv_planes(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
    """Hue, saturation, value in [0, 1] from same-shaped R, G, B planes in [0, 1].

    Hand-written, branch-free (``np.where``) instead of ``skimage.color.rgb2hsv``, which
    gives the same values (max abs diff 6e-8 on 2000 H&E-like 64x64 float32 patches) but
    fills the hue through three boolean-mask gathers. Measured on 2000 x 64x64 patches (2
    shared CPU cores, median of 7 interleaved runs): HSV alone 0.62 s here vs 2.49 s in
    skimage; the whole :func:`color_texture_features` 1.59 s with the old hand-written
    kernels, 2.05 s (1.29x) with skimage's stain separation (used), 2.65 s (1.67x) with
    skimage's HSV as well: beyond the 1.5x the project allows for a library replacement.
    """
    v = np.maximum(np.maximum(r, g), b)
    c = v - np.minimum(np.minimum(r, g), b)
    s = np.divide(c, v, out=np.zeros_like(v), where=v > 0)
    safe_c = np.where(c > 0, c, 1.0)
    h = np.where(
        v == r,
        ((g - b) / safe_c) % 6.0,
        np.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0),
    )
    return np.where(c > 0, h / 6.0, 0.0), s, v


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (..., 3) -> HSV in [0, 1] (..., 3), as ``skimage.color.rgb2hsv``."""
    return np.stack(_hsv_planes(rgb[..., 0], rgb[..., 1], rgb[..., 2]), axis=-1)


#: ``separate_stains`` computes ``log(rgb) / log(1e-6) @ M`` = ``-log10(rgb) / 6 @ M``;
#: scaling the matrix by 6 gives optical densities ``-log10(rgb)`` times the stain matrix
_SEPARATE_STAINS_SCALE = -np.log(1e-6) / np.log(10.0)


def stain_concentrations(patches: np.ndarray, *, channel_axis: int = -1) -> np.ndarray:
    """uint8 RGB -> haematoxylin, eosin, DAB optical-density concentrations (float32).

    Ruifrok-Johnston colour deconvolution with ``skimage.color.separate_stains`` and the
    unit-norm stain vectors :data:`HED_FROM_RGB`, on intensities ``(I + 1) / 256`` (so that
    black is finite and white is exactly 0): the optical density is ``-log10((I + 1) / 256)``.
    ``skimage.color.rgb2hed`` itself uses un-normalised stain vectors and ``I / 255`` clipped
    at 1e-6, which are other features (max abs diff 2.6 OD on H&E-like patches).
    """
    patches = np.asarray(patches)
    intensity = (patches.astype(np.float32) + np.float32(1.0)) * np.float32(1 / 256)
    matrix = (HED_FROM_RGB * _SEPARATE_STAINS_SCALE).astype(np.float32)
    stains = color.separate_stains(intensity, matrix, channel_axis=channel_axis)
    return stains.astype(np.float32, copy=False)  # skimage promotes to float64


def _mean_std(values: np.ndarray) -> list[np.ndarray]:
    """Mean and std over the last axis."""
    mean = values.mean(axis=-1)
    return [mean, np.sqrt(np.maximum((values * values).mean(axis=-1) - mean**2, 0.0))]


def _color_texture_batch(patches: np.ndarray, bins: int) -> np.ndarray:
    """Features of a batch of uint8 patches (B, H, W, 3) -> (B, F) float32.

    Works on channel-first planes (B, 3, H*W) so that every reduction runs over contiguous
    memory; 90th percentiles are estimated on every 4th pixel.
    """
    n, height, width, _ = patches.shape
    planes = np.ascontiguousarray(patches.reshape(n, -1, 3).transpose(0, 2, 1))  # (n, 3, P)
    rgb = planes.astype(np.float32) * np.float32(1 / 255)
    parts = _mean_std(rgb)
    bin_of = (np.arange(256) * bins // 256).astype(np.int64)
    offsets = (np.arange(n * 3, dtype=np.int64) * bins).reshape(n, 3, 1)
    counts = np.bincount((bin_of[planes] + offsets).ravel(), minlength=n * 3 * bins)
    parts.append(counts.reshape(n, 3 * bins) / planes.shape[-1])
    hue, sat, val = _hsv_planes(rgb[:, 0], rgb[:, 1], rgb[:, 2])
    angle = np.float32(2 * np.pi) * hue
    parts += [np.cos(angle).mean(axis=-1), np.sin(angle).mean(axis=-1)]
    parts += _mean_std(sat) + _mean_std(val)
    # H and E planes (n, 2, P), made contiguous: skimage returns a channel-moved view
    hed = np.ascontiguousarray(stain_concentrations(planes, channel_axis=1)[:, :2])
    parts += _mean_std(hed) + [np.percentile(hed[..., ::4], 90, axis=-1)]
    grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).reshape(n, height, width)
    gy, gx = np.gradient(grey, axis=(1, 2))
    magnitude = np.sqrt(gx**2 + gy**2).reshape(n, -1)
    parts += _mean_std(magnitude) + [np.percentile(magnitude[:, ::4], 90, axis=-1)]
    for size in (3, 9):
        local_mean = ndimage.uniform_filter(grey, size=(1, size, size), mode="reflect")
        local_sq = ndimage.uniform_filter(grey**2, size=(1, size, size), mode="reflect")
        local_std = np.sqrt(np.maximum(local_sq - local_mean**2, 0.0)).reshape(n, -1)
        parts += _mean_std(local_std)
    return np.concatenate([np.asarray(p, dtype=np.float32).reshape(n, -1) for p in parts], axis=1)


def color_texture_features(
    patches: np.ndarray, *, bins: int = 8, batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """Hand-made colour and texture features of uint8 RGB patches (N, H, W, 3) -> (N, F).

    Per patch: RGB mean and std, an RGB histogram with ``bins`` bins per channel, HSV hue
    (circular mean as cos/sin), saturation and value mean and std, H and E stain
    concentration mean, std and 90th percentile (Ruifrok-Johnston deconvolution), grey-level
    gradient magnitude mean, std and 90th percentile, and the mean and std of the grey-level
    local standard deviation in 3x3 and 9x9 windows.
    """
    from tqdm.auto import tqdm

    patches = np.asarray(patches)
    if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 patches (N, H, W, 3), got {patches.dtype} {patches.shape}"
        )
    starts = range(0, len(patches), batch_size)
    chunks = [
        _color_texture_batch(patches[s : s + batch_size], bins)
        for s in tqdm(starts, desc="colour/texture features", unit="batch", disable=not progress)
    ]
    if not chunks:
        return np.zeros((0, n_color_texture_features(bins)), dtype=np.float32)
    return np.concatenate(chunks)


def n_color_texture_features(bins: int = 8) -> int:
    """Length of a :func:`color_texture_features` row."""
    return 6 + 3 * bins + 6 + 6 + 3 + 4
