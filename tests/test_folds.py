"""Leakage-free folds (stevs.fold_plan, stevs.folds): planning, blocks, panels, fold files."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist

from stevs.cli import main as stevs_main
from stevs.errors import StevsInputError
from stevs.fold_plan import (
    TEST,
    TRAIN,
    VAL,
    SlideBlocks,
    fold_names,
    plan_folds,
    within_slice_labels,
)
from stevs.folds import FoldOptions, make_folds
from stevs.io.fold_file import read_fold, write_fold
from stevs.io.samples import read_fixed_splits

MPP = 0.5
PITCH_UM = 100.0
PITCH_PX = PITCH_UM / MPP


def hex_grid(n_rows: int = 16, n_cols: int = 16) -> np.ndarray:
    """Visium-like spot centres (x, y) in px: rows offset by half a pitch."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = 500 + cols * PITCH_PX + (rows % 2) * PITCH_PX / 2
    y = 700 + rows * PITCH_PX * np.sqrt(3) / 2
    return np.column_stack([x.ravel(), y.ravel()])


def write_slide(
    path: Path, slide: str, patient: str, seed: int, n_genes: int = 150, drop: int = 0
) -> Path:
    """A small slide AnnData following the contract: MT-/RPL genes, a spatial gradient gene."""
    rng = np.random.default_rng(seed)
    coords = hex_grid()
    genes = ["MT-CO1", "MT-ND1", "RPL3", "RPS6"] + [f"G{i:03d}" for i in range(n_genes)]
    means = np.concatenate([[30.0, 20.0, 25.0, 20.0], rng.gamma(0.8, 2.5, n_genes)])
    lam = np.tile(means, (len(coords), 1))
    lam[:, 4] *= 0.2 + 3 * (coords[:, 0] - coords[:, 0].min()) / np.ptp(coords[:, 0])
    counts = rng.poisson(lam).astype(np.float32)
    keep = len(genes) - drop
    adata = ad.AnnData(
        X=sp.csr_matrix(counts[:, :keep]),
        obs=pd.DataFrame(index=[f"{slide}-{i:04d}" for i in range(len(coords))]),
        var=pd.DataFrame(index=genes[:keep]),
    )
    adata.obsm["spatial"] = coords
    adata.uns["stevs"] = {
        "slide": slide,
        "patient": patient,
        "mpp": MPP,
        "spot_pitch_um": PITCH_UM,
        "spot_diameter_um": 55.0,
    }
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Four slides: patients P1 (two sections), P2, P3."""
    root = tmp_path_factory.mktemp("slides")
    table = [("a", "P1"), ("b", "P1"), ("c", "P2"), ("d", "P3")]
    return [write_slide(root / f"{s}.h5ad", s, p, seed=i) for i, (s, p) in enumerate(table)]


SLIDE_IDS = ["a", "b", "c", "d", "e"]
PATIENTS = ["P1", "P1", "P2", "P3", "P3"]


@pytest.mark.parametrize("scheme", ["leave_one_slide_out", "leave_one_patient_out", "group_kfold"])
def test_every_slide_is_tested_once_and_val_comes_from_training(scheme: str) -> None:
    plans = plan_folds(scheme, SLIDE_IDS, PATIENTS, k=2, seed=3)
    assert [p.name for p in plans] == fold_names(scheme, SLIDE_IDS, PATIENTS, k=2)
    tested = [s for p in plans for s in p.test]
    assert sorted(tested) == sorted(SLIDE_IDS)
    patient_of = dict(zip(SLIDE_IDS, PATIENTS, strict=True))
    for plan in plans:
        assert not set(plan.val) & set(plan.test)
        assert not set(plan.train) & set(plan.test)
        assert set(plan.train) | set(plan.val) | set(plan.test) == set(SLIDE_IDS)
        if plan.validation != "blocks":
            assert not set(plan.train) & set(plan.val)
        if scheme != "leave_one_slide_out":
            test_patients = {patient_of[s] for s in plan.test}
            assert not test_patients & {patient_of[s] for s in plan.train + plan.val}
    assert plans == plan_folds(scheme, SLIDE_IDS, PATIENTS, k=2, seed=3)


def test_fold_counts_and_names_come_from_the_sample_sheet_alone() -> None:
    assert fold_names("leave_one_slide_out", SLIDE_IDS, PATIENTS) == [f"fold{i}" for i in range(5)]
    assert len(fold_names("leave_one_patient_out", SLIDE_IDS, PATIENTS)) == 3
    assert len(fold_names("group_kfold", SLIDE_IDS, PATIENTS, k=2)) == 2
    assert len(fold_names("within_slice", ["a"], ["P1"], k=4)) == 4
    loso = plan_folds("leave_one_slide_out", SLIDE_IDS, PATIENTS)
    assert [p.test for p in loso] == [(s,) for s in SLIDE_IDS]  # sample-sheet order


def test_group_kfold_depends_on_seed_only() -> None:
    patients = [f"P{i}" for i in range(8)]
    slide_ids = [f"s{i}" for i in range(8)]
    by_seed = {
        seed: [p.test for p in plan_folds("group_kfold", slide_ids, patients, k=4, seed=seed)]
        for seed in range(6)
    }
    assert len({tuple(v) for v in by_seed.values()}) > 1
    assert by_seed[2] == [p.test for p in plan_folds("group_kfold", slide_ids, patients, 4, 2)]
    assert all(len(test) == 2 for test in by_seed[0])


def test_validation_is_a_patient_a_slide_or_blocks() -> None:
    lopo = plan_folds("leave_one_patient_out", ["a", "b", "c"], ["P1", "P2", "P3"])
    assert {p.validation for p in lopo} == {"patient"}
    one_patient_left = plan_folds("leave_one_patient_out", ["a", "b", "c"], ["P1", "P1", "P2"])
    assert one_patient_left[1].validation == "slide"  # P1's two sections remain for training
    two = plan_folds("leave_one_slide_out", ["a", "b"], ["P1", "P2"])
    assert [(p.train, p.val, p.validation) for p in two] == [
        (("b",), ("b",), "blocks"),
        (("a",), ("a",), "blocks"),
    ]


def test_schemes_that_cannot_work_say_why() -> None:
    with pytest.raises(StevsInputError, match="at least 2 patients"):
        plan_folds("leave_one_patient_out", ["a", "b"], ["P1", "P1"])
    with pytest.raises(StevsInputError, match="k=4 needs at least 4 patients"):
        fold_names("group_kfold", SLIDE_IDS, PATIENTS, k=4)
    with pytest.raises(StevsInputError, match="at least 2 slides"):
        plan_folds("leave_one_slide_out", ["a"], ["P1"])
    with pytest.raises(StevsInputError, match="unique"):
        plan_folds("leave_one_slide_out", ["a", "a"], ["P1", "P2"])
    with pytest.raises(StevsInputError, match="unknown fold scheme"):
        plan_folds("random_spots", ["a", "b"], ["P1", "P2"])


def test_within_slice_blocks_keep_a_buffer_and_test_every_spot_once() -> None:
    coords = hex_grid(20, 20)
    folds = within_slice_labels(coords, SlideBlocks(PITCH_PX, 4 * PITCH_PX, 1, "a"), k=3)
    assert len(folds) == 3
    times_tested = np.sum([labels == TEST for labels in folds], axis=0)
    np.testing.assert_array_equal(times_tested, 1)
    for labels in folds:
        test, train, val = coords[labels == TEST], coords[labels == TRAIN], coords[labels == VAL]
        assert len(test) and len(train) and len(val)
        assert cdist(train, test).min() > PITCH_PX
        assert cdist(val, test).min() > PITCH_PX
        assert cdist(train, val).min() > PITCH_PX
    again = within_slice_labels(coords, SlideBlocks(PITCH_PX, 4 * PITCH_PX, 1, "a"), k=3)
    assert all(np.array_equal(x, y) for x, y in zip(folds, again, strict=True))
    other = within_slice_labels(coords, SlideBlocks(PITCH_PX, 4 * PITCH_PX, 2, "a"), k=3)
    assert not all(np.array_equal(x, y) for x, y in zip(folds, other, strict=True))
    with pytest.raises(StevsInputError, match="smaller --block-um"):
        within_slice_labels(coords, SlideBlocks(PITCH_PX, 1e5, 1, "a"), k=3)


def test_make_folds_writes_fold_files_that_load_back(slides, tmp_path) -> None:
    options = FoldOptions(scheme="leave_one_patient_out", panel="highly_variable", n_genes=40)
    folds = make_folds(slides, "results/patches", tmp_path, options)
    assert [f.fold for f in folds] == ["fold0", "fold1", "fold2"]
    assert [f.test for f in folds] == [["a", "b"], ["c"], ["d"]]
    summary = pd.read_csv(tmp_path / "folds.tsv", sep="\t")
    assert summary["fold"].tolist() == ["fold0", "fold1", "fold2"]
    assert summary["n_test_spots"].tolist() == [512, 256, 256]
    for fold in folds:
        loaded = read_fold(tmp_path / f"{fold.fold}.json")
        assert loaded == fold
        assert len(loaded.genes) == 40 and len(loaded.headline_genes) == 40
        assert loaded.headline_genes == loaded.genes[:40]
        assert not [g for g in loaded.genes if g.startswith(("MT-", "RPL", "RPS"))]
        assert len(loaded.normalisation["mean"]) == 40
        assert loaded.slide_entry("c").patches == str(Path("results/patches") / "c.h5")
        assert loaded.shared_patients == []
        assert loaded.panel["training_slides"] == sorted(loaded.train)
    assert not list(tmp_path.glob(".*tmp*"))
    make_folds(slides, "results/patches", tmp_path / "again", options)
    for name in ("fold0.json", "fold1.json", "fold2.json", "folds.tsv"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_changing_test_counts_changes_neither_panel_nor_normalisation(slides, tmp_path) -> None:
    options = FoldOptions(scheme="leave_one_slide_out", panel="highly_variable", n_genes=30)
    before = make_folds(slides, "p", tmp_path / "before", options)[0]
    assert before.test == ["a"]
    changed = tmp_path / "changed"
    changed.mkdir()
    paths = [write_slide(changed / "a.h5ad", "a", "P1", seed=99)] + slides[1:]
    after = make_folds(paths, "p", tmp_path / "after", options)[0]
    assert (after.genes, after.headline_genes) == (before.genes, before.headline_genes)
    assert after.normalisation == before.normalisation
    # the same change to a training slide does move the panel: the comparison can fail
    paths = [slides[0], write_slide(changed / "b.h5ad", "b", "P1", seed=99)] + slides[2:]
    moved = make_folds(paths, "p", tmp_path / "moved", options)[0]
    assert moved.normalisation["mean"] != before.normalisation["mean"]
    assert moved.genes != before.genes


def test_loso_records_patients_on_both_sides(slides, tmp_path) -> None:
    options = FoldOptions(scheme="leave_one_slide_out", panel="highly_expressed", n_genes=20)
    folds = make_folds(slides, "p", tmp_path, options)
    assert folds[0].shared_patients == ["P1"]  # b (same patient) trains while a is tested
    assert folds[2].shared_patients == []


def test_within_slice_fold_files_split_spots_with_a_buffer(slides, tmp_path) -> None:
    options = FoldOptions(scheme="within_slice", k=3, panel="highly_expressed", n_genes=25)
    folds = make_folds(slides[:2], "p", tmp_path, options)
    coords = dict(zip([f"a-{i:04d}" for i in range(256)], hex_grid(), strict=True))
    tested: list[str] = []
    for fold in folds:
        fold = read_fold(fold.path)
        spots = fold.spots
        assert fold.train == fold.val == fold.test == ["a", "b"]
        assert fold.n_spots["test"] == sum(len(v) for v in spots["test"].values())
        assert not set(spots["val"]["a"]) & set(spots["test"]["a"])
        train_xy = np.array([coords[b] for b in spots["train"]["a"]])
        test_xy = np.array([coords[b] for b in spots["test"]["a"]])
        assert cdist(train_xy, test_xy).min() > PITCH_PX
        tested += spots["test"]["a"]
    assert sorted(tested) == sorted(coords)
    # changing only the test spots' counts leaves the panel and statistics as they were
    adata = ad.read_h5ad(slides[0])
    test_rows = adata.obs_names.isin(folds[0].spots["test"]["a"])
    dense = adata.X.toarray()
    dense[test_rows] = np.random.default_rng(5).poisson(50, size=dense[test_rows].shape)
    adata.X = sp.csr_matrix(dense)
    adata.write_h5ad(tmp_path / "a.h5ad")
    again = make_folds([tmp_path / "a.h5ad", slides[1]], "p", tmp_path / "again", options)[0]
    assert (again.genes, again.normalisation) == (folds[0].genes, folds[0].normalisation)
    assert again.spots == folds[0].spots


def test_single_training_slide_gets_validation_blocks(slides, tmp_path) -> None:
    options = FoldOptions(scheme="leave_one_slide_out", panel="highly_expressed", n_genes=20)
    fold = make_folds([slides[0], slides[2]], "p", tmp_path, options)[0]
    assert (fold.train, fold.val, fold.test, fold.validation) == (["c"], ["c"], ["a"], "blocks")
    assert set(fold.spots) == {"train", "val"}
    assert not set(fold.spots["train"]["c"]) & set(fold.spots["val"]["c"])
    assert fold.n_spots["test"] == 256
    assert fold.normalisation["n_spots"] == len(fold.spots["train"]["c"]) < 256


def test_gene_list_and_panel_size_errors(slides, tmp_path) -> None:
    partial = write_slide(tmp_path / "e.h5ad", "e", "P4", seed=7, drop=20)
    gene_file = tmp_path / "genes.txt"
    gene_file.write_text("G001\nG149\n")
    options = FoldOptions(scheme="leave_one_slide_out", panel="gene_list", gene_list=gene_file)
    with pytest.raises(StevsInputError, match=rf"^{gene_file}: .*e lacks G149"):
        make_folds([slides[0], partial], "p", tmp_path / "x", options)
    fold = make_folds(slides[:2], "p", tmp_path / "ok", options)[0]
    assert fold.genes == ["G001", "G149"] and fold.panel["gene_list"] == str(gene_file)
    too_many = FoldOptions(scheme="leave_one_slide_out", n_genes=1000)
    # one of the 150 genes no training spot detects: it does not qualify
    with pytest.raises(StevsInputError, match=r"1000 genes was requested but only 149 .*1 never"):
        make_folds(slides[:2], "p", tmp_path / "y", too_many)


def test_read_fold_rejects_broken_or_leaky_files(slides, tmp_path) -> None:
    options = FoldOptions(scheme="leave_one_patient_out", panel="highly_expressed", n_genes=10)
    fold = make_folds(slides, "p", tmp_path, options)[1]
    data = json.loads(Path(fold.path).read_text())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StevsInputError, match=rf"^{bad}: not a valid fold file"):
        read_fold(bad)
    for change, message in [
        ({"val": data["test"]}, "in both val and test"),
        ({"genes": [*data["genes"], "EXTRA"]}, "one number per panel gene"),
        ({"scheme": "random"}, "unknown scheme"),
        ({"test": ["zz"]}, "not in slides"),
    ]:
        bad.write_text(json.dumps({**data, **change}))
        with pytest.raises(StevsInputError, match=message):
            read_fold(bad)
    del data["genes"]
    bad.write_text(json.dumps(data))
    with pytest.raises(StevsInputError, match="lacks genes"):
        read_fold(bad)
    copy = write_fold(fold, tmp_path / "copy.json")
    assert read_fold(copy) == fold


def test_cli_writes_folds_and_reports_errors(slides, tmp_path, capsys) -> None:
    out = tmp_path / "folds"
    argv = ["folds", "--slides", *map(str, slides), "--out-dir", str(out)]
    argv += ["--patches-dir", str(tmp_path)]
    assert stevs_main([*argv, "--scheme", "group_kfold", "--k", "2", "--n-genes", "20"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fold0.json", "fold1.json", "folds.tsv"]
    assert read_fold(out / "fold0.json").panel["method"] == "highly_variable"
    assert stevs_main([*argv, "--scheme", "group_kfold", "--k", "5"]) == 2
    assert "k=5 needs at least 5 patients" in capsys.readouterr().err


# -- scheme fixed: a sheet's split column or HEST-Benchmark's split files -----------------------


def test_fixed_splits_from_a_sheet_column(slides, tmp_path) -> None:
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("slide_id\tsplit\na\ttrain\nb\ttrain\nc\tval\nd\ttest\n")
    folds = make_folds(
        slides, "p", tmp_path / "f", FoldOptions(scheme="fixed", n_genes=20, splits=str(sheet))
    )
    assert len(folds) == 1
    fold = read_fold(tmp_path / "f" / "fold0.json")
    assert (fold.train, fold.val, fold.test) == (["a", "b"], ["c"], ["d"])
    assert fold.scheme == "fixed" and fold.validation == "slide"
    # no val given: a training patient validates, as in the other schemes
    sheet.write_text("slide_id\tsplit\na\ttrain\nb\ttrain\nc\ttrain\nd\ttest\n")
    (plan,) = plan_folds(
        "fixed",
        list("abcd"),
        ["P1", "P1", "P2", "P3"],
        splits=read_fixed_splits(sheet, list("abcd")),
    )
    assert set(plan.train) | set(plan.val) == {"a", "b", "c"} and plan.test == ("d",)
    assert plan.validation == "patient" and not set(plan.train) & set(plan.val)
    with pytest.raises(StevsInputError, match="samples.tsv: 1 slide.*not in the sample sheet"):
        sheet.write_text("slide_id\tsplit\na\ttrain\nz\ttest\n")
        read_fixed_splits(sheet, list("abcd"))
    with pytest.raises(StevsInputError, match="samples.tsv: no test slide"):
        sheet.write_text("slide_id\tsplit\na\ttrain\nb\tval\n")
        read_fixed_splits(sheet, list("abcd"))


def test_fixed_splits_from_hest_benchmark_split_files(slides, tmp_path) -> None:
    splits = tmp_path / "splits"
    splits.mkdir()
    header = "sample_id,patches_path,expr_path\n"  # HEST-Benchmark's columns
    for i, (train, test) in enumerate([("abc", "d"), ("abd", "c")]):
        rows = "".join(f"{s},patches/{s}.h5,adata/{s}.h5ad\n" for s in train)
        (splits / f"train_{i}.csv").write_text(header + rows)
        (splits / f"test_{i}.csv").write_text(
            header + f"{test},patches/{test}.h5,adata/{test}.h5ad\n"
        )
    assert (
        stevs_main(
            [
                "folds",
                "--slides",
                *map(str, slides),
                "--scheme",
                "fixed",
                "--splits",
                str(splits),
                "--n-genes",
                "20",
                "--patches-dir",
                str(tmp_path),
                "--out-dir",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    folds = [read_fold(tmp_path / "f" / f"fold{i}.json") for i in range(2)]
    assert [f.test for f in folds] == [["d"], ["c"]]
    assert [sorted(f.train + f.val) for f in folds] == [["a", "b", "c"], ["a", "b", "d"]]
    (splits / "test_1.csv").unlink()
    with pytest.raises(StevsInputError, match="test_1.csv: split 1 has a train_1.csv but no"):
        read_fixed_splits(splits, list("abcd"))
