"""Per-gene metrics of predicted spatial expression and their fold summaries (``stevs evaluate``).

Protocol (the same for every method):

* Observed targets are the slide AnnData's raw counts normalised the fold's way
  (``log1p_cp10k``: log1p of counts per 10,000 over *all* genes of the spot, then the panel
  columns; or ``raw``: the panel counts), restricted to the fold's test spots.
* Per gene and test slide: Pearson r and Spearman rho over the slide's spots, MSE, MAE and,
  when the prediction carries ``layers["std"]``, the coverage of the central 90% Gaussian
  predictive interval.
* A gene constant in a test slide has r = rho = NaN, is flagged ``constant`` and counted,
  and is left out of every mean of r. A constant *prediction* of a varying gene scores
  r = rho = 0 (it carries no information), so a method cannot drop hard genes from its
  means by predicting a constant.
* Fold summaries average r first over the fold's test slides per gene (NaN-aware), then over
  genes: all panel genes, the ``headline_genes`` of the fold file (the 50 most variable
  training genes, fixed before testing: the headline number) and the 50 best-predicted genes
  (``pearson_r_top50_optimistic``: selected on the test data, so optimistic by construction).
* Pooled r concatenates the spots of all test slides of the fold per gene; it is reported in
  its own ``pooled_*`` columns, never averaged with per-slide r.

Protocol ``hest_bench`` (``--protocol hest_bench``) adds the number HEST-Benchmark reports
per split, so it can be set beside its leaderboard: Pearson r per gene over all test spots
pooled, mean (and std) over the genes, on a fold made with HEST's normalisation
(``--normalisation log1p``: log1p of raw counts) and a given gene list (``--panel gene_list``,
e.g. HEST's ``var_50genes.json``). It is labelled ``protocol = hest_bench`` in the summary
and reported apart in the report; HEST averages NaN genes in, stevs leaves them out.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse, stats

from stevs.atomic import atomic_path, check_replaceable, is_tsv_with
from stevs.errors import StevsInputError
from stevs.io.fold_file import Fold, read_fold
from stevs.io.prediction import read_prediction
from stevs.io.slide_adata import read_slide_adata

log = logging.getLogger(__name__)

#: two-sided z for a central 90% Gaussian interval
Z90 = float(stats.norm.ppf(0.95))
#: the summary column every table leads with, and the one training selects epochs on
HEADLINE_METRIC = "pearson_r_mean_headline"
#: the column of a torch model's metrics.csv that selects its best epoch: the same metric on
#: the validation spots
VAL_METRIC = f"val_{HEADLINE_METRIC}"
#: number of genes in the optimistic "top-k best-predicted" summary
TOP_K = 50
#: columns of the per gene x slide table, in order
PER_GENE_COLUMNS = [
    "method",
    "fold",
    "slide",
    "gene",
    "pearson_r",
    "spearman_rho",
    "mse",
    "mae",
    "coverage90",
    "headline",
    "constant",
    "n_spots",
]
#: summary columns, in order, with their meaning (used by the report's "how to read this")
SUMMARY_METRICS: dict[str, str] = {
    "pearson_r_mean_all": "Pearson r per test slide, mean over all panel genes",
    "pearson_r_mean_headline": (
        "Pearson r per test slide, mean over the headline genes "
        "(50 most variable training genes, fixed before testing)"
    ),
    "pearson_r_top50_optimistic": (
        "Pearson r per test slide, mean over the 50 best-predicted genes "
        "(chosen on the test data: optimistic)"
    ),
    "spearman_rho_mean_all": "Spearman rho per test slide, mean over all panel genes",
    "spearman_rho_mean_headline": "Spearman rho per test slide, mean over the headline genes",
    "mse_mean": "mean squared error, mean over genes and test slides",
    "mae_mean": "mean absolute error, mean over genes and test slides",
    "coverage90_mean": "fraction of spots inside the 90% predictive interval (ideal 0.90)",
    "pooled_pearson_r_mean_all": (
        "Pearson r over the spots of all test slides pooled, mean over all panel genes"
    ),
    "pooled_pearson_r_mean_headline": (
        "Pearson r over the spots of all test slides pooled, mean over the headline genes"
    ),
    "n_constant": "gene x test-slide pairs with a constant observed gene (r = NaN, excluded)",
    "n_genes": "panel genes",
    "n_test_slides": "test slides",
    "n_spots": "test spots over all test slides",
    "n_spots_missing": (
        "test spots without a prediction, left out (0: all scored; more only with "
        "stevs evaluate --allow-missing-spots: a partial score)"
    ),
}
#: evaluation protocols: stevs' own, and HEST-Benchmark's (see the module docstring)
PROTOCOLS = ("stevs", "hest_bench")
#: summary columns of protocol hest_bench only, with their meaning
HEST_BENCH_METRICS: dict[str, str] = {
    "hest_bench_pearson_r": (
        "HEST-Benchmark protocol: Pearson r per gene over all test spots pooled, on log1p of "
        "raw counts of the given gene list, mean over genes"
    ),
    "hest_bench_pearson_r_std": "HEST-Benchmark protocol: std of that r over genes",
}


# --------------------------------------------------------------------------- normalisation


def normalise_counts(
    counts: np.ndarray | sparse.spmatrix,
    gene_names: Sequence[str],
    panel: Sequence[str],
    method: str = "log1p_cp10k",
    target_sum: float = 1e4,
    *,
    source: str | os.PathLike | None = None,
) -> np.ndarray:
    """Raw counts (spots x all genes) -> normalised panel expression (spots x panel), float64.

    ``log1p_cp10k`` scales every spot to ``target_sum`` counts over all of its genes, takes
    log1p and keeps the panel columns; ``raw`` keeps the panel counts. Spots without counts
    stay zero. The arithmetic is :func:`stevs.panels.normalise`, the one the training targets
    use (float32), so observed values equal the targets a model was trained on.
    """
    from stevs.panels import NORMALISATIONS, library_sizes, normalise

    index = pd.Index([str(g) for g in gene_names])
    missing = [g for g in panel if g not in index]
    if missing:
        raise StevsInputError(
            source, f"{len(missing)} panel gene(s) missing from the expression, e.g. {missing[:5]}"
        )
    if method not in NORMALISATIONS:
        raise StevsInputError(source, f"unknown normalisation method {method!r}")
    columns = index.get_indexer(list(panel))
    if sparse.issparse(counts):
        counts = sparse.csr_matrix(counts)
    else:
        counts = np.asarray(counts, dtype=np.float64)
    values = normalise(counts[:, columns], library_sizes(counts), method, float(target_sum))
    return np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------- metric kernels


def _is_constant(values: np.ndarray) -> np.ndarray:
    """Per column: True where a column has (numerically) one value only."""
    spread = np.ptp(values, axis=0) if len(values) else np.zeros(values.shape[1])
    scale = np.maximum(1.0, np.abs(values).max(axis=0)) if len(values) else 1.0
    return spread <= 1e-12 * scale


def pearson_per_gene(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson r per column (gene) over rows (spots).

    NaN where the observed column is constant (or fewer than 2 spots); 0 where only the
    prediction is constant.
    """
    obs = np.asarray(observed, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    if obs.shape != pred.shape or obs.ndim != 2:
        raise ValueError(f"observed {obs.shape} and predicted {pred.shape} must be equal 2-D")
    r = np.full(obs.shape[1], np.nan)
    if obs.shape[0] < 2:
        return r
    obs_constant = _is_constant(obs)
    pred_constant = _is_constant(pred)
    oc = obs - obs.mean(axis=0)
    pc = pred - pred.mean(axis=0)
    num = (oc * pc).sum(axis=0)
    den = np.sqrt((oc * oc).sum(axis=0) * (pc * pc).sum(axis=0))
    ok = ~obs_constant & ~pred_constant
    r[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
    r[~obs_constant & pred_constant] = 0.0
    return r


def spearman_per_gene(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Spearman rho per gene: Pearson r of average ranks (ties share their mean rank)."""
    obs = np.asarray(observed, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    if obs.shape != pred.shape or obs.ndim != 2:
        raise ValueError(f"observed {obs.shape} and predicted {pred.shape} must be equal 2-D")
    if obs.shape[0] == 0:
        return np.full(obs.shape[1], np.nan)
    return pearson_per_gene(stats.rankdata(obs, axis=0), stats.rankdata(pred, axis=0))


def coverage_per_gene(
    observed: np.ndarray, predicted: np.ndarray, std: np.ndarray, z: float = Z90
) -> np.ndarray:
    """Fraction of spots with ``|observed - predicted| <= z * std`` per gene."""
    obs = np.asarray(observed, dtype=np.float64)
    inside = np.abs(obs - np.asarray(predicted, dtype=np.float64)) <= z * np.asarray(
        std, dtype=np.float64
    )
    return inside.mean(axis=0) if len(obs) else np.full(obs.shape[1], np.nan)


# --------------------------------------------------------------------------- tables


def per_gene_table(
    observed: np.ndarray,
    predicted: np.ndarray,
    genes: Sequence[str],
    *,
    std: np.ndarray | None = None,
    headline_genes: Sequence[str] = (),
    method: str = "",
    fold: str = "",
    slide: str = "",
) -> pd.DataFrame:
    """Metrics of one test slide: one row per gene, columns :data:`PER_GENE_COLUMNS`."""
    obs = np.asarray(observed, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    n_genes = len(genes)
    if obs.shape != pred.shape or obs.shape[1:] != (n_genes,):
        raise ValueError(f"observed {obs.shape}, predicted {pred.shape}, {n_genes} genes")
    err = pred - obs
    headline = set(headline_genes)
    table = pd.DataFrame(
        {
            "method": method,
            "fold": fold,
            "slide": slide,
            "gene": list(genes),
            "pearson_r": pearson_per_gene(obs, pred),
            "spearman_rho": spearman_per_gene(obs, pred),
            "mse": (err**2).mean(axis=0) if len(obs) else np.nan,
            "mae": np.abs(err).mean(axis=0) if len(obs) else np.nan,
            "coverage90": (
                coverage_per_gene(obs, pred, std) if std is not None else np.full(n_genes, np.nan)
            ),
            "headline": [g in headline for g in genes],
            "constant": _is_constant(obs) if len(obs) else np.ones(n_genes, dtype=bool),
            "n_spots": len(obs),
        }
    )
    return table[PER_GENE_COLUMNS]


def _nanmean(values: np.ndarray | pd.Series) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def summarise_fold(
    per_gene: pd.DataFrame,
    pooled_r: pd.Series | None = None,
    *,
    top_k: int = TOP_K,
) -> dict[str, Any]:
    """One fold's summary (keys :data:`SUMMARY_METRICS`) from its per gene x slide table.

    ``pooled_r`` is the pooled-over-slides Pearson r per gene (index gene, ``headline``
    taken from ``per_gene``); its means go to the ``pooled_*`` keys only.
    """
    if per_gene.empty:
        raise ValueError("no per-gene rows to summarise")
    by_gene = per_gene.groupby("gene", sort=False)
    gene_r = by_gene["pearson_r"].apply(_nanmean)
    gene_rho = by_gene["spearman_rho"].apply(_nanmean)
    headline = by_gene["headline"].any()
    best = gene_r.dropna().sort_values(ascending=False).head(top_k)
    summary: dict[str, Any] = {
        "method": str(per_gene["method"].iloc[0]),
        "fold": str(per_gene["fold"].iloc[0]),
        "pearson_r_mean_all": _nanmean(gene_r),
        "pearson_r_mean_headline": _nanmean(gene_r[headline]),
        "pearson_r_top50_optimistic": _nanmean(best),
        "spearman_rho_mean_all": _nanmean(gene_rho),
        "spearman_rho_mean_headline": _nanmean(gene_rho[headline]),
        "mse_mean": _nanmean(per_gene["mse"]),
        "mae_mean": _nanmean(per_gene["mae"]),
        "coverage90_mean": _nanmean(per_gene["coverage90"]),
        "pooled_pearson_r_mean_all": float("nan"),
        "pooled_pearson_r_mean_headline": float("nan"),
        "n_constant": int(per_gene["constant"].sum()),
        "n_genes": int(per_gene["gene"].nunique()),
        "n_test_slides": int(per_gene["slide"].nunique()),
        "n_spots": int(per_gene.groupby("slide")["n_spots"].first().sum()),
        "n_spots_missing": 0,  # evaluate_fold counts those of a partial score
        "protocol": "stevs",  # evaluate_fold's hest_bench protocol adds its own numbers
    }
    if pooled_r is not None:
        pooled = pooled_r.reindex(gene_r.index)
        summary["pooled_pearson_r_mean_all"] = _nanmean(pooled)
        summary["pooled_pearson_r_mean_headline"] = _nanmean(pooled[headline])
    return summary


# --------------------------------------------------------------------------- observed


def load_observed(
    fold: Fold, slide: str, barcodes: Sequence[str] | None = None
) -> tuple[np.ndarray, pd.Index, Any]:
    """Normalised observed panel expression of ``slide``: (values, barcodes, AnnData; read
    without its H&E images).

    ``barcodes`` selects and orders spots (error if any is unknown); the default keeps all.
    """
    adata_path = fold.slide_entry(slide).adata
    adata = read_slide_adata(adata_path, images=())
    if barcodes is not None:
        index = adata.obs_names.get_indexer(list(barcodes))
        if (index < 0).any():
            bad = [b for b, i in zip(barcodes, index, strict=True) if i < 0][:5]
            raise StevsInputError(adata_path, f"unknown spot barcodes, e.g. {bad}")
        adata = adata[index]
    values = normalise_counts(
        adata.X,
        adata.var_names,
        fold.genes,
        fold.normalisation_method,
        fold.target_sum,
        source=adata_path,
    )
    return values, adata.obs_names.copy(), adata


# --------------------------------------------------------------------------- evaluation


def headline_pearson(
    observed: np.ndarray,
    predicted: np.ndarray,
    slides: np.ndarray,
    genes: Sequence[str],
    headline_genes: Sequence[str],
) -> float:
    """The evaluation's headline number (:data:`HEADLINE_METRIC`) of spots from several slides.

    Exactly what ``stevs evaluate`` reports as ``pearson_r_mean_headline``: per slide and gene
    :func:`pearson_per_gene`, averaged per gene over slides, then over the headline genes
    (all genes when none are given); the same arithmetic as :func:`summarise_fold` of
    :func:`per_gene_table` s, bit for bit (tested), without their other columns. Training
    selects its best epoch with this function, after every epoch: the tables took 70 ms a
    call for 178 spots x 250 genes, this about 2 ms.
    """
    slides = np.asarray(slides)
    per_slide = [
        pearson_per_gene(observed[slides == slide], predicted[slides == slide])
        for slide in np.unique(slides)
    ]
    if not per_slide:
        return float("nan")
    by_gene = np.stack(per_slide, axis=1)  # (genes, slides), slides in np.unique order
    headline = set(headline_genes or genes)
    chosen = [i for i, gene in enumerate(genes) if gene in headline]
    return _nanmean(np.array([_nanmean(by_gene[i]) for i in chosen]))


def check_hest_bench_fold(fold: Fold) -> None:
    """Protocol hest_bench scores a fold made the HEST-Benchmark way only: targets log1p of
    raw counts (``--normalisation log1p``) on a given gene list (``--panel gene_list``)."""
    method, panel = fold.normalisation_method, fold.panel.get("method")
    if method != "log1p" or panel != "gene_list":
        raise StevsInputError(
            fold.path,
            f"protocol hest_bench needs a fold made with --normalisation log1p --panel "
            f"gene_list (HEST's normalisation and gene list), not {method} / {panel}",
        )


def hest_pearson(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """HEST-Benchmark's per-gene score, exactly as its ``train_test_reg`` computes it
    (src/hest/bench/trainer.py:66-72): ``scipy.stats.pearsonr`` of each gene over all test
    spots of a split pooled; NaN for a constant column (which HEST then averages in)."""
    obs = np.asarray(observed, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    if obs.shape != pred.shape or obs.ndim != 2:
        raise ValueError(f"observed {obs.shape} and predicted {pred.shape} must be equal 2-D")
    r = np.full(obs.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        for gene in range(obs.shape[1]):
            if len(obs) >= 2:
                r[gene] = stats.pearsonr(obs[:, gene], pred[:, gene])[0]
    return r


def hest_bench_summary(pooled_r: np.ndarray) -> dict[str, float]:
    """HEST-Benchmark's per-split numbers from the pooled per-gene r."""
    r = np.asarray(pooled_r, dtype=np.float64)
    r = r[np.isfinite(r)]
    return {
        "hest_bench_pearson_r": float(r.mean()) if len(r) else float("nan"),
        "hest_bench_pearson_r_std": float(r.std()) if len(r) else float("nan"),
    }


def _aligned(
    fold: Fold, slide: str, pred_path: Path, allow_missing_spots: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Observed values, predicted mean and std on the test spots of ``slide`` that
    ``pred_path`` predicts, and how many test spots it lacks. A prediction of another slide,
    or (unless ``allow_missing_spots``) one lacking test spots, is an error naming the file."""
    prediction = read_prediction(pred_path, fold.genes)
    of_slide = prediction.meta.get("slide")
    if of_slide not in (None, "", slide):
        raise StevsInputError(
            pred_path, f"is a prediction of slide {of_slide!r}, not of test slide {slide!r}"
        )
    unit = (prediction.meta.get("normalisation") or {}).get("method")
    if unit not in (None, "", fold.normalisation_method):
        raise StevsInputError(
            pred_path, f"holds {unit} values but fold {fold.fold} is normalised "
            f"{fold.normalisation_method}; predict with this fold",
        )  # fmt: skip
    test_spots = fold.spots_for("test", slide)
    observed, barcodes, _ = load_observed(fold, slide, test_spots)
    rows = prediction.barcodes.get_indexer(barcodes)
    covered = rows >= 0
    if test_spots is None and len(prediction.barcodes) > int(covered.sum()):
        raise StevsInputError(
            pred_path,
            f"{len(prediction.barcodes) - int(covered.sum())} of its spots are not spots of "
            f"test slide {slide!r}: a prediction of another slide?",
        )
    n_missing = len(rows) - int(covered.sum())
    if n_missing and (not allow_missing_spots or not covered.any()):
        raise StevsInputError(
            pred_path,
            f"predicts {int(covered.sum())} of the {len(rows)} test spots of slide {slide!r}; "
            "predict them all, or score the rest with --allow-missing-spots (a partial "
            "result, labelled n_spots_missing)",
        )
    rows = rows[covered]
    std = None if prediction.std is None else prediction.std[rows]
    return observed[covered], prediction.mean[rows], std, n_missing


def evaluate_fold(
    fold_path: str | os.PathLike,
    predictions_dir: str | os.PathLike,
    method: str,
    protocol: str = "stevs",
    *,
    allow_missing_spots: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Score one method on one fold (``protocol``: one of :data:`PROTOCOLS`).

    Every test spot needs a prediction; with ``allow_missing_spots`` the spots predicted are
    scored and the summary's ``n_spots_missing`` counts the rest (a labelled partial score).

    Returns the per gene x slide table, the fold summary and the pooled per-gene table
    (gene, pooled_pearson_r, pooled_spearman_rho, headline, constant, n_spots).
    """
    from tqdm.auto import tqdm

    if protocol not in PROTOCOLS:
        raise StevsInputError(None, f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    fold = read_fold(fold_path)
    if protocol == "hest_bench":
        check_hest_bench_fold(fold)
    predictions_dir = Path(predictions_dir)
    if not fold.test:
        raise StevsInputError(fold.path, "the fold has no test slides")
    tables = []
    pooled_obs, pooled_pred = [], []
    n_missing = 0
    for slide in tqdm(fold.test, desc=f"evaluate {method}/{fold.fold}", unit="slide"):
        pred_path = predictions_dir / f"{slide}.h5ad"
        if not pred_path.exists():
            raise StevsInputError(pred_path, f"no prediction for test slide {slide!r}")
        observed, pred, std, missing = _aligned(fold, slide, pred_path, allow_missing_spots)
        n_missing += missing
        tables.append(
            per_gene_table(
                observed,
                pred,
                fold.genes,
                std=std,
                headline_genes=fold.headline_genes,
                method=method,
                fold=fold.fold,
                slide=slide,
            )
        )
        pooled_obs.append(observed)
        pooled_pred.append(pred)
    per_gene = pd.concat(tables, ignore_index=True)
    obs_all = np.concatenate(pooled_obs)
    pred_all = np.concatenate(pooled_pred)
    pooled = pd.DataFrame(
        {
            "method": method,
            "fold": fold.fold,
            "gene": fold.genes,
            "pooled_pearson_r": pearson_per_gene(obs_all, pred_all),
            "pooled_spearman_rho": spearman_per_gene(obs_all, pred_all),
            "headline": [g in set(fold.headline_genes) for g in fold.genes],
            "constant": _is_constant(obs_all),
            "n_spots": len(obs_all),
        }
    )
    summary = summarise_fold(per_gene, pooled.set_index("gene")["pooled_pearson_r"])
    summary["protocol"] = protocol
    summary["n_spots_missing"] = n_missing
    if n_missing:
        log.warning(
            "%s %s: a PARTIAL score: %d test spot(s) have no prediction (n_spots_missing)",
            method, fold.fold, n_missing,
        )  # fmt: skip
    if protocol == "hest_bench":
        summary.update(hest_bench_summary(pooled["pooled_pearson_r"].to_numpy()))
    return per_gene, summary, pooled


#: the column every table stevs writes holds: a file at a table's path is replaced only when
#: its header has it (an earlier table of stevs), anything else is an error naming it
TABLE_KEY_COLUMN = "method"


def is_stevs_table(path: str | os.PathLike) -> bool:
    """True for a TSV whose header holds :data:`TABLE_KEY_COLUMN` (a table stevs wrote), or
    a blank file (an empty table's, e.g. a comparison without baselines: nothing to lose)."""
    if is_tsv_with(path, TABLE_KEY_COLUMN):
        return True
    try:
        return Path(path).stat().st_size <= 2 and not Path(path).read_bytes().strip()
    except OSError:
        return False


def write_tsv_atomic(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a TSV through a temporary file in the same folder and rename it into place;
    a file already there is replaced only if it is a table of stevs (:func:`is_stevs_table`)."""
    with atomic_path(path, replaces=is_stevs_table) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.10g")
    return Path(path)


def summary_path(out: str | os.PathLike) -> Path:
    """``results/metrics/m/fold0.tsv`` -> ``results/metrics/m/fold0.summary.tsv``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".tsv") + ".summary.tsv")


def pooled_path(out: str | os.PathLike) -> Path:
    """``results/metrics/m/fold0.tsv`` -> ``results/metrics/m/fold0.pooled.tsv``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".tsv") + ".pooled.tsv")


def evaluation_paths(out: str | os.PathLike) -> list[Path]:
    """The files ``stevs evaluate --out OUT`` writes, in the order it writes them."""
    return [summary_path(out), pooled_path(out), Path(out)]


def check_evaluation_outputs(out: str | os.PathLike) -> None:
    """Before scoring: every file at ``out``'s paths must be an earlier table of stevs."""
    check_replaceable({path: is_stevs_table for path in evaluation_paths(out)})


def write_evaluation(
    per_gene: pd.DataFrame, summary: Mapping[str, Any], pooled: pd.DataFrame, out: str | os.PathLike
) -> list[Path]:
    """Write the per gene x slide TSV, its ``.summary.tsv`` and ``.pooled.tsv`` beside it
    (all three checked first, so a refused one leaves the others as they were)."""
    check_evaluation_outputs(out)
    columns = ["method", "fold", *SUMMARY_METRICS, "protocol"]
    columns += [k for k in HEST_BENCH_METRICS if k in summary]
    summary_table = pd.DataFrame([{k: summary[k] for k in columns}])
    # the per-gene table last: it is the file a workflow rule waits for
    return [
        write_tsv_atomic(summary_table, summary_path(out)),
        write_tsv_atomic(pooled, pooled_path(out)),
        write_tsv_atomic(per_gene, out),
    ]


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs evaluate``."""
    parser.add_argument("--fold", required=True, help="fold file (results/folds/{fold}.json)")
    parser.add_argument(
        "--predictions", required=True, help="folder of {slide}.h5ad prediction AnnDatas"
    )
    parser.add_argument("--method", required=True, help="method name written into the tables")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="stevs",
        help="hest_bench: also HEST-Benchmark's pooled Pearson r (fold: log1p, gene_list)",
    )
    parser.add_argument(
        "--allow-missing-spots",
        action="store_true",
        help="score a prediction lacking test spots on the spots it has (a partial result, "
        "labelled n_spots_missing in the summary); default: an error",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="per gene x slide TSV; FOO.summary.tsv and FOO.pooled.tsv are written beside it",
    )


def run(args: argparse.Namespace) -> int:
    """``stevs evaluate``: score one method's predictions on one fold."""
    check_evaluation_outputs(args.out)
    per_gene, summary, pooled = evaluate_fold(
        args.fold,
        args.predictions,
        args.method,
        args.protocol,
        allow_missing_spots=args.allow_missing_spots,
    )
    write_evaluation(per_gene, summary, pooled, args.out)
    if args.protocol == "hest_bench":
        log.info(
            "%s %s: HEST-Benchmark protocol pooled r %.3f +- %.3f over %d genes",
            summary["method"],
            summary["fold"],
            summary["hest_bench_pearson_r"],
            summary["hest_bench_pearson_r_std"],
            summary["n_genes"],
        )
    log.info(
        "%s %s: mean r %.3f (all %d genes), %.3f (headline), pooled %.3f; %d constant pairs",
        summary["method"],
        summary["fold"],
        summary["pearson_r_mean_all"],
        summary["n_genes"],
        summary["pearson_r_mean_headline"],
        summary["pooled_pearson_r_mean_all"],
        summary["n_constant"],
    )
    return 0
