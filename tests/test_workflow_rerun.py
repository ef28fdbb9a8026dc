"""Reruns after a config change retrain, and give what a fresh run with the new config gives.

Issue 14's worst silent fault: changing ``folds.panel`` in a finished run reran ``train``,
which resumed the old checkpoint (STevs fold0 r fell from 0.33 to -0.02). Here a small run
finishes, ``folds.panel`` changes (then, separately, ``training.seeds``), the run is repeated
in the same folder, and the trained weights must (a) change and (b) equal, tensor for tensor
and byte for byte, those of a fresh results folder run with the new settings.

About 5 minutes on 2 shared cores (five Snakemake runs, each job a `stevs` process), so it
is not part of the default suite: ``make test-workflow-rerun`` runs it, and ``.ci/run``
calls that target.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_snakemake

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("stevs", "ridge_color")


def targets(seed: int) -> list[str]:
    """fold0's weights files: STevs on the .test encoder at ``seed``, the (seedless) floor."""
    return [
        f"results/models/cpu_small/stevs/seed{seed}/fold0/model.safetensors",
        "results/models/none/ridge_color/seed0/fold0/model.safetensors",
    ]


pytestmark = pytest.mark.workflow_rerun


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Three 600 µm demo slides (two patients), made once for every run."""
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--out", str(out), "--n-slides", "3", "--size-um", "600", "--mpp", "2"]
    subprocess.run([sys.executable, "-m", "stevs.cli", *argv], check=True, capture_output=True)
    return out / "samples.tsv"


def configure(folder: Path, sheet: Path, panel: str, seed: int) -> Path:
    """The tiny .test/ config, smaller: one epoch, 10 genes, LOSO folds, no H&E-only slide."""
    config = yaml.safe_load((ROOT / ".test" / "config" / "config.yaml").read_text())
    config.update(samples=str(sheet), results="results", predict_slides={})
    config["demo"]["generate"] = False
    config["folds"].update(scheme="leave_one_slide_out", panel=panel, n_genes=10, n_headline=5)
    config["training"].update(epochs=1, batch_size=16, seeds=[seed])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(folder: Path, sheet: Path, panel: str, seed: int) -> tuple[dict[str, bytes], str]:
    """Bring fold0's models up to date; (weights file bytes per method, Snakemake's log)."""
    config = configure(folder, sheet, panel, seed)
    paths = targets(seed)
    result = run_snakemake(*paths, "--cores", "2", "--configfile", str(config), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = {m: (folder / t).read_bytes() for m, t in zip(METHODS, paths, strict=True)}
    return weights, result.stderr


def fresh(folder: Path, seeded_from: Path, sheet: Path, panel: str, seed: int) -> dict[str, bytes]:
    """A new results folder with the new settings. It starts from copies of the slide
    AnnDatas and patch caches (neither setting touches them), so only folds and training
    run, from nothing."""
    for part in ("slides", "patches"):
        shutil.copytree(seeded_from / "results" / part, folder / "results" / part)
    weights, log = run(folder, sheet, panel, seed)
    assert "make_folds" in log and "ingest_slide" not in log and "tile_slide" not in log
    return weights


def tensors(data: bytes) -> dict:
    """The arrays of a safetensors file."""
    from safetensors.numpy import load

    return load(data)


def assert_same(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Byte-identical weights files (hence equal tensors and equal metadata)."""
    for method in METHODS:
        assert a[method] == b[method], method


def test_config_changes_retrain_like_a_fresh_run(demo, tmp_path):
    first, _ = run(tmp_path / "run", demo, "highly_variable", 0)

    # folds.panel: make_folds reruns (params), so does train (its fold file changed)
    panel, log = run(tmp_path / "run", demo, "highly_expressed", 0)
    assert "make_folds" in log and "run_fold" in log
    for method in METHODS:
        assert panel[method] != first[method], method
        assert sorted(tensors(panel[method])) == sorted(tensors(first[method]))  # same model
    new_panel = fresh(tmp_path / "fresh_panel", tmp_path / "run", demo, "highly_expressed", 0)
    assert_same(panel, new_panel)

    # training.seeds: only train runs (a seed1 model folder); STevs' weights change, the
    # ridge floor has no seed
    seeded, log = run(tmp_path / "run", demo, "highly_expressed", 1)
    assert "run_fold" in log and "make_folds" not in log
    assert seeded["stevs"] != panel["stevs"]
    new_seed = fresh(tmp_path / "fresh_seed", tmp_path / "run", demo, "highly_expressed", 1)
    assert_same(seeded, new_seed)
