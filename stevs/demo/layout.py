"""Tissue and layout synthesis of the demo: the slide scene and its Visium spot grid.

A :class:`SlideScene` holds everything random about one slide before rendering (tissue
composition field, textures, nuclei, stain); a :class:`SpotGrid` is the slide's Visium grid
and :func:`spot_truth` what lies under each spot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stevs.demo.constants import (
    COMP_UM_PER_PX,
    E_OD_REF,
    FAT_CELL_UM,
    FIBRE_SCALE_UM,
    FIBRE_SPACING_UM,
    FIBRE_WARP,
    GRID_MARGIN_UM,
    H_OD_REF,
    MIN_TYPE_SHARE,
    REGION_SCALE_UM,
    SOFTMAX_TEMPERATURE,
    SPOT_DIAMETER_UM,
    SPOT_PITCH_UM,
    TEX_UM_PER_PX,
    TISSUE_TYPES,
    TYPE_NAMES,
)
from stevs.demo.fields import bilinear_points, seeded_rng, smooth_noise
from stevs.geometry import disk_lattice, grid_indices, grid_offsets_um, grid_shape

# --------------------------------------------------------------------------- spot grid


@dataclass(frozen=True)
class SpotGrid:
    """Visium spot grid of one slide: all positions, in_tissue decided later."""

    barcodes: np.ndarray  # (n,) str
    array_row: np.ndarray  # (n,) int
    array_col: np.ndarray  # (n,) int
    x_um: np.ndarray  # (n,) spot centre
    y_um: np.ndarray


def _barcode_whitelist(seed: int, n: int) -> np.ndarray:
    """``n`` unique deterministic 16-mers with the ``-1`` suffix of Space Ranger."""
    rng = seeded_rng(seed, 2)
    codes = np.unique(rng.integers(0, 4**16, size=n + 64, dtype=np.uint64))
    codes = rng.permutation(codes)[:n]
    if codes.size < n:  # pragma: no cover - 2^32 space makes this astronomically rare
        raise RuntimeError("barcode collision")
    shifts = np.arange(30, -1, -2, dtype=np.uint64)
    digits = ((codes[:, None] >> shifts[None, :]) & np.uint64(3)).astype(np.intp)
    letters = np.array(list("ACGT"))[digits]
    return np.array(["".join(row) + "-1" for row in letters])


def make_spot_grid(seed: int, size_um: float, offset_um: tuple[float, float]) -> SpotGrid:
    """Hexagonal Visium grid covering the slide, shifted by ``offset_um`` (x, y) >= 0.

    Barcodes depend on (array_row, array_col) and the slide size only, as on real Visium
    slides, so slides of one demo share barcodes (unique within each slide).
    """
    extent_um = size_um - 2 * GRID_MARGIN_UM
    n_rows, n_cols = grid_shape("visium", SPOT_PITCH_UM, extent_um, extent_um)
    array_row, array_col = grid_indices("visium", n_rows, n_cols)
    # barcodes from a whitelist shared by every slide of the same size, like real Visium
    whitelist = _barcode_whitelist(seed, n_rows * n_cols)
    barcodes = whitelist[array_row * n_cols + array_col]
    dx_um, dy_um = grid_offsets_um("visium", SPOT_PITCH_UM, array_row, array_col)
    x_um = GRID_MARGIN_UM + offset_um[0] + dx_um
    y_um = GRID_MARGIN_UM + offset_um[1] + dy_um
    return SpotGrid(barcodes, array_row, array_col, x_um, y_um)


# --------------------------------------------------------------------------- slide scene


@dataclass
class SlideScene:
    """Everything random about one slide, before rendering."""

    slide_id: str
    patient: str
    size_um: float
    mpp: float
    composition: np.ndarray  # (5, h, w) float32
    comp_um: float
    texture: np.ndarray  # (3, ht, wt) float32: fibre warp, fibre gaps, tumour mottling
    fibre_angle: float  # main direction of the fibres' wave vector
    tex_um: float
    fat_jitter: np.ndarray  # (n, n, 2) float32 seed offsets of adipocytes in cell units
    fat_cell_um: float
    nuclei: dict[str, dict[str, np.ndarray]]  # per type: x_um, y_um, a_um, b_um, angle, dark
    stain_h: np.ndarray
    stain_e: np.ndarray
    stain_scale: tuple[float, float]
    white: np.ndarray  # (3,) glass brightness per channel
    depth_factor: float
    grid_offset_um: tuple[float, float]

    @property
    def size_px(self) -> int:
        """Side of the square level-0 image in pixels."""
        return int(round(self.size_um / self.mpp))


# nucleus shapes per type: density (1/µm²), semi-axis a (µm), aspect b/a, darkness H
_NUCLEI = {
    "tumour": dict(density=1 / 130, a=(4.0, 6.0), aspect=(0.7, 1.0), dark=(1.1, 1.6)),
    "stroma": dict(density=1 / 900, a=(5.0, 8.0), aspect=(0.2, 0.3), dark=(1.2, 1.6)),
    "fat": dict(density=1 / 4000, a=(4.0, 6.0), aspect=(0.25, 0.35), dark=(0.9, 1.2)),
    "immune": dict(density=1 / 55, a=(2.4, 3.2), aspect=(0.85, 1.0), dark=(1.6, 2.0)),
}


def _draw_composition(rng: np.random.Generator, size_um: float) -> tuple[np.ndarray, float]:
    """(composition (5, h, w) float32, µm per pixel): smooth logits, low-temperature softmax."""
    n_types = len(TISSUE_TYPES)
    n_comp = max(8, int(math.ceil(size_um / COMP_UM_PER_PX)))
    comp_um = size_um / n_comp
    logits = smooth_noise(rng, (n_types, n_comp, n_comp), REGION_SCALE_UM / comp_um)
    logits = logits.astype(np.float64) / SOFTMAX_TEMPERATURE
    # tissue: an ellipse with a wobbly outline
    centre = (np.arange(n_comp) + 0.5) / n_comp - 0.5
    yy, xx = np.meshgrid(centre, centre, indexing="ij")
    half_axes = rng.uniform(0.36, 0.45, 2)
    radius = np.sqrt((xx / half_axes[0]) ** 2 + (yy / half_axes[1]) ** 2)
    wobble = smooth_noise(rng, (n_comp, n_comp), n_comp / 10)
    tissue = 1.0 / (1.0 + np.exp(-(1.0 + 0.18 * wobble - radius) / 0.01))
    # per-slide type shares drawn around 1/4, never below MIN_TYPE_SHARE, so every type
    # shows up on every slide; the logit offsets that reach them are found by iteration
    target = MIN_TYPE_SHARE + (1 - n_types * MIN_TYPE_SHARE) * rng.dirichlet([3.0] * n_types)
    for _ in range(10):
        soft = np.exp(logits - logits.max(axis=0, keepdims=True))
        soft /= soft.sum(axis=0, keepdims=True)
        share = (soft * tissue).sum(axis=(1, 2)) / tissue.sum()
        logits += np.log(target / np.maximum(share, 1e-9))[:, None, None]
    soft = np.exp(logits - logits.max(axis=0, keepdims=True))
    soft /= soft.sum(axis=0, keepdims=True)
    composition = np.concatenate([soft * tissue, (1.0 - tissue)[None]]).astype(np.float32)
    return composition, comp_um


def _draw_texture(rng: np.random.Generator, size_um: float) -> tuple[np.ndarray, float, float]:
    """(texture (3, n, n): fibre waviness, fibre gaps, tumour mottling; fibre angle; µm/px)."""
    n_tex = max(8, int(math.ceil(size_um / TEX_UM_PER_PX)))
    tex_um = size_um / n_tex
    fibre = smooth_noise(rng, (n_tex, n_tex), FIBRE_SCALE_UM / tex_um)
    fibre_angle = float(rng.uniform(0.0, math.pi))
    gaps = smooth_noise(rng, (n_tex, n_tex), 12.0 / tex_um)
    mottle = smooth_noise(rng, (n_tex, n_tex), 6.0 / tex_um)
    return np.stack([fibre, gaps, mottle]), fibre_angle, tex_um


def _draw_nuclei(
    rng: np.random.Generator,
    size_um: float,
    composition: np.ndarray,
    comp_um: float,
    fibre: np.ndarray,
    fibre_angle: float,
    tex_um: float,
) -> dict[str, dict[str, np.ndarray]]:
    """Nuclei per tissue type: Poisson points thinned by the type's composition, sorted by y."""
    n_tex = fibre.shape[0]
    grad_y, grad_x = np.gradient(fibre * FIBRE_WARP / tex_um)  # warp part of the phase gradient
    nuclei: dict[str, dict[str, np.ndarray]] = {}
    for k, tissue_type in enumerate(TISSUE_TYPES):
        spec = _NUCLEI[tissue_type]
        n = rng.poisson(spec["density"] * size_um**2)
        x = rng.uniform(0.0, size_um, n)
        y = rng.uniform(0.0, size_um, n)
        accept = rng.uniform(0.0, 1.0, n)
        a = rng.uniform(*spec["a"], n)
        b = a * rng.uniform(*spec["aspect"], n)
        angle = rng.uniform(0.0, math.pi, n)
        dark = rng.uniform(*spec["dark"], n)
        share = bilinear_points(composition[k : k + 1], y / comp_um - 0.5, x / comp_um - 0.5)[0]
        keep = accept < share
        if tissue_type == "stroma":  # spindles lie along the fibres, across the phase gradient
            ti = np.clip((y / tex_um).astype(np.intp), 0, n_tex - 1)
            tj = np.clip((x / tex_um).astype(np.intp), 0, n_tex - 1)
            wave = 2 * math.pi / FIBRE_SPACING_UM
            phase_x = wave * math.cos(fibre_angle) + grad_x[ti, tj]
            phase_y = wave * math.sin(fibre_angle) + grad_y[ti, tj]
            angle = np.arctan2(phase_y, phase_x) + math.pi / 2
        order = np.argsort(y[keep], kind="stable")
        nuclei[tissue_type] = {
            name: values[keep][order].astype(np.float32)
            for name, values in dict(x=x, y=y, a=a, b=b, angle=angle, dark=dark).items()
        }
    return nuclei


def _draw_stain(
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], np.ndarray]:
    """Per-slide stain shift: (H vector, E vector, (H, E) scale, glass white per channel)."""

    def _perturb(vector: np.ndarray) -> np.ndarray:
        shifted = np.clip(vector + rng.normal(0.0, 0.04, 3), 0.05, None)
        return shifted / np.linalg.norm(shifted)

    stain_h, stain_e = _perturb(H_OD_REF), _perturb(E_OD_REF)
    stain_scale = (float(np.exp(rng.normal(0.0, 0.12))), float(np.exp(rng.normal(0.0, 0.12))))
    white = np.clip(rng.uniform(238.0, 250.0) + rng.normal(0.0, 2.0, 3), 225.0, 255.0)
    return stain_h, stain_e, stain_scale, white


def make_scene(
    seed: int, key: int, slide_id: str, patient: str, size_um: float, mpp: float
) -> SlideScene:
    """Draw the composition, textures, nuclei and stain of one slide."""
    rng = seeded_rng(seed, 100, key)
    composition, comp_um = _draw_composition(rng, size_um)
    texture, fibre_angle, tex_um = _draw_texture(rng, size_um)
    n_cells = int(math.ceil(size_um / FAT_CELL_UM)) + 2
    fat_jitter = rng.uniform(0.1, 0.9, (n_cells, n_cells, 2)).astype(np.float32)
    nuclei = _draw_nuclei(rng, size_um, composition, comp_um, texture[0], fibre_angle, tex_um)
    # per-slide stain shift, brightness and depth
    stain_h, stain_e, stain_scale, white = _draw_stain(rng)
    depth_factor = float(np.exp(rng.normal(0.0, 0.3)))
    grid_offset = (float(rng.uniform(0.0, 25.0)), float(rng.uniform(0.0, 25.0)))
    return SlideScene(
        slide_id=slide_id,
        patient=patient,
        size_um=size_um,
        mpp=mpp,
        composition=composition,
        comp_um=comp_um,
        texture=texture,
        fibre_angle=fibre_angle,
        tex_um=tex_um,
        fat_jitter=fat_jitter,
        fat_cell_um=FAT_CELL_UM,
        nuclei=nuclei,
        stain_h=stain_h,
        stain_e=stain_e,
        stain_scale=stain_scale,
        white=white,
        depth_factor=depth_factor,
        grid_offset_um=grid_offset,
    )


# --------------------------------------------------------------------------- spot truth


@dataclass(frozen=True)
class SpotTruth:
    """Spots of a slide's grid with what lies under them."""

    in_tissue: np.ndarray  # (n_grid,) bool
    composition: np.ndarray  # (n_grid, 5)
    tissue_fraction: np.ndarray  # (n_grid,)


def spot_truth(scene: SlideScene, grid: SpotGrid) -> SpotTruth:
    """Average the composition over each spot disk (of the rounded pixel centre)."""
    x_um = (np.rint(grid.x_um / scene.mpp)) * scene.mpp
    y_um = (np.rint(grid.y_um / scene.mpp)) * scene.mpp
    offsets = disk_lattice(SPOT_DIAMETER_UM / 2, 2.5)  # lattice points 2.5 µm apart
    xs = (x_um[:, None] + offsets[None, :, 0]).ravel() / scene.comp_um - 0.5
    ys = (y_um[:, None] + offsets[None, :, 1]).ravel() / scene.comp_um - 0.5
    samples = bilinear_points(scene.composition, ys, xs).reshape(len(TYPE_NAMES), x_um.size, -1)
    composition = samples.mean(axis=2).T
    tissue_fraction = 1.0 - composition[:, -1]
    return SpotTruth(tissue_fraction >= 0.5, composition, tissue_fraction)
