"""``stevs ingest``: one slide's image + expression -> the slide AnnData of DESIGN.md.

Microns per pixel come, in this order, from the sample sheet, the image's metadata, or
the spot grid (median nearest-neighbour distance = the technology's pitch: 100 µm for
Visium, 200 µm for legacy ST); the source is recorded in ``uns["stevs"]["mpp_source"]``
and logged.

``uns["spatial"][slide_id]`` (:mod:`stevs.io.visium_uns`) makes the slide AnnData draw over
its H&E with ``scanpy.pl.spatial``: Space Ranger's own hires/lowres PNGs and scale factors
when the ``outs/spatial/`` folder has them (and they fit the image), else thumbnails of the
slide image (longest side 2000 and 600 px) with their scale factors.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from stevs.errors import StevsInputError
from stevs.io.expression import (
    SPOT_GEOMETRY_UM,
    estimate_mpp_from_spot_grid,
    estimate_spot_pitch_px,
    read_h5ad_expression,
    read_hest,
    read_legacy_st,
    read_spatialdata,
    read_visium,
    read_visium_hd,
)
from stevs.io.samples import read_sample_sheet
from stevs.io.slide import MAX_UPSAMPLING, open_slide
from stevs.io.slide_adata import SlideMeta, slide_meta, write_slide_adata
from stevs.io.visium_uns import (
    SpaceRangerImage,
    slide_spatial_uns,
    spaceranger_image,
    spaceranger_spatial_uns,
)

log = logging.getLogger(__name__)

#: disagreement between metadata mpp and the spot grid's estimate that earns a warning
MPP_MISMATCH_WARNING = 0.2
#: drawn spot diameter / spot pitch where the technology's diameter is unknown (Visium's)
DRAWN_SPOT_TO_PITCH = 0.55


def read_expression(fmt: str, expression: str | os.PathLike, spots: str | None) -> ad.AnnData:
    """Dispatch to the reader of a sample-sheet ``format``."""
    if fmt == "visium":
        return read_visium(expression)
    if fmt == "st":
        if not spots:
            raise StevsInputError(expression, "legacy ST counts need a spot file")
        return read_legacy_st(expression, spots)
    if fmt == "h5ad":
        return read_h5ad_expression(expression)
    readers = {"visium_hd": read_visium_hd, "hest": read_hest, "spatialdata": read_spatialdata}
    if fmt in readers:
        return readers[fmt](expression)
    raise StevsInputError(expression, f"unknown expression format '{fmt}'")


def _technology(fmt: str, adata: ad.AnnData, source: dict[str, Any]) -> str:
    if source.get("technology"):
        return str(source["technology"])
    if fmt in SPOT_GEOMETRY_UM:
        return fmt
    return "visium" if "scalefactors" in adata.uns else "unknown"


def _resolve_mpp(
    slide_mpp: float | None,
    slide_mpp_source: str | None,
    adata: ad.AnnData,
    technology: str,
    image_path: str,
) -> tuple[float, str]:
    grid_mpp = None
    if technology in SPOT_GEOMETRY_UM and adata.n_obs >= 3:
        grid_mpp = estimate_mpp_from_spot_grid(adata, technology)
    if slide_mpp is not None:
        if grid_mpp is not None and abs(grid_mpp / slide_mpp - 1) > MPP_MISMATCH_WARNING:
            log.warning(
                "%s: mpp %.4g (%s) disagrees with %.4g estimated from the %s spot grid; "
                "check that image and expression belong together",
                image_path,
                slide_mpp,
                slide_mpp_source,
                grid_mpp,
                technology,
            )
        return slide_mpp, str(slide_mpp_source)
    if "source_mpp" in adata.uns:
        return float(adata.uns["source_mpp"]), "h5ad"
    if grid_mpp is not None:
        log.warning(
            "%s: no mpp in the sample sheet or the image metadata; estimated %.4f µm/px from "
            "the %s spot pitch (%g µm)",
            image_path,
            grid_mpp,
            technology,
            SPOT_GEOMETRY_UM[technology][0],
        )
        return grid_mpp, "spot_grid"
    raise StevsInputError(
        image_path,
        "microns per pixel unknown: not in the sample sheet, the image metadata, or "
        "derivable from the spot grid; set the 'mpp' column",
    )


def _check_spots_inside(adata: ad.AnnData, size: tuple[int, int], image_path: str) -> None:
    xy = adata.obsm["spatial"]
    if not np.isfinite(xy).all():
        bad = int((~np.isfinite(xy)).any(axis=1).sum())
        raise StevsInputError(image_path, f"{bad} spots have missing (NaN) pixel coordinates")
    width, height = size
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if outside.any():
        examples = ", ".join(adata.obs_names[outside][:3])
        raise StevsInputError(
            image_path,
            f"{int(outside.sum())} of {adata.n_obs} spot centres lie outside the image "
            f"({width} x {height} px), e.g. {examples}: wrong image, or coordinates of "
            "another resolution?",
        )


def _drawn_spot_diameter_px(adata: ad.AnnData, diameter_px: float, size: tuple[int, int]) -> float:
    """The spot diameter ``scanpy.pl.spatial`` draws, in level-0 px: the technology's, else
    :data:`DRAWN_SPOT_TO_PITCH` of the spot pitch, else 1% of the image's longest side."""
    if np.isfinite(diameter_px) and diameter_px > 0:
        return float(diameter_px)
    if adata.n_obs >= 3:
        pitch = estimate_spot_pitch_px(np.asarray(adata.obsm["spatial"]))
        if np.isfinite(pitch) and pitch > 0:
            return DRAWN_SPOT_TO_PITCH * pitch
    return max(size) / 100


def _image_entry(
    spatial_dir: Path | None, slide: Any, diameter_px: float, image: Any, level0_scalef: float
) -> dict:
    """``uns["spatial"][slide_id]``: Space Ranger's images if usable, else the slide's."""
    image_path = str(Path(image).resolve())
    if spatial_dir is not None:
        entry = spaceranger_spatial_uns(spatial_dir, slide.dimensions, image_path, level0_scalef)
        if entry is not None:
            return entry
    return slide_spatial_uns(slide, diameter_px, image_path)


def _onto_spaceranger_image(
    adata: ad.AnnData, png: SpaceRangerImage, source: dict[str, Any], diameter_um: float
) -> dict[str, Any]:
    """Spot centres (full-resolution px) scaled onto Space Ranger's hires / lowres PNG given
    as the image; ``source``'s mpp set to the PNG's (the full-resolution mpp, else the spot
    diameter over ``spot_diameter_fullres``, divided by the scale factor). Returns the scale
    factors with the PNG as level 0."""
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=float) * png.scalef
    scalef_key = f"tissue_{png.key}_scalef"
    if source.get("mpp") is not None:
        source["mpp"] = float(source["mpp"]) / png.scalef
        source["mpp_source"] = f"{source.get('mpp_source')} / {scalef_key}"
    elif (fullres := png.fullres_mpp(diameter_um)) is not None:
        source["mpp"] = fullres / png.scalef
        how = "microns_per_pixel" if "microns_per_pixel" in png.factors else "spot_diameter_fullres"
        source["mpp_source"] = f"scalefactors:{how} / {scalef_key}"
    source.setdefault("spatial_dir", str(png.path.parent))
    return png.image_frame()


def _warn_spaceranger_resolution(png: SpaceRangerImage, mpp: float, diameter_um: float) -> None:
    """One line: the PNG's resolution and what it means for patches."""
    spot = f"a {diameter_um:g} µm spot spans {diameter_um / mpp:.0f} px" if diameter_um > 0 else ""
    log.warning(
        "%s: Space Ranger's %s image (%.4g of the full-resolution scan) as the slide image: "
        "%.3g µm/px, %s; patches finer than %.3g µm/px are upsampled from it and stevs tile "
        "refuses those finer than %.3g µm/px (e.g. 224 px at 0.5 µm/px would be %.1fx "
        "upsampled); give the full-resolution image where you have it",
        png.path, png.key, png.scalef, mpp, spot or "spot size unknown", mpp,
        mpp / MAX_UPSAMPLING, mpp / 0.5,
    )  # fmt: skip


def build_slide_adata(
    slide_id: str,
    image: str | os.PathLike,
    expression: str | os.PathLike,
    fmt: str,
    patient: str | None = None,
    spots: str | None = None,
    mpp: float | None = None,
) -> ad.AnnData:
    """Read one slide's expression, check it against its image, attach metadata."""
    adata = read_expression(fmt, expression, spots)
    source = adata.uns.pop("source_meta", None) or {}
    technology = _technology(fmt, adata, source)
    pitch_um, diameter_um = SPOT_GEOMETRY_UM.get(technology, (float("nan"), float("nan")))
    pitch_um = float(source.get("spot_pitch_um", pitch_um))
    diameter_um = float(source.get("spot_diameter_um", diameter_um))
    scalefactors = adata.uns.pop("scalefactors", None)
    png = spaceranger_image(image)
    if png is not None:
        scalefactors = _onto_spaceranger_image(adata, png, source, diameter_um)
    source_mpp = None if mpp is not None else source.get("mpp")  # the sheet's mpp wins
    with open_slide(image, mpp=mpp if source_mpp is None else source_mpp) as slide:
        size = slide.dimensions
        mpp_label = slide.mpp_source if source_mpp is None else source["mpp_source"]
        slide_mpp, mpp_source = _resolve_mpp(slide.mpp, mpp_label, adata, technology, str(image))
        _check_spots_inside(adata, size, str(image))
        adata.uns.pop("source_mpp", None)
        if scalefactors and "spot_diameter_fullres" in scalefactors and "mpp" not in source:
            diameter_um = float(scalefactors["spot_diameter_fullres"]) * slide_mpp
        drawn_px = _drawn_spot_diameter_px(adata, diameter_um / slide_mpp, size)
        spatial_dir = (Path(expression) / "spatial") if fmt == "visium" else None
        if source.get("spatial_dir"):
            spatial_dir = Path(source["spatial_dir"])
        level0_scalef = 1.0 if png is None else png.scalef
        entry = _image_entry(spatial_dir, slide, drawn_px, image, level0_scalef)
        adata.uns["spatial"] = {slide_id: entry}
    if png is not None:
        _warn_spaceranger_resolution(png, slide_mpp, diameter_um)
    patient = patient or source.get("patient") or None
    meta = SlideMeta(
        slide=slide_id,
        patient=patient or slide_id,
        mpp=float(slide_mpp),
        mpp_source=mpp_source,
        spot_diameter_um=float(diameter_um),
        spot_pitch_um=float(pitch_um),
        technology=technology,
        image_path=str(Path(image).resolve()),
        image_width=int(size[0]),
        image_height=int(size[1]),
        expression_path=str(Path(expression).resolve()),
        spots_path=str(Path(spots).resolve()) if spots else "",
    )
    adata.uns["stevs"] = meta.to_uns()
    log.info(
        "%s: %d spots x %d genes, %.0f counts per spot (median), mpp %.4f (%s)",
        slide_id,
        adata.n_obs,
        adata.n_vars,
        float(np.median(np.asarray(adata.X.sum(axis=1)))),
        slide_mpp,
        mpp_source,
    )
    return adata


def ingest_from_sheet(
    sample_sheet: str | os.PathLike,
    slide_id: str,
    out: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
) -> Path:
    """Ingest one row of a sample sheet into ``out``."""
    sheet = read_sample_sheet(sample_sheet, data_root=data_root)
    if slide_id not in sheet.index:
        raise StevsInputError(sample_sheet, f"no row with slide_id '{slide_id}'")
    row = sheet.loc[slide_id]
    adata = build_slide_adata(
        slide_id,
        row["image"],
        row["expression"],
        row["format"],
        patient=row["patient"],
        spots=row["spots"] or None,
        mpp=row["mpp"],
    )
    return write_slide_adata(adata, slide_meta(adata), out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-sheet", required=True, help="samples.tsv")
    parser.add_argument("--slide-id", required=True, help="the row to ingest")
    parser.add_argument(
        "--data-root",
        default=None,
        help="base for relative paths in the sheet (default: the sheet's own folder)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="slide AnnData to write (the workflow: results/slides/{slide}.h5ad)",
    )


def run(args: argparse.Namespace) -> None:
    path = ingest_from_sheet(args.sample_sheet, args.slide_id, args.out, args.data_root)
    log.info("wrote %s", path)
