"""The Snakemake workflow: lint, formatting, dry runs, and bad sample sheets stop early."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if "--configfile" not in args:
        args = (*args, "--configfile", str(ROOT / "config" / "config.yaml"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [str(BIN / "snakemake"), "--directory", str(cwd), "-s", str(ROOT / "Snakefile"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_snakemake_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_snakefmt_check_passes():
    result = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean():
    result = subprocess.run(
        [str(BIN / "ruff"), "check", "stevs", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_plans_the_whole_dag(tmp_path):
    result = snakemake("-n", "--cores", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for rule in (
        "make_demo",
        "ingest_slide",
        "tile_slide",
        "make_folds",
        "train",
        "predict",
        "evaluate",
        "report",
    ):
        assert f"rule {rule}:" in result.stdout or f"\n{rule} " in result.stdout, rule


def test_slurm_profile_dry_run(tmp_path):
    result = snakemake("-n", "--profile", str(ROOT / "profiles" / "slurm"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout


def test_one_fold_reruns_alone(tmp_path):
    result = snakemake("-n", "--cores", "1", "results/metrics/stevs/fold1.tsv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "results/metrics/stevs/fold0.tsv" not in result.stdout
    assert "results/models/stnet" not in result.stdout


def _config(tmp_path: Path, sheet: Path, **folds) -> Path:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["samples"] = str(sheet)
    config["demo"]["generate"] = False
    config["folds"].update(folds)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sheet(tmp_path: Path, rows: list[dict], drop: str | None = None) -> Path:
    (tmp_path / "img.png").write_bytes(b"x")
    (tmp_path / "outs").mkdir(exist_ok=True)
    table = pd.DataFrame(rows)
    if drop:
        table = table.drop(columns=[drop])
    path = tmp_path / "samples.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


ROW = {
    "patient": "P1",
    "image": "img.png",
    "expression": "outs",
    "format": "visium",
    "spots": "",
    "mpp": "",
}


@pytest.mark.parametrize(
    ("rows", "drop", "folds", "message"),
    [
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "b", **ROW, "patient": "P2"}],
            "format",
            {},
            "missing column(s) format",
        ),
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "a", **ROW, "patient": "P2"}],
            None,
            {},
            "row 3 (slide 'a'): duplicate slide_id",
        ),
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "b", **ROW, "image": "nope.svs"}],
            None,
            {},
            "row 3 (slide 'b'): image",
        ),
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "b", **ROW}],
            "patient",
            {"scheme": "leave_one_patient_out"},
            "column 'patient' is missing",
        ),
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "b", **ROW}],
            None,
            {"scheme": "leave_one_patient_out"},
            "leave_one_patient_out needs at least 2 patients",
        ),
    ],
)
def test_bad_sample_sheet_stops_before_running(tmp_path, rows, drop, folds, message):
    config = _config(tmp_path, _sheet(tmp_path, rows, drop), **folds)
    result = snakemake("-n", "--cores", "1", "--configfile", str(config), cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert message in output, output
    assert "samples.tsv" in output
    assert not (tmp_path / "results").exists()


def test_threads_per_job_come_from_the_config(tmp_path):
    overlay = tmp_path / "threads.yaml"
    overlay.write_text("resources:\n  threads: 3\n")
    base = str(ROOT / "config" / "config.yaml")
    result = snakemake("-n", "-p", "--cores", "4", "--configfile", base, str(overlay), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train_commands = [line for line in result.stdout.splitlines() if "stevs train" in line]
    predict_commands = [line for line in result.stdout.splitlines() if "stevs predict" in line]
    assert train_commands and predict_commands
    assert all("--threads 3" in line for line in train_commands + predict_commands)
    demo = snakemake("-n", "-p", "--cores", "4", cwd=tmp_path)  # config.yaml: 1 per job
    assert all("--threads 1" in line for line in demo.stdout.splitlines() if "stevs train" in line)
