"""HEST interoperability: patch caches that HEST's own code reads (``img``, ``barcode``,
``coords`` and their attributes, the layout of ``hestcore.wsi.WSIPatcher.to_h5``)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from conftest import write_pyramid_tiff

from stevs.io.patch_cache import PatchCache
from stevs.io.slide import open_slide
from stevs.tiling import tile_spots


def _read_like_hest(path: Path, start: int, stop: int) -> dict:
    """What ``hestcore.datasets.H5HESTDataset.__getitem__`` and HEST's benchmark read."""
    with h5py.File(path, "r") as f:
        imgs = f["img"][start:stop]
        barcodes = f["barcode"][start:stop].flatten().tolist()
        coords = f["coords"][start:stop]
        attrs = dict(f["coords"].attrs)
        img_attrs = dict(f["img"].attrs)
    barcodes = np.array(barcodes).flatten().astype(str).tolist()  # as HEST's benchmark does
    return {"imgs": imgs, "barcodes": barcodes, "coords": coords, "attrs": attrs, "img": img_attrs}


def test_a_tiled_cache_reads_the_way_hest_reads_its_patches(
    tmp_path: Path, pattern_image: np.ndarray
) -> None:
    image = write_pyramid_tiff(tmp_path / "s.tif", pattern_image, mpp=0.5)
    rng = np.random.default_rng(0)
    centers = np.round(rng.uniform(40, 360, (9, 2)))
    barcodes = [f"AAAC{i}-1" for i in range(9)]
    with open_slide(image) as slide:
        out = tile_spots(
            slide, barcodes, centers, tmp_path / "p.h5", slide_id="s", patch_px=16, patch_mpp=1.0
        )
        batch = _read_like_hest(out, 2, 7)
        # HEST's meaning of coords: the level-0 top-left corner of a patch_size_src box
        size = int(batch["attrs"]["patch_size_src"])
        x, y = (int(v) for v in batch["coords"][1])
        recut = slide.read_region((x, y, size, size), out_size=(16, 16))
    assert batch["imgs"].dtype == np.uint8 and batch["imgs"].shape == (5, 16, 16, 3)
    assert batch["barcodes"] == barcodes[2:7]
    assert batch["coords"].shape == (5, 2) and batch["coords"].dtype.kind == "i"
    assert batch["attrs"]["patch_size_target"] == 16 and size == 32
    assert batch["attrs"]["pixel_size"] == 0.5 and batch["attrs"]["downsample"] == 2.0
    assert batch["img"]["name"] == "s" and batch["img"]["patch_size_src"] == 32
    np.testing.assert_array_equal(batch["coords"], centers[2:7] - 16)
    # the stored patch is the HEST box re-read at the target scale (same pixels)
    assert np.abs(recut.astype(int) - batch["imgs"][1].astype(int)).max() <= 2
    with h5py.File(out) as f:
        assert f["barcode"].shape == (9, 1)
        assert h5py.check_string_dtype(f["barcode"].dtype).encoding == "utf-8"
        # img is a second name of patches: one dataset, no pixel stored twice
        assert f["img"].id == f["patches"].id
    with PatchCache(out) as cache:  # and our own reader still reads the file
        np.testing.assert_array_equal(cache.read_rows([3]), batch["imgs"][1:2])
