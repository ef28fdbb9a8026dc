"""H&E image rendering of the demo and its pyramidal TIFF.

:func:`render_slide` turns a :class:`~stevs.demo.layout.SlideScene` into the level-0 RGB
image (Beer-Lambert mix of haematoxylin and eosin, strip by strip);
:func:`write_pyramidal_tiff` saves its :func:`pyramid_levels` as a tiled RGB-JPEG TIFF.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stevs import __version__
from stevs.atomic import atomic_path
from stevs.demo.constants import (
    FIBRE_SPACING_UM,
    FIBRE_WARP,
    JPEG_QUALITY,
    PYRAMID_MIN_SIDE,
    STRIP_ROWS,
    TIFF_TILE,
)
from stevs.demo.fields import bilinear_grid, seeded_rng
from stevs.demo.layout import SlideScene


def _fat_membranes(scene: SlideScene, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Adipocyte outlines: Worley F2 - F1 distance on a jittered grid, thin where small."""
    s = scene.fat_cell_um
    n = scene.fat_jitter.shape[0]
    cx = np.floor(x_um / s).astype(np.intp)
    cy = np.floor(y_um / s).astype(np.intp)
    cell_x, cell_y = cx.astype(np.float32), cy.astype(np.float32)
    x_um = x_um.astype(np.float32)
    y_um = y_um.astype(np.float32)
    nearest = np.full(x_um.size, np.inf, dtype=np.float32)
    second = np.full(x_um.size, np.inf, dtype=np.float32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            ci = np.clip(cy + di, 0, n - 1)
            cj = np.clip(cx + dj, 0, n - 1)
            jitter = scene.fat_jitter[ci, cj]
            sx = (cell_x + np.float32(dj) + jitter[:, 0]) * np.float32(s)
            sy = (cell_y + np.float32(di) + jitter[:, 1]) * np.float32(s)
            d2 = (x_um - sx) ** 2 + (y_um - sy) ** 2
            np.minimum(second, np.maximum(nearest, d2), out=second)
            np.minimum(nearest, d2, out=nearest)
    gap = np.sqrt(second) - np.sqrt(nearest)
    return np.exp(-((gap / 2.0) ** 2))


def _stamp_nuclei(scene: SlideScene, r0: int, r1: int, width: int) -> tuple[np.ndarray, ...]:
    """Nucleus coverage and haematoxylin of rows [r0, r1) as flat (rows*width,) arrays."""
    mpp = scene.mpp
    n_px = (r1 - r0) * width
    coverage = np.zeros(n_px)
    darkness = np.zeros(n_px)
    for nuclei in scene.nuclei.values():
        if nuclei["x"].size == 0:
            continue
        half = int(math.ceil(float(nuclei["a"].max()) / mpp)) + 1
        lo = np.searchsorted(nuclei["y"], (r0 - half) * mpp)
        hi = np.searchsorted(nuclei["y"], (r1 + half) * mpp)
        if hi <= lo:
            continue
        sel = {name: values[lo:hi] for name, values in nuclei.items()}
        cx, cy = sel["x"] / mpp, sel["y"] / mpp  # continuous px (pixel i spans [i, i+1))
        offsets = np.arange(-half, half + 1)
        px = np.floor(cx).astype(np.intp)[:, None, None] + offsets[None, None, :]
        py = np.floor(cy).astype(np.intp)[:, None, None] + offsets[None, :, None]
        du = (px + 0.5 - cx[:, None, None]) * mpp
        dv = (py + 0.5 - cy[:, None, None]) * mpp
        cos, sin = np.cos(sel["angle"])[:, None, None], np.sin(sel["angle"])[:, None, None]
        u = du * cos + dv * sin
        v = -du * sin + dv * cos
        a, b = sel["a"][:, None, None], sel["b"][:, None, None]
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        value = np.clip((1.0 - rho) * (b / mpp) + 0.5, 0.0, 1.0)
        valid = (value > 0) & (py >= r0) & (py < r1) & (px >= 0) & (px < width)
        flat = ((py - r0) * width + px)[valid]
        value_valid = value[valid]
        coverage += np.bincount(flat, weights=value_valid, minlength=n_px)
        dark = np.broadcast_to(sel["dark"][:, None, None], value.shape)[valid]
        darkness += np.bincount(flat, weights=value_valid * dark, minlength=n_px)
    scale = np.maximum(coverage, 1.0)
    return (coverage / scale).astype(np.float32), (darkness / scale).astype(np.float32)


def _render_strip(scene: SlideScene, r0: int, r1: int, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 rows [r0, r1) of level 0."""
    width = scene.size_px
    mpp = scene.mpp
    ys = (np.arange(r0, r1) + 0.5) * mpp
    xs = (np.arange(width) + 0.5) * mpp
    comp = bilinear_grid(scene.composition, ys / scene.comp_um - 0.5, xs / scene.comp_um - 0.5)
    fibre, gaps, mottle = bilinear_grid(
        scene.texture, ys / scene.tex_um - 0.5, xs / scene.tex_um - 0.5
    )
    tumour, stroma, fat, immune, _background = comp

    wave = 2 * math.pi / FIBRE_SPACING_UM
    along = np.float32(wave * math.cos(scene.fibre_angle)) * xs[None, :].astype(np.float32)
    along = along + np.float32(wave * math.sin(scene.fibre_angle)) * ys[:, None].astype(np.float32)
    phase = along + np.float32(FIBRE_WARP) * fibre
    fibres = (0.5 + 0.5 * np.sin(phase)) ** 2 / (1.0 + np.exp(-3.0 * (gaps + 0.3)))
    membranes = np.zeros_like(fat)
    fat_px = fat > 0.01
    if fat_px.any():
        rows, cols = np.nonzero(fat_px)
        membranes[fat_px] = _fat_membranes(scene, xs[cols], ys[rows])

    haem = tumour * (0.30 + 0.08 * mottle) + stroma * 0.06 + fat * 0.05 * membranes
    haem += immune * 0.25
    eosin = tumour * (0.45 + 0.10 * mottle) + stroma * (0.28 + 0.85 * fibres)
    eosin += fat * (0.02 + 0.55 * membranes) + immune * 0.22

    coverage, darkness = _stamp_nuclei(scene, r0, r1, width)
    coverage = coverage.reshape(haem.shape)
    darkness = darkness.reshape(haem.shape)
    haem = haem * (1.0 - coverage) + darkness
    eosin = eosin * (1.0 - 0.7 * coverage) + 0.08 * coverage

    grain = rng.standard_normal((2, *haem.shape), dtype=np.float32)
    haem *= 1.0 + 0.12 * grain[0]
    eosin *= 1.0 + 0.12 * grain[1]
    glass = 0.012 + 0.006 * grain[0]
    h_scale, e_scale = scene.stain_scale
    out = np.empty((*haem.shape, 3), dtype=np.uint8)
    for c in range(3):  # python floats keep the arithmetic in float32
        h_od, e_od = float(h_scale * scene.stain_h[c]), float(e_scale * scene.stain_e[c])
        channel = float(scene.white[c]) * np.exp(-(haem * h_od + eosin * e_od + glass))
        out[..., c] = np.clip(np.rint(channel), 0, 255).astype(np.uint8)
    return out


def render_slide(scene: SlideScene, seed: int, key: int) -> np.ndarray:
    """The level-0 RGB image of a scene, rendered strip by strip."""
    size = scene.size_px
    image = np.empty((size, size, 3), dtype=np.uint8)
    for strip, r0 in enumerate(range(0, size, STRIP_ROWS)):
        r1 = min(size, r0 + STRIP_ROWS)
        image[r0:r1] = _render_strip(scene, r0, r1, seeded_rng(seed, 200, key, strip))
    return image


def _downsample2(image: np.ndarray) -> np.ndarray:
    """Halve an (H, W, 3) uint8 image by 2x2 box averaging (edge-padded when odd)."""
    pad_h, pad_w = image.shape[0] % 2, image.shape[1] % 2
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    h, w = image.shape[0] // 2, image.shape[1] // 2
    summed = image.reshape(h, 2, w, 2, 3).sum(axis=(1, 3), dtype=np.uint16)
    return ((summed + 2) // 4).astype(np.uint8)


def pyramid_levels(image: np.ndarray) -> list[np.ndarray]:
    """Level 0 and its 2x reductions until the longer side is below ``PYRAMID_MIN_SIDE``."""
    levels = [image]
    while max(levels[-1].shape[:2]) >= PYRAMID_MIN_SIDE:
        levels.append(_downsample2(levels[-1]))
    return levels


def write_pyramidal_tiff(path: Path, levels: list[np.ndarray], mpp: float) -> None:
    """Tiled RGB-JPEG pyramid OpenSlide reads as generic TIFF, with mpp from the tags."""
    import tifffile

    height0 = levels[0].shape[0]
    bigtiff = sum(level.nbytes for level in levels) > 2**31
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for index, level in enumerate(levels):
            level_mpp = mpp * height0 / level.shape[0]
            tif.write(
                level,
                tile=(TIFF_TILE, TIFF_TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": JPEG_QUALITY, "outcolorspace": "RGB"},
                subsampling=(1, 1),
                subfiletype=0 if index == 0 else 1,
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                resolutionunit="CENTIMETER",
                software=f"stevs {__version__} demo",
                metadata=None,
            )
