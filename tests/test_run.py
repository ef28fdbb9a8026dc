"""``stevs run`` (the workflow's run_fold job): train, predict and evaluate in one process
write what the three commands write one after the other; a refused output stops it before
training."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_probe_baselines import grid_fold

from stevs.cli import main
from stevs.io.model_dir import ModelDir

GENES = {
    "nbr_gene": lambda z, nbr, rng: 5 + 200 * nbr,
    "own_gene": lambda z, nbr, rng: 5 + 100 * z,
}
#: per method: `stevs train` options beyond --fold / --method / --out
TRAIN_ARGS = {
    "ridge_rrr": ["--backbone", "test_efficientnet"],
    "stevs": [
        "--preset",
        "cpu_small",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--seed",
        "1",
    ],  # fmt: skip
}


def three_commands(fold: Path, method: str, root: Path) -> tuple[Path, Path, Path]:
    """`stevs train`, `stevs predict`, `stevs evaluate` one after the other."""
    model, predictions, table = root / "model", root / "predictions", root / "fold0.tsv"
    train = ["train", "--fold", str(fold), "--method", method, "--out", str(model)]
    assert main([*train, *TRAIN_ARGS[method]]) == 0
    argv = ["predict", "--model-dir", str(model), "--fold", str(fold), "--device", "cpu"]
    assert main([*argv, "--out-dir", str(predictions)]) == 0
    assert main(["evaluate", "--fold", str(fold), "--predictions", str(predictions),
                 "--method", method, "--out", str(table)]) == 0  # fmt: skip
    return model, predictions, table


@pytest.mark.parametrize("method", ["ridge_rrr", "stevs"])
def test_run_writes_what_train_predict_evaluate_write(tmp_path: Path, method: str):
    """ridge_rrr with --seed, STevs with --seeds 0 1 ('{seed}' in the paths): seed 1's files
    equal those of the three commands with --seed 1; seed 0's model is another."""
    fold = grid_fold(tmp_path, GENES, side=5)
    model, predictions, table = three_commands(fold, method, tmp_path / "apart")
    runs = tmp_path / "together" / ("seed{seed}" if method == "stevs" else "seed1")
    argv = ["run", "--fold", str(fold), "--method", method, "--out", str(runs / "model"),
            "--predictions", str(runs / "predictions"),
            "--metrics", str(runs / "fold0.tsv"), *TRAIN_ARGS[method]]  # fmt: skip
    assert main([*argv, "--seeds", "0", "1"] if method == "stevs" else argv) == 0
    together = tmp_path / "together" / "seed1"
    assert ModelDir(together / "model").weights_sha256() == ModelDir(model).weights_sha256()
    assert (together / "predictions" / "predictions.tsv").is_file()
    one, other = ad.read_h5ad(predictions / "D.h5ad"), ad.read_h5ad(together / "predictions/D.h5ad")
    np.testing.assert_array_equal(one.X, other.X)
    np.testing.assert_array_equal(one.layers["std"], other.layers["std"])
    for suffix in ("", ".summary", ".pooled"):
        name = f"fold0{suffix}.tsv"
        pd.testing.assert_frame_equal(
            pd.read_csv(table.with_name(name), sep="\t"),
            pd.read_csv(together / name, sep="\t"),
        )
    if method == "stevs":
        seed0 = ModelDir(tmp_path / "together" / "seed0" / "model").weights_sha256()
        assert seed0 != ModelDir(model).weights_sha256()
        assert (tmp_path / "together" / "seed0" / "fold0.summary.tsv").is_file()


def test_run_seeds_need_a_seed_placeholder_in_every_output(tmp_path, capsys):
    fold = grid_fold(tmp_path, GENES, side=5)
    argv = ["run", "--fold", str(fold), "--method", "ridge_rrr", "--seeds", "0", "1",
            "--out", str(tmp_path / "m{seed}"), "--predictions", str(tmp_path / "p"),
            "--metrics", str(tmp_path / "{seed}.tsv"), *TRAIN_ARGS["ridge_rrr"]]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stevs run: error: --seeds 0 1: give each seed once, and '{seed}' in "
                   "--predictions"]  # fmt: skip
    assert not list(tmp_path.glob("m*")) and not (tmp_path / "p").exists()


def test_run_refuses_a_users_file_at_the_metrics_path_before_training(tmp_path, capsys):
    fold = grid_fold(tmp_path, GENES, side=5)
    mine = tmp_path / "mine.tsv"
    mine.write_text("my own table\n")
    argv = ["run", "--fold", str(fold), "--method", "ridge_rrr", "--out", str(tmp_path / "m"),
            "--predictions", str(tmp_path / "p"), "--metrics", str(mine),
            *TRAIN_ARGS["ridge_rrr"]]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stevs run: error: ") and str(mine) in err[0]
    assert mine.read_text() == "my own table\n"
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()
