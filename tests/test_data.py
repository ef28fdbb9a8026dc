"""The torch Dataset over patch caches and slide AnnDatas (stevs.data.SpotDataset)."""

from __future__ import annotations

import pickle
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import write_patch_cache
from torch.utils.data import DataLoader

from stevs.data import SpotDataset, normalise_coords
from stevs.errors import StevsInputError
from stevs.folds import FoldOptions, make_folds
from stevs.panels import normalise

torch.set_num_threads(1)
PATCH = 32


def write_slide(root: Path, slide: str, patient: str, seed: int, shape=(12, 16)) -> Path:
    """Slide AnnData (rectangular grid, 200 px pitch) + a patch cache in shuffled order.

    Each patch encodes its spot's row in the slide: pixel (0, 0) = (row % 256, row // 256).
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    coords = np.column_stack([1000 + 200.0 * cols.ravel(), 300 + 200.0 * rows.ravel()])
    n_spots, genes = len(coords), ["MT-CO1", "RPL3"] + [f"G{i:03d}" for i in range(80)]
    counts = rng.poisson(rng.gamma(0.8, 3.0, len(genes)), size=(n_spots, len(genes)))
    barcodes = [f"{slide}-{i:04d}" for i in range(n_spots)]
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame(index=genes),
    )
    adata.obsm["spatial"] = coords
    adata.uns["stevs"] = {"slide": slide, "patient": patient, "mpp": 0.5, "spot_pitch_um": 100.0}
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "patches").mkdir(exist_ok=True)
    path = root / "slides" / f"{slide}.h5ad"
    adata.write_h5ad(path)
    patches = rng.integers(0, 256, size=(n_spots, PATCH, PATCH, 3), dtype=np.uint8)
    patches[:, 0, 0, 0] = np.arange(n_spots) % 256
    patches[:, 0, 0, 1] = np.arange(n_spots) // 256
    order = rng.permutation(n_spots)
    write_patch_cache(
        root / "patches" / f"{slide}.h5",
        patches[order],
        [barcodes[i] for i in order],
        coords[order],
        slide=slide,
    )
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    paths = [write_slide(root, s, p, seed=i) for i, (s, p) in enumerate([("a", "P1"), ("b", "P2")])]
    options = FoldOptions(scheme="leave_one_slide_out", panel="highly_expressed", n_genes=12)
    make_folds(paths, root / "patches", root / "loso", options)
    within = FoldOptions(scheme="within_slice", k=2, panel="highly_variable", n_genes=10)
    make_folds(paths[:1], root / "patches", root / "within", within)
    return root


def spot_row(barcode: str) -> int:
    return int(barcode.split("-")[1])


def check_patch(item: dict) -> None:
    row = spot_row(item["barcode"])
    assert int(item["patch"][0, 0, 0]) == row % 256
    assert int(item["patch"][1, 0, 0]) == row // 256


def test_items_follow_the_contract(workspace) -> None:
    dataset = SpotDataset(workspace / "loso" / "fold0.json", "test")
    assert len(dataset) == 192 and dataset.slides == ["a"] and dataset.slide_ids == ["a", "b"]
    item = dataset[7]
    assert set(item) == {"patch", "coords", "target", "counts", "library_size", "slide", "barcode"}
    assert item["patch"].dtype == torch.uint8 and item["patch"].shape == (3, PATCH, PATCH)
    assert item["coords"].dtype == torch.float32 and item["coords"].shape == (2,)
    assert item["target"].dtype == torch.float32 and item["target"].shape == (12,)
    assert item["counts"].dtype == torch.float32 and item["library_size"].shape == ()
    assert item["slide"].dtype == torch.int64 and int(item["slide"]) == 0
    assert item["barcode"] == "a-0007"
    check_patch(item)

    adata = ad.read_h5ad(workspace / "slides" / "a.h5ad")
    counts = adata[:, dataset.genes].X.toarray()
    library = np.asarray(adata.X.sum(axis=1)).ravel()
    np.testing.assert_allclose(dataset.counts, counts)
    np.testing.assert_allclose(dataset.library_sizes, library)
    np.testing.assert_allclose(dataset.targets, normalise(counts, library, "log1p_cp10k"))
    assert isinstance(dataset.targets, np.ndarray) and dataset.targets.shape == (192, 12)
    assert dataset.genes == dataset.fold.genes


def test_coords_are_per_slide_isotropic_in_unit_square(workspace) -> None:
    dataset = SpotDataset(workspace / "loso" / "fold0.json", "test")
    coords = dataset.coords
    assert coords.min() >= -1 and coords.max() <= 1
    np.testing.assert_allclose(coords[:, 0].min(), -1, atol=1e-6)  # x spans the larger side
    np.testing.assert_allclose(coords[:, 0].max(), 1, atol=1e-6)
    np.testing.assert_allclose(coords[:, 1].max(), -coords[:, 1].min(), atol=1e-6)
    assert coords[:, 1].max() < 0.8  # y side is shorter: not stretched
    xy = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 2.0]])
    np.testing.assert_allclose(normalise_coords(xy), [[-1, -0.5], [1, -0.5], [1, 0.5]])
    np.testing.assert_array_equal(normalise_coords(np.array([[5.0, 5.0]])), [[0.0, 0.0]])


def test_within_slice_split_takes_the_fold_spots(workspace) -> None:
    for split in ("train", "val", "test"):
        dataset = SpotDataset(workspace / "within" / "fold1.json", split)
        assert dataset.barcodes == dataset.fold.spots[split]["a"]
        assert len(dataset) > 0
        check_patch(dataset[len(dataset) - 1])


def test_raw_normalisation_targets_are_counts(workspace, tmp_path) -> None:
    options = FoldOptions(
        scheme="leave_one_slide_out", panel="highly_expressed", n_genes=8, normalisation="raw"
    )
    slides = [workspace / "slides" / "a.h5ad", workspace / "slides" / "b.h5ad"]
    fold = make_folds(slides, workspace / "patches", tmp_path, options)[1]
    dataset = SpotDataset(fold, "val")
    assert dataset.normalisation == "raw" and fold.normalisation["method"] == "raw"
    np.testing.assert_array_equal(dataset.targets, dataset.counts)
    assert dataset.targets.max() > 1


def test_dataloader_with_workers_reads_every_patch_once(workspace) -> None:
    dataset = SpotDataset(workspace / "loso" / "fold1.json", "train")
    check_patch(dataset[0])  # opens the cache in this process before workers fork
    loader = DataLoader(dataset, batch_size=32, num_workers=2, shuffle=True)
    seen: list[str] = []
    for batch in loader:
        assert batch["patch"].shape[1:] == (3, PATCH, PATCH)
        for patch, barcode in zip(batch["patch"], batch["barcode"], strict=True):
            row = spot_row(barcode)
            assert (int(patch[0, 0, 0]), int(patch[1, 0, 0])) == (row % 256, row // 256)
        seen += batch["barcode"]
    assert sorted(seen) == sorted(dataset.barcodes)
    assert len(seen) == len(dataset.fold.spots["train"]["a"]) < 192
    clone = pickle.loads(pickle.dumps(dataset))
    check_patch(clone[3])
    dataset.close()


def test_slide_subset_and_bad_inputs(workspace, tmp_path) -> None:
    fold = workspace / "loso" / "fold0.json"
    with pytest.raises(StevsInputError, match=r"slides \['b'\] are not in the test split"):
        SpotDataset(fold, "test", slides=["b"])
    with pytest.raises(ValueError, match="unknown split"):
        SpotDataset(fold, "holdout")
    broken = tmp_path / "broken"
    write_slide(broken, "a", "P1", seed=0)
    options = FoldOptions(scheme="within_slice", k=2, panel="highly_expressed", n_genes=5)
    made = make_folds([broken / "slides" / "a.h5ad"], broken / "patches", broken, options)[0]
    with h5py.File(broken / "patches" / "a.h5", "a") as handle:
        del handle["barcodes"]
        handle["barcodes"] = np.asarray([f"x-{i}" for i in range(192)], dtype=object)
    with pytest.raises(StevsInputError, match=r"a\.h5: \d+ of \d+ spots have no patch"):
        SpotDataset(made, "train")
    (broken / "patches" / "a.h5").unlink()
    with pytest.raises(StevsInputError, match="patch cache not found"):
        SpotDataset(made, "train")
