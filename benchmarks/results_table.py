"""Markdown tables of a finished run, as docs/benchmarks.md prints them.

Reads ``{results}/report/folds.tsv`` (one row per encoder x method x seed x fold, written
by ``stevs report``), ``comparison.tsv`` and the `run_fold` benchmarks, and prints, per encoder
and method: headline mean Pearson r per fold (mean over seeds, ± sd over seeds when there
are several), mean ± sd over folds, the sd over seeds of that mean, all-panel r, MSE, the
optimistic top-50 figure and the run wall time (train, predict, evaluate) summed over folds
and seeds; then the
report's paired comparison of STevs with the best baseline on the same encoder. Fold values
are the report's, averaged over seeds here; the comparison is copied.

    python benchmarks/results_table.py results/her2st_swin
    python benchmarks/results_table.py results/her2st_effnet --reference stnet
    python benchmarks/results_table.py results/her2st_swin --genes ERBB2,IGKC,COL1A1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

HEADLINE = "pearson_r_mean_headline"
ORDER = (
    "stevs",
    "stevs_image_only",
    "stevs_no_align",
    "stevs_concat",
    "stevs_spatial_only",
    "stnet",
    "ridge_embed",
    "ridge_context",
    "ridge_rrr",
    "ridge_color",
)


def run_seconds(results: Path, run: str) -> float:
    """Wall seconds of a run's `run_fold` jobs (train, predict, evaluate; Snakemake benchmark
    files), summed over folds (and seeds: ``run`` is ``{encoder}/{method}`` or a bare method)."""
    total = 0.0
    for path in sorted((results / "benchmarks" / "run_fold" / run).rglob("*.tsv")):
        total += float(pd.read_csv(path, sep="\t")["s"].iloc[-1])
    return total


def read_folds(results: Path) -> pd.DataFrame:
    """``report/folds.tsv`` with the run columns (a report of one seed and no encoder too)."""
    folds_path = results / "report" / "folds.tsv"
    if not folds_path.is_file():
        raise SystemExit(f"{folds_path}: not found; has the run's report been built?")
    folds = pd.read_csv(folds_path, sep="\t")
    folds["encoder"] = folds["encoder"].fillna("") if "encoder" in folds else ""
    return folds if "seed" in folds else folds.assign(seed=0)


def _cell(values: pd.Series) -> str:
    """Mean over seeds, with ± sd over seeds when there are several."""
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def _row(results: Path, encoder: str, method: str, group: pd.DataFrame, fold_names: list) -> str:
    per_fold = group.groupby("fold").mean(numeric_only=True)
    per_seed = group.groupby("seed")[HEADLINE].mean()
    seed_sd = f"{per_seed.std(ddof=1):.3f}" if len(per_seed) > 1 else "– (1 run)"
    headline = per_fold[HEADLINE]
    run = f"{encoder}/{method}" if encoder else method
    cells = [_cell(group.loc[group["fold"] == f, HEADLINE]) for f in fold_names]
    return (
        f"| {encoder or '–'} | `{method}` | {len(per_seed)} | "
        + " | ".join(cells)
        + f" | {headline.mean():.3f} ± {headline.std(ddof=1):.3f} | {seed_sd}"
        + f" | {per_fold['pearson_r_mean_all'].mean():.3f}"
        + f" | {per_fold['mse_mean'].mean():.3f}"
        + f" | {per_fold['pearson_r_top50_optimistic'].mean():.3f}"
        + f" | {run_seconds(results, run):.0f} |"
    )


def results_table(results: Path) -> str:
    """The markdown table of one run: one row per encoder x method, grouped by encoder."""
    folds = read_folds(results)
    fold_names = sorted(folds["fold"].unique())
    rank = {m: i for i, m in enumerate(ORDER)}
    keys = sorted(
        {(e, m) for e, m in zip(folds["encoder"], folds["method"], strict=True)},
        key=lambda k: (k[0] in ("", "none"), k[0], rank.get(k[1], len(ORDER)), k[1]),
    )
    header = (
        "| encoder | method | seeds | "
        + " | ".join(fold_names)
        + " | headline r mean ± sd (folds) | seed sd | all-panel r | MSE"
        + " | top-50 r (optimistic) | run s |"
    )
    lines = [header, "|" + "---|" * (len(fold_names) + 9)]
    for encoder, method in keys:
        group = folds[(folds["encoder"] == encoder) & (folds["method"] == method)]
        lines.append(_row(results, encoder, method, group, fold_names))
    return "\n".join(lines)


def comparison_table(results: Path) -> str:
    """The report's ``comparison.tsv`` (STevs vs the best same-encoder baseline) as markdown."""
    path = results / "report" / "comparison.tsv"
    if not path.is_file() or path.stat().st_size < 2:
        return ""
    table = pd.read_csv(path, sep="\t")
    if table.empty:
        return ""
    if "slide_test" not in table.columns:
        raise SystemExit(f"{path}: written before the test over held-out slides; rerun the report")
    lines = [
        "| encoder | STevs | best baseline | difference | seed sd | folds ahead"
        " | slides ahead | test over held-out slides | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {row.encoder} | {row.headline_r:.3f}"
            f" | `{row.baseline}` {row.baseline_headline_r:.3f}"
            f" | {row.difference:+.3f} | {row.seed_sd:.3f} | {row.folds_ahead} of {row.n_folds}"
            f" | {row.slides_ahead} of {row.n_slides} | {row.slide_test} | {row.verdict} |"
        )
    return "\n".join(lines)


def differences(results: Path, reference: str = "stevs") -> str:
    """How far each method's mean headline r is from ``reference``'s on the same encoder
    (positive: ahead), seeds averaged; encoder-free methods against every encoder."""
    folds = read_folds(results)
    means = folds.groupby(["encoder", "method"])[HEADLINE].mean()
    parts = []
    for encoder, method in means.index:
        if method != reference:
            continue
        others = [
            f"`{m}` {means[(e, m)] - means[(encoder, method)]:+.3f}"
            for m in ORDER
            for e in (encoder, "none", "")
            if m != reference and (e, m) in means.index and (e == encoder or e in ("none", ""))
        ]
        label = f" on {encoder}" if encoder else ""
        parts.append(f"Headline r relative to `{reference}`{label}: " + ", ".join(others) + ".")
    return "\n".join(dict.fromkeys(parts))


def gene_table(
    results: Path, genes: list[str], methods: tuple[str, ...] = ("stevs", "stnet", "ridge_embed")
) -> str:
    """Per-gene Pearson r (mean over test slides, all folds) of ``methods`` for ``genes``,
    after the 5 best and 5 worst headline genes of the first method."""
    per_gene = pd.read_csv(results / "report" / "per_gene.tsv", sep="\t")
    means = per_gene.groupby(["gene", "method"])["pearson_r"].mean().unstack("method")
    methods = tuple(m for m in methods if m in means.columns)
    headline = per_gene.loc[per_gene["headline"].astype(bool), "gene"].unique()
    lead = means.loc[means.index.isin(headline), methods[0]].dropna().sort_values()
    chosen = [*lead.index[::-1][:5], *lead.index[:5][::-1], *(g for g in genes if g in means.index)]
    missing = [g for g in genes if g not in means.index]
    lines = [
        "| gene | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for gene in dict.fromkeys(chosen):
        lines.append(
            f"| {gene} | " + " | ".join(f"{means.loc[gene, m]:.2f}" for m in methods) + " |"
        )
    if missing:
        lines.append(f"\nNot in the panel: {', '.join(missing)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="the run's results folder")
    parser.add_argument("--reference", default="stevs", help="method the differences are to")
    parser.add_argument("--genes", default="", help="comma-separated genes for a per-gene table")
    args = parser.parse_args(argv)
    print(results_table(args.results))
    print()
    print(differences(args.results, args.reference))
    comparison = comparison_table(args.results)
    if comparison:
        print()
        print(comparison)
    if args.genes:
        print()
        print(gene_table(args.results, [g for g in args.genes.split(",") if g]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
