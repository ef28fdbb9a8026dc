"""Shared test fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

HER2ST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The real her2st sections beside the repository (../shared/data/her2st)."""
    if not (HER2ST_DIR / "sections.tsv").is_file():
        pytest.skip(f"real her2st data not found at {HER2ST_DIR} (only present on dev/CI machines)")
    return HER2ST_DIR


def write_pyramid_tiff(
    path: Path,
    image: np.ndarray,
    mpp: float | None = 0.5,
    tile: int = 64,
    n_levels: int = 3,
    compression: str = "deflate",
) -> Path:
    """A small pyramidal tiled TIFF that OpenSlide opens (reduced levels marked as such)."""
    kwargs = {}
    with tifffile.TiffWriter(path) as writer:
        for level in range(n_levels):
            factor = 2**level
            pixels = image[::factor, ::factor] if level else image
            if mpp is not None:
                kwargs = {
                    "resolution": (1e4 / (mpp * factor), 1e4 / (mpp * factor)),
                    "resolutionunit": "CENTIMETER",
                }
            writer.write(
                np.ascontiguousarray(pixels),
                tile=(tile, tile),
                photometric="rgb" if pixels.ndim == 3 else "minisblack",
                compression=compression,
                subfiletype=1 if level else 0,
                **kwargs,
            )
    return path


@pytest.fixture
def pattern_image() -> np.ndarray:
    """A smooth colour gradient with a unique colour per pixel neighbourhood."""
    yy, xx = np.mgrid[0:400, 0:520]
    return np.stack(
        [(xx * 255 // 519), (yy * 255 // 399), ((xx + yy) * 255 // 918)], axis=-1
    ).astype(np.uint8)


def make_fold_file(
    path: Path,
    slides: dict[str, tuple[Path, Path]],
    *,
    train: list[str],
    test: list[str],
    genes: list[str],
    val: list[str] | None = None,
    headline_genes: list[str] | None = None,
    spots: dict | None = None,
    scheme: str = "leave_one_slide_out",
) -> Path:
    """A complete fold file (through stevs.io.fold_file) over test-made slides.

    ``slides`` maps slide id -> (slide AnnData, patch cache); normalisation statistics are
    mean 0 / std 1, every slide is its own patient.
    """
    from stevs.io.fold_file import Fold, SlideEntry, write_fold

    fold = Fold(
        fold=path.stem,
        scheme=scheme,
        seed=0,
        train=list(train),
        val=list(val or []),
        test=list(test),
        genes=list(genes),
        headline_genes=list(headline_genes if headline_genes is not None else genes),
        panel={"method": "gene_list", "n": len(genes)},
        normalisation={
            "method": "log1p_cp10k",
            "target_sum": 1e4,
            "mean": [0.0] * len(genes),
            "std": [1.0] * len(genes),
        },
        slides=[SlideEntry(s, s, str(a), str(p)) for s, (a, p) in slides.items()],
        spots=spots,
    )
    return write_fold(fold, path)


def write_patch_cache(
    path: Path,
    patches: np.ndarray,
    barcodes: list[str],
    centers_px: np.ndarray,
    *,
    mpp_target: float = 1.0,
    slide: str = "slide",
) -> Path:
    """A patch cache of test-made patches, through the one writer (stevs.io.patch_cache)."""
    from stevs.io.patch_cache import PatchCacheInfo, PatchCacheWriter, PatchScale

    n = len(barcodes)
    info = PatchCacheInfo(slide, "test", mpp_target, 0, "none", 15)
    with PatchCacheWriter(
        path,
        barcodes=barcodes,
        centers_px=np.asarray(centers_px, np.float64),
        outside_fraction=np.zeros(n, np.float32),
        tissue_fraction=np.ones(n, np.float32),
        scale=PatchScale(int(patches.shape[1]), mpp_target),
        info=info,
    ) as writer:
        for row, patch in enumerate(patches):
            writer.write(row, patch)
    return path


def he_like_image(width: int, height: int, xy: np.ndarray, diameter_px: float) -> np.ndarray:
    """White glass with pink 'tissue' disks (dark nuclei dots) around the spot centres ``xy``."""
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), 245, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    radius = max(diameter_px, 4.0)
    tissue = np.zeros((height, width), bool)
    for x, y in np.asarray(xy, np.float64):
        y0, y1 = max(0, int(y - radius)), min(height, int(y + radius) + 1)
        x0, x1 = max(0, int(x - radius)), min(width, int(x + radius) + 1)
        box = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 <= radius**2
        tissue[y0:y1, x0:x1] |= box
    image[tissue] = (225, 150, 200)
    image[tissue & (rng.random(tissue.shape) < 0.05)] = (90, 40, 130)
    return image


def add_he_images(adata, slide: str, diameter_px: float = 20.0) -> None:
    """``uns["spatial"][slide]`` of a test-made slide AnnData, through the one builder: an
    H&E-like image as large as the spots need, at full resolution."""
    from stevs.io.visium_uns import spatial_uns

    xy = np.asarray(adata.obsm["spatial"], np.float64)
    width, height = (int(np.ceil(v + diameter_px)) + 1 for v in xy.max(axis=0))
    image = he_like_image(width, height, xy, diameter_px / 2)
    adata.uns["spatial"] = {slide: spatial_uns(image, 1.0, diameter_px)}


def assert_draws_over_he(adata, gene: str, library_id: str | None = None) -> None:
    """``scanpy.pl.spatial(adata, color=gene)`` with default arguments draws the spots over the
    H&E: one library, hires uint8 at most 2000 px a side, every spot centre (x scale factor)
    inside both images and on tissue (not white glass) in hires, an AxesImage of hires drawn;
    and so does ``img_key=k`` for each of ``hires`` / ``lowres`` stored."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    from matplotlib.image import AxesImage

    library_id = library_id or adata.uns["stevs"]["slide"]
    assert list(adata.uns["spatial"]) == [library_id]
    entry = adata.uns["spatial"][library_id]
    keys = [k for k in ("hires", "lowres") if k in entry["images"]]
    assert keys, "no image"
    shown = entry["images"][keys[0]]  # what scanpy draws by default: hires, else lowres
    assert shown.dtype == np.uint8 and shown.ndim == 3 and shown.shape[2] == 3
    assert max(shown.shape) <= 2000
    for key in keys:
        image = entry["images"][key]
        assert image.dtype == np.uint8 and image.shape[2] == 3
        xy = np.asarray(adata.obsm["spatial"]) * entry["scalefactors"][f"tissue_{key}_scalef"]
        assert (xy >= -0.5).all(), key
        assert (xy[:, 0] < image.shape[1] - 0.5).all() and (xy[:, 1] < image.shape[0] - 0.5).all()
    scalef = entry["scalefactors"][f"tissue_{keys[0]}_scalef"]
    xy = np.rint(np.asarray(adata.obsm["spatial"]) * scalef).astype(int)
    xy = np.minimum(xy, np.array(shown.shape[1::-1]) - 1)
    on_spots = shown[xy[:, 1], xy[:, 0]]
    assert (on_spots.min(axis=1) < 230).mean() > 0.8  # spot centres are on tissue, not glass
    assert entry["scalefactors"]["spot_diameter_fullres"] > 0
    # the default key, then every key stored (img_key="lowres" as well as "hires")
    for key, image in [(None, shown)] + [(k, entry["images"][k]) for k in keys]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scanpy recommends squidpy
            warnings.simplefilter("ignore", PendingDeprecationWarning)  # scanpy's cmap.set_bad
            chosen = {} if key is None else {"img_key": key}
            axes = sc.pl.spatial(adata, color=gene, show=False, **chosen)
        try:
            assert len(axes) == 1 and axes[0].get_title() == gene
            drawn = [c for c in axes[0].get_children() if isinstance(c, AxesImage)]
            assert len(drawn) == 1 and drawn[0].get_array().shape[:2] == image.shape[:2], key
        finally:
            plt.close("all")
    assert_opens_in_squidpy_and_spatialdata(adata, gene, shown.shape[:2])


def assert_opens_in_squidpy_and_spatialdata(adata, gene: str, image_shape: tuple) -> None:
    """squidpy builds the spot graph and draws the gene over the H&E (default arguments);
    the AnnData written as SpatialData (``stevs.io.spatialdata_zarr``) reads back with the same
    values, spot centres and image."""
    import tempfile
    import warnings

    import matplotlib.pyplot as plt
    import spatialdata as sd
    import squidpy as sq
    from matplotlib.image import AxesImage
    from scipy import sparse

    from stevs.io.spatialdata_zarr import write_spatialdata

    copy = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # squidpy 1.8 names its successors
        sq.gr.spatial_neighbors(copy)
    graph = copy.obsp["spatial_connectivities"]
    assert graph.shape == (adata.n_obs, adata.n_obs) and graph.nnz >= adata.n_obs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        axes = sq.pl.spatial_scatter(copy, color=gene, return_ax=True)
    try:
        drawn = [c for c in axes.get_children() if isinstance(c, AxesImage)]
        assert len(drawn) == 1 and drawn[0].get_array().shape[:2] == image_shape
        assert axes.collections  # the spots
    finally:
        plt.close("all")

    def dense(matrix):
        return matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)

    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ome-zarr / zarr deprecation notices
            store = write_spatialdata(adata, Path(tmp) / "x.zarr")
            sdata = sd.read_zarr(store)
        table = sdata.tables["table"]
        np.testing.assert_array_equal(dense(table.X), dense(adata.X))
        for key in adata.layers:
            np.testing.assert_array_equal(dense(table.layers[key]), dense(adata.layers[key]))
        assert list(table.obs_names) == list(adata.obs_names)
        assert list(table.var_names) == list(adata.var_names)
        (region,) = sdata.shapes
        spots = sd.transform(sdata.shapes[region], to_coordinate_system="global")
        xy = np.column_stack([spots.geometry.x, spots.geometry.y])[table.obs["spot_id"]]
        np.testing.assert_allclose(xy, adata.obsm["spatial"])
        (image,) = sdata.images.values()
        assert tuple(image.sizes[d] for d in ("y", "x")) == tuple(image_shape)


def run_snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The project's Snakefile run by this interpreter's snakemake in ``cwd`` (tests only)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [str(bin_dir / "snakemake"), "--directory", str(cwd), "-s", str(root / "Snakefile"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@dataclass(frozen=True)
class Plan:
    """A dry run (``snakemake -n -p``) of the workflow: where it ran and what it printed."""

    cwd: Path
    stdout: str


@pytest.fixture(scope="session")
def demo_plan(tmp_path_factory) -> Plan:
    """The demo's plan (config/demo.yaml, from an empty folder), shared by the tests that read
    it: one dry run instead of one per test."""
    cwd = tmp_path_factory.mktemp("demo_plan")
    demo = Path(__file__).resolve().parents[1] / "config" / "demo.yaml"
    result = run_snakemake("-n", "-p", "--cores", "2", "--configfile", str(demo), cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return Plan(cwd, result.stdout)
