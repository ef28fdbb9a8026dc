"""Synthetic H&E slides with known spatial expression, for the demo and the tests.

``make_demo(out_dir)`` (or ``stevs demo --out DIR``) writes a small, fully synthetic
Visium study whose ground truth is known:

- a hidden tissue-composition field per slide (``tumour``, ``stroma``, ``fat``, ``immune``
  and ``background`` glass outside an irregular tissue outline), made of smooth random
  fields pushed through a low-temperature softmax so regions are fairly pure;
- an H&E rendering of that field (Beer-Lambert mix of haematoxylin and eosin with a
  per-slide stain shift): dense large nuclei for tumour, wavy eosin fibres with sparse
  spindle nuclei for stroma, white adipocytes with thin pink membranes for fat, small dark
  round nuclei packed tight for immune infiltrates; saved as a pyramidal tiled TIFF
  (RGB JPEG tiles, reduced levels as ``subfiletype=1`` pages of the main chain, resolution
  in centimetres) that OpenSlide opens with its microns per pixel;
- a Space Ranger-style ``outs/`` folder on the Visium geometry (55 µm spots on a 100 µm
  hexagonal pitch) with a 10x HDF5 v3 count matrix of the in-tissue spots, whose counts are
  negative binomial draws around a log-mean that follows the spot's tissue composition;
- ground truth per slide in ``truth/{slide}.npz`` (see :data:`TRUTH_KEYS`), an H&E-only
  slide ``demo_heonly`` with ``predict.tsv``, and the sample sheet ``samples.tsv``, which
  is written last so an interrupted run never looks complete.

Everything is a deterministic function of the seed: rerunning gives the same bytes, and
slide ``demo_i`` does not depend on how many slides were asked for.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from stevs import __version__
from stevs.atomic import atomic_path
from stevs.errors import StevsInputError
from stevs.geometry import (
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    disk_lattice,
    grid_indices,
    grid_offsets_um,
    grid_shape,
    grid_steps_um,
)
from stevs.io.visium_uns import FIDUCIAL_TO_SPOT, HIRES_MAX_SIDE, LOWRES_MAX_SIDE

logger = logging.getLogger(__name__)

#: tissue types that carry gene effects, in the order of the truth arrays
TISSUE_TYPES: tuple[str, ...] = ("tumour", "stroma", "fat", "immune")
#: all composition channels; ``background`` is glass outside the tissue outline
TYPE_NAMES: tuple[str, ...] = (*TISSUE_TYPES, "background")

SPOT_DIAMETER_UM = VISIUM_SPOT_UM
SPOT_PITCH_UM = VISIUM_PITCH_UM
ROW_STEP_UM = grid_steps_um("visium", SPOT_PITCH_UM)[0]
GRID_MARGIN_UM = 100.0
TIFF_TILE = 256
PYRAMID_MIN_SIDE = 512
JPEG_QUALITY = 90

COMP_UM_PER_PX = 10.0  # resolution of the stored composition field
TEX_UM_PER_PX = 4.0  # resolution of the smooth texture fields
REGION_SCALE_UM = 150.0  # blur of the composition noise
SOFTMAX_TEMPERATURE = 0.25
MIN_TYPE_SHARE = 0.12  # smallest share of the tissue a type gets on a slide
STRIP_ROWS = 512

N_MARKERS_PER_TYPE = 5
MITO_GENES = ("MT-CO1", "MT-CO2", "MT-CO3", "MT-ND1", "MT-ATP6")
RIBO_GENES = ("RPL3", "RPL4", "RPL13", "RPS3", "RPS6", "RPS18")
MIN_GENES = len(TISSUE_TYPES) * N_MARKERS_PER_TYPE + len(MITO_GENES) + len(RIBO_GENES) + 10
DEFAULT_N_GENES = 120
LIBRARY_SCALE = 8.0
MARKER_BASELINE = 0.5  # log-mean of a marker outside its type
PATIENTS = ("P1", "P2")
HEONLY_ID = "demo_heonly"
HEONLY_KEY = 10_000  # seed key of the H&E-only slide, apart from demo_1..demo_N
OLD_POSITIONS_SLIDE = 2  # demo_2 gets the header-less Space Ranger 1.x positions file

# Macenko's reference optical-density vectors of haematoxylin and eosin
H_OD_REF = np.array([0.5626, 0.7201, 0.4062])
E_OD_REF = np.array([0.2159, 0.8012, 0.5581])

#: keys of ``truth/{slide}.npz`` and what they hold
TRUTH_KEYS: dict[str, str] = {
    "slide_id": "slide id (0-d str)",
    "patient": "patient id (0-d str)",
    "mpp": "µm per level-0 pixel of the TIFF",
    "size_px": "(width, height) of level 0",
    "type_names": "(5,) composition channel names, background last",
    "composition": "(5, h, w) float32 composition field, channels sum to 1",
    "composition_um_per_px": "µm per pixel of the composition field (pixel centres at (i+0.5)*um)",
    "gene_names": "(G,) gene symbols, same order as the count matrix",
    "gene_baseline": "(G,) log-mean baseline of this slide's patient",
    "gene_effects": "(G, 4) log-mean effect per tissue type (patient-shifted)",
    "gene_dispersion": "(G,) negative binomial dispersion phi (var = mu + phi mu^2)",
    "depth_factor": "per-slide sequencing depth factor",
    "spot_barcodes": "(n,) in-tissue barcodes, same order as the count matrix",
    "spot_xy_px": "(n, 2) spot centres in level-0 px, (x, y)",
    "spot_array_row": "(n,) Visium array row",
    "spot_array_col": "(n,) Visium array col",
    "spot_composition": "(n, 5) composition averaged over the 55 µm spot disk",
    "spot_tissue_fraction": "(n,) fraction of the spot disk on tissue",
    "spot_size_factor": "(n,) library size multiplier (depth x spot size x tissue fraction)",
    "spot_log_rate": "(n, G) baseline + sum_k tissue-normalised comp_k * effect_gk",
    "spot_expected_counts": "(n, G) noise-free expected counts exp(log_rate) * size_factor",
    "stain_h": "(3,) haematoxylin OD vector of this slide",
    "stain_e": "(3,) eosin OD vector of this slide",
}


# --------------------------------------------------------------------------- helpers


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream for (seed, key...)."""
    return np.random.default_rng([seed, *key])


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so reruns give the same bytes."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue())


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
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


def _bilinear_grid(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``grid`` (C, h, w) on the outer product of source coordinates -> (C, R, Q)."""
    i0, wy = _axis_weights(grid.shape[1], rows)
    j0, wx = _axis_weights(grid.shape[2], cols)
    i1 = np.minimum(i0 + 1, grid.shape[1] - 1)
    j1 = np.minimum(j0 + 1, grid.shape[2] - 1)
    by_row = grid[:, i0, :] * (1.0 - wy)[None, :, None] + grid[:, i1, :] * wy[None, :, None]
    return by_row[:, :, j0] * (1.0 - wx) + by_row[:, :, j1] * wx


def _bilinear_points(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``grid`` (C, h, w) at paired source coordinates -> (C, N)."""
    i0, wy = _axis_weights(grid.shape[1], rows)
    j0, wx = _axis_weights(grid.shape[2], cols)
    i1 = np.minimum(i0 + 1, grid.shape[1] - 1)
    j1 = np.minimum(j0 + 1, grid.shape[2] - 1)
    top = grid[:, i0, j0] * (1.0 - wx) + grid[:, i0, j1] * wx
    bottom = grid[:, i1, j0] * (1.0 - wx) + grid[:, i1, j1] * wx
    return top * (1.0 - wy) + bottom * wy


def _downsample2(image: np.ndarray) -> np.ndarray:
    """Halve an (H, W, 3) uint8 image by 2x2 box averaging (edge-padded when odd)."""
    pad_h, pad_w = image.shape[0] % 2, image.shape[1] % 2
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    h, w = image.shape[0] // 2, image.shape[1] // 2
    summed = image.reshape(h, 2, w, 2, 3).sum(axis=(1, 3), dtype=np.uint16)
    return ((summed + 2) // 4).astype(np.uint8)


# --------------------------------------------------------------------------- genes


@dataclass(frozen=True)
class GeneModel:
    """Log-linear gene model shared by all slides; patients shift it a little."""

    names: tuple[str, ...]
    baseline: np.ndarray  # (G,)
    effects: np.ndarray  # (G, 4)
    dispersion: np.ndarray  # (G,)
    patient_baseline_shift: dict[str, np.ndarray]
    patient_effect_shift: dict[str, np.ndarray]

    def for_patient(self, patient: str) -> tuple[np.ndarray, np.ndarray]:
        """(baseline, effects) of one patient."""
        return (
            self.baseline + self.patient_baseline_shift[patient],
            self.effects + self.patient_effect_shift[patient],
        )


def make_gene_model(seed: int, n_genes: int = DEFAULT_N_GENES) -> GeneModel:
    """Markers per tissue type, weak/noise genes, sparse genes, mitochondrial and ribosomal."""
    rng = _rng(seed, 1)
    n_types = len(TISSUE_TYPES)
    n_other = n_genes - n_types * N_MARKERS_PER_TYPE - len(MITO_GENES) - len(RIBO_GENES)
    n_sparse = max(3, n_other // 10)
    names: list[str] = []
    baseline = np.zeros(n_genes)
    effects = np.zeros((n_genes, n_types))
    g = 0
    for k, tissue in enumerate(TISSUE_TYPES):
        for i in range(1, N_MARKERS_PER_TYPE + 1):
            names.append(f"{tissue.upper()}_{i}")
            baseline[g] = rng.uniform(MARKER_BASELINE - 0.4, MARKER_BASELINE + 0.4)
            effects[g, k] = rng.uniform(2.2, 3.2)  # zero elsewhere: type-specific
            g += 1
    for i in range(1, n_other + 1):
        names.append(f"GENE_{i:03d}")
        if i > n_other - n_sparse:  # zero in most spots
            baseline[g] = rng.uniform(-4.5, -3.5)
        else:
            baseline[g] = rng.normal(0.3, 0.8)
        effects[g] = rng.normal(0.0, 0.35, n_types)
        g += 1
    for name in MITO_GENES:
        names.append(name)
        baseline[g] = rng.uniform(2.8, 3.6)
        effects[g] = rng.normal(0.0, 0.25, n_types)
        g += 1
    for name in RIBO_GENES:
        names.append(name)
        baseline[g] = rng.uniform(2.2, 3.0)
        effects[g] = rng.normal(0.0, 0.25, n_types)
        g += 1
    dispersion = np.exp(rng.normal(math.log(0.12), 0.4, n_genes))
    # patients rescale the effects by ~10% and shift the baselines a little
    baseline_shift = {p: rng.normal(0.0, 0.1, n_genes) for p in PATIENTS}
    effect_shift = {
        p: effects * (np.exp(rng.normal(0.0, 0.1, effects.shape)) - 1.0) for p in PATIENTS
    }
    return GeneModel(tuple(names), baseline, effects, dispersion, baseline_shift, effect_shift)


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
    rng = _rng(seed, 2)
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
FIBRE_SCALE_UM = 40.0  # smoothness of the fibres' waviness
FIBRE_SPACING_UM = 8.0
FIBRE_WARP = 2 * math.pi * 4  # phase amplitude of the waviness (radians)
FAT_CELL_UM = 70.0


def make_scene(
    seed: int, key: int, slide_id: str, patient: str, size_um: float, mpp: float
) -> SlideScene:
    """Draw the composition, textures, nuclei and stain of one slide."""
    rng = _rng(seed, 100, key)
    n_types = len(TISSUE_TYPES)
    # composition: smooth logits per type, low-temperature softmax
    n_comp = max(8, int(math.ceil(size_um / COMP_UM_PER_PX)))
    comp_um = size_um / n_comp
    logits = _smooth_noise(rng, (n_types, n_comp, n_comp), REGION_SCALE_UM / comp_um)
    logits = logits.astype(np.float64) / SOFTMAX_TEMPERATURE
    # tissue: an ellipse with a wobbly outline
    centre = (np.arange(n_comp) + 0.5) / n_comp - 0.5
    yy, xx = np.meshgrid(centre, centre, indexing="ij")
    half_axes = rng.uniform(0.36, 0.45, 2)
    radius = np.sqrt((xx / half_axes[0]) ** 2 + (yy / half_axes[1]) ** 2)
    wobble = _smooth_noise(rng, (n_comp, n_comp), n_comp / 10)
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

    # smooth texture fields: fibre waviness, fibre gaps, tumour mottling
    n_tex = max(8, int(math.ceil(size_um / TEX_UM_PER_PX)))
    tex_um = size_um / n_tex
    fibre = _smooth_noise(rng, (n_tex, n_tex), FIBRE_SCALE_UM / tex_um)
    fibre_angle = float(rng.uniform(0.0, math.pi))
    gaps = _smooth_noise(rng, (n_tex, n_tex), 12.0 / tex_um)
    mottle = _smooth_noise(rng, (n_tex, n_tex), 6.0 / tex_um)
    texture = np.stack([fibre, gaps, mottle])

    n_cells = int(math.ceil(size_um / FAT_CELL_UM)) + 2
    fat_jitter = rng.uniform(0.1, 0.9, (n_cells, n_cells, 2)).astype(np.float32)

    # nuclei: Poisson points thinned by the type's composition
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
        share = _bilinear_points(composition[k : k + 1], y / comp_um - 0.5, x / comp_um - 0.5)[0]
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

    # per-slide stain shift, brightness and depth
    def _perturb(vector: np.ndarray) -> np.ndarray:
        shifted = np.clip(vector + rng.normal(0.0, 0.04, 3), 0.05, None)
        return shifted / np.linalg.norm(shifted)

    stain_h, stain_e = _perturb(H_OD_REF), _perturb(E_OD_REF)
    stain_scale = (float(np.exp(rng.normal(0.0, 0.12))), float(np.exp(rng.normal(0.0, 0.12))))
    white = np.clip(rng.uniform(238.0, 250.0) + rng.normal(0.0, 2.0, 3), 225.0, 255.0)
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


# --------------------------------------------------------------------------- rendering


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
    comp = _bilinear_grid(scene.composition, ys / scene.comp_um - 0.5, xs / scene.comp_um - 0.5)
    fibre, gaps, mottle = _bilinear_grid(
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
        image[r0:r1] = _render_strip(scene, r0, r1, _rng(seed, 200, key, strip))
    return image


# --------------------------------------------------------------------------- writers


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


def _resized(levels: list[np.ndarray], max_side: int) -> tuple[np.ndarray, float]:
    """The whole image with its longer side at most ``max_side``, and its scale factor."""
    from PIL import Image

    full = max(levels[0].shape[:2])
    scale = min(1.0, max_side / full)
    target = (round(levels[0].shape[1] * scale), round(levels[0].shape[0] * scale))
    source = levels[0]
    for level in levels:  # the smallest level still at least as large as the target
        if level.shape[1] >= target[0] and level.shape[0] >= target[1]:
            source = level
    if source.shape[1::-1] == target:
        return source, scale
    resized = Image.fromarray(source).resize(target, Image.Resampling.LANCZOS)
    return np.asarray(resized), scale


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=3)


def write_10x_h5(
    path: Path, counts: np.ndarray, barcodes: np.ndarray, genes: tuple[str, ...], slide_id: str
) -> None:
    """A Cell Ranger / Space Ranger HDF5 v3 matrix (CSC genes x barcodes) of ``counts``."""
    import h5py

    n_spots, n_genes = counts.shape
    # CSC of the (genes x spots) matrix = CSR of (spots x genes)
    nonzero = counts != 0
    indptr = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]).astype(np.int64)
    indices = np.nonzero(nonzero)[1].astype(np.int64)
    data = counts[nonzero].astype(np.int32)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["software_version"] = f"stevs {__version__} demo"
        f.attrs["chemistry_description"] = "Visium Spatial Gene Expression (synthetic)"
        f.attrs["library_ids"] = np.array([slide_id.encode()])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        matrix = f.create_group("matrix")
        matrix.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        matrix.create_dataset("data", data=data, compression="gzip", compression_opts=4)
        matrix.create_dataset("indices", data=indices, compression="gzip", compression_opts=4)
        matrix.create_dataset("indptr", data=indptr)
        matrix.create_dataset("shape", data=np.array([n_genes, n_spots], dtype=np.int32))
        features = matrix.create_group("features")
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        ids = [f"STEVSDEMO{i:05d}".encode() for i in range(1, n_genes + 1)]
        features.create_dataset("id", data=np.array(ids))
        features.create_dataset("name", data=np.array([g.encode() for g in genes]))
        features.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n_genes))
        features.create_dataset("genome", data=np.array([b"synthetic"] * n_genes))


def write_tissue_positions(
    path: Path, grid: SpotGrid, in_tissue: np.ndarray, mpp: float, header: bool
) -> None:
    """Space Ranger positions: all grid spots, pixel row = y, pixel col = x (level-0 px)."""
    lines = []
    if header:
        lines.append("barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres")
    px_row = np.rint(grid.y_um / mpp).astype(int)
    px_col = np.rint(grid.x_um / mpp).astype(int)
    for i in range(grid.barcodes.size):
        lines.append(
            f"{grid.barcodes[i]},{int(in_tissue[i])},{grid.array_row[i]},{grid.array_col[i]},"
            f"{px_row[i]},{px_col[i]}"
        )
    _write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- one slide


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
    samples = _bilinear_points(scene.composition, ys, xs).reshape(len(TYPE_NAMES), x_um.size, -1)
    composition = samples.mean(axis=2).T
    tissue_fraction = 1.0 - composition[:, -1]
    return SpotTruth(tissue_fraction >= 0.5, composition, tissue_fraction)


def expected_expression(
    genes: GeneModel, patient: str, composition: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(log_rate (n, G), tissue fraction (n,)) of spots with composition (n, 5)."""
    baseline, effects = genes.for_patient(patient)
    tissue_fraction = 1.0 - composition[:, -1]
    tissue_share = composition[:, :-1] / np.maximum(tissue_fraction, 1e-6)[:, None]
    return baseline[None, :] + tissue_share @ effects.T, tissue_fraction


def _make_slide(
    out_dir: Path,
    seed: int,
    key: int,
    slide_id: str,
    patient: str,
    size_um: float,
    mpp: float,
    genes: GeneModel,
    with_expression: bool,
    header: bool,
) -> dict[str, str]:
    """Generate, render and write one slide; returns its sample-sheet fields."""
    started = time.perf_counter()
    scene = make_scene(seed, key, slide_id, patient, size_um, mpp)
    image = render_slide(scene, seed, key)
    rendered = time.perf_counter()
    levels = pyramid_levels(image)
    image_path = out_dir / f"{slide_id}.tif"
    write_pyramidal_tiff(image_path, levels, mpp)
    written = time.perf_counter()

    grid = make_spot_grid(seed, size_um, scene.grid_offset_um)
    truth = spot_truth(scene, grid)
    keep = truth.in_tissue
    log_rate, tissue_fraction = expected_expression(genes, patient, truth.composition[keep])
    rng = _rng(seed, 300, key)
    spot_size = np.exp(rng.normal(0.0, 0.35, int(keep.sum())))
    size_factor = LIBRARY_SCALE * scene.depth_factor * spot_size * tissue_fraction
    expected = np.exp(log_rate) * size_factor[:, None]
    baseline, effects = genes.for_patient(patient)
    spot_xy_px = np.stack([np.rint(grid.x_um / mpp), np.rint(grid.y_um / mpp)], axis=1)[keep]

    fields = {"slide_id": slide_id, "patient": patient, "image": image_path.name}
    if with_expression:
        phi = genes.dispersion[None, :]
        rate = rng.gamma(shape=1.0 / phi, scale=expected * phi)
        counts = rng.poisson(rate).astype(np.int32)
        outs = out_dir / slide_id / "outs"
        spatial = outs / "spatial"
        positions_name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
        write_tissue_positions(spatial / positions_name, grid, keep, mpp, header)
        hires, hires_scale = _resized(levels, HIRES_MAX_SIDE)
        lowres, lowres_scale = _resized(levels, LOWRES_MAX_SIDE)
        _write_png(spatial / "tissue_hires_image.png", hires)
        _write_png(spatial / "tissue_lowres_image.png", lowres)
        scalefactors = {
            "spot_diameter_fullres": SPOT_DIAMETER_UM / mpp,
            "tissue_hires_scalef": hires_scale,
            "fiducial_diameter_fullres": SPOT_DIAMETER_UM * FIDUCIAL_TO_SPOT / mpp,
            "tissue_lowres_scalef": lowres_scale,
        }
        _write_text(spatial / "scalefactors_json.json", json.dumps(scalefactors, indent=4))
        write_10x_h5(
            outs / "filtered_feature_bc_matrix.h5",
            counts,
            grid.barcodes[keep],
            genes.names,
            slide_id,
        )
        fields["expression"] = f"{slide_id}/outs"
        logger.info(
            "%s: %d of %d spots in tissue, median %d counts per spot",
            slide_id,
            keep.sum(),
            keep.size,
            int(np.median(counts.sum(axis=1))) if keep.any() else 0,
        )

    _write_npz(
        out_dir / "truth" / f"{slide_id}.npz",
        {
            "slide_id": np.array(slide_id),
            "patient": np.array(patient),
            "mpp": np.array(mpp),
            "size_px": np.array([scene.size_px, scene.size_px]),
            "type_names": np.array(TYPE_NAMES),
            "composition": scene.composition,
            "composition_um_per_px": np.array(scene.comp_um),
            "gene_names": np.array(genes.names),
            "gene_baseline": baseline,
            "gene_effects": effects,
            "gene_dispersion": genes.dispersion,
            "depth_factor": np.array(scene.depth_factor),
            "spot_barcodes": grid.barcodes[keep],
            "spot_xy_px": spot_xy_px,
            "spot_array_row": grid.array_row[keep],
            "spot_array_col": grid.array_col[keep],
            "spot_composition": truth.composition[keep].astype(np.float32),
            "spot_tissue_fraction": tissue_fraction.astype(np.float32),
            "spot_size_factor": size_factor,
            "spot_log_rate": log_rate.astype(np.float32),
            "spot_expected_counts": expected.astype(np.float32),
            "stain_h": scene.stain_h,
            "stain_e": scene.stain_e,
        },
    )
    logger.info(
        "%s (%s): %d x %d px rendered in %.1f s, TIFF in %.1f s, total %.1f s",
        slide_id,
        patient,
        scene.size_px,
        scene.size_px,
        rendered - started,
        written - rendered,
        time.perf_counter() - started,
    )
    return fields


# --------------------------------------------------------------------------- the demo set

_README = """\
# Synthetic STevs demo data

Generated by `stevs demo --out THIS_FOLDER --seed {seed} --n-slides {n_slides} \
--size-um {size_um:g} --mpp {mpp:g} --n-genes {n_genes}` (stevs {version}); the same command
gives the same bytes.

- `samples.tsv`: the sample sheet (paths relative to this folder; `mpp` is empty because
  it comes from the TIFF metadata). Written last: if it is missing, the run did not finish.
- `demo_N.tif`: {size_px} x {size_px} px H&E slides at {mpp:g} µm/px, pyramidal tiled TIFF
  (256 px RGB JPEG tiles, reduced levels as subfiletype=1 pages). Slides alternate between
  patients P1 and P2; each slide has its own stain shift and sequencing depth.
- `demo_N/outs/`: Space Ranger-style output: `filtered_feature_bc_matrix.h5` (10x HDF5 v3,
  in-tissue spots only) and `spatial/` (positions, `scalefactors_json.json`, hires and lowres
  PNGs). `demo_{old}` has the header-less Space Ranger 1.x `tissue_positions_list.csv`, the
  others the headed `tissue_positions.csv`. Spots: 55 µm on a 100 µm hexagonal pitch.
- `demo_heonly.tif` + `predict.tsv`: an H&E-only slide (no expression) for prediction;
  its truth file holds patient P1's noise-free expression on a Visium grid.
- `truth/{{slide}}.npz`: the hidden ground truth (load with `numpy.load`, no pickle):
{truth_keys}

Tissue types: tumour (dense large dark nuclei), stroma (pink wavy fibres, spindle nuclei),
fat (white adipocytes with thin pink membranes), immune (small round dark nuclei packed
tight), background (glass). Genes: `TUMOUR_1..`, `STROMA_1..`, `FAT_1..`, `IMMUNE_1..`
markers (log-fold 2.2-3.2 in their type), `GENE_nnn` weak/noise genes (the last tenth are
zero in most spots), mitochondrial `MT-*` and ribosomal `RPL*`/`RPS*` genes. Counts are
negative binomial around exp(log_rate) x size factor (patient-shifted effects, per-slide
depth, log-normal spot size, tissue fraction of the spot).
"""


def make_demo(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_slides: int = 4,
    size_um: float = 3000.0,
    mpp: float = 1.0,
    n_genes: int = DEFAULT_N_GENES,
) -> Path:
    """Write the synthetic demo set into ``out_dir``; returns the path of ``samples.tsv``."""
    from tqdm import tqdm

    out = Path(out_dir)
    if seed < 0:
        raise StevsInputError(None, f"--seed must be >= 0, got {seed}")
    if not 1 <= n_slides <= 1000:
        raise StevsInputError(None, f"--n-slides must be between 1 and 1000, got {n_slides}")
    if not 500.0 <= size_um <= 50_000.0:
        raise StevsInputError(None, f"--size-um must be between 500 and 50000, got {size_um:g}")
    if not 0.1 <= mpp <= 10.0:
        raise StevsInputError(None, f"--mpp must be between 0.1 and 10 µm/px, got {mpp:g}")
    if size_um / mpp < 256:
        raise StevsInputError(None, f"slide of {size_um / mpp:.0f} px is too small (< 256 px)")
    if n_genes < MIN_GENES:
        raise StevsInputError(None, f"--n-genes must be at least {MIN_GENES}, got {n_genes}")
    if out.exists() and not out.is_dir():
        raise StevsInputError(out, "exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    sheet = out / "samples.tsv"
    for stale in (sheet, out / "predict.tsv"):  # an interrupted rerun must not look complete
        stale.unlink(missing_ok=True)

    started = time.perf_counter()
    genes = make_gene_model(seed, n_genes)
    slides = [
        (i, f"demo_{i}", PATIENTS[(i - 1) % len(PATIENTS)], True) for i in range(1, n_slides + 1)
    ]
    slides.append((HEONLY_KEY, HEONLY_ID, PATIENTS[0], False))
    rows = []
    for key, slide_id, patient, with_expression in tqdm(
        slides, desc="demo slides", unit="slide", disable=None
    ):
        rows.append(
            _make_slide(
                out,
                seed,
                key,
                slide_id,
                patient,
                size_um,
                mpp,
                genes,
                with_expression,
                header=not (n_slides >= OLD_POSITIONS_SLIDE and key == OLD_POSITIONS_SLIDE),
            )
        )

    heonly = rows.pop()
    _write_text(
        out / "predict.tsv", f"slide_id\timage\tmpp\n{heonly['slide_id']}\t{heonly['image']}\t\n"
    )
    truth_keys = "\n".join(f"  - `{key}`: {text}" for key, text in TRUTH_KEYS.items())
    _write_text(
        out / "README.md",
        _README.format(
            seed=seed,
            n_slides=n_slides,
            size_um=size_um,
            mpp=mpp,
            n_genes=n_genes,
            version=__version__,
            size_px=int(round(size_um / mpp)),
            old=OLD_POSITIONS_SLIDE if n_slides >= OLD_POSITIONS_SLIDE else "-",
            truth_keys=truth_keys,
        ),
    )
    header = "slide_id\tpatient\timage\texpression\tformat\tspots\tmpp"
    lines = [header] + [
        f"{r['slide_id']}\t{r['patient']}\t{r['image']}\t{r['expression']}\tvisium\t\t"
        for r in rows
    ]
    _write_text(sheet, "\n".join(lines) + "\n")
    logger.info(
        "demo: %d slides + %s in %s in %.1f s",
        n_slides,
        HEONLY_ID,
        out,
        time.perf_counter() - started,
    )
    return sheet


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs demo``."""
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--n-slides", type=int, default=4, help="slides with expression")
    parser.add_argument("--size-um", type=float, default=3000.0, help="slide side in µm")
    parser.add_argument("--mpp", type=float, default=1.0, help="µm per level-0 pixel")
    parser.add_argument(
        "--n-genes", type=int, default=DEFAULT_N_GENES, help=f"genes (>= {MIN_GENES})"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``stevs demo``."""
    sheet = make_demo(args.out, args.seed, args.n_slides, args.size_um, args.mpp, args.n_genes)
    print(sheet)
    return 0
