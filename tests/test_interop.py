"""Interoperability: every AnnData stevs writes draws over its H&E with ``scanpy.pl.spatial``
(Visium-like ``uns["spatial"]``), keeps gene ids, and names the stevs version.

The demo's Space Ranger slides are in test_ingest_demo.py, torch predictions in
test_predict.py, ridge predictions in test_baselines.py, H&E-only predictions in
test_predict_slide.py; here: legacy ST and ``.h5ad`` input, a prediction chain from an
ingested slide, the builder and the checks.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from conftest import assert_draws_over_he, he_like_image, make_fold_file, write_pyramid_tiff
from scipy import sparse

from stevs import __version__, baselines
from stevs.errors import StevsInputError
from stevs.io.ingest import build_slide_adata
from stevs.io.prediction import new_prediction, read_prediction
from stevs.io.slide_adata import (
    SlideSpots,
    read_slide_adata,
    slide_meta,
    spots_of,
    write_slide_adata,
)
from stevs.io.visium_uns import HIRES_MAX_SIDE, LOWRES_MAX_SIDE, spatial_uns
from stevs.tiling import tile_slide

GENES = ["GENE_A", "GENE_B", "GENE_C"]
#: a legacy ST slide: 200 µm pitch, 100 µm spots, at 1 µm/px on a 2600 x 2200 px image
WIDTH, HEIGHT, MPP = 2600, 2200, 1.0


def st_grid() -> tuple[np.ndarray, np.ndarray]:
    """(array x, y) and pixel (x, y) of an 11 x 9 legacy ST grid, slightly jittered."""
    xs, ys = np.meshgrid(np.arange(1, 12), np.arange(1, 10))
    array = np.stack([xs.ravel(), ys.ravel()], axis=1)
    jitter = np.random.default_rng(1).normal(0, 3, array.shape)
    return array, 100.0 + (array - 1) * 200.0 + jitter


@pytest.fixture(scope="module")
def st_image(tmp_path_factory):
    _, pixels = st_grid()
    path = tmp_path_factory.mktemp("st") / "st.tif"
    image = he_like_image(WIDTH, HEIGHT, pixels, 80.0)
    return write_pyramid_tiff(path, image, mpp=MPP, tile=256, n_levels=3)


def write_st(directory, slide: str, seed: int) -> tuple:
    """Legacy ST count table (``XxY`` rows) and spot file of one slide."""
    array, pixels = st_grid()
    rng = np.random.default_rng(seed)
    keys = [f"{x}x{y}" for x, y in array]
    counts = pd.DataFrame(rng.poisson(20, (len(keys), len(GENES))) + 1, index=keys, columns=GENES)
    counts_path, spots_path = directory / f"{slide}.tsv", directory / f"{slide}_spots.tsv"
    counts.to_csv(counts_path, sep="\t")
    spots = pd.DataFrame({"x": array[:, 0], "y": array[:, 1]})
    spots["pixel_x"], spots["pixel_y"] = pixels[:, 0], pixels[:, 1]
    spots.to_csv(spots_path, sep="\t", index=False)
    return counts_path, spots_path


def ingest_st(directory, image, slide: str, seed: int = 0):
    counts, spots = write_st(directory, slide, seed)
    adata = build_slide_adata(slide, image, counts, "st", spots=str(spots))
    return write_slide_adata(adata, slide_meta(adata), directory / f"{slide}.h5ad")


def test_legacy_st_slide_draws_over_thumbnails_of_its_image(st_image, tmp_path):
    path = ingest_st(tmp_path, st_image, "st1")
    adata = read_slide_adata(path)
    entry = adata.uns["spatial"]["st1"]
    hires, lowres = entry["images"]["hires"], entry["images"]["lowres"]
    scale = HIRES_MAX_SIDE / WIDTH
    assert hires.shape == (round(HEIGHT * scale), HIRES_MAX_SIDE, 3)
    assert lowres.shape[1] == LOWRES_MAX_SIDE
    factors = entry["scalefactors"]
    assert factors["tissue_hires_scalef"] == pytest.approx(scale)
    assert factors["tissue_lowres_scalef"] == pytest.approx(LOWRES_MAX_SIDE / WIDTH)
    assert factors["spot_diameter_fullres"] == pytest.approx(100.0 / MPP)  # ST's 100 µm
    assert factors["fiducial_diameter_fullres"] > factors["spot_diameter_fullres"]
    assert entry["metadata"]["images_source"] == "stevs thumbnail"
    assert entry["metadata"]["source_image_path"] == str(st_image.resolve())
    sc.pp.log1p(adata)
    assert_draws_over_he(adata, "GENE_A")


def test_h5ad_input_keeps_gene_ids_and_draws_spots_of_a_guessed_size(st_image, tmp_path):
    _, pixels = st_grid()
    source = ad.AnnData(
        X=sparse.csr_matrix(np.random.default_rng(0).poisson(5, (len(pixels), 3)) + 1),
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(len(pixels))]),
        var=pd.DataFrame({"gene_ids": ["ENSG1", "ENSG2", "ENSG3"]}, index=GENES),
    )
    source.obsm["spatial"] = pixels
    source.write_h5ad(tmp_path / "in.h5ad")
    adata = build_slide_adata("h1", st_image, tmp_path / "in.h5ad", "h5ad")
    assert list(adata.var["gene_ids"]) == ["ENSG1", "ENSG2", "ENSG3"]
    assert adata.uns["stevs"]["technology"] == "unknown"
    # unknown technology: the drawn spots are 0.55 of the spot pitch (200 px here)
    diameter = adata.uns["spatial"]["h1"]["scalefactors"]["spot_diameter_fullres"]
    assert diameter == pytest.approx(0.55 * 200, rel=0.05)
    assert_draws_over_he(adata, "GENE_B")


def test_predictions_from_ingested_slides_reuse_their_images(st_image, tmp_path, monkeypatch):
    slides = {}
    for seed, slide in enumerate(["A", "B", "C"]):
        adata_path = ingest_st(tmp_path, st_image, slide, seed)
        patches = tile_slide(adata_path, tmp_path / f"{slide}.h5", 16, 8.0, progress=False)
        slides[slide] = (adata_path, patches)
    fold = make_fold_file(tmp_path / "f.json", slides, train=["A", "B"], test=["C"], genes=GENES)
    model = baselines.train_ridge(fold, "ridge_color", tmp_path / "model", n_splits=2)

    def no_image(*args, **kwargs):
        raise AssertionError("prediction re-read the slide image")

    monkeypatch.setattr("stevs.tissue.read_thumbnail", no_image)
    monkeypatch.setattr("stevs.io.visium_uns.read_thumbnail", no_image)
    monkeypatch.setattr("stevs.io.slide.open_slide", no_image)
    [path] = baselines.predict_ridge(model, fold, tmp_path / "pred")
    pred, slide = ad.read_h5ad(path), read_slide_adata(slides["C"][0])
    assert pred.uns["stevs"]["stevs_version"] == __version__
    got, want = pred.uns["spatial"]["C"], slide.uns["spatial"]["C"]
    # the slide's lowres image, under both keys (hires: what scanpy and squidpy draw by default)
    assert set(got["images"]) == set(want["images"]) == {"hires", "lowres"}
    for key in got["images"]:
        np.testing.assert_array_equal(got["images"][key], want["images"]["lowres"])
    want_factors = dict(want["scalefactors"])
    want_factors["tissue_hires_scalef"] = want_factors["tissue_lowres_scalef"]
    assert got["scalefactors"] == want_factors
    assert_draws_over_he(pred, "GENE_C")
    # evaluation reads the prediction without its images: same numbers as anndata's reader
    read = read_prediction(path, GENES[::-1])
    np.testing.assert_allclose(read.mean, pred[:, GENES[::-1]].X)
    np.testing.assert_allclose(read.std, pred[:, GENES[::-1]].layers["std"])
    assert list(read.barcodes) == list(pred.obs_names) and read.meta["slide"] == "C"
    np.testing.assert_array_equal(read.spatial, pred.obsm["spatial"])


def test_a_slide_without_images_still_gives_a_prediction_without_them():
    obs = pd.DataFrame(index=["a", "b"])
    spots = SlideSpots(obs, np.zeros((2, 2)), {})
    pred = new_prediction(np.zeros((2, 1)), np.ones((2, 1)), ["G"], spots, {"slide": "s"})
    assert "spatial" not in pred.uns and pred.uns["stevs"]["stevs_version"] == __version__


def test_the_builder_shrinks_a_large_hires_and_refuses_bad_images():
    image = np.full((3000, 4000, 3), 200, np.uint8)
    entry = spatial_uns(image, 0.5, 40.0)
    assert entry["images"]["hires"].shape == (1500, 2000, 3)
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.25)
    assert entry["images"]["lowres"].shape == (450, 600, 3)
    assert entry["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.075)
    assert entry["scalefactors"]["fiducial_diameter_fullres"] == pytest.approx(40 * 1.615)
    with pytest.raises(ValueError, match="uint8"):
        spatial_uns(image.astype(np.float32), 0.5, 40.0)
    with pytest.raises(ValueError, match="spot_diameter_fullres"):
        spatial_uns(image, 0.5, float("nan"))


def test_a_slide_adata_with_broken_images_is_refused_naming_it(st_image, tmp_path):
    path = ingest_st(tmp_path, st_image, "st1")
    adata = ad.read_h5ad(path)
    del adata.uns["spatial"]["st1"]["scalefactors"]["tissue_hires_scalef"]
    adata.write_h5ad(tmp_path / "broken.h5ad")
    with pytest.raises(StevsInputError, match="tissue_hires_scalef") as info:
        read_slide_adata(tmp_path / "broken.h5ad")
    assert str(tmp_path / "broken.h5ad") in str(info.value)


def test_a_slide_read_without_its_images_is_the_same_slide_less_them(st_image, tmp_path):
    path = ingest_st(tmp_path, st_image, "st1")
    full = read_slide_adata(path)
    for images in [(), ("lowres",), ("hires", "lowres")]:
        part = read_slide_adata(path, images=images)
        assert (part.X != full.X).nnz == 0 and part.X.dtype == full.X.dtype
        pd.testing.assert_frame_equal(part.obs, full.obs)
        pd.testing.assert_frame_equal(part.var, full.var)
        np.testing.assert_array_equal(part.obsm["spatial"], full.obsm["spatial"])
        assert part.uns["stevs"] == full.uns["stevs"]
        got, want = part.uns["spatial"]["st1"], full.uns["spatial"]["st1"]
        assert got["scalefactors"] == want["scalefactors"]
        assert got["metadata"] == want["metadata"]
        assert set(got["images"]) == set(images)
        for key in images:
            np.testing.assert_array_equal(got["images"][key], want["images"][key])
    # the scale factors are still checked
    broken = ad.read_h5ad(path)
    del broken.uns["spatial"]["st1"]["scalefactors"]["tissue_hires_scalef"]
    broken.write_h5ad(tmp_path / "broken.h5ad")
    with pytest.raises(StevsInputError, match="tissue_hires_scalef"):
        read_slide_adata(tmp_path / "broken.h5ad", images=())


def test_a_slide_with_only_a_hires_image_gives_predictions_over_it(st_image, tmp_path):
    path = ingest_st(tmp_path, st_image, "st1")
    adata = ad.read_h5ad(path)
    del adata.uns["spatial"]["st1"]["images"]["lowres"]
    adata.write_h5ad(tmp_path / "hires_only.h5ad")
    spots = spots_of(tmp_path / "hires_only.h5ad", adata.obs_names[:5])
    hires = spots.images["st1"]["images"]["hires"]
    np.testing.assert_array_equal(hires, adata.uns["spatial"]["st1"]["images"]["hires"])
    assert list(spots.obs.index) == list(adata.obs_names[:5])


def test_a_slide_the_element_reader_cannot_read_is_read_whole(st_image, tmp_path, monkeypatch):
    path = ingest_st(tmp_path, st_image, "st1")

    def unreadable(*args, **kwargs):
        raise ValueError("no encoding-type")

    monkeypatch.setattr("anndata.io.read_elem", unreadable)
    adata = read_slide_adata(path, images=())
    assert adata.n_obs == 99 and set(adata.uns["spatial"]["st1"]["images"]) == {"hires", "lowres"}
