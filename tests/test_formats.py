"""Input formats beyond Space Ranger CSV: ``tissue_positions.parquet``, Visium HD bins (square
spots), SpatialData zarr stores (``stevs export`` out, sheet format ``spatialdata`` in), and
the bad-input errors of the HEST, Visium HD and SpatialData readers."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import he_like_image
from PIL import Image
from test_expression import make_visium, write_10x_h5

from stevs.cli import main
from stevs.demo import make_demo
from stevs.errors import StevsInputError
from stevs.io.expression import VISIUM_POSITION_COLUMNS, read_hest, read_visium
from stevs.io.ingest import build_slide_adata, ingest_from_sheet


def test_parquet_positions_read_like_the_csv(tmp_path: Path) -> None:
    outs, _ = make_visium(tmp_path / "csv")
    reference = read_visium(outs)
    spatial = outs / "spatial"
    pd.read_csv(spatial / "tissue_positions.csv").to_parquet(spatial / "tissue_positions.parquet")
    (spatial / "tissue_positions.csv").unlink()
    adata = read_visium(outs)
    assert list(adata.obs_names) == list(reference.obs_names)
    np.testing.assert_array_equal(adata.obsm["spatial"], reference.obsm["spatial"])
    assert (adata.X != reference.X).nnz == 0
    (spatial / "tissue_positions.parquet").write_bytes(b"not parquet")
    with pytest.raises(StevsInputError, match="tissue_positions.parquet: not a readable parquet"):
        read_visium(outs)


def make_visium_hd(root: Path, mpp: float = 0.5, microns_per_pixel: bool = True) -> tuple:
    """A Visium HD ``outs/binned_outputs/square_008um`` of 10 x 12 bins (8 µm) and its image."""
    bins = root / "outs" / "binned_outputs" / "square_008um"
    (bins / "spatial").mkdir(parents=True)
    pitch = 8.0 / mpp
    rows = [
        (f"s_008um_{r:05d}_{c:05d}-1", 1, r, c, 40 + r * pitch, 40 + c * pitch)
        for r in range(10)
        for c in range(12)
    ]
    positions = pd.DataFrame(rows, columns=VISIUM_POSITION_COLUMNS)
    positions.to_parquet(bins / "spatial" / "tissue_positions.parquet")
    factors = {"bin_size_um": 8.0, "spot_diameter_fullres": pitch, "tissue_hires_scalef": 0.1}
    if microns_per_pixel:
        factors["microns_per_pixel"] = mpp
    (bins / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    counts = np.random.default_rng(1).poisson(2.0, (len(rows), 4))
    write_10x_h5(
        bins / "filtered_feature_bc_matrix.h5",
        counts,
        positions["barcode"].tolist(),
        ["G1", "G2", "G3", "G4"],
    )
    xy = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    image = root / "he.png"
    Image.fromarray(he_like_image(int(80 + 12 * pitch), int(80 + 10 * pitch), xy, pitch / 2)).save(
        image
    )
    return root / "outs", image


def test_visium_hd_bins_are_square_spots_of_the_bin_size(tmp_path: Path) -> None:
    outs, image = make_visium_hd(tmp_path / "a")
    adata = build_slide_adata("hd", image, outs, "visium_hd")
    info = adata.uns["stevs"]
    assert adata.n_obs == 120 and info["technology"] == "visium_hd"
    assert info["spot_pitch_um"] == 8.0 and info["spot_diameter_um"] == 8.0
    assert info["mpp"] == 0.5 and info["mpp_source"] == "scalefactors"
    assert info["expression_path"] == str(outs.resolve())
    assert adata.uns["spatial"]["hd"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(16)
    # without microns_per_pixel: the bin pitch on the array gives it
    outs, image = make_visium_hd(tmp_path / "b", mpp=0.25, microns_per_pixel=False)
    adata = build_slide_adata("hd", image, outs / "binned_outputs" / "square_008um", "visium_hd")
    assert adata.uns["stevs"]["mpp"] == pytest.approx(0.25)
    assert adata.uns["stevs"]["mpp_source"] == "spot_grid"
    with pytest.raises(StevsInputError, match="not a Visium HD bin folder"):
        build_slide_adata("hd", image, tmp_path, "visium_hd")


def test_hest_metadata_without_a_pixel_size_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    (tmp_path / "metadata").mkdir()
    source = ad.AnnData(X=np.ones((3, 2), np.float32))
    source.obsm["spatial"] = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    source.write_h5ad(tmp_path / "st" / "S1.h5ad")
    with pytest.raises(StevsInputError, match=r"metadata/S1.json: HEST metadata file not found"):
        read_hest(tmp_path / "st" / "S1.h5ad")
    (tmp_path / "metadata" / "S1.json").write_text(json.dumps({"pixel_size_um_estimated": None}))
    with pytest.raises(StevsInputError, match=r"S1.json: no positive pixel_size_um_estimated"):
        read_hest(tmp_path / "st" / "S1.h5ad")


@pytest.fixture(scope="module")
def demo_slide(tmp_path_factory) -> tuple[Path, Path]:
    """An ingested demo slide AnnData and its sample sheet."""
    out = tmp_path_factory.mktemp("demo")
    sheet = make_demo(out, seed=4, n_slides=2, size_um=1000.0, mpp=1.0)
    return ingest_from_sheet(sheet, "demo_1", out / "demo_1.h5ad"), sheet


def test_export_writes_a_store_spatialdata_reads_with_the_same_values(demo_slide, tmp_path):
    import spatialdata as sd

    slide, _ = demo_slide
    store = tmp_path / "demo_1.zarr"
    assert main(["export", "--input", str(slide), "--out", str(store)]) in (0, None)
    assert not list(tmp_path.glob(".demo_1.zarr.tmp-*"))
    adata = ad.read_h5ad(slide)
    sdata = sd.read_zarr(store)
    table = sdata.tables["table"]
    np.testing.assert_array_equal(table.X.toarray(), adata.X.toarray())
    assert list(table.obs_names) == list(adata.obs_names)
    assert list(table.var["gene_ids"]) == list(adata.var["gene_ids"])
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "demo_1_spots" and attrs["instance_key"] == "spot_id"
    spots = sd.transform(sdata.shapes["demo_1_spots"], to_coordinate_system="global")
    centres = np.column_stack([spots.geometry.x, spots.geometry.y])[table.obs["spot_id"]]
    np.testing.assert_allclose(centres, adata.obsm["spatial"])
    entry = adata.uns["spatial"]["demo_1"]
    diameter = entry["scalefactors"]["spot_diameter_fullres"]
    np.testing.assert_allclose(spots["radius"], diameter / 2)
    image = sdata.images["demo_1_image"]
    np.testing.assert_array_equal(
        np.asarray(image.transpose("y", "x", "c")), entry["images"]["hires"]
    )
    # the image's transformation maps its pixels onto level-0 px, like the spots
    scale = sd.transformations.get_transformation(image, "global").to_affine_matrix(
        ("x", "y"), ("x", "y")
    )
    assert scale[0, 0] == pytest.approx(1 / entry["scalefactors"]["tissue_hires_scalef"])


def test_spatialdata_plot_draws_the_exported_store(demo_slide, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata as sd
    import spatialdata_plot  # noqa: F401  (registers sdata.pl)

    slide, _ = demo_slide
    store = tmp_path / "s.zarr"
    main(["export", "--input", str(slide), "--out", str(store)])
    sdata = sd.read_zarr(store)
    axes = plt.figure().gca()
    sdata.pl.render_images("demo_1_image").pl.render_shapes(
        "demo_1_spots", color="TUMOUR_1", table_name="table"
    ).pl.show(ax=axes, coordinate_systems="global")
    assert axes.images and axes.collections  # the H&E and the spot circles
    plt.close("all")


def test_a_spatialdata_store_is_read_in_as_a_sheet_format(demo_slide, tmp_path):
    slide, sheet = demo_slide
    store = tmp_path / "in.zarr"
    main(["export", "--input", str(slide), "--out", str(store)])
    row = pd.read_csv(sheet, sep="\t").iloc[0]
    image = Path(sheet).parent / row["image"]
    rows = f"slide_id\timage\texpression\tformat\nfromzarr\t{image}\t{store}\tspatialdata\n"
    (tmp_path / "s.tsv").write_text(rows)
    adata = ad.read_h5ad(ingest_from_sheet(tmp_path / "s.tsv", "fromzarr", tmp_path / "z.h5ad"))
    original = ad.read_h5ad(slide)
    assert list(adata.obs_names) == list(original.obs_names)
    np.testing.assert_allclose(adata.obsm["spatial"], original.obsm["spatial"])
    assert (adata.X != original.X).nnz == 0
    assert list(adata.var["gene_ids"]) == list(original.var["gene_ids"])
    info, before = adata.uns["stevs"], original.uns["stevs"]
    assert info["mpp"] == before["mpp"] and info["spot_diameter_um"] == pytest.approx(
        before["spot_diameter_um"]
    )
    with pytest.raises(StevsInputError, match="nowhere.zarr: SpatialData store not found"):
        build_slide_adata("x", image, tmp_path / "nowhere.zarr", "spatialdata")


def test_a_visium_store_written_by_spatialdata_io_reads_like_the_outs_folder(demo_slide, tmp_path):
    import spatialdata_io

    slide, sheet = demo_slide
    row = pd.read_csv(sheet, sep="\t").iloc[0]
    outs, image = (Path(sheet).parent / row[c] for c in ("expression", "image"))
    spatialdata_io.visium(outs, dataset_id="demo_1").write(tmp_path / "sdio.zarr")
    adata = build_slide_adata("demo_1", image, tmp_path / "sdio.zarr", "spatialdata")
    original = ad.read_h5ad(slide)
    assert adata.n_obs == original.n_obs
    original = original[adata.obs_names]  # same spots, in the table's order
    np.testing.assert_allclose(adata.obsm["spatial"], original.obsm["spatial"])
    assert (adata.X != original.X).nnz == 0
    np.testing.assert_array_equal(adata.obs["array_row"], original.obs["array_row"])
    assert adata.uns["stevs"]["spot_diameter_um"] == pytest.approx(
        original.uns["stevs"]["spot_diameter_um"]
    )


def test_stevs_imports_without_the_interop_extra() -> None:
    """spatialdata and squidpy are imported lazily: no stevs module loads them on import."""
    import subprocess
    import sys

    code = (
        "import sys, stevs, stevs.cli, stevs.export, stevs.io.ingest, stevs.io.expression, "
        "stevs.io.spatialdata_zarr, stevs.metrics, stevs.folds\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('spatialdata', 'spatialdata_io', 'spatialdata_plot', 'squidpy', 'geopandas')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_export_of_bad_input_is_one_line_and_leaves_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.zarr"
    assert main(["export", "--input", str(tmp_path / "missing.h5ad"), "--out", str(out)]) == 2
    assert "missing.h5ad: AnnData file not found" in capsys.readouterr().err
    bare = ad.AnnData(X=np.ones((3, 2), np.float32))
    bare.obsm["spatial"] = np.zeros((3, 2))
    bare.write_h5ad(tmp_path / "bare.h5ad")
    assert main(["export", "--input", str(tmp_path / "bare.h5ad"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'bare.h5ad: needs exactly one library in uns["spatial"]' in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.h5ad"]
