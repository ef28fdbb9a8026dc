"""Tests of stevs.metrics: metric kernels against scipy, constant genes, pooled vs per-slide r,
and the ``stevs evaluate`` command on tiny fixture files."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import make_fold_file
from scipy import sparse, stats

from stevs import metrics
from stevs.cli import main
from stevs.errors import StevsInputError

GENES = [f"g{i}" for i in range(6)]
EXTRA = ["x0", "x1"]  # genes outside the panel: they still count in the library size


def write_slide(path: Path, counts: np.ndarray, genes: list[str], slide: str) -> list[str]:
    """A slide AnnData (raw counts) with ``len(counts)`` spots; returns the barcodes."""
    barcodes = [f"{slide}-{i}" for i in range(len(counts))]
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame(index=genes),
    )
    adata.obsm["spatial"] = np.column_stack([np.arange(len(counts)), np.zeros(len(counts))]) * 1.0
    adata.uns["stevs"] = {"slide": slide, "patient": slide, "mpp": 0.5}
    adata.write_h5ad(path)
    return barcodes


def write_prediction(
    path: Path, values: np.ndarray, barcodes: list[str], genes: list[str], std=None
) -> None:
    """A prediction AnnData per docs/architecture.md."""
    pred = ad.AnnData(
        X=values.astype(np.float32),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame(index=genes),
    )
    if std is not None:
        pred.layers["std"] = np.asarray(std, dtype=np.float32)
    pred.obsm["spatial"] = np.zeros((len(barcodes), 2))
    pred.uns["stevs"] = {"method": "m", "fold": "fold0", "slide": path.stem, "model_sha256": "0"}
    path.parent.mkdir(parents=True, exist_ok=True)
    pred.write_h5ad(path)


def write_fold(path: Path, slides: dict[str, Path], test: list[str], **extra) -> None:
    """A fold file over ``slides`` (every slide not in ``test`` trains)."""
    extra.setdefault("train", [s for s in slides if s not in test])
    make_fold_file(
        path,
        {s: (p, Path(str(p) + ".h5")) for s, p in slides.items()},
        test=test,
        genes=GENES,
        headline_genes=GENES[:3],
        **extra,
    )


def observed_of(counts: np.ndarray) -> np.ndarray:
    """Reference normalisation, written out longhand."""
    library = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts[:, : len(GENES)] / library * 1e4)


# --------------------------------------------------------------------------- kernels


def test_pearson_and_spearman_equal_scipy_on_known_vectors() -> None:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(40, 5))
    pred = obs * rng.uniform(-1, 1, size=5) + rng.normal(size=(40, 5))
    pred[:, 4] = np.round(pred[:, 4])  # ties for Spearman
    r = metrics.pearson_per_gene(obs, pred)
    rho = metrics.spearman_per_gene(obs, pred)
    for g in range(5):
        assert r[g] == pytest.approx(stats.pearsonr(obs[:, g], pred[:, g])[0], abs=1e-12)
        assert rho[g] == pytest.approx(stats.spearmanr(obs[:, g], pred[:, g])[0], abs=1e-12)
    # a hand-checked value: r of (1, 2, 3) against (1, 3, 2) is 0.5
    assert metrics.pearson_per_gene(np.c_[[1.0, 2, 3]], np.c_[[1.0, 3, 2]])[0] == pytest.approx(0.5)


def test_perfect_predictor_scores_one_and_shuffled_about_zero() -> None:
    rng = np.random.default_rng(1)
    obs = rng.gamma(2.0, size=(2000, 20))
    assert np.allclose(metrics.pearson_per_gene(obs, obs), 1.0)
    assert np.allclose(metrics.spearman_per_gene(obs, 3 * obs + 1), 1.0)
    shuffled = rng.permutation(obs)
    assert abs(metrics.pearson_per_gene(obs, shuffled).mean()) < 0.03
    table = metrics.per_gene_table(obs, obs, [f"g{i}" for i in range(20)])
    assert (table["mse"] == 0).all() and (table["mae"] == 0).all()


def test_constant_genes_are_nan_flagged_counted_and_excluded() -> None:
    rng = np.random.default_rng(2)
    obs = rng.normal(size=(30, 4))
    obs[:, 1] = 0.0  # constant observed gene
    pred = obs + rng.normal(scale=0.1, size=obs.shape)
    pred[:, 2] = 5.0  # constant prediction of a varying gene: no information, r = 0
    table = metrics.per_gene_table(obs, pred, list("abcd"), headline_genes=["a", "b"])
    assert np.isnan(table.loc[1, "pearson_r"]) and np.isnan(table.loc[1, "spearman_rho"])
    assert table["constant"].tolist() == [False, True, False, False]
    assert table.loc[2, "pearson_r"] == 0.0
    assert np.isfinite(table.loc[1, "mse"])  # errors stay defined for a constant gene
    summary = metrics.summarise_fold(table)
    kept = table["pearson_r"].drop(index=1)
    assert summary["pearson_r_mean_all"] == pytest.approx(kept.mean())
    assert summary["pearson_r_mean_headline"] == pytest.approx(table.loc[0, "pearson_r"])
    assert summary["n_constant"] == 1
    assert summary["n_genes"] == 4


def test_top50_optimistic_uses_best_genes_only() -> None:
    rng = np.random.default_rng(3)
    obs = rng.normal(size=(200, 60))
    noise = np.linspace(0.1, 5, 60)
    pred = obs + rng.normal(size=obs.shape) * noise
    table = metrics.per_gene_table(obs, pred, [f"g{i}" for i in range(60)])
    summary = metrics.summarise_fold(table)
    best50 = np.sort(table["pearson_r"].to_numpy())[-50:]
    assert summary["pearson_r_top50_optimistic"] == pytest.approx(best50.mean())
    assert summary["pearson_r_top50_optimistic"] > summary["pearson_r_mean_all"]


def test_coverage_of_gaussian_interval() -> None:
    rng = np.random.default_rng(4)
    pred = rng.normal(size=(20000, 2))
    std = np.full_like(pred, 2.0)
    obs = pred + rng.normal(size=pred.shape) * std
    cov = metrics.coverage_per_gene(obs, pred, std)
    assert np.allclose(cov, 0.90, atol=0.01)
    assert np.allclose(metrics.coverage_per_gene(obs, pred, std / 10), 0.13, atol=0.02)


def test_normalise_counts_log1p_cp10k_over_all_genes() -> None:
    counts = np.array([[1, 3, 6], [0, 0, 0], [2, 0, 2]], dtype=float)
    out = metrics.normalise_counts(sparse.csr_matrix(counts), ["a", "b", "c"], ["c", "a"])
    expected = np.log1p(np.array([[6 / 10 * 1e4, 1 / 10 * 1e4], [0, 0], [5e3, 5e3]]))
    assert np.allclose(out, expected)
    raw = metrics.normalise_counts(counts, ["a", "b", "c"], ["b"], method="raw")
    assert raw[:, 0].tolist() == [3, 0, 0]
    with pytest.raises(StevsInputError, match="missing"):
        metrics.normalise_counts(counts, ["a", "b", "c"], ["zz"], source="slide.h5ad")


# --------------------------------------------------------------------------- evaluate a fold


@pytest.fixture()
def two_slide_fold(tmp_path: Path) -> dict:
    """Two test slides whose gene levels differ by a slide offset the predictor misses."""
    rng = np.random.default_rng(5)
    slides, counts = {}, {}
    for slide in ("A", "B", "C"):
        c = rng.poisson(20, size=(50, len(GENES) + len(EXTRA))).astype(float)
        if slide == "B":
            c[:, len(GENES)] += 2000  # deeper off-panel gene: lower panel levels on B
        c[:, 5] = 0  # gene g5 never expressed: constant in every slide
        counts[slide] = c
        slides[slide] = tmp_path / f"{slide}.h5ad"
        write_slide(slides[slide], c, GENES + EXTRA, slide)
    fold_path = tmp_path / "fold0.json"
    write_fold(fold_path, slides, test=["A", "B"])
    return {"dir": tmp_path, "fold": fold_path, "counts": counts}


def test_pooled_and_per_slide_r_differ_and_stay_apart(two_slide_fold: dict) -> None:
    tmp, counts = two_slide_fold["dir"], two_slide_fold["counts"]
    rng = np.random.default_rng(6)
    pred_dir = tmp / "pred"
    for slide in ("A", "B"):
        obs = observed_of(counts[slide])
        centred = obs - obs.mean(axis=0)  # right within a slide, blind to the slide level
        pred = centred + rng.normal(scale=0.05, size=obs.shape)
        barcodes = [f"{slide}-{i}" for i in range(len(obs))]
        write_prediction(pred_dir / f"{slide}.h5ad", pred, barcodes, GENES, std=np.ones_like(pred))
    per_gene, summary, pooled = metrics.evaluate_fold(two_slide_fold["fold"], pred_dir, "m")
    assert set(per_gene["slide"]) == {"A", "B"}  # no "pooled" rows in the per-slide table
    assert per_gene.columns.tolist() == metrics.PER_GENE_COLUMNS
    assert summary["pearson_r_mean_all"] > 0.8
    assert summary["pooled_pearson_r_mean_all"] < summary["pearson_r_mean_all"] - 0.2
    per_gene_r = per_gene.groupby("gene", sort=False)["pearson_r"].mean().dropna()
    assert summary["pearson_r_mean_all"] == pytest.approx(per_gene_r.mean())
    assert pooled.set_index("gene")["pooled_pearson_r"].drop("g5").mean() == pytest.approx(
        summary["pooled_pearson_r_mean_all"]
    )
    assert summary["n_constant"] == 2  # g5 in A and in B
    assert summary["n_test_slides"] == 2 and summary["n_spots"] == 100


def test_evaluate_cli_writes_tables(two_slide_fold: dict) -> None:
    tmp, counts = two_slide_fold["dir"], two_slide_fold["counts"]
    pred_dir = tmp / "pred"
    for slide in ("A", "B"):
        obs = observed_of(counts[slide])
        barcodes = [f"{slide}-{i}" for i in range(len(obs))]
        # reversed spot and gene order in the file: evaluation must align by name
        write_prediction(pred_dir / f"{slide}.h5ad", obs[::-1, ::-1], barcodes[::-1], GENES[::-1])
    out = tmp / "metrics" / "m" / "fold0.tsv"
    rc = main(
        ["evaluate", "--fold", str(two_slide_fold["fold"]), "--predictions", str(pred_dir),
         "--method", "m", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    table = pd.read_csv(out, sep="\t")
    assert table.columns.tolist() == metrics.PER_GENE_COLUMNS
    assert len(table) == 2 * len(GENES)
    varying = table[~table["constant"]]
    assert np.allclose(varying["pearson_r"], 1.0) and np.allclose(varying["mse"], 0, atol=1e-10)
    assert table["coverage90"].isna().all()  # no std layer, no coverage
    assert table.loc[table["gene"].isin(GENES[:3]), "headline"].all()
    summary = pd.read_csv(metrics.summary_path(out), sep="\t")
    assert summary.loc[0, "pearson_r_mean_all"] == pytest.approx(1.0)
    assert {"pooled_pearson_r_mean_all", "pearson_r_top50_optimistic"} <= set(summary.columns)
    assert metrics.pooled_path(out).exists()
    assert not list(out.parent.glob("*.tmp-*"))


def test_within_slice_fold_scores_test_spots_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    c = rng.poisson(30, size=(40, len(GENES) + len(EXTRA))).astype(float)
    barcodes = write_slide(tmp_path / "A.h5ad", c, GENES + EXTRA, "A")
    test_spots = barcodes[20:]
    spots = {
        "train": {"A": barcodes[:15]},
        "val": {"A": barcodes[15:20]},
        "test": {"A": test_spots},
    }
    write_fold(
        tmp_path / "f.json",
        {"A": tmp_path / "A.h5ad"},
        test=["A"],
        train=["A"],
        val=["A"],
        spots=spots,
        scheme="within_slice",
    )
    obs = observed_of(c)
    pred = obs.copy()
    pred[:20] = rng.normal(size=(20, len(GENES)))  # garbage on training spots: never scored
    write_prediction(tmp_path / "p" / "A.h5ad", pred, barcodes, GENES)
    per_gene, summary, _ = metrics.evaluate_fold(tmp_path / "f.json", tmp_path / "p", "m")
    assert (per_gene["n_spots"] == 20).all()
    assert summary["pearson_r_mean_all"] == pytest.approx(1.0)
    # a prediction that lacks test spots is an input error naming the file
    write_prediction(tmp_path / "q" / "A.h5ad", pred[:30], barcodes[:30], GENES)
    with pytest.raises(StevsInputError, match=r"q/A\.h5ad.*missing"):
        metrics.evaluate_fold(tmp_path / "f.json", tmp_path / "q", "m")


def test_bad_inputs_name_the_file(two_slide_fold: dict) -> None:
    tmp = two_slide_fold["dir"]
    with pytest.raises(StevsInputError, match="no prediction for test slide"):
        metrics.evaluate_fold(two_slide_fold["fold"], tmp / "nothing", "m")
    write_prediction(tmp / "p" / "A.h5ad", np.zeros((50, 2)), [f"A-{i}" for i in range(50)],
                     GENES[:2])  # fmt: skip
    with pytest.raises(StevsInputError, match=r"A\.h5ad: prediction lacks panel genes"):
        metrics.evaluate_fold(two_slide_fold["fold"], tmp / "p", "m")
    bad = tmp / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StevsInputError, match="bad.json: not a valid fold file"):
        metrics.evaluate_fold(bad, tmp / "p", "m")
