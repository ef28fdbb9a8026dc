"""Check a workflow run's report: every configured method present, the merged config in the
provenance, the page as headless chromium shows it (verdict line and ranked table in the
first screen, every picture loaded, no empty plot; stevs.report.browser), no Snakemake
timestamp file among the predictions, and (for the full demo) STevs above r = 0.3.

Usage:
    python .ci/check_demo.py config/demo.yaml                          # the full demo
    python .ci/check_demo.py .test/config/config.yaml --min-stevs-r -1  # the .test smoke run

The config given is the one passed to ``--configfile``; what the run really used is read from
``{results}/config.yaml`` (written by the workflow: every config file merged, the defaults
filled in), which must agree with it on every key the given file sets.
"""

from __future__ import annotations

import argparse
import html as html_lib
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

HEADLINE = "pearson_r_mean_headline_mean"
MIN_STEVS_R = 0.3


def disagreements(given: Any, merged: Any, where: str = "") -> list[str]:
    """Keys whose value in ``given`` differs from the merged config (``given`` wins there)."""
    if isinstance(given, dict) and isinstance(merged, dict):
        return [
            problem
            for key, value in given.items()
            for problem in disagreements(value, merged.get(key), f"{where}{key}.")
        ]
    if given != merged:
        return [f"{where.rstrip('.')}: {given!r} in the config file, {merged!r} in the run"]
    return []


def check_exports(results: Path) -> list[str]:
    """Every SpatialData store under {results}/export (the `export_all` target) opens with
    spatialdata and holds the values of the AnnData it was written from."""
    stores = sorted((results / "export").glob("**/*.zarr"))
    if not stores:
        return []
    import anndata as ad
    import numpy as np
    import spatialdata as sd

    problems = []
    for store in stores:
        parts = store.relative_to(results / "export").parts
        if parts[0] == "slides":
            source = results / "slides" / f"{store.stem}.h5ad"
        elif parts[0] == "predict_slides":
            source = results / "predict_slides" / store.stem / f"{store.stem}.h5ad"
        else:
            source = results / "predictions" / Path(*parts[:-1]) / f"{store.stem}.h5ad"
        table, adata = sd.read_zarr(store).tables["table"], ad.read_h5ad(source)
        same = list(table.obs_names) == list(adata.obs_names) and np.allclose(
            np.asarray(table.X.todense() if hasattr(table.X, "todense") else table.X),
            np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X),
        )
        if not same:
            problems.append(f"{store}: table differs from {source}")
    print(f"{len(stores)} SpatialData stores under {results}/export open with spatialdata")
    return problems


def check_in_browser(index: Path) -> list[str]:
    """The report in headless chromium (stevs.report.browser); a note, not a failure, where
    chromium is missing (.ci/run installs it)."""
    from stevs.report import browser

    if browser.find_chromium() is None:
        print("no chromium on PATH: the report was not opened in a browser")
        return []
    result = browser.browser_check(index)
    print(f"chromium: {len(result['images'])} pictures, verdict: {result['verdict']['text']}")
    return [f"{index} in chromium: {problem}" for problem in result["problems"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="config/demo.yaml")
    parser.add_argument(
        "--min-stevs-r",
        type=float,
        default=MIN_STEVS_R,
        help="STevs' headline mean Pearson r must be above this (finite in any case)",
    )
    args = parser.parse_args(argv)
    given = yaml.safe_load(Path(args.config).read_text())
    results = Path(given.get("results", "results"))
    html_path, summary_path = results / "report" / "index.html", results / "report" / "summary.tsv"
    merged_path = results / "config.yaml"
    needed = (html_path, summary_path, merged_path)
    problems = [f"{p} is missing" for p in needed if not p.is_file()]
    if problems:
        print("\n".join(problems))
        return 1
    merged_text = merged_path.read_text()
    merged = yaml.safe_load(merged_text)
    problems += [f"{merged_path}: {p}" for p in disagreements(given, merged)]
    summary = pd.read_csv(summary_path, sep="\t")
    print(summary[["encoder", "method", HEADLINE, "pearson_r_mean_all_mean", "mse_mean_mean"]]
          .to_string(index=False))  # fmt: skip
    comparison_path = results / "report" / "comparison.tsv"
    if comparison_path.is_file() and comparison_path.stat().st_size > 1:
        print(pd.read_csv(comparison_path, sep="\t").to_string(index=False))
    # STevs's check and the floor: on the first configured encoder
    encoders = merged.get("encoders") or [{"preset": "cpu_small", "freeze": False}]
    first = encoders[0]["preset"] + ("-frozen" if encoders[0].get("freeze") else "")
    lead = summary[summary["encoder"].fillna("").isin([first, "none", ""])]
    reported = set(summary["method"])
    summary = lead.drop_duplicates("method").set_index("method")
    methods = merged["methods"]
    missing = sorted(set(methods) - reported)
    if missing:
        problems.append(f"methods missing from the report table: {missing}")
    text = html_path.read_text()
    problems += [f"{m} missing from index.html" for m in methods if m not in text]
    if html_lib.escape(merged_text) not in text:
        problems.append(f"index.html does not show the merged config {merged_path}")
    stevs_r = float(summary.loc["stevs", HEADLINE]) if "stevs" in summary.index else float("nan")
    if not (math.isfinite(stevs_r) and stevs_r > args.min_stevs_r):
        problems.append(f"STevs headline mean Pearson r {stevs_r:.3f} <= {args.min_stevs_r}")
    if "ridge_color" in summary.index:
        floor = float(summary.loc["ridge_color", HEADLINE])
        verdict = "beats" if stevs_r > floor else "does NOT beat"
        # reported, not enforced: docs/benchmarks.md records the comparison honestly
        print(f"STevs ({stevs_r:.3f}) {verdict} the colour/texture ridge floor ({floor:.3f})")
    if (merged.get("predict_slides") or {}).get("sheet"):
        if not list((results / "predict_slides").glob("*/maps/*.png")):
            problems.append(f"predict_slides.sheet is set; no maps in {results}/predict_slides")
    problems += check_exports(results)
    problems += check_in_browser(html_path)
    stray = sorted((results / "predictions").rglob(".snakemake_timestamp"))
    problems += [f"{path}: a Snakemake timestamp file among the predictions" for path in stray]
    print("\n".join(problems) or f"check passed ({results}): STevs headline r = {stevs_r:.3f}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
