"""The fair protocol: the shared embedding cache, its test-time view, the refit on train + val
and the paired comparison of STevs with the best same-encoder baseline."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import wilcoxon
from test_predict import GENES, write_slide

from stevs.cli import main
from stevs.embed import dihedral_views, embed_view
from stevs.errors import StevsInputError
from stevs.io.embedding_cache import EmbeddingCache, EmbeddingKey, write_embedding_cache
from stevs.io.fold_file import Fold, write_fold
from stevs.io.model_dir import ModelDir
from stevs.report import compare_to_baselines, summarise_methods
from stevs.report.tables import leaderboard, paired_test, verdict_line

torch.set_num_threads(1)
EFFNET = "effnet_lite0_in1k"
KEY = EmbeddingKey(EFFNET, "tf_efficientnet_lite0", "effnet_lite0_package", "none", 16, 4.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A fold over 4 tiny slides (train s0 s1, val s2, test s3) and their embedding caches."""
    directory = tmp_path_factory.mktemp("fair")
    entries = [write_slide(directory, s, seed) for seed, s in enumerate(["s0", "s1", "s2", "s3"])]
    fold = Fold(
        fold="fold0", scheme="leave_one_slide_out", seed=0, train=["s0", "s1"], val=["s2"],
        test=["s3"], genes=GENES, headline_genes=GENES,
        panel={"method": "gene_list", "n": len(GENES)},
        normalisation={"method": "log1p_cp10k", "target_sum": 1e4,
                       "mean": [1.0] * len(GENES), "std": [1.0] * len(GENES)},
        slides=entries,
    )  # fmt: skip
    fold_path = write_fold(fold, directory / "fold0.json")
    embeddings = directory / "embeddings"
    for entry in entries:
        code = main(
            ["embed", "--patches", entry.patches, "--preset", EFFNET, "--device", "cpu"]
            + ["--out", str(embeddings / f"{entry.slide}.h5")]
        )
        assert code == 0
    return {"fold": fold_path, "embeddings": embeddings, "dir": directory}


def test_embedding_cache_round_trip_and_bad_files(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = write_embedding_cache(tmp_path / "a.h5", values, ["w", "x", "y", "z"], KEY, slide="a")
    cache = EmbeddingCache(path)
    assert cache.key == KEY and cache.slide == "a" and cache.feature_dim == 3
    np.testing.assert_array_equal(cache.read(["z", "w"]), values[[3, 0]])
    with pytest.raises(StevsInputError, match=r"a\.h5: 1 spots have no embedding, e.g. q"):
        cache.read(["w", "q"])
    other = EmbeddingKey(**{**KEY.to_dict(), "view": "dihedral8", "patch_px": 32})
    with pytest.raises(StevsInputError, match="view 'none', expected 'dihedral8'.*patch_px 16"):
        cache.check(other)
    bad = values.copy()
    bad[1, 1] = np.nan
    with pytest.raises(StevsInputError, match="NaN"):
        write_embedding_cache(tmp_path / "b.h5", bad, ["w", "x", "y", "z"], KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]  # nothing half-written
    with pytest.raises(StevsInputError, match="embedding cache not found"):
        EmbeddingCache(tmp_path / "missing.h5")


def test_dihedral8_view_is_invariant_to_turns_and_flips():
    patch = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)

    def embed(x):
        return x.float().flatten(1)[:, :5]  # depends on where pixels are

    assert len(dihedral_views(patch)) == 8
    for moved in (torch.rot90(patch, 1, dims=(2, 3)), patch.flip(3), patch.transpose(2, 3)):
        torch.testing.assert_close(embed_view(embed, moved, "dihedral8"),
                                   embed_view(embed, patch, "dihedral8"))  # fmt: skip
        assert not torch.equal(embed_view(embed, moved, "none"), embed_view(embed, patch, "none"))


def test_embed_refuses_a_random_encoder(study, tmp_path):
    patches = study["dir"] / "s0.h5"
    code = main(["embed", "--patches", str(patches), "--preset", "cpu_small", "--device", "cpu",
                 "--out", str(tmp_path / "x.h5")])  # fmt: skip
    assert code == 2 and not (tmp_path / "x.h5").exists()


def _ridge(study, out, *cached: str) -> list:
    assert main(["train", "--fold", str(study["fold"]), "--method", "ridge_embed", "--backbone",
                 EFFNET, "--out", str(out), *cached]) == 0  # fmt: skip
    assert main(["predict", "--model-dir", str(out), "--fold", str(study["fold"]), "--out-dir",
                 str(out / "pred"), *cached]) == 0  # fmt: skip
    return [json.loads((out / "config.json").read_text()), ad.read_h5ad(out / "pred" / "s3.h5ad")]


def test_ridge_embed_from_the_cache_equals_embedding_in_run(study, tmp_path):
    cached = _ridge(study, tmp_path / "cached", "--embeddings", str(study["embeddings"]))
    direct = _ridge(study, tmp_path / "direct")
    assert cached[0]["alpha"] == direct[0]["alpha"]
    assert cached[0]["embedding_view"] == "none"
    np.testing.assert_allclose(cached[1].X, direct[1].X, atol=1e-4)


def _frozen(study, out, *extra: str) -> None:
    code = main(
        ["train", "--fold", str(study["fold"]), "--method", "stevs", "--preset", EFFNET]
        + ["--freeze-backbone", "--out", str(out), "--epochs", "3", "--batch-size", "8"]
        + ["--workers", "0", "--device", "cpu", "--patience", "1", *extra]
    )
    assert code == 0


def test_cache_holds_what_the_frozen_model_embeds(study):
    from stevs.embed import embed_patches, frozen_backbone
    from stevs.io.patch_cache import PatchCache

    with PatchCache(study["dir"] / "s1.h5") as patches:
        direct = embed_patches(frozen_backbone(EFFNET), patches)
        barcodes = list(patches.barcodes)
    cache = EmbeddingCache(study["embeddings"] / "s1.h5")
    assert cache.barcodes == barcodes and cache.key.view == "none"
    np.testing.assert_allclose(cache.read(barcodes), direct, atol=1e-4)


def test_frozen_training_and_prediction_read_the_cache(study, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stevs")
    cached = ["--embeddings", str(study["embeddings"])]
    out = tmp_path / "cached"
    _frozen(study, out, *cached)
    assert "frozen backbone: reading embeddings from" in caplog.text
    for name, extra in (("from_cache", cached), ("in_run", [])):
        assert main(["predict", "--model-dir", str(out), "--fold", str(study["fold"]),
                     "--out-dir", str(out / name), "--device", "cpu", *extra]) == 0  # fmt: skip
    np.testing.assert_allclose(
        ad.read_h5ad(out / "from_cache" / "s3.h5ad").X,
        ad.read_h5ad(out / "in_run" / "s3.h5ad").X,
        atol=1e-4,
    )
    # a model trained on dihedral8 embeddings refuses caches of view none
    code = main(
        ["train", "--fold", str(study["fold"]), "--method", "stnet", "--preset", EFFNET,
         "--freeze-backbone", "--embedding-view", "dihedral8", "--out", str(tmp_path / "d8"),
         "--epochs", "1", "--workers", "0", "--device", "cpu", *cached]
    )  # fmt: skip
    assert code == 2


def test_refit_retrains_on_train_and_val_for_the_selected_epochs(study, tmp_path, caplog):
    out = tmp_path / "refit"
    _frozen(study, out, "--embeddings", str(study["embeddings"]), "--refit", "--keep-selection")
    config = json.loads((out / "config.json").read_text())
    selection = json.loads((out / "selection" / "config.json").read_text())
    assert config["refit_epochs"] == selection["best_epoch"] >= 1
    assert config["n_train_spots"] == 3 * 24 and selection["n_train_spots"] == 2 * 24
    assert "retrained from scratch" in config["refit_rule"]
    assert config["training"]["refit"] and not selection["training"]["refit"]
    metrics = ModelDir(out).read_metrics()
    chosen = metrics[metrics["stage"] == "selection"]
    assert len(chosen) == selection["epochs_done"]
    assert chosen["val_pearson_r_mean_headline"].notna().all()
    assert (metrics["stage"] == "refit").sum() == config["refit_epochs"]
    refit = load_file(out / "model.safetensors")
    selected = load_file(out / "selection" / "model.safetensors")
    assert any(not torch.equal(refit[k], selected[k]) for k in refit if "decoder" in k)
    # the refit model is the selection's model (frozen preset: context + ridge linear path)
    assert set(refit) == set(selected) and "linear.weight" in refit
    assert main(["predict", "--model-dir", str(out), "--fold", str(study["fold"]),
                 "--out-dir", str(out / "pred"), "--device", "cpu",
                 "--embeddings", str(study["embeddings"])]) == 0  # fmt: skip
    # finished runs keep no resume state; the frozen pretrained backbone is recorded, not copied
    assert (
        not (out / "checkpoint.pt").exists() and not (out / "selection" / "checkpoint.pt").exists()
    )
    assert not any(k.startswith("backbone.") for k in refit)
    assert config["backbone_weights"]["stored"] is False
    _loads_only_with_the_recorded_backbone(out, tmp_path)
    # a rerun finds the finished refit: nothing trains again, the weights stay
    caplog.set_level(logging.INFO, logger="stevs")
    caplog.clear()
    _frozen(study, out, "--embeddings", str(study["embeddings"]), "--refit")
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(refit[k], again[k]) for k in refit)
    assert "holds this run, finished" in caplog.text and "epoch 1:" not in caplog.text
    # by default the selection run is not kept beside the refit; the refit is the same
    plain = tmp_path / "plain"
    _frozen(study, plain, "--embeddings", str(study["embeddings"]), "--refit")
    assert not (plain / "selection").exists() and not (plain / "checkpoint.pt").exists()
    assert all(torch.equal(refit[k], v) for k, v in load_file(plain / "model.safetensors").items())


def _loads_only_with_the_recorded_backbone(model_dir, tmp_path) -> None:
    """The model rebuilds its backbone from the preset (equal to the trained model's), and a
    config whose recorded hash differs is refused naming the file."""
    from stevs.models import load_model

    model, _ = load_model(model_dir)
    assert model.backbone is not None and model.linear is not None
    copy = tmp_path / "tampered"
    copy.mkdir()
    for name in ("model.safetensors", "metrics.csv"):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config["backbone_weights"]["sha256"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(StevsInputError, match="config.json: .*differ from those the model"):
        load_model(copy)


def _runs(n_folds: int = 3, n_genes: int = 20) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-gene and fold tables of STevs (3 seeds) and two baselines on one encoder; one
    held-out slide per fold."""
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(n_genes)]
    per_gene, folds = [], []
    levels = {("enc", "stevs"): 0.50, ("enc", "ridge_embed"): 0.45, ("none", "ridge_color"): 0.3}
    for (encoder, method), level in levels.items():
        for seed in (0, 1, 2) if method == "stevs" else (0,):
            for fold in [f"fold{i}" for i in range(n_folds)]:
                r = level + 0.01 * seed + rng.normal(0, 0.02, len(genes))
                per_gene.append(pd.DataFrame({
                    "method": method, "fold": fold, "slide": f"t{fold}", "gene": genes,
                    "pearson_r": r, "headline": True, "encoder": encoder, "seed": seed,
                    "run": f"{encoder}/{method}/seed{seed}",
                }))  # fmt: skip
                folds.append({"method": method, "fold": fold, "encoder": encoder, "seed": seed,
                              "run": f"{encoder}/{method}/seed{seed}",
                              "pearson_r_mean_headline": float(r.mean())})  # fmt: skip
    return pd.concat(per_gene, ignore_index=True), pd.DataFrame(folds)


def test_summary_averages_seeds_per_fold_and_reports_the_seed_sd():
    _, folds = _runs()
    summary = summarise_methods(folds).set_index(["encoder", "method"])
    stevs = folds[folds["method"] == "stevs"]
    per_fold = stevs.groupby("fold")["pearson_r_mean_headline"].mean()
    row = summary.loc[("enc", "stevs")]
    assert row["n_seeds"] == 3 and row["n_folds"] == 3
    assert row["pearson_r_mean_headline_mean"] == pytest.approx(per_fold.mean())
    assert row["pearson_r_mean_headline_std"] == pytest.approx(per_fold.std(ddof=1))
    per_seed = stevs.groupby("seed")["pearson_r_mean_headline"].mean()
    assert row["pearson_r_mean_headline_seed_sd"] == pytest.approx(per_seed.std(ddof=1))
    assert np.isnan(summary.loc[("enc", "ridge_embed"), "pearson_r_mean_headline_seed_sd"])


def test_comparison_picks_the_best_same_encoder_baseline_and_tests_slides():
    per_gene, folds = _runs()
    row = compare_to_baselines(per_gene, folds).iloc[0]
    assert (row["encoder"], row["baseline"]) == ("enc", "ridge_embed")
    # 3 held-out slides (60 slide x gene pairs): too few to test, no p-value
    assert row["n_slides"] == 3 and row["slides_ahead"] == 3 and np.isnan(row["slide_wilcoxon_p"])
    assert row["slide_test"].startswith("too few slides to test")
    assert row["folds_ahead"] == 3 and row["verdict"] == "ahead"
    # the same gap, but seeds far apart: inside the seed sd, a tie
    noisy = folds.copy()
    noisy.loc[noisy["seed"] == 2, "pearson_r_mean_headline"] += 0.5
    assert compare_to_baselines(per_gene, noisy).iloc[0]["verdict"].startswith("tie")


def _slide_delta(per_gene: pd.DataFrame) -> pd.Series:
    """Per slide: STevs's headline r (genes, then seeds averaged) minus ridge_embed's."""
    by_slide = {m: per_gene[per_gene["method"] == m].groupby(["slide", "seed"])["pearson_r"]
                .mean().groupby("slide").mean() for m in ("stevs", "ridge_embed")}  # fmt: skip
    return by_slide["stevs"] - by_slide["ridge_embed"]


def test_slide_test_p_value_comes_from_slides_not_genes():
    per_gene, folds = _runs(n_folds=6, n_genes=20)
    row = compare_to_baselines(per_gene, folds).iloc[0]
    delta = _slide_delta(per_gene)
    assert row["n_slides"] == 6 and row["slides_ahead"] == int((delta > 0).sum())
    assert row["slide_wilcoxon_p"] == pytest.approx(wilcoxon(delta.to_numpy()).pvalue)
    assert row["slide_test"] == f"Wilcoxon over 6 slides: p = {row['slide_wilcoxon_p']:.2g}"
    # 10 times the genes, each slide's r unchanged: the same p (a (slide, gene) test's
    # p-value would shrink with the number of genes)
    copies = [per_gene.assign(gene=per_gene["gene"] + f"_copy{i}") for i in range(10)]
    more = compare_to_baselines(pd.concat(copies, ignore_index=True), folds).iloc[0]
    assert more["slide_wilcoxon_p"] == pytest.approx(row["slide_wilcoxon_p"])
    assert more["n_slides"] == 6
    # a slide tested in two folds (spot blocks of one section) counts once
    twice = per_gene.assign(slide=per_gene["slide"].replace({"tfold5": "tfold4"}))
    assert compare_to_baselines(twice, folds).iloc[0]["n_slides"] == 5


def test_paired_test_below_five_slides_says_too_few():
    ours = pd.Series([0.5, 0.6, 0.7, 0.8], index=list("abcd"))
    row = paired_test(ours, ours - 0.1)
    assert row["slide_test"] == "too few slides to test (4 held-out, fewer than 5)"
    assert np.isnan(row["slide_wilcoxon_p"]) and row["slides_ahead"] == 4
    five = paired_test(pd.concat([ours, pd.Series([0.9], index=["e"])]), ours)  # paired: 4
    assert five["n_slides"] == 4 and five["slide_test"].startswith("too few slides to test")
    row = paired_test(pd.Series(np.arange(5.0), index=list("abcde")),
                      pd.Series(np.arange(5.0) - 1, index=list("abcde")))  # fmt: skip
    assert row["slide_wilcoxon_p"] == pytest.approx(0.0625)  # all 5 ahead: the smallest p


def test_leaderboard_leads_each_encoder_and_says_whether_it_beats_the_noise():
    """The report's first screen: per encoder, the leader against the runner-up, the
    encoder-free floor ranked beside each encoder's methods; the slide-level test when there
    are enough held-out slides, "too few slides to test" below 5."""
    per_gene, folds = _runs(n_folds=6)
    second = {"stevs": -0.2, "ridge_embed": 0.0}  # on enc2 the probe leads
    extra_gene = per_gene[per_gene["encoder"] == "enc"].assign(encoder="enc2")
    extra_gene["pearson_r"] += extra_gene["method"].map(second)
    extra_fold = folds[folds["encoder"] == "enc"].assign(encoder="enc2")
    extra_fold["pearson_r_mean_headline"] += extra_fold["method"].map(second)
    per_gene = pd.concat([per_gene, extra_gene], ignore_index=True)
    folds = pd.concat([folds, extra_fold], ignore_index=True)
    board = leaderboard(per_gene, folds)
    assert set(board["group"]) == {"enc", "enc2"}  # ridge_color (no encoder) joins both
    enc = board[board["group"] == "enc"].set_index("method")
    assert enc["rank"].to_dict() == {"stevs": 1, "ridge_embed": 2, "ridge_color": 3}
    assert enc.loc["stevs", "against"] == "ridge_embed"
    assert enc.loc["ridge_color", "against"] == "stevs"  # the others against the leader
    expected = compare_to_baselines(per_gene, folds).set_index("encoder").loc["enc"]
    assert enc.loc["stevs", "slide_wilcoxon_p"] == pytest.approx(expected["slide_wilcoxon_p"])
    line = verdict_line("enc", board[board["group"] == "enc"])
    assert line.startswith("On enc: stevs leads with headline r")
    assert "over ridge_embed" in line and "of 6 held-out slides, 3 seeds" in line
    assert "more than the noise (Wilcoxon over 6 slides: p = 0.031)" in line
    enc2 = board[board["group"] == "enc2"]
    assert enc2.iloc[0]["method"] == "ridge_embed"
    assert verdict_line("enc2", enc2).startswith("On enc2: ridge_embed leads")
    few_gene, few_folds = _runs(n_folds=3)
    few = leaderboard(few_gene, few_folds)
    assert "too few slides to test whether this is more than the noise (3 held-out" in (
        verdict_line("enc", few)
    )


def test_a_single_method_has_a_first_screen_too():
    per_gene, folds = _runs()
    alone = leaderboard(per_gene[per_gene["method"] == "stevs"], folds[folds["method"] == "stevs"])
    assert len(alone) == 1 and alone.iloc[0]["against"] == ""
    assert verdict_line("enc", alone).startswith("On enc: only stevs ran (headline r 0.5")
