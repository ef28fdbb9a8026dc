"""Readers on the generated demo slides: both slide backends and the Visium ingest."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
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


# -- Space Ranger's hires / lowres PNG as the slide image -----------------------------------


def spaceranger_without_the_scan(demo, slide_id: str, out) -> None:
    """``{slide_id}/outs`` as many public Visium sets ship it: no full-resolution image, only
    ``spatial/`` with hires (scale 0.4) and lowres (0.1) PNGs made from the demo's scan."""
    from PIL import Image

    outs = out / slide_id / "outs"
    shutil.copytree(demo.parent / slide_id / "outs", outs)
    spatial = outs / "spatial"
    with open_slide(demo.parent / f"{slide_id}.tif") as slide:
        width, height = slide.dimensions
        full = slide.read_region((0, 0, width, height), (width, height))
    factors = json.loads((spatial / "scalefactors_json.json").read_text())
    for key, scalef in (("hires", 0.4), ("lowres", 0.1)):
        size = (round(width * scalef), round(height * scalef))
        Image.fromarray(full).resize(size, Image.Resampling.LANCZOS).save(
            spatial / f"tissue_{key}_image.png"
        )
        factors[f"tissue_{key}_scalef"] = scalef
    (spatial / "scalefactors_json.json").write_text(json.dumps(factors))


@pytest.mark.parametrize("key", ["hires", "lowres"])
def test_spaceranger_png_as_the_image_is_ingested_at_its_scale(demo, tmp_path, caplog, key):
    """The PNG's spot centres are the full-resolution ones x its scale factor, its mpp the
    scan's / the scale factor (55 µm / spot_diameter_fullres), one warning line says so."""
    spaceranger_without_the_scan(demo, "demo_1", tmp_path)
    spatial = tmp_path / "demo_1" / "outs" / "spatial"
    scalef = {"hires": 0.4, "lowres": 0.1}[key]
    full = build_slide_adata("demo_1", demo.parent / "demo_1.tif", tmp_path / "demo_1" / "outs",
                             "visium")  # fmt: skip
    with caplog.at_level("WARNING"):
        adata = build_slide_adata("demo_1", spatial / f"tissue_{key}_image.png",
                                  tmp_path / "demo_1" / "outs", "visium")  # fmt: skip
    np.testing.assert_allclose(adata.obsm["spatial"], full.obsm["spatial"] * scalef)
    info = adata.uns["stevs"]
    assert info["mpp"] == pytest.approx(0.8 / scalef, rel=1e-3)
    assert info["mpp_source"] == f"scalefactors:spot_diameter_fullres / tissue_{key}_scalef"
    assert info["spot_diameter_um"] == pytest.approx(55)
    [line] = [r.getMessage() for r in caplog.records if "Space Ranger's" in r.getMessage()]
    assert f"{0.8 / scalef:.3g} µm/px" in line and f"spans {55 * scalef / 0.8:.0f} px" in line
    # Space Ranger's own PNGs, their scale factors now relative to the PNG given
    entry = adata.uns["spatial"]["demo_1"]
    assert entry["metadata"]["images_source"] == str(spatial)
    factors = entry["scalefactors"]
    assert factors[f"tissue_{key}_scalef"] == pytest.approx(1.0)
    assert factors["tissue_lowres_scalef"] == pytest.approx(0.1 / scalef)
    want = full.uns["spatial"]["demo_1"]["scalefactors"]["spot_diameter_fullres"] * scalef
    assert factors["spot_diameter_fullres"] == pytest.approx(want)
    assert_draws_over_he(adata, "TUMOUR_1")


def test_spaceranger_hires_pngs_ingest_tile_and_predict(demo, tmp_path):
    """Issue 24: a sheet whose images are Space Ranger hires PNGs ingests, tiles, trains a
    ridge and predicts; the prediction draws with img_key "hires" and "lowres"."""
    from stevs.cli import main

    rows = pd.read_csv(demo, sep="\t", dtype=str, keep_default_na=False)
    for slide_id in rows["slide_id"]:
        spaceranger_without_the_scan(demo, slide_id, tmp_path)
    rows["expression"] = [f"{s}/outs" for s in rows["slide_id"]]
    rows["image"] = [f"{s}/outs/spatial/tissue_hires_image.png" for s in rows["slide_id"]]
    rows["spots"] = rows["mpp"] = ""
    sheet = tmp_path / "samples.tsv"
    rows.to_csv(sheet, sep="\t", index=False)
    slides = []
    for slide_id in rows["slide_id"]:
        slide = tmp_path / "slides" / f"{slide_id}.h5ad"
        assert main(["ingest", "--sample-sheet", str(sheet), "--slide-id", slide_id,
                     "--out", str(slide)]) == 0  # fmt: skip
        patches = tmp_path / "patches" / f"{slide_id}.h5"
        assert main(["tile", "--slide", str(slide), "--out", str(patches),
                     "--patch-px", "32", "--patch-um", "128"]) == 0  # fmt: skip
        slides.append(str(slide))
    assert main(["folds", "--slides", *slides, "--patches-dir", str(tmp_path / "patches"),
                 "--scheme", "leave_one_slide_out", "--n-genes", "20",
                 "--out-dir", str(tmp_path / "folds")]) == 0  # fmt: skip
    model = tmp_path / "models" / "fold0"
    fold = str(tmp_path / "folds" / "fold0.json")
    assert main(["train", "--fold", fold, "--method", "ridge_color", "--out", str(model),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert main(["predict", "--model-dir", str(model), "--fold", fold,
                 "--out-dir", str(tmp_path / "pred"), "--device", "cpu"]) == 0  # fmt: skip
    [path] = sorted((tmp_path / "pred").glob("*.h5ad"))
    prediction = ad.read_h5ad(path)
    entry = prediction.uns["spatial"][prediction.uns["stevs"]["slide"]]
    assert sorted(entry["images"]) == ["hires", "lowres"]
    assert_draws_over_he(prediction, prediction.var_names[0])
