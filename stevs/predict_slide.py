"""Apply trained models to H&E-only slides: expression maps on a virtual spot grid.

``stevs predict-slide`` (and :func:`predict_slide`) does, for one slide image:

1. **Tissue**: a thumbnail of the slide (longest side at most 2000 px, read block by block
   so memory stays bounded), Otsu's threshold on its saturation (:func:`stevs.tiling.tissue_mask`)
   and morphology in physical units: closing, hole filling, opening, removal of specks.
2. **Spot grid**: Visium's hexagonal grid (55 µm spots on a 100 µm pitch) by default, or a
   square grid of a chosen pitch, over the whole image; a spot is kept when at least
   ``min_tissue`` of its disk lies on tissue.
3. **Patches**: the spots are written as a slide AnnData (``X`` with 0 genes) and cut by the
   tiler (:func:`stevs.tiling.tile_slide`) at the patch scale the model was trained with.
4. **Prediction**: every model (one fold's, or all folds') predicts from the patch cache,
   read lazily, with the per-slide coordinate normalisation of :mod:`stevs.data`. Several
   models are combined as an ensemble: mean of the means, and std
   ``sqrt(mean of variances + variance of means)`` (law of total variance).
5. **Outputs** in ``out_dir``: ``{slide}.h5ad``, a Visium-like AnnData (``X`` predicted
   expression in the models' normalisation, ``layers["std"]``, ``obsm["spatial"]`` in
   level-0 px, ``uns["spatial"][slide]`` with ``hires``/``lowres`` images and scale factors
   as Space Ranger writes them, so ``scanpy.pl.spatial`` and squidpy draw it as Visium);
   ``maps/{gene}.png`` (mean and std over the thumbnail) per chosen gene; ``tissue.png``
   (QC: the tissue mask and the spots).

The patch scale of a model is read from its ``config.json``: a ``patches`` entry
(``patch_px``, ``mpp_target``) when training recorded one, else the attributes of the
patch caches of the fold it was trained on (``fold_path``), else the preset's
``patch_px``/``mpp``, which may differ from what the model saw (a warning says so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torch.utils.data import Dataset
from tqdm import tqdm

from stevs import __version__
from stevs.atomic import atomic_path
from stevs.errors import StevsInputError

log = logging.getLogger("stevs.predict_slide")

GRID_KINDS = ("visium", "square")
DEFAULT_PITCH_UM = 100.0
DEFAULT_SPOT_UM = 55.0
#: share of a spot's disk that must lie on tissue for the spot to be kept
DEFAULT_MIN_TISSUE = 0.5
#: longest side of the thumbnail used for tissue detection, the maps and ``hires``
HIRES_MAX_SIDE = 2000
LOWRES_MAX_SIDE = 600
#: longest side of the background image of the gene maps
MAP_MAX_SIDE = 1000
#: Space Ranger's fiducial/spot diameter ratio (for ``fiducial_diameter_fullres``)
FIDUCIAL_TO_SPOT = 1.615
#: morphology of the tissue mask, in µm: closing/opening radius, smallest kept piece
CLOSE_UM = 20.0
OPEN_UM = 20.0
MIN_TISSUE_AREA_UM2 = 20_000.0
#: relative difference of patch scales (µm per px, px) tolerated between model and cache
SCALE_TOLERANCE = 0.02
#: genes drawn by default (headline genes first)
DEFAULT_MAP_GENES = 6
#: spots handled per block when measuring their tissue fraction (bounded memory)
SPOT_BLOCK = 20_000


# -- tissue ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueDetection:
    """A slide thumbnail and its cleaned tissue mask."""

    thumbnail: np.ndarray  # uint8 (h, w, 3)
    mask: np.ndarray  # bool (h, w)
    threshold: int  # Otsu threshold on saturation (0-255)
    scale: float  # thumbnail px per level-0 px (Space Ranger's ``tissue_hires_scalef``)
    um_per_px: float  # µm per thumbnail px

    @property
    def tissue_fraction(self) -> float:
        """Share of the thumbnail called tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _disk(radius_px: int) -> np.ndarray:
    r = np.arange(-radius_px, radius_px + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius_px**2


#: the morphology runs at a resolution where its disks are at most this many px in radius
MORPHOLOGY_RADIUS_PX = 3


def _block_fraction(mask: np.ndarray, factor: int) -> np.ndarray:
    """Share of tissue in ``factor`` x ``factor`` blocks (edge blocks padded with glass)."""
    height, width = mask.shape
    pad_h, pad_w = -height % factor, -width % factor
    padded = np.pad(mask, ((0, pad_h), (0, pad_w)))
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    return blocks.mean(axis=(1, 3))


def clean_mask(mask: np.ndarray, um_per_px: float) -> np.ndarray:
    """Close gaps, fill holes, open away thin debris and drop specks (sizes in µm).

    Runs on a block-averaged copy of the mask coarse enough that the structuring disks are
    at most :data:`MORPHOLOGY_RADIUS_PX` px in radius (fast on 2000 px thumbnails), and
    returns a mask of the input's shape.
    """
    factor = max(1, int(min(CLOSE_UM, OPEN_UM) / MORPHOLOGY_RADIUS_PX / um_per_px))
    work = _block_fraction(mask, factor) > 0 if factor > 1 else mask
    work_um = um_per_px * factor
    close_px = max(1, round(CLOSE_UM / work_um))
    open_px = max(1, round(OPEN_UM / work_um))
    padded = np.pad(work, close_px)  # closing must not glue tissue to the image border
    closed = ndimage.binary_closing(padded, structure=_disk(close_px))[
        close_px:-close_px, close_px:-close_px
    ]
    filled = ndimage.binary_fill_holes(closed)
    opened = ndimage.binary_opening(filled, structure=_disk(open_px))
    labels, n = ndimage.label(opened)
    if n:
        areas = np.bincount(labels.ravel(), minlength=n + 1) * work_um**2
        keep = areas >= MIN_TISSUE_AREA_UM2
        keep[0] = False
        opened = keep[labels]
    if factor > 1:
        opened = np.repeat(np.repeat(opened, factor, axis=0), factor, axis=1)
        opened = opened[: mask.shape[0], : mask.shape[1]]
    return opened


def detect_tissue(slide: Any, mpp: float, max_px: int = HIRES_MAX_SIDE) -> TissueDetection:
    """Thumbnail + cleaned Otsu tissue mask of an open slide (``stevs.io.slide`` reader)."""
    from stevs.tiling import read_thumbnail, tissue_mask

    width, height = slide.dimensions
    thumbnail = read_thumbnail(slide, min(max_px, max(width, height)))
    scale = max(thumbnail.shape[:2]) / max(width, height)
    um_per_px = mpp / scale
    raw, threshold = tissue_mask(thumbnail)
    return TissueDetection(thumbnail, clean_mask(raw, um_per_px), threshold, scale, um_per_px)


# -- spot grid ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpotGrid:
    """Spots of a virtual grid: level-0 centres and array indices."""

    xy_px: np.ndarray  # float64 (n, 2), (x, y) level-0 px, pixel centres at integers
    array_row: np.ndarray  # int64 (n,)
    array_col: np.ndarray  # int64 (n,)
    kind: str
    pitch_um: float
    spot_um: float

    def __len__(self) -> int:
        return len(self.xy_px)

    def subset(self, keep: np.ndarray) -> SpotGrid:
        return SpotGrid(
            self.xy_px[keep],
            self.array_row[keep],
            self.array_col[keep],
            self.kind,
            self.pitch_um,
            self.spot_um,
        )

    @property
    def barcodes(self) -> list[str]:
        """Spot names from the array position (unique on one slide)."""
        return [f"r{r:04d}c{c:04d}" for r, c in zip(self.array_row, self.array_col, strict=True)]


def check_grid_settings(
    kind: str, pitch_um: float, spot_um: float, path: str | os.PathLike | None = None
) -> None:
    """Refuse grids that make no sense (``path``: the slide, for the message)."""
    if kind not in GRID_KINDS:
        raise StevsInputError(path, f"unknown grid {kind!r}; use one of {', '.join(GRID_KINDS)}")
    for name, value in (("pitch", pitch_um), ("spot diameter", spot_um)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise StevsInputError(
                path, f"spot {name} must be a positive number of µm, not {value!r}"
            )


def make_spot_grid(
    dimensions: tuple[int, int],
    mpp: float,
    kind: str = "visium",
    pitch_um: float = DEFAULT_PITCH_UM,
    spot_um: float = DEFAULT_SPOT_UM,
) -> SpotGrid:
    """A grid over the whole image, spots fully inside it.

    ``visium``: rows ``pitch * sqrt(3) / 2`` apart, spots ``pitch`` apart within a row,
    odd rows shifted by half a pitch; ``array_col`` counts half pitches (even on even rows,
    odd on odd rows) as on Visium slides. ``square``: rows and columns ``pitch`` apart.
    """
    check_grid_settings(kind, pitch_um, spot_um)
    width_um, height_um = dimensions[0] * mpp, dimensions[1] * mpp
    margin = spot_um / 2.0
    row_step = pitch_um * math.sqrt(3.0) / 2.0 if kind == "visium" else pitch_um
    col_step = pitch_um / 2.0 if kind == "visium" else pitch_um
    n_rows = int(math.floor((height_um - 2 * margin) / row_step)) + 1
    n_cols = int(math.floor((width_um - 2 * margin) / col_step)) + 1
    if height_um < 2 * margin or width_um < 2 * margin:
        n_rows = n_cols = 0
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    if kind == "visium":
        on_grid = (cols % 2) == (rows % 2)
        rows, cols = rows[on_grid], cols[on_grid]
    x_um = margin + cols * col_step
    y_um = margin + rows * row_step
    # pixel i spans [i, i + 1): the point u µm from the edge is pixel u / mpp - 0.5
    xy = np.stack([x_um / mpp - 0.5, y_um / mpp - 0.5], axis=1)
    return SpotGrid(xy, rows.astype(np.int64), cols.astype(np.int64), kind, pitch_um, spot_um)


def _disk_offsets_px(radius_px: float, step_px: float) -> np.ndarray:
    r = np.arange(-radius_px + step_px / 2, radius_px, step_px)
    if r.size == 0:
        r = np.zeros(1)
    dx, dy = np.meshgrid(r, r)
    inside = dx**2 + dy**2 <= radius_px**2
    if not inside.any():
        return np.zeros((1, 2))
    return np.stack([dx[inside], dy[inside]], axis=1)


def spot_tissue_fractions(
    grid: SpotGrid, tissue: TissueDetection, mpp: float, progress: bool | None = None
) -> np.ndarray:
    """Share of each spot's disk that the thumbnail's tissue mask covers."""
    radius_px = grid.spot_um / 2.0 / mpp * tissue.scale  # in thumbnail px
    step = max(radius_px / 5.0, 0.5)
    offsets = _disk_offsets_px(radius_px, step)
    height, width = tissue.mask.shape
    fractions = np.zeros(len(grid), np.float32)
    starts = range(0, len(grid), SPOT_BLOCK)
    for start in tqdm(starts, desc="spot grid", unit="block", disable=progress is False):
        xy = grid.xy_px[start : start + SPOT_BLOCK]
        centre = (xy + 0.5) * tissue.scale  # continuous thumbnail coordinates
        xs = np.floor(centre[:, None, 0] + offsets[None, :, 0]).astype(np.int64)
        ys = np.floor(centre[:, None, 1] + offsets[None, :, 1]).astype(np.int64)
        inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        values = tissue.mask[np.clip(ys, 0, height - 1), np.clip(xs, 0, width - 1)] & inside
        fractions[start : start + len(xy)] = values.mean(axis=1)
    return fractions


# -- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchScale:
    """Patch side (px) and resolution (µm per px) a model was trained on, and where it says so."""

    patch_px: int
    patch_mpp: float
    source: str
    certain: bool = True  # False when read from the preset, which may not be what was tiled

    @property
    def patch_um(self) -> float:
        return self.patch_px * self.patch_mpp

    def matches(self, other: PatchScale | tuple[int, float]) -> bool:
        px, mpp = (other.patch_px, other.patch_mpp) if isinstance(other, PatchScale) else other
        return int(px) == self.patch_px and math.isclose(
            float(mpp), self.patch_mpp, rel_tol=SCALE_TOLERANCE
        )

    def describe(self) -> str:
        return f"{self.patch_px} px at {self.patch_mpp:g} µm/px ({self.patch_um:g} µm)"


def _cache_scale(path: Path) -> tuple[int, float] | None:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return int(handle.attrs["patch_px"]), float(handle.attrs["mpp_target"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def model_patch_scale(config: dict[str, Any], config_path: str | os.PathLike) -> PatchScale:
    """The patch scale a model was trained on (see the module docstring for the sources)."""
    recorded = config.get("patches")
    if isinstance(recorded, dict) and "patch_px" in recorded:
        try:
            mpp = recorded.get("mpp_target", recorded.get("mpp"))
            if mpp is None:
                mpp = float(recorded["patch_um"]) / int(recorded["patch_px"])
            return PatchScale(int(recorded["patch_px"]), float(mpp), f"{config_path} (patches)")
        except (KeyError, TypeError, ValueError) as err:
            raise StevsInputError(config_path, f"unreadable 'patches' entry: {err}") from err
    fold_path = config.get("fold_path")
    if fold_path and Path(fold_path).is_file():
        with contextlib.suppress(StevsInputError, OSError, ValueError):
            from stevs.folds import load_fold

            fold = load_fold(fold_path)
            scales = {}
            for slide in fold.train:
                path = Path(fold.slide_entry(slide).patches)
                scale = _cache_scale(path) if path.is_file() else None
                if scale is not None:
                    scales[str(path)] = scale
            if scales:
                first_path, first = next(iter(scales.items()))
                found = PatchScale(first[0], first[1], f"patch cache {first_path}")
                for path, scale in scales.items():
                    if not found.matches(scale):
                        raise StevsInputError(
                            config_path,
                            f"the training patch caches disagree: {first_path} is "
                            f"{found.describe()}, {path} is {scale[0]} px at {scale[1]:g} µm/px",
                        )
                return found
    try:
        return PatchScale(
            int(config["patch_px"]),
            float(config["mpp"]),
            f"{config_path} (the preset's patch_px/mpp)",
            certain=False,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise StevsInputError(
            config_path, f"cannot tell which patch scale the model was trained on: {err}"
        ) from err


@dataclass
class ModelSet:
    """Trained models that predict together: shared panel, normalisation and patch scale."""

    dirs: list[Path]
    configs: list[dict[str, Any]]
    genes: list[str]
    normalisation: dict[str, Any]
    scale: PatchScale
    headline_genes: list[str] = field(default_factory=list)


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise StevsInputError(path, "missing; is this the output folder of 'stevs train'?")
    if not (model_dir / "model.safetensors").is_file():
        raise StevsInputError(
            model_dir / "model.safetensors", "missing; has 'stevs train' finished?"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StevsInputError(path, f"not a readable model config: {err}") from err
    if not isinstance(config, dict) or not config.get("genes"):
        raise StevsInputError(path, "not a stevs model config: no gene panel ('genes')")
    return config


def _headline_genes(config: dict[str, Any]) -> list[str]:
    fold_path = config.get("fold_path")
    if not fold_path or not Path(fold_path).is_file():
        return []
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(Path(fold_path).read_text())
        return [str(g) for g in data.get("headline_genes", [])]
    return []


def check_models(model_dirs: Sequence[str | os.PathLike]) -> ModelSet:
    """Read the models' configs; refuse models that cannot be combined."""
    if not model_dirs:
        raise StevsInputError(None, "no model given (--models)")
    dirs = [Path(d) for d in model_dirs]
    configs = [_read_config(d) for d in dirs]
    first_dir, first = dirs[0], configs[0]
    genes = [str(g) for g in first["genes"]]
    norm = dict(first.get("normalisation") or {})
    scales = [model_patch_scale(c, d / "config.json") for d, c in zip(dirs, configs, strict=True)]
    for directory, config, scale in zip(dirs[1:], configs[1:], scales[1:], strict=True):
        path = directory / "config.json"
        other = [str(g) for g in config["genes"]]
        if other != genes:
            differ = sorted(set(other) ^ set(genes))
            detail = f"e.g. {', '.join(differ[:5])}" if differ else "same genes, another order"
            raise StevsInputError(
                path,
                f"gene panel ({len(other)} genes) differs from that of {first_dir} "
                f"({len(genes)} genes; {detail}): models of one ensemble must share the panel",
            )
        other_norm = dict(config.get("normalisation") or {})
        for key in ("method", "target_sum"):
            if other_norm.get(key) != norm.get(key):
                raise StevsInputError(
                    path,
                    f"normalisation {key} {other_norm.get(key)!r} differs from {first_dir}'s "
                    f"{norm.get(key)!r}: their predictions cannot be averaged",
                )
        if not scale.matches(scales[0]):
            raise StevsInputError(
                path,
                f"trained on patches of {scale.describe()} (from {scale.source}), but "
                f"{first_dir} on {scales[0].describe()} (from {scales[0].source}): "
                "models of one ensemble must share the patch scale",
            )
    scale = next((s for s in scales if s.certain), scales[0])
    return ModelSet(dirs, configs, genes, norm, scale, _headline_genes(first))


def resolve_patch_scale(
    models: ModelSet, patch_px: int | None, patch_um: float | None
) -> PatchScale:
    """The scale to tile at: the models'; a scale given must agree with it."""
    if patch_px is None and patch_um is None:
        return models.scale
    px = int(patch_px) if patch_px is not None else models.scale.patch_px
    um = float(patch_um) if patch_um is not None else px * models.scale.patch_mpp
    if not (math.isfinite(um) and um > 0 and px > 0):
        raise StevsInputError(None, f"patch size must be positive, got {px} px / {um!r} µm")
    asked = PatchScale(px, um / px, "the command line")
    if models.scale.matches(asked):
        return models.scale
    config_path = models.dirs[0] / "config.json"
    message = (
        f"the model was trained on patches of {models.scale.describe()} (from "
        f"{models.scale.source}), not the {asked.describe()} asked for"
    )
    if models.scale.certain:
        raise StevsInputError(config_path, message + ": use a model trained at that scale")
    log.warning("%s: %s; tiling at the asked scale", config_path, message)
    return asked


def combine_predictions(
    means: Sequence[np.ndarray], stds: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble of models: mean of the means, std = sqrt(mean variance + variance of means)."""
    if not means or len(means) != len(stds):
        raise ValueError("need one std per mean, at least one model")
    stacked = np.stack([np.asarray(m, np.float64) for m in means])
    variances = np.stack([np.asarray(s, np.float64) ** 2 for s in stds])
    mean = stacked.mean(axis=0)
    variance = variances.mean(axis=0) + stacked.var(axis=0)
    return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


class PatchCacheDataset(Dataset):
    """Items ``patch`` (3, H, W) uint8 and ``coords`` (2,) from a patch cache, read lazily."""

    def __init__(self, path: str | os.PathLike, coords: np.ndarray) -> None:
        import h5py

        self.path = str(path)
        with h5py.File(self.path, "r") as handle:
            self._n = int(handle["patches"].shape[0])
        if coords.shape != (self._n, 2):
            raise ValueError(f"coords must be ({self._n}, 2), not {coords.shape}")
        self.coords = np.asarray(coords, np.float32)
        self._pid: int | None = None
        self._file: Any = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, Any]:
        import h5py

        if self._pid != os.getpid():  # a DataLoader worker opens its own handle
            self._pid, self._file = os.getpid(), h5py.File(self.path, "r")
        patch = self._file["patches"][index]
        return {
            "patch": torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))),
            "coords": torch.from_numpy(self.coords[index]),
        }

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._pid, self._file = None, None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": None, "_file": None}


# -- outputs -----------------------------------------------------------------------------------


def _atomic_write(path: Path, suffix: str, write: Any) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` and rename it when done."""
    with atomic_path(path, suffix=suffix) as tmp:
        write(tmp)
    return path


def _resize_max(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``image`` with its longest side at most ``max_side``, and the factor applied."""
    height, width = image.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    if factor >= 1.0:
        return image, 1.0
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(resized), size[0] / width


def visium_spatial_uns(
    tissue: TissueDetection, mpp: float, spot_um: float, image_path: str
) -> dict[str, Any]:
    """``uns["spatial"][library_id]`` as scanpy's ``read_visium`` builds it."""
    lowres, factor = _resize_max(tissue.thumbnail, LOWRES_MAX_SIDE)
    return {
        "images": {"hires": tissue.thumbnail, "lowres": lowres},
        "scalefactors": {
            "tissue_hires_scalef": float(tissue.scale),
            "tissue_lowres_scalef": float(tissue.scale * factor),
            "spot_diameter_fullres": float(spot_um / mpp),
            "fiducial_diameter_fullres": float(spot_um * FIDUCIAL_TO_SPOT / mpp),
        },
        "metadata": {"source_image_path": image_path, "software_version": f"stevs {__version__}"},
    }


def _safe_name(gene: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", gene) or "gene"


def draw_gene_map(
    thumbnail: np.ndarray,
    xy_thumb: np.ndarray,
    spot_diameter_thumb: float,
    mean: np.ndarray,
    std: np.ndarray,
    gene: str,
    unit: str,
    path: Path,
) -> Path:
    """PNG of one gene: predicted mean and std as spot disks over the thumbnail."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import EllipseCollection
    from matplotlib.figure import Figure

    thumbnail, factor = _resize_max(thumbnail, MAP_MAX_SIDE)  # plenty for a 4-inch panel
    xy_thumb, spot_diameter_thumb = xy_thumb * factor, spot_diameter_thumb * factor
    height, width = thumbnail.shape[:2]
    aspect = width / max(height, 1)
    fig = Figure(figsize=(2 * 4.2 * aspect + 1.6, 4.4))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no GUI backend
    axes = fig.subplots(1, 2, squeeze=False)
    for ax, values, label, cmap in (
        (axes[0, 0], mean, f"{gene}: predicted ({unit})", "viridis"),
        (axes[0, 1], std, f"{gene}: predictive std", "magma"),
    ):
        ax.imshow(thumbnail)
        disks = EllipseCollection(
            widths=spot_diameter_thumb,
            heights=spot_diameter_thumb,
            angles=0.0,
            units="xy",
            offsets=xy_thumb,
            offset_transform=ax.transData,
            cmap=cmap,
            linewidths=0,
        )
        disks.set_array(np.asarray(values, np.float64))
        ax.add_collection(disks)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
        fig.colorbar(disks, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    _atomic_write(path, ".png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def draw_tissue_qc(
    tissue: TissueDetection, xy_thumb: np.ndarray, spot_diameter_thumb: float, title: str
) -> Image.Image:
    """The thumbnail with the tissue mask tinted green and the kept spots outlined."""
    base = tissue.thumbnail.astype(np.float32)
    tint = np.array([0, 200, 0], np.float32)
    base[tissue.mask] = 0.75 * base[tissue.mask] + 0.25 * tint
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = max(spot_diameter_thumb / 2.0, 1.0)
    for x, y in xy_thumb:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=(0, 60, 200))
    label = f"{title}: {len(xy_thumb)} spots on tissue (green), Otsu threshold {tissue.threshold}"
    draw.rectangle((0, 0, 8 + draw.textlength(label), 14), fill=(255, 255, 255))
    draw.text((4, 2), label, fill=(0, 0, 0))
    return image


def choose_genes(models: ModelSet, genes: Sequence[str] | None) -> list[str]:
    """Genes to draw: those asked for (all must be in the panel) or the headline genes."""
    if genes:
        missing = [g for g in genes if g not in models.genes]
        if missing:
            raise StevsInputError(
                models.dirs[0] / "config.json",
                f"gene(s) {', '.join(missing)} are not in the model's panel of "
                f"{len(models.genes)} genes (e.g. {', '.join(models.genes[:5])})",
            )
        return list(dict.fromkeys(genes))
    headline = [g for g in models.headline_genes if g in models.genes]
    ordered = list(dict.fromkeys(headline + models.genes))
    return ordered[:DEFAULT_MAP_GENES]


# -- the whole job -----------------------------------------------------------------------------


@dataclass
class SlidePrediction:
    """What :func:`predict_slide` wrote."""

    adata: Path
    maps: list[Path]
    qc: Path
    n_spots: int
    patches: Path | None = None
    #: wall seconds per stage: tissue (thumbnail, mask, grid), tiling, prediction, outputs
    seconds: dict[str, float] = field(default_factory=dict)


def _grid_slide_adata(
    grid: SpotGrid,
    fractions: np.ndarray,
    slide_id: str,
    image: str,
    mpp: float,
    mpp_source: str,
    dimensions: tuple[int, int],
) -> Any:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(len(grid), np.int64),
            "array_row": grid.array_row,
            "array_col": grid.array_col,
            "tissue_fraction": fractions.astype(np.float32),
        },
        index=pd.Index(grid.barcodes, name="barcode"),
    )
    adata = ad.AnnData(X=sp.csr_matrix((len(grid), 0), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = grid.xy_px.astype(np.float64)
    adata.uns["stevs"] = {
        "slide": slide_id,
        "patient": slide_id,
        "mpp": float(mpp),
        "mpp_source": mpp_source,
        "spot_diameter_um": float(grid.spot_um),
        "spot_pitch_um": float(grid.pitch_um),
        "technology": "visium" if grid.kind == "visium" else "square_grid",
        "image_path": image,
        "image_width": int(dimensions[0]),
        "image_height": int(dimensions[1]),
        "expression_path": "",
        "stevs_version": __version__,
    }
    return adata


def predict_slide(
    image: str | os.PathLike,
    slide_id: str,
    model_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    mpp: float | None = None,
    grid: str = "visium",
    pitch_um: float = DEFAULT_PITCH_UM,
    spot_um: float = DEFAULT_SPOT_UM,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    genes: Sequence[str] | None = None,
    patch_px: int | None = None,
    patch_um: float | None = None,
    threads: int = 1,
    device: str = "auto",
    batch_size: int = 64,
    n_samples: int = 16,
    keep_patches: bool = False,
    progress: bool | None = None,
) -> SlidePrediction:
    """Predict expression on a spot grid over the tissue of an H&E-only slide.

    Writes ``{out_dir}/{slide_id}.h5ad``, ``{out_dir}/maps/{gene}.png`` and
    ``{out_dir}/tissue.png``; with ``keep_patches`` also ``{out_dir}/{slide_id}.patches.h5``.
    """
    import anndata as ad

    from stevs.data import normalise_coords
    from stevs.io.slide import open_slide
    from stevs.predict import file_sha256, load_model, predict_patches
    from stevs.tiling import tile_slide

    image_path = str(Path(image).resolve())
    check_grid_settings(grid, pitch_um, spot_um, image)
    if not 0.0 < min_tissue <= 1.0:
        raise StevsInputError(image, f"min tissue fraction must be in (0, 1], got {min_tissue!r}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise StevsInputError(image, f"--mpp must be a positive number, got {mpp!r}")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", slide_id):
        raise StevsInputError(image, f"slide id {slide_id!r} must be letters, digits, . _ -")
    models = check_models(model_dirs)
    scale = resolve_patch_scale(models, patch_px, patch_um)
    map_genes = choose_genes(models, genes)
    out = Path(out_dir)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    with open_slide(image, mpp=mpp) as slide:
        try:
            slide_mpp = slide.require_mpp()
        except StevsInputError as err:
            raise StevsInputError(
                image,
                "microns per pixel unknown: the file's metadata has none; give --mpp "
                "(or the 'mpp' column of the predict sheet)",
            ) from err
        mpp_source = str(slide.mpp_source)
        dimensions = slide.dimensions
        tissue = detect_tissue(slide, slide_mpp)
    if not tissue.mask.any():
        raise StevsInputError(
            image,
            f"no tissue found: Otsu's threshold on saturation ({tissue.threshold}) leaves no "
            "piece of tissue larger than "
            f"{MIN_TISSUE_AREA_UM2 / 1e6:g} mm² (a blank or very faint slide?)",
        )
    full_grid = make_spot_grid(dimensions, slide_mpp, grid, pitch_um, spot_um)
    fractions = spot_tissue_fractions(full_grid, tissue, slide_mpp, progress=progress)
    keep = fractions >= min_tissue
    if not keep.any():
        raise StevsInputError(
            image,
            f"no tissue found under any {spot_um:g} µm spot of the {grid} grid "
            f"(min tissue fraction {min_tissue:g}; {100 * tissue.tissue_fraction:.2f}% of the "
            "thumbnail is tissue)",
        )
    spots = full_grid.subset(keep)
    fractions = fractions[keep]
    log.info(
        "%s: %d x %d px at %g µm/px (%s); tissue %.1f%% of the slide; %d of %d %s grid spots "
        "(%g µm on a %g µm pitch) on tissue",
        slide_id,
        *dimensions,
        slide_mpp,
        mpp_source,
        100 * tissue.tissue_fraction,
        len(spots),
        len(full_grid),
        grid,
        spot_um,
        pitch_um,
    )

    seconds["tissue"] = time.perf_counter() - clock
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".predict-slide-{slide_id}-", dir=out))
    kept_patches: Path | None = None
    try:
        grid_path = work / f"{slide_id}.grid.h5ad"
        grid_adata = _grid_slide_adata(
            spots, fractions, slide_id, image_path, slide_mpp, mpp_source, dimensions
        )
        grid_adata.write_h5ad(grid_path)
        cache = tile_slide(
            grid_path,
            work / f"{slide_id}.patches.h5",
            patch_px=scale.patch_px,
            patch_mpp=scale.patch_mpp,
            threads=threads,
            image_path=image_path,
            mpp_override=slide_mpp,
            progress=progress,
        )
        seconds["tiling"] = time.perf_counter() - clock - sum(seconds.values())
        cached = _cache_scale(cache)
        if cached is None or not scale.matches(cached):
            raise StevsInputError(cache, f"patch cache scale {cached} is not {scale.describe()}")
        coords = normalise_coords(spots.xy_px)
        dataset = PatchCacheDataset(cache, coords)
        means, stds, checksums = [], [], []
        try:
            for model_dir in models.dirs:
                model, _ = load_model(model_dir, device)
                mean, std = predict_patches(
                    model,
                    dataset,
                    batch_size=batch_size,
                    n_samples=n_samples,
                    progress=progress is not False,
                )
                means.append(mean)
                stds.append(std)
                checksums.append(file_sha256(model_dir / "model.safetensors"))
                del model
        finally:
            dataset.close()
        mean, std = combine_predictions(means, stds)
        del means, stds
        seconds["predict"] = time.perf_counter() - clock - sum(seconds.values())

        adata = ad.AnnData(X=mean, obs=grid_adata.obs.copy())
        adata.var_names = models.genes
        adata.layers["std"] = std
        adata.obsm["spatial"] = spots.xy_px.astype(np.float64)
        adata.uns["spatial"] = {
            slide_id: visium_spatial_uns(tissue, slide_mpp, spot_um, image_path)
        }
        methods = sorted({str(c.get("method")) for c in models.configs})
        adata.uns["stevs"] = {
            "slide": slide_id,
            "method": methods[0] if len(methods) == 1 else ",".join(methods),
            "fold": [str(c.get("fold", "")) for c in models.configs],
            "model_dirs": [str(d) for d in models.dirs],
            "model_sha256": checksums,
            "n_models": len(models.dirs),
            "ensemble": "mean of means; std = sqrt(mean variance + variance of means)",
            "normalisation": {
                k: v
                for k, v in models.normalisation.items()
                if k in ("method", "target_sum") and v is not None
            },
            "image_path": image_path,
            "mpp": float(slide_mpp),
            "mpp_source": mpp_source,
            "grid": grid,
            "spot_pitch_um": float(pitch_um),
            "spot_diameter_um": float(spot_um),
            "min_tissue": float(min_tissue),
            "tissue_threshold_saturation": int(tissue.threshold),
            "patch_px": scale.patch_px,
            "patch_mpp": scale.patch_mpp,
            "patch_scale_source": scale.source,
            "stevs_version": __version__,
        }
        adata_path = _atomic_write(out / f"{slide_id}.h5ad", ".h5ad", adata.write_h5ad)
        if keep_patches:
            kept_patches = out / f"{slide_id}.patches.h5"
            os.replace(cache, kept_patches)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    xy_thumb = (spots.xy_px + 0.5) * tissue.scale
    diameter_thumb = spot_um / slide_mpp * tissue.scale
    unit = str(models.normalisation.get("method") or "normalised")
    maps = []
    for gene in map_genes:
        column = models.genes.index(gene)
        maps.append(
            draw_gene_map(
                tissue.thumbnail,
                xy_thumb,
                diameter_thumb,
                adata.X[:, column],
                adata.layers["std"][:, column],
                gene,
                unit,
                out / "maps" / f"{_safe_name(gene)}.png",
            )
        )
    qc = draw_tissue_qc(tissue, xy_thumb, diameter_thumb, slide_id)
    qc_path = _atomic_write(out / "tissue.png", ".png", lambda tmp: qc.save(tmp, format="PNG"))
    seconds["outputs"] = time.perf_counter() - clock - sum(seconds.values())
    log.info(
        "%s: %d spots x %d genes -> %s; %d maps",
        slide_id,
        len(spots),
        len(models.genes),
        adata_path,
        len(maps),
    )
    return SlidePrediction(adata_path, maps, qc_path, len(spots), kept_patches, seconds)


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs predict-slide``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="H&E slide image (any supported format)")
    source.add_argument(
        "--sheet", help="predict sheet (slide_id, image, mpp): take the --slide-id row's image"
    )
    parser.add_argument("--data-root", help="folder the sheet's image paths are relative to")
    parser.add_argument("--slide-id", required=True, help="name of the slide in the outputs")
    parser.add_argument(
        "--mpp", type=float, help="µm per level-0 pixel (default: the sheet's, else the image's)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        required=True,
        help="model folders (results/models/METHOD/FOLD); several are averaged as an ensemble",
    )
    parser.add_argument("--out-dir", required=True, help="writes ID.h5ad, maps/*.png, tissue.png")
    parser.add_argument("--grid", choices=GRID_KINDS, default="visium", help="spot grid (visium)")
    parser.add_argument(
        "--pitch-um", type=float, default=DEFAULT_PITCH_UM, help="spot centre distance (100)"
    )
    parser.add_argument("--spot-um", type=float, default=DEFAULT_SPOT_UM, help="spot diameter (55)")
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=DEFAULT_MIN_TISSUE,
        help="share of a spot's disk on tissue for it to be kept (0.5)",
    )
    parser.add_argument(
        "--genes", nargs="+", help="genes to draw as maps (default: up to 6 headline genes)"
    )
    parser.add_argument(
        "--patch-px", type=int, help="patch side the models expect (checked; default: theirs)"
    )
    parser.add_argument(
        "--patch-um", type=float, help="patch side in µm the models expect (checked)"
    )
    parser.add_argument("--threads", type=int, default=1, help="tiling readers and torch threads")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--samples", type=int, default=16, help="posterior samples for the predictive std"
    )
    parser.add_argument(
        "--keep-patches", action="store_true", help="keep the patch cache as ID.patches.h5"
    )


def _is_missing(value: Any) -> bool:
    """True for None and NaN (a sheet's empty mpp)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def run(args: argparse.Namespace) -> int:
    """``stevs predict-slide``."""
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    image, mpp = args.image, args.mpp
    if args.sheet:
        from stevs.io.samples import read_predict_sheet

        table = read_predict_sheet(args.sheet, data_root=args.data_root)
        if args.slide_id not in table.index:
            raise StevsInputError(args.sheet, f"no row with slide_id '{args.slide_id}'")
        row = table.loc[args.slide_id]
        image = row["image"]
        if mpp is None and not _is_missing(row["mpp"]):
            mpp = float(row["mpp"])
    result = predict_slide(
        image,
        args.slide_id,
        args.models,
        args.out_dir,
        mpp=mpp,
        grid=args.grid,
        pitch_um=args.pitch_um,
        spot_um=args.spot_um,
        min_tissue=args.min_tissue,
        genes=args.genes,
        patch_px=args.patch_px,
        patch_um=args.patch_um,
        threads=args.threads,
        device=args.device,
        batch_size=args.batch_size,
        n_samples=args.samples,
        keep_patches=args.keep_patches,
    )
    log.info(
        "wrote %s (%d spots), %s and %d maps",
        result.adata,
        result.n_spots,
        result.qc,
        len(result.maps),
    )
    return 0
