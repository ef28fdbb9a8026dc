"""Frozen image features: the one backbone pass over patches, the embedding-cache key and the
one reader of a slide's spot embeddings (``stevs embed`` writes the caches).

Every frozen-feature consumer goes through here: ``stevs embed`` (the workflow's
``embed_slide`` rule) writes the embedding cache of :mod:`stevs.io.embedding_cache` once per
slide and encoder; ``ridge_embed``, frozen-backbone training and prediction read it through
:func:`spot_embeddings`, which computes the embeddings with the same :func:`embed_patches`
when no cache folder is given. The encoder is a ``stevs.models`` image backbone
(:class:`stevs.models.backbones.ImageBackbone`: every stage's pooled features, or a ViT's
pooled tokens; ``stevs encoders`` lists the presets).

``--view dihedral8`` is test-time augmentation: the mean embedding over the 8 symmetries of
the square (4 quarter turns, each with and without a flip) of each patch. ``--view tail`` is
what a model that fine-tunes the encoder's last stage reads (``stevs_tail``): the pooled
features of every stage but the last, then the last stage's input maps, flattened
(EfficientNet-Lite0 at 224 px: 192 + 192 x 7 x 7 = 9,600 values per spot).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from stevs.errors import StevsInputError
from stevs.io.embedding_cache import (
    VIEWS,
    EmbeddingCache,
    EmbeddingKey,
    embedding_path,
    write_embedding_cache,
)
from stevs.io.patch_cache import HestPatchFile, PatchCache, PatchScale
from stevs.models.backbones import BackboneSpec, ImageBackbone
from stevs.models.presets import PRESETS, get_preset
from stevs.options import non_negative_int, positive_int

log = logging.getLogger("stevs.embed")

#: an encoder as a function: uint8 (N, 3, H, W) on its device -> (N, D) features
Encoder = Callable[[Tensor], Tensor]
#: patches to embed: uint8 (N, H, W, 3) in memory, or a file read by rows
PatchSource = np.ndarray | PatchCache | HestPatchFile
#: patches per forward pass where memory does not decide (CPU, MPS; ``--batch-size auto``)
DEFAULT_BATCH = 128
#: the range ``--batch-size auto`` chooses from on CUDA (powers of two)
MIN_BATCH, MAX_BATCH = 8, 1024
#: the share of the free CUDA memory a batch's activations may take
BATCH_MEMORY_FRACTION = 0.6


def embedding_key(
    preset: str, spec: BackboneSpec, view: str, patch_px: int, mpp_target: float
) -> EmbeddingKey:
    """The :class:`EmbeddingKey` of a preset's backbone (as trained or probed) at a scale."""
    weights = spec.weights
    if spec.weights == "file":
        weights = f"file:{spec.weights_path}"
    elif spec.weights == "hf":
        weights = f"hf:{spec.hub}/{spec.hub_file}"
    return EmbeddingKey(preset, spec.name, weights, view, int(patch_px), float(mpp_target))


def embedding_key_of(config: Mapping[str, Any], view: str) -> EmbeddingKey:
    """The embedding-cache key a frozen run of ``config`` (a model folder's config.json)
    needs: the preset, its backbone and weights as trained, the patch scale, the view."""
    scale = config.get("patches") or {}
    preset = (config.get("preset") or {}).get("name", "")
    spec = BackboneSpec.from_dict((config.get("model") or {}).get("backbone") or {})
    return embedding_key(preset, spec, view, scale.get("patch_px", 0), scale.get("mpp_target", 0.0))


def dihedral_views(patch: Tensor) -> list[Tensor]:
    """The 8 flips and quarter turns of (N, C, H, W) square patches."""
    turns = [torch.rot90(patch, k, dims=(2, 3)) for k in range(4)]
    return turns + [t.flip(3) for t in turns]


@torch.inference_mode()
def embed_view(
    embed: Encoder, patch: Tensor, view: str, backbone: ImageBackbone | None = None
) -> Tensor:
    """``embed(patch)``, or its mean over :func:`dihedral_views` for ``view='dihedral8'``,
    or for ``view='tail'`` the stage backbone's (``backbone``, else ``embed`` itself)
    :meth:`~stevs.models.backbones.ImageBackbone.tail_inputs`."""
    if view == "none":
        return embed(patch).float()
    if view == "tail":
        source = backbone if backbone is not None else embed
        if not isinstance(source, ImageBackbone):
            raise ValueError("the 'tail' view needs a stage image backbone")
        return source.tail_inputs(patch).float()
    if view != "dihedral8":
        raise ValueError(f"unknown view {view!r}; use one of {VIEWS}")
    return torch.stack([embed(v).float() for v in dihedral_views(patch)]).mean(dim=0)


def frozen_backbone(name: str, device: str | torch.device = "cpu") -> ImageBackbone:
    """A frozen encoder in eval mode: a ``stevs.models`` preset's backbone (its pretrained
    weights), or any other timm model name with random weights."""
    spec = get_preset(name).backbone if name in PRESETS else BackboneSpec(name)
    return ImageBackbone(spec).eval().requires_grad_(False).to(device)


class _RowBatches(Dataset):
    """Consecutive batches of ``rows`` of a patch source, one DataLoader item each (so a
    patch file is read in the loader's worker processes, ahead of the device)."""

    def __init__(self, patches: PatchSource, rows: np.ndarray, batch_size: int) -> None:
        self.patches, self.rows, self.batch_size = patches, rows, batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, index: int) -> Tensor:
        chosen = self.rows[index * self.batch_size : (index + 1) * self.batch_size]
        if isinstance(self.patches, np.ndarray):
            batch = self.patches[chosen]
        else:
            batch = self.patches.read_rows(chosen)
        return torch.from_numpy(np.ascontiguousarray(batch))


def batch_size_for_memory(
    free_bytes: float, bytes_per_patch: float, fraction: float = BATCH_MEMORY_FRACTION
) -> int:
    """The largest power of two of patches whose activations (``bytes_per_patch`` each) fit
    ``fraction`` of ``free_bytes``, within :data:`MIN_BATCH`..:data:`MAX_BATCH`."""
    fit = free_bytes * fraction / bytes_per_patch if bytes_per_patch > 0 else MAX_BATCH
    size = MIN_BATCH
    while size * 2 <= min(fit, MAX_BATCH):
        size *= 2
    return size


def auto_batch_size(
    encoder: Encoder, probe: np.ndarray, view: str, precision: str, channels_last: bool
) -> int:
    """``--batch-size auto``: :data:`DEFAULT_BATCH` off CUDA; on CUDA, one forward pass of
    the ``probe`` patches (uint8 (n, H, W, 3)) measures the peak memory a patch takes and
    :func:`batch_size_for_memory` sizes the batch to the free memory."""
    from stevs.device import autocast_to

    device = _device_of(encoder)
    if device.type != "cuda" or len(probe) == 0:
        return DEFAULT_BATCH
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = torch.from_numpy(np.ascontiguousarray(probe)).to(device).permute(0, 3, 1, 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_to(device, precision):
        embed_view(encoder, x, view)
    torch.cuda.synchronize(device)
    per_patch = (torch.cuda.max_memory_allocated(device) - before) / len(probe)
    free, _ = torch.cuda.mem_get_info(device)
    size = batch_size_for_memory(free, per_patch)
    log.info("batch size %d: %.1f MB per patch, %.1f GB free", size, per_patch / 1e6, free / 1e9)
    return size


def embed_patches(
    encoder: Encoder,
    patches: PatchSource,
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    view: str = "none",
    batch_size: int | None = DEFAULT_BATCH,
    progress: bool = True,
    workers: int = 0,
    precision: str = "float32",
    channels_last: bool = False,
) -> np.ndarray:
    """The one backbone pass: uint8 patches (an (N, H, W, 3) array, a patch cache or a HEST
    patch file; only ``rows`` of it when given) -> (N, D) float32, in batches on the
    encoder's device.

    ``batch_size``: patches per forward pass, None for :func:`auto_batch_size`;
    ``workers``: processes reading a patch file ahead of the device (pinned memory on CUDA);
    ``precision``: autocast dtype (a resolved :func:`stevs.device.resolve_precision`; float32:
    none); ``channels_last``: batches in channels-last memory format (a CNN on CUDA)."""
    from stevs.device import autocast_to

    source = patches if isinstance(patches, PatchCache | HestPatchFile) else np.asarray(patches)
    rows = np.arange(len(source)) if rows is None else np.asarray(rows, dtype=np.int64)
    device = _device_of(encoder)
    if batch_size is None:
        probe = _RowBatches(source, rows[:MIN_BATCH], MIN_BATCH)[0].numpy() if len(rows) else []
        batch_size = auto_batch_size(encoder, np.asarray(probe), view, precision, channels_last)
    loader = DataLoader(
        _RowBatches(source, rows, batch_size),
        batch_size=None,
        num_workers=0 if isinstance(source, np.ndarray) else workers,
        pin_memory=device.type == "cuda",
    )
    chunks = []
    with autocast_to(device, precision):
        for batch in _progress(loader, progress):
            x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            chunks.append(embed_view(encoder, x, view).cpu().numpy())
    if chunks:
        return np.concatenate(chunks).astype(np.float32, copy=False)
    return np.zeros((0, int(getattr(encoder, "feature_dim", 0))), np.float32)


def place_encoder(backbone: ImageBackbone, device: torch.device) -> tuple[ImageBackbone, bool]:
    """A frozen backbone in eval mode on ``device``, and whether it takes channels-last
    batches: a CNN on CUDA is converted to channels-last memory format (faster
    convolutions); a ViT is left as it is."""
    backbone = backbone.eval().requires_grad_(False).to(device)
    channels_last = device.type == "cuda" and backbone.spec.pooling == "stages"
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone, channels_last


def _device_of(encoder: Encoder) -> torch.device:
    """The device of a module's parameters (CPU for a plain function or a parameterless one)."""
    parameters = getattr(encoder, "parameters", None)
    first = next(iter(parameters()), None) if parameters else None
    return first.device if first is not None else torch.device("cpu")


def _progress(batches: DataLoader, shown: bool) -> Any:
    from tqdm import tqdm

    return tqdm(batches, desc="embed", unit="batch", mininterval=2, disable=not shown)


def spot_embeddings(
    slide: str,
    patches: str | os.PathLike,
    barcodes: Sequence[str],
    *,
    folder: str | os.PathLike | None = None,
    key: EmbeddingKey | None = None,
    encoder: Encoder | None = None,
    view: str = "none",
) -> np.ndarray:
    """Embeddings of ``slide``'s spots ``barcodes``, in that order: read from the embedding
    cache in ``folder`` (checked against ``key``), else computed by ``encoder`` over the
    slide's patch cache ``patches``."""
    if folder:
        if key is None:
            raise ValueError("reading an embedding cache needs its key")
        return EmbeddingCache(embedding_path(folder, slide)).check(key).read(list(barcodes))
    if encoder is None:
        raise ValueError("give an embedding-cache folder or an encoder")
    with PatchCache(patches, slide) as cache:
        return embed_patches(encoder, cache, cache.rows_of(list(barcodes)), view=view)


def preset_key(preset: str, view: str, scale: PatchScale) -> EmbeddingKey:
    """The cache key of a preset's pretrained backbone at a patch cache's scale."""
    spec = get_preset(preset).backbone
    return embedding_key(preset, spec, view, scale.patch_px, scale.mpp_target)


def embed_patch_cache(
    patches: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str,
    view: str = "none",
    weights: str | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    workers: int = 0,
    precision: str = "auto",
) -> Path:
    """Embed every patch of a patch cache with ``preset``'s frozen backbone -> ``out``
    (``precision``: :func:`stevs.device.resolve_precision`; ``workers``: reading processes)."""
    from stevs.device import resolve_device, resolve_precision

    chosen = get_preset(preset, weights=weights)
    spec = chosen.backbone
    if spec.weights == "none":
        raise StevsInputError(
            patches,
            f"preset {preset} has randomly initialised weights: a frozen random encoder "
            "differs per training seed, so its embeddings cannot be shared; give --weights",
        )
    where = resolve_device(device)
    backbone, channels_last = place_encoder(ImageBackbone(spec), where)
    dtype = resolve_precision(precision, where, chosen.embed_precision)
    with PatchCache(patches) as cache:
        embeddings = embed_patches(
            backbone, cache, view=view, batch_size=batch_size, workers=workers,
            precision=dtype, channels_last=channels_last,
        )  # fmt: skip
        scale = (cache.scale.patch_px, cache.scale.mpp_target)
        barcodes = list(cache.barcodes)
        slide = str(cache.attrs.get("slide", ""))
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
    parser.add_argument(
        "--preset", required=True, choices=sorted(PRESETS), help="encoder preset (stevs encoders)"
    )
    parser.add_argument(
        "--weights",
        help="backbone weights: 'none', 'timm', 'hf' (the preset's Hugging Face file, from the "
        "cache) or a local file (default: the preset's own choice)",
    )
    parser.add_argument(
        "--view", default="none", choices=VIEWS, help="test-time view of the patches (flips)"
    )
    parser.add_argument("--out", required=True, help="embedding cache to write (.h5)")
    add_embedding_arguments(parser)


def add_embedding_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a frozen embedding pass (``stevs embed``, ``stevs hest-bench``)."""
    from stevs.device import PRECISIONS

    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--batch-size", type=batch_size_option, default=None,
        help=f"patches per forward pass; auto (default): {DEFAULT_BATCH} on a CPU, on CUDA "
        f"sized to the free memory by one probe pass ({MIN_BATCH}-{MAX_BATCH})",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=non_negative_int(), default=0,
        help="processes reading patches ahead of the device (0: in the main process)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", default="auto", choices=PRECISIONS,
        help="autocast dtype of the encoder; auto: the preset's on CUDA (stevs encoders), "
        "float32 elsewhere",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=positive_int(), help="torch CPU threads (default: torch's choice)"
    )


def batch_size_option(text: str) -> int | None:
    """``--batch-size``: ``auto`` (None) or a whole number >= 1."""
    return None if text == "auto" else positive_int()(text)


def run(args: argparse.Namespace) -> int:
    """``stevs embed``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    options = ("preset", "view", "weights", "device", "batch_size", "workers", "precision")
    embed_patch_cache(args.patches, args.out, **{k: getattr(args, k) for k in options})
    return 0
