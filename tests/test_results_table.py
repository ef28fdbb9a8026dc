"""Tests of benchmarks/results_table.py: the docs' tables are the report's numbers."""

from __future__ import annotations

import runpy
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "results_table.py"

#: (encoder, method, seed) -> headline r on fold0, fold1
RUNS = {
    ("effnet_lite0_in1k-frozen", "stevs", 0): (0.40, 0.50),
    ("effnet_lite0_in1k-frozen", "stevs", 1): (0.42, 0.54),
    ("effnet_lite0_in1k-frozen", "ridge_embed", 0): (0.41, 0.45),
    ("none", "ridge_color", 0): (0.30, 0.20),
}


def write_run(root: Path) -> None:
    rows = []
    for (encoder, method, seed), values in RUNS.items():
        for fold, r in zip(("fold0", "fold1"), values, strict=True):
            rows.append(
                {
                    "encoder": encoder,
                    "method": method,
                    "seed": seed,
                    "fold": fold,
                    "pearson_r_mean_headline": r,
                    "pearson_r_mean_all": r - 0.1,
                    "mse_mean": 1.0 + r,
                    "pearson_r_top50_optimistic": r + 0.1,
                }
            )
    (root / "report").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "report" / "folds.tsv", sep="\t", index=False)
    # one run_fold job per method and fold, its seeds inside
    for fold, seconds in (("fold0", 17.5), ("fold1", 7.5)):
        run = "effnet_lite0_in1k-frozen/stevs"
        bench = root / "benchmarks" / "run_fold" / run / f"{fold}.tsv"
        bench.parent.mkdir(parents=True, exist_ok=True)
        bench.write_text(f"s\th:m:s\n{seconds}\t0:00:{seconds}\n")


def test_table_averages_seeds_per_fold_and_groups_by_encoder(tmp_path):
    write_run(tmp_path)
    module = runpy.run_path(str(SCRIPT))
    lines = module["results_table"](tmp_path).splitlines()
    stevs = next(line for line in lines if "| `stevs` |" in line)
    ridge = next(line for line in lines if "| `ridge_embed` |" in line)
    floor = next(line for line in lines if "| `ridge_color` |" in line)
    # per fold: mean ± sd over the two seeds; then mean ± sd over folds of the seed means
    # (0.41, 0.52); seed sd: sd of the per-seed means (0.45, 0.48)
    assert stevs.startswith("| effnet_lite0_in1k-frozen | `stevs` | 2 |")
    assert "| 0.410 ± 0.014 | 0.520 ± 0.028 | 0.465 ± 0.078 | 0.021 |" in stevs
    assert stevs.endswith("| 25 |")  # training seconds over folds and seeds
    assert "| 1 | 0.410 | 0.450 | 0.430 ± 0.028 | – (1 run) |" in ridge
    assert lines.index(stevs) < lines.index(ridge) < lines.index(floor)  # encoder-free last
    differences = module["differences"](tmp_path)
    assert "`stevs` on effnet_lite0_in1k-frozen" in differences
    assert "`ridge_embed` -0.035" in differences and "`ridge_color` -0.215" in differences


def test_comparison_is_copied_from_the_report(tmp_path):
    write_run(tmp_path)
    row = {
        "encoder": "effnet_lite0_in1k-frozen", "method": "stevs", "baseline": "ridge_embed",
        "baseline_encoder": "effnet_lite0_in1k-frozen", "headline_r": 0.465,
        "baseline_headline_r": 0.43, "difference": 0.035, "seed_sd": 0.021, "folds_ahead": 1,
        "n_folds": 2, "n_slides": 2, "slides_ahead": 1, "slide_wilcoxon_p": float("nan"),
        "slide_test": "too few slides to test (2 held-out, fewer than 5)", "verdict": "ahead",
    }  # fmt: skip
    pd.DataFrame([row]).to_csv(tmp_path / "report" / "comparison.tsv", sep="\t", index=False)
    module = runpy.run_path(str(SCRIPT))
    table = module["comparison_table"](tmp_path)
    assert (
        "| `ridge_embed` 0.430 | +0.035 | 0.021 | 1 of 2 | 1 of 2 | too few slides to test" in table
    )
    assert "| test over held-out slides |" in table
    old = {k: v for k, v in row.items() if not k.startswith(("slide", "n_slides"))}
    pd.DataFrame([old]).to_csv(tmp_path / "report" / "comparison.tsv", sep="\t", index=False)
    with pytest.raises(SystemExit, match="comparison.tsv: written before the test over held"):
        module["comparison_table"](tmp_path)


def test_missing_report_is_a_clear_error(tmp_path):
    module = runpy.run_path(str(SCRIPT))
    with pytest.raises(SystemExit, match="report/folds.tsv: not found"):
        module["results_table"](tmp_path)
