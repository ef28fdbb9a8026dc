"""What tiling accepts: spots from a slide AnnData, and the checks that refuse bad input.

Spot centres must be finite, unique and on the image (:func:`check_centers`, with the
recorded image size: :func:`check_spots_match_image`); patch sizes, resolutions, thread
counts and window sizes must make sense (:func:`check_tiling_settings`); and measured spots
must fall on the slide's detected tissue (:func:`check_spots_on_tissue`: coordinates in
another image's scale otherwise). Used by :mod:`stevs.tiling`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from stevs.errors import StevsInputError
from stevs.io.slide import SlideReader
from stevs.io.slide_adata import read_slide_centres
from stevs.tissue import TissueDetection

log = logging.getLogger(__name__)

#: patch sizes outside this range (pixels) are refused
PATCH_PX_RANGE = (8, 4096)
#: target resolutions outside this range (µm per pixel) are refused
PATCH_MPP_RANGE = (0.05, 50.0)


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideSpots:
    """What tiling needs from a slide AnnData."""

    path: Path
    slide: str
    barcodes: list[str]
    centers_px: np.ndarray  # float64 (n, 2) level-0 (x, y)
    mpp: float | None
    image_path: str | None
    image_size: tuple[int, int] | None  # recorded (width, height), when present
    spot_diameter_um: float = float("nan")  # the technology's spot diameter, when known


def read_slide_spots(path: str | os.PathLike) -> SlideSpots:
    """Read and check spot centres and slide metadata from a slide AnnData."""
    path = Path(path)
    barcodes, centers, meta = read_slide_centres(path)
    return SlideSpots(
        path=path,
        slide=meta.slide,
        barcodes=barcodes,
        centers_px=centers,
        mpp=meta.mpp,
        image_path=meta.image_path or None,
        image_size=meta.image_size,
        spot_diameter_um=meta.spot_diameter_um,
    )


def check_centers(
    path: str | os.PathLike | None,
    barcodes: Sequence[str],
    centers_px: np.ndarray,
    slide: SlideReader,
) -> None:
    """Refuse spot centres that are not finite or lie off ``slide`` (``path``: their source)."""
    centers = np.asarray(centers_px)
    if centers.ndim != 2 or centers.shape[1] != 2 or len(centers) != len(barcodes):
        raise StevsInputError(
            path,
            f"spot centres must be ({len(barcodes)}, 2) like the barcodes, not {centers.shape}",
        )
    if len(centers) == 0:
        raise StevsInputError(path, "no spots to tile")
    if len(set(barcodes)) != len(barcodes):
        raise StevsInputError(path, "spot barcodes are not unique")
    bad = ~np.isfinite(centers).all(axis=1)
    if bad.any():
        examples = ", ".join(str(barcodes[i]) for i in np.flatnonzero(bad)[:3])
        raise StevsInputError(
            path, f"{int(bad.sum())} spots have NaN or infinite coordinates (e.g. {examples})"
        )
    width, height = slide.dimensions
    x, y = centers[:, 0], centers[:, 1]
    outside = (x < -0.5) | (y < -0.5) | (x >= width - 0.5) | (y >= height - 0.5)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise StevsInputError(
            path,
            f"{int(outside.sum())} of {len(x)} spot centres lie outside {slide.path} "
            f"({width}x{height} px), e.g. {barcodes[i]} at ({x[i]:.1f}, {y[i]:.1f}): "
            "is this slide AnnData from another image?",
        )


def check_spots_match_image(spots: SlideSpots, slide: SlideReader) -> None:
    """Refuse a slide AnnData whose spots or recorded size do not fit this image."""
    width, height = slide.dimensions
    if spots.image_size is not None and spots.image_size != (width, height):
        raise StevsInputError(
            spots.path,
            f"recorded image size {spots.image_size[0]}x{spots.image_size[1]} does not match "
            f"{slide.path} ({width}x{height}): is this slide AnnData from another image?",
        )
    check_centers(spots.path, spots.barcodes, spots.centers_px, slide)


def check_patch_settings(
    patch_px: int, patch_mpp: float, path: str | os.PathLike | None = None
) -> None:
    """Refuse patch sizes and resolutions that make no sense (``path``: the slide tiled)."""
    if isinstance(patch_px, bool) or not isinstance(patch_px, int | np.integer):
        raise StevsInputError(
            path, f"patch size must be a whole number of pixels, got {patch_px!r}"
        )
    if not PATCH_PX_RANGE[0] <= patch_px <= PATCH_PX_RANGE[1]:
        raise StevsInputError(
            path, f"patch size {patch_px} px is outside {PATCH_PX_RANGE[0]}-{PATCH_PX_RANGE[1]} px"
        )
    if not (
        isinstance(patch_mpp, int | float)
        and math.isfinite(patch_mpp)
        and PATCH_MPP_RANGE[0] <= patch_mpp <= PATCH_MPP_RANGE[1]
    ):
        raise StevsInputError(
            path,
            f"patch resolution {patch_mpp!r} µm/px is outside "
            f"{PATCH_MPP_RANGE[0]}-{PATCH_MPP_RANGE[1]} µm/px",
        )


def check_tiling_settings(
    patch_px: int,
    patch_mpp: float,
    threads: int,
    window_patches: int,
    path: str | os.PathLike | None = None,
) -> None:
    """Refuse nonsense patch scales, thread counts and window sizes (``path``: for the message)."""
    check_patch_settings(patch_px, patch_mpp, path)
    if threads < 1:
        raise StevsInputError(path, f"threads must be >= 1, got {threads}")
    if window_patches < 1:
        raise StevsInputError(path, f"window size must be >= 1 patch, got {window_patches}")


# -- spots vs tissue ---------------------------------------------------------------------------

#: a patch with less than this share of its box on tissue is background
BACKGROUND_TISSUE_FRACTION = 0.1
#: spots are refused when more than this share of their patches is background ...
MAX_BACKGROUND_SHARE = 0.1
#: ... or more than MAX_OFF_TISSUE_SHARE of them have less than OFF_TISSUE_FRACTION of
#: their box on tissue. Measured (patch boxes of 112-128 µm; share background / off
#: tissue): each of the 5 her2st sections 0% / 0.6-2.2%, demo slides 0% / 0-8.1% (spots
#: on tissue, as Visium's in_tissue spots are); a her2st section's spots on another
#: section's image 13-82% / 17-83%; at half scale: her2st 88-100%, demo 9-55% / 34-66%
OFF_TISSUE_FRACTION = 0.5
MAX_OFF_TISSUE_SHARE = 0.2
#: tissue this many times larger than the spots' extent suggests a downscaled image's pixels
SCALE_HINT_RATIO = 1.5


def check_spots_on_tissue(
    path: str | os.PathLike | None,
    slide_path: str | os.PathLike,
    tissue: TissueDetection,
    boxes: np.ndarray,
    tissue_fraction: np.ndarray,
) -> None:
    """Refuse spots when more than :data:`MAX_BACKGROUND_SHARE` of their patches are
    background, or more than :data:`MAX_OFF_TISSUE_SHARE` mostly off the detected tissue.

    Measured spots sit on tissue, so that is what coordinates in another image's scale look
    like (e.g. Space Ranger's hires pixels given for the full-resolution image: the spots
    crowd into a corner), or another section's image, or spots off the tissue kept.
    """
    within = tissue.tissue_within(boxes)
    if len(boxes) == 0 or not math.isfinite(within):
        log.warning("%s: no tissue detected; cannot check where the spots fall", slide_path)
        return
    # of the part of each patch on the image: a spot at the edge is not on glass
    on_image = replace(tissue, mask=np.ones_like(tissue.mask)).box_fractions(boxes)
    tissue_fraction = tissue_fraction / np.maximum(on_image, 1e-6)
    background = float(np.mean(tissue_fraction < BACKGROUND_TISSUE_FRACTION))
    off = float(np.mean(tissue_fraction < OFF_TISSUE_FRACTION))
    if background <= MAX_BACKGROUND_SHARE and off <= MAX_OFF_TISSUE_SHARE:
        return
    spots_w = float(boxes[:, 2].max() - boxes[:, 0].min())
    spots_h = float(boxes[:, 3].max() - boxes[:, 1].min())
    tissue_w, tissue_h = tissue.extent_px()
    ratio = max(tissue_w / spots_w, tissue_h / spots_h)
    if ratio >= SCALE_HINT_RATIO:
        hint = (
            f"the tissue spans {ratio:.1f}x the spots' extent: are the coordinates in the "
            "pixels of a downscaled image (e.g. Space Ranger's hires image: multiply them by "
            "1/tissue_hires_scalef)?"
        )
    else:
        hint = (
            "is the expression of another section, or are the coordinates from another "
            "image, shifted, or with x and y swapped? (only spots on tissue belong in a "
            "slide: Space Ranger's in_tissue)"
        )
    raise StevsInputError(
        path,
        f"{background:.0%} of the {len(boxes)} spot patches are background (under "
        f"{BACKGROUND_TISSUE_FRACTION:.0%} tissue; at most {MAX_BACKGROUND_SHARE:.0%} may be) "
        f"and {off:.0%} mostly off tissue (under {OFF_TISSUE_FRACTION:.0%}; at most "
        f"{MAX_OFF_TISSUE_SHARE:.0%}); the spots cover {within:.0%} of the tissue detected "
        f"on {slide_path}: {hint}",
    )
