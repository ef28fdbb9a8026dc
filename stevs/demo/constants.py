"""Fixed settings of the synthetic demo: tissue types, geometry, genes, slide ids, truth keys."""

from __future__ import annotations

import math

import numpy as np

from stevs.geometry import VISIUM_PITCH_UM, VISIUM_SPOT_UM, grid_steps_um

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

FIBRE_SCALE_UM = 40.0  # smoothness of the fibres' waviness
FIBRE_SPACING_UM = 8.0
FIBRE_WARP = 2 * math.pi * 4  # phase amplitude of the waviness (radians)
FAT_CELL_UM = 70.0

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
