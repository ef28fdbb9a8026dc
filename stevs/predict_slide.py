"""Apply trained models to H&E-only slides: expression maps on a virtual spot grid.

``stevs predict-slide`` (and :func:`predict_slide`) does, for one slide image:

1. **Tissue**: :func:`stevs.tissue.detect_tissue`, the tissue detection the tiler uses too:
   a thumbnail (longest side at most 2000 px, read block by block so memory stays bounded),
   Otsu's threshold on its saturation and morphology in physical units (closing, hole
   filling, opening, removal of specks).
2. **Spot grid**: Visium's hexagonal grid (55 µm spots on a 100 µm pitch) by default, or a
   square grid of a chosen pitch (:mod:`stevs.geometry`), over the whole image; a spot is
   kept when at least ``min_tissue`` of its disk lies on tissue.
3. **Patches**: the tiler (:func:`stevs.tiling.tile_spots`) cuts the kept spots into a patch
   cache at the patch scale the model was trained with.
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
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from stevs import __version__
from stevs.atomic import atomic_path, check_writable
from stevs.errors import StevsInputError
from stevs.geometry import (
    GRID_KINDS,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    check_grid_settings,
    grid_indices,
    grid_offsets_um,
    grid_shape,
)
from stevs.ids import check_slide_id
from stevs.io.fold_file import read_fold
from stevs.io.model_dir import ModelDir
from stevs.io.patch_cache import PatchCache, PatchScale, read_patch_scale
from stevs.io.prediction import new_prediction, write_prediction
from stevs.io.slide_adata import SlideSpots
from stevs.io.visium_uns import resize_max, spatial_uns
from stevs.methods import check_he_only
from stevs.tissue import (
    MIN_TISSUE_AREA_UM2,
    THUMBNAIL_PX,
    TissueDetection,
    detect_tissue,
)

log = logging.getLogger("stevs.predict_slide")

DEFAULT_PITCH_UM = VISIUM_PITCH_UM
DEFAULT_SPOT_UM = VISIUM_SPOT_UM
#: share of a spot's disk that must lie on tissue for the spot to be kept
DEFAULT_MIN_TISSUE = 0.5
#: longest side of the thumbnail used for tissue detection, the maps and ``hires``
HIRES_MAX_SIDE = THUMBNAIL_PX
#: longest side of the background image of the gene maps
MAP_MAX_SIDE = 1000
#: relative difference of patch scales (µm per px, px) tolerated between model and cache
SCALE_TOLERANCE = 0.02
#: genes drawn by default (headline genes first)
DEFAULT_MAP_GENES = 6


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
    n_rows, n_cols = grid_shape(kind, pitch_um, width_um - 2 * margin, height_um - 2 * margin)
    rows, cols = grid_indices(kind, n_rows, n_cols)
    dx_um, dy_um = grid_offsets_um(kind, pitch_um, rows, cols)
    # pixel i spans [i, i + 1): the point u µm from the edge is pixel u / mpp - 0.5
    xy = np.stack([(margin + dx_um) / mpp - 0.5, (margin + dy_um) / mpp - 0.5], axis=1)
    return SpotGrid(xy, rows, cols, kind, pitch_um, spot_um)


def spot_tissue_fractions(grid: SpotGrid, tissue: TissueDetection, mpp: float) -> np.ndarray:
    """Share of each spot's disk that the slide's tissue mask covers."""
    return tissue.disk_fractions(grid.xy_px, grid.spot_um / mpp)


# -- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedScale:
    """The patch scale models were trained on, and where that was read."""

    scale: PatchScale
    source: str
    certain: bool = True  # False when read from the preset, which may not be what was tiled

    def matches(self, other: PatchScale) -> bool:
        return self.scale.matches(other, rel_tol=SCALE_TOLERANCE)

    def describe(self) -> str:
        return self.scale.describe()


def _fold_cache_scale(fold_path: str, config_path: Path) -> TrainedScale | None:
    """The scale of the training patch caches of the fold a model names, if they exist."""
    with contextlib.suppress(StevsInputError, OSError, ValueError):
        fold = read_fold(fold_path)
        scales = {}
        for slide in fold.train:
            path = Path(fold.slide_entry(slide).patches)
            if path.is_file():
                scales[str(path)] = read_patch_scale(path)
        if scales:
            (first_path, first), *rest = scales.items()
            for path, scale in rest:
                if not first.matches(scale, rel_tol=SCALE_TOLERANCE):
                    raise ValueError(
                        f"the training patch caches disagree: {first_path} is "
                        f"{first.describe()}, {path} is {scale.describe()}"
                    )
            return TrainedScale(first, f"patch cache {first_path}")
    return None


def model_patch_scale(config: dict[str, Any], config_path: str | os.PathLike) -> TrainedScale:
    """The patch scale a model was trained on (see the module docstring for the sources)."""
    config_path = Path(config_path)
    recorded = config.get("patches")
    if isinstance(recorded, dict) and "patch_px" in recorded:
        try:
            return TrainedScale(PatchScale.from_dict(recorded), f"{config_path} (patches)")
        except (KeyError, TypeError, ValueError) as err:
            raise StevsInputError(config_path, f"unreadable 'patches' entry: {err}") from err
    fold_path = config.get("fold_path")
    if fold_path and Path(fold_path).is_file():
        found = _fold_cache_scale(fold_path, config_path)
        if found is not None:
            return found
    try:
        preset = PatchScale(int(config["patch_px"]), float(config["mpp"]))
    except (KeyError, TypeError, ValueError) as err:
        raise StevsInputError(
            config_path, f"cannot tell which patch scale the model was trained on: {err}"
        ) from err
    return TrainedScale(preset, f"{config_path} (the preset's patch_px/mpp)", certain=False)


@dataclass
class ModelSet:
    """Trained models that predict together: shared normalisation and patch scale; the panel
    is the union of theirs, each gene averaged over the models that predict it."""

    dirs: list[Path]
    configs: list[dict[str, Any]]
    genes: list[str]
    normalisation: dict[str, Any]
    scale: TrainedScale
    headline_genes: list[str] = field(default_factory=list)

    def columns(self, index: int) -> np.ndarray:
        """Positions of model ``index``'s genes in :attr:`genes`."""
        position = {g: i for i, g in enumerate(self.genes)}
        return np.array([position[g] for g in self.configs[index]["genes"]], dtype=np.int64)

    def models_per_gene(self) -> np.ndarray:
        """How many models predict each gene of :attr:`genes`."""
        counts = np.zeros(len(self.genes), dtype=np.int64)
        for index in range(len(self.dirs)):
            counts[self.columns(index)] += 1
        return counts


def _headline_genes(config: dict[str, Any]) -> list[str]:
    if config.get("headline_genes"):
        return [str(g) for g in config["headline_genes"]]
    fold_path = config.get("fold_path")
    if not fold_path or not Path(fold_path).is_file():
        return []
    with contextlib.suppress(StevsInputError):
        return list(read_fold(fold_path).headline_genes)
    return []


def _check_same(first_dir: Path, first: dict, directory: Path, config: dict, scales: list) -> None:
    """Refuse combining models whose normalisation or patch scale differ."""
    path = directory / "config.json"
    norm, other_norm = first.get("normalisation") or {}, config.get("normalisation") or {}
    for key in ("method", "target_sum"):
        if other_norm.get(key) != norm.get(key):
            raise StevsInputError(
                path,
                f"normalisation {key} {other_norm.get(key)!r} differs from {first_dir}'s "
                f"{norm.get(key)!r}: their predictions cannot be averaged",
            )
    if not scales[-1].matches(scales[0].scale):
        raise StevsInputError(
            path,
            f"trained on patches of {scales[-1].describe()} (from {scales[-1].source}), but "
            f"{first_dir} on {scales[0].describe()} (from {scales[0].source}): "
            "models of one ensemble must share the patch scale",
        )


def check_models(model_dirs: Sequence[str | os.PathLike]) -> ModelSet:
    """Read the models' configs; refuse models that cannot predict H&E-only slides or cannot
    be combined (normalisation, patch scale)."""
    if not model_dirs:
        raise StevsInputError(None, "no model given (--models)")
    dirs = [Path(d) for d in model_dirs]
    configs, scales = [], []
    for directory in dirs:
        folder = ModelDir(directory)
        config = folder.read_config()
        check_he_only(config["method"], str(folder.config_path))
        configs.append(config)
        scales.append(model_patch_scale(config, folder.config_path))
        _check_same(dirs[0], configs[0], directory, config, scales)
    genes = list(dict.fromkeys(str(g) for c in configs for g in c["genes"]))
    scale = next((s for s in scales if s.certain), scales[0])
    models = ModelSet(
        dirs, configs, genes, dict(configs[0].get("normalisation") or {}), scale,
        list(dict.fromkeys(g for c in configs for g in _headline_genes(c))),
    )  # fmt: skip
    shared = int((models.models_per_gene() == len(dirs)).sum())
    if shared < len(genes):
        log.info(
            "%d models: %d genes predicted by all of them, %d by fewer (var['n_models'])",
            len(dirs),
            shared,
            len(genes) - shared,
        )
    return models


def resolve_patch_scale(
    models: ModelSet, patch_px: int | None, patch_um: float | None
) -> TrainedScale:
    """The scale to tile at: the models'; a scale given must agree with it."""
    if patch_px is None and patch_um is None:
        return models.scale
    trained = models.scale.scale
    px = int(patch_px) if patch_px is not None else trained.patch_px
    um = float(patch_um) if patch_um is not None else px * trained.mpp_target
    if not (math.isfinite(um) and um > 0 and px > 0):
        raise StevsInputError(None, f"patch size must be positive, got {px} px / {um!r} µm")
    asked = PatchScale(px, um / px)
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
    return TrainedScale(asked, "the command line")


def combine_predictions(
    means: Sequence[np.ndarray],
    stds: Sequence[np.ndarray],
    columns: Sequence[np.ndarray] | None = None,
    n_genes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble of models, gene by gene: the mean of the means and std = sqrt(mean variance +
    variance of means) over the models that predict a gene.

    ``columns[i]`` places model ``i``'s genes in a union panel of ``n_genes``; without it all
    models share one panel.
    """
    if not means or len(means) != len(stds):
        raise ValueError("need one std per mean, at least one model")
    if columns is None:
        columns = [np.arange(np.shape(m)[1]) for m in means]
        n_genes = np.shape(means[0])[1]
    shape = (len(means), np.shape(means[0])[0], int(n_genes))
    stacked, variances = np.full(shape, np.nan), np.full(shape, np.nan)
    for i, (mean, std, cols) in enumerate(zip(means, stds, columns, strict=True)):
        stacked[i][:, cols] = np.asarray(mean, np.float64)
        variances[i][:, cols] = np.asarray(std, np.float64) ** 2
    mean = np.nanmean(stacked, axis=0)
    variance = np.nanmean(variances, axis=0) + np.nanvar(stacked, axis=0)
    return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


class PatchCacheDataset(Dataset):
    """Items ``patch`` (3, H, W) uint8 and ``coords`` (2,) from a patch cache, read lazily.

    A thin torch view of :class:`stevs.io.patch_cache.PatchCache` (one HDF5 handle per
    process, so DataLoader workers are safe).
    """

    def __init__(self, path: str | os.PathLike, coords: np.ndarray) -> None:
        self.cache = PatchCache(path)
        n = len(self.cache)
        if coords.shape != (n, 2):
            raise ValueError(f"coords must be ({n}, 2), not {coords.shape}")
        self.coords = np.asarray(coords, np.float32)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        patch = self.cache[index]
        return {
            "patch": torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))),
            "coords": torch.from_numpy(self.coords[index]),
        }

    def close(self) -> None:
        self.cache.close()


# -- outputs -----------------------------------------------------------------------------------


def _atomic_write(path: Path, suffix: str, write: Any) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` and rename it when done."""
    with atomic_path(path, suffix=suffix) as tmp:
        write(tmp)
    return path


def visium_spatial_uns(
    tissue: TissueDetection, mpp: float, spot_um: float, image_path: str
) -> dict[str, Any]:
    """``uns["spatial"][library_id]`` of an H&E-only slide: its tissue thumbnail as ``hires``
    (the one builder, :func:`stevs.io.visium_uns.spatial_uns`)."""
    metadata = {"source_image_path": image_path, "images_source": "stevs thumbnail"}
    return spatial_uns(tissue.thumbnail, tissue.scale, spot_um / mpp, metadata=metadata)


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

    thumbnail, factor = resize_max(thumbnail, MAP_MAX_SIDE)  # plenty for a 4-inch panel
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


def _grid_obs(grid: SpotGrid, fractions: np.ndarray) -> Any:
    """``obs`` of the kept grid spots: Visium's columns and their disks' tissue fraction."""
    import pandas as pd

    return pd.DataFrame(
        {
            "in_tissue": np.ones(len(grid), np.int64),
            "array_row": grid.array_row,
            "array_col": grid.array_col,
            "tissue_fraction": fractions.astype(np.float32),
        },
        index=pd.Index(grid.barcodes, name="barcode"),
    )


def check_grid_options(
    grid: str, pitch_um: float, spot_um: float, min_tissue: float, image: str | os.PathLike
) -> None:
    """Refuse a grid or a minimum tissue fraction that makes no sense (naming the slide)."""
    check_grid_settings(grid, pitch_um, spot_um, image)
    if not 0.0 < min_tissue <= 1.0:
        raise StevsInputError(image, f"min tissue fraction must be in (0, 1], got {min_tissue!r}")


def _open_and_detect(
    image: str | os.PathLike, mpp: float | None
) -> tuple[float, str, tuple[int, int], TissueDetection]:
    """(µm per px, where it came from, level-0 size, tissue) of a slide image."""
    from stevs.io.slide import open_slide

    with open_slide(image, mpp=mpp) as slide:
        try:
            slide_mpp = slide.require_mpp()
        except StevsInputError as err:
            raise StevsInputError(
                image,
                "microns per pixel unknown: the file's metadata has none; give --mpp "
                "(or the 'mpp' column of the predict sheet)",
            ) from err
        return slide_mpp, str(slide.mpp_source), slide.dimensions, detect_tissue(slide, slide_mpp)


def _select_spots(
    image: str | os.PathLike,
    slide_id: str,
    tissue: TissueDetection,
    dimensions: tuple[int, int],
    mpp: float,
    mpp_source: str,
    grid: str,
    pitch_um: float,
    spot_um: float,
    min_tissue: float,
) -> tuple[SpotGrid, np.ndarray]:
    """The grid spots with at least ``min_tissue`` of their disk on tissue, and that share."""
    if not tissue.mask.any():
        raise StevsInputError(
            image,
            f"no tissue found: Otsu's threshold on saturation ({tissue.threshold}) leaves no "
            "piece of tissue larger than "
            f"{MIN_TISSUE_AREA_UM2 / 1e6:g} mm² (a blank or very faint slide?)",
        )
    full_grid = make_spot_grid(dimensions, mpp, grid, pitch_um, spot_um)
    fractions = spot_tissue_fractions(full_grid, tissue, mpp)
    keep = fractions >= min_tissue
    if not keep.any():
        raise StevsInputError(
            image,
            f"no tissue found under any {spot_um:g} µm spot of the {grid} grid "
            f"(min tissue fraction {min_tissue:g}; {100 * tissue.tissue_fraction:.2f}% of the "
            "thumbnail is tissue)",
        )
    spots = full_grid.subset(keep)
    log.info(
        "%s: %d x %d px at %g µm/px (%s); tissue %.1f%% of the slide; %d of %d %s grid spots "
        "(%g µm on a %g µm pitch) on tissue",
        slide_id,
        *dimensions,
        mpp,
        mpp_source,
        100 * tissue.tissue_fraction,
        len(spots),
        len(full_grid),
        grid,
        spot_um,
        pitch_um,
    )
    return spots, fractions[keep]


def _tile_grid(
    image_path: str,
    mpp: float,
    spots: SpotGrid,
    tissue: TissueDetection,
    out_path: Path,
    slide_id: str,
    scale: PatchScale,
    threads: int,
    progress: bool | None,
) -> Path:
    """Cut the patches of the grid spots (no slide AnnData on disk) and check their scale."""
    from stevs.io.slide import open_slide
    from stevs.tiling import tile_spots

    with open_slide(image_path, mpp=mpp) as slide:
        cache = tile_spots(
            slide,
            spots.barcodes,
            spots.xy_px,
            out_path,
            slide_id=slide_id,
            patch_px=scale.patch_px,
            patch_mpp=scale.mpp_target,
            threads=threads,
            progress=progress,
            tissue=tissue,
        )
    cached = read_patch_scale(cache)
    if not scale.matches(cached, rel_tol=SCALE_TOLERANCE):
        raise StevsInputError(cache, f"patch cache is {cached.describe()}, not {scale.describe()}")
    return cache


@dataclass(frozen=True)
class GridOptions:
    """How the virtual spots are laid: grid kind, pitch, spot diameter, minimum tissue."""

    grid: str = "visium"
    pitch_um: float = DEFAULT_PITCH_UM
    spot_um: float = DEFAULT_SPOT_UM
    min_tissue: float = DEFAULT_MIN_TISSUE


def _predict_cache(
    models: ModelSet,
    cache: Path,
    xy_px: np.ndarray,
    *,
    device: str,
    batch_size: int,
    n_samples: int,
    progress: bool | None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every model on the grid's patches, combined gene by gene -> (mean, std, checksums)."""
    from stevs.data import normalise_coords
    from stevs.methods import get_method
    from stevs.predict import predict_patches

    dataset = PatchCacheDataset(cache, normalise_coords(xy_px))
    means, stds, checksums = [], [], []
    try:
        for model_dir, config in zip(models.dirs, models.configs, strict=True):
            model, _ = get_method(config["method"]).entry("load")(model_dir, device=device)
            torch.manual_seed(0)  # seeded posterior samples: reruns give the same file
            mean, std = predict_patches(
                model, dataset, batch_size=batch_size, n_samples=n_samples,
                progress=progress is not False,
                view=str((config.get("training") or {}).get("embedding_view") or "none"),
            )  # fmt: skip
            means.append(mean)
            stds.append(std)
            checksums.append(ModelDir(model_dir).weights_sha256())
            del model
    finally:
        dataset.close()
    columns = [models.columns(i) for i in range(len(models.dirs))]
    mean, std = combine_predictions(means, stds, columns, len(models.genes))
    return mean, std, checksums


def _slide_meta(
    models: ModelSet, checksums: list[str], slide_id: str, info: dict[str, Any]
) -> dict[str, Any]:
    """``uns["stevs"]`` of an H&E-only prediction: models, ensemble rule and how it was cut."""
    methods = sorted({str(c.get("method")) for c in models.configs})
    normalisation = {k: v for k, v in models.normalisation.items() if k in ("method", "target_sum")}
    return {
        "slide": slide_id,
        "method": methods[0] if len(methods) == 1 else ",".join(methods),
        "fold": [str(c.get("fold", "")) for c in models.configs],
        "model_dirs": [str(d) for d in models.dirs],
        "model_sha256": checksums,
        "n_models": len(models.dirs),
        "ensemble": "per gene over the models that predict it: mean of means; "
        "std = sqrt(mean variance + variance of means)",
        "normalisation": {k: v for k, v in normalisation.items() if v is not None},
        **info,
        "stevs_version": __version__,
    }


def _draw_outputs(
    out: Path,
    adata: Any,
    models: ModelSet,
    map_genes: list[str],
    tissue: TissueDetection,
    spot_um: float,
    slide_mpp: float,
    slide_id: str,
) -> tuple[list[Path], Path]:
    """``maps/{gene}.png`` per chosen gene and the ``tissue.png`` QC picture."""
    xy_thumb = (np.asarray(adata.obsm["spatial"]) + 0.5) * tissue.scale
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
            )  # fmt: skip
        )
    qc = draw_tissue_qc(tissue, xy_thumb, diameter_thumb, slide_id)
    qc_path = _atomic_write(out / "tissue.png", ".png", lambda tmp: qc.save(tmp, format="PNG"))
    return maps, qc_path


def _check_inputs(
    image: str | os.PathLike, slide_id: str, mpp: float | None, layout: GridOptions
) -> None:
    """Refuse a bad grid, mpp or slide id before any work (naming the slide)."""
    check_grid_options(layout.grid, layout.pitch_um, layout.spot_um, layout.min_tissue, image)
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise StevsInputError(image, f"--mpp must be a positive number, got {mpp!r}")
    check_slide_id(slide_id, image)


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

    Stages: check the inputs and the models, detect tissue and lay the grid, tile the grid,
    predict with every model, write the prediction file, draw the maps. Writes
    ``{out_dir}/{slide_id}.h5ad``, ``{out_dir}/maps/{gene}.png`` and ``{out_dir}/tissue.png``;
    with ``keep_patches`` also ``{out_dir}/{slide_id}.patches.h5``.
    """
    layout = GridOptions(grid, pitch_um, spot_um, min_tissue)
    _check_inputs(image, slide_id, mpp, layout)
    image_path = str(Path(image).resolve())
    models = check_models(model_dirs)
    scale = resolve_patch_scale(models, patch_px, patch_um)
    map_genes = choose_genes(models, genes)
    out = Path(out_dir)
    clock = Clock()

    slide_mpp, mpp_source, dimensions, tissue = _open_and_detect(image, mpp)
    spots, fractions = _select_spots(
        image, slide_id, tissue, dimensions, slide_mpp, mpp_source, *astuple(layout)
    )
    clock.lap("tissue")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".predict-slide-{slide_id}-", dir=out))
    kept_patches: Path | None = None
    try:
        cache = _tile_grid(
            image_path, slide_mpp, spots, tissue, work / f"{slide_id}.patches.h5", slide_id,
            scale.scale, threads, progress,
        )  # fmt: skip
        clock.lap("tiling")
        mean, std, checksums = _predict_cache(
            models, cache, spots.xy_px, device=device, batch_size=batch_size,
            n_samples=n_samples, progress=progress,
        )  # fmt: skip
        clock.lap("predict")
        info = {
            "image_path": image_path, "mpp": float(slide_mpp), "mpp_source": mpp_source,
            "grid": grid, "spot_pitch_um": float(pitch_um), "spot_diameter_um": float(spot_um),
            "min_tissue": float(min_tissue), "tissue_threshold_saturation": int(tissue.threshold),
            "patch_px": scale.scale.patch_px, "patch_mpp": scale.scale.mpp_target,
            "patch_scale_source": scale.source,
        }  # fmt: skip
        images = {slide_id: visium_spatial_uns(tissue, slide_mpp, spot_um, image_path)}
        adata = new_prediction(
            mean, std, models.genes, SlideSpots(_grid_obs(spots, fractions), spots.xy_px, images),
            _slide_meta(models, checksums, slide_id, info), source=image,
        )  # fmt: skip
        adata.var["n_models"] = models.models_per_gene()
        adata_path = write_prediction(adata, out / f"{slide_id}.h5ad")
        if keep_patches:
            kept_patches = out / f"{slide_id}.patches.h5"
            os.replace(cache, kept_patches)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    maps, qc_path = _draw_outputs(
        out, adata, models, map_genes, tissue, spot_um, slide_mpp, slide_id
    )
    clock.lap("outputs")
    log.info(
        "%s: %d spots x %d genes -> %s; %d maps",
        slide_id, len(spots), len(models.genes), adata_path, len(maps),
    )  # fmt: skip
    return SlidePrediction(adata_path, maps, qc_path, len(spots), kept_patches, clock.seconds)


class Clock:
    """Wall seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


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
    from stevs.train import resolve_device

    resolve_device(args.device)  # a device this machine lacks stops here, before any work
    check_writable(args.out_dir)
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
