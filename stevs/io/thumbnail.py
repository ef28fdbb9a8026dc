"""The one thumbnail reader of a slide: the whole image, small, read block by block.

Tissue detection (:func:`stevs.tissue.detect_tissue`) and the ``hires`` image of
``uns["spatial"]`` (:func:`stevs.io.visium_uns.slide_spatial_uns`) read their thumbnail here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stevs.errors import StevsInputError

if TYPE_CHECKING:
    from stevs.io.slide import SlideReader

#: the thumbnail is read in blocks of at most this many level pixels a side (bounded memory)
THUMBNAIL_BLOCK = 1024


def read_thumbnail(slide: SlideReader, max_px: int) -> np.ndarray:
    """The whole slide, longest side ``max_px``, read in blocks so memory stays bounded.

    Reading the whole box at once would hold a whole level in memory; on a slide without a
    coarse pyramid level that would be the whole slide.
    """
    width, height = slide.dimensions
    scale = max(width, height) / max_px  # level-0 px per thumbnail px
    thumb_w, thumb_h = max(1, round(width / scale)), max(1, round(height / scale))
    sx, sy = width / thumb_w, height / thumb_h
    level_ds = slide.level_downsamples[slide.best_level(min(sx, sy))]
    # block side in thumbnail px so that one block is at most ~THUMBNAIL_BLOCK^2 level px
    block = max(16, int(THUMBNAIL_BLOCK / max(sx / level_ds, sy / level_ds, 1.0)))
    thumb = np.empty((thumb_h, thumb_w, 3), np.uint8)
    for ty in range(0, thumb_h, block):
        for tx in range(0, thumb_w, block):
            bw, bh = min(block, thumb_w - tx), min(block, thumb_h - ty)
            box = (tx * sx, ty * sy, bw * sx, bh * sy)
            try:
                thumb[ty : ty + bh, tx : tx + bw] = slide.read_region(box, (bw, bh))
            except StevsInputError:
                raise
            except Exception as err:
                raise StevsInputError(
                    slide.path, f"cannot read the slide's thumbnail: {type(err).__name__}: {err}"
                ) from err
    return thumb
