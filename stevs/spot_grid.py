"""The virtual spot grid of an H&E-only slide: spots laid over the whole image, kept on tissue.

Visium's hexagonal grid (55 µm spots on a 100 µm pitch) by default, or a square grid of a
chosen pitch (the lattices of :mod:`stevs.geometry`), over the whole image; a spot is kept
when at least ``min_tissue`` of its disk lies on the tissue that :func:`stevs.tissue.detect_tissue`
found. Used by :mod:`stevs.predict_slide`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from stevs.errors import StevsInputError
from stevs.geometry import (
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    check_grid_settings,
    grid_indices,
    grid_offsets_um,
    grid_shape,
)
from stevs.tissue import MIN_TISSUE_AREA_UM2, TissueDetection

log = logging.getLogger(__name__)

DEFAULT_PITCH_UM = VISIUM_PITCH_UM
DEFAULT_SPOT_UM = VISIUM_SPOT_UM
#: share of a spot's disk that must lie on tissue for the spot to be kept
DEFAULT_MIN_TISSUE = 0.5


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
        """Number of spots."""
        return len(self.xy_px)

    def subset(self, keep: np.ndarray) -> SpotGrid:
        """The spots selected by ``keep`` (a boolean mask or indices)."""
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


@dataclass(frozen=True)
class GridOptions:
    """How the virtual spots are laid: grid kind, pitch, spot diameter, minimum tissue."""

    grid: str = "visium"
    pitch_um: float = DEFAULT_PITCH_UM
    spot_um: float = DEFAULT_SPOT_UM
    min_tissue: float = DEFAULT_MIN_TISSUE


def check_grid_options(
    grid: str, pitch_um: float, spot_um: float, min_tissue: float, image: str | os.PathLike
) -> None:
    """Refuse a grid or a minimum tissue fraction that makes no sense (naming the slide)."""
    check_grid_settings(grid, pitch_um, spot_um, image)
    if not 0.0 < min_tissue <= 1.0:
        raise StevsInputError(image, f"min tissue fraction must be in (0, 1], got {min_tissue!r}")


def grid_obs(grid: SpotGrid, fractions: np.ndarray) -> Any:
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


def select_spots(
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
