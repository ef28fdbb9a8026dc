"""The tiling QC picture: the slide's thumbnail with every spot's circle and the patch
box of a sample of spots that do not overlap drawn.

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


def separate_boxes(boxes: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Indices of a sample of ``boxes`` that do not touch one another, so that each drawn
    outline can be judged against its own spot: the slide cut into cells of one box side, at
    most one box centred in every other cell of every other row (centres then lie more than
    a side apart), preferring boxes that cross the slide's edge; of the four ways to pick
    every other cell, the one with the most edge-crossing boxes, then the most boxes."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    side = float(max(np.max(boxes[:, 2] - boxes[:, 0]), np.max(boxes[:, 3] - boxes[:, 1]), 1))
    centres = np.column_stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]]) / 2
    cells = np.floor(centres / side).astype(np.int64)
    best: np.ndarray = np.zeros(0, np.int64)
    for parity in ((0, 0), (0, 1), (1, 0), (1, 1)):
        kept = np.flatnonzero((cells % 2 == parity).all(axis=1))
        order = kept[np.argsort(outside[kept] <= 0, kind="stable")]
        _, first = np.unique(cells[order], axis=0, return_index=True)
        chosen = np.sort(order[first])
        score = (int(np.count_nonzero(outside[chosen] > 0)), len(chosen))
        if score > (int(np.count_nonzero(outside[best] > 0)), len(best)):
            best = chosen
    return best


def draw_qc(
    thumbnail: np.ndarray,
    boxes: np.ndarray,
    outside: np.ndarray,
    dimensions: tuple[int, int],
    title: str,
    *,
    spot_diameter_px: float = float("nan"),
) -> Image.Image:
    """The thumbnail (longest side at most :data:`QC_MAX_PX`) with every spot's circle drawn
    (blue; ``spot_diameter_px`` in level-0 px, a dot when unknown) and the patch box of a
    sample of spots that do not overlap (:func:`separate_boxes`): green inside, orange
    crossing the edge."""
    image = Image.fromarray(thumbnail).convert("RGB")
    image.thumbnail((QC_MAX_PX, QC_MAX_PX), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    sx, sy = dimensions[0] / image.width, dimensions[1] / image.height
    centres = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
    known = bool(np.isfinite(spot_diameter_px) and spot_diameter_px > 0)
    radius = max(spot_diameter_px / 2 / sx, 1.5) if known else 1.5
    for x, y in centres / (sx, sy):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=(0, 90, 255))
    sample = separate_boxes(boxes, outside)
    line = 2 if len(boxes) and (boxes[0, 2] - boxes[0, 0]) / sx >= 12 else 1
    for i in sample:
        left, top, right, bottom = boxes[i]
        colour = (255, 140, 0) if outside[i] > 0 else (0, 170, 0)
        draw.rectangle(
            (left / sx, top / sy, right / sx - 1, bottom / sy - 1), outline=colour, width=line
        )
    n_edge = int(np.count_nonzero(outside > 0))
    label = (
        f"{title}: {len(boxes)} spots (blue {'circles' if known else 'centres'}); patch boxes of "
        f"{len(sample)} spots set apart (green; orange: crossing the slide's edge, {n_edge} of "
        f"all {len(boxes)})"
    )
    draw.rectangle((0, 0, 8 + 6 * len(label), 14), fill=(255, 255, 255))
    draw.text((4, 2), label, fill=(0, 0, 0))
    return image
