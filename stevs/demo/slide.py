"""One demo slide end to end: scene, H&E TIFF, spot expression, Space Ranger outs, truth file."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from stevs.demo.constants import TYPE_NAMES
from stevs.demo.fields import seeded_rng
from stevs.demo.files import write_npz
from stevs.demo.genes import GeneModel, SpotExpression, draw_counts, simulate_spot_expression
from stevs.demo.layout import (
    SlideScene,
    SpotGrid,
    SpotTruth,
    make_scene,
    make_spot_grid,
    spot_truth,
)
from stevs.demo.render import pyramid_levels, render_slide, write_pyramidal_tiff
from stevs.demo.spaceranger import write_spaceranger_outs

logger = logging.getLogger("stevs.demo")


def _write_truth(
    path: Path,
    scene: SlideScene,
    genes: GeneModel,
    grid: SpotGrid,
    truth: SpotTruth,
    spots: SpotExpression,
) -> None:
    """Write ``truth/{slide}.npz`` (the keys of :data:`~stevs.demo.constants.TRUTH_KEYS`)."""
    mpp = scene.mpp
    keep = truth.in_tissue
    baseline, effects = genes.for_patient(scene.patient)
    spot_xy_px = np.stack([np.rint(grid.x_um / mpp), np.rint(grid.y_um / mpp)], axis=1)[keep]
    write_npz(
        path,
        {
            "slide_id": np.array(scene.slide_id),
            "patient": np.array(scene.patient),
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
            "spot_tissue_fraction": spots.tissue_fraction.astype(np.float32),
            "spot_size_factor": spots.size_factor,
            "spot_log_rate": spots.log_rate.astype(np.float32),
            "spot_expected_counts": spots.expected.astype(np.float32),
            "stain_h": scene.stain_h,
            "stain_e": scene.stain_e,
        },
    )


def make_slide(
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
    rng = seeded_rng(seed, 300, key)
    spots = simulate_spot_expression(
        genes, patient, truth.composition[keep], scene.depth_factor, rng
    )

    fields = {"slide_id": slide_id, "patient": patient, "image": image_path.name}
    if with_expression:
        counts = draw_counts(genes, spots.expected, rng)
        fields["expression"] = write_spaceranger_outs(
            out_dir, slide_id, grid, keep, counts, levels, mpp, genes.names, header
        )
        logger.info(
            "%s: %d of %d spots in tissue, median %d counts per spot",
            slide_id,
            keep.sum(),
            keep.size,
            int(np.median(counts.sum(axis=1))) if keep.any() else 0,
        )

    _write_truth(out_dir / "truth" / f"{slide_id}.npz", scene, genes, grid, truth, spots)
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
