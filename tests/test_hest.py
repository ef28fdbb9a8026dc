"""HEST interoperability: patch caches that HEST's own code reads (``img``, ``barcode``,
``coords`` and their attributes, the layout of ``hestcore.wsi.WSIPatcher.to_h5``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import write_pyramid_tiff

from stevs.cli import main
from stevs.demo import make_demo
from stevs.errors import StevsInputError
from stevs.io.expression import read_visium
from stevs.io.fold_file import read_fold
from stevs.io.ingest import ingest_from_sheet
from stevs.io.patch_cache import PatchCache
from stevs.io.prediction import read_prediction
from stevs.io.samples import read_sample_sheet
from stevs.io.slide import open_slide
from stevs.metrics import evaluate_fold
from stevs.tiling import tile_slide, tile_spots


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


# -- a HEST-1k sample read through ingest, tiling, folds and prediction -------------------------


def write_hest_sample(root: Path, sample_id: str, outs: Path, image: Path, patient: str) -> None:
    """One sample in HEST-1k's published layout (``st/``, ``wsis/``, ``metadata/``), made
    from a demo slide: raw counts and level-0 spot centres as HEST's own ``.h5ad`` has them."""
    adata = read_visium(outs)
    adata.uns.pop("scalefactors", None)
    xy = adata.obsm["spatial"]
    adata.obs["in_tissue"] = 1
    adata.obs["pxl_col_in_fullres"], adata.obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
    thumbnail = np.full((64, 64, 3), 230, np.uint8)  # HEST's downscaled_fullres entry
    adata.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": thumbnail},
            "scalefactors": {"tissue_downscaled_fullres_scalef": 0.05, "spot_diameter_fullres": 69},
        }
    }
    for folder in ("st", "wsis", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    shutil.copy(image, root / "wsis" / f"{sample_id}.tif")
    meta = {
        "id": sample_id,
        "patient": patient,
        "st_technology": "Visium",
        "pixel_size_um_estimated": 0.8,
        "pixel_size_um_embedded": 0.8,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "species": "Homo sapiens",
    }
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))


def test_hest_samples_through_ingest_tiling_fixed_folds_prediction_and_hest_bench(
    tmp_path: Path,
) -> None:
    """HEST-1k samples in HEST's layout run through ingest, tiling, folds, training and
    prediction; a HEST-Benchmark task folder (``splits/``, ``var_50genes.json``), fold scheme fixed,
    HEST's normalisation, and ``--protocol hest_bench`` equal to what HEST's benchmark code
    computes from the same predictions (log1p of raw counts, scipy pearsonr per gene over all
    test spots, mean over genes)."""
    import scanpy as sc
    from scipy.stats import pearsonr

    sheet = make_demo(tmp_path / "demo", seed=3, n_slides=3, size_um=1000.0, mpp=0.8)
    demo = read_sample_sheet(sheet)
    bench = tmp_path / "bench"
    ids = [f"NCBI{i}" for i in range(3)]
    for sample_id, (_, row) in zip(ids, demo.iterrows(), strict=True):
        write_hest_sample(
            bench, sample_id, Path(row["expression"]), Path(row["image"]), row["patient"]
        )
    (bench / "splits").mkdir()
    header = "sample_id,patches_path,expr_path\n"
    for split, members in (("train", ids[:2]), ("test", ids[2:])):
        rows = "".join(f"{s},patches/{s}.h5,adata/{s}.h5ad\n" for s in members)
        (bench / "splits" / f"{split}_0.csv").write_text(header + rows)
    genes = list(ad.read_h5ad(bench / "st" / f"{ids[0]}.h5ad").var_names[:12])
    (bench / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    lines = ["slide_id\timage\texpression\tformat"] + [f"{s}\t\tst/{s}.h5ad\thest" for s in ids]
    (tmp_path / "samples.tsv").write_text("\n".join(lines) + "\n")
    slides = []
    for sample_id in ids:
        out = tmp_path / "slides" / f"{sample_id}.h5ad"
        ingest_from_sheet(tmp_path / "samples.tsv", sample_id, out, data_root=bench)
        adata, source = ad.read_h5ad(out), ad.read_h5ad(bench / "st" / f"{sample_id}.h5ad")
        info = adata.uns["stevs"]
        assert info["mpp"] == 0.8 and info["mpp_source"] == "hest_metadata:pixel_size_um_estimated"
        assert info["technology"] == "visium" and info["spot_diameter_um"] == 55.0
        assert info["image_path"].endswith(f"wsis/{sample_id}.tif")  # image left empty
        assert info["patient"] == demo.iloc[ids.index(sample_id)]["patient"]  # metadata's
        np.testing.assert_array_equal(adata.obsm["spatial"], source.obsm["spatial"])
        assert (adata.X != source.X).nnz == 0
        tile_slide(out, tmp_path / "patches" / f"{sample_id}.h5", patch_px=32, patch_mpp=2.0)
        slides.append(str(out))
    folds_args = ["folds", "--slides", *slides, "--patches-dir", str(tmp_path / "patches")]
    folds_args += ["--scheme", "fixed", "--splits", str(bench / "splits"), "--panel", "gene_list"]
    folds_args += ["--gene-list", str(bench / "var_50genes.json"), "--normalisation", "log1p"]
    assert main([*folds_args, "--out-dir", str(tmp_path / "folds")]) == 0
    fold_path = tmp_path / "folds" / "fold0.json"
    fold = read_fold(fold_path)
    assert fold.test == [ids[2]] and sorted(fold.train + fold.val) == ids[:2]
    assert fold.genes == genes and fold.normalisation_method == "log1p"
    model, pred = tmp_path / "model", tmp_path / "pred"
    main(["train", "--fold", str(fold_path), "--method", "ridge_color", "--out", str(model)])
    main(["predict", "--model-dir", str(model), "--fold", str(fold_path), "--out-dir", str(pred)])
    prediction = read_prediction(pred / f"{ids[2]}.h5ad", fold.genes)
    assert prediction.mean.shape == (len(prediction.barcodes), 12) and len(prediction.barcodes) > 50
    out = tmp_path / "metrics" / "fold0.tsv"
    evaluate = ["evaluate", "--fold", str(fold_path), "--predictions", str(pred)]
    assert (
        main([*evaluate, "--method", "ridge_color", "--protocol", "hest_bench", "--out", str(out)])
        == 0
    )
    summary = pd.read_csv(out.with_name("fold0.summary.tsv"), sep="\t").iloc[0]
    assert summary["protocol"] == "hest_bench"
    # HEST's benchmark: load_adata(expr, genes, barcodes, normalize=True) -> sc.pp.log1p
    predicted = ad.read_h5ad(pred / f"{ids[2]}.h5ad")
    observed = sc.read_h5ad(bench / "st" / f"{ids[2]}.h5ad")[predicted.obs_names, genes].copy()
    observed.X = observed.X.astype(np.float64)
    sc.pp.log1p(observed)
    y_test = np.asarray(observed.to_df().values)
    r = [pearsonr(y_test[:, g], predicted[:, genes].X[:, g])[0] for g in range(len(genes))]
    assert summary["hest_bench_pearson_r"] == pytest.approx(np.mean(r), abs=1e-6)
    assert summary["hest_bench_pearson_r_std"] == pytest.approx(np.std(r), abs=1e-6)
    # a fold made another way is refused, naming it
    assert (
        main(
            [
                "folds",
                *folds_args[1:-2],
                "--normalisation",
                "log1p_cp10k",
                "--out-dir",
                str(tmp_path / "f2"),
            ]
        )
        == 0
    )
    with pytest.raises(StevsInputError, match="fold0.json: protocol hest_bench needs"):
        evaluate_fold(tmp_path / "f2" / "fold0.json", pred, "ridge_color", "hest_bench")
