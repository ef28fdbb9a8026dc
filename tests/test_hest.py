"""HEST interoperability: patch caches that HEST's own code reads (``img``, ``barcode``,
``coords`` and their attributes, the layout of ``hestcore.wsi.WSIPatcher.to_h5``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
from conftest import write_pyramid_tiff

from stevs.cli import main
from stevs.demo import make_demo
from stevs.io.expression import read_visium
from stevs.io.fold_file import read_fold
from stevs.io.patch_cache import PatchCache
from stevs.io.prediction import read_prediction
from stevs.io.samples import read_sample_sheet
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


def test_hest_samples_run_through_ingest_tiling_folds_and_prediction(tmp_path: Path) -> None:
    sheet = make_demo(tmp_path / "demo", seed=2, n_slides=3, size_um=1000.0, mpp=0.8)
    demo = read_sample_sheet(sheet)
    hest = tmp_path / "hest"
    ids = {}
    for i, (slide_id, row) in enumerate(demo.iterrows()):
        ids[slide_id] = f"TENX{90 + i}"
        write_hest_sample(
            hest, ids[slide_id], Path(row["expression"]), Path(row["image"]), row["patient"]
        )
    # image left empty: wsis/{id}.tif; patient from the HEST metadata
    lines = ["slide_id\tpatient\timage\texpression\tformat"]
    lines += [f"{ids[s]}\t\t\tst/{ids[s]}.h5ad\thest" for s in demo.index]
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("\n".join(lines) + "\n")
    slides = []
    for slide_id in demo.index:
        out = tmp_path / "slides" / f"{ids[slide_id]}.h5ad"
        assert main(
            [
                "ingest",
                "--sample-sheet",
                str(sheet),
                "--data-root",
                str(hest),
                "--slide-id",
                ids[slide_id],
                "--out",
                str(out),
            ]
        ) in (0, None)
        adata = ad.read_h5ad(out)
        info = adata.uns["stevs"]
        assert info["mpp"] == 0.8 and info["mpp_source"] == "hest_metadata:pixel_size_um_estimated"
        assert info["technology"] == "visium" and info["patient"] == demo.at[slide_id, "patient"]
        assert info["image_path"].endswith(f"wsis/{ids[slide_id]}.tif")
        source = ad.read_h5ad(hest / "st" / f"{ids[slide_id]}.h5ad")
        np.testing.assert_array_equal(adata.obsm["spatial"], source.obsm["spatial"])
        assert (adata.X != source.X).nnz == 0
        assert main(
            [
                "tile",
                "--slide",
                str(out),
                "--out",
                str(tmp_path / "patches" / f"{ids[slide_id]}.h5"),
                "--patch-px",
                "32",
                "--patch-um",
                "64",
            ]
        ) in (0, None)
        slides.append(str(out))
    assert main(
        [
            "folds",
            "--slides",
            *slides,
            "--patches-dir",
            str(tmp_path / "patches"),
            "--n-genes",
            "20",
            "--n-headline",
            "10",
            "--out-dir",
            str(tmp_path / "folds"),
        ]
    ) in (0, None)
    folds = sorted((tmp_path / "folds").glob("fold*.json"))
    assert len(folds) == 2  # two patients: leave one patient out
    fold = read_fold(folds[0])
    model = tmp_path / "model"
    assert main(
        ["train", "--fold", str(folds[0]), "--method", "ridge_color", "--out", str(model)]
    ) in (0, None)
    assert main(
        [
            "predict",
            "--model-dir",
            str(model),
            "--fold",
            str(folds[0]),
            "--out-dir",
            str(tmp_path / "pred"),
        ]
    ) in (0, None)
    for slide in fold.test:
        prediction = read_prediction(tmp_path / "pred" / f"{slide}.h5ad", fold.genes)
        assert prediction.mean.shape == (len(prediction.barcodes), len(fold.genes))
        assert len(prediction.barcodes) > 50
