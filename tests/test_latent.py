"""Tests of the latent analysis: stevs.models.analysis (statistics), its latent.json in the
model folder (written by `stevs train`) and the report's section (stevs.report.latent)."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import write_patch_cache

from stevs.cli import main
from stevs.errors import StevsInputError
from stevs.io.fold_file import Fold, SlideEntry, write_fold
from stevs.io.model_dir import ModelDir
from stevs.models import BackboneSpec, STevs, STevsConfig
from stevs.models.analysis import ACTIVE_KL_NATS, has_latent, latent_analysis, latent_statistics
from stevs.report.latent import collect_latent, latent_section

torch.set_num_threads(1)

TINY_SWIN = BackboneSpec(
    "swin_tiny_patch4_window7_224",
    timm_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 16, "depths": (1, 1),
                 "num_heads": (1, 2), "window_size": 4},
    img_size=16,
)  # fmt: skip
GENES = [f"GENE{i}" for i in range(5)]


def tiny_model(**kwargs) -> STevs:
    torch.manual_seed(0)
    return STevs(STevsConfig(n_genes=4, backbone=TINY_SWIN, latent_dim=4, hidden_dim=8, **kwargs))


def set_expert(head, mu: list[float], logvar: list[float]) -> None:
    """Make a Gaussian head constant: (mu, logvar) whatever its input."""
    with torch.no_grad():
        head.net[-1].weight.zero_()
        head.net[-1].bias.copy_(torch.tensor(mu + logvar))


def batches(model: STevs, n: int = 10, size: int = 4):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(n, model.backbone.feature_dim, generator=g)
    coords = torch.rand(n, 2, generator=g) * 2 - 1
    return [{"embedding": emb[i : i + size], "coords": coords[i : i + size]}
            for i in range(0, n, size)]  # fmt: skip


def gaussian_kl(mu_a, var_a, mu_b, var_b) -> float:
    return 0.5 * (math.log(var_b / var_a) + (var_a + (mu_a - mu_b) ** 2) / var_b - 1)


def test_shares_divergence_and_kl_per_dimension_are_the_closed_form_values():
    model = tiny_model()
    # image expert: mean 1, precision 4; spatial expert: mean 0, precision 3; prior: 1
    set_expert(model.image_head, [1.0] * 4, [-math.log(4.0)] * 4)
    set_expert(model.spatial_head, [0.0] * 4, [-math.log(3.0)] * 4)
    stats = latent_statistics(model, batches(model))
    assert stats["n_spots"] == 10
    shares = stats["precision_share"]
    assert shares["image"] == pytest.approx(4 / 8) and shares["spatial"] == pytest.approx(3 / 8)
    assert shares["prior"] == pytest.approx(1 / 8)
    joint_kl = gaussian_kl(4 / 8, 1 / 8, 0.0, 1.0)  # joint: mean 4*1/8, variance 1/8
    assert stats["kl_per_dim"] == pytest.approx([joint_kl] * 4, abs=1e-5)
    assert stats["kl_total"] == pytest.approx(4 * joint_kl, abs=1e-4)
    sym = gaussian_kl(1, 1 / 4, 0, 1 / 3) + gaussian_kl(0, 1 / 3, 1, 1 / 4)
    assert stats["expert_sym_kl"] == pytest.approx(4 * sym, rel=1e-5)
    assert stats["expert_mean_sq_distance"] == pytest.approx(4.0)


def test_dimensions_both_experts_leave_to_the_prior_count_as_collapsed():
    model = tiny_model()
    # dims 2 and 3: both experts as wide as they can be (log-variance 8): the joint is N(0, 1)
    set_expert(model.image_head, [2.0, -1.0, 0.0, 0.0], [-4.0, -4.0, 8.0, 8.0])
    set_expert(model.spatial_head, [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 8.0, 8.0])
    stats = latent_statistics(model, batches(model))
    kl = stats["kl_per_dim"]
    assert kl[0] > 1 and kl[1] > 0.1 and max(kl[2:]) < ACTIVE_KL_NATS / 100
    assert stats["active_dims"] == 2


def test_ablations_report_the_experts_they_have_and_the_regression_head_none():
    image_only = tiny_model(use_spatial=False, align=None)
    stats = latent_statistics(image_only, batches(image_only))
    assert set(stats["precision_share"]) == {"image", "prior"}
    assert stats["expert_sym_kl"] is None and stats["expert_mean_sq_distance"] is None
    concat = tiny_model(combine="concat")
    assert latent_statistics(concat, batches(concat))["precision_share"] is None
    stnet = tiny_model(head="regression")
    assert not has_latent(stnet)
    with pytest.raises(ValueError, match="regression head"):
        latent_statistics(stnet, batches(stnet))
    analysis = latent_analysis(concat, {"train": batches(concat)})
    assert analysis["align"] is None and analysis["latent_dim"] == 4


# -- `stevs train` writes latent.json; the report reads it --------------------------------------


def write_slide(directory, slide: str, seed: int, n: int = 12) -> SlideEntry:
    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 255, (n, 16, 16, 3)).astype(np.uint8)
    counts = rng.poisson(5, (n, len(GENES))).astype(np.int32) + 1
    barcodes = [f"{slide}-{i:02d}" for i in range(n)]
    rows, cols = np.divmod(np.arange(n), 4)
    xy = np.stack([cols * 100.0 + 50, rows * 100.0 + 50], axis=1)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names, adata.var_names = barcodes, GENES
    adata.obsm["spatial"] = xy
    adata.uns["stevs"] = {"slide": slide, "patient": slide, "mpp": 1.0}
    adata.write_h5ad(directory / f"{slide}.h5ad")
    write_patch_cache(directory / f"{slide}.h5", patches, barcodes, xy, mpp_target=4.0, slide=slide)
    paths = (str(directory / f"{slide}.h5ad"), str(directory / f"{slide}.h5"))
    return SlideEntry(slide, slide, *paths)


@pytest.fixture(scope="module")
def fold_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("latent")
    entries = [write_slide(directory, f"s{i}", i) for i in range(4)]
    fold = Fold(
        fold="fold0", scheme="leave_one_slide_out", seed=0, train=["s0", "s1"], val=["s2"],
        test=["s3"], genes=GENES, headline_genes=GENES,
        panel={"method": "gene_list", "n": len(GENES)},
        normalisation={"method": "log1p_cp10k", "target_sum": 1e4,
                       "mean": [0.0] * len(GENES), "std": [1.0] * len(GENES)},
        slides=entries,
    )  # fmt: skip
    return write_fold(fold, directory / "fold0.json")


def train(fold_path, out, method: str) -> None:
    code = main(
        ["train", "--fold", str(fold_path), "--method", method, "--preset", "cpu_small"]
        + ["--out", str(out), "--epochs", "1", "--batch-size", "8", "--workers", "0"]
        + ["--device", "cpu", "--refit"]
    )
    assert code == 0


def test_train_writes_the_analysis_of_its_weights_and_the_report_shows_it(fold_path, tmp_path):
    models = tmp_path / "models"
    model_dir = models / "cpu_small" / "stevs" / "seed0" / "fold0"
    train(fold_path, model_dir, "stevs")
    train(fold_path, models / "cpu_small" / "stnet" / "seed0" / "fold0", "stnet")
    folder = ModelDir(model_dir)
    record = folder.read_latent()
    assert record is not None and record["latent_dim"] > 0 and record["align"] == "sym_kl"
    train_stats, heldout = record["splits"]["train"], record["splits"]["heldout"]
    assert train_stats["n_spots"] == 36 and heldout["n_spots"] == 12  # train + val; test
    for stats in (train_stats, heldout):
        assert len(stats["kl_per_dim"]) == record["latent_dim"]
        assert 0 <= stats["active_dims"] <= record["latent_dim"]
        assert sum(stats["precision_share"].values()) == pytest.approx(1.0)
        assert stats["expert_sym_kl"] >= 0
    assert not (models / "cpu_small" / "stnet" / "seed0" / "fold0" / "latent.json").exists()
    rows = collect_latent(models)
    assert set(rows["split"]) == {"train", "heldout"} and set(rows["method"]) == {"stevs"}
    section = latent_section(models)
    assert "Latent analysis" in section and "heldout" in section and "stevs" in section
    # an analysis of other weights than the folder's is not read as this model's
    folder.weights_path.write_bytes(folder.weights_path.read_bytes() + b" ")
    assert folder.read_latent() is None and latent_section(models) == ""
    folder.remove()
    assert not folder.latent_path.exists()
    other = ModelDir(tmp_path / "other")
    other.path.mkdir()
    other.latent_path.write_text("{not json")
    with pytest.raises(StevsInputError, match="latent.json"):
        other.read_latent()


def test_a_rerun_keeps_the_analysis_of_unchanged_weights(fold_path, tmp_path):
    out = tmp_path / "m"
    train(fold_path, out, "stevs_no_align")
    first = json.loads((out / "latent.json").read_text())
    assert first["align"] is None and first["align_weight"] == 0.0
    mtime = (out / "latent.json").stat().st_mtime_ns
    train(fold_path, out, "stevs_no_align")  # a finished run: trains and analyses nothing
    assert (out / "latent.json").stat().st_mtime_ns == mtime


def test_a_frozen_model_whose_test_slide_is_not_embedded_yet_embeds_it(fold_path, tmp_path):
    embeddings = tmp_path / "emb"
    for slide in ("s0", "s1", "s2"):  # the workflow embeds the test slide in its own job
        patches = fold_path.parent / f"{slide}.h5"
        out = embeddings / f"{slide}.h5"
        assert main(["embed", "--patches", str(patches), "--preset", "effnet_lite0_in1k",
                     "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    out = tmp_path / "m"
    code = main(
        ["train", "--fold", str(fold_path), "--method", "stevs", "--preset", "effnet_lite0_in1k"]
        + ["--out", str(out), "--epochs", "1", "--batch-size", "8", "--workers", "0"]
        + ["--device", "cpu", "--freeze-backbone", "--embeddings", str(embeddings)]
    )
    assert code == 0
    record = ModelDir(out).read_latent()
    assert record["splits"]["heldout"]["n_spots"] == 12
    assert record["splits"]["train"]["n_spots"] == 24  # no refit: the training slides
