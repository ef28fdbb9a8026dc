"""Gene panels, headline genes and normalisation statistics (stevs.panels)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from stevs.errors import StevsInputError
from stevs.panels import (
    TrainingCounts,
    choose_panel,
    common_genes,
    highly_variable_ranking,
    is_mito,
    is_ribo,
    normalisation_stats,
    normalise,
    rank_highly_expressed,
    rank_highly_variable,
    read_gene_list,
)

MITO_RIBO = ["MT-CO1", "mt-nd1", "RPL3", "rps6"]


def training_counts(n_spots: int = 300, n_genes: int = 120, seed: int = 0) -> TrainingCounts:
    """Poisson counts over two slides; G000 is bursty (very variable), MT-/RP genes high."""
    rng = np.random.default_rng(seed)
    genes = MITO_RIBO + [f"G{i:03d}" for i in range(n_genes)]
    means = np.concatenate([[40.0, 30.0, 25.0, 20.0], rng.gamma(1.0, 2.0, n_genes)])
    counts = rng.poisson(means, size=(n_spots, len(genes))).astype(np.float32)
    bursty = genes.index("G000")
    counts[:, bursty] = rng.poisson(rng.choice([0.1, 40.0], size=n_spots, p=[0.9, 0.1]))
    batch = np.where(np.arange(n_spots) < n_spots // 2, "a", "b")
    return TrainingCounts(sp.csr_matrix(counts), counts.sum(axis=1) + 50.0, batch, genes)


def test_mito_and_ribo_names_any_case() -> None:
    assert is_mito("MT-CO1") and is_mito("mt-Nd1")
    assert not is_mito("MTOR") and not is_mito("SMT-1")
    assert is_ribo("RPL3") and is_ribo("rps6") and is_ribo("Rpl13a")
    assert not is_ribo("GRPL1") and not is_ribo("RP1")


def test_log1p_cp10k_normalisation_and_empty_spots() -> None:
    counts = np.array([[1.0, 3.0], [0.0, 0.0]])
    library = np.array([8.0, 0.0])
    result = normalise(sp.csr_matrix(counts), library, "log1p_cp10k")
    np.testing.assert_allclose(result[0], np.log1p(counts[0] / 8.0 * 1e4), rtol=1e-6)
    np.testing.assert_array_equal(result[1], [0.0, 0.0])
    assert result.dtype == np.float32
    np.testing.assert_array_equal(normalise(counts, library, "raw"), counts)
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise(counts, library, "zscore")


def test_highly_expressed_needs_ten_percent_detection() -> None:
    genes = ["rare_but_huge", "common_low", "common_high"]
    counts = np.zeros((100, 3))
    counts[:5, 0] = 1000.0  # 5% of spots
    counts[:, 1] = 1.0
    counts[:, 2] = 5.0
    training = TrainingCounts(sp.csr_matrix(counts), np.full(100, 2000.0), np.full(100, "a"), genes)
    assert rank_highly_expressed(training, genes) == ["common_high", "common_low"]
    assert rank_highly_expressed(training, genes, min_detection=0.05) == [
        "common_high",
        "common_low",
        "rare_but_huge",  # mean log1p-CP10k 0.05 * log1p(5000) = 0.43 < log1p(5)
    ]


def test_highly_variable_ranks_bursty_gene_first() -> None:
    training = training_counts()
    order, rule = highly_variable_ranking(training, training.genes)
    assert rule == "seurat_v3"
    assert sorted(order) == sorted(training.genes)
    assert order[0] == "G000"
    assert rank_highly_variable(training, training.genes) == order


def test_too_few_genes_for_seurat_v3_fall_back_to_log_variance() -> None:
    training = training_counts(n_genes=8)
    order, rule = highly_variable_ranking(training, training.genes)
    assert rule == "log1p_variance"
    assert order[0] == "G000" and sorted(order) == sorted(training.genes)
    panel = choose_panel(training, {"a": training.genes}, method="highly_variable", n_genes=3)
    assert panel.info["ranking"] == "log1p_variance"
    assert panel.genes[0] == "G000"


def test_common_genes_keep_first_slide_order() -> None:
    assert common_genes({"a": ["X", "Y", "Z"], "b": ["Z", "X"]}) == ["X", "Z"]


def test_panel_excludes_mito_ribo_and_genes_missing_from_a_slide() -> None:
    training = training_counts()
    genes_by_slide = {"a": training.genes, "b": training.genes, "c": training.genes[:-10]}
    panel = choose_panel(training, genes_by_slide, method="highly_expressed", n_genes=30)
    assert len(panel.genes) == 30
    assert not set(panel.genes) & set(MITO_RIBO)
    assert not set(panel.genes) & set(training.genes[-10:])
    assert panel.info["dropped"]["not_in_every_slide"] == 10
    assert panel.info["dropped"]["mitochondrial"] == 2
    assert panel.info["dropped"]["ribosomal"] == 2
    kept = choose_panel(
        training, genes_by_slide, method="highly_expressed", n_genes=30, exclude_mito_ribo=False
    )
    assert set(MITO_RIBO) <= set(kept.genes)  # they are the most expressed genes


def test_headline_genes_are_most_variable_panel_genes() -> None:
    training = training_counts()
    genes_by_slide = {"a": training.genes, "b": training.genes}
    hv = choose_panel(training, genes_by_slide, method="highly_variable", n_genes=60, n_headline=20)
    assert hv.headline_genes == hv.genes[:20]
    assert hv.headline_genes[0] == "G000"
    he = choose_panel(training, genes_by_slide, method="highly_expressed", n_genes=40)
    assert set(he.headline_genes) <= set(he.genes)
    assert len(he.headline_genes) == min(50, len(he.genes))
    small = choose_panel(
        training, genes_by_slide, method="gene_list", gene_list=["G005", "G000", "G007"]
    )
    assert small.genes == ["G005", "G000", "G007"]
    assert sorted(small.headline_genes) == sorted(small.genes)
    assert small.headline_genes[0] == "G000"


def test_panel_errors_are_clear(tmp_path) -> None:
    training = training_counts()
    genes_by_slide = {"a": training.genes, "b": training.genes[:50]}
    with pytest.raises(StevsInputError, match="only .* genes qualify"):
        choose_panel(training, genes_by_slide, method="highly_variable", n_genes=500)
    gene_file = tmp_path / "genes.txt"
    with pytest.raises(StevsInputError, match=rf"{gene_file}.*b lacks G100"):
        choose_panel(
            training,
            genes_by_slide,
            method="gene_list",
            gene_list=["G001", "G100"],
            gene_list_path=gene_file,
        )


def test_read_gene_list(tmp_path) -> None:
    path = tmp_path / "genes.tsv"
    path.write_text("# my panel\nEPCAM\tepithelial\n\nKRT8, keratin\nPTPRC # immune\n")
    assert read_gene_list(path) == ["EPCAM", "KRT8", "PTPRC"]
    path.write_text("EPCAM\nEPCAM\n")
    with pytest.raises(StevsInputError, match="twice: EPCAM"):
        read_gene_list(path)
    with pytest.raises(StevsInputError, match="cannot read"):
        read_gene_list(tmp_path / "absent.txt")


def test_normalisation_stats_match_numpy() -> None:
    training = training_counts()
    genes = ["G001", "G002", "MT-CO1"]
    stats = normalisation_stats(training, genes)
    expected = normalise(training.columns(genes), training.library_size, "log1p_cp10k")
    np.testing.assert_allclose(stats["mean"], expected.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], expected.std(axis=0), rtol=1e-5)
    assert stats["n_spots"] == 300 and stats["target_sum"] == 10_000
    raw = normalisation_stats(training, genes, "raw")
    np.testing.assert_allclose(raw["mean"], training.columns(genes).toarray().mean(axis=0))
    assert raw["method"] == "raw" and raw["target_sum"] == 10_000  # unused for raw
