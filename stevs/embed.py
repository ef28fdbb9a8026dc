"""A frozen encoder's embeddings of one slide's patches, computed once (``stevs embed``).

Writes the embedding cache of :mod:`stevs.io.embedding_cache`, which ``ridge_embed`` and every
frozen-backbone training and prediction read instead of running the encoder again. The
encoder is a ``stevs.models`` preset's image backbone (``stevs.models.backbones.ImageBackbone``:
every stage's pooled features), the same module a frozen STevs model embeds with.

``--view dihedral8`` is test-time augmentation: the mean embedding over the 8 symmetries of
the square (4 quarter turns, each with and without a flip) of each patch.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stevs.errors import StevsInputError
from stevs.io.embedding_cache import VIEWS, EmbeddingKey, write_embedding_cache
from stevs.io.patch_cache import PatchCache
from stevs.models.backbones import BackboneSpec
from stevs.models.presets import PRESETS, get_preset

log = logging.getLogger("stevs.embed")


def embedding_key(
    preset: str, spec: BackboneSpec, view: str, patch_px: int, mpp_target: float
) -> EmbeddingKey:
    """The :class:`EmbeddingKey` of a preset's backbone (as trained or probed) at a scale."""
    weights = spec.weights if spec.weights != "file" else f"file:{spec.weights_path}"
    return EmbeddingKey(preset, spec.name, weights, view, int(patch_px), float(mpp_target))


def dihedral_views(patch: Tensor) -> list[Tensor]:
    """The 8 flips and quarter turns of (N, C, H, W) square patches."""
    turns = [torch.rot90(patch, k, dims=(2, 3)) for k in range(4)]
    return turns + [t.flip(3) for t in turns]


@torch.inference_mode()
def embed_view(embed: Callable[[Tensor], Tensor], patch: Tensor, view: str) -> Tensor:
    """``embed(patch)``, or its mean over :func:`dihedral_views` for ``view='dihedral8'``."""
    if view == "none":
        return embed(patch).float()
    if view != "dihedral8":
        raise ValueError(f"unknown view {view!r}; use one of {VIEWS}")
    return torch.stack([embed(v).float() for v in dihedral_views(patch)]).mean(dim=0)


def embed_patch_cache(
    patches: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str,
    view: str = "none",
    weights: str | None = None,
    device: str = "cpu",
    batch_size: int = 128,
) -> Path:
    """Embed every patch of a patch cache with ``preset``'s frozen backbone -> ``out``."""
    from tqdm import tqdm

    from stevs.models.backbones import ImageBackbone
    from stevs.train import resolve_device

    spec = get_preset(preset, weights=weights).backbone
    if spec.weights == "none":
        raise StevsInputError(
            patches,
            f"preset {preset} has randomly initialised weights: a frozen random encoder "
            "differs per training seed, so its embeddings cannot be shared; give --weights",
        )
    torch_device = resolve_device(device)
    backbone = ImageBackbone(spec).eval().to(torch_device)
    with PatchCache(patches) as cache:
        scale = (cache.scale.patch_px, cache.scale.mpp_target)
        chunks = []
        for start in tqdm(range(0, len(cache), batch_size), desc="embed", unit="batch"):
            rows = np.arange(start, min(start + batch_size, len(cache)))
            x = torch.from_numpy(np.ascontiguousarray(cache.read_rows(rows)))
            x = x.to(torch_device).permute(0, 3, 1, 2)
            chunks.append(embed_view(backbone, x, view).cpu().numpy())
        barcodes = list(cache.barcodes)
        slide = str(cache.attrs.get("slide", ""))
    dim = backbone.feature_dim
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    key = embedding_key(preset, spec, view, *scale)
    path = write_embedding_cache(
        out, embeddings, barcodes, key, slide=slide, source_patches=str(patches)
    )
    log.info("%s: %d spots x %d features (%s, view %s) -> %s", slide, *embeddings.shape,
             preset, view, path)  # fmt: skip
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs embed``."""
    parser.add_argument("--patches", required=True, help="patch cache (results/patches/S.h5)")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--weights", help="backbone weights: 'none', 'timm' or a local file")
    parser.add_argument("--view", default="none", choices=VIEWS)
    parser.add_argument("--out", required=True, help="embedding cache to write (.h5)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    """``stevs embed``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    embed_patch_cache(
        args.patches,
        args.out,
        preset=args.preset,
        view=args.view,
        weights=args.weights,
        device=args.device,
        batch_size=args.batch_size,
    )
    return 0
