"""Predict the test slides of a fold with a trained model (``stevs predict``).

One prediction AnnData per test slide (docs/architecture.md, "Prediction AnnData"): ``X`` the
predicted mean on the panel in the targets' normalisation, ``layers["std"]`` the predictive
standard deviation, ``obs``, ``obsm["spatial"]``, ``uns["spatial"]`` (H&E images and scale
factors) and ``var["gene_ids"]`` copied from the slide AnnData, and ``uns["stevs"]`` = method,
fold, slide, model_sha256, normalisation, stevs_version.

:func:`predict_patches` is the building block that H&E-only slide prediction reuses; models
load through :func:`stevs.models.factory.load_model`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from stevs.atomic import check_writable
from stevs.device import autocast as autocast_on
from stevs.device import resolve_device
from stevs.errors import StevsInputError
from stevs.io.fold_file import Fold, add_patches_dir_argument, fold_argument, read_fold
from stevs.io.model_dir import ModelDir, check_model_fits_fold
from stevs.io.prediction import (
    new_prediction,
    prediction_meta,
    write_manifest,
    write_prediction,
)
from stevs.io.slide_adata import spots_of
from stevs.methods import get_method
from stevs.models.factory import load_model
from stevs.models.stevs import STevs
from stevs.options import non_negative_int, positive_int
from stevs.training.batches import collate

log = logging.getLogger("stevs.predict")


class _PatchArrayDataset(Dataset):
    """(N, H, W, 3) uint8 patches (+ optional (N, 2) coords) as Dataset items."""

    def __init__(self, patches: np.ndarray | Tensor, coords: np.ndarray | Tensor | None) -> None:
        self.patches = torch.as_tensor(np.asarray(patches))
        if self.patches.ndim != 4 or self.patches.shape[-1] != 3:
            raise ValueError(f"patches must be (N, H, W, 3), not {tuple(self.patches.shape)}")
        self.coords = None if coords is None else torch.as_tensor(np.asarray(coords)).float()
        if self.coords is not None and self.coords.shape != (len(self.patches), 2):
            raise ValueError("coords must be (N, 2) with one row per patch")

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"patch": self.patches[index].permute(2, 0, 1).contiguous()}
        if self.coords is not None:
            item["coords"] = self.coords[index]
        return item


@torch.no_grad()
def predict_patches(
    model: STevs,
    patches: np.ndarray | Tensor | Dataset,
    coords: np.ndarray | Tensor | None = None,
    *,
    batch_size: int = 64,
    workers: int = 0,
    n_samples: int = 16,
    progress: bool = True,
    view: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted mean and std (N, G), in the targets' normalisation.

    ``patches``: uint8 (N, H, W, 3), or a Dataset of items with ``patch`` (3, H, W) and
    ``coords`` (2,) (e.g. :class:`stevs.data.SpotDataset`). ``coords`` (N, 2) per-slide
    normalised coordinates override/provide the items' coordinates; models with a spatial
    expert need them. Items with an ``embedding`` (a frozen backbone's cached features) use
    it instead of the patch; ``view`` is the frozen model's test-time view
    (:func:`stevs.embed.embed_view`).
    """
    from stevs.embed import embed_view

    dataset = patches if isinstance(patches, Dataset) else _PatchArrayDataset(patches, coords)
    override = None
    if isinstance(patches, Dataset) and coords is not None:
        override = torch.as_tensor(np.asarray(coords)).float()
    device = next(model.parameters()).device
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    autocast = autocast_on(device)
    model.eval()
    if model.config.uses_context:
        return _predict_with_context(model, loader, override, autocast, n_samples, progress, view)
    means, stds = [], []
    start = 0
    for batch in tqdm(loader, desc="predicting", unit="batch", disable=not progress, mininterval=2):
        n = len(batch["embedding"] if "embedding" in batch else batch["patch"])
        batch_coords = batch.get("coords")
        if override is not None:
            batch_coords = override[start : start + n]
        start += n
        if model.config.use_spatial and batch_coords is None:
            raise ValueError("this model has a spatial expert: give coords")
        embedding = batch.get("embedding")
        if embedding is None and view != "none" and model.config.use_image:
            embedding = embed_view(model.embed, batch["patch"].to(device), view, model.backbone)
        with autocast:
            mean, std = model.predict(
                None if embedding is not None else batch["patch"].to(device, non_blocking=True),
                None if batch_coords is None else batch_coords.to(device),
                None if embedding is None else embedding.to(device),
                n_samples=n_samples,
            )
        means.append(mean.float().cpu().numpy())
        stds.append(std.float().cpu().numpy())
    n_genes = model.config.n_genes
    if not means:
        return np.zeros((0, n_genes), np.float32), np.zeros((0, n_genes), np.float32)
    return np.concatenate(means).astype(np.float32), np.concatenate(stds).astype(np.float32)


@torch.no_grad()
def _predict_with_context(
    model: STevs,
    loader: DataLoader,
    override: Tensor | None,
    autocast: contextlib.AbstractContextManager,
    n_samples: int,
    progress: bool,
    view: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Two passes for models with the neighbourhood context: embed every spot (or take the
    items' cached ``embedding``), then predict each from its embedding and the mean embedding
    of its neighbours on the same slide."""
    from stevs.embed import embed_view
    from stevs.models.context import neighbour_mean

    device = next(model.parameters()).device
    embeddings, coords, slides = [], [], []
    start = 0
    for batch in tqdm(loader, desc="embedding", unit="batch", disable=not progress, mininterval=2):
        embedding = batch.get("embedding")
        n = len(embedding if embedding is not None else batch["patch"])
        batch_coords = batch.get("coords") if override is None else override[start : start + n]
        start += n
        if batch_coords is None:
            raise ValueError("this model uses the neighbourhood context: give coords")
        if embedding is None:
            with autocast:
                embedding = embed_view(model.embed, batch["patch"].to(device), view, model.backbone)
        embeddings.append(embedding.float().cpu())
        coords.append(batch_coords.float())
        slides.append(batch.get("slide", torch.zeros(n, dtype=torch.int64)))
    n_genes = model.config.n_genes
    if not embeddings:
        return np.zeros((0, n_genes), np.float32), np.zeros((0, n_genes), np.float32)
    embedding, xy, slide = torch.cat(embeddings), torch.cat(coords), torch.cat(slides)
    frozen = model.frozen_embedding(embedding.to(device)).cpu()
    context = neighbour_mean(frozen, xy, slide, model.config.context_radius)
    means, stds = [], []
    for first in range(0, len(embedding), loader.batch_size or 64):
        part = slice(first, first + (loader.batch_size or 64))
        with autocast:
            mean, std = model.predict(
                None, xy[part].to(device), embedding[part].to(device), n_samples,
                context=context[part].to(device),
            )  # fmt: skip
        means.append(mean.float().cpu().numpy())
        stds.append(std.float().cpu().numpy())
    return np.concatenate(means).astype(np.float32), np.concatenate(stds).astype(np.float32)


def _test_slides(fold: Fold, slides: Sequence[str] | None) -> list[str]:
    if not slides:
        return list(fold.test)
    unknown = [slide for slide in slides if slide not in fold.test]
    if unknown:
        raise StevsInputError(
            fold.path, f"not test slides of fold {fold.fold}: {', '.join(unknown)}"
        )
    return list(slides)


def predict_fold(
    model_dir: str | os.PathLike,
    fold: Any,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 0,
    n_samples: int = 16,
    seed: int = 0,
    slides: Sequence[str] | None = None,
    embeddings: str | os.PathLike | None = None,
) -> list[Path]:
    """Predict the test slides of ``fold`` (a Fold or a fold file), or only ``slides``.

    Writes one ``{slide}.h5ad`` each. The predictive std's posterior samples are drawn
    from a generator seeded with ``seed``: the same inputs give the same files.
    ``embeddings``: for a frozen-backbone model, a folder of embedding caches of its
    encoder and view (``stevs embed``) read instead of embedding the test patches.
    """
    from stevs.data import SpotDataset
    from stevs.embed import embedding_key_of
    from stevs.training.fold import embedding_dataset

    fold_obj = fold if isinstance(fold, Fold) else read_fold(fold)
    model, config = load_model(model_dir, device)
    test = _test_slides(fold_obj, slides)
    check_model_fits_fold(config, fold_obj, model_dir, test)
    sha = ModelDir(model_dir).weights_sha256()
    written: list[Path] = []
    for slide in test:
        dataset = SpotDataset(fold_obj, "test", slides=[slide])
        training = config.get("training") or {}
        view = str(training.get("embedding_view") or "none")
        items: Dataset = dataset
        if embeddings and training.get("freeze_backbone") and model.config.use_image:
            key = embedding_key_of(config, view)
            items = embedding_dataset([dataset], folder=str(embeddings), key=key)
        torch.manual_seed(seed)
        mean, std = predict_patches(
            model, items, batch_size=batch_size, workers=workers, n_samples=n_samples, view=view
        )
        spots = spots_of(fold_obj.slide_entry(slide).adata, dataset.barcodes)
        meta = prediction_meta(config, fold_obj, slide, sha)
        adata = new_prediction(mean, std, config["genes"], spots, meta, source=model_dir)
        path = write_prediction(adata, Path(out_dir) / f"{slide}.h5ad")
        dataset.close()
        log.info("%s: %d spots x %d genes -> %s", slide, adata.n_obs, adata.n_vars, path)
        written.append(path)
    return written


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size`` and ``--samples``, shared with ``stevs predict-slide``."""
    parser.add_argument(
        "--batch-size", type=positive_int(), default=64, help="spots per forward pass"
    )
    parser.add_argument(
        "--samples", type=non_negative_int(), default=16, help="posterior samples for the std"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs predict``."""
    parser.add_argument(
        "--model-dir",
        required=True,
        help="output folder of 'stevs train' (results/models/{encoder}/{method}/seed{seed}/{fold})",
    )
    parser.add_argument("--fold", required=True, help="the fold file the model was trained on")
    parser.add_argument(
        "--out-dir",
        required=True,
        help="folder: one {slide}.h5ad per test slide and predictions.tsv, the list of them "
        "(written last)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    add_sampling_arguments(parser)
    parser.add_argument(
        "--workers", type=non_negative_int(), default=0, help="DataLoader worker processes"
    )
    parser.add_argument(
        "--threads", type=positive_int(), help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--slides", nargs="+", help="only these test slides (default: all)")
    parser.add_argument(
        "--seed", type=non_negative_int(), default=0, help="seed of the posterior samples"
    )
    parser.add_argument(
        "--embeddings",
        help="folder of embedding caches of a frozen encoder, stevs embed (default: none)",
    )
    add_patches_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    """``stevs predict``: the model folder's method (config.json) picks the predictor."""
    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_device(args.device)  # a device this machine lacks stops here, before any work
    check_writable(args.out_dir)
    folder = ModelDir(args.model_dir)
    method = get_method(folder.read_config()["method"], str(folder.config_path))
    options: dict[str, Any] = {"slides": args.slides, "embeddings": args.embeddings}
    if method.kind == "torch":
        options.update(
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            n_samples=args.samples,
            seed=args.seed,
        )
    fold = fold_argument(args.fold, args.patches_dir)
    paths = method.entry("predict")(args.model_dir, fold, args.out_dir, **options)
    write_manifest(paths, args.out_dir)
    log.info("wrote %d prediction files to %s", len(paths), args.out_dir)
    return 0
