"""Readers on the generated demo slides: both slide backends and the Visium ingest."""

from __future__ import annotations

import numpy as np
import pytest

from stevs.demo import make_demo
from stevs.io.ingest import ingest_from_sheet
from stevs.io.samples import read_predict_sheet, read_sample_sheet
from stevs.io.slide import OpenSlideReader, open_slide


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return make_demo(out, seed=5, n_slides=2, size_um=1200.0, mpp=0.8)


def test_demo_tiff_through_both_backends(demo):
    sheet = read_sample_sheet(demo)
    image = sheet.iloc[0]["image"]
    with open_slide(image) as a, open_slide(image, backend="tifffile") as b:
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
        adata = __import__("anndata").read_h5ad(
            ingest_from_sheet(demo, slide_id, tmp_path / f"{slide_id}.h5ad")
        )
        info = adata.uns["stevs"]
        assert info["mpp"] == pytest.approx(0.8) and info["mpp_source"] == "metadata"
        assert info["patient"] == row["patient"]
        assert info["spot_diameter_um"] == pytest.approx(55, rel=0.02)
        assert adata.n_obs > 50 and adata.n_vars == 120
        assert adata.obs_names.is_unique
    assert read_predict_sheet(demo.parent / "predict.tsv").index.tolist() == ["demo_heonly"]
