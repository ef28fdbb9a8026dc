"""Pictures of an H&E-only prediction: a map per gene (predicted mean and std as spot disks
over the slide thumbnail) and the tissue QC picture (mask and kept spots).

Drawn with matplotlib's Agg canvas and PIL, no pyplot; every file is written atomically.
Used by :mod:`stevs.predict_slide`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from stevs.atomic import PNG_SOFTWARE, atomic_path, is_stevs_png
from stevs.io.visium_uns import resize_max
from stevs.tissue import TissueDetection

#: longest side of the background image of the gene maps
MAP_MAX_SIDE = 1000


def write_atomically(path: Path, suffix: str, write: Any) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` and rename it when done; a
    file already there is replaced only if it is a picture of stevs (:func:`is_stevs_png`)."""
    with atomic_path(path, suffix=suffix, replaces=is_stevs_png) as tmp:
        write(tmp)
    return path


def gene_map_path(out: Path, gene: str) -> Path:
    """``{out}/maps/{gene}.png``."""
    return out / "maps" / f"{safe_file_name(gene)}.png"


def safe_file_name(gene: str) -> str:
    """A gene name as a file name: characters other than letters, digits, ``._-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", gene) or "gene"


def draw_gene_map(
    thumbnail: np.ndarray,
    xy_thumb: np.ndarray,
    spot_diameter_thumb: float,
    mean: np.ndarray,
    std: np.ndarray,
    gene: str,
    unit: str,
    path: Path,
) -> Path:
    """PNG of one gene: predicted mean and std as spot disks over the thumbnail."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import EllipseCollection
    from matplotlib.figure import Figure

    thumbnail, factor = resize_max(thumbnail, MAP_MAX_SIDE)  # plenty for a 4-inch panel
    xy_thumb, spot_diameter_thumb = xy_thumb * factor, spot_diameter_thumb * factor
    height, width = thumbnail.shape[:2]
    aspect = width / max(height, 1)
    fig = Figure(figsize=(2 * 4.2 * aspect + 1.6, 4.4))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no GUI backend
    axes = fig.subplots(1, 2, squeeze=False)
    for ax, values, label, cmap in (
        (axes[0, 0], mean, f"{gene}: predicted ({unit})", "viridis"),
        (axes[0, 1], std, f"{gene}: predictive std", "magma"),
    ):
        ax.imshow(thumbnail)
        disks = EllipseCollection(
            widths=spot_diameter_thumb,
            heights=spot_diameter_thumb,
            angles=0.0,
            units="xy",
            offsets=xy_thumb,
            offset_transform=ax.transData,
            cmap=cmap,
            linewidths=0,
        )
        disks.set_array(np.asarray(values, np.float64))
        ax.add_collection(disks)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
        fig.colorbar(disks, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    meta = {"Software": PNG_SOFTWARE}
    write_atomically(
        path, ".png", lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata=meta)
    )
    return path


def draw_tissue_qc(
    tissue: TissueDetection, xy_thumb: np.ndarray, spot_diameter_thumb: float, title: str
) -> Image.Image:
    """The thumbnail with the tissue mask tinted green and the kept spots outlined."""
    base = tissue.thumbnail.astype(np.float32)
    tint = np.array([0, 200, 0], np.float32)
    base[tissue.mask] = 0.75 * base[tissue.mask] + 0.25 * tint
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = max(spot_diameter_thumb / 2.0, 1.0)
    for x, y in xy_thumb:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=(0, 60, 200))
    label = f"{title}: {len(xy_thumb)} spots on tissue (green), Otsu threshold {tissue.threshold}"
    draw.rectangle((0, 0, 8 + draw.textlength(label), 14), fill=(255, 255, 255))
    draw.text((4, 2), label, fill=(0, 0, 0))
    return image
