"""``stevs hest-bench`` on a miniature HEST-Benchmark folder (the published layout: 2 tasks,
3 samples, 2 splits, a few genes), its numbers checked against HEST's formulas computed here
independently (sklearn PCA + Ridge, scipy pearsonr); and the frozen embedding pass at
encoder scale (precision, workers, channels-last)."""

from __future__ import annotations

import argparse
import json
import re
import runpy
from dataclasses import replace
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from scipy import sparse
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from stevs.cli import main
from stevs.device import resolve_precision
from stevs.embed import (
    DEFAULT_BATCH,
    MAX_BATCH,
    MIN_BATCH,
    auto_batch_size,
    batch_size_for_memory,
    batch_size_option,
    embed_patches,
)
from stevs.io.patch_cache import HestPatchFile
from stevs.models import ImageBackbone, get_preset
from stevs.models.presets import ENCODERS, IMAGENET, PRESETS, scaled_down

torch.set_num_threads(1)

PX = 32  # patch side of the miniature (the tiny ViT's input: 2 x 16 px patches)
GENES = ["G0", "G1", "G2", "G3"]  # var_50genes.json; the AnnData has two more
SAMPLES = ["S0", "S1", "S2"]
SPLITS = [(["S0", "S1"], ["S2"]), (["S1", "S2"], ["S0"])]
LATENT = 8


def tiny_uni() -> tuple[str, object]:
    """UNI's recipe at a tiny depth and width (random weights): the scaled-down preset."""
    tiny = scaled_down(ENCODERS["uni"].backbone)
    assert tiny.img_size == PX
    return "tiny_uni", replace(PRESETS["uni"], name="tiny_uni", backbone=tiny, patch_px=PX)


def write_sample(task: Path, sample: str, rng: np.random.Generator) -> None:
    """``patches/{sample}.h5`` (img, barcode, coords as HEST writes them) and
    ``adata/{sample}.h5ad`` (counts driven by the patches' colour, spots in another order)."""
    side = 6
    n = side * side
    img = rng.integers(0, 256, (n, PX, PX, 3), dtype=np.uint8)
    barcodes = [f"{sample}_{i:03d}" for i in range(n)]
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
    with h5py.File(task / "patches" / f"{sample}.h5", "w") as f:
        f["img"] = img
        f["barcode"] = np.array(barcodes, dtype="S").reshape(-1, 1)
        f["coords"] = (grid * 200 + 1000).astype(np.int64)
    colour = img.reshape(n, -1, 3).mean(1) / 255.0
    rate = np.exp(1.0 + colour @ rng.normal(0, 2, (3, len(GENES) + 2)))
    counts = rng.poisson(rate).astype(np.float32)
    order = rng.permutation(n)
    adata = ad.AnnData(
        sparse.csr_matrix(counts[order]),
        obs=pd.DataFrame(index=[barcodes[i] for i in order]),
        var=pd.DataFrame(index=["EXTRA1", *GENES, "EXTRA2"]),
    )
    adata.write_h5ad(task / "adata" / f"{sample}.h5ad")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A bench_data folder: tasks IDC and PRAD, the published file layout."""
    root = tmp_path_factory.mktemp("bench_data")
    rng = np.random.default_rng(0)
    for task_name in ("IDC", "PRAD"):
        task = root / task_name
        for sub in ("splits", "patches", "adata"):
            (task / sub).mkdir(parents=True)
        for sample in SAMPLES:
            write_sample(task, sample, rng)
        (task / "var_50genes.json").write_text(json.dumps({"genes": GENES}))
        for i, (train, test) in enumerate(SPLITS):
            for kind, ids in (("train", train), ("test", test)):
                pd.DataFrame({
                    "sample_id": ids,
                    "patches_path": [f"patches/{s}.h5" for s in ids],
                    "expr_path": [f"adata/{s}.h5ad" for s in ids],
                }).to_csv(task / "splits" / f"{kind}_{i}.csv", index=False)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[object, Path]:
    """The tiny preset (registered for the module) and a random weight file for it."""
    name, preset = tiny_uni()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_uni.safetensors"
    state = ImageBackbone(preset.backbone).body.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    PRESETS[name] = preset
    yield preset, path
    del PRESETS[name]


def hest_reference(task: Path, backbone: ImageBackbone) -> list[tuple[float, np.ndarray]]:
    """HEST's numbers, written out from its code: per split (mean r, per-gene r)."""
    emb, target = {}, {}
    for sample in SAMPLES:
        with h5py.File(task / "patches" / f"{sample}.h5") as f:
            img, barcodes = f["img"][()], f["barcode"][()].flatten().astype(str).tolist()
        x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255  # ToTensor
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)  # Normalize
        with torch.no_grad():
            emb[sample] = backbone((x - mean) / std, normalised=True).numpy()
        adata = ad.read_h5ad(task / "adata" / f"{sample}.h5ad")[barcodes][:, GENES]
        target[sample] = np.log1p(adata.X.toarray().astype(np.float64))
    out = []
    for train, test in SPLITS:
        x_train = np.concatenate([emb[s] for s in train])
        x_test = np.concatenate([emb[s] for s in test])
        y_train = np.concatenate([target[s] for s in train])
        y_test = np.concatenate([target[s] for s in test])
        pipe = Pipeline([("scaler", StandardScaler()),
                         ("PCA", PCA(n_components=LATENT, random_state=1))])  # fmt: skip
        x_train = torch.Tensor(pipe.fit_transform(x_train))
        x_test = torch.Tensor(pipe.transform(x_test))
        alpha = 100 / (x_train.shape[1] * y_train.shape[1])
        reg = Ridge(solver="lsqr", alpha=alpha, random_state=1, fit_intercept=False,
                    max_iter=1000).fit(x_train, y_train)  # fmt: skip
        pred = reg.predict(x_test)
        r = np.array([pearsonr(y_test[:, g], pred[:, g])[0] for g in range(len(GENES))])
        out.append((float(np.mean(r)), r))
    return out


def test_hest_bench_reproduces_hests_formulas_with_stevs_beside(bench, weights, tmp_path):
    preset, path = weights
    out = tmp_path / "hest"
    args = ["hest-bench", "--bench-dir", str(bench), "--encoder", preset.name, "--weights",
            str(path), "--out", str(out), "--latent-dim", str(LATENT), "--stevs-epochs", "2",
            "--device", "cpu", "--batch-size", "16"]  # fmt: skip
    assert main(args) == 0
    per_split = pd.read_csv(out / "per_split.tsv", sep="\t")
    per_gene = pd.read_csv(out / "per_gene.tsv", sep="\t")
    backbone = ImageBackbone(get_preset(preset.name, weights=str(path)).backbone).eval()
    hest = pd.read_csv(out / "dataset_results.csv", index_col=0)
    table = pd.read_csv(out / "hest_bench.tsv", sep="\t", index_col="task")
    for task in ("IDC", "PRAD"):
        reference = hest_reference(bench / task, backbone)
        ours = per_split[(per_split.task == task) & (per_split.method == preset.name)]
        assert list(ours.split) == [0, 1] and list(ours.n_test) == [36, 36]
        for split, (mean, r) in enumerate(reference):
            genes = per_gene[(per_gene.task == task) & (per_gene.method == preset.name)
                             & (per_gene.split == split)]  # fmt: skip
            np.testing.assert_allclose(genes.pearson_r, r, atol=1e-5)
            assert ours.pearson_mean.iloc[split] == pytest.approx(mean, abs=1e-5)
        means = [m for m, _ in reference]
        row = hest[hest.dataset == task].iloc[0]
        assert row[f"{preset.name}_mean"] == pytest.approx(np.mean(means), abs=1e-5)
        assert row[f"{preset.name}_std"] == pytest.approx(np.std(means), abs=1e-5)
        assert table.at[task, preset.name] == f"{np.mean(means):.4f} ± {np.std(means):.4f}"
        stevs = per_split[(per_split.task == task) & (per_split.method == f"{preset.name}+stevs")]
        assert len(stevs) == 2 and np.isfinite(stevs.pearson_mean).all()
        assert (out / "models" / preset.name / task / "split1" / "model.safetensors").is_file()
    average = np.mean([hest[f"{preset.name}_mean"]])
    assert table.at["Average", preset.name] == f"{average:.4f}"
    run = json.loads((out / "run.json").read_text())
    assert run["tasks"] == ["IDC", "PRAD"] and run["options"]["latent_dim"] == LATENT
    board = (out / "leaderboard.md").read_text().splitlines()
    assert board[0] == "| Model | IDC | PRAD | Average |"
    assert board[2].startswith(f"| {preset.name} | ") and board[3].startswith("| tiny_uni+stevs")
    # a rerun reuses the finished STevs models (not retrained): the same numbers
    model = out / "models" / preset.name / "IDC" / "split0" / "model.safetensors"
    written = model.stat().st_mtime_ns
    assert main([*args, "--tasks", "IDC"]) == 0
    assert model.stat().st_mtime_ns == written
    again = pd.read_csv(out / "per_split.tsv", sep="\t")
    idc = per_split[per_split.task == "IDC"].reset_index(drop=True)
    pd.testing.assert_frame_equal(again, idc)


def test_a_bench_gene_missing_from_an_anndata_is_one_line(bench, weights, tmp_path, capsys):
    preset, path = weights
    task = tmp_path / "bench" / "IDC"
    task.mkdir(parents=True)
    for sub in ("splits", "patches", "adata"):
        (task / sub).symlink_to(bench / "IDC" / sub)
    (task / "var_50genes.json").write_text(json.dumps({"genes": [*GENES, "NOPE"]}))
    args = ["hest-bench", "--bench-dir", str(tmp_path / "bench"), "--encoder", preset.name,
            "--weights", str(path), "--out", str(tmp_path / "o"), "--no-stevs",
            "--latent-dim", str(LATENT), "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(r"S0\.h5ad: 1 genes of the benchmark missing, e\.g\. \['NOPE'\]", err)
    assert len(err.splitlines()) == 1
    assert main([*args[:-4], "--tasks", "LUNG", "--device", "cpu"]) == 2
    assert "no task LUNG" in capsys.readouterr().err


def test_a_users_file_at_an_output_path_is_refused_before_any_work(bench, weights, tmp_path,
                                                                  capsys):  # fmt: skip
    preset, path = weights
    out = tmp_path / "o"
    out.mkdir()
    mine = out / "leaderboard.md"
    mine.write_text("# my notes\n")
    args = ["hest-bench", "--bench-dir", str(bench), "--encoder", preset.name,
            "--weights", str(path), "--out", str(out), "--no-stevs",
            "--latent-dim", str(LATENT), "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "leaderboard.md" in err and "not replaced" in err and len(err.splitlines()) == 1
    assert mine.read_text() == "# my notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.md"]


def test_embedding_precision_workers_and_hest_patch_files(bench, weights):
    preset, path = weights
    backbone = ImageBackbone(get_preset(preset.name, weights=str(path)).backbone).eval()
    with HestPatchFile(bench / "IDC" / "patches" / "S0.h5") as patches:
        full = embed_patches(backbone, patches, batch_size=10, progress=False)
        read = embed_patches(backbone, patches, batch_size=10, workers=1, progress=False)
        half = embed_patches(backbone, patches, batch_size=10, precision="bfloat16",
                             progress=False)  # fmt: skip
        assert len(patches) == 36 and patches.barcodes[0] == "S0_000"
    np.testing.assert_array_equal(read, full)  # read in a worker process: the same numbers
    assert np.abs(half - full).max() > 0  # bf16 autocast ran
    # bf16 keeps 8 bits of mantissa: within 5% of the feature scale
    assert np.abs(half - full).max() <= 0.05 * np.abs(full).max()
    assert np.corrcoef(half.ravel(), full.ravel())[0, 1] > 0.999
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precision("auto", cuda, "float16") == "float16"
    assert resolve_precision("auto", cpu, "bfloat16") == "float32"
    assert resolve_precision("bfloat16", cpu, "float32") == "bfloat16"
    assert get_preset("resnet50_trunc").embed_precision == "float32"  # HEST's ResNet50
    assert get_preset("uni").embed_precision == "float16"  # HEST's UNI


def test_batch_size_auto_is_the_default_off_cuda_and_sized_to_memory_on_it(bench, weights):
    preset, path = weights
    backbone = ImageBackbone(get_preset(preset.name, weights=str(path)).backbone).eval()
    with HestPatchFile(bench / "IDC" / "patches" / "S0.h5") as patches:
        auto = embed_patches(backbone, patches, batch_size=None, progress=False)
        fixed = embed_patches(backbone, patches, batch_size=7, progress=False)
        probe = patches.read_rows(np.arange(4))
    np.testing.assert_allclose(auto, fixed, rtol=1e-5, atol=1e-6)  # batching changes nothing
    assert auto_batch_size(backbone, probe, "none", "float32", False) == DEFAULT_BATCH  # CPU
    gib = 2**30
    assert batch_size_for_memory(80 * gib, 10 * 2**20) == MAX_BATCH  # a big GPU: the cap
    assert batch_size_for_memory(8 * gib, 10 * 2**20) == 256  # 0.6 x 8 GiB / 10 MiB = 491
    assert batch_size_for_memory(50 * 2**20, 10 * 2**20) == MIN_BATCH  # nearly full: the floor
    assert batch_size_option("auto") is None and batch_size_option("64") == 64
    with pytest.raises(argparse.ArgumentTypeError):
        batch_size_option("0")


def test_embed_benchmark_measures_each_preset_and_its_precision(tmp_path):
    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "embed.py"))
    out = tmp_path / "embed.json"
    args = ["--presets", "virchow2", "resnet50_trunc", "--patches", "12", "--batch-size", "8",
            "--precision", "bfloat16", "--json", str(out)]  # fmt: skip
    assert bench["main"](args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["px"], r["dim"], r["patches"]) for r in rows] == [
        ("virchow2", 28, 64, 12), ("resnet50_trunc", 32, 1024, 12)
    ]  # fmt: skip
    for row in rows:
        assert row["precision"] == "bfloat16" and row["patches_per_s"] > 0
        assert 0 < row["max_rel_diff"] < 0.05  # bf16 moved the features, a little
