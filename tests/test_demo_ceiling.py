"""benchmarks/demo_ceiling.py: the demo's ceilings come from its truth files, spot by spot."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stevs.demo import make_demo
from stevs.folds import FoldOptions, make_folds
from stevs.io.ingest import ingest_from_sheet
from stevs.io.samples import read_sample_sheet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_ceiling.py"
_SPEC = importlib.util.spec_from_file_location("demo_ceiling", SCRIPT)
demo_ceiling = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(demo_ceiling)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three small demo slides, ingested, in leave-one-slide-out folds (no patches needed)."""
    root = tmp_path_factory.mktemp("ceiling")
    sheet = make_demo(root / "demo", seed=2, n_slides=3, size_um=1200.0, mpp=2.0, n_genes=60)
    results = root / "results"
    slides = [
        ingest_from_sheet(sheet, slide, results / "slides" / f"{slide}.h5ad")
        for slide in read_sample_sheet(sheet).index
    ]
    options = FoldOptions(scheme="leave_one_slide_out", n_genes=40, n_headline=20)
    make_folds(slides, results / "patches", results / "folds", options)
    return results, sheet.parent / "truth"


def ceilings(results: Path, truth: Path) -> pd.DataFrame:
    """The script's per-slide table (its first block of output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert demo_ceiling.main([str(results), "--truth", str(truth)]) == 0
    lines = out.getvalue().split("\n\n")[0].splitlines()
    return pd.DataFrame([line.split() for line in lines[1:]], columns=lines[0].split())


def test_oracle_beats_composition_probe_on_every_slide(demo_run: tuple[Path, Path]) -> None:
    table = ceilings(*demo_run)
    table["headline_r"] = table["headline_r"].astype(float)
    wide = table.pivot(index="slide", columns="prediction", values="headline_r")
    assert len(wide) == 3  # every slide held out once
    # count noise alone caps r below 1; knowing the patient's genes beats not knowing them
    assert (wide["oracle"] < 0.95).all() and (wide["oracle"] > 0.3).all()
    assert (wide["oracle"] >= wide["composition_ridge"] - 0.01).all()


def test_spots_are_matched_by_barcode(demo_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Truth files in another spot order give the same ceilings; shuffled truth does not."""
    results, truth = demo_run
    reordered, shuffled = tmp_path / "reordered", tmp_path / "shuffled"
    reordered.mkdir(), shuffled.mkdir()
    rng = np.random.default_rng(0)
    for path in truth.glob("*.npz"):
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        order = rng.permutation(len(arrays["spot_barcodes"]))
        spot_keys = [k for k in arrays if k.startswith("spot_")]
        np.savez(reordered / path.name, **{**arrays, **{k: arrays[k][order] for k in spot_keys}})
        wrong = {**arrays, "spot_barcodes": arrays["spot_barcodes"][order]}
        np.savez(shuffled / path.name, **wrong)
    base = ceilings(results, truth)
    assert ceilings(results, reordered).equals(base)
    scrambled = ceilings(results, shuffled)
    oracle = scrambled[scrambled["prediction"] == "oracle"]["headline_r"].astype(float)
    assert (oracle.abs() < 0.2).all()
