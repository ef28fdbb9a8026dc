"""Apply trained models to H&E-only slides: expression maps on a virtual spot grid.

``stevs predict-slide`` (and :func:`predict_slide`) does, for one slide image:

1. **Tissue**: :func:`stevs.tissue.detect_tissue`, the tissue detection the tiler uses too:
   a thumbnail (longest side at most 2000 px, read block by block so memory stays bounded),
   Otsu's threshold on its saturation and morphology in physical units (closing, hole
   filling, opening, removal of specks).
2. **Spot grid** (:mod:`stevs.spot_grid`): Visium's hexagonal grid (55 µm spots on a 100 µm
   pitch) by default, or a square grid of a chosen pitch (:mod:`stevs.geometry`), over the
   whole image; a spot is kept when at least ``min_tissue`` of its disk lies on tissue.
3. **Patches**: the tiler (:func:`stevs.tiling.tile_spots`) cuts the kept spots into a patch
   cache at the patch scale the model was trained with.
4. **Prediction**: every model (one fold's, or all folds') predicts from the patch cache,
   read lazily, with the per-slide coordinate normalisation of :mod:`stevs.data`. Several
   models are combined as an ensemble (:mod:`stevs.ensemble`): mean of the means, and std
   ``sqrt(mean of variances + variance of means)`` (law of total variance).
5. **Outputs** in ``out_dir``: ``{slide}.h5ad``, a Visium-like AnnData (``X`` predicted
   expression in the models' normalisation, ``layers["std"]``, ``obsm["spatial"]`` in
   level-0 px, ``uns["spatial"][slide]`` with ``hires``/``lowres`` images and scale factors
   as Space Ranger writes them, so ``scanpy.pl.spatial`` and squidpy draw it as Visium);
   ``maps/{gene}.png`` (mean and std over the thumbnail) per chosen gene; ``tissue.png``
   (QC: the tissue mask and the spots), drawn by :mod:`stevs.maps`.

The patch scale of the models is resolved by :func:`stevs.ensemble.model_patch_scale` (its
module docstring lists the sources).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from stevs import __version__
from stevs.atomic import check_replaceable, check_writable, is_stevs_png, stevs_png_info
from stevs.ensemble import (
    SCALE_TOLERANCE,
    ModelSet,
    check_models,
    choose_genes,
    combine_predictions,
    resolve_patch_scale,
)
from stevs.errors import StevsInputError
from stevs.geometry import GRID_KINDS
from stevs.ids import check_slide_id
from stevs.io.model_dir import ModelDir
from stevs.io.patch_cache import PatchCache, PatchScale, read_patch_scale
from stevs.io.prediction import is_prediction_file, new_prediction, write_prediction
from stevs.io.slide import MPP_RANGE
from stevs.io.slide_adata import SlideSpots
from stevs.io.visium_uns import spatial_uns
from stevs.maps import draw_gene_map, draw_tissue_qc, gene_map_path, write_atomically
from stevs.options import in_range, positive_float, positive_int
from stevs.spot_grid import (
    DEFAULT_MIN_TISSUE,
    DEFAULT_PITCH_UM,
    DEFAULT_SPOT_UM,
    GridOptions,
    SpotGrid,
    check_grid_options,
    grid_obs,
    select_spots,
)
from stevs.tiling_checks import PATCH_PX_RANGE
from stevs.tissue import THUMBNAIL_PX, TissueDetection, detect_tissue

log = logging.getLogger("stevs.predict_slide")

#: longest side of the thumbnail used for tissue detection, the maps and ``hires``
HIRES_MAX_SIDE = THUMBNAIL_PX


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


def visium_spatial_uns(
    tissue: TissueDetection, mpp: float, spot_um: float, image_path: str
) -> dict[str, Any]:
    """``uns["spatial"][library_id]`` of an H&E-only slide: its tissue thumbnail as ``hires``
    (the one builder, :func:`stevs.io.visium_uns.spatial_uns`)."""
    metadata = {"source_image_path": image_path, "images_source": "stevs thumbnail"}
    return spatial_uns(tissue.thumbnail, tissue.scale, spot_um / mpp, metadata=metadata)


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
                gene_map_path(out, gene),
            )  # fmt: skip
        )
    qc = draw_tissue_qc(tissue, xy_thumb, diameter_thumb, slide_id)
    qc_path = write_atomically(
        out / "tissue.png", ".png", lambda tmp: qc.save(tmp, format="PNG", pnginfo=stevs_png_info())
    )
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
    pictures = [out / "tissue.png", *(gene_map_path(out, gene) for gene in map_genes)]
    check_replaceable(
        {**dict.fromkeys(pictures, is_stevs_png), out / f"{slide_id}.h5ad": is_prediction_file}
    )
    clock = Clock()

    slide_mpp, mpp_source, dimensions, tissue = _open_and_detect(image, mpp)
    spots, fractions = select_spots(
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
            mean, std, models.genes, SlideSpots(grid_obs(spots, fractions), spots.xy_px, images),
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
    from stevs.predict import add_sampling_arguments

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="H&E slide image, any supported format (or --sheet)")
    source.add_argument(
        "--sheet",
        help="predict sheet (slide_id, image, mpp): take the --slide-id row's image (or --image)",
    )
    parser.add_argument(
        "--data-root",
        help="folder the sheet's image paths are relative to (default: the sheet's folder)",
    )
    parser.add_argument("--slide-id", required=True, help="name of the slide in the outputs")
    parser.add_argument(
        "--mpp",
        type=in_range(*MPP_RANGE),
        help="µm per level-0 pixel (default: the sheet's, else the image's metadata)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        required=True,
        help="model folders (results/models/{encoder}/{method}/seed{seed}/{fold}); several are "
        "averaged as an ensemble",
    )
    parser.add_argument("--out-dir", required=True, help="writes ID.h5ad, maps/*.png, tissue.png")
    parser.add_argument("--grid", choices=GRID_KINDS, default="visium", help="spot grid (visium)")
    parser.add_argument(
        "--pitch-um", type=positive_float(), default=DEFAULT_PITCH_UM, help="spot pitch (100)"
    )
    parser.add_argument(
        "--spot-um", type=positive_float(), default=DEFAULT_SPOT_UM, help="spot diameter (55)"
    )
    parser.add_argument(
        "--min-tissue",
        type=in_range(0, 1),
        default=DEFAULT_MIN_TISSUE,
        help="share of a spot's disk on tissue for it to be kept (0.5)",
    )
    parser.add_argument(
        "--genes", nargs="+", help="genes to draw as maps (default: up to 6 headline genes)"
    )
    parser.add_argument(
        "--patch-px",
        type=in_range(*PATCH_PX_RANGE, integer=True),
        help="patch side the models expect (checked; default: theirs)",
    )
    parser.add_argument(
        "--patch-um",
        type=positive_float(),
        help="patch side in µm the models expect, checked (default: the models')",
    )
    parser.add_argument(
        "--threads", type=positive_int(), default=1, help="tiling readers and torch threads"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    add_sampling_arguments(parser)
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
    from stevs.device import resolve_device

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
    passed = (
        "grid", "pitch_um", "spot_um", "min_tissue", "genes", "patch_px", "patch_um",
        "threads", "device", "batch_size", "keep_patches",
    )  # fmt: skip
    result = predict_slide(
        image, args.slide_id, args.models, args.out_dir, mpp=mpp, n_samples=args.samples,
        **{name: getattr(args, name) for name in passed},
    )  # fmt: skip
    log.info(
        "wrote %s (%d spots), %s and %d maps",
        result.adata,
        result.n_spots,
        result.qc,
        len(result.maps),
    )
    return 0
