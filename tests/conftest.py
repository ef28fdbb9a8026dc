"""Shared test fixtures."""

from __future__ import annotations

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
