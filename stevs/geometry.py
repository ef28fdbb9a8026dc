"""Spot grids defined once: Visium's hexagonal lattice and a square lattice, in µm.

Visium: 55 µm spots on a 100 µm pitch; rows ``pitch * sqrt(3) / 2`` apart, spots ``pitch``
apart within a row, odd rows shifted by half a pitch, and ``array_col`` counting half
pitches (even on even rows, odd on odd rows) as Space Ranger numbers them. Square: rows and
columns ``pitch`` apart. Positions are relative to the grid's first spot (row 0, col 0);
callers add their own origin. Used by the demo generator (:mod:`stevs.demo`) and by the
virtual spot grid of H&E-only prediction (:mod:`stevs.spot_grid`). :func:`median_spot_pitch`
measures the pitch of spots given (ingest, folds, the neighbourhood context of
:mod:`stevs.models.context`).
"""

from __future__ import annotations

import math
import os

import numpy as np

from stevs.errors import StevsInputError

GRID_KINDS = ("visium", "square")
VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_UM = 55.0
#: plausible microns per level-0 pixel of a slide (sample sheets, slide metadata, options)
MPP_RANGE = (0.05, 20.0)


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


def grid_steps_um(kind: str, pitch_um: float) -> tuple[float, float]:
    """(row step, column step) in µm: one ``array_row`` / ``array_col`` apart."""
    if kind == "visium":
        return pitch_um * math.sqrt(3.0) / 2.0, pitch_um / 2
    return pitch_um, pitch_um


def grid_shape(kind: str, pitch_um: float, width_um: float, height_um: float) -> tuple[int, int]:
    """(rows, columns) of array positions whose spot centres fit in a ``width x height`` box.

    The first spot sits on the box's top-left corner; no rows when the box is empty.
    """
    if width_um < 0 or height_um < 0:
        return 0, 0
    row_step, col_step = grid_steps_um(kind, pitch_um)
    return int(height_um // row_step) + 1, int(width_um // col_step) + 1


def grid_indices(kind: str, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(array_row, array_col) int64 of the spots, row by row; Visium keeps col % 2 == row % 2."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel().astype(np.int64), cols.ravel().astype(np.int64)
    if kind == "visium":
        on_grid = (cols % 2) == (rows % 2)
        rows, cols = rows[on_grid], cols[on_grid]
    return rows, cols


def grid_offsets_um(
    kind: str, pitch_um: float, array_row: np.ndarray, array_col: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) µm of spots relative to the spot at row 0, column 0."""
    row_step, col_step = grid_steps_um(kind, pitch_um)
    return array_col * col_step, array_row * row_step


def disk_lattice(radius: float, step: float) -> np.ndarray:
    """(n, 2) offsets of a square lattice (``step`` apart, centred) inside a disk.

    Used to average a field over a spot; a disk smaller than the lattice gives its centre.
    """
    r = np.arange(-radius + step / 2, radius, step)
    dx, dy = np.meshgrid(r, r)
    inside = dx**2 + dy**2 <= radius**2
    if not inside.any():
        return np.zeros((1, 2))
    return np.stack([dx[inside], dy[inside]], axis=1)


def median_spot_pitch(centres: np.ndarray) -> float:
    """Median distance from each of (N, 2) spot centres to its nearest other one (0 if N < 2).

    The spot pitch of a grid without metadata, in the centres' units; robust to a few
    missing or jittered spots.
    """
    from scipy.spatial import cKDTree  # here: `stevs tile` imports this module, not scipy

    centres = np.asarray(centres, dtype=np.float64)
    if len(centres) < 2:
        return 0.0
    distance, _ = cKDTree(centres).query(centres, k=2)
    return float(np.median(distance[:, 1]))
