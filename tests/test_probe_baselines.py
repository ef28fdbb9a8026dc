"""The strongest simple baselines: ``ridge_context`` (the probe with STevs's neighbourhood
context) and ``ridge_rrr`` (the reduced-rank probe), on tiny synthetic grid folds."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_fold_file, write_patch_cache
from scipy import sparse
from scipy.ndimage import convolve

from stevs import baselines, metrics
from stevs.io.fold_file import read_fold
from stevs.methods import REGISTRY
from stevs.methods import baselines as baseline_names
from stevs.models import ridge as ridge_probe
from stevs.models.presets import PRESETS

torch.set_num_threads(1)

PATCH, SIDE, PITCH = 8, 12, 100.0
SLIDES = ("A", "B", "C", "D")  # train A, B; val C; test D


def neighbour_mean_on_grid(z: np.ndarray) -> np.ndarray:
    """The mean of the 8 surrounding grid cells (fewer at the edge): the truth of the test,
    computed without stevs."""
    ring = np.ones((3, 3))
    ring[1, 1] = 0
    total = convolve(z, ring, mode="constant")
    count = convolve(np.ones_like(z), ring, mode="constant")
    return total / count


def grid_slide(
    tmp: Path, slide: str, rng: np.random.Generator, genes: dict, side: int = SIDE
) -> tuple:
    """A ``side`` x ``side`` square grid of spots whose patches' redness is a random field ``z``;
    ``genes`` maps gene -> function(z grid, neighbour mean grid, rng) -> Poisson rate grid."""
    z = rng.uniform(0, 1, (side, side))
    nbr = neighbour_mean_on_grid(z)
    rates = [fn(z, nbr, rng).ravel() for fn in genes.values()]
    counts = np.column_stack([rng.poisson(r) for r in rates] + [rng.poisson(2000, side**2)])
    rows, cols = np.divmod(np.arange(side**2), side)
    coords = np.column_stack([cols, rows]) * PITCH + 50.0
    patches = rng.integers(0, 30, size=(side**2, PATCH, PATCH, 3)).astype(np.float64)
    patches[..., 0] += 100 + 120 * z.ravel()[:, None, None]
    patches[..., 1:] += 120
    barcodes = [f"{slide}-{i}" for i in range(side**2)]
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame(index=[*genes, "other"]),
    )
    adata.obsm["spatial"] = coords
    adata.uns["stevs"] = {"slide": slide, "patient": slide, "mpp": 1.0}
    adata_path, cache_path = tmp / f"{slide}.h5ad", tmp / f"{slide}.h5"
    adata.write_h5ad(adata_path)
    write_patch_cache(cache_path, np.clip(patches, 0, 255).astype(np.uint8), barcodes, coords,
                      slide=slide)  # fmt: skip
    return adata_path, cache_path


def grid_fold(tmp: Path, genes: dict, seed: int = 0, side: int = SIDE) -> Path:
    rng = np.random.default_rng(seed)
    slides = {s: grid_slide(tmp, s, rng, genes, side) for s in SLIDES}
    return make_fold_file(tmp / "fold0.json", slides, train=["A", "B"], val=["C"], test=["D"],
                          genes=list(genes))  # fmt: skip


def mean_colour(patches: np.ndarray) -> np.ndarray:
    """A tiny frozen 'encoder': the mean RGB of a patch."""
    return patches.reshape(len(patches), -1, 3).mean(axis=1)


def fit_and_score(fold: Path, tmp: Path, method: str, embed=mean_colour) -> pd.Series:
    """Train on the fold, predict its test slide, per-gene Pearson r of the test slide."""
    model_dir = baselines.train_ridge(fold, method, tmp / "m" / method, embed=embed)
    baselines.predict_ridge(model_dir, fold, tmp / "p" / method, embed=embed)
    per_gene, _, _ = metrics.evaluate_fold(fold, tmp / "p" / method, method)
    return per_gene.set_index("gene")["pearson_r"]


def test_registry_has_both_probes_as_frozen_encoder_baselines() -> None:
    for name in ("ridge_context", "ridge_rrr"):
        method = REGISTRY[name]
        assert method.kind == "ridge" and method.encoder == "frozen" and method.baseline
        assert method.reads_embeddings(frozen=True, pretrained=True) and not method.seeded
        assert name in baseline_names()
    assert REGISTRY["ridge_context"].features == "embedding+context"
    assert REGISTRY["ridge_rrr"].reduced_rank and not REGISTRY["ridge_embed"].reduced_rank
    assert baselines.context_radius_of("effnet_lite0_in1k") == PRESETS[
        "effnet_lite0_in1k"].context_radius  # fmt: skip
    assert baselines.context_radius_of("not_a_preset") == 1.5  # STevsConfig's default


def test_ridge_context_beats_ridge_embed_where_expression_follows_the_neighbours(tmp_path):
    genes = {
        "nbr_gene": lambda z, nbr, rng: 5 + 200 * nbr,  # the neighbours' redness only
        "own_gene": lambda z, nbr, rng: 5 + 100 * z,
    }
    fold = grid_fold(tmp_path, genes)
    own = fit_and_score(fold, tmp_path, "ridge_embed")
    context = fit_and_score(fold, tmp_path, "ridge_context")
    # z is independent from spot to spot: a spot's own patch says nothing of its neighbours
    assert abs(own["nbr_gene"]) < 0.25 and context["nbr_gene"] > 0.6
    assert context["own_gene"] > 0.6 and context.mean() > own.mean() + 0.3
    config = json.loads((tmp_path / "m/ridge_context/config.json").read_text())
    assert config["context_radius"] == 1.5 and config["ridge"]["n_features"] == 6
    assert json.loads((tmp_path / "m/ridge_embed/config.json").read_text())[
        "context_radius"] is None  # fmt: skip


def test_ridge_context_computes_the_test_slides_context_the_same_way(tmp_path):
    """Prediction = the saved linear map on [own, neighbour mean] of the test slide's spots."""
    fold = grid_fold(tmp_path, {"nbr_gene": lambda z, nbr, rng: 5 + 200 * nbr,
                                "own_gene": lambda z, nbr, rng: 5 + 100 * z})  # fmt: skip
    model_dir = baselines.train_ridge(fold, "ridge_context", tmp_path / "m", embed=mean_colour)
    [path] = baselines.predict_ridge(model_dir, fold, tmp_path / "p", embed=mean_colour)
    pred = ad.read_h5ad(path)
    patches, barcodes = baselines.read_patches(read_fold(fold), "D")
    own = mean_colour(patches).astype(np.float32)
    grid = own.reshape(SIDE, SIDE, 3)
    by_hand = np.stack([neighbour_mean_on_grid(grid[..., c]) for c in range(3)], -1)
    features = np.concatenate([own, by_hand.reshape(-1, 3)], axis=1)
    expected = ridge_probe.load_ridge(model_dir).predict(features)
    assert pred.obs_names.tolist() == barcodes
    np.testing.assert_allclose(pred.X, expected, rtol=1e-4, atol=1e-4)


def test_ridge_rrr_picks_a_low_rank_where_the_genes_share_one_programme(tmp_path):
    weights = np.linspace(0.5, 1.5, 10)
    genes = {f"g{i}": (lambda z, nbr, rng, w=w: 10 + 40 * w * z) for i, w in enumerate(weights)}
    fold = grid_fold(tmp_path, genes, seed=3)

    def noisy_pixels(patches: np.ndarray) -> np.ndarray:  # mean colour + 30 noise features
        flat = patches.reshape(len(patches), -1).astype(np.float64)
        return np.concatenate([mean_colour(patches), flat[:, 3:33]], axis=1)

    rrr = fit_and_score(fold, tmp_path, "ridge_rrr", embed=noisy_pixels)
    full = fit_and_score(fold, tmp_path, "ridge_embed", embed=noisy_pixels)
    config = json.loads((tmp_path / "m/ridge_rrr/config.json").read_text())
    assert 0 < config["ridge"]["rank"] <= 2, config["ridge"]["rank_inner_cv_headline_r"]
    coef = ridge_probe.load_ridge(tmp_path / "m/ridge_rrr").coef
    assert np.linalg.matrix_rank(coef, tol=1e-8) == config["ridge"]["rank"]
    assert "rank" not in json.loads((tmp_path / "m/ridge_embed/config.json").read_text())["ridge"]
    assert rrr.mean() >= full.mean() - 0.01


@pytest.mark.parametrize("method", ["ridge_context", "ridge_rrr"])
def test_train_predict_evaluate_round_trip_through_the_cli(tmp_path: Path, method: str):
    from stevs.cli import main

    fold = grid_fold(tmp_path, {"nbr_gene": lambda z, nbr, rng: 5 + 200 * nbr,
                                "own_gene": lambda z, nbr, rng: 5 + 100 * z}, side=5)  # fmt: skip
    out, pred = tmp_path / "m", tmp_path / "p"
    train = ["train", "--fold", str(fold), "--method", method, "--out", str(out),
             "--backbone", "test_efficientnet"]  # fmt: skip
    if method == "ridge_context":
        train += ["--context-radius", "1.0"]  # the 4 nearest: one pitch
    assert main(train) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method
    assert config["context_radius"] == (1.0 if method == "ridge_context" else None)
    argv = ["predict", "--model-dir", str(out), "--fold", str(fold), "--out-dir", str(pred)]
    assert main(argv) == 0
    assert ad.read_h5ad(pred / "D.h5ad").uns["stevs"]["method"] == method
    table = tmp_path / "metrics" / "fold0.tsv"
    argv = ["evaluate", "--fold", str(fold), "--predictions", str(pred), "--method", method,
            "--out", str(table)]  # fmt: skip
    assert main(argv) == 0
    summary = pd.read_csv(table.with_name("fold0.summary.tsv"), sep="\t").iloc[0]
    assert summary["method"] == method and np.isfinite(summary["pearson_r_mean_headline"])
