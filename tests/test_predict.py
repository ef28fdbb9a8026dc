"""Tests of stevs.predict, end to end through `stevs train` and `stevs predict` on tiny files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import add_he_images, assert_draws_over_he, write_patch_cache

from stevs import __version__
from stevs.cli import main
from stevs.data import SpotDataset
from stevs.errors import StevsInputError
from stevs.io.fold_file import Fold, SlideEntry, read_fold, write_fold
from stevs.io.prediction import read_manifest
from stevs.models import load_model
from stevs.panels import library_sizes, normalise
from stevs.predict import predict_fold, predict_patches

torch.set_num_threads(1)

GENES = [f"GENE{i}" for i in range(6)]
PATCH = 16


def write_slide(directory, slide: str, seed: int, n: int = 24) -> SlideEntry:
    """A slide AnnData + patch cache whose counts follow the patch darkness."""
    rng = np.random.default_rng(seed)
    darkness = rng.uniform(0, 1, n)
    patches = (
        np.array([200, 120, 180])[None, None, None, :] * (1 - 0.6 * darkness)[:, None, None, None]
        + rng.integers(0, 20, (n, PATCH, PATCH, 3))
    ).astype(np.uint8)
    rates = np.exp(1.0 + np.outer(darkness, np.linspace(-1.5, 1.5, len(GENES))))
    counts = rng.poisson(rates * 3).astype(np.int32)
    counts[:, 0] += 1  # no empty spots
    barcodes = [f"{slide}-{i:03d}" for i in range(n)]
    rows, cols = np.divmod(np.arange(n), 6)
    xy = np.stack([cols * 100.0 + 50, rows * 87.0 + 40], axis=1)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names = barcodes
    adata.var_names = GENES
    adata.obs["array_row"], adata.obs["array_col"] = rows, cols
    adata.obsm["spatial"] = xy
    adata.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(len(GENES))]
    adata.uns["stevs"] = {"slide": slide, "patient": slide, "mpp": 1.0}
    add_he_images(adata, slide, diameter_px=55.0)
    adata_path = directory / f"{slide}.h5ad"
    adata.write_h5ad(adata_path)
    patches_path = directory / f"{slide}.h5"
    write_patch_cache(patches_path, patches, barcodes, xy, mpp_target=64.0 / PATCH, slide=slide)
    return SlideEntry(slide=slide, patient=slide, adata=str(adata_path), patches=str(patches_path))


@pytest.fixture(scope="module")
def fold_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("study")
    entries = [write_slide(directory, s, seed) for seed, s in enumerate(["s0", "s1", "s2", "s3"])]
    train = ad.concat([ad.read_h5ad(entries[i].adata) for i in (0, 1)])
    counts = train.X.toarray()
    targets = normalise(counts, library_sizes(counts), "log1p_cp10k", 1e4)
    fold = Fold(
        fold="fold0",
        scheme="leave_one_slide_out",
        seed=0,
        train=["s0", "s1"],
        val=["s2"],
        test=["s3"],
        genes=GENES,
        headline_genes=GENES,
        panel={"method": "gene_list", "n": len(GENES)},
        normalisation={
            "method": "log1p_cp10k",
            "target_sum": 1e4,
            "mean": [float(v) for v in targets.mean(0)],
            "std": [float(v) for v in targets.std(0)],
        },
        slides=entries,
    )
    return write_fold(fold, directory / "fold0.json")


@pytest.fixture(scope="module")
def model_dir(fold_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    code = main(
        ["train", "--fold", str(fold_path), "--method", "stevs", "--preset", "cpu_small"]
        + ["--out", str(out), "--epochs", "2", "--batch-size", "8", "--workers", "0"]
        + ["--device", "cpu"]
    )
    assert code == 0
    return out


def test_train_cli_writes_the_model_folder(model_dir):
    for name in ("model.safetensors", "config.json", "metrics.csv", "train.log"):
        assert (model_dir / name).is_file(), name
    assert not (model_dir / "checkpoint.pt").exists()  # removed once the run finished
    model, config = load_model(model_dir)
    assert config["genes"] == GENES and config["method"] == "stevs"
    assert config["patch_px"] == 64 and config["mpp"] == 2.0
    assert model.config.use_image and model.config.use_spatial


def test_training_twice_with_one_seed_gives_the_same_weights(fold_path, model_dir, tmp_path):
    from safetensors.torch import load_file

    code = main(
        ["train", "--fold", str(fold_path), "--method", "stevs", "--preset", "cpu_small"]
        + ["--out", str(tmp_path / "again"), "--epochs", "2", "--batch-size", "8"]
        + ["--workers", "0", "--device", "cpu"]
    )
    assert code == 0
    first = load_file(model_dir / "model.safetensors")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_predict_cli_writes_one_contract_anndata_per_test_slide(fold_path, model_dir, tmp_path):
    out = tmp_path / "pred"
    code = main(
        ["predict", "--model-dir", str(model_dir), "--fold", str(fold_path)]
        + ["--out-dir", str(out), "--device", "cpu", "--samples", "4"]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["predictions.tsv", "s3.h5ad"]
    prediction = ad.read_h5ad(out / "s3.h5ad")
    source = ad.read_h5ad(read_fold(fold_path).slide_entry("s3").adata)
    assert list(prediction.var_names) == GENES
    assert list(prediction.obs_names) == list(source.obs_names)
    np.testing.assert_array_equal(prediction.obsm["spatial"], source.obsm["spatial"])
    np.testing.assert_array_equal(prediction.obs["array_row"], source.obs["array_row"])
    assert np.isfinite(prediction.X).all()
    assert (prediction.layers["std"] > 0).all()
    meta = prediction.uns["stevs"]
    assert (meta["method"], meta["fold"], meta["slide"]) == ("stevs", "fold0", "s3")
    sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert meta["model_sha256"] == sha
    assert meta["normalisation"]["method"] == "log1p_cp10k"
    assert meta["stevs_version"] == __version__
    # predictions are in log1p_cp10k units: near the training mean, not standardised ~0
    train_mean = np.array(read_fold(fold_path).normalisation["mean"])
    assert np.abs(prediction.X.mean(0) - train_mean).max() < 2.0
    # the slide's gene ids and H&E images travel with the prediction: scanpy draws it
    assert list(prediction.var["gene_ids"]) == list(source.var["gene_ids"])
    images = prediction.uns["spatial"]["s3"]["images"]
    # the slide's lowres, under both keys (hires: scanpy's default): files stay small
    assert sorted(images) == ["hires", "lowres"]
    for key in images:
        np.testing.assert_array_equal(images[key], source.uns["spatial"]["s3"]["images"]["lowres"])
    assert_draws_over_he(prediction, GENES[0])


def test_predict_patches_from_arrays_equals_the_dataset_path(fold_path, model_dir):
    model, _ = load_model(model_dir)
    dataset = SpotDataset(fold_path, "test")
    mean_ds, _ = predict_patches(model, dataset, n_samples=0, progress=False)
    patches = np.stack([dataset[i]["patch"].permute(1, 2, 0).numpy() for i in range(len(dataset))])
    mean_arr, std_arr = predict_patches(model, patches, dataset.coords, n_samples=0, progress=False)
    np.testing.assert_allclose(mean_arr, mean_ds, rtol=1e-5, atol=1e-5)
    assert mean_arr.shape == std_arr.shape == (len(dataset), len(GENES))
    with pytest.raises(ValueError, match="coords"):
        predict_patches(model, patches, None, progress=False)
    dataset.close()


def test_predict_refuses_a_missing_model_and_another_panel(fold_path, model_dir, tmp_path):
    with pytest.raises(StevsInputError, match="config.json"):
        load_model(tmp_path)
    assert (
        main(
            [
                "predict",
                "--model-dir",
                str(tmp_path),
                "--fold",
                str(fold_path),
                "--out-dir",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    fold = read_fold(fold_path)
    fold.genes = list(reversed(fold.genes))
    with pytest.raises(StevsInputError, match="gene panel"):
        predict_fold(model_dir, fold, tmp_path / "p")


# -- silent failures made loud -------------------------------------------------------------


def _predict(model_dir, fold_path, out, *extra):
    return main(
        ["predict", "--model-dir", str(model_dir), "--fold", str(fold_path)]
        + ["--out-dir", str(out), "--device", "cpu", "--samples", "4", *extra]
    )


def _copy_model(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model_copy"
    shutil.copytree(model_dir, copy)
    return copy


def test_patches_at_another_scale_are_refused_naming_both(fold_path, model_dir, tmp_path, capsys):
    import json

    copy = _copy_model(model_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    assert config["patches"] == {"patch_px": PATCH, "mpp_target": 4.0, "patch_um": 64.0}
    config["patches"] = {"patch_px": PATCH, "mpp_target": 8.0, "patch_um": 128.0}
    (copy / "config.json").write_text(json.dumps(config))
    assert _predict(copy, fold_path, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "s3.h5: patches are 16 px at 4 µm/px" in error and "trained on 16 px at 8" in error
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_corrupt_weights_give_an_error_and_no_file(fold_path, model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    copy = _copy_model(model_dir, tmp_path)
    weights = load_file(copy / "model.safetensors")
    name = next(k for k in weights if k.startswith("decoder") and weights[k].is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, copy / "model.safetensors")
    assert _predict(copy, fold_path, tmp_path / "out") == 2
    assert "NaN or infinite values" in capsys.readouterr().err
    assert not (tmp_path / "out" / "s3.h5ad").exists()


def test_the_prediction_folder_holds_the_predictions_and_their_list_only(
    fold_path, model_dir, tmp_path
):
    """What the workflow's run_fold rule declares is predictions.tsv, a file: the folder
    holds the prediction files and that list, nothing of Snakemake's."""
    assert _predict(model_dir, fold_path, tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.tsv", "s3.h5ad"]
    assert read_manifest(tmp_path / "out" / "predictions.tsv") == {
        "s3": tmp_path / "out" / "s3.h5ad"
    }
    folder = Path(__file__).resolve().parents[1] / "workflow" / "rules"
    rules = (folder / "model.smk").read_text()
    output = rules.split("rule run_fold:", 1)[1].split("output:", 1)[1].split("log:", 1)[0]
    output = "".join(line.split("#")[0] for line in output.splitlines())
    assert "directory(" not in output and "run_outputs(" in output
    common = (folder / "common.smk").read_text()
    outputs = common.split("def run_outputs(", 1)[1].split("\ndef ", 1)[0]
    listed = '"{results}/predictions/{run}/{{fold}}/predictions.tsv"'
    assert "directory(" not in outputs and listed in outputs


def test_predictions_are_byte_identical_on_rerun(fold_path, model_dir, tmp_path):
    digests = []
    for name in ("a", "b"):
        assert _predict(model_dir, fold_path, tmp_path / name) == 0
        digests.append(hashlib.sha256((tmp_path / name / "s3.h5ad").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("device", ["quantum", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_a_device_the_machine_lacks_is_one_clear_line(
    fold_path, model_dir, tmp_path, capsys, device
):
    code = main(
        ["predict", "--model-dir", str(model_dir), "--fold", str(fold_path)]
        + ["--out-dir", str(tmp_path / "out"), "--device", device]
    )
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"--device {device}" in error[0]


def test_batch_size_zero_is_one_clear_line(fold_path, model_dir, tmp_path, capsys):
    assert _predict(model_dir, fold_path, tmp_path / "out", "--batch-size", "0") == 2
    assert "argument --batch-size: must be a whole number >= 1" in capsys.readouterr().err
