"""Tests of stevs.predict_slide (and its stevs.spot_grid, stevs.ensemble and stevs.maps): tissue,
spot grids, ensembles, outputs, bad inputs, and a trained model's marker map against the demo
generator's truth."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from stevs import __version__
from stevs.cli import main
from stevs.ensemble import check_models, combine_predictions, model_patch_scale
from stevs.errors import StevsInputError
from stevs.io.model_dir import ModelDir
from stevs.io.patch_cache import PatchScale
from stevs.models import create_model
from stevs.models.presets import get_preset
from stevs.predict_slide import HIRES_MAX_SIDE, predict_slide
from stevs.spot_grid import make_spot_grid, spot_tissue_fractions
from stevs.tissue import TissueDetection, detect_tissue
from tests.conftest import assert_draws_over_he, write_pyramid_tiff

matplotlib.use("Agg")
torch.set_num_threads(1)

GENES = ["TUMOUR_1", "STROMA_1", "FAT_1", "IMMUNE_1", "GENE_001"]
MPP = 2.0
PATCH_PX = 16
PATCH_MPP = 4.0


# -- helpers -------------------------------------------------------------------------------


def blob_image(width: int = 420, height: int = 360, seed: int = 0) -> np.ndarray:
    """White glass with a pink-purple ellipse of 'tissue' (nuclei as dark dots)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 245, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx - width * 0.45) / (width * 0.3)) ** 2 + ((yy - height / 2) / (height * 0.3)) ** 2
    tissue = inside <= 1.0
    image[tissue] = (225, 150, 200)
    dots = tissue & (rng.random(tissue.shape) < 0.05)
    image[dots] = (90, 40, 130)
    return image


def untrained_model(
    directory: Path,
    genes: list[str] = GENES,
    *,
    seed: int = 0,
    patches: dict | None = None,
    method: str = "stevs",
    fold: str = "fold0",
) -> Path:
    """A model folder as 'stevs train' writes it, with random weights (fast)."""
    torch.manual_seed(seed)
    preset = get_preset("cpu_small")
    normalisation = {
        "method": "log1p_cp10k",
        "target_sum": 1e4,
        "mean": [1.0] * len(genes),
        "std": [0.5] * len(genes),
    }
    model = create_model(method, preset, genes, normalisation)
    directory.mkdir(parents=True, exist_ok=True)
    ModelDir(directory).write_tensors(model.state_dict(), {"method": method})
    config = {
        "method": method,
        "fold": fold,
        "model": model.config.to_dict(),
        "genes": list(genes),
        "normalisation": normalisation,
        "patch_px": preset.patch_px,
        "mpp": preset.mpp,
    }
    if patches is not None:
        config["patches"] = patches
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    scale = {"patch_px": PATCH_PX, "mpp_target": PATCH_MPP}
    return {
        "a": untrained_model(root / "a", seed=0, patches=scale),
        "b": untrained_model(root / "b", seed=1, patches=scale, fold="fold1"),
    }


@pytest.fixture(scope="module")
def blob_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "blob.tif"
    return write_pyramid_tiff(path, blob_image(), mpp=MPP, tile=64, n_levels=2)


# -- geometry ------------------------------------------------------------------------------


def test_visium_grid_is_hexagonal_with_visium_array_indices():
    grid = make_spot_grid((500, 400), mpp=2.0, kind="visium", pitch_um=100.0, spot_um=55.0)
    xy_um = (grid.xy_px + 0.5) * 2.0
    assert (grid.array_col % 2 == grid.array_row % 2).all()
    row0 = xy_um[grid.array_row == 0]
    row1 = xy_um[grid.array_row == 1]
    assert np.allclose(np.diff(np.sort(row0[:, 0])), 100.0)
    assert np.isclose(row1[0, 1] - row0[0, 1], 100.0 * math.sqrt(3) / 2)
    assert np.isclose(row1[:, 0].min() - row0[:, 0].min(), 50.0)
    # every nearest neighbour is one pitch away; every spot disk lies inside the image
    dist = np.hypot(*(xy_um[:, None, :] - xy_um[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.inf)
    assert np.allclose(dist.min(axis=1), 100.0)
    assert (xy_um - 27.5 >= -1e-9).all()
    assert (xy_um[:, 0] + 27.5 <= 1000 + 1e-9).all() and (xy_um[:, 1] + 27.5 <= 800 + 1e-9).all()


def test_square_grid_uses_the_chosen_pitch():
    grid = make_spot_grid((300, 300), mpp=1.0, kind="square", pitch_um=40.0, spot_um=30.0)
    xs = np.unique(grid.xy_px[:, 0])
    assert np.allclose(np.diff(xs), 40.0)
    assert len(grid) == len(xs) ** 2 == 7**2
    assert len(set(grid.barcodes)) == len(grid)
    with pytest.raises(StevsInputError, match="grid"):
        make_spot_grid((300, 300), 1.0, kind="hexagon")


def test_tissue_detection_and_spot_fractions_follow_the_tissue(blob_slide):
    from stevs.io.slide import open_slide

    with open_slide(blob_slide) as slide:
        tissue = detect_tissue(slide, MPP)
    truth = blob_image()[..., 0] < 240
    assert tissue.mask.shape == truth.shape  # small slide: thumbnail at full size
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.95
    # an isolated dark speck (smaller than the minimum tissue area) is dropped
    speck = blob_image()
    speck[10:14, 400:404] = (90, 40, 130)
    fake = TissueDetection(speck, np.zeros(truth.shape, bool), 0, 1.0, MPP)
    from stevs.tissue import clean_mask, tissue_mask

    raw, _ = tissue_mask(fake.thumbnail)
    assert raw[10:14, 400:404].any() and not clean_mask(raw, MPP)[10:14, 400:404].any()

    grid = make_spot_grid((420, 360), MPP)
    fractions = spot_tissue_fractions(grid, tissue, MPP)
    centre = np.clip(np.rint(grid.xy_px).astype(int), 0, [419, 359])
    deep = ndimage.binary_erosion(truth, iterations=20)[centre[:, 1], centre[:, 0]]
    outside = ~ndimage.binary_dilation(truth, iterations=20)[centre[:, 1], centre[:, 0]]
    assert deep.any() and outside.any()
    assert np.allclose(fractions[deep], 1.0) and np.allclose(fractions[outside], 0.0)


# -- models --------------------------------------------------------------------------------


def test_combine_predictions_uses_the_law_of_total_variance():
    means = [np.array([[1.0, 0.0]]), np.array([[3.0, 0.0]])]
    stds = [np.array([[1.0, 2.0]]), np.array([[1.0, 0.0]])]
    mean, std = combine_predictions(means, stds)
    assert np.allclose(mean, [[2.0, 0.0]])
    assert np.allclose(std, [[math.sqrt(1.0 + 1.0), math.sqrt(2.0)]])
    single_mean, single_std = combine_predictions(means[:1], stds[:1])
    assert np.allclose(single_mean, means[0]) and np.allclose(single_std, stds[0])


def test_models_with_other_panels_combine_gene_by_gene(models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(models["a"], other)
    config = json.loads((other / "config.json").read_text())
    config["genes"] = ["TUMOUR_9", *config["genes"][1:]]
    (other / "config.json").write_text(json.dumps(config))
    combined = check_models([models["a"], other])
    assert combined.genes == [*GENES, "TUMOUR_9"]
    assert combined.models_per_gene().tolist() == [1, 2, 2, 2, 2, 1]
    assert check_models([models["a"], models["b"]]).genes == GENES
    # a gene predicted by one model keeps that model's values; shared genes are averaged
    means = [np.array([[1.0, 2.0]]), np.array([[3.0, 5.0]])]
    stds = [np.ones((1, 2)), np.ones((1, 2))]
    mean, std = combine_predictions(means, stds, [np.array([0, 1]), np.array([1, 2])], 3)
    assert np.allclose(mean, [[1.0, 2.5, 5.0]]) and np.allclose(std, [[1.0, 1.25**0.5, 1.0]])


def test_models_that_cannot_predict_he_only_slides_are_refused(models, tmp_path):
    ridge = tmp_path / "ridge"
    shutil.copytree(models["a"], ridge)
    config = json.loads((ridge / "config.json").read_text())
    (ridge / "config.json").write_text(json.dumps({**config, "method": "ridge_color"}))
    with pytest.raises(StevsInputError, match="ridge_color.*cannot predict H&E-only slides"):
        check_models([ridge])


def test_models_of_another_patch_scale_are_refused(models, blob_slide, tmp_path):
    coarse = untrained_model(tmp_path / "coarse", patches={"patch_px": 16, "mpp_target": 8.0})
    with pytest.raises(StevsInputError, match="patch scale") as err:
        check_models([models["a"], coarse])
    assert str(coarse / "config.json") in str(err.value)
    # asking to tile at another scale than the model's recorded one
    with pytest.raises(StevsInputError, match="trained on patches of 16 px at 4 µm/px"):
        predict_slide(blob_slide, "blob", [models["a"]], tmp_path / "out", patch_um=128.0)
    assert not (tmp_path / "out").exists()


def test_patch_scale_falls_back_to_the_preset_with_a_warning(tmp_path):
    model = untrained_model(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    scale = model_patch_scale(config, model / "config.json")
    assert scale.scale == PatchScale(64, 2.0) and not scale.certain
    assert "preset" in scale.source


def test_unknown_genes_are_refused(models, blob_slide, tmp_path):
    with pytest.raises(StevsInputError, match="NOT_A_GENE.*not in the model's panel"):
        predict_slide(blob_slide, "blob", [models["a"]], tmp_path, genes=["NOT_A_GENE"])


# -- the whole job -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::PendingDeprecationWarning")
def test_predict_slide_writes_a_visium_like_anndata_that_scanpy_plots(models, blob_slide, tmp_path):
    out = tmp_path / "blob"
    result = predict_slide(
        blob_slide, "blob", [models["a"]], out, device="cpu", progress=False, n_samples=4
    )
    adata = ad.read_h5ad(result.adata)
    assert result.adata == out / "blob.h5ad"
    assert list(adata.var_names) == GENES and adata.n_obs == result.n_spots > 20
    assert np.isfinite(adata.X).all() and (adata.layers["std"] > 0).all()
    # spots lie on the tissue, in level-0 px
    truth = blob_image()[..., 0] < 240
    xy = np.rint(adata.obsm["spatial"]).astype(int)
    assert truth[xy[:, 1], xy[:, 0]].mean() > 0.95
    spatial = adata.uns["spatial"]["blob"]
    assert spatial["images"]["hires"].shape == (360, 420, 3)
    assert max(spatial["images"]["lowres"].shape) <= 600
    factors = spatial["scalefactors"]
    assert factors["tissue_hires_scalef"] == pytest.approx(1.0)
    assert factors["spot_diameter_fullres"] == pytest.approx(55.0 / MPP)
    meta = adata.uns["stevs"]
    assert meta["patch_px"] == PATCH_PX and meta["patch_mpp"] == pytest.approx(PATCH_MPP)
    assert meta["grid"] == "visium" and meta["n_models"] == 1 and len(meta["model_sha256"][0]) == 64
    # maps: one PNG per default gene, and the QC picture; no temporary files left behind
    assert [p.name for p in result.maps] == [f"{g}.png" for g in GENES]
    for path in [*result.maps, result.qc]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100
    assert sorted(p.name for p in out.iterdir()) == ["blob.h5ad", "maps", "tissue.png"]

    assert meta["stevs_version"] == __version__
    assert spatial["metadata"]["source_image_path"] == str(blob_slide.resolve())
    assert_draws_over_he(adata, "TUMOUR_1", "blob")


def test_grid_is_tiled_directly_into_a_cache_of_the_model_scale(
    models, blob_slide, tmp_path, monkeypatch
):
    from stevs.io.patch_cache import PatchCache
    from stevs.io.slide import open_slide
    from stevs.tissue import detect_tissue as one_detection

    written = []
    real_write = ad.AnnData.write_h5ad
    monkeypatch.setattr(
        ad.AnnData,
        "write_h5ad",
        lambda self, path, **kw: (written.append(Path(path)), real_write(self, path, **kw)),
    )
    out = tmp_path / "blob"
    result = predict_slide(
        blob_slide,
        "blob",
        [models["a"]],
        out,
        device="cpu",
        progress=False,
        n_samples=0,
        genes=["FAT_1"],
        keep_patches=True,
    )
    assert len(written) == 1 and written[0].suffix == ".h5ad"  # only the result: no grid AnnData
    adata = ad.read_h5ad(result.adata)
    with PatchCache(result.patches) as cache:
        assert cache.barcodes == list(adata.obs_names)
        assert cache.scale.patch_px == PATCH_PX and cache.scale.mpp_target == PATCH_MPP
        np.testing.assert_array_equal(cache.centers_px, adata.obsm["spatial"])
        with open_slide(blob_slide) as slide:
            threshold = one_detection(slide, MPP).threshold
        # one tissue detection: the cache's threshold is predict_slide's
        assert cache.attrs["tissue_threshold_saturation"] == threshold
        assert adata.uns["stevs"]["tissue_threshold_saturation"] == threshold
        assert (cache.tissue_fraction > 0.5).mean() > 0.9  # grid spots lie on tissue


def test_an_ensemble_averages_the_models(models, blob_slide, tmp_path):
    common = dict(
        device="cpu", progress=False, n_samples=0, grid="square", pitch_um=150.0, genes=["FAT_1"]
    )
    single = [
        ad.read_h5ad(predict_slide(blob_slide, "s", [models[k]], tmp_path / k, **common).adata)
        for k in ("a", "b")
    ]
    both = ad.read_h5ad(
        predict_slide(blob_slide, "s", [models["a"], models["b"]], tmp_path / "ab", **common).adata
    )
    assert not np.allclose(single[0].X, single[1].X)
    mean, std = combine_predictions([s.X for s in single], [s.layers["std"] for s in single])
    assert np.allclose(both.X, mean, atol=1e-5)
    assert np.allclose(both.layers["std"], std, atol=1e-5)
    assert both.uns["stevs"]["fold"].tolist() == ["fold0", "fold1"]
    assert both.obs["array_col"].max() > 0 and both.uns["stevs"]["grid"] == "square"


def test_blank_slide_stops_with_no_tissue_found(models, tmp_path):
    blank = write_pyramid_tiff(
        tmp_path / "blank.tif", np.full((300, 300, 3), 243, np.uint8), mpp=MPP, n_levels=1
    )
    with pytest.raises(StevsInputError, match="no tissue found") as err:
        predict_slide(blank, "blank", [models["a"]], tmp_path / "out", progress=False)
    assert str(blank) in str(err.value)
    assert not (tmp_path / "out" / "blank.h5ad").exists()


def test_cli_needs_the_mpp_of_a_plain_image(models, tmp_path, capsys):
    png = tmp_path / "slide.png"
    Image.fromarray(blob_image()).save(png)
    out = tmp_path / "out"
    base = ["predict-slide", "--image", str(png), "--slide-id", "png", "--out-dir", str(out)]
    base += ["--models", str(models["a"]), "--device", "cpu", "--samples", "2"]
    assert main(base) == 2
    message = capsys.readouterr().err
    assert str(png) in message and "--mpp" in message
    assert not out.exists() or not any(out.iterdir())

    assert main([*base, "--mpp", str(MPP), "--genes", "FAT_1", "--grid", "square"]) == 0
    adata = ad.read_h5ad(out / "png.h5ad")
    assert adata.uns["stevs"]["mpp_source"] == "given" and adata.uns["stevs"]["grid"] == "square"
    assert [p.name for p in (out / "maps").iterdir()] == ["FAT_1.png"]


# -- a trained model on the demo's H&E-only slide ----------------------------------------------


def truth_log_rate(truth: dict, xy_px: np.ndarray, gene: str, spot_um: float = 55.0) -> np.ndarray:
    """The generator's log-mean of ``gene`` at spots: composition averaged over each disk."""
    comp = truth["composition"]
    comp_um, mpp = float(truth["composition_um_per_px"]), float(truth["mpp"])
    r = np.arange(-spot_um / 2 + 2.5, spot_um / 2, 5.0)
    offsets = np.stack(np.meshgrid(r, r), axis=-1).reshape(-1, 2)
    offsets = offsets[(offsets**2).sum(axis=1) <= (spot_um / 2) ** 2]
    points = ((xy_px + 0.5) * mpp)[:, None, :] + offsets[None]
    cols, rows = (points[..., 0] / comp_um - 0.5).ravel(), (points[..., 1] / comp_um - 0.5).ravel()
    share = np.stack(
        [
            ndimage.map_coordinates(channel, [rows, cols], order=1, mode="nearest")
            .reshape(points.shape[:2])
            .mean(axis=1)
            for channel in comp
        ],
        axis=1,
    )
    tissue_share = share[:, :-1] / np.maximum(1.0 - share[:, -1], 1e-6)[:, None]
    g = list(truth["gene_names"]).index(gene)
    return truth["gene_baseline"][g] + tissue_share @ truth["gene_effects"][g]


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory) -> tuple[Path, Path]:
    """A small demo, ingested, tiled, one fold, a frozen-backbone STevs trained on it."""
    from stevs.demo import make_demo
    from stevs.folds import FoldOptions, make_folds
    from stevs.io.ingest import ingest_from_sheet
    from stevs.tiling import tile_slide
    from stevs.training.fold import train_fold
    from stevs.training.options import TrainOptions

    root = tmp_path_factory.mktemp("demo")
    sheet = make_demo(root / "demo", seed=0, n_slides=4, size_um=2000, mpp=2.0, n_genes=60)
    slides = []
    for i in range(1, 5):
        slide = ingest_from_sheet(sheet, f"demo_{i}", root / "slides" / f"demo_{i}.h5ad")
        tile_slide(slide, root / "patches" / f"demo_{i}.h5", 64, 2.0, progress=False)
        slides.append(slide)
    genes = root / "genes.txt"
    markers = [f"{t}_{i}" for t in ("TUMOUR", "STROMA", "FAT", "IMMUNE") for i in (1, 2, 3)]
    genes.write_text("\n".join([*markers, "GENE_001", "GENE_002"]) + "\n")
    options = FoldOptions(scheme="leave_one_slide_out", panel="gene_list", gene_list=str(genes))
    fold = make_folds(slides, root / "patches", root / "folds", options)[0]
    model = root / "models" / "stevs" / fold.fold
    train_fold(
        fold,
        "stevs",
        model,
        preset="cpu_small",
        options=TrainOptions(epochs=25, patience=25, workers=0, device="cpu", freeze_backbone=True),
    )
    return root, model


def test_marker_map_of_the_demo_slide_follows_the_truth(trained_demo):
    root, model = trained_demo
    out = root / "predict_slides" / "demo_heonly"
    argv = ["predict-slide", "--sheet", str(root / "demo" / "predict.tsv")]
    argv += ["--slide-id", "demo_heonly", "--models", str(model), "--out-dir", str(out)]
    assert main([*argv, "--device", "cpu", "--genes", "TUMOUR_1", "FAT_1"]) == 0
    adata = ad.read_h5ad(out / "demo_heonly.h5ad")
    meta = adata.uns["stevs"]
    # the scale came from the training patch caches (64 px at 2 µm/px) that `stevs train`
    # records in config.json, not from the preset
    assert meta["patch_scale_source"].endswith("config.json (patches)")
    assert meta["patch_px"] == 64 and meta["patch_mpp"] == 2.0 and meta["mpp"] == 2.0
    hires = adata.uns["spatial"]["demo_heonly"]["images"]["hires"]
    assert adata.n_obs > 150 and max(hires.shape) <= HIRES_MAX_SIDE
    truth = dict(np.load(root / "demo" / "truth" / "demo_heonly.npz"))
    for gene in ("TUMOUR_1", "FAT_1"):
        expected = truth_log_rate(truth, adata.obsm["spatial"], gene)
        r = np.corrcoef(adata[:, gene].X.ravel(), expected)[0, 1]
        assert r > 0.3, (gene, r)
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["FAT_1.png", "TUMOUR_1.png"]


# -- workflow ------------------------------------------------------------------------------


def test_workflow_predicts_the_sheet_slides_with_every_fold_model(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "config" / "demo.yaml").read_text())
    config["predict_slides"] = {
        "sheet": str(Path(config["demo"]["out"]) / "predict.tsv"),
        "model": "stevs",
        "genes": ["TUMOUR_1", "FAT_1"],
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "snakemake"), "-n", "-p", "--cores", "2", "--directory", str(tmp_path)]
        + ["-s", str(root / "Snakefile"), "--configfile", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr  # snakemake 9 prints the jobs on stderr
    shell = [line for line in output.splitlines() if "stevs predict-slide" in line]
    assert len(shell) == 1, output[-2000:]
    models = shell[0].split("--models ")[1].split(" --")[0].split()
    assert models == [f"results/models/cpu_small/stevs/seed0/fold{i}" for i in range(len(models))]
    assert len(models) >= 2 and "--slide-id demo_heonly" in shell[0]
    assert "--genes TUMOUR_1 FAT_1" in shell[0]
    assert "results/predict_slides/demo_heonly/demo_heonly.h5ad" in output
