"""Tests of spot-centred tiling into the HDF5 patch cache (stevs.tiling, `stevs tile`)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from PIL import Image

from stevs import tiling, tiling_qc
from stevs.cli import main as stevs_main
from stevs.errors import StevsInputError
from stevs.io.slide import open_slide
from stevs.tiling import TileGeometry, tile_slide, tile_spots
from stevs.tiling_checks import read_slide_spots
from stevs.tiling_qc import QC_MAX_PX, draw_qc, save_qc
from stevs.tissue import MIN_TISSUE_SATURATION, detect_tissue

BACKGROUND = np.array([240, 238, 242], np.float64)  # glass: low saturation
TISSUE = np.array([205, 130, 180], np.float64)  # eosin-pink: saturated
NUCLEUS = np.array([60, 40, 110], np.float64)  # dark feature of known size


# -- synthetic slides --------------------------------------------------------------------


def _coverage(n: int, start: float, stop: float) -> np.ndarray:
    """Fraction of each pixel [i, i + 1) covered by the interval [start, stop)."""
    edges = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(edges + 1, stop) - np.maximum(edges, start), 0.0, 1.0)


def render_scene(
    width_um: float,
    height_um: float,
    mpp: float,
    squares_um: list[tuple[float, float, float]],
    tissue_right_um: float | None = None,
) -> np.ndarray:
    """Render a continuous scene (µm) exactly by pixel area coverage at ``mpp``.

    Tissue fills x < ``tissue_right_um`` (all of it when None) on glass; dark squares
    (centre x, centre y, side, in µm) lie on top.
    """
    width, height = round(width_um / mpp), round(height_um / mpp)
    tissue_cov = _coverage(width, 0, (tissue_right_um if tissue_right_um else width_um) / mpp)
    image = BACKGROUND + (TISSUE - BACKGROUND) * tissue_cov[None, :, None]
    image = np.broadcast_to(image, (height, width, 3)).copy()
    for cx, cy, side in squares_um:
        half = side / 2
        cov = np.outer(
            _coverage(height, (cy - half) / mpp, (cy + half) / mpp),
            _coverage(width, (cx - half) / mpp, (cx + half) / mpp),
        )
        image += (NUCLEUS - image) * cov[:, :, None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_pyramid(
    path: Path, levels: list[np.ndarray], mpp: float, compression: str | None = None
) -> Path:
    """A tiled pyramidal TIFF (reduced pages, resolution in cm) that OpenSlide reads."""
    with tifffile.TiffWriter(path) as tif:
        for k, data in enumerate(levels):
            scale = 2**k
            tif.write(
                data,
                tile=(64, 64),
                photometric="rgb",
                compression=compression,
                subfiletype=1 if k else 0,
                resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)),
                resolutionunit="CENTIMETER",
            )
    return path


def scene_slide(
    path: Path,
    mpp: float,
    squares_um: list[tuple[float, float, float]],
    size_um: tuple[float, float] = (192.0, 128.0),
    n_levels: int = 3,
    tissue_right_um: float | None = None,
    compression: str | None = None,
) -> Path:
    """The same physical scene as a pyramidal TIFF (each level rendered exactly) or a PNG."""
    levels = [
        render_scene(*size_um, mpp * 2**k, squares_um, tissue_right_um) for k in range(n_levels)
    ]
    if path.suffix == ".png":
        Image.fromarray(levels[0]).save(path)
        return path
    return write_pyramid(path, levels, mpp, compression)


def write_slide_adata(
    path: Path,
    image: Path,
    centers_px: np.ndarray,
    mpp: float | None,
    barcodes: list[str] | None = None,
    **extra: object,
) -> Path:
    """A slide AnnData as docs/architecture.md describes it (only what tiling reads)."""
    n = len(centers_px)
    barcodes = barcodes or [f"AC{i:04d}-1" for i in range(n)]
    adata = anndata.AnnData(
        X=sp.csr_matrix(np.ones((n, 2), np.int32)),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame(index=["GENE1", "GENE2"]),
    )
    adata.obsm["spatial"] = np.asarray(centers_px, np.float64)
    meta: dict[str, object] = {"slide": path.stem, "image_path": str(image), **extra}
    if mpp is not None:
        meta["mpp"] = mpp
    adata.uns["stevs"] = meta
    adata.write_h5ad(path)
    return path


def um_to_px(points_um: np.ndarray, mpp: float) -> np.ndarray:
    """Spot coordinates (integer = pixel centre) of physical points."""
    return np.asarray(points_um, np.float64) / mpp - 0.5


def darkness(patch: np.ndarray) -> np.ndarray:
    """How much of the dark feature covers each pixel (0..1), from the red channel."""
    return np.clip((TISSUE[0] - patch[..., 0].astype(np.float64)) / (TISSUE[0] - NUCLEUS[0]), 0, 1)


# -- geometry --------------------------------------------------------------------------------

SPOTS_UM = np.array([[40.3, 35.2], [100.0, 64.0], [151.7, 90.9], [72.6, 98.1]])
FEATURE_UM = 12.0  # side of the dark square at every spot
PATCH_PX, PATCH_MPP = 48, 0.5  # 24 µm field of view


@pytest.mark.parametrize(
    ("name", "mpp", "expected_level"),
    [
        ("fine.tif", 0.25, 1),  # pyramid: level 1 is 0.5 µm/px, patches are cut, not resampled
        ("odd.tif", 0.3, 0),  # 1.67x downsampling from level 0
        ("coarse.png", 0.8, 0),  # plain image, upsampled 1.6x
    ],
)
def test_patch_centre_and_feature_size_at_different_resolutions(
    tmp_path: Path, name: str, mpp: float, expected_level: int
) -> None:
    squares = [(x, y, FEATURE_UM) for x, y in SPOTS_UM]
    image = scene_slide(tmp_path / name, mpp, squares)
    centers = um_to_px(SPOTS_UM, mpp)
    adata = write_slide_adata(tmp_path / "s.h5ad", image, centers, mpp)
    out = tile_slide(adata, tmp_path / "p.h5", patch_px=PATCH_PX, patch_mpp=PATCH_MPP)
    with h5py.File(out) as f:
        patches = f["patches"][:]
        assert f.attrs["read_level"] == expected_level
        assert f.attrs["mpp_source"] == pytest.approx(mpp)
        assert f.attrs["patch_um"] == pytest.approx(PATCH_PX * PATCH_MPP)
    assert patches.shape == (len(SPOTS_UM), PATCH_PX, PATCH_PX, 3)
    feature_px = FEATURE_UM / PATCH_MPP  # 24 target px
    grid = np.arange(PATCH_PX) + 0.5  # pixel centres in the patch frame
    # where the spot centre should land in the patch: exactly the middle when resampled;
    # when cut from a level at the target resolution, off by the snap to whole pixels
    expected = np.full((len(SPOTS_UM), 2), PATCH_PX / 2)
    if expected_level == 1:
        level_left_top = (centers + 0.5) / 2.0 - PATCH_PX / 2
        snap = level_left_top - np.floor(level_left_top + 0.5)
        assert np.abs(snap).max() > 0.1  # the test spots are not on the pixel grid
        expected += snap
    for patch, (ex, ey) in zip(patches, expected, strict=True):
        dark = darkness(patch)
        cx = (dark.sum(axis=0) * grid).sum() / dark.sum()
        cy = (dark.sum(axis=1) * grid).sum() / dark.sum()
        assert abs(cx - ex) < 0.1 and abs(cy - ey) < 0.1
        assert abs(cx - PATCH_PX / 2) <= 0.5 and abs(cy - PATCH_PX / 2) <= 0.5
        # a 12 µm square spans 24 target px: area and the dark run across the centre row
        assert dark.sum() == pytest.approx(feature_px**2, rel=0.04)
        row = dark[round(ey)]
        assert row.sum() == pytest.approx(feature_px, abs=0.6)
        assert abs(int((row > 0.5).sum()) - feature_px) <= 1


def test_same_scene_at_two_resolutions_gives_the_same_patches(tmp_path: Path) -> None:
    squares = [(x, y, FEATURE_UM) for x, y in SPOTS_UM]
    results = []
    for mpp, name in ((0.3, "s.tif"), (0.4, "s.png")):
        directory = tmp_path / f"mpp{mpp}"
        directory.mkdir()
        image = scene_slide(directory / name, mpp, squares)
        adata = write_slide_adata(directory / "s.h5ad", image, um_to_px(SPOTS_UM, mpp), mpp)
        out = tile_slide(adata, directory / "p.h5", patch_px=PATCH_PX, patch_mpp=PATCH_MPP)
        with h5py.File(out) as f:
            results.append(f["patches"][:].astype(np.int16))
    diff = np.abs(results[0] - results[1])
    assert diff.mean() < 2.0
    assert np.percentile(diff, 99) < 25


@pytest.mark.parametrize(("mpp", "level", "tolerance"), [(0.25, 1, 0), (0.3, 0, 2)])
def test_patches_follow_obs_order_and_match_single_reads(
    tmp_path: Path, mpp: float, level: int, tolerance: int
) -> None:
    rng = np.random.default_rng(0)
    squares = [tuple(row) for row in rng.uniform([5, 5, 3], [187, 123, 15], (40, 3))]
    image = scene_slide(tmp_path / "s.tif", mpp, squares)
    centers = rng.uniform([0, 0], [192 / mpp - 1, 128 / mpp - 1], (60, 2))  # many windows
    adata = write_slide_adata(tmp_path / "s.h5ad", image, centers, mpp)
    out = tile_slide(
        adata, tmp_path / "p.h5", patch_px=32, patch_mpp=0.5, window_patches=1, threads=2
    )
    with open_slide(image) as slide:
        downsample = slide.level_downsamples[level]
        geometry = TileGeometry(mpp, 32, 0.5, level=level, level_downsample=downsample)
        boxes = geometry.boxes(centers)
        if geometry.at_level_resolution:  # cut at whole level pixels
            boxes = np.floor(boxes / downsample + 0.5) * downsample
        with h5py.File(out) as f:
            assert f.attrs["read_level"] == level
            assert [b.decode() for b in f["barcodes"][:]] == [f"AC{i:04d}-1" for i in range(60)]
            np.testing.assert_array_equal(f["centers_px"][:], centers)
            assert f["patches"].chunks == (1, 32, 32, 3)
            for i, (left, top, right, bottom) in enumerate(boxes):
                single = slide.read_region((left, top, right - left, bottom - top), (32, 32))
                diff = np.abs(f["patches"][i].astype(int) - single.astype(int))
                assert diff.max() <= tolerance, f"patch {i} differs from a read of its box"


def test_windows_cover_every_spot_once_with_bounded_size() -> None:
    geometry = TileGeometry(0.25, 224, 0.5, level=1, level_downsample=2.0)
    rng = np.random.default_rng(1)
    centers = rng.uniform(0, 40_000, (5_000, 2))
    boxes = geometry.boxes(centers)
    windows = tiling.plan_windows(boxes, geometry, window_patches=4)
    served = np.sort(np.concatenate([w.indices for w in windows]))
    np.testing.assert_array_equal(served, np.arange(len(centers)))
    # a window is at most (4 + 1) patches (224 level px each) plus the filter margin
    assert max(max(w.width, w.height) for w in windows) <= 5 * 224 + 10
    for w in windows[:50]:
        level_boxes = boxes[w.indices] / 2.0
        assert (level_boxes[:, 0] >= w.x).all() and (level_boxes[:, 2] <= w.x + w.width).all()
        assert (level_boxes[:, 1] >= w.y).all() and (level_boxes[:, 3] <= w.y + w.height).all()


# -- edges, tissue -----------------------------------------------------------------------------


def test_edge_spots_are_padded_white_and_flagged(tmp_path: Path) -> None:
    mpp = 0.25
    image = scene_slide(tmp_path / "s.tif", mpp, [])  # all tissue, 768 x 512 px
    centers = np.array(
        [
            [-0.5, -0.5],  # centre on the top-left corner: 3/4 outside
            [383.5, 1.5],  # 2 px below the top edge: (64 - 2) / 128 outside
            [383.5, 255.5],  # well inside
            [767.0, 511.0],  # last pixel: 3/4 outside (minus half a pixel)
        ]
    )
    adata = write_slide_adata(tmp_path / "s.h5ad", image, centers, mpp)
    out = tile_slide(adata, tmp_path / "p.h5", patch_px=32, patch_mpp=1.0)  # 128 level-0 px
    with h5py.File(out) as f:
        patches, outside = f["patches"][:], f["outside_fraction"][:]
        tissue = f["tissue_fraction"][:]
    assert len(patches) == 4  # never dropped
    expected = [0.75, 62 / 128, 0.0, 1 - (64.5 / 128) ** 2]
    np.testing.assert_allclose(outside, expected, atol=1e-6)
    corner = patches[0].astype(int)
    assert (corner[:15, :, :] == 255).all() and (corner[:, :15, :] == 255).all()
    assert np.abs(corner[18:, 18:] - TISSUE).max() <= 2  # inside: tissue colour
    top = patches[1].astype(int)
    assert (top[:14] == 255).all() and np.abs(top[17:] - TISSUE).max() <= 2
    assert np.abs(patches[2].astype(int) - TISSUE).max() <= 2
    # outside counts as no tissue
    assert tissue[2] == pytest.approx(1.0)
    assert tissue[0] == pytest.approx(0.25, abs=0.05)


def test_tissue_fraction_from_the_cleaned_otsu_mask(tmp_path: Path) -> None:
    mpp = 2.0
    # tissue on the left 400 µm of a 1024 µm wide slide, glass on the right; a 6 µm speck
    # of stain on the glass is below the smallest piece of tissue kept (0.02 mm²)
    image = scene_slide(
        tmp_path / "s.tif", mpp, [(900.0, 100.0, 6.0)], size_um=(1024, 512), tissue_right_um=400
    )
    points = np.array([[160.0, 256.0], [400.0, 256.0], [800.0, 256.0], [900.0, 100.0]])
    # measured spots sit on tissue (at most 10% of them background): 18 more on tissue
    on_tissue = [[x, y] for x in (80.0, 160.0, 240.0) for y in (80.0, 150, 220, 290, 360, 430)]
    points = np.concatenate([points, on_tissue])
    adata = write_slide_adata(tmp_path / "s.h5ad", image, um_to_px(points, mpp), mpp)
    out = tile_slide(adata, tmp_path / "p.h5", patch_px=32, patch_mpp=4.0)  # 128 µm patches
    with h5py.File(out) as f:
        tissue = f["tissue_fraction"][:]
        assert f["tissue_fraction"].dtype == np.float32
        threshold = int(f.attrs["tissue_threshold_saturation"])
    # tissue, border, glass, the speck (dropped by the clean-up)
    np.testing.assert_allclose(tissue, [1.0, 0.5, 0.0, 0.0] + [1.0] * 18, atol=0.05)
    with open_slide(image) as slide:
        detection = detect_tissue(slide)
    assert detection.threshold == threshold
    assert MIN_TISSUE_SATURATION <= threshold < 90  # between glass (~3) and tissue (~92)


@pytest.mark.parametrize("threads", [1, 2])
def test_spots_on_glass_are_refused_whether_or_not_tissue_overlaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    import threading

    mpp = 2.0
    image = scene_slide(tmp_path / "s.tif", mpp, [], size_um=(1024, 512), tissue_right_um=400)
    points = np.array([[700.0, 100.0], [800.0, 256.0], [900.0, 400.0]])  # all on glass
    adata = write_slide_adata(tmp_path / "s.h5ad", image, um_to_px(points, mpp), mpp)
    detected_in = []

    def detect(*args, **kwargs):
        detected_in.append(threading.current_thread().name)
        return detect_tissue(*args, **kwargs)

    monkeypatch.setattr(tiling, "detect_tissue", detect)
    out = tmp_path / "out" / "p.h5"
    with pytest.raises(StevsInputError, match="spot patches are background"):
        tile_slide(adata, out, patch_px=32, patch_mpp=4.0, threads=threads)
    assert list(out.parent.iterdir()) == []
    # with a thread to spare, the tissue is detected beside the patches, not before them
    assert len(detected_in) == 1
    assert detected_in[0].startswith("stevs-tile") == (threads > 1)


# -- files: atomic writes, reruns, QC, CLI -------------------------------------------------------


@pytest.fixture
def small_slide(tmp_path: Path) -> Path:
    mpp = 0.25
    rng = np.random.default_rng(3)
    squares = [(x, y, 8.0) for x, y in rng.uniform(10, 118, (12, 2))]
    image = scene_slide(tmp_path / "s.tif", mpp, squares)
    centers = rng.uniform(0, 511, (30, 2))
    return write_slide_adata(
        tmp_path / "s.h5ad", image, centers, mpp, image_width=768, image_height=512
    )


def test_forced_failure_leaves_no_cache_file(
    small_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cache" / "p.h5"
    real_cut = tiling.cut_patches
    calls = []

    def failing_cut(*args, **kwargs):
        # while writing, only a temporary file exists under another name
        assert not out.exists()
        assert len(list(out.parent.glob(".p.h5.tmp-*"))) == 1
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real_cut(*args, **kwargs)

    monkeypatch.setattr(tiling, "cut_patches", failing_cut)
    with pytest.raises(RuntimeError, match="disk on fire"):
        tile_slide(small_slide, out, patch_px=32, patch_mpp=0.5, window_patches=1)
    assert len(calls) == 2
    assert list(out.parent.iterdir()) == []


def test_rerun_gives_identical_bytes_whatever_the_threads(
    small_slide: Path, tmp_path: Path
) -> None:
    first = tile_slide(small_slide, tmp_path / "a.h5", patch_px=32, window_patches=1, threads=1)
    time.sleep(1.1)  # HDF5 timestamps have one-second resolution
    second = tile_slide(small_slide, tmp_path / "b.h5", patch_px=32, window_patches=1, threads=3)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    assert digest[0] == digest[1]
    with h5py.File(first) as f:
        assert not (f["patches"][:] == 0).all()


def test_cache_contract_and_qc_picture(small_slide: Path, tmp_path: Path) -> None:
    out, qc = tmp_path / "p.h5", tmp_path / "qc" / "s.qc.png"
    tile_slide(small_slide, out, patch_px=32, patch_mpp=0.5, qc_path=qc)
    with h5py.File(out) as f:
        assert set(f) >= {
            "patches",
            "barcodes",
            "centers_px",
            "outside_fraction",
            "tissue_fraction",
        }
        assert f["patches"].dtype == np.uint8 and f["patches"].shape == (30, 32, 32, 3)
        assert f["centers_px"].dtype == np.float64
        assert f["outside_fraction"].dtype == np.float32
        attrs = dict(f.attrs)
        assert attrs["mpp_target"] == 0.5 and attrs["patch_px"] == 32
        assert attrs["patch_um"] == 16.0 and attrs["slide"] == "s"
        assert attrs["source_path"].endswith("s.tif")
        assert isinstance(attrs["stevs_version"], str)
        outside = f["outside_fraction"][:]
    picture = np.asarray(Image.open(qc).convert("RGB"))
    assert picture.shape[:2] == (512, 768)  # the tissue thumbnail: <= 2000 px, never upsampled
    green = np.all(picture == (0, 170, 0), axis=2).sum()
    orange = np.all(picture == (255, 140, 0), axis=2).sum()
    assert green > 0
    assert (orange > 0) == bool((outside > 0).any())


def test_cli_tile_with_patch_um(small_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    args = ["tile", "--slide", str(small_slide), "--out", str(out), "--patch-px", "32"]
    code = stevs_main(
        [*args, "--patch-um", "32", "--threads", "2", "--qc", str(tmp_path / "q.png")]
    )
    assert code == 0
    with h5py.File(out) as f:
        assert f.attrs["mpp_target"] == pytest.approx(1.0)
        assert f["patches"].shape == (30, 32, 32, 3)
    assert (tmp_path / "q.png").is_file()


def test_cli_reports_bad_input_naming_the_file(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tile", "--slide", str(small_slide), "--out", str(tmp_path / "p.h5")]
    assert stevs_main([*argv, "--patch-px", "0"]) == 2  # the option's range
    assert "argument --patch-px: must be a whole number from 8 to 4096" in capsys.readouterr().err
    assert stevs_main([*argv, "--patch-px", "4096", "--patch-um", "10"]) == 2  # 0.0024 µm/px
    err = capsys.readouterr().err
    assert str(small_slide) in err and "patch resolution" in err
    assert not (tmp_path / "p.h5").exists()


def test_mpp_override_and_image_option(tmp_path: Path) -> None:
    # the TIFF says 0.25 µm/px and the AnnData nothing; the override says the truth is 0.5
    image = scene_slide(tmp_path / "s.tif", 0.25, [])
    adata = write_slide_adata(tmp_path / "s.h5ad", tmp_path / "elsewhere.tif", [[100, 100]], None)
    out = tile_slide(
        adata, tmp_path / "p.h5", patch_px=32, patch_mpp=1.0, image_path=image, mpp_override=0.5
    )
    with h5py.File(out) as f:
        assert f.attrs["mpp_source"] == 0.5
        assert f.attrs["read_level"] == 1  # 1.0 / 0.5 = downsample 2
        assert f.attrs["source_path"] == str(image)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch_px", "patch_mpp", "message"),
    [
        (0, 0.5, "patch size"),
        (-16, 0.5, "patch size"),
        (100_000, 0.5, "patch size"),
        (32.5, 0.5, "whole number"),
        (32, 0.0, "resolution"),
        (32, -1.0, "resolution"),
        (32, float("nan"), "resolution"),
        (32, 0.01, "resolution"),
    ],
)
def test_nonsense_patch_settings(
    small_slide: Path, tmp_path: Path, patch_px, patch_mpp, message
) -> None:
    with pytest.raises(StevsInputError, match=message) as info:
        tile_slide(small_slide, tmp_path / "p.h5", patch_px=patch_px, patch_mpp=patch_mpp)
    assert str(small_slide) in str(info.value)


def test_patch_larger_than_slide_or_too_upsampled(small_slide: Path, tmp_path: Path) -> None:
    with pytest.raises(StevsInputError, match="larger than the whole slide") as info:
        tile_slide(small_slide, tmp_path / "p.h5", patch_px=1024, patch_mpp=1.0)
    assert "s.tif" in str(info.value)
    with pytest.raises(StevsInputError, match="upsampling"):
        tile_slide(small_slide, tmp_path / "p.h5", patch_px=32, patch_mpp=0.05)


def test_nan_coordinates_are_refused(tmp_path: Path) -> None:
    image = scene_slide(tmp_path / "s.tif", 0.25, [])
    adata = write_slide_adata(
        tmp_path / "s.h5ad", image, [[10, 10], [np.nan, 20], [30, np.inf]], 0.25
    )
    with pytest.raises(StevsInputError, match="2 spots have NaN") as info:
        tile_slide(adata, tmp_path / "p.h5", patch_px=32)
    assert str(adata) in str(info.value) and "AC0001-1" in str(info.value)
    assert not (tmp_path / "p.h5").exists()


def test_slide_adata_from_another_image_is_refused(tmp_path: Path) -> None:
    image = scene_slide(tmp_path / "s.tif", 0.25, [])  # 768 x 512 px
    wrong_size = write_slide_adata(
        tmp_path / "a.h5ad", image, [[10, 10]], 0.25, image_width=9000, image_height=512
    )
    with pytest.raises(StevsInputError, match="does not match .* another image") as info:
        tile_slide(wrong_size, tmp_path / "p.h5", patch_px=32)
    assert str(wrong_size) in str(info.value) and "9000x512" in str(info.value)
    spots_off_image = write_slide_adata(tmp_path / "b.h5ad", image, [[10, 10], [5000, 300]], 0.25)
    with pytest.raises(StevsInputError, match="1 of 2 spot centres lie outside") as info:
        tile_slide(spots_off_image, tmp_path / "p.h5", patch_px=32)
    assert str(spots_off_image) in str(info.value)


def test_missing_mpp_and_missing_image_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(plain)
    no_mpp = write_slide_adata(tmp_path / "a.h5ad", plain, [[10, 10]], None)
    with pytest.raises(StevsInputError, match="microns per pixel unknown") as info:
        tile_slide(no_mpp, tmp_path / "p.h5", patch_px=16, patch_mpp=0.5)
    assert str(plain) in str(info.value)
    gone = write_slide_adata(tmp_path / "b.h5ad", tmp_path / "gone.tif", [[10, 10]], 0.5)
    with pytest.raises(StevsInputError, match="not found") as info:
        tile_slide(gone, tmp_path / "p.h5", patch_px=16)
    assert "gone.tif" in str(info.value)
    with pytest.raises(StevsInputError, match="slide AnnData not found"):
        tile_slide(tmp_path / "nothing.h5ad", tmp_path / "p.h5")


def test_unreadable_level_is_reported_with_the_file(tmp_path: Path) -> None:
    image = scene_slide(tmp_path / "s.tif", 0.25, [], compression="zlib")
    # damage the tiles of level 1, the level that 0.5 µm/px patches are read from
    with tifffile.TiffFile(image) as tif:
        level1 = tif.pages[1]
        damaged = list(zip(level1.dataoffsets, level1.databytecounts, strict=True))
    with open(image, "r+b") as fh:
        for offset, count in damaged:
            fh.seek(offset)
            fh.write(b"\x00garbage!" * (count // 9) + b"\x00" * (count % 9))
    adata = write_slide_adata(tmp_path / "s.h5ad", image, [[300, 200]], 0.25)
    with pytest.raises(StevsInputError, match="cannot read level 1") as info:
        tile_slide(adata, tmp_path / "p.h5", patch_px=32, patch_mpp=0.5)
    assert str(image) in str(info.value)
    assert list(tmp_path.glob("p.h5*")) == []


def test_tile_spots_on_an_open_slide_matches_tile_slide(small_slide: Path, tmp_path: Path) -> None:
    reference = tile_slide(small_slide, tmp_path / "a.h5", patch_px=32, patch_mpp=0.5)
    spots = read_slide_spots(small_slide)
    with open_slide(tmp_path / "s.tif", mpp=0.25) as slide:
        ours = tile_spots(
            slide,
            spots.barcodes,
            spots.centers_px,
            tmp_path / "b.h5",
            slide_id="s",
            patch_px=32,
            patch_mpp=0.5,
            tissue=detect_tissue(slide),
        )
        # the same bytes: tile_slide is only the slide AnnData reader around tile_spots
        assert (
            hashlib.sha256(ours.read_bytes()).digest()
            == hashlib.sha256(reference.read_bytes()).digest()
        )
        with pytest.raises(StevsInputError, match="1 of 2 spot centres lie outside") as info:
            tile_spots(slide, ["a", "b"], [[5, 5], [900, 5]], tmp_path / "c.h5", slide_id="s")
        assert str(info.value).startswith(str(slide.path))
        with pytest.raises(StevsInputError, match="not unique"):
            tile_spots(slide, ["a", "a"], [[5, 5], [9, 5]], tmp_path / "c.h5", slide_id="s")
    assert not (tmp_path / "c.h5").exists()


def test_qc_picture_is_small_and_keeps_the_box_colours(tmp_path: Path) -> None:
    thumbnail = np.full((2000, 1500, 3), 230, np.uint8)
    boxes = np.array([[0, 0, 400, 400], [3000, 3000, 3400, 3400]], dtype=np.float64)
    picture = draw_qc(thumbnail, boxes, np.array([0.5, 0.0]), (6000, 8000), "s")
    assert max(picture.size) == QC_MAX_PX
    save_qc(picture, tmp_path / "qc.png")
    saved = Image.open(tmp_path / "qc.png")
    assert saved.mode == "P"  # palette PNG, not lossless RGB
    rgb = np.asarray(saved.convert("RGB"))
    assert np.all(rgb == (0, 170, 0), axis=2).any() and np.all(rgb == (255, 140, 0), axis=2).any()


def test_windows_follow_the_tile_grid_of_the_level_read() -> None:
    geometry = TileGeometry(0.25, 224, 0.5, level=1, level_downsample=2.0)
    rng = np.random.default_rng(2)
    centers = rng.uniform(0, 40_000, (3_000, 2))
    boxes = geometry.boxes(centers)
    windows = tiling.plan_windows(boxes, geometry, window_patches=4, tile=(256, 512))
    served = np.sort(np.concatenate([w.indices for w in windows]))
    np.testing.assert_array_equal(served, np.arange(len(centers)))
    cell_w, cell_h = 1024, 1024  # 4 patches of 224 level px, rounded to whole tiles
    for w in windows:
        level = boxes[w.indices] / 2.0
        cx, cy = (level[:, 0] + level[:, 2]) / 2, (level[:, 1] + level[:, 3]) / 2
        assert len(set(np.floor(cx / cell_w))) == 1 and len(set(np.floor(cy / cell_h))) == 1


def test_background_writer_raises_the_writers_error() -> None:
    class Failing:
        def __init__(self) -> None:
            self.rows: list[int] = []

        def write(self, row: int, patch: np.ndarray) -> None:
            if row == 3:
                raise ValueError("disk full")
            self.rows.append(row)

    writer = Failing()
    patches = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="disk full"):
        with tiling.BackgroundWriter(writer, depth=1) as background:  # type: ignore[arg-type]
            for start in range(0, 40, 2):
                background.put(np.arange(start, start + 2), patches)
    assert writer.rows == [0, 1, 2]


def test_spot_centres_are_read_without_anndata_alike(tmp_path: Path) -> None:
    from stevs.io.slide_adata import read_slide_adata, read_slide_centres, slide_meta

    image = scene_slide(tmp_path / "s.tif", 0.25, [])
    centres = np.array([[10.5, 10], [300, 20.25], [40, 400]])
    path = write_slide_adata(tmp_path / "s.h5ad", image, centres, 0.25, image_width=768)
    barcodes, centres, meta = read_slide_centres(path)
    adata = read_slide_adata(path)
    assert barcodes == list(adata.obs_names)
    np.testing.assert_array_equal(centres, adata.obsm["spatial"])
    assert meta == slide_meta(adata, path)


def test_qc_draws_every_spot_and_boxes_that_do_not_overlap(tmp_path: Path) -> None:
    """128 µm patches on a 100 µm pitch overlap; the QC picture draws every spot's circle and
    the box of a sample of spots set apart, so each box can be judged against its spot."""
    centres = np.indices((12, 12)).reshape(2, -1).T * 100.0 + 200.0
    boxes = np.hstack([centres - 64, centres + 64])
    outside = np.zeros(len(boxes))
    outside[0] = 0.1
    sample = tiling_qc.separate_boxes(boxes, outside)
    assert 10 <= len(sample) < len(boxes) and 0 in sample  # the edge-crossing box first
    chosen = boxes[sample]
    for i, (left, top, right, bottom) in enumerate(chosen):
        others = np.delete(chosen, i, axis=0)
        apart = (others[:, 2] < left) | (others[:, 0] > right)
        apart |= (others[:, 3] < top) | (others[:, 1] > bottom)
        assert apart.all()
    thumbnail = np.full((1400, 1400, 3), 230, np.uint8)  # at QC_MAX_PX: 1 px = 1 level-0 px
    picture = draw_qc(thumbnail, boxes, outside, (1400, 1400), "s", spot_diameter_px=55.0)
    rgb = np.asarray(picture)
    blue = np.all(rgb == (0, 90, 255), axis=2)
    assert blue.sum() > len(boxes) * 100  # 144 circles of 55 px: ~170 px of outline each
    columns = np.flatnonzero(blue[150:250, 150:250].any(axis=0))  # the first spot's circle
    assert columns.max() - columns.min() == pytest.approx(55, abs=2)
    green = np.all(rgb == (0, 170, 0), axis=2)
    assert 0 < green.sum() < len(sample) * 4 * 130 * 2 + 1
