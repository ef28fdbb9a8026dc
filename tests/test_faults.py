"""Faults and bad input, tried as a new user would (issues 14 and 25).

Every case ends the same way: exit code 2 from ``stevs.cli.main`` (130 for Ctrl-C), one line
on stderr that names the file (or the option) and the problem, no output that looks valid,
and no file of the user's changed. Cases
tested in their module's own test file are listed in :data:`ELSEWHERE`, so this file and
that list together are the catalogue of fault classes.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import types
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_patch_cache
from fault_catalogue import CATALOGUE, CLEAR, OUTCOMES, RIGHT, counts, params, table
from safetensors.torch import load_file
from test_predict_slide import untrained_model
from test_train import TINY_PRESET, TinySpots, normalisation, run_training

import stevs.atomic
from stevs.cli import main
from stevs.errors import StevsInputError
from stevs.io.fold_file import read_fold
from stevs.models import create_model
from stevs.training.loop import train_model
from stevs.training.options import TrainOptions

PATCH_PX, PATCH_UM = 64, 128  # cpu_small's 64 px at 2 µm/px, the demo's own resolution
#: tests here that check the catalogue or the fixture, not a fault
META_TESTS = {
    "test_every_case_names_a_test_that_is_there",
    "test_every_test_here_is_a_catalogued_case",
    "test_docs_faults_md_shows_the_catalogue",
    "test_every_subcommand_runs_on_the_fixture",
}
DOCS = Path(__file__).parents[1] / "docs" / "faults.md"


def test_every_case_names_a_test_that_is_there():
    """Each case of the catalogue names a test function of the file it names."""
    here = Path(__file__).parent
    for case in CATALOGUE:
        module, name = case.test.split("::")
        assert f"def {name}(" in (here / module).read_text(encoding="utf-8"), case
        assert case.outcome in OUTCOMES, case
    nodes = [case.node for case in CATALOGUE]
    assert len(nodes) == len(set(nodes)), "a case listed twice"


def test_every_test_here_is_a_catalogued_case():
    """No test of this file outside the catalogue: the counts are the tests' own."""
    tests = set(re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(encoding="utf-8"), re.M))
    catalogued = {c.test.split("::")[1] for c in CATALOGUE if c.test.startswith("test_faults.py")}
    assert tests - META_TESTS == catalogued


def test_docs_faults_md_shows_the_catalogue():
    """docs/faults.md holds the counts and the list `python tests/fault_catalogue.py` prints."""
    total = counts()
    assert total["tried"] == total[CLEAR] + total[RIGHT] > 100
    assert table() in DOCS.read_text(encoding="utf-8"), "run: python tests/fault_catalogue.py"


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str]:
    """``stevs ARGV`` in-process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def files_under(folder: Path) -> list[str]:
    """Files (not folders, not logs) under ``folder``, relative, sorted."""
    if not folder.exists():
        return []
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix != ".log"
    )


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and a one-line ``stevs X: error: ...`` holding every needle."""
    lines = [line for line in err.splitlines() if ": error: " in line]  # not progress bars
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("stevs "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# -- a tiny demo run, every stage's inputs ----------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Three small demo slides ingested and tiled, LOSO folds, an untrained STevs model of
    fold0's panel, its predictions and metrics: the inputs of every subcommand."""
    root = tmp_path_factory.mktemp("run")
    argv = ["demo", "--out", root / "demo", "--n-slides", 3, "--size-um", 800, "--mpp", 2]
    assert main([*map(str, argv), "--n-genes", "41"]) == 0
    sheet = root / "demo" / "samples.tsv"
    slides = []
    for i in (1, 2, 3):
        slide = root / "slides" / f"demo_{i}.h5ad"
        assert main(["ingest", "--sample-sheet", str(sheet), "--slide-id", f"demo_{i}",
                     "--out", str(slide)]) == 0  # fmt: skip
        assert main(["tile", "--slide", str(slide), "--out", str(root / "patches" / f"demo_{i}.h5"),
                     "--patch-px", str(PATCH_PX), "--patch-um", str(PATCH_UM)]) == 0  # fmt: skip
        slides.append(str(slide))
    assert main(["folds", "--slides", *slides, "--patches-dir", str(root / "patches"),
                 "--scheme", "leave_one_slide_out", "--n-genes", "20",
                 "--out-dir", str(root / "folds")]) == 0  # fmt: skip
    fold = root / "folds" / "fold0.json"
    scale = {"patch_px": PATCH_PX, "mpp_target": PATCH_UM / PATCH_PX}
    model = untrained_model(root / "models" / "stevs" / "fold0", read_fold(fold).genes,
                            patches=scale)  # fmt: skip
    predictions = root / "predictions" / "stevs" / "fold0"
    assert main(["predict", "--model-dir", str(model), "--fold", str(fold),
                 "--out-dir", str(predictions), "--device", "cpu",
                 "--samples", "2"]) == 0  # fmt: skip
    metrics = root / "metrics"
    assert main(["evaluate", "--fold", str(fold), "--predictions", str(predictions),
                 "--method", "stevs",
                 "--out", str(metrics / "stevs" / "fold0.tsv")]) == 0  # fmt: skip
    return {
        "root": root,
        "sheet": sheet,
        "predict_sheet": root / "demo" / "predict.tsv",
        "slide": Path(slides[0]),
        "slides": root / "slides",
        "patches": root / "patches",
        "fold": fold,
        "model": model,
        "predictions": predictions,
        "metrics": metrics,
    }


def commands(run: dict[str, Path], out: Path) -> dict[str, list[object]]:
    """One working command line per subcommand, every output under ``out``."""
    slides = sorted(run["slides"].glob("*.h5ad"))
    return {
        "demo": [
            "demo",
            "--out",
            out / "demo",
            "--n-slides",
            1,
            "--size-um",
            600,
            "--mpp",
            2,
            "--n-genes",
            41,
        ],  # fmt: skip
        "ingest": [
            "ingest",
            "--sample-sheet",
            run["sheet"],
            "--slide-id",
            "demo_1",
            "--out",
            out / "demo_1.h5ad",
        ],  # fmt: skip
        "tile": [
            "tile",
            "--slide",
            run["slide"],
            "--out",
            out / "demo_1.h5",
            "--patch-px",
            PATCH_PX,
            "--patch-um",
            PATCH_UM,
        ],  # fmt: skip
        "folds": [
            "folds",
            "--slides",
            *slides,
            "--patches-dir",
            run["patches"],
            "--scheme",
            "leave_one_slide_out",
            "--n-genes",
            20,
            "--out-dir",
            out,
        ],  # fmt: skip
        "train": [
            "train",
            "--fold",
            run["fold"],
            "--method",
            "ridge_color",
            "--out",
            out,
            "--device",
            "cpu",
        ],  # fmt: skip
        "predict": [
            "predict",
            "--model-dir",
            run["model"],
            "--fold",
            run["fold"],
            "--out-dir",
            out,
            "--device",
            "cpu",
            "--samples",
            2,
        ],  # fmt: skip
        "evaluate": [
            "evaluate",
            "--fold",
            run["fold"],
            "--predictions",
            run["predictions"],
            "--method",
            "stevs",
            "--out",
            out / "fold0.tsv",
        ],  # fmt: skip
        "report": ["report", "--metrics", run["metrics"], "--out", out],
        "predict-slide": [
            "predict-slide",
            "--sheet",
            run["predict_sheet"],
            "--slide-id",
            "demo_heonly",
            "--models",
            run["model"],
            "--out-dir",
            out,
            "--device",
            "cpu",
            "--samples",
            2,
        ],  # fmt: skip
    }


def test_every_subcommand_runs_on_the_fixture(run, tmp_path, capsys):
    """The command lines below work, so each fault test fails for its fault only."""
    for name in ("tile", "folds", "evaluate"):
        code, err = run_cli(capsys, *commands(run, tmp_path / name)[name])
        assert code == 0, err
        assert files_under(tmp_path / name)


# -- outputs: full disk, read-only folder -------------------------------------------------------


@pytest.mark.parametrize("name", params("test_full_disk_is_one_line_naming_the_output"))
def test_full_disk_is_one_line_naming_the_output(run, tmp_path, capsys, monkeypatch, name):
    """The disk fills while the first output is finished: one line, nothing left behind."""

    def full(tmp: Path, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(stevs.atomic, "_publish", full)
    out = tmp_path / "out"
    code, err = run_cli(capsys, *commands(run, out)[name])
    assert_one_line_error(code, err, str(out), "No space left on device", "free space")
    assert files_under(out) == []  # neither outputs nor their temporary files


@pytest.mark.parametrize("name", params("test_read_only_folder_is_one_line_naming_it"))
def test_read_only_folder_is_one_line_naming_it(run, tmp_path, capsys, monkeypatch, name):
    """No file can be created in the output folder (what chmod 555 does for a non-root user)."""

    def refuse(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(stevs.atomic, "tempfile", types.SimpleNamespace(mkstemp=refuse))
    out = tmp_path / "out"
    code, err = run_cli(capsys, *commands(run, out)[name])
    assert_one_line_error(code, err, str(out), "Permission denied", "not writable")
    assert files_under(out) == []


def test_a_write_failing_inside_the_writer_is_one_line(run, tmp_path, capsys, monkeypatch):
    """ENOSPC raised by the library writing the file (here anndata), not by the rename."""

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full)
    out = tmp_path / "out"
    code, err = run_cli(capsys, *commands(run, out)["ingest"])
    assert_one_line_error(code, err, str(out / "demo_1.h5ad"), "No space left on device")
    assert files_under(out) == []


def test_permission_error_outside_the_atomic_writer_is_one_line(run, tmp_path, capsys, monkeypatch):
    """A folder the command creates itself (train's model folder) cannot be created."""
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == tmp_path / "out":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, err = run_cli(capsys, *commands(run, tmp_path / "out")["train"])
    assert_one_line_error(code, err, str(tmp_path / "out"), "Permission denied")


def test_output_path_taken_by_a_folder_is_one_line(run, tmp_path, capsys):
    """`--out` names an existing folder: was an IsADirectoryError traceback at the rename."""
    out = tmp_path / "out"
    (out / "demo_1.h5ad").mkdir(parents=True)
    code, err = run_cli(capsys, *commands(run, out)["ingest"])
    assert_one_line_error(code, err, str(out / "demo_1.h5ad"), "a folder of that name")
    assert files_under(out) == []


def test_stale_temporary_files_of_a_killed_run_are_removed(run, tmp_path, capsys):
    """A killed `stevs tile` leaves `.X.h5.tmp-*`; the rerun removes it (and only its own)."""
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".demo_1.h5.tmp-abc123"
    stale.write_bytes(b"half a cache")
    other = out / ".demo_2.h5.tmp-def456"  # another output's: not ours to remove
    other.write_bytes(b"another job")
    code, err = run_cli(capsys, *commands(run, out)["tile"])
    assert code == 0, err
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in out.iterdir()) == [other.name, "demo_1.h5"]


# -- devices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", params("test_cuda_without_a_gpu_is_one_line"))
def test_cuda_without_a_gpu_is_one_line(run, tmp_path, capsys, monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv = commands(run, out)[name]
    argv[argv.index("--device") + 1] = "cuda"
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "--device cuda: this machine has no cuda")
    assert files_under(out) == []


@pytest.mark.parametrize("name", params("test_bogus_device_name_is_one_line"))
def test_bogus_device_name_is_one_line(run, tmp_path, capsys, name):
    out = tmp_path / "out"
    argv = commands(run, out)[name]
    argv[argv.index("--device") + 1] = "gpu0"
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "--device gpu0 is not a device name")
    assert files_under(out) == []


# -- sample sheets -----------------------------------------------------------------------------


def demo_rows(run: dict[str, Path]) -> pd.DataFrame:
    sheet = pd.read_csv(run["sheet"], sep="\t", dtype=str, keep_default_na=False)
    base = run["sheet"].parent
    for column in ("image", "expression"):
        sheet[column] = [str(base / v) for v in sheet[column]]
    return sheet


@pytest.mark.parametrize(("edit", "message"), params("test_bad_sample_sheet_is_one_line_naming_it"))
def test_bad_sample_sheet_is_one_line_naming_it(run, tmp_path, capsys, edit, message):
    sheet = tmp_path / "samples.tsv"
    table = None if edit is None else edit(demo_rows(run))
    if table is None:
        sheet.write_bytes(b"")
    else:
        table.to_csv(sheet, sep="\t", index=False)
    out = tmp_path / "out" / "demo_1.h5ad"
    code, err = run_cli(capsys, "ingest", "--sample-sheet", sheet, "--slide-id", "demo_1",
                        "--out", out)  # fmt: skip
    assert_one_line_error(code, err, str(sheet), message)
    assert not out.exists()


def test_mpp_given_on_some_rows_only_means_not_given_on_the_others(run, tmp_path, capsys):
    """Was: 'got nan', blaming the image. An empty cell is "not given", row by row."""
    table = demo_rows(run)
    table["mpp"] = ""
    table.loc[table["slide_id"] == "demo_2", "mpp"] = "2.0"
    sheet = tmp_path / "samples.tsv"
    table.to_csv(sheet, sep="\t", index=False)
    sources = {}
    for slide in ("demo_1", "demo_2"):
        out = tmp_path / f"{slide}.h5ad"
        code, err = run_cli(capsys, "ingest", "--sample-sheet", sheet, "--slide-id", slide,
                            "--out", out)  # fmt: skip
        assert code == 0, err
        meta = ad.read_h5ad(out, backed="r").uns["stevs"]
        sources[slide] = (meta["mpp_source"], meta["mpp"])
    assert sources == {"demo_1": ("metadata", 2.0), "demo_2": ("given", 2.0)}


# -- spot coordinates in the wrong scale --------------------------------------------------------


def test_spots_in_hires_pixels_are_refused_with_the_fix(run, tmp_path, capsys):
    """Coordinates of a downscaled image (Space Ranger's hires, scale factor 0.2) for the
    full-resolution image: every patch on glass. Was: a cache of background, exit 0."""
    adata = ad.read_h5ad(run["slide"])
    adata.obsm["spatial"] = adata.obsm["spatial"] * 0.2
    wrong = tmp_path / "hires.h5ad"
    adata.write_h5ad(wrong)
    out = tmp_path / "out" / "demo_1.h5"
    code, err = run_cli(capsys, "tile", "--slide", wrong, "--out", out,
                        "--patch-px", PATCH_PX, "--patch-um", PATCH_UM)  # fmt: skip
    assert_one_line_error(code, err, str(wrong), "spot patches are background",
                          "multiply them by 1/tissue_hires_scalef")  # fmt: skip
    assert files_under(tmp_path / "out") == []


def test_spot_check_passes_every_her2st_section_and_refuses_wrong_spots(her2st_dir):
    """The check stays quiet on the 5 real sections; the same spots at hires or half scale,
    or on another section's image (all 20 pairings), stop it."""
    from stevs.io.expression import estimate_mpp_from_spot_grid, read_legacy_st
    from stevs.io.slide import open_slide
    from stevs.tiling import TileGeometry
    from stevs.tiling_checks import check_spots_on_tissue
    from stevs.tissue import detect_tissue

    sheet = pd.read_csv(Path(__file__).parents[1] / "config" / "her2st.tsv", sep="\t")
    assert len(sheet) == 5
    sections = {}
    for row in sheet.itertuples():
        adata = read_legacy_st(her2st_dir / row.expression, her2st_dir / row.spots)
        mpp = estimate_mpp_from_spot_grid(adata, "st")
        with open_slide(her2st_dir / row.image, mpp=mpp) as slide:
            tissue = detect_tissue(slide, mpp)
        geometry = TileGeometry(mpp, 224, 0.5, 0, 1.0)
        boxes = geometry.boxes(np.asarray(adata.obsm["spatial"]))
        check_spots_on_tissue(row.slide_id, row.image, tissue, boxes, tissue.box_fractions(boxes))
        sections[row.slide_id] = (tissue, boxes)
        shrunk = geometry.boxes(np.asarray(adata.obsm["spatial"]) * tissue.scale)
        with pytest.raises(StevsInputError, match="tissue_hires_scalef"):
            check_spots_on_tissue(
                row.slide_id, row.image, tissue, shrunk, tissue.box_fractions(shrunk)
            )
        half = geometry.boxes(np.asarray(adata.obsm["spatial"]) * 0.5)
        with pytest.raises(StevsInputError, match="mostly off tissue"):
            check_spots_on_tissue(row.slide_id, row.image, tissue, half, tissue.box_fractions(half))
    for slide, (_, boxes) in sections.items():  # each section's spots on another's image
        for other, (tissue, _) in sections.items():
            if other != slide:
                with pytest.raises(StevsInputError, match="another section"):
                    check_spots_on_tissue(slide, other, tissue, boxes, tissue.box_fractions(boxes))


# -- folds --------------------------------------------------------------------------------


def test_folds_with_a_missing_patches_dir_write_nothing(run, tmp_path, capsys):
    """Was: fold files pointing at caches that do not exist, exit 0."""
    argv = commands(run, tmp_path / "folds")["folds"]
    missing = tmp_path / "no_such_patches"
    argv[argv.index("--patches-dir") + 1] = missing
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, str(missing), "patches folder does not exist")
    assert files_under(tmp_path / "folds") == []


def test_a_failing_fold_leaves_no_fold_file(run, tmp_path, capsys):
    """within_slice on one small slide: fold0 builds, fold1 has no validation spots left.
    Was: fold0.json left beside the failed fold1."""
    out = tmp_path / "folds"
    code, err = run_cli(capsys, "folds", "--slides", run["slide"], "--patches-dir",
                        run["patches"], "--scheme", "within_slice", "--k", 2, "--block-um", 200,
                        "--n-genes", 20, "--out-dir", out)  # fmt: skip
    assert_one_line_error(code, err, str(run["slide"]), "fold1: no val spots are left")
    assert files_under(out) == []


def test_a_fold_write_failing_removes_the_folds_written(run, tmp_path, capsys, monkeypatch):
    """The disk fills at fold1.json: fold0.json of the same call is removed again."""
    import stevs.folds

    real = stevs.folds.write_fold

    def full_at_second(fold, path):
        if fold.fold != "fold0":
            raise stevs.atomic.output_error(path, OSError(errno.ENOSPC, "No space left on device"))
        return real(fold, path)

    monkeypatch.setattr(stevs.folds, "write_fold", full_at_second)
    out = tmp_path / "folds"
    code, err = run_cli(capsys, *commands(run, out)["folds"])
    assert_one_line_error(code, err, str(out / "fold1.json"), "No space left on device")
    assert files_under(out) == []


# -- inputs of the later stages -------------------------------------------------------------------


def test_damaged_patch_cache_names_the_cache(run, tmp_path, capsys):
    """A B-tree overwritten inside the file: was an HDF5 traceback from a DataLoader worker."""
    cache = tmp_path / "demo_1.h5"
    patches = np.zeros((12, 16, 16, 3), np.uint8)
    write_patch_cache(cache, patches, [f"s{i}" for i in range(12)], np.zeros((12, 2)))
    data = bytearray(cache.read_bytes())
    trees = [i for i in range(len(data) - 3) if data[i : i + 4] == b"TREE"]
    assert len(trees) == 2  # the root group's and the patches' chunk index
    from stevs.io.patch_cache import PatchCache

    for offset, where in zip(trees, ("the cache", "2 patch rows"), strict=True):
        damaged = bytearray(data)
        damaged[offset : offset + 4] = b"XXXX"
        cache.write_bytes(bytes(damaged))
        with pytest.raises(StevsInputError, match="damaged or truncated") as info:
            PatchCache(cache).read_rows([0, 5])
        assert str(info.value).startswith(f"{cache}: cannot read {where}")
    truncated = tmp_path / "truncated.h5"  # a new name: HDF5 reuses open handles by file
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(StevsInputError, match="corrupt or truncated") as info:
        PatchCache(truncated)
    assert str(info.value).startswith(f"{truncated}: ")


def test_damaged_cache_read_in_a_dataloader_worker_is_one_line(tmp_path):
    """torch re-raises a worker's error from its message only; the one line survives."""
    from torch.utils.data import DataLoader, Dataset

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> None:
            raise StevsInputError(tmp_path / "c.h5", "cannot read patch row 1: damaged")

    with pytest.raises(StevsInputError) as info:
        list(DataLoader(Broken(), num_workers=1))
    assert str(info.value) == f"{tmp_path / 'c.h5'}: cannot read patch row 1: damaged"


def test_positions_list_with_a_header_line_is_read(tmp_path):
    """Space Ranger's headerless tissue_positions_list.csv, saved with a header by a user
    (or tissue_positions.csv without one): was a ValueError traceback."""
    from stevs.io.expression import read_visium_positions

    rows = "AAAC-1,1,0,0,100,200\nAAAG-1,0,0,2,100,300\nAACC-1,1,1,1,186,250\n"
    header = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
    expected = None
    for name, text in [
        ("tissue_positions_list.csv", rows),
        ("tissue_positions_list.csv", header + rows),
        ("tissue_positions.csv", header + rows),
        ("tissue_positions.csv", rows),
    ]:
        folder = tmp_path / f"{name}-{len(text)}"
        folder.mkdir()
        (folder / name).write_text(text)
        table, path = read_visium_positions(folder)
        assert path == folder / name and list(table.index) == ["AAAC-1", "AACC-1"]
        expected = table if expected is None else expected
        pd.testing.assert_frame_equal(table, expected)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tissue_positions_list.csv").write_text(header + "AAAC-1,yes,0,0,100,200\n")
    with pytest.raises(StevsInputError, match="non-numeric") as info:
        read_visium_positions(bad)
    assert str(info.value).startswith(str(bad / "tissue_positions_list.csv"))


def test_equal_weights_give_byte_identical_files_in_separate_processes(tmp_path):
    """safetensors keeps metadata in a hash map whose order changes per process: the
    weights file (and the checksum predictions record) changed between identical runs."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from stevs.io.model_dir import ModelDir; "
        "ModelDir(sys.argv[1]).write_arrays({'w': np.arange(6.0), 'b': np.ones(2)}, "
        "{'method': 'ridge_color', 'alpha': 1.0, 'epochs_done': 3, 'best_epoch': 2})"
    )
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True)
    files = {(tmp_path / name / "model.safetensors").read_bytes() for name in ("a", "b", "c")}
    assert len(files) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "model.safetensors"), "np") as handle:
        assert handle.metadata()["best_epoch"] == "2"
        assert np.array_equal(handle.get_tensor("w"), np.arange(6.0))


# -- training --------------------------------------------------------------------------------------


def test_resuming_with_another_preset_trains_from_scratch(tmp_path, caplog):
    """Was a state-dict traceback; now another preset is another run: fresh, and logged."""
    run_training(tmp_path / "m", epochs=1)
    wide = replace(TINY_PRESET, name="tiny_wide", hidden_dim=48)
    with caplog.at_level(logging.WARNING, logger="stevs.train"):
        again = run_training(tmp_path / "m", preset=wide, epochs=1)
    assert "another run" in caplog.text and "model" in caplog.text
    run_training(tmp_path / "fresh", preset=wide, epochs=1)
    assert again.epochs_done == 1
    a, b = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "m", tmp_path / "fresh"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["hidden_dim"] == 48


def test_divergence_to_nan_names_the_epoch_and_writes_no_weights(tmp_path):
    class Diverging(TinySpots):
        """Fine data whose targets turn infinite: the loss is no longer finite."""

        def __getitem__(self, i: int) -> dict:
            item = super().__getitem__(i)
            return {**item, "target": item["target"] * float("inf")}

    torch.manual_seed(0)
    genes = [f"g{i}" for i in range(5)]
    model = create_model("stevs", TINY_PRESET, genes, normalisation())
    options = TrainOptions(workers=0, device="cpu", epochs=2).resolved(TINY_PRESET)
    with pytest.raises(StevsInputError, match="training diverged at epoch 1") as info:
        train_model(model, Diverging(16, (0,), 1), None, tmp_path, options, {"method": "stevs"})
    assert str(info.value).startswith(str(tmp_path)) and "--lr" in str(info.value)
    assert not (tmp_path / "model.safetensors").exists()


# -- issue 25: a model applied to a fold it does not fit ----------------------------------------


def edited_fold(source: Path, out: Path, **changes: object) -> Path:
    """A copy of the fold file ``source`` with some keys replaced."""
    data = json.loads(source.read_text(encoding="utf-8"))
    data.update(changes)
    out.write_text(json.dumps(data), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def ridge_fold0(run, tmp_path_factory) -> Path:
    """A ridge_color model of fold0 (its config records its training slides)."""
    out = tmp_path_factory.mktemp("ridge") / "fold0"
    argv = ["train", "--fold", run["fold"], "--method", "ridge_color", "--out", out]
    assert main([*map(str, argv), "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize(
    "kind", params("test_a_model_is_not_applied_to_a_fold_normalised_otherwise")
)
def test_a_model_is_not_applied_to_a_fold_normalised_otherwise(run, ridge_fold0, tmp_path,
                                                               capsys, kind):  # fmt: skip
    """Was: log1p_cp10k predictions written as `raw` values, exit 0."""
    fold0 = json.loads(run["fold"].read_text(encoding="utf-8"))
    raw = edited_fold(run["fold"], tmp_path / "fold0.json",
                      normalisation={**fold0["normalisation"], "method": "raw"})  # fmt: skip
    model = run["model"] if kind == "stevs" else ridge_fold0
    argv = commands(run, tmp_path / "out")["predict"]
    argv[argv.index("--model-dir") + 1] = model
    argv[argv.index("--fold") + 1] = raw
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, str(raw), "normalisation method is 'raw'", str(model),
                          "'log1p_cp10k'")  # fmt: skip
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize("kind", params("test_a_model_is_not_applied_to_its_own_training_slides"))
def test_a_model_is_not_applied_to_its_own_training_slides(run, ridge_fold0, tmp_path, capsys,
                                                           kind):  # fmt: skip
    """fold0's model on fold1 (same panel), whose test slide demo_2 trained fold0's model.
    Was: exit 0 with an inflated score (ridge), one warning line (STevs)."""
    fold0 = json.loads(run["fold"].read_text(encoding="utf-8"))
    same_panel = {k: fold0[k] for k in ("genes", "headline_genes", "panel", "normalisation")}
    fold1 = edited_fold(run["fold"].parent / "fold1.json", tmp_path / "fold1.json", **same_panel)
    assert read_fold(fold1).test == ["demo_2"]
    model = ridge_fold0
    if kind == "stevs":  # the fixture's model, recording its slides as `stevs train` does
        model = tmp_path / "stevs_fold0"
        model.mkdir()
        for name in ("model.safetensors", "config.json"):
            (model / name).write_bytes((run["model"] / name).read_bytes())
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
        config["training_slides"] = ["demo_2", "demo_3"]
        (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    argv = commands(run, tmp_path / "out")["predict"]
    argv[argv.index("--model-dir") + 1] = model
    argv[argv.index("--fold") + 1] = fold1
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, str(fold1), "test slide(s) demo_2 of fold fold1",
                          f"training slides of the model in {model} (fold fold0)")  # fmt: skip
    assert files_under(tmp_path / "out") == []


# -- issue 25: never remove or overwrite what the project did not write ---------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_over_a_users_folder_leaves_it_untouched(run, tmp_path, capsys):
    """Was: `stevs export --out mydata` deleted the folder mydata and wrote a store there."""
    pytest.importorskip("spatialdata")
    mine = tmp_path / "mydata"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "he.png").write_bytes(b"\x89PNG my picture")
    (mine / "sheet.tsv").write_text("slide_id\nmine\n")
    before = snapshot(mine)
    code, err = run_cli(capsys, "export", "--input", run["slide"], "--out", mine)
    assert_one_line_error(code, err, f"{mine}: exists and is not an earlier output")
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"]  # no temporary left
    store = tmp_path / "demo_1.zarr"  # a store stevs wrote is replaced by the rerun
    for _ in range(2):
        code, err = run_cli(capsys, "export", "--input", run["slide"], "--out", store)
        assert code == 0, err
    assert (store / "zarr.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_1.zarr", "mydata"]


@pytest.mark.parametrize("where", params("test_export_at_or_under_a_regular_file_is_one_line"))
def test_export_at_or_under_a_regular_file_is_one_line(run, tmp_path, capsys, where):
    """Was a FileExistsError / NotADirectoryError traceback (under) or a replaced file (at)."""
    pytest.importorskip("spatialdata")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    out = notes if where == "at" else notes / "demo_1.zarr"
    code, err = run_cli(capsys, "export", "--input", run["slide"], "--out", out)
    problem = "exists and is not an earlier output" if where == "at" else f"{notes} is a file"
    assert_one_line_error(code, err, str(out), problem)
    assert notes.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_demo_into_a_users_folder_changes_nothing(run, tmp_path, capsys):
    """Was: `stevs demo --out` overwrote the user's samples.tsv in an existing folder."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "samples.tsv").write_text("slide_id\timage\nmine\tmine.tif\n")
    before = snapshot(mine)
    code, err = run_cli(capsys, *commands(run, mine)["demo"][:2], mine, "--size-um", 600)
    assert_one_line_error(code, err, f"{mine}: is a folder with files 'stevs demo' did not write")
    assert snapshot(mine) == before


# -- issue 25: scores on part of the data ------------------------------------------------------


def evaluate_argv(run: dict[str, Path], predictions: Path, out: Path) -> list[object]:
    argv = commands(run, out)["evaluate"]
    argv[argv.index("--predictions") + 1] = predictions
    return argv


def test_a_prediction_of_part_of_the_test_spots_is_not_scored(run, tmp_path, capsys, caplog):
    """Was: 10 of the test spots scored and reported as the fold's number, exit 0."""
    full = ad.read_h5ad(run["predictions"] / "demo_1.h5ad")
    assert full.n_obs == 35
    part = tmp_path / "pred" / "demo_1.h5ad"
    part.parent.mkdir()
    full[:10].copy().write_h5ad(part)
    code, err = run_cli(capsys, *evaluate_argv(run, part.parent, tmp_path / "out"))
    assert_one_line_error(code, err, str(part), f"predicts 10 of the {full.n_obs} test spots",
                          "--allow-missing-spots")  # fmt: skip
    assert files_under(tmp_path / "out") == []
    code, err = run_cli(capsys, *evaluate_argv(run, part.parent, tmp_path / "out"),
                        "--allow-missing-spots")  # fmt: skip
    assert code == 0, err
    assert "a PARTIAL score: 25 test spot(s) have no prediction" in caplog.text
    summary = pd.read_csv(tmp_path / "out" / "fold0.summary.tsv", sep="\t")
    assert summary.loc[0, "n_spots_missing"] == full.n_obs - 10
    assert summary.loc[0, "n_spots"] == 10


@pytest.mark.parametrize("how", params("test_a_prediction_of_another_slide_names_the_prediction"))
def test_a_prediction_of_another_slide_names_the_prediction(run, tmp_path, capsys, how):
    """demo_2's prediction saved as demo_1.h5ad. Was: an error blaming the ground truth
    (the slide AnnData's 'unknown spot barcodes'). Also: raw values scored as log values."""
    other = ad.read_h5ad(run["predictions"] / "demo_1.h5ad")
    other.uns["stevs"]["slide"] = "demo_2"
    if how == "barcodes":  # a file without the slide it predicts: its spots tell
        del other.uns["stevs"]["slide"]
        other.obs_names = [f"demo_2-{b}" for b in other.obs_names]
    if how == "normalisation":  # the right slide, predicted with a fold normalised `raw`
        other.uns["stevs"]["slide"] = "demo_1"
        other.uns["stevs"]["normalisation"]["method"] = "raw"
    wrong = tmp_path / "pred" / "demo_1.h5ad"
    wrong.parent.mkdir()
    other.write_h5ad(wrong)
    code, err = run_cli(capsys, *evaluate_argv(run, wrong.parent, tmp_path / "out"))
    problem = {
        "recorded slide": "is a prediction of slide 'demo_2', not of test slide 'demo_1'",
        "barcodes": "35 of its spots are not spots of test slide 'demo_1'",
        "normalisation": "holds raw values but fold fold0 is normalised log1p_cp10k",
    }[how]
    assert_one_line_error(code, err, f"{wrong}: {problem}")
    assert str(run["slide"]) not in err
    assert files_under(tmp_path / "out") == []


def test_report_does_not_compare_runs_scored_on_other_folds(run, tmp_path, capsys):
    """stevs on fold0 and fold1, ridge_color on fold0 only. Was: both means compared as equal."""
    metrics = tmp_path / "metrics"
    for method, folds in (("stevs", ("fold0", "fold1")), ("ridge_color", ("fold0",))):
        (metrics / method).mkdir(parents=True)
        for fold in folds:
            for suffix in (".tsv", ".summary.tsv", ".pooled.tsv"):
                table = pd.read_csv(run["metrics"] / "stevs" / f"fold0{suffix}", sep="\t")
                table = table.assign(method=method, fold=fold)
                table.to_csv(metrics / method / f"{fold}{suffix}", sep="\t", index=False)
    out = tmp_path / "report"
    code, err = run_cli(capsys, "report", "--metrics", metrics, "--out", out)
    assert_one_line_error(code, err, str(metrics), "ridge_color: not scored on fold1",
                          "--allow-partial")  # fmt: skip
    assert files_under(out) == []
    code, err = run_cli(capsys, "report", "--metrics", metrics, "--out", out, "--allow-partial")
    assert code == 0, err
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "PARTIAL comparison" in page and "ridge_color: not scored on fold1" in page


# -- issue 25: Ctrl-C ----------------------------------------------------------------------------


def test_ctrl_c_during_training_is_one_line_with_the_checkpoint(run, tmp_path, capsys,
                                                                monkeypatch, caplog):  # fmt: skip
    """Ctrl-C in epoch 2: exit 130, one line naming the epoch, the checkpoint and the command
    that resumes; no weights that look finished. Was: a KeyboardInterrupt traceback."""
    import stevs.training.loop as loop

    real = loop._train_epoch

    def interrupted_in_second(state, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(state, epoch)

    monkeypatch.setattr(loop, "_train_epoch", interrupted_in_second)
    out = tmp_path / "model"
    argv = ["train", "--fold", run["fold"], "--method", "stevs", "--out", out, "--device", "cpu",
            "--epochs", 2, "--workers", 0, "--batch-size", 16]  # fmt: skip
    code, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert code == 130 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("stevs train: interrupted: "), err
    for needle in ("training stopped in epoch 2", f"epoch 1 is saved in {out / 'checkpoint.pt'}",
                   f"rerun: stevs train --fold {run['fold']} --method stevs"):  # fmt: skip
        assert needle in lines[0], (needle, lines[0])
    assert (out / "checkpoint.pt").is_file()
    assert not list(out.rglob("model.safetensors"))
    monkeypatch.setattr(loop, "_train_epoch", real)  # the command of the line resumes
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert f"resuming from {out / 'checkpoint.pt'} after epoch 1" in caplog.text
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint.pt").exists()


def test_file_writers_replace_only_their_own_kind(run, tmp_path, capsys):
    """ingest over the user's own .h5ad, tile over an HDF5 file of theirs, predict into the
    slides folder (over the slide AnnData): each refused naming the file, none changed.
    Was: every one replaced without a word."""
    import h5py

    mine = tmp_path / "mine.h5ad"
    ad.AnnData(np.ones((3, 2), np.float32)).write_h5ad(mine)
    hest = tmp_path / "hest.h5"
    with h5py.File(hest, "w") as handle:
        handle["img"] = np.zeros((2, 4, 4, 3), np.uint8)
    slides = tmp_path / "slides"
    slides.mkdir()
    slide = slides / "demo_1.h5ad"
    slide.write_bytes(run["slide"].read_bytes())
    cases = {"ingest": ("--out", mine), "tile": ("--out", hest), "predict": ("--out-dir", slides)}
    for name, (option, target) in cases.items():
        taken = slide if name == "predict" else target
        before = taken.read_bytes()
        argv = commands(run, tmp_path / "unused")[name]
        argv[argv.index(option) + 1] = target
        code, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, f"{taken}: exists and is not an earlier output")
        assert taken.read_bytes() == before, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hest.h5", "mine.h5ad", "slides"]
    assert sorted(p.name for p in slides.iterdir()) == ["demo_1.h5ad"]
    out = tmp_path / "again"  # a file of the same kind stevs wrote is replaced
    for _ in range(2):
        code, err = run_cli(capsys, *commands(run, out)["ingest"])
        assert code == 0, err


def write_users_file(path: Path, kind: str) -> None:
    """A file of the user's, of ``kind``, at ``path``."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "png":  # a picture of theirs (no stevs marker)
        Image.new("RGB", (8, 8), "red").save(path)
        return
    text = {
        "tsv": "sample\tcount\nA\t3\n",
        "json": '{"my": "settings"}\n',
        "html": "<!DOCTYPE html><html><body>my page</body></html>\n",
        "csv": "name,value\nA,1\n",
        "text": "my notes\n",
    }[kind]
    path.write_text(text, encoding="utf-8")


def writer_argv(run: dict[str, Path], command: str, out: Path) -> list[object]:
    """The working command line of ``command`` writing under ``out`` (tile: with --qc)."""
    argv = commands(run, out)[command]
    return [*argv, "--qc", out / "qc.png"] if command == "tile" else argv


@pytest.mark.parametrize(
    ("command", "name", "kind"), params("test_a_users_file_at_an_output_path_is_left_untouched")
)
def test_a_users_file_at_an_output_path_is_left_untouched(run, tmp_path, capsys, command, name,
                                                          kind):  # fmt: skip
    """A file of the user's where a writer writes (evaluate's TSVs, a fold JSON, the report's
    page and tables, a model folder's files, predict-slide's and tile's pictures): refused
    before any work, naming it, byte-identical, nothing else written. Was: replaced."""
    out = tmp_path / "out"
    target = out / name
    write_users_file(target, kind)
    before = target.read_bytes()
    code, err = run_cli(capsys, *writer_argv(run, command, out))
    assert_one_line_error(code, err, f"{target}: exists and is not an earlier output")
    assert target.read_bytes() == before
    assert files_under(out) == ([] if name.endswith(".log") else [name])


@pytest.mark.parametrize("command", params("test_a_rerun_replaces_its_own_earlier_outputs"))
def test_a_rerun_replaces_its_own_earlier_outputs(run, tmp_path, capsys, command):
    """What a writer wrote, it replaces on a rerun (Snakemake's reruns, a user's)."""
    out = tmp_path / "out"
    code, err = run_cli(capsys, *writer_argv(run, command, out))
    assert code == 0, err
    first = files_under(out)
    assert first
    code, err = run_cli(capsys, *writer_argv(run, command, out))
    assert code == 0, err
    assert files_under(out) == first


@pytest.mark.parametrize(
    ("factors", "message"), params("test_spaceranger_png_with_broken_scale_factors_is_one_line")
)
def test_spaceranger_png_with_broken_scale_factors_is_one_line(run, tmp_path, capsys, factors,
                                                               message):  # fmt: skip
    """Space Ranger's hires PNG as the image, its scale factors unreadable or without its
    scale factor: one line naming scalefactors_json.json, no slide written."""
    from PIL import Image

    spatial = tmp_path / "spatial"
    spatial.mkdir()
    Image.new("RGB", (64, 64), "white").save(spatial / "tissue_hires_image.png")
    (spatial / "scalefactors_json.json").write_text(factors, encoding="utf-8")
    table = demo_rows(run).assign(spots="")
    table.loc[table["slide_id"] == "demo_1", "image"] = str(spatial / "tissue_hires_image.png")
    sheet = tmp_path / "samples.tsv"
    table.to_csv(sheet, sep="\t", index=False)
    out = tmp_path / "out" / "demo_1.h5ad"
    code, err = run_cli(capsys, "ingest", "--sample-sheet", sheet, "--slide-id", "demo_1",
                        "--out", out)  # fmt: skip
    assert_one_line_error(code, err, str(spatial / "scalefactors_json.json"), message)
    assert not out.exists()


def test_a_test_slide_without_a_prediction_is_not_scored(run, tmp_path, capsys):
    """A predictions folder lacking a test slide's file: the file is named, nothing scored."""
    empty = tmp_path / "pred"
    empty.mkdir()
    code, err = run_cli(capsys, *evaluate_argv(run, empty, tmp_path / "out"))
    assert_one_line_error(code, err, f"{empty / 'demo_1.h5ad'}: no prediction for test slide")
    assert files_under(tmp_path / "out") == []


# -- numbers nobody checks (issue 25) ----------------------------------------------------------

SCHEMA = Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml"
#: config key -> the option of the command its rule passes it to
CONFIG_OPTIONS = {
    "demo.seed": ("demo", "--seed"),
    "demo.n_slides": ("demo", "--n-slides"),
    "demo.size_um": ("demo", "--size-um"),
    "demo.mpp": ("demo", "--mpp"),
    "tiling.patch_px": ("tile", "--patch-px"),
    "tiling.patch_um": ("tile", "--patch-um"),
    "tiling.threads": ("tile", "--threads"),
    "encoders[].patch_px": ("tile", "--patch-px"),
    "encoders[].patch_um": ("tile", "--patch-um"),
    "folds.k": ("folds", "--k"),
    "folds.seed": ("folds", "--seed"),
    "folds.n_genes": ("folds", "--n-genes"),
    "folds.n_headline": ("folds", "--n-headline"),
    "training.epochs": ("train", "--epochs"),
    "training.batch_size": ("train", "--batch-size"),
    "training.seeds[]": ("train", "--seed"),
    "training.workers": ("train", "--workers"),
    "report.max_map_slides": ("report", "--max-map-slides"),
}


def _numeric_options() -> list[tuple[str, str, object]]:
    """(command, option, type) of every numeric option of every subcommand."""
    from stevs.cli import COMMANDS, command_parser
    from stevs.options import numeric_actions

    found = []
    for command in COMMANDS:
        _, parser = command_parser(command)
        found += [(command, a.option_strings[-1], a) for a in numeric_actions(parser)]
    return found


def test_every_numeric_option_states_its_range_in_its_help():
    from stevs.options import Number

    options = _numeric_options()
    assert len(options) > 40  # every command's, not an empty walk
    for command, option, action in options:
        assert isinstance(action.type, Number), (command, option, "a bare int/float")
        assert f"[{action.type.range}]" in action.help, (command, option)
        if action.default is not None:  # the default is within the range
            assert action.type.contains(action.default), (command, option, action.default)


def test_every_numeric_option_refuses_out_of_range_values(capsys):
    """NaN, infinity, just past each bound, a fraction for whole numbers: exit 2 and one
    line naming the option and its range, before any work (no other argument given)."""
    for command, option, action in _numeric_options():
        for text in action.type.outside():
            code, err = run_cli(capsys, command, f"{option}={text}")
            assert_one_line_error(code, err, f"argument {option}: must be {action.type.range}")


@pytest.mark.parametrize(
    ("argv", "message"), params("test_the_issues_numbers_are_refused_before_any_work")
)
def test_the_issues_numbers_are_refused_before_any_work(run, tmp_path, capsys, argv, message):
    """The cases of issue 25 on otherwise working command lines: nothing is written."""
    out = tmp_path / "out"
    code, err = run_cli(capsys, *commands(run, out)[argv[0]], *argv[1:])
    assert_one_line_error(code, err, message)
    assert files_under(out) == []


def _schema_numbers(node: object, where: str = "") -> list[tuple[str, dict]]:
    """(dotted key, schema) of every number or whole number of the config schema."""
    found = []
    if isinstance(node, dict):
        kinds = node.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if {"integer", "number"} & set(kinds):
            found.append((where, node))
        for key, value in node.get("properties", {}).items():
            found += _schema_numbers(value, f"{where}.{key}".lstrip("."))
        if "items" in node:
            found += _schema_numbers(node["items"], f"{where}[]")
    return found


def test_every_numeric_config_key_has_a_range_within_its_options():
    """Each number of the config has a lower bound; each passed to a `stevs` option accepts
    only values that option accepts (so the workflow stops at the config, not in a job)."""
    import yaml

    from stevs.cli import command_parser

    numbers = dict(_schema_numbers(yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))))
    assert len(numbers) >= 20
    for key, node in numbers.items():
        assert "minimum" in node or "exclusiveMinimum" in node, key
    for key, (command, option) in CONFIG_OPTIONS.items():
        node = numbers[key]
        _, parser = command_parser(command)
        kind = next(a.type for a in parser._actions if option in a.option_strings)
        lo = node.get("minimum", node.get("exclusiveMinimum"))
        assert kind.lo is None or lo >= kind.lo, (key, lo, kind.range)
        assert kind.lo_open <= (lo > kind.lo or "exclusiveMinimum" in node), key
        if kind.hi is not None:
            assert node.get("maximum", np.inf) <= kind.hi, (key, kind.range)


# -- inputs that look fine and are not (issue 25) ------------------------------------------------


@pytest.mark.parametrize(
    "layout", params("test_16_bit_tiff_of_12_bit_data_is_scaled_by_its_bit_depth")
)
def test_16_bit_tiff_of_12_bit_data_is_scaled_by_its_bit_depth(tmp_path, monkeypatch, layout):
    """A scanner's 12-bit samples in a 16-bit TIFF (white at 4095): was scaled by 65535,
    near-black patches (at most 16 of 255). Now the same pixels as the 8-bit image."""
    import tifffile

    import stevs.io.slide
    from stevs.io.slide import open_slide

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (128, 192, 3), dtype=np.uint8)
    rgb[:8] = 255  # glass
    twelve = np.round(rgb.astype(np.float64) * 4095 / 255).astype(np.uint16)
    path = tmp_path / "scan12.tif"
    extra = {"tile": (64, 64)} if layout.startswith("tiled") else {}
    if layout == "max-tag":  # the writer says so: MaxSampleValue 4095
        twelve[:8] = 3000  # the data alone would say 12 bits all the same; the tag decides
        extra = {"extratags": [(281, "H", 1, 4095, True)]}
        rgb[:8] = round(3000 * 255 / 4095)
    if layout == "tiled-sampled":  # a large level: the largest value of tiles spread over it
        monkeypatch.setattr(stevs.io.slide, "BIT_DEPTH_SAMPLE_PX", 64 * 64 * 2)
    tifffile.imwrite(path, twelve, photometric="rgb", **extra)
    with open_slide(path) as slide:
        pixels = slide.read_region((0, 0, 192, 128))
    assert np.abs(pixels.astype(int) - rgb).max() <= 1


def test_16_bit_png_of_12_bit_grey_is_scaled_by_its_bit_depth(tmp_path):
    from PIL import Image

    from stevs.io.slide import open_slide

    grey = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (16, 1))
    Image.fromarray(grey).save(tmp_path / "grey12.png")
    with open_slide(tmp_path / "grey12.png") as slide:
        pixels = slide.read_region((0, 0, 256, 16))
    expected = np.round(grey.astype(np.float64) * 255 / 4095)
    assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1


@pytest.mark.parametrize(
    ("rename", "message"), params("test_a_sample_sheet_column_typo_is_refused_with_did_you_mean")
)
def test_a_sample_sheet_column_typo_is_refused_with_did_you_mean(
    run, tmp_path, capsys, rename, message
):
    """`mmp` for `mpp` was ignored (mpp then came from the image's metadata), while the
    config refuses unknown keys. Columns of a user's own (notes, batch) still pass."""
    table = demo_rows(run).assign(mpp="2.0", spots="")
    sheet = tmp_path / "samples.tsv"
    table.rename(columns=rename).to_csv(sheet, sep="\t", index=False)
    out = tmp_path / "out" / "demo_1.h5ad"
    code, err = run_cli(capsys, "ingest", "--sample-sheet", sheet, "--slide-id", "demo_1",
                        "--out", out)  # fmt: skip
    assert_one_line_error(code, err, str(sheet), message)
    assert not out.exists()
    table.assign(notes="x", batch="b1", age="60", sample_id="s").to_csv(
        sheet, sep="\t", index=False
    )
    code, err = run_cli(capsys, "ingest", "--sample-sheet", sheet, "--slide-id", "demo_1",
                        "--out", out)  # fmt: skip
    assert code == 0, err


def test_a_predict_sheet_column_typo_is_refused(run, tmp_path, capsys):
    from stevs.io.samples import read_predict_sheet

    table = pd.read_csv(run["predict_sheet"], sep="\t", dtype=str, keep_default_na=False)
    sheet = tmp_path / "predict.tsv"
    table.assign(mpp="2.0").rename(columns={"mpp": "mmp"}).to_csv(sheet, sep="\t", index=False)
    with pytest.raises(StevsInputError, match="did you mean 'mpp'") as info:
        read_predict_sheet(sheet, check_paths=False)
    assert str(info.value).startswith(f"{sheet}: unknown column 'mmp'")


def test_never_detected_genes_do_not_fill_up_a_panel(caplog):
    """80 "highly variable" genes asked for, 49 ever detected: the panel filled up with 31
    genes of zero counts (no r, nothing to learn). Now: they never enter a panel, the log
    says how many were left out, and asking for more than qualify is an error saying so."""
    import scipy.sparse as sp

    from stevs.panels import TrainingCounts, choose_panel

    rng = np.random.default_rng(0)
    genes = [f"G{i:03d}" for i in range(80)]
    counts = rng.poisson(rng.gamma(0.5, 4.0, 80), (200, 80)).astype(np.float64)
    counts[:, 49:] = 0  # 31 genes no training spot detects
    counts[:, :49] += rng.random((200, 49)) < 0.02  # each of the others somewhere
    training = TrainingCounts(sp.csr_matrix(counts), np.full(200, 5000.0),
                              np.repeat(["a", "b"], 100), genes)  # fmt: skip
    slides = {"a": genes, "b": genes, "c": genes}
    with pytest.raises(StevsInputError, match="panel of 80 genes was requested but only 49") as err:
        choose_panel(training, slides, n_genes=80, n_headline=10, fold_label="fold0")
    assert "31 never are" in str(err.value) and "lower --n-genes" in str(err.value)
    with caplog.at_level(logging.INFO, logger="stevs.panels"):
        panel = choose_panel(training, slides, n_genes=49, n_headline=10, fold_label="fold0")
    assert set(panel.genes) == set(genes[:49])
    assert panel.info["dropped"]["never_detected"] == 31
    assert "fold0: 31 genes never detected in the 200 training spots are left out" in caplog.text
    for method in ("highly_expressed",):  # the other ranked panel, by its own rule
        panel = choose_panel(training, slides, method=method, n_genes=5, min_detection=0.0)
        assert not set(panel.genes) & set(genes[49:])
    with caplog.at_level(logging.WARNING, logger="stevs.panels"):  # a list is taken as given
        panel = choose_panel(training, slides, method="gene_list", gene_list=genes[45:55],
                             gene_list_path="genes.txt")  # fmt: skip
    assert panel.genes == genes[45:55]
    assert "genes.txt: 6 listed genes are never detected in the training spots" in caplog.text


@pytest.mark.parametrize("case", params("test_spots_partly_on_glass_are_refused"))
def test_spots_partly_on_glass_are_refused(run, tmp_path, capsys, case):
    """Coordinates at half scale, or a section's expression with another section's image:
    a share of the spots on glass, the rest on tissue. Was: exit 0 (the check fired only
    when most patches were background), a cache of patches that do not show the spots.
    (The demo's sections share their layout, so of their pairings only some show: demo_3's
    spots on demo_2's image, 27% off tissue; her2st's, in the test below, all do.)"""
    if case == "half-scale":
        adata = ad.read_h5ad(run["slide"])
        adata.obsm["spatial"] = adata.obsm["spatial"] * 0.5
        slide = tmp_path / "half.h5ad"
        adata.write_h5ad(slide)
    else:
        table = demo_rows(run)
        table.loc[table["slide_id"] == "demo_3", "image"] = table["image"][1]  # demo_2's
        sheet = tmp_path / "samples.tsv"
        table.to_csv(sheet, sep="\t", index=False)
        slide = tmp_path / "demo_3.h5ad"
        assert main(["ingest", "--sample-sheet", str(sheet), "--slide-id", "demo_3",
                     "--out", str(slide)]) == 0  # fmt: skip
    out = tmp_path / "out" / "demo_1.h5"
    code, err = run_cli(capsys, "tile", "--slide", slide, "--out", out,
                        "--patch-px", PATCH_PX, "--patch-um", PATCH_UM)  # fmt: skip
    assert_one_line_error(code, err, str(slide), "spot patches are background", "off tissue")
    assert files_under(tmp_path / "out") == []


# -- tracebacks or the wrong file named (issue 25) ---------------------------------------------


def test_a_patch_cache_of_another_slide_renamed_is_refused_naming_it(run, tmp_path, capsys):
    """demo_2's cache copied to demo_1.h5: Visium barcodes repeat across slides, so the
    rows matched and another slide's patches were trained on. The cache records its slide."""
    import shutil

    patches = tmp_path / "patches"
    patches.mkdir()
    for i in (2, 3):
        shutil.copy(run["patches"] / f"demo_{i}.h5", patches)
    shutil.copy(run["patches"] / "demo_2.h5", patches / "demo_1.h5")  # renamed
    argv = commands(run, tmp_path / "folds")["folds"]
    argv[argv.index("--patches-dir") + 1] = patches
    assert run_cli(capsys, *argv)[0] == 0
    fold = next(f for f in sorted((tmp_path / "folds").glob("fold*.json"))
                if "demo_1" in read_fold(f).train)  # fmt: skip
    out = tmp_path / "model"
    code, err = run_cli(capsys, "train", "--fold", fold, "--method", "ridge_color",
                        "--out", out, "--device", "cpu")  # fmt: skip
    assert_one_line_error(code, err, f"{patches / 'demo_1.h5'}: this is the patch cache of "
                          "slide 'demo_2', not of 'demo_1'")  # fmt: skip
    assert files_under(out) == []
    from stevs.io.patch_cache import PatchCache

    with pytest.raises(StevsInputError, match="patch cache of slide 'demo_2', not of 'demo_1'"):
        PatchCache(patches / "demo_1.h5", "demo_1")
    assert len(PatchCache(patches / "demo_2.h5", "demo_2")) > 0
