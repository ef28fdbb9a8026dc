"""Expression readers, the sample sheet and `stevs ingest` on good and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse

from stevs.cli import main
from stevs.demo import spaceranger as demo_spaceranger
from stevs.errors import StevsInputError
from stevs.io.expression import (
    VISIUM_POSITION_COLUMNS,
    read_10x_h5,
    read_h5ad_expression,
    read_legacy_st,
    read_visium,
)
from stevs.io.ingest import build_slide_adata, ingest_from_sheet
from stevs.io.samples import read_sample_sheet


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """A Space Ranger v3 matrix (``stevs.demo.spaceranger``'s writer); counts: spots x genes."""
    demo_spaceranger.write_10x_h5(
        path, np.asarray(counts), np.asarray(barcodes), tuple(genes), "test"
    )


def write_10x_h5_v2(path: Path, genomes: dict[str, tuple[np.ndarray, list[str], list[str]]]):
    """The Cell Ranger v2 layout: one group per genome with ``genes`` / ``gene_names``;
    ``genomes``: name -> (counts spots x genes, barcodes, gene names)."""
    with h5py.File(path, "w") as h5:
        for genome, (counts, barcodes, genes) in genomes.items():
            matrix = sparse.csc_matrix(np.asarray(counts).T)  # genes x spots
            group = h5.create_group(genome)
            group["barcodes"] = np.array(barcodes, dtype="S")
            group["data"] = matrix.data.astype(np.int32)
            group["indices"] = matrix.indices.astype(np.int64)
            group["indptr"] = matrix.indptr.astype(np.int64)
            group["shape"] = np.array(matrix.shape, dtype=np.int32)
            group["genes"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
            group["gene_names"] = np.array(genes, dtype="S")


def make_visium(
    root: Path,
    n_rows: int = 6,
    n_cols: int = 8,
    mpp: float = 1.0,
    header: bool = True,
    extra_positions: int = 0,
) -> tuple[Path, Path]:
    """A Space Ranger outs/ folder plus a matching white PNG image."""
    outs = root / "outs"
    (outs / "spatial").mkdir(parents=True)
    rows = []
    pitch_px = 100 / mpp
    for r in range(n_rows):
        for c in range(n_cols):
            x = 150 + c * pitch_px + (pitch_px / 2 if r % 2 else 0)
            y = 150 + r * pitch_px * np.sqrt(3) / 2
            rows.append((f"BC{r:02d}{c:02d}-1", 1, r, 2 * c + r % 2, y, x))
    positions = pd.DataFrame(rows, columns=VISIUM_POSITION_COLUMNS)
    positions.loc[len(positions)] = ("OFFTISSUE-1", 0, 99, 99, 10.0, 10.0)
    if header:
        positions.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    else:
        positions.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    (outs / "spatial" / "scalefactors_json.json").write_text(
        json.dumps({"spot_diameter_fullres": 55 / mpp, "tissue_hires_scalef": 0.5})
    )
    in_tissue = positions.loc[positions.in_tissue == 1, "barcode"].tolist()
    barcodes = in_tissue[: len(in_tissue) - extra_positions]
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(len(barcodes), 5))
    write_10x_h5(
        outs / "filtered_feature_bc_matrix.h5",
        counts,
        barcodes,
        ["GENE_A", "GENE_B", "MT-CO1", "RPL3", "GENE_E"],
    )
    width = int(150 * 2 + n_cols * pitch_px + pitch_px)
    height = int(150 * 2 + n_rows * pitch_px)
    image = root / "image.png"
    Image.fromarray(np.full((height, width, 3), 230, np.uint8)).save(image)
    return outs, image


def test_visium_with_and_without_header(tmp_path):
    for header in (True, False):
        outs, _ = make_visium(tmp_path / str(header), header=header)
        adata = read_visium(outs)
        assert adata.n_obs == 48 and list(adata.var_names[:2]) == ["GENE_A", "GENE_B"]
        assert "OFFTISSUE-1" not in adata.obs_names
        assert sparse.issparse(adata.X) and adata.X.dtype == np.int32
        row = adata.obs.loc["BC0102-1"]
        assert (row.array_row, row.array_col) == (1, 5)
        np.testing.assert_allclose(
            adata.obsm["spatial"][adata.obs_names.get_loc("BC0000-1")], [150, 150]
        )


def test_visium_mpp_estimated_from_the_spot_grid(tmp_path, caplog):
    outs, image = make_visium(tmp_path, mpp=0.8)
    adata = build_slide_adata("s1", image, outs, "visium", patient="P")
    info = adata.uns["stevs"]
    assert info["mpp"] == pytest.approx(0.8, rel=0.01)
    assert info["mpp_source"] == "spot_grid"
    assert info["spot_diameter_um"] == pytest.approx(55, rel=0.01)
    assert "estimated" in caplog.text


def test_sheet_mpp_wins(tmp_path):
    outs, image = make_visium(tmp_path, mpp=0.8)
    adata = build_slide_adata("s1", image, outs, "visium", mpp=0.79)
    assert adata.uns["stevs"]["mpp"] == 0.79 and adata.uns["stevs"]["mpp_source"] == "given"


def test_barcodes_missing_on_either_side_are_counted(tmp_path, caplog):
    outs, _ = make_visium(tmp_path, extra_positions=3)
    adata = read_visium(outs)
    assert adata.n_obs == 45
    assert "3 spots with a position have no expression" in caplog.text


def test_visium_bad_inputs(tmp_path):
    outs, image = make_visium(tmp_path)
    with pytest.raises(StevsInputError, match="nowhere.*outs folder not found"):
        read_visium(tmp_path / "nowhere")
    (outs / "spatial" / "tissue_positions.csv").rename(outs / "spatial" / "moved.csv")
    with pytest.raises(StevsInputError, match="no tissue_positions.parquet, tissue_positions.csv"):
        read_visium(outs)
    (outs / "spatial" / "moved.csv").rename(outs / "spatial" / "tissue_positions.csv")
    (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"garbage")
    with pytest.raises(StevsInputError, match="filtered_feature_bc_matrix.h5: not a 10x HDF5"):
        read_visium(outs)


def test_10x_h5_v3_reads_counts_gene_ids_and_gene_expression_only(tmp_path):
    rng = np.random.default_rng(4)
    counts = rng.poisson(2.0, size=(7, 4))
    h5 = tmp_path / "m.h5"
    write_10x_h5(h5, counts, [f"BC{i}-1" for i in range(7)], ["A", "B", "A", "C"])
    with h5py.File(h5, "a") as f:  # relabel the last feature as an antibody
        types = f["matrix/features/feature_type"]
        types[3] = b"Antibody Capture"
    matrix, barcodes, var = read_10x_h5(h5)
    assert sparse.isspmatrix_csr(matrix) and matrix.shape == (7, 3)
    np.testing.assert_array_equal(matrix.toarray(), counts[:, :3])
    assert list(barcodes) == [f"BC{i}-1" for i in range(7)]
    assert list(var.index) == ["A", "B", "A-1"]  # duplicates made unique
    assert list(var["gene_ids"]) == ["STEVSDEMO00001", "STEVSDEMO00002", "STEVSDEMO00003"]
    assert set(var["feature_types"]) == {"Gene Expression"}


def test_10x_h5_v2_layout_reads_like_v3(tmp_path):
    rng = np.random.default_rng(5)
    counts = rng.poisson(2.0, size=(6, 5))
    barcodes, genes = [f"BC{i}-1" for i in range(6)], ["G1", "G2", "G3", "G4", "G5"]
    v2 = tmp_path / "v2.h5"
    write_10x_h5_v2(v2, {"GRCh38": (counts, barcodes, genes)})
    matrix, read_barcodes, var = read_10x_h5(v2)
    np.testing.assert_array_equal(matrix.toarray(), counts)
    assert list(read_barcodes) == barcodes and list(var.index) == genes
    assert list(var["gene_ids"]) == [f"ENSG{i:05d}" for i in range(5)]
    write_10x_h5(tmp_path / "v3.h5", counts, barcodes, genes)
    v3_matrix, v3_barcodes, v3_var = read_10x_h5(tmp_path / "v3.h5")
    assert (v3_matrix != matrix).nnz == 0 and list(v3_barcodes) == barcodes
    assert list(v3_var.columns) == list(var.columns) == ["gene_ids", "feature_types"]


def test_visium_outs_with_a_v2_matrix(tmp_path):
    outs, _ = make_visium(tmp_path)
    v3 = read_visium(outs)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    write_10x_h5_v2(h5, {"mm10": (v3.X.toarray(), list(v3.obs_names), list(v3.var_names))})
    v2 = read_visium(outs)
    assert v2.X.dtype == np.int32 and (v2.X != v3.X).nnz == 0
    assert list(v2.obs_names) == list(v3.obs_names)
    np.testing.assert_array_equal(v2.obsm["spatial"], v3.obsm["spatial"])


def test_10x_h5_wrong_or_corrupt_files_name_the_file(tmp_path):
    counts = np.ones((2, 2), dtype=int)
    two = tmp_path / "two_genomes.h5"
    write_10x_h5_v2(
        two, {"hg": (counts, ["a", "b"], ["A", "B"]), "mm": (counts, ["a", "b"], ["C", "D"])}
    )
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    partial = tmp_path / "partial.h5"
    write_10x_h5(partial, counts, ["a", "b"], ["A", "B"])
    with h5py.File(partial, "a") as f:
        del f["matrix/indptr"]
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    for path in (two, empty, partial, garbage):
        with pytest.raises(StevsInputError, match=f"{path.name}: not a 10x HDF5"):
            read_10x_h5(path)
    with pytest.raises(StevsInputError, match="missing.h5: feature-barcode matrix not found"):
        read_10x_h5(tmp_path / "missing.h5")


def test_visium_non_integer_counts_are_rejected(tmp_path):
    outs, _ = make_visium(tmp_path)
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "a") as f:
        data = f["matrix/data"][:].astype(np.float32) + 0.5
        del f["matrix/data"]
        f["matrix/data"] = data
    with pytest.raises(StevsInputError, match="filtered_feature_bc_matrix.h5: X holds negative"):
        read_visium(outs)


def test_duplicate_and_empty_and_disjoint(tmp_path):
    outs, _ = make_visium(tmp_path)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    write_10x_h5(h5, np.ones((2, 2)), ["BC0000-1", "BC0000-1"], ["A", "B"])
    with pytest.raises(
        StevsInputError, match="filtered_feature_bc_matrix.h5: 1 duplicate spot barcodes"
    ):
        read_visium(outs)
    write_10x_h5(h5, np.zeros((2, 2)), ["BC0000-1", "BC0001-1"], ["A", "B"])
    with pytest.raises(StevsInputError, match="all zero"):
        read_visium(outs)
    write_10x_h5(h5, np.ones((2, 2)), ["XX-1", "YY-1"], ["A", "B"])
    with pytest.raises(StevsInputError, match="no spot barcode in common"):
        read_visium(outs)


def test_spots_outside_the_image(tmp_path):
    outs, _ = make_visium(tmp_path)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((200, 200, 3), 200, np.uint8)).save(small)
    with pytest.raises(StevsInputError, match=r"small.png: \d+ of 48 spot centres lie outside"):
        build_slide_adata("s1", small, outs, "visium", mpp=1.0)


def write_st(root: Path, gz: bool = True) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    keys = [f"{x}x{y}" for x in range(2, 6) for y in range(3, 6)]
    rng = np.random.default_rng(1)
    counts = pd.DataFrame(
        rng.poisson(4, (len(keys), 4)), index=keys, columns=["ERBB2", "GRB7", "MT-ND1", "KRT19"]
    )
    counts_path = root / ("c.tsv.gz" if gz else "c.tsv")
    opener = gzip.open if gz else open
    with opener(counts_path, "wt") as handle:
        counts.to_csv(handle, sep="\t")
    spots = pd.DataFrame(
        [
            (x, y, x + 0.03, y - 0.02, 100 + 290 * x + 1.5, 80 + 290 * y, 1)
            for x in range(2, 6)
            for y in range(3, 6)
        ]
        + [(9, 9, 9, 9, 3000, 3000, 0)],
        columns=["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"],
    )
    spots_path = root / "spots.tsv"
    spots.to_csv(spots_path, sep="\t", index=False)
    return counts_path, spots_path


def test_legacy_st_gzipped_or_not(tmp_path):
    for gz in (True, False):
        counts, spots = write_st(tmp_path / str(gz), gz=gz)
        adata = read_legacy_st(counts, spots)
        assert adata.n_obs == 12 and adata.n_vars == 4
        np.testing.assert_allclose(
            adata.obsm["spatial"][adata.obs_names.get_loc("3x4")],
            [100 + 290 * 3 + 1.5, 80 + 290 * 4],
        )
        assert adata.obs.loc["3x4", "array_col"] == 3 and adata.obs.loc["3x4", "array_row"] == 4


def test_legacy_st_bad_labels_and_non_integer(tmp_path):
    bad = tmp_path / "bad.tsv"
    pd.DataFrame({"A": [1, 2]}, index=["spot1", "spot2"]).to_csv(bad, sep="\t")
    _, spots = write_st(tmp_path)
    with pytest.raises(StevsInputError, match="bad.tsv: spot labels must look like"):
        read_legacy_st(bad, spots)
    frac = tmp_path / "frac.tsv"
    pd.DataFrame({"A": [1.5, 2]}, index=["2x3", "2x4"]).to_csv(frac, sep="\t")
    with pytest.raises(
        StevsInputError, match="frac.tsv: the count table holds negative or non-integer"
    ):
        read_legacy_st(frac, spots)


def test_h5ad_input(tmp_path):
    counts = sparse.csr_matrix(np.random.default_rng(2).poisson(2, (30, 6)).astype(np.float32))
    adata = ad.AnnData(counts)
    adata.obs_names = [f"s{i}" for i in range(30)]
    adata.var_names = [f"g{i}" for i in range(6)]
    adata.obsm["spatial"] = np.random.default_rng(3).uniform(0, 100, (30, 2))
    adata.write_h5ad(tmp_path / "ok.h5ad")
    loaded = read_h5ad_expression(tmp_path / "ok.h5ad")
    assert loaded.X.dtype == np.int32 and loaded.n_obs == 30
    adata.X = sparse.csr_matrix(adata.X.toarray() * 0.5 + 0.1)
    adata.write_h5ad(tmp_path / "norm.h5ad")
    with pytest.raises(StevsInputError, match="norm.h5ad: X holds negative or non-integer"):
        read_h5ad_expression(tmp_path / "norm.h5ad")
    adata.layers["counts"] = counts
    adata.write_h5ad(tmp_path / "layer.h5ad")
    assert read_h5ad_expression(tmp_path / "layer.h5ad").X.sum() == counts.sum()
    del adata.obsm["spatial"]
    adata.write_h5ad(tmp_path / "nospatial.h5ad")
    with pytest.raises(StevsInputError, match='nospatial.h5ad: no obsm\\["spatial"\\]'):
        read_h5ad_expression(tmp_path / "nospatial.h5ad")


def write_sheet(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def visium_sheet_row(**overrides: str) -> dict[str, str]:
    """A sample-sheet row of the Visium slide ``a`` that :func:`make_visium` writes."""
    row = {
        "slide_id": "a",
        "patient": "P1",
        "image": "a/image.png",
        "expression": "a/outs",
        "format": "visium",
        "spots": "",
        "mpp": "",
    }
    return {**row, **overrides}


def test_sample_sheet_validation(tmp_path):
    outs, image = make_visium(tmp_path / "a")
    good = visium_sheet_row()
    sheet = read_sample_sheet(write_sheet(tmp_path / "ok.tsv", [good]))
    assert sheet.loc["a", "image"] == str(image) and sheet.loc["a", "mpp"] is None

    def fails(rows, pattern, **kwargs):
        path = write_sheet(tmp_path / "bad.tsv", rows)
        with pytest.raises(StevsInputError, match=pattern):
            read_sample_sheet(path, **kwargs)

    fails([{k: v for k, v in good.items() if k != "format"}], "bad.tsv: missing column.*format")
    fails([good, good], r"bad.tsv: row 3 \(slide 'a'\): duplicate slide_id")
    fails(
        [{**good, "image": "a/none.png"}], r"row 2 \(slide 'a'\): image '.*none.png' does not exist"
    )
    fails([{**good, "format": "xenium"}], "format 'xenium' unknown")
    fails([{**good, "mpp": "abc"}], "mpp 'abc' is not a number")
    fails([{**good, "format": "st"}], "format 'st' needs a spot file")
    fails([{**good, "slide_id": "a/b"}], "slide_id must be")
    fails(
        [{k: v for k, v in good.items() if k != "patient"}],
        "column 'patient' is missing",
        require_patient=True,
    )


def test_ingest_command_writes_slide_adata(tmp_path):
    outs, image = make_visium(tmp_path / "a", mpp=0.5)
    sheet = write_sheet(
        tmp_path / "s.tsv",
        [visium_sheet_row(mpp="0.5")],
    )
    out = tmp_path / "results" / "a.h5ad"
    assert main(["ingest", "--sample-sheet", str(sheet), "--slide-id", "a", "--out", str(out)]) == 0
    adata = ad.read_h5ad(out)
    assert adata.uns["stevs"]["patient"] == "P1" and adata.uns["stevs"]["mpp"] == 0.5
    assert adata.uns["stevs"]["image_width"] > 0 and "spatial" in adata.obsm
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    assert (
        main(["ingest", "--sample-sheet", str(sheet), "--slide-id", "zz", "--out", str(out)]) == 2
    )


def test_ingest_her2st_section(her2st_dir, tmp_path):
    sheet = write_sheet(
        tmp_path / "her2st.tsv",
        [
            {
                "slide_id": "C3",
                "patient": "C",
                "image": "images/C3.jpg",
                "expression": "counts/C3.tsv.gz",
                "format": "st",
                "spots": "spots/C3_selection.tsv",
                "mpp": "",
            }
        ],
    )
    out = ingest_from_sheet(sheet, "C3", tmp_path / "C3.h5ad", data_root=her2st_dir)
    adata = ad.read_h5ad(out)
    summary = pd.read_csv(her2st_dir / "sections.tsv", sep="\t").set_index("section")
    assert adata.n_obs == summary.loc["C3", "n_count_spots_matched"]
    assert adata.n_vars == summary.loc["C3", "n_genes"]
    assert int(adata.X.sum()) == summary.loc["C3", "total_umi"]
    # 200 µm per ~291 px array step
    assert adata.uns["stevs"]["mpp"] == pytest.approx(
        200 / summary.loc["C3", "px_per_array_x"], rel=0.02
    )
    assert adata.uns["stevs"]["mpp_source"] == "spot_grid"
