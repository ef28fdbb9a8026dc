"""Tests of benchmarks/results_table.py: the docs' tables are the report's numbers."""

from __future__ import annotations

import runpy
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "results_table.py"


def write_run(root: Path) -> None:
    rows = []
    for method, values in {"stevs": (0.40, 0.50), "ridge_color": (0.30, 0.20)}.items():
        for fold, r in zip(("fold0", "fold1"), values, strict=True):
            rows.append(
                {
                    "method": method,
                    "fold": fold,
                    "pearson_r_mean_headline": r,
                    "pearson_r_mean_all": r - 0.1,
                    "mse_mean": 1.0 + r,
                    "pearson_r_top50_optimistic": r + 0.1,
                }
            )
    (root / "report").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "report" / "folds.tsv", sep="\t", index=False)
    for fold, seconds in (("fold0", 12.5), ("fold1", 7.5)):
        bench = root / "benchmarks" / "train" / "stevs" / f"{fold}.tsv"
        bench.parent.mkdir(parents=True, exist_ok=True)
        bench.write_text(f"s\th:m:s\n{seconds}\t0:00:{seconds}\n")


def test_table_copies_folds_means_and_training_time(tmp_path):
    write_run(tmp_path)
    module = runpy.run_path(str(SCRIPT))
    table = module["results_table"](tmp_path)
    lines = table.splitlines()
    stevs = next(line for line in lines if line.startswith("| `stevs`"))
    ridge = next(line for line in lines if line.startswith("| `ridge_color`"))
    assert "| 0.400 | 0.500 | 0.450 ± 0.071 | 0.350 | 1.450 | 0.550 | 20 |" in stevs
    assert "| 0.300 | 0.200 | 0.250 ± 0.071 |" in ridge
    assert lines.index(stevs) < lines.index(ridge)  # STevs first, baselines after
    assert "`ridge_color` -0.200" in module["differences"](tmp_path)


def test_missing_report_is_a_clear_error(tmp_path):
    module = runpy.run_path(str(SCRIPT))
    with pytest.raises(SystemExit, match="report/folds.tsv: not found"):
        module["results_table"](tmp_path)
