"""Tests of the synthetic demo generator (``stevs demo``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from stevs.cli import main as cli_main
from stevs.demo import constants, make_demo, study
from stevs.errors import StevsInputError

SIZE_UM = 1200.0
MPP = 0.8
N_SLIDES = 2
SEED = 3


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    sheet = make_demo(out, seed=SEED, n_slides=N_SLIDES, size_um=SIZE_UM, mpp=MPP)
    assert sheet == out / "samples.tsv"
    return out


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _positions(slide_dir: Path) -> list[list[str]]:
    """Rows of the positions file without its header, whichever variant the slide has."""
    spatial = slide_dir / "outs" / "spatial"
    headed = spatial / "tissue_positions.csv"
    if headed.exists():
        rows = list(csv.reader(headed.open()))
        assert rows[0] == [
            "barcode",
            "in_tissue",
            "array_row",
            "array_col",
            "pxl_row_in_fullres",
            "pxl_col_in_fullres",
        ]
        return rows[1:]
    rows = list(csv.reader((spatial / "tissue_positions_list.csv").open()))
    assert not rows[0][1].isalpha(), "the Space Ranger 1.x variant has no header"
    return rows


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_sample_sheets_use_relative_paths_that_exist(demo_dir: Path) -> None:
    rows = _read_tsv(demo_dir / "samples.tsv")
    assert list(rows[0]) == ["slide_id", "patient", "image", "expression", "format", "spots", "mpp"]
    assert [r["slide_id"] for r in rows] == ["demo_1", "demo_2"]
    assert [r["patient"] for r in rows] == ["P1", "P2"]
    for row in rows:
        assert row["format"] == "visium" and row["spots"] == "" and row["mpp"] == ""
        assert not Path(row["image"]).is_absolute()
        assert (demo_dir / row["image"]).is_file()
        assert (demo_dir / row["expression"] / "filtered_feature_bc_matrix.h5").is_file()
    predict = _read_tsv(demo_dir / "predict.tsv")
    assert predict == [{"slide_id": "demo_heonly", "image": "demo_heonly.tif", "mpp": ""}]
    assert (demo_dir / "demo_heonly.tif").is_file()
    assert not (demo_dir / "demo_heonly").exists(), "the H&E-only slide has no expression"
    assert "stevs demo" in (demo_dir / "README.md").read_text()
    assert not list(demo_dir.rglob("*.tmp-*"))


def test_openslide_reads_pyramid_and_mpp(demo_dir: Path) -> None:
    openslide = pytest.importorskip("openslide")
    size_px = round(SIZE_UM / MPP)
    with openslide.OpenSlide(str(demo_dir / "demo_1.tif")) as slide:
        assert slide.dimensions == (size_px, size_px)
        assert slide.level_count == 3  # 1500 -> 750 -> 375 px
        np.testing.assert_allclose(slide.level_downsamples, [1.0, 2.0, 4.0])
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP)
        region = np.asarray(slide.read_region((0, 0), 0, (64, 64)).convert("RGB"))
        assert region.mean() > 200, "the slide corner is white glass"


def test_tifffile_sees_tiled_rgb_pages(demo_dir: Path) -> None:
    import tifffile

    with tifffile.TiffFile(demo_dir / "demo_2.tif") as tif:
        pages = tif.pages
        assert len(pages) == 3
        assert all(page.is_tiled and page.tilewidth == constants.TIFF_TILE for page in pages)
        assert [page.shape[0] for page in pages] == [1500, 750, 375]
        assert pages[0].subfiletype == 0
        assert all(page.subfiletype == 1 for page in pages[1:])
        assert all(page.photometric == tifffile.PHOTOMETRIC.RGB for page in pages)
        assert pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        numerator, denominator = pages[0].tags["XResolution"].value
        assert 1e4 * denominator / numerator == pytest.approx(MPP)


def test_both_positions_variants_and_visium_geometry(demo_dir: Path) -> None:
    spatial_1 = demo_dir / "demo_1" / "outs" / "spatial"
    spatial_2 = demo_dir / "demo_2" / "outs" / "spatial"
    assert (spatial_1 / "tissue_positions.csv").exists()
    assert not (spatial_1 / "tissue_positions_list.csv").exists()
    assert (spatial_2 / "tissue_positions_list.csv").exists()
    assert not (spatial_2 / "tissue_positions.csv").exists()
    size_px = round(SIZE_UM / MPP)
    for slide in ("demo_1", "demo_2"):
        rows = _positions(demo_dir / slide)
        barcodes = [r[0] for r in rows]
        assert len(set(barcodes)) == len(barcodes)
        assert all(
            len(b) == 18 and b.endswith("-1") and set(b[:16]) <= set("ACGT") for b in barcodes
        )
        in_tissue = np.array([int(r[1]) for r in rows])
        assert set(in_tissue) == {0, 1}
        array_row, array_col, px_row, px_col = (
            np.array([int(r[i]) for r in rows]) for i in (2, 3, 4, 5)
        )
        assert np.all(array_row % 2 == array_col % 2), "array_col steps by 2 within a row"
        assert px_row.min() >= 0 and px_row.max() < size_px
        assert px_col.min() >= 0 and px_col.max() < size_px
        # 100 µm centre to centre along a row (array_col + 2), rows sqrt(3)/2 * 100 µm apart
        same_row = (array_row[1:] == array_row[:-1]) & (array_col[1:] == array_col[:-1] + 2)
        assert np.abs(np.diff(px_col)[same_row] * MPP - 100.0).max() <= MPP
        row_y = {r: px_row[array_row == r][0] for r in np.unique(array_row)}
        steps = np.diff([row_y[r] for r in sorted(row_y)]) * MPP
        assert np.abs(steps - 50 * math.sqrt(3)).max() <= 1.5 * MPP
        scalefactors = json.loads(
            (demo_dir / slide / "outs/spatial/scalefactors_json.json").read_text()
        )
        assert scalefactors["spot_diameter_fullres"] == pytest.approx(55.0 / MPP)
        assert scalefactors["fiducial_diameter_fullres"] > scalefactors["spot_diameter_fullres"]
        from PIL import Image

        for kind, max_side in (("hires", 2000), ("lowres", 600)):
            with Image.open(demo_dir / slide / f"outs/spatial/tissue_{kind}_image.png") as image:
                assert max(image.size) <= max_side
                assert image.size[0] == round(size_px * scalefactors[f"tissue_{kind}_scalef"])


def test_10x_h5_reads_with_scanpy_in_positions_order(demo_dir: Path) -> None:
    import scanpy as sc

    for slide in ("demo_1", "demo_2"):
        adata = sc.read_10x_h5(demo_dir / slide / "outs" / "filtered_feature_bc_matrix.h5")
        in_tissue = [r[0] for r in _positions(demo_dir / slide) if r[1] == "1"]
        assert list(adata.obs_names) == in_tissue
        names = list(adata.var_names)
        assert len(names) == constants.DEFAULT_N_GENES and len(set(names)) == len(names)
        assert {"TUMOUR_1", "STROMA_1", "FAT_1", "IMMUNE_1", "GENE_001"} <= set(names)
        assert sum(n.startswith("MT-") for n in names) >= 3
        assert sum(n.startswith(("RPL", "RPS")) for n in names) >= 3
        assert set(adata.var["feature_types"]) == {"Gene Expression"}
        counts = adata.X.toarray()
        assert np.all(counts >= 0) and np.all(counts == np.round(counts))
        library = counts.sum(axis=1)
        assert library.min() > 0
        assert library.std() / library.mean() > 0.2, "library sizes vary between spots"
        sparse = [i for i, n in enumerate(names) if n.startswith("GENE_")][-3:]
        assert np.mean(counts[:, sparse] == 0) > 0.6, "some genes are zero in most spots"


def test_markers_follow_their_tissue_type(demo_dir: Path) -> None:
    import scanpy as sc
    from scipy.stats import spearmanr

    expression, shares = [], []
    for slide in ("demo_1", "demo_2"):
        adata = sc.read_10x_h5(demo_dir / slide / "outs" / "filtered_feature_bc_matrix.h5")
        counts = adata.X.toarray()
        expression.append(np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4))
        truth = np.load(demo_dir / "truth" / f"{slide}.npz")
        assert list(truth["spot_barcodes"]) == list(adata.obs_names)
        composition = truth["spot_composition"]
        shares.append(composition[:, :4] / (1.0 - composition[:, 4:]))
        names = list(adata.var_names)
    expression_all, share_all = np.concatenate(expression), np.concatenate(shares)
    for k, tissue in enumerate(constants.TISSUE_TYPES):
        markers = [i for i, n in enumerate(names) if n.startswith(f"{tissue.upper()}_")]
        assert len(markers) == constants.N_MARKERS_PER_TYPE
        for i in markers:
            rho = spearmanr(expression_all[:, i], share_all[:, k]).statistic
            assert rho > 0.5, f"{names[i]} vs {tissue}: rho {rho:.2f}"
        other = [j for j in range(4) if j != k]
        rho_other = spearmanr(expression_all[:, markers[0]], share_all[:, other[0]]).statistic
        assert rho_other < 0.3, "a marker does not follow another type"


def test_truth_files_are_consistent(demo_dir: Path) -> None:
    for slide in ("demo_1", "demo_2", "demo_heonly"):
        truth = np.load(demo_dir / "truth" / f"{slide}.npz", allow_pickle=False)
        assert set(truth.files) == set(constants.TRUTH_KEYS)
        assert str(truth["slide_id"]) == slide
        assert list(truth["type_names"]) == list(constants.TYPE_NAMES)
        composition = truth["composition"]
        assert composition.shape[0] == len(constants.TYPE_NAMES)
        np.testing.assert_allclose(composition.sum(axis=0), 1.0, atol=1e-5)
        assert composition[-1].max() > 0.99 and composition[-1].min() < 0.01  # glass and tissue
        assert float(truth["composition_um_per_px"]) * composition.shape[1] == pytest.approx(
            SIZE_UM
        )
        n_spots, n_genes = truth["spot_expected_counts"].shape
        assert n_spots == truth["spot_barcodes"].size > 10
        assert truth["gene_effects"].shape == (n_genes, len(constants.TISSUE_TYPES))
        assert np.all(truth["spot_tissue_fraction"] >= 0.5)
        expected = np.exp(truth["spot_log_rate"]) * truth["spot_size_factor"][:, None]
        np.testing.assert_allclose(truth["spot_expected_counts"], expected, rtol=1e-4)


def test_tumour_spots_are_darker_than_fat_spots(demo_dir: Path) -> None:
    openslide = pytest.importorskip("openslide")
    truth = np.load(demo_dir / "truth" / "demo_1.npz")
    composition, xy = truth["spot_composition"], truth["spot_xy_px"]
    half = round(25 / MPP)
    brightness = {}
    with openslide.OpenSlide(str(demo_dir / "demo_1.tif")) as slide:
        for k, tissue in ((0, "tumour"), (2, "fat")):
            best = int(np.argmax(composition[:, k]))
            assert composition[best, k] > 0.8
            x, y = (int(v) for v in xy[best])
            patch = slide.read_region((x - half, y - half), 0, (2 * half, 2 * half))
            brightness[tissue] = np.asarray(patch.convert("RGB"), dtype=float).mean()
    assert brightness["tumour"] < brightness["fat"] - 30


def test_same_seed_same_bytes_other_seed_other_data(demo_dir: Path, tmp_path: Path) -> None:
    rerun = tmp_path / "rerun"
    argv = ["demo", "--out", str(rerun), "--seed", str(SEED), "--n-slides", str(N_SLIDES)]
    assert cli_main([*argv, "--size-um", str(SIZE_UM), "--mpp", str(MPP)]) == 0
    original, again = _files(demo_dir), _files(rerun)
    assert set(original) == set(again)
    differing = [name for name in original if original[name] != again[name]]
    assert not differing, f"not deterministic: {differing}"

    other = tmp_path / "other"
    make_demo(other, seed=SEED + 1, n_slides=1, size_um=SIZE_UM, mpp=MPP)
    for name in ("demo_1.tif", "demo_1/outs/filtered_feature_bc_matrix.h5", "truth/demo_1.npz"):
        assert (other / name).read_bytes() != original[name]


def test_interrupted_run_leaves_no_sample_sheet(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "README.md").write_text("# Synthetic STevs demo data\n\nof an earlier run\n")
    (tmp_path / "samples.tsv").write_text("stale sheet of an earlier run\n")
    make_slide = study.make_slide
    calls = []

    def failing_make_slide(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return make_slide(*args, **kwargs)

    monkeypatch.setattr(study, "make_slide", failing_make_slide)
    with pytest.raises(KeyboardInterrupt):
        make_demo(tmp_path, seed=0, n_slides=2, size_um=600.0, mpp=2.0)
    assert calls == ["demo_1", "demo_2"]
    assert (tmp_path / "demo_1.tif").exists()
    assert not (tmp_path / "samples.tsv").exists()
    assert not list(tmp_path.rglob("*.tmp-*"))


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"n_genes": 10}, "--n-genes"),
        ({"mpp": 0.0}, "--mpp"),
        ({"size_um": 100.0}, "--size-um"),
        ({"n_slides": 0}, "--n-slides"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_bad_settings_raise_input_errors(tmp_path: Path, kwargs: dict, problem: str) -> None:
    with pytest.raises(StevsInputError, match=problem):
        make_demo(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(StevsInputError, match=str(target)):
        make_demo(target, size_um=600.0, mpp=2.0, n_slides=1)
