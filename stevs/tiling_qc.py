"""The tiling QC picture: the slide's thumbnail with every patch box drawn.

``stevs tile --qc`` writes it (:func:`stevs.tiling.tile_spots`); the Snakemake report
embeds one per slide, so it is saved as a small palette PNG.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from stevs.atomic import atomic_path, is_stevs_png, stevs_png_info

#: longest side of the QC picture; saved as a 256-colour PNG: ~0.8 MB a slide instead of the
#: 6 MB of a lossless 2000 px RGB PNG (the Snakemake report embeds one per slide)
QC_MAX_PX = 1400


def save_qc(picture: Image.Image, path: str | os.PathLike) -> None:
    """Write the QC picture atomically as a palette PNG."""
    with atomic_path(path, suffix=".png", replaces=is_stevs_png) as tmp:
        picture.quantize(256, method=Image.Quantize.FASTOCTREE).save(
            tmp, format="PNG", optimize=True, pnginfo=stevs_png_info()
        )


def draw_qc(
    thumbnail: np.ndarray,
    boxes: np.ndarray,
    outside: np.ndarray,
    dimensions: tuple[int, int],
    title: str,
) -> Image.Image:
    """The thumbnail (longest side at most :data:`QC_MAX_PX`) with every patch box drawn: green
    inside, orange crossing the edge."""
    image = Image.fromarray(thumbnail).convert("RGB")
    image.thumbnail((QC_MAX_PX, QC_MAX_PX), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    sx, sy = dimensions[0] / image.width, dimensions[1] / image.height
    line = 2 if len(boxes) and (boxes[0, 2] - boxes[0, 0]) / sx >= 12 else 1
    for (left, top, right, bottom), out in zip(boxes, outside, strict=True):
        colour = (255, 140, 0) if out > 0 else (0, 170, 0)
        draw.rectangle(
            (left / sx, top / sy, right / sx - 1, bottom / sy - 1), outline=colour, width=line
        )
    n_edge = int(np.count_nonzero(outside > 0))
    label = f"{title}: {len(boxes)} patches, {n_edge} crossing the edge (orange)"
    draw.rectangle((0, 0, 8 + 6 * len(label), 14), fill=(255, 255, 255))
    draw.text((4, 2), label, fill=(0, 0, 0))
    return image
