"""Tests of the spot grids defined once in stevs.geometry (used by the demo and stevs.spot_grid)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stevs import spot_grid
from stevs.demo import layout as demo_layout
from stevs.demo.constants import GRID_MARGIN_UM
from stevs.errors import StevsInputError
from stevs.geometry import (
    check_grid_settings,
    disk_lattice,
    grid_indices,
    grid_offsets_um,
    grid_shape,
    grid_steps_um,
    median_spot_pitch,
)


def test_visium_lattice_is_hexagonal_with_space_ranger_indices() -> None:
    rows, cols = grid_indices("visium", 6, 11)
    assert (rows % 2 == cols % 2).all()
    assert np.all(np.diff(rows) >= 0)  # row by row, columns ascending within a row
    assert len(rows) == 6 * 6 - 3  # 6 even columns on even rows, 5 odd ones on odd rows
    x, y = grid_offsets_um("visium", 100.0, rows, cols)
    points = np.stack([x, y], axis=1)
    dist = np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.inf)
    assert np.allclose(dist.min(axis=1), 100.0)
    assert grid_steps_um("visium", 100.0) == (100.0 * math.sqrt(3.0) / 2.0, 50.0)


def test_square_lattice_and_grid_shape_boundaries() -> None:
    rows, cols = grid_indices("square", 3, 4)
    assert len(rows) == 12 and rows.dtype == np.int64 and cols.dtype == np.int64
    x, y = grid_offsets_um("square", 40.0, rows, cols)
    assert set(np.unique(x)) == {0.0, 40.0, 80.0, 120.0} and set(np.unique(y)) == {0, 40, 80}
    assert grid_shape("square", 40.0, 120.0, 80.0) == (3, 4)  # a spot exactly on the edge fits
    assert grid_shape("square", 40.0, 119.9, 80.0) == (3, 3)
    assert grid_shape("square", 40.0, -1.0, 80.0) == (0, 0)
    assert grid_shape("visium", 100.0, 100.0, 86.61) == (2, 3)


def test_demo_and_predict_slide_grids_are_the_same_lattice() -> None:
    mpp = 1.0
    demo_grid = demo_layout.make_spot_grid(seed=0, size_um=1000.0, offset_um=(0.0, 0.0))
    # predict_slide's grid over an image whose usable extent (minus a spot radius on each
    # side) equals the demo's (minus its margin on each side): the same spots
    side_px = round(1000.0 - 2 * GRID_MARGIN_UM + 55.0)
    slide_grid = spot_grid.make_spot_grid((side_px, side_px), mpp)
    np.testing.assert_array_equal(demo_grid.array_row, slide_grid.array_row)
    np.testing.assert_array_equal(demo_grid.array_col, slide_grid.array_col)
    demo_xy = np.stack([demo_grid.x_um, demo_grid.y_um], axis=1) - GRID_MARGIN_UM
    slide_xy = (slide_grid.xy_px + 0.5) * mpp - 27.5
    np.testing.assert_allclose(demo_xy, slide_xy, atol=1e-9)


def test_disk_lattice_covers_the_disk() -> None:
    points = disk_lattice(27.5, 2.5)
    assert (np.hypot(points[:, 0], points[:, 1]) <= 27.5).all()
    assert len(points) * 2.5**2 == pytest.approx(math.pi * 27.5**2, rel=0.03)
    np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_array_equal(disk_lattice(0.1, 1.0), [[0.0, 0.0]])  # tiny: the centre


@pytest.mark.parametrize(
    ("kind", "pitch", "spot", "message"),
    [
        ("hexagon", 100.0, 55.0, "unknown grid"),
        ("visium", 0.0, 55.0, "pitch"),
        ("square", 100.0, float("nan"), "spot diameter"),
    ],
)
def test_nonsense_grids_are_refused_naming_the_slide(kind, pitch, spot, message) -> None:
    with pytest.raises(StevsInputError, match=message) as info:
        check_grid_settings(kind, pitch, spot, "slide.tif")
    assert str(info.value).startswith("slide.tif")


def test_median_spot_pitch_of_a_visium_grid_with_jitter_and_gaps() -> None:
    rows, cols = grid_indices("visium", 8, 15)
    x, y = grid_offsets_um("visium", 100.0, rows, cols)
    centres = np.stack([x, y], axis=1)
    jitter = np.random.default_rng(0).normal(0, 0.5, centres.shape)
    assert median_spot_pitch(centres + jitter) == pytest.approx(100.0, abs=1.0)
    assert median_spot_pitch(np.delete(centres, [3, 17, 30], axis=0)) == pytest.approx(100.0)
    assert median_spot_pitch(centres[:1]) == 0.0 and median_spot_pitch(np.zeros((0, 2))) == 0.0
