"""Tests of stevs.baselines: features, the ridge pipeline, and train/predict on fixture folds."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import add_he_images, assert_draws_over_he, make_fold_file, write_patch_cache
from matplotlib.colors import rgb_to_hsv as mpl_rgb_to_hsv
from scipy import sparse

from stevs import __version__, baselines, color_features, metrics
from stevs.embed import embed_patches, frozen_backbone
from stevs.errors import StevsInputError
from stevs.models import ridge as ridge_probe

torch.set_num_threads(1)

GENES = ["red_gene", "dark_gene", "noise_gene"]
PATCH = 16


def make_slide(tmp: Path, slide: str, n: int, rng: np.random.Generator) -> tuple[Path, Path]:
    """A slide AnnData + patch cache where redness drives ``red_gene``, darkness ``dark_gene``."""
    red = rng.uniform(0, 1, n)
    dark = rng.uniform(0, 1, n)
    patches = rng.integers(0, 40, size=(n, PATCH, PATCH, 3)).astype(np.float64)
    patches[..., 0] += 120 + 100 * red[:, None, None]
    patches[..., 1:] += 200 - 150 * dark[:, None, None, None]
    patches = np.clip(patches, 0, 255).astype(np.uint8)
    counts = np.column_stack(
        [
            rng.poisson(5 + 60 * red),
            rng.poisson(5 + 60 * dark),
            rng.poisson(20, n),
            rng.poisson(400, n),  # off-panel gene
        ]
    ).astype(np.float32)
    barcodes = [f"{slide}-{i}" for i in range(n)]
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame({"array_row": np.arange(n)}, index=barcodes),
        var=pd.DataFrame(index=[*GENES, "other"]),
    )
    adata.obsm["spatial"] = rng.uniform(0, 1000, size=(n, 2))
    adata.uns["stevs"] = {"slide": slide, "patient": slide, "mpp": 0.5}
    add_he_images(adata, slide, diameter_px=30.0)
    adata_path, cache_path = tmp / f"{slide}.h5ad", tmp / f"{slide}.h5"
    adata.write_h5ad(adata_path)
    write_patch_cache(cache_path, patches, barcodes, adata.obsm["spatial"], slide=slide)
    return adata_path, cache_path


@pytest.fixture()
def fold_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    slides = {s: make_slide(tmp_path, s, 60, rng) for s in ("A", "B", "C", "D")}
    return make_fold_file(
        tmp_path / "fold0.json", slides, train=["A", "B"], val=["C"], test=["D"], genes=GENES
    )


def test_hsv_matches_matplotlib_and_stains_separate() -> None:
    rgb = np.random.default_rng(1).uniform(size=(50, 3))
    assert np.allclose(color_features.rgb_to_hsv(rgb), mpl_rgb_to_hsv(rgb), atol=1e-6)
    # a haematoxylin-like purple has more H than E; an eosin-like pink the reverse
    purple = np.array([[[[80, 60, 160]]]], dtype=np.uint8)
    pink = np.array([[[[230, 120, 190]]]], dtype=np.uint8)
    h_p, e_p, _ = color_features.stain_concentrations(purple).ravel()
    h_k, e_k, _ = color_features.stain_concentrations(pink).ravel()
    assert h_p > e_p and e_k > h_k
    white = np.full((1, 1, 1, 3), 255, dtype=np.uint8)
    assert np.allclose(color_features.stain_concentrations(white), 0, atol=1e-6)


def test_color_texture_features_shape_and_texture_response() -> None:
    rng = np.random.default_rng(2)
    flat = np.full((2, 24, 24, 3), 128, dtype=np.uint8)
    noisy = flat.copy()
    noisy[1] = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    feats = color_features.color_texture_features(noisy, progress=False)
    assert feats.shape == (2, color_features.n_color_texture_features())
    assert np.isfinite(feats).all()
    texture = slice(-7, None)  # gradient (3) + local std at 2 scales (4)
    assert np.allclose(feats[0, texture], 0, atol=1e-6)
    assert (feats[1, texture][[0, 3, 5]] > 0.05).all()
    # batching does not change the result
    again = color_features.color_texture_features(noisy, batch_size=1, progress=False)
    assert np.allclose(feats, again, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        color_features.color_texture_features(noisy.astype(np.float32))


def test_fit_ridge_recovers_linear_signal_and_picks_alpha_by_group_cv() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 10))
    y = np.column_stack([x[:, 0] * 2 + 1, -x[:, 1], rng.normal(size=300)])
    groups = np.repeat(["a", "b", "c"], 100)
    model = ridge_probe.fit_ridge(x, y + rng.normal(scale=0.1, size=y.shape), groups, list("uvw"))
    assert model.meta["inner_cv_grouped_by_slide"] and model.meta["n_inner_splits"] == 3
    assert model.alpha in ridge_probe.DEFAULT_ALPHAS
    assert model.meta["inner_cv_mse"][ridge_probe.DEFAULT_ALPHAS.index(model.alpha)] == min(
        model.meta["inner_cv_mse"]
    )
    x_new = rng.normal(size=(200, 10))
    pred = model.predict(x_new)
    assert np.corrcoef(pred[:, 0], x_new[:, 0])[0, 1] > 0.99
    assert np.corrcoef(pred[:, 1], -x_new[:, 1])[0, 1] > 0.99
    assert model.residual_std[2] == pytest.approx(1.0, abs=0.15)  # pure-noise gene
    assert model.residual_std[0] < 0.2
    assert model.components.shape == (10, 10)  # min(256, n - 1, n_features)


def _programme_data(rng: np.random.Generator, n: int, genes: int, noise: float):
    """Spots whose 40 genes are noisy mixes of 2 programmes read off 30 features."""
    x = rng.normal(size=(n, 30))
    programmes = x[:, :2] @ rng.normal(size=(2, 2))
    y = programmes @ rng.normal(size=(2, genes)) + rng.normal(scale=noise, size=(n, genes))
    return x, y


def test_reduce_rank_finds_shared_programmes_and_predicts_held_out_spots_better() -> None:
    rng = np.random.default_rng(7)
    x, y = _programme_data(rng, 160, 40, noise=3.0)
    groups = np.repeat(["a", "b", "c", "d"], 40)
    genes = [f"g{i}" for i in range(40)]
    full = ridge_probe.fit_ridge(x, y, groups, genes)
    reduced = ridge_probe.reduce_rank(full, x, y, groups)
    assert reduced.meta["rank"] == 2 and reduced.alpha == full.alpha
    assert np.linalg.matrix_rank(reduced.coef, tol=1e-8) == 2
    # the mean training prediction is unchanged (intercept follows the projection)
    np.testing.assert_allclose(reduced.predict(x).mean(0), full.predict(x).mean(0), atol=1e-5)
    x_new, y_new = _programme_data(np.random.default_rng(7), 2000, 40, noise=0.0)
    error = {k: float(((m.predict(x_new) - y_new) ** 2).mean()) for k, m in
             (("full", full), ("reduced", reduced))}  # fmt: skip
    assert error["reduced"] < 0.95 * error["full"]  # 0.92 here
    only_full = ridge_probe.reduce_rank(full, x, y, groups, ranks=[0])
    np.testing.assert_allclose(only_full.predict(x_new), full.predict(x_new), rtol=1e-5)
    assert only_full.meta["rank"] == 0


def test_reduce_rank_keeps_the_full_probe_when_every_gene_is_its_own_signal() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(240, 12))
    y = x[:, :12] * 3 + rng.normal(scale=0.1, size=(240, 12))  # 12 independent genes
    groups = np.repeat(["a", "b", "c"], 80)
    full = ridge_probe.fit_ridge(x, y, groups, [f"g{i}" for i in range(12)])
    assert ridge_probe.reduce_rank(full, x, y, groups).meta["rank"] == 0


def test_one_gene_panel_fits_reduces_and_predicts_held_out_spots() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(90, 6))
    y = x[:, :1] * 2 + rng.normal(scale=0.1, size=(90, 1))
    groups = np.repeat(["a", "b", "c"], 30)
    full = ridge_probe.fit_ridge(x, y, groups, ["g0"])
    assert full.coef.shape == (full.components.shape[0], 1)
    x_new = rng.normal(size=(50, 6))
    predicted = full.predict(x_new)
    assert predicted.shape == (50, 1)
    assert np.corrcoef(predicted[:, 0], x_new[:, 0])[0, 1] > 0.99
    assert ridge_probe.reduce_rank(full, x, y, groups).meta["rank"] == 0
    oof = ridge_probe.out_of_fold_predictions(x, y, groups, full.alpha)
    assert oof.shape == (90, 1) and np.corrcoef(oof[:, 0], y[:, 0])[0, 1] > 0.99


def test_train_predict_ridge_color_through_metrics(fold_file: Path, tmp_path: Path) -> None:
    model_dir = baselines.train_ridge(fold_file, "ridge_color", tmp_path / "models/ridge_color")
    names = {p.name for p in model_dir.iterdir()}
    assert names == {"model.safetensors", "config.json", "metrics.csv"}
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["training_slides"] == ["A", "B", "C"]  # train + val, never the test slide D
    assert meta["ridge"]["n_train_spots"] == 180 and meta["method"] == "ridge_color"
    out = baselines.predict_ridge(model_dir, fold_file, tmp_path / "pred")
    assert [p.name for p in out] == ["D.h5ad"]
    pred = ad.read_h5ad(out[0])
    assert pred.var_names.tolist() == GENES and pred.n_obs == 60
    assert pred.uns["stevs"]["model_sha256"] == meta["model_sha256"]
    assert pred.uns["stevs"]["fold"] == "fold0" and pred.uns["stevs"]["slide"] == "D"
    assert np.allclose(pred.layers["std"][0], meta_std(model_dir))
    source = ad.read_h5ad(tmp_path / "D.h5ad")
    assert np.allclose(pred.obsm["spatial"], source.obsm["spatial"])
    assert pred.uns["stevs"]["stevs_version"] == __version__
    assert "gene_ids" not in pred.var  # the slide has none
    factors = dict(source.uns["spatial"]["D"]["scalefactors"])
    factors["tissue_hires_scalef"] = factors["tissue_lowres_scalef"]  # lowres under "hires"
    assert pred.uns["spatial"]["D"]["scalefactors"] == factors
    assert_draws_over_he(pred, "red_gene")
    per_gene, summary, _ = metrics.evaluate_fold(fold_file, tmp_path / "pred", "ridge_color")
    r = per_gene.set_index("gene")["pearson_r"]
    assert r["red_gene"] > 0.6 and r["dark_gene"] > 0.6
    assert abs(r["noise_gene"]) < 0.4
    assert 0.6 < summary["coverage90_mean"] <= 1.0


def meta_std(model_dir: Path) -> np.ndarray:
    return ridge_probe.load_ridge(model_dir).residual_std


def test_ridge_embed_with_custom_and_timm_embedders(fold_file: Path, tmp_path: Path) -> None:
    def mean_colour(patches: np.ndarray) -> np.ndarray:
        return patches.reshape(len(patches), -1, 3).mean(axis=1)

    model_dir = baselines.train_ridge(
        fold_file, "ridge_embed", tmp_path / "m", embed=mean_colour, max_components=2
    )
    model = ridge_probe.load_ridge(model_dir)
    assert model.components.shape == (2, 3)
    with pytest.raises(StevsInputError, match="pass its embed"):
        baselines.predict_ridge(model_dir, fold_file, tmp_path / "p")
    baselines.predict_ridge(model_dir, fold_file, tmp_path / "p", embed=mean_colour)
    per_gene, _, _ = metrics.evaluate_fold(fold_file, tmp_path / "p", "ridge_embed")
    assert per_gene.set_index("gene").loc["red_gene", "pearson_r"] > 0.6
    # the default path builds a frozen timm model by name (random weights here: shape only)
    encoder = frozen_backbone("test_efficientnet")
    feats = embed_patches(encoder, np.zeros((3, PATCH, PATCH, 3), dtype=np.uint8))
    assert feats.shape == (3, encoder.feature_dim) and np.isfinite(feats).all()
    timm_dir = baselines.train_ridge(
        fold_file, "ridge_embed", tmp_path / "t", backbone="test_efficientnet"
    )
    assert ridge_probe.load_ridge(timm_dir).meta["feature_source"] == "backbone:test_efficientnet"
    [path] = baselines.predict_ridge(timm_dir, fold_file, tmp_path / "tp")
    assert np.isfinite(ad.read_h5ad(path).X).all()


def test_load_ridge_rejects_tampered_or_missing_files(fold_file: Path, tmp_path: Path) -> None:
    model_dir = baselines.train_ridge(fold_file, "ridge_color", tmp_path / "m")
    meta = json.loads((model_dir / "config.json").read_text())
    meta["model_sha256"] = "0" * 64
    (model_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(StevsInputError, match="checksum"):
        ridge_probe.load_ridge(model_dir)
    with pytest.raises(StevsInputError, match="missing; is this the output folder"):
        ridge_probe.load_ridge(tmp_path / "nowhere")
    fold = json.loads(fold_file.read_text())
    fold["slides"][0]["patches"] = str(tmp_path / "missing.h5")
    fold_file.write_text(json.dumps(fold))
    with pytest.raises(StevsInputError, match="missing.h5: patch cache"):
        baselines.train_ridge(fold_file, "ridge_color", tmp_path / "m2")


def test_within_slice_fold_trains_on_train_val_spots_and_predicts_test_spots(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(4)
    adata_path, cache_path = make_slide(tmp_path, "A", 90, rng)
    barcodes = [f"A-{i}" for i in range(90)]
    spots = {
        "train": {"A": barcodes[:50]},
        "val": {"A": barcodes[50:60]},
        "test": {"A": barcodes[60:]},
    }
    fold_path = make_fold_file(
        tmp_path / "ws0.json",
        {"A": (adata_path, cache_path)},
        train=["A"],
        val=["A"],
        test=["A"],
        genes=GENES,
        spots=spots,
        scheme="within_slice",
    )
    model_dir = baselines.train_ridge(fold_path, "ridge_color", tmp_path / "m")
    model = ridge_probe.load_ridge(model_dir)
    assert model.meta["n_train_spots"] == 60
    assert not model.meta["inner_cv_grouped_by_slide"]  # one slide: inner CV over spots
    [path] = baselines.predict_ridge(model_dir, fold_path, tmp_path / "p")
    assert ad.read_h5ad(path).obs_names.tolist() == barcodes[60:]
    per_gene, _, _ = metrics.evaluate_fold(fold_path, tmp_path / "p", "ridge_color")
    assert (per_gene["n_spots"] == 30).all()
    assert per_gene.set_index("gene").loc["red_gene", "pearson_r"] > 0.5


def test_default_embedder_is_the_pretrained_preset_backbone() -> None:
    encoder = frozen_backbone(baselines.DEFAULT_BACKBONE)
    assert encoder.spec.weights != "none"  # the preset's pretrained weights

    def embed(patches: np.ndarray) -> np.ndarray:
        return embed_patches(encoder, patches)

    rng = np.random.default_rng(5)
    patches = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    feats = embed(patches)
    assert feats.shape[0] == 2 and feats.shape[1] > 100 and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])
    assert np.allclose(embed(patches[:1]), feats[:1], atol=1e-4)  # frozen, eval mode


@pytest.mark.parametrize("n_spots", [40, 8])  # more spots than features, and fewer
def test_ridge_pipeline_equals_sklearn_scaler_pca_ridge(n_spots: int) -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(6)
    x = rng.normal(size=(n_spots, 12)) * rng.uniform(0.5, 5, size=12)
    y = x[:, :3] @ rng.normal(size=(3, 4)) + rng.normal(size=(n_spots, 4))
    groups = np.repeat(["a", "b"], n_spots // 2)
    model = ridge_probe.fit_ridge(x, y, groups, list("abcd"), max_components=5, n_splits=2)
    scaler = StandardScaler().fit(x)
    pca = PCA(n_components=5, svd_solver="full").fit(scaler.transform(x))
    ridge = Ridge(alpha=model.alpha).fit(pca.transform(scaler.transform(x)), y)
    x_new = rng.normal(size=(20, 12))
    expected = ridge.predict(pca.transform(scaler.transform(x_new)))
    assert np.allclose(model.predict(x_new), expected, atol=1e-4)


# ------------------------------------------- library replacements vs the old implementations


def _old_stain_concentrations(patches: np.ndarray) -> np.ndarray:
    """The lookup-table deconvolution the module used before skimage.color.separate_stains."""
    optical_density = (-np.log10((np.arange(256) + 1.0) / 256.0)).astype(np.float32)
    return np.maximum(
        optical_density[patches] @ color_features.HED_FROM_RGB.astype(np.float32), 0.0
    )


def _he_like_patches(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([[200, 120, 190], [90, 60, 160], [245, 245, 245]], float)
    labels = rng.integers(0, 3, size=(n, size // 8, size // 8))
    img = base[labels].repeat(8, 1).repeat(8, 2) + rng.normal(0, 18, size=(n, size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    img[:, :4, :4] = 255  # white: hue and saturation ties
    img[:, -4:, -4:] = 0  # black: the darkest optical density
    img[:, :4, -4:] = [200, 200, 40]  # red = green: a hue tie between two channels
    return img


def test_hsv_kernel_equals_skimage_rgb2hsv_with_ties() -> None:
    from skimage.color import rgb2hsv

    rgb = _he_like_patches(8).astype(np.float32) / 255
    assert np.abs(color_features.rgb_to_hsv(rgb) - rgb2hsv(rgb)).max() < 1e-6


def test_stain_concentrations_equal_the_old_lookup_table_and_are_not_rgb2hed() -> None:
    from skimage.color import rgb2hed

    patches = _he_like_patches(8)
    new = color_features.stain_concentrations(patches)
    assert new.shape == patches.shape and new.dtype == np.float32
    assert np.abs(new - _old_stain_concentrations(patches)).max() < 1e-5
    # channel-first planes give the same values
    planes = patches.reshape(8, -1, 3).transpose(0, 2, 1)
    again = color_features.stain_concentrations(planes, channel_axis=1)
    assert np.allclose(again, new.reshape(8, -1, 3).transpose(0, 2, 1), atol=1e-6)
    # skimage's own rgb2hed is another feature (other stain vectors and intensity offset)
    assert np.abs(rgb2hed(patches) - new).max() > 0.5


def test_colour_features_stain_columns_equal_the_old_lookup_table() -> None:
    patches = _he_like_patches(6)
    feats = color_features.color_texture_features(patches, progress=False)
    hed = _old_stain_concentrations(patches)[..., :2].reshape(6, -1, 2)
    first = 6 + 3 * 8 + 6  # RGB mean/std, histogram, hue cos/sin + saturation + value
    expected = np.concatenate(
        [hed.mean(1), hed.std(1), np.percentile(hed[:, ::4], 90, axis=1)], axis=1
    )
    assert np.abs(feats[:, first : first + 6] - expected).max() < 1e-5


def _old_fit_ridge(x, y, groups, alphas, max_components=256, n_splits=5):
    """The hand-written scaler + PCA + ridge + grouped inner CV the module used before
    scikit-learn's Pipeline: (alpha, predict(x_new), residual_std, inner_cv_mse)."""

    def standardise_pca(f):
        mean, scale = f.mean(0), f.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = (f - mean) / scale
        k = max(1, min(max_components, len(f) - 1, f.shape[1]))
        if len(z) > z.shape[1]:
            values, vectors = np.linalg.eigh(z.T @ z)
            comps = vectors[:, np.argsort(values)[::-1][:k]].T
        else:
            comps = np.linalg.svd(z, full_matrices=False)[2][:k]
        return mean, scale, comps, z @ comps.T

    def ridge(scores, targets, alpha):
        x_mean, y_mean = scores.mean(0), targets.mean(0)
        c = scores - x_mean
        coef = np.linalg.solve(c.T @ c + alpha * np.eye(c.shape[1]), c.T @ (targets - y_mean))
        return coef, y_mean - x_mean @ coef

    from sklearn.model_selection import GroupKFold

    splits = GroupKFold(n_splits=min(n_splits, len(np.unique(groups)))).split(x, groups=groups)
    res_sum, res_sq = np.zeros((len(alphas), y.shape[1])), np.zeros((len(alphas), y.shape[1]))
    for train, held in splits:
        mean, scale, comps, scores = standardise_pca(x[train])
        held_scores = ((x[held] - mean) / scale) @ comps.T
        for a, alpha in enumerate(alphas):
            coef, intercept = ridge(scores, y[train], alpha)
            residual = held_scores @ coef + intercept - y[held]
            res_sum[a] += residual.sum(0)
            res_sq[a] += (residual**2).sum(0)
    best = int(np.argmin(res_sq.sum(1)))
    n = len(y)
    residual_std = np.sqrt(np.maximum((res_sq[best] - res_sum[best] ** 2 / n) / (n - 1), 0))
    mean, scale, comps, scores = standardise_pca(x)
    coef, intercept = ridge(scores, y, alphas[best])

    def predict(x_new):
        return ((x_new - mean) / scale) @ comps.T @ coef + intercept

    return alphas[best], predict, residual_std, res_sq.sum(1) / y.size


@pytest.mark.parametrize(("n_spots", "n_features"), [(240, 30), (24, 60)])
def test_fit_ridge_equals_the_old_hand_written_pipeline(n_spots: int, n_features: int) -> None:
    rng = np.random.default_rng(8)
    latent = rng.normal(size=(n_spots, 5))
    x = latent @ rng.normal(size=(5, n_features)) + rng.normal(size=(n_spots, n_features))
    x = x * rng.uniform(0.2, 5, size=n_features) + 3
    x[:, 0] = 2.0  # a constant feature
    y = latent[:, :3] @ rng.normal(size=(3, 7)) + rng.normal(size=(n_spots, 7))
    groups = np.repeat(["a", "b", "c", "d"], n_spots // 4)
    alphas = ridge_probe.DEFAULT_ALPHAS
    model = ridge_probe.fit_ridge(x, y, groups, list("abcdefg"), max_components=20)
    alpha, predict, residual_std, cv_mse = _old_fit_ridge(x, y, groups, alphas, 20)
    assert model.alpha == alpha
    x_new = rng.normal(size=(50, n_features)) * x.std(0) + x.mean(0)
    assert np.abs(model.predict(x_new) - predict(x_new)).max() < 1e-4
    assert np.allclose(model.residual_std, residual_std, rtol=1e-8, atol=1e-10)
    assert np.allclose(model.meta["inner_cv_mse"], cv_mse, rtol=1e-8)
    assert model.components.shape == (min(20, n_spots - 1, n_features), n_features)
    assert np.allclose(model.components @ model.components.T, np.eye(len(model.components)))


@pytest.mark.parametrize("method", ["ridge_color", "ridge_embed"])
def test_stevs_train_and_predict_cli_run_ridge_methods_with_defaults(
    fold_file: Path, tmp_path: Path, method: str
) -> None:
    """The workflow's commands: no --backbone given, the registry dispatches both ways."""
    from stevs.cli import main

    out = tmp_path / "m"
    assert main(["train", "--fold", str(fold_file), "--method", method, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method
    if method == "ridge_embed":
        assert config["feature_source"] == f"backbone:{baselines.DEFAULT_BACKBONE}"
    assert (out / "train.log").is_file()
    pred = tmp_path / "p"
    argv = ["predict", "--model-dir", str(out), "--fold", str(fold_file), "--out-dir", str(pred)]
    assert main(argv) == 0
    assert ad.read_h5ad(pred / "D.h5ad").uns["stevs"]["method"] == method


def test_patches_dir_reads_another_geometrys_caches(
    fold_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--patches-dir` (the workflow's encoders with their own patch geometry): train and
    predict read that folder's caches, not the fold file's; the model records their scale,
    and predicting on the fold file's (another scale) is refused."""
    from stevs.cli import main
    from stevs.io.fold_file import read_fold
    from stevs.io.patch_cache import PatchCache

    other = tmp_path / "32px_64um"
    other.mkdir()
    for entry in read_fold(fold_file).slides:  # the same spots, 32 px at 2 µm/px
        with PatchCache(entry.patches, entry.slide) as cache:
            patches = np.stack([cache[row] for row in range(len(cache))])
            patches = np.repeat(np.repeat(patches, 2, axis=1), 2, axis=2)
            barcodes, centres = list(cache.barcodes), cache.centers_px
        write_patch_cache(other / f"{entry.slide}.h5", patches, barcodes, centres,
                          mpp_target=2.0, slide=entry.slide)  # fmt: skip
    out, pred = tmp_path / "m", tmp_path / "p"
    geometry = ["--patches-dir", str(other)]
    argv = ["train", "--fold", str(fold_file), "--method", "ridge_color", "--out", str(out)]
    assert main([*argv, *geometry]) == 0
    recorded = json.loads((out / "config.json").read_text())["patches"]
    assert (recorded["patch_px"], recorded["patch_um"]) == (32, 64.0)
    argv = ["predict", "--model-dir", str(out), "--fold", str(fold_file), "--out-dir", str(pred)]
    assert main([*argv, *geometry]) == 0
    assert (pred / "D.h5ad").is_file()
    assert main(argv) != 0
    assert "the model was trained on 32 px at 2 µm/px" in capsys.readouterr().err
