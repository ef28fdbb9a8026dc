"""Tests of the one tissue detection of stevs (stevs.tissue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from stevs.io.slide import open_slide
from stevs.tissue import (
    MIN_TISSUE_SATURATION,
    TissueDetection,
    clean_mask,
    detect_tissue,
    saturation,
    saturation_threshold,
)
from tests.conftest import write_pyramid_tiff

GLASS, TISSUE = (243, 242, 245), (215, 140, 190)


def test_saturation_is_hsv_saturation_even_for_strong_colours() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)  # (max - min) * 255 overflows 16-bit integers
    expected = np.floor(rgb2hsv(rgb)[..., 1] * 255 + 1e-9).astype(np.uint8)
    np.testing.assert_array_equal(saturation(rgb), expected)
    assert saturation(rgb)[0, 0] == 255 and saturation(np.zeros((1, 1, 3), np.uint8)) == 0


def test_threshold_is_skimage_otsu_with_a_floor() -> None:
    values = np.r_[np.full(500, 30, np.uint8), np.full(300, 120, np.uint8)]
    assert saturation_threshold(values) == int(threshold_otsu(values))
    assert 30 <= saturation_threshold(values) < 120
    faint = np.r_[np.full(500, 2, np.uint8), np.full(300, 9, np.uint8)]
    assert saturation_threshold(faint) == MIN_TISSUE_SATURATION  # glass noise: no tissue
    # one saturation only: no two classes, the floor decides (uniform tissue stays tissue)
    assert saturation_threshold(np.full(100, 92, np.uint8)) == MIN_TISSUE_SATURATION


def test_clean_mask_fills_holes_drops_specks_and_respects_the_border() -> None:
    um_per_px = 2.0
    mask = np.zeros((300, 300), bool)
    mask[:, :150] = True  # tissue touching three image borders
    mask[100:110, 60:70] = False  # a hole inside the tissue
    mask[40, :150] = False  # a 2 µm crack through the tissue
    mask[200:204, 250:254] = True  # a 64 µm² speck on the glass
    mask[20:140, 220:290] = True  # a 0.034 mm² piece: kept
    cleaned = clean_mask(mask, um_per_px)
    assert cleaned[100:110, 60:70].all() and cleaned[40, :140].all()
    assert not cleaned[200:204, 250:254].any()
    assert cleaned[30:130, 230:280].all()
    assert cleaned[:, :140].all()  # corners on the image border are not rounded away
    assert not cleaned[:, 160:210].any()


def test_detection_fractions_of_boxes_and_disks_agree(tmp_path: Path) -> None:
    image = np.full((400, 600, 3), GLASS, np.uint8)
    image[:, :300] = TISSUE  # left half tissue
    slide_path = write_pyramid_tiff(tmp_path / "s.tif", image, mpp=2.0, n_levels=2)
    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide)
    assert isinstance(tissue, TissueDetection)
    assert tissue.mask.shape == (400, 600) and tissue.scale == 1.0 and tissue.um_per_px == 2.0
    assert MIN_TISSUE_SATURATION <= tissue.threshold < saturation(np.array([[TISSUE]]))[0, 0]
    assert tissue.tissue_fraction == pytest.approx(0.5, abs=0.01)
    centres = np.array([[100.0, 200.0], [299.5, 200.0], [500.0, 200.0]])  # tissue, edge, glass
    boxes = np.concatenate([centres - 20, centres + 20], axis=1) + 0.5
    np.testing.assert_allclose(tissue.box_fractions(boxes), [1.0, 0.5, 0.0], atol=0.03)
    np.testing.assert_allclose(tissue.disk_fractions(centres, 40.0), [1.0, 0.5, 0.0], atol=0.05)
    outside = np.array([[-30.0, -30.0, 10.0, 10.0]])  # 1/16 of it on the slide, on tissue
    assert tissue.box_fractions(outside)[0] == pytest.approx(100 / 1600, abs=0.01)


def test_thumbnail_of_a_large_slide_is_bounded(tmp_path: Path) -> None:
    image = np.full((300, 2400, 3), GLASS, np.uint8)
    image[:, 600:1800] = TISSUE
    slide_path = write_pyramid_tiff(tmp_path / "wide.tif", image, mpp=1.0, n_levels=3)
    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide, max_px=1200)
    assert tissue.thumbnail.shape == (150, 1200, 3) and tissue.scale == 0.5
    assert tissue.um_per_px == 2.0
    assert tissue.mask[:, 320:880].all() and not tissue.mask[:, :280].any()


@pytest.mark.parametrize("radius", [1, 2, 3, 6, 9])
def test_disk_morphology_equals_scipy_with_skimage_disks(radius: int) -> None:
    from scipy import ndimage
    from skimage.morphology import disk

    from stevs.tissue import disk_dilate, disk_erode

    rng = np.random.default_rng(radius)
    mask = ndimage.binary_opening(rng.random((90, 130)) > 0.35)  # blobs, holes, edges
    footprint = disk(radius)
    for border in (True, False):
        expected = ndimage.binary_erosion(mask, footprint, border_value=int(border))
        np.testing.assert_array_equal(disk_erode(mask, radius, border), expected)
    np.testing.assert_array_equal(
        disk_dilate(mask, radius), ndimage.binary_dilation(mask, footprint)
    )


def _random_masks(seed: int, count: int) -> list[np.ndarray]:
    """Noise, blobs with holes, and the edge cases (empty, full, one row, one column)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    masks = [np.zeros((5, 7), bool), np.ones((6, 4), bool), rng.random((1, 40)) < 0.5]
    masks.append(rng.random((40, 1)) < 0.5)
    for k in range(count):
        height, width = rng.integers(2, 70, 2)
        mask = rng.random((height, width)) < rng.uniform(0.2, 0.8)
        masks.append(ndimage.binary_opening(mask) if k % 2 else mask)
    return masks


def test_fill_holes_and_speck_removal_equal_scipy_and_skimage() -> None:
    from scipy import ndimage
    from skimage.morphology import remove_small_objects as skimage_remove

    from stevs.tissue import fill_holes, remove_small_objects

    for k, mask in enumerate(_random_masks(7, 200)):
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
        for max_size in (0, 1, k % 25):
            expected = skimage_remove(mask, max_size=max_size, connectivity=1)
            np.testing.assert_array_equal(remove_small_objects(mask, max_size), expected)
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7], ring[4, 4] = True, False
    assert fill_holes(ring)[4, 4] and not fill_holes(ring[:, 4:])[4, 0]  # on the border


def test_otsu_equals_skimage_on_random_values() -> None:
    from stevs.tissue import otsu_uint8

    rng = np.random.default_rng(3)
    for _ in range(200):
        size = int(rng.integers(2, 3000))
        values = rng.integers(*np.sort(rng.integers(0, 256, 2)) + (0, 1), size).astype(np.uint8)
        values[0], values[-1] = max(int(values.min()) - 1, 0), 255  # at least two values
        assert otsu_uint8(values) == int(threshold_otsu(values))


def test_tiling_imports_neither_scipy_nor_skimage() -> None:
    import subprocess
    import sys

    code = "import sys, stevs.tiling; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert "'stevs'" in loaded and "'scipy'" not in loaded and "'skimage'" not in loaded
