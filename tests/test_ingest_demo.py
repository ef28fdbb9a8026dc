"""Readers on the generated demo slides: both slide backends and the Visium ingest."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from conftest import assert_draws_over_he

from stevs.demo import make_demo
from stevs.io.ingest import build_slide_adata, ingest_from_sheet
from stevs.io.samples import read_predict_sheet, read_sample_sheet
from stevs.io.slide import OpenSlideReader, TiffReader, open_slide
from stevs.io.visium_uns import spaceranger_spatial_uns


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return make_demo(out, seed=5, n_slides=2, size_um=1200.0, mpp=0.8)


def test_demo_tiff_through_both_backends(demo):
    sheet = read_sample_sheet(demo)
    image = sheet.iloc[0]["image"]
    with open_slide(image) as auto:  # a plain tiled TIFF: tifffile (OpenSlide's generic-tiff)
        assert isinstance(auto, TiffReader)
    with open_slide(image, backend="openslide") as a, open_slide(image, backend="tifffile") as b:
        assert isinstance(a, OpenSlideReader)
        assert a.mpp == pytest.approx(0.8) and b.mpp == pytest.approx(0.8)
        assert a.level_count == b.level_count > 1
        box = (300.25, 410.5, 280, 280)
        left, right = a.read_region(box, (70, 70)), b.read_region(box, (70, 70))
    # JPEG tiles decode identically through libjpeg in both; allow rounding differences
    assert np.abs(left.astype(int) - right.astype(int)).max() <= 2


def test_ingest_every_demo_slide(demo, tmp_path):
    sheet = read_sample_sheet(demo)
    for slide_id, row in sheet.iterrows():
        adata = ad.read_h5ad(ingest_from_sheet(demo, slide_id, tmp_path / f"{slide_id}.h5ad"))
        info = adata.uns["stevs"]
        assert info["mpp"] == pytest.approx(0.8) and info["mpp_source"] == "metadata"
        assert info["patient"] == row["patient"]
        assert info["spot_diameter_um"] == pytest.approx(55, rel=0.02)
        assert adata.n_obs > 50 and adata.n_vars == 120
        assert adata.obs_names.is_unique
        assert list(adata.uns["spatial"]) == [slide_id]
    assert read_predict_sheet(demo.parent / "predict.tsv").index.tolist() == ["demo_heonly"]


def test_ingested_demo_slide_draws_over_spaceranger_images(demo, tmp_path):
    from PIL import Image

    adata = ad.read_h5ad(ingest_from_sheet(demo, "demo_1", tmp_path / "demo_1.h5ad"))
    entry = adata.uns["spatial"]["demo_1"]
    spatial = demo.parent / "demo_1" / "outs" / "spatial"
    # Space Ranger's own images and scale factors, unchanged
    for key in ("hires", "lowres"):
        png = np.asarray(Image.open(spatial / f"tissue_{key}_image.png").convert("RGB"))
        np.testing.assert_array_equal(entry["images"][key], png)
    factors = json.loads((spatial / "scalefactors_json.json").read_text())
    for key, value in factors.items():
        assert entry["scalefactors"][key] == pytest.approx(value)
    assert entry["metadata"]["images_source"] == str(spatial)
    assert entry["metadata"]["source_image_path"] == adata.uns["stevs"]["image_path"]
    # Space Ranger's gene ids are kept
    assert adata.var["gene_ids"].str.startswith("STEVSDEMO").all()
    sc.pp.log1p(adata)
    assert_draws_over_he(adata, "TUMOUR_1")


def test_visium_without_images_gets_thumbnails_of_the_slide(demo, tmp_path):
    outs = tmp_path / "outs"
    shutil.copytree(demo.parent / "demo_1" / "outs", outs)
    for name in ("tissue_hires_image.png", "tissue_lowres_image.png"):
        (outs / "spatial" / name).unlink()
    image = demo.parent / "demo_1.tif"
    adata = build_slide_adata("demo_1", image, outs, "visium")
    entry = adata.uns["spatial"]["demo_1"]
    assert entry["metadata"]["images_source"] == "stevs thumbnail"
    with open_slide(image) as slide:
        width, height = slide.dimensions
        hires = entry["images"]["hires"]
        scale = min(1.0, 2000 / max(width, height))
        assert hires.shape == (round(height * scale), round(width * scale), 3)
        assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(scale)
        assert max(entry["images"]["lowres"].shape) == 600
        factors = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
        # the spot diameter still comes from Space Ranger's scale factors
        diameter = factors["spot_diameter_fullres"]
        assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(diameter)
    assert_draws_over_he(adata, "TUMOUR_1", "demo_1")


def test_spaceranger_images_that_do_not_fit_the_slide_are_not_used(demo):
    spatial = demo.parent / "demo_1" / "outs" / "spatial"
    with open_slide(demo.parent / "demo_1.tif") as slide:
        width, height = slide.dimensions
    assert spaceranger_spatial_uns(spatial, (width, height), "x.tif") is not None
    assert spaceranger_spatial_uns(spatial, (2 * width, 2 * height), "x.tif") is None
