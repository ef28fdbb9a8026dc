"""Markdown tables of a finished run, as docs/benchmarks.md prints them.

Reads ``{results}/report/folds.tsv`` (one row per method x fold, written by ``stevs
report``) and the training benchmarks, and prints, per method: headline mean Pearson r per
fold and mean ± sd over folds, all-panel r, MSE, the optimistic top-50 figure, and the
training wall time summed over folds. Numbers are copied, never recomputed, so the table is
the report's.

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
    "ridge_color",
)


def training_seconds(results: Path, method: str) -> float:
    """Wall seconds of the method's training jobs (Snakemake benchmark files), summed."""
    total = 0.0
    for path in sorted((results / "benchmarks" / "train" / method).glob("*.tsv")):
        total += float(pd.read_csv(path, sep="\t")["s"].iloc[-1])
    return total


def results_table(results: Path) -> str:
    """The per-method markdown table of one run."""
    folds_path = results / "report" / "folds.tsv"
    if not folds_path.is_file():
        raise SystemExit(f"{folds_path}: not found; has the run's report been built?")
    folds = pd.read_csv(folds_path, sep="\t")
    fold_names = sorted(folds["fold"].unique())
    methods = [m for m in ORDER if m in set(folds["method"])]
    methods += sorted(set(folds["method"]) - set(methods))
    header = (
        "| method | "
        + " | ".join(fold_names)
        + " | headline r mean ± sd | all-panel r | MSE | top-50 r (optimistic) | train s |"
    )
    lines = [header, "|" + "---|" * (len(fold_names) + 6)]
    for method in methods:
        rows = folds[folds["method"] == method].set_index("fold")
        per_fold = [
            f"{rows.loc[f, HEADLINE]:.3f}" if f in rows.index else "n/a" for f in fold_names
        ]
        headline = rows[HEADLINE]
        lines.append(
            f"| `{method}` | "
            + " | ".join(per_fold)
            + f" | {headline.mean():.3f} ± {headline.std(ddof=1):.3f}"
            + f" | {rows['pearson_r_mean_all'].mean():.3f}"
            + f" | {rows['mse_mean'].mean():.3f}"
            + f" | {rows['pearson_r_top50_optimistic'].mean():.3f}"
            + f" | {training_seconds(results, method):.0f} |"
        )
    return "\n".join(lines)


def differences(results: Path, reference: str = "stevs") -> str:
    """How far each method's mean headline r is from ``reference``'s (positive: ahead)."""
    folds = pd.read_csv(results / "report" / "folds.tsv", sep="\t")
    means = folds.groupby("method")[HEADLINE].mean()
    if reference not in means:
        return ""
    parts = [
        f"`{m}` {means[m] - means[reference]:+.3f}" for m in ORDER if m in means and m != reference
    ]
    return f"Headline r relative to `{reference}`: " + ", ".join(parts) + "."


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
    if args.genes:
        print()
        print(gene_table(args.results, [g for g in args.genes.split(",") if g]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
