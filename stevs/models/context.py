"""Neighbourhood context: the mean image embedding of a spot's neighbours on its own slide.

Absolute coordinates of one section say nothing about another patient's; what a spot's
surroundings look like does. The neighbours of a spot are the other spots of the same slide
(among the spots given) within ``radius`` spot pitches of it, the pitch being the slide's
median nearest-neighbour distance (so no metadata is needed and any isotropic coordinates
work: pixels, or the per-slide normalised coordinates of :mod:`stevs.data`). On legacy ST
(200 µm pitch, square grid) radius 1.5 takes the 8 surrounding spots; on Visium (hexagonal)
the 6 of the first ring. A spot without neighbours gets its own embedding.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from stevs.geometry import median_spot_pitch

#: context kinds of :class:`stevs.models.stevs.STevsConfig`
CONTEXTS = ("none", "neighbours")


def neighbour_index(coords: np.ndarray, radius: float) -> list[np.ndarray]:
    """Per spot, the indices of the other spots within ``radius`` pitches (one slide)."""
    coords = np.asarray(coords, dtype=np.float64)
    pitch = median_spot_pitch(coords)
    if pitch <= 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(len(coords))]
    found = cKDTree(coords).query_ball_point(coords, r=radius * pitch * (1 + 1e-6))
    return [np.asarray(sorted(j for j in nbrs if j != i), dtype=np.int64)
            for i, nbrs in enumerate(found)]  # fmt: skip


def neighbour_mean(
    embedding: Tensor | np.ndarray,
    coords: Tensor | np.ndarray,
    slide: Tensor | np.ndarray | None = None,
    radius: float = 1.5,
) -> Tensor:
    """(N, F) embeddings -> (N, F) mean embedding of each spot's neighbours (own if none).

    ``slide`` (N,) keeps neighbourhoods inside each slide; None means one slide.
    """
    if isinstance(embedding, Tensor):
        emb = embedding.detach().float().cpu()
    else:
        emb = torch.as_tensor(np.asarray(embedding), dtype=torch.float32)
    xy = coords.detach().cpu().numpy() if isinstance(coords, Tensor) else np.asarray(coords)
    xy = xy.astype(np.float64)
    if xy.shape != (len(emb), 2):
        raise ValueError(f"coords must be ({len(emb)}, 2), not {xy.shape}")
    if isinstance(slide, Tensor):
        slide = slide.cpu().numpy()
    groups = np.zeros(len(emb), dtype=np.int64) if slide is None else np.asarray(slide)
    out = emb.clone()
    for value in np.unique(groups):
        rows = np.flatnonzero(groups == value)
        for i, nbrs in zip(rows, neighbour_index(xy[rows], radius), strict=True):
            if len(nbrs):
                out[i] = emb[torch.from_numpy(rows[nbrs])].mean(0)
    return out
