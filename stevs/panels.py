"""Gene panels and target normalisation, chosen from a fold's training spots only.

Everything here takes the *training* counts of one fold (:class:`TrainingCounts`) and never
sees a validation or test spot, so changing a held-out slide's counts cannot change the
panel, the headline genes or the normalisation statistics.

Panels (``method``):

- ``highly_expressed``: genes detected (count > 0) in at least 10% of training spots, ranked
  by mean normalised expression (library size to 10,000, log1p) over training spots.
- ``highly_variable``: scanpy's ``seurat_v3`` on the training counts with the slide as batch;
  every candidate gene is ranked (``n_top_genes`` = all candidates), genes are ordered by their
  median rank across training slides, then by the number of slides in which they rank, then
  by mean normalised variance. With fewer than 50 variable genes in a training slide (too few
  for seurat_v3's loess fit) genes are ranked by the variance of log1p-CP10k instead, and the
  fold file says so.
- ``gene_list``: the genes of a user's file, in file order.

Only genes measured in every slide of the fold qualify. Mitochondrial (``MT-``) and ribosomal
(``RPL``/``RPS``) genes are excluded from ranked panels by default; a user's gene list is
taken as given.

Headline genes: the ``n_headline`` (50) most variable training genes by the same seurat_v3
ranking, taken among the panel genes. With a ``highly_variable`` panel they are exactly the
top of the ranking; with other panels they are the panel's most variable genes, and the
panel info records how many of the top training genes the panel holds.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from stevs.errors import StevsInputError
from stevs.io.fold_file import NORMALISATIONS, TARGET_SUM

log = logging.getLogger(__name__)

PANEL_METHODS = ("highly_expressed", "highly_variable", "gene_list")
MIN_DETECTION = 0.10
MIN_GENES_FOR_SEURAT_V3 = 50
MITO_PREFIXES = ("MT-",)
RIBO_PREFIXES = ("RPL", "RPS")


def is_mito(gene: str) -> bool:
    """True for mitochondrial genes (name starts with ``MT-``, any case)."""
    return gene.upper().startswith(MITO_PREFIXES)


def is_ribo(gene: str) -> bool:
    """True for ribosomal protein genes (name starts with ``RPL`` or ``RPS``, any case)."""
    return gene.upper().startswith(RIBO_PREFIXES)


def library_sizes(counts: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Total counts per spot (row sums) as float64."""
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def normalise(
    counts: sp.spmatrix | np.ndarray,
    library_size: np.ndarray,
    method: str,
    target_sum: float = TARGET_SUM,
    dtype: type = np.float32,
) -> np.ndarray:
    """Normalise spot x gene counts to dense targets (``dtype``, computed in float64).

    ``log1p_cp10k``: ``log1p(counts / library_size * target_sum)`` (0 for empty spots);
    ``log1p``: ``log1p(counts)``, no library-size scaling (HEST-Benchmark's normalisation,
    ``sc.pp.log1p`` in its src/hest/bench/st_dataset.py:33, float64 there);
    ``raw``: the counts themselves. ``library_size`` is the spot's total over *all* genes.
    """
    dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    dense = dense.astype(np.float64, copy=False)
    if method == "raw":
        return dense.astype(dtype)
    if method == "log1p":
        return np.log1p(dense).astype(dtype)
    if method != "log1p_cp10k":
        raise ValueError(f"unknown normalisation {method!r}; choose from {NORMALISATIONS}")
    lib = np.asarray(library_size, dtype=np.float64).reshape(-1, 1)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(dense * scale).astype(dtype)


def _json_genes(path: Path, text: str) -> list[str]:
    """HEST-Benchmark's gene list file: ``{"genes": [...]}`` (e.g. ``var_50genes.json``)."""
    try:
        genes = json.loads(text)["genes"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise StevsInputError(path, f'a .json gene list must be {{"genes": [...]}}: {err}') from err
    if not isinstance(genes, list):
        raise StevsInputError(path, 'a .json gene list must be {"genes": [...]}')
    return [str(g).strip() for g in genes if str(g).strip()]


def read_gene_list(path: str | PathLike) -> list[str]:
    """Read a gene list: one gene per line (first tab/comma/space field), ``#`` comments; or a
    ``.json`` file ``{"genes": [...]}`` (HEST-Benchmark's ``var_50genes.json``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise StevsInputError(path, f"cannot read the gene list: {err.strerror or err}") from err
    genes: list[str] = []
    if path.suffix.lower() == ".json":
        genes = _json_genes(path, text)
    for line in [] if genes else text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        genes.append(line.replace(",", "\t").split()[0])
    if not genes:
        raise StevsInputError(path, "the gene list names no genes")
    duplicates = sorted({g for g in genes if genes.count(g) > 1})
    if duplicates:
        raise StevsInputError(path, f"the gene list names genes twice: {', '.join(duplicates)}")
    return genes


def common_genes(genes_by_slide: Mapping[str, Sequence[str]]) -> list[str]:
    """Genes measured in every slide, in the first slide's order."""
    if not genes_by_slide:
        return []
    slides = list(genes_by_slide)
    shared = set(genes_by_slide[slides[0]])
    for slide in slides[1:]:
        shared &= set(genes_by_slide[slide])
    return [g for g in genes_by_slide[slides[0]] if g in shared]


@dataclass
class TrainingCounts:
    """Raw counts of a fold's training spots on the genes measured in every fold slide.

    ``counts``: CSR (spots x genes), ``library_size``: totals over *all* genes of each spot's
    slide AnnData, ``batch``: the slide id of each spot.
    """

    counts: sp.csr_matrix
    library_size: np.ndarray
    batch: np.ndarray
    genes: list[str]

    def __post_init__(self) -> None:
        self.counts = sp.csr_matrix(self.counts)
        n_spots, n_genes = self.counts.shape
        if n_genes != len(self.genes):
            raise ValueError(f"counts have {n_genes} genes, names {len(self.genes)}")
        if len(self.library_size) != n_spots or len(self.batch) != n_spots:
            raise ValueError("library_size and batch need one entry per spot")
        if n_spots == 0:
            raise ValueError("a fold needs at least one training spot")

    def columns(self, genes: Sequence[str]) -> sp.csr_matrix:
        """The counts of ``genes`` (in that order)."""
        index = pd.Index(self.genes).get_indexer(list(genes))
        if (index < 0).any():
            missing = [g for g, i in zip(genes, index, strict=True) if i < 0]
            raise KeyError(f"genes not in the training counts: {missing[:10]}")
        return self.counts[:, index]


def rank_highly_expressed(
    training: TrainingCounts, genes: Sequence[str], min_detection: float = MIN_DETECTION
) -> list[str]:
    """Genes detected in >= ``min_detection`` of training spots, by mean log1p-CP10k."""
    counts = training.columns(genes)
    detected = np.asarray((counts > 0).mean(axis=0)).ravel()
    keep = detected >= min_detection
    lib = np.asarray(training.library_size, dtype=np.float64)
    scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
    normalised = (sp.diags(scale) @ counts.astype(np.float64)).tocsr().log1p()  # stays sparse
    means = np.asarray(normalised.mean(axis=0)).ravel()
    table = pd.DataFrame({"gene": list(genes), "mean": means})[keep]
    table = table.sort_values(["mean", "gene"], ascending=[False, True], kind="mergesort")
    return table["gene"].tolist()


def rank_highly_variable(training: TrainingCounts, genes: Sequence[str]) -> list[str]:
    """All ``genes`` ordered by scanpy's seurat_v3 on training counts (batch = slide)."""
    return highly_variable_ranking(training, genes)[0]


def _fewest_variable_genes(counts: sp.csr_matrix, batch: np.ndarray) -> int:
    """The smallest number of non-constant genes within one batch."""
    fewest = counts.shape[1]
    for name in np.unique(batch):
        part = counts[batch == name]
        mean = np.asarray(part.mean(axis=0)).ravel()
        mean_sq = np.asarray(part.multiply(part).mean(axis=0)).ravel()
        fewest = min(fewest, int((mean_sq - mean**2 > 1e-12).sum()))
    return fewest


def highly_variable_ranking(
    training: TrainingCounts, genes: Sequence[str]
) -> tuple[list[str], str]:
    """``genes`` ordered from most to least variable, and the rule used.

    The rule is ``seurat_v3`` (scanpy, batch = slide; genes ordered by median rank across
    slides, then by the number of slides ranking them, then by normalised variance). Its
    loess fit needs many genes: with fewer than ``MIN_GENES_FOR_SEURAT_V3`` non-constant
    genes in some slide, or when the fit fails, genes are ordered by the variance of their
    log1p-CP10k expression over training spots instead (rule ``log1p_variance``).
    """
    genes = list(genes)
    if len(genes) < 2:
        return genes, "seurat_v3"
    counts = training.columns(genes).astype(np.float32)
    batch = training.batch.astype(str)
    fewest = _fewest_variable_genes(counts, batch)
    if fewest >= MIN_GENES_FOR_SEURAT_V3:
        try:
            return _seurat_v3_order(counts, batch, genes), "seurat_v3"
        except ValueError as err:  # loess failures on degenerate data
            log.warning("seurat_v3 failed (%s); ranking genes by log1p variance", err)
    else:
        log.warning(
            "only %d variable genes in some training slide (< %d for seurat_v3); ranking "
            "genes by log1p variance",
            fewest,
            MIN_GENES_FOR_SEURAT_V3,
        )
    variance = normalise(counts, training.library_size, "log1p_cp10k").var(axis=0)
    table = pd.DataFrame({"gene": genes, "variance": variance})
    table = table.sort_values(["variance", "gene"], ascending=[False, True], kind="mergesort")
    return table["gene"].tolist(), "log1p_variance"


def _seurat_v3_order(counts: sp.csr_matrix, batch: np.ndarray, genes: list[str]) -> list[str]:
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(
        X=counts,
        obs=pd.DataFrame(
            {"slide": pd.Categorical(batch)},
            index=pd.Index([f"s{i}" for i in range(len(batch))], dtype=str),
        ),
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = sc.pp.highly_variable_genes(
            adata,
            flavor="seurat_v3",
            n_top_genes=len(genes),
            batch_key="slide",
            inplace=False,
        )
    table = pd.DataFrame(
        {
            "gene": genes,
            "rank": np.asarray(table["highly_variable_rank"], dtype=float),
            "nbatches": np.asarray(table["highly_variable_nbatches"], dtype=int),
            "variance": np.nan_to_num(np.asarray(table["variances_norm"], dtype=float)),
        }
    )
    table = table.sort_values(
        ["rank", "nbatches", "variance", "gene"],
        ascending=[True, False, False, True],
        na_position="last",
        kind="mergesort",
    )
    return table["gene"].tolist()


@dataclass
class Panel:
    """A fold's gene panel, its headline genes and how they were chosen."""

    genes: list[str]
    headline_genes: list[str]
    info: dict[str, Any]


def never_detected(training: TrainingCounts, genes: Sequence[str]) -> list[str]:
    """``genes`` with no count in any training spot: nothing to learn, no Pearson r."""
    genes = list(genes)
    if not genes:
        return []
    seen = np.asarray((training.columns(genes) > 0).sum(axis=0)).ravel() > 0
    return [g for g, s in zip(genes, seen, strict=True) if not s]


def _warn_never_detected(genes: list[str], gene_list_path: str | PathLike | None) -> None:
    """A gene list is taken as given; genes of it no training spot detects are named."""
    if genes:
        log.warning(
            "%s: %d listed genes are never detected in the training spots (kept as listed; "
            "they cannot be learned): %s",
            gene_list_path,
            len(genes),
            ", ".join(genes[:10]) + (" ..." if len(genes) > 10 else ""),
        )


def choose_panel(
    training: TrainingCounts,
    genes_by_slide: Mapping[str, Sequence[str]],
    *,
    method: str = "highly_variable",
    n_genes: int = 250,
    gene_list: Sequence[str] | None = None,
    gene_list_path: str | PathLike | None = None,
    n_headline: int = 50,
    exclude_mito_ribo: bool = True,
    min_detection: float = MIN_DETECTION,
    fold_label: str = "the fold",
) -> Panel:
    """Choose the panel and headline genes of a fold from its training counts only.

    ``genes_by_slide`` names the genes measured in every slide of the fold (training,
    validation and test): only genes in all of them qualify. Raises
    :class:`StevsInputError` when the request cannot be met.
    """
    if method not in PANEL_METHODS:
        raise StevsInputError(None, f"unknown panel method {method!r}; use one of {PANEL_METHODS}")
    all_genes = {g for genes in genes_by_slide.values() for g in genes}
    shared = common_genes(genes_by_slide)
    mito = [g for g in shared if is_mito(g)]
    ribo = [g for g in shared if is_ribo(g)]
    excluded = set(mito) | set(ribo) if exclude_mito_ribo else set()
    unseen = set(never_detected(training, [g for g in shared if g not in excluded]))
    candidates = [g for g in shared if g not in excluded and g not in unseen]
    dropped: dict[str, int] = {"not_in_every_slide": len(all_genes) - len(shared)}
    if exclude_mito_ribo:
        dropped["mitochondrial"] = len(mito)
        dropped["ribosomal"] = len(ribo)
    dropped["never_detected"] = len(unseen)
    if unseen and method != "gene_list":
        log.info(
            "%s: %d genes never detected in the %d training spots are left out of the panel",
            fold_label,
            len(unseen),
            training.counts.shape[0],
        )
    slides_text = ", ".join(genes_by_slide)

    hv_order, hv_rule = highly_variable_ranking(training, candidates)
    if method == "gene_list":
        if gene_list is None:
            raise StevsInputError(gene_list_path, "the gene_list panel needs a gene list file")
        gene_list = list(gene_list)
        absent = {
            slide: [g for g in gene_list if g not in set(genes)]
            for slide, genes in genes_by_slide.items()
        }
        absent = {slide: genes for slide, genes in absent.items() if genes}
        if absent:
            where = "; ".join(
                f"{slide} lacks {', '.join(genes[:10])}{' ...' if len(genes) > 10 else ''}"
                for slide, genes in absent.items()
            )
            raise StevsInputError(
                gene_list_path, f"genes of the list are not measured in every slide: {where}"
            )
        genes = gene_list
        _warn_never_detected(never_detected(training, genes), gene_list_path)
    else:
        if method == "highly_expressed":
            order = rank_highly_expressed(training, candidates, min_detection)
            dropped["below_detection"] = len(candidates) - len(order)
            rule = f"detected in >= {min_detection:.0%} of training spots, "
        else:
            order = hv_order
            rule = f"detected in a training spot ({len(unseen)} never are), "
        if n_genes < 1:
            raise StevsInputError(None, f"--n-genes must be at least 1, got {n_genes}")
        if n_genes > len(order):
            raise StevsInputError(
                None,
                f"{fold_label}: a {method} panel of {n_genes} genes was requested but only "
                f"{len(order)} genes qualify (measured in every slide, {rule}"
                f"{'mito/ribo excluded' if exclude_mito_ribo else 'mito/ribo kept'}) "
                f"among slides {slides_text}; lower --n-genes",
            )
        genes = order[:n_genes]

    extra = [g for g in genes if g not in set(candidates)]
    if extra:
        ranking, hv_rule = highly_variable_ranking(training, candidates + extra)
    else:
        ranking = hv_order
    in_panel = set(genes)
    headline = [g for g in ranking if g in in_panel][:n_headline]
    top_training = set(ranking[:n_headline])
    info: dict[str, Any] = {
        "method": method,
        "n": len(genes),
        "requested_n": len(genes) if method == "gene_list" else n_genes,
        "chosen_from": "training spots only",
        "n_training_spots": int(training.counts.shape[0]),
        "training_slides": sorted(set(training.batch.astype(str).tolist())),
        "candidates": len(candidates),
        "exclude_mito_ribo": exclude_mito_ribo,
        "dropped": dropped,
        "headline": {
            "n": len(headline),
            "rule": f"{hv_rule} on training counts (batch = slide), most variable panel genes",
            "n_of_top_training_genes_in_panel": len(top_training & in_panel),
        },
    }
    if method == "highly_expressed":
        info["min_detection"] = min_detection
    if method == "highly_variable":
        info["ranking"] = hv_rule
    if method == "gene_list":
        info["gene_list"] = None if gene_list_path is None else str(gene_list_path)
    return Panel(genes=list(genes), headline_genes=headline, info=info)


def normalisation_stats(
    training: TrainingCounts,
    genes: Sequence[str],
    method: str = "log1p_cp10k",
    target_sum: float = TARGET_SUM,
) -> dict[str, Any]:
    """Per-gene mean/std (ddof 0) of normalised training targets, as stored in a fold file."""
    if method not in NORMALISATIONS:
        raise StevsInputError(
            None, f"unknown normalisation {method!r}; use one of {NORMALISATIONS}"
        )
    targets = normalise(training.columns(genes), training.library_size, method, target_sum)
    targets64 = targets.astype(np.float64)
    return {
        "method": method,
        "target_sum": target_sum,  # used by log1p_cp10k only; kept for readers of raw folds
        "library_size": "total counts of the spot over all genes",
        "computed_on": "training spots only",
        "n_spots": int(targets.shape[0]),
        "mean": [float(v) for v in targets64.mean(axis=0)],
        "std": [float(v) for v in targets64.std(axis=0)],
    }
