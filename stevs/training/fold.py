"""Fold-level training: a fold file -> prepared data and model -> the loop -> a model folder.

Everything the loop (:mod:`stevs.training.loop`) must not know sits here: the fold's spots as
Datasets, a frozen backbone's embeddings (:mod:`stevs.embed`: read from the shared embedding
cache, or computed once), the neighbourhood context, the linear path's ridge fit
(:func:`stevs.models.stevs.fit_linear_path`), the run's ``config.json`` and the refit rule.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from stevs import __version__
from stevs.device import resolve_device
from stevs.errors import StevsInputError
from stevs.hashing import file_sha256
from stevs.io.fold_file import Fold, read_fold, training_patch_scale
from stevs.io.model_dir import ModelDir
from stevs.methods import get_method
from stevs.metrics import VAL_METRIC
from stevs.models.factory import create_model
from stevs.models.presets import Preset, get_preset
from stevs.models.stevs import STevs, fit_linear_path
from stevs.training.batches import EmbeddingDataset
from stevs.training.loop import finished_result, run_key, stored_result, train_model
from stevs.training.options import TrainOptions, TrainResult

log = logging.getLogger("stevs.train")

#: where a refitting run keeps its selection run (a model folder inside the fold's)
REFIT_SELECTION_DIR = "selection"
#: the refit rule, as config.json and the report state it
REFIT_RULE = (
    "early stopping on the validation slides' headline Pearson r picks epoch E; the model is "
    "then retrained from scratch with the same seed on training + validation spots for E "
    "epochs, its learning-rate schedule (warm-up, cosine) laid out over the same number of "
    "planned epochs as the selection run's and cut after epoch E; that model is the fold's"
)
#: the SpotDataset arrays an :class:`EmbeddingDataset` item keeps besides the embedding
_ITEM_ARRAYS = (("coords", "coords"), ("target", "targets"), ("counts", "counts"),
                ("library_size", "library_sizes"), ("slide", "slide_index"))  # fmt: skip


def embedding_dataset(
    datasets: Sequence[Any],
    *,
    folder: str | None = None,
    key: Any = None,
    encoder: Any = None,
    view: str = "none",
) -> EmbeddingDataset:
    """The items of ``SpotDataset`` s with each spot's frozen embedding instead of its patch:
    read from the embedding caches in ``folder`` (checked against ``key``), else computed by
    ``encoder`` over the slides' patch caches (:func:`stevs.embed.spot_embeddings`)."""
    from stevs.embed import spot_embeddings

    embeddings: list[torch.Tensor] = []
    items: dict[str, list[torch.Tensor]] = {name: [] for name, _ in _ITEM_ARRAYS}
    barcodes: list[str] = []
    for data in datasets:
        for index in np.unique(data.slide_index):
            rows = np.flatnonzero(data.slide_index == index)
            entry = data.fold.slides[int(index)]
            chosen = [data.barcodes[i] for i in rows]
            values = spot_embeddings(
                entry.slide, entry.patches, chosen, folder=folder, key=key, encoder=encoder,
                view=view,
            )  # fmt: skip
            embeddings.append(torch.from_numpy(np.asarray(values, dtype=np.float32)))
            for name, attribute in _ITEM_ARRAYS:
                items[name].append(torch.from_numpy(np.asarray(getattr(data, attribute)[rows])))
            barcodes.extend(chosen)
    merged: dict[str, Any] = {k: torch.cat(v) for k, v in items.items() if v}
    merged["barcode"] = barcodes
    return EmbeddingDataset(torch.cat(embeddings) if embeddings else torch.zeros(0, 0), merged)


def with_context(model: STevs, data: EmbeddingDataset) -> EmbeddingDataset:
    """``data`` with the neighbourhood context of each spot (:mod:`stevs.models.context`)
    among its split's spots of the same slide, when the model uses it."""
    if not model.config.uses_context or "context" in data.items:
        return data
    from stevs.models.context import neighbour_mean

    context = neighbour_mean(
        model.frozen_embedding(data.embeddings),
        data.items["coords"],
        data.items["slide"],
        model.config.context_radius,
    )
    return EmbeddingDataset(data.embeddings, {**data.items, "context": context})


def frozen_embeddings(
    model: STevs,
    parts: Sequence[Dataset],
    options: TrainOptions,
    config: Mapping[str, Any],
) -> list[EmbeddingDataset]:
    """Each of ``parts`` (SpotDatasets, or a ConcatDataset of them) as an EmbeddingDataset
    of the model's frozen backbone: from the embedding caches of ``options.embeddings``,
    else computed here once with the model's own backbone."""
    from stevs.embed import embedding_key_of

    if options.embeddings:
        log.info("frozen backbone: reading embeddings from %s", options.embeddings)
        key = embedding_key_of(config, options.embedding_view)
        source: dict[str, Any] = {"folder": options.embeddings, "key": key}
    else:
        log.info("frozen backbone: embedding %d spots", sum(len(d) for d in parts))
        model.backbone.to(resolve_device(options.device)).eval()
        source = {"encoder": model.backbone, "view": options.embedding_view}
    return [embedding_dataset(getattr(d, "datasets", [d]), **source) for d in parts]


def prepare_features(
    model: STevs,
    train_data: Dataset,
    val_data: Dataset | None,
    options: TrainOptions,
    config: Mapping[str, Any],
) -> tuple[Dataset, Dataset | None]:
    """What the loop trains on: with a frozen backbone, embeddings instead of patches; the
    neighbourhood context; the linear path fitted on the training spots."""
    c = model.config
    frozen = bool(options.freeze_backbone) and model.backbone is not None
    if frozen and not isinstance(train_data, EmbeddingDataset):
        parts = [d for d in (train_data, val_data) if d is not None and len(d) > 0]
        read = frozen_embeddings(model, parts, options, config)
        train_data, val_data = read[0], (read[1] if len(read) > 1 else None)
    if not (c.uses_context or model.linear is not None):
        return train_data, val_data
    if not isinstance(train_data, EmbeddingDataset):
        raise StevsInputError(
            None, "context / linear_path need frozen embeddings: train with --freeze-backbone"
        )
    train_data = with_context(model, train_data)
    if isinstance(val_data, EmbeddingDataset):
        val_data = with_context(model, val_data)
    if model.linear is not None:
        train_data = _fit_linear_path(model, train_data, config)
    return train_data, val_data


def _fit_linear_path(
    model: STevs, train_data: EmbeddingDataset, config: Mapping[str, Any]
) -> EmbeddingDataset:
    """Set the model's linear path from the training spots (the ridge probe, or the learned
    path's feature scaling); with stacking, the items carry the probe's out-of-fold fit.
    The features are the model's at its start, in eval mode (a trained tail: the frozen
    last stage's copy with its loaded batch-norm statistics)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        features = model.image_features(train_data.embeddings, train_data.items.get("context"))
    model.train(was_training)
    genes = list(config.get("genes") or [f"gene{i}" for i in range(model.config.n_genes)])
    headline = list(config.get("headline_genes") or genes)
    slides = train_data.items["slide"].numpy()
    target = train_data.items["target"]
    fitted, oof = fit_linear_path(model, features, target, slides, genes, headline)
    log.info("linear path: %s", fitted)
    if oof is None:
        return train_data
    # the latent path learns what the probe leaves on unseen slides
    return EmbeddingDataset(train_data.embeddings, {**train_data.items, "linear_offset": oof})


def fit_model(
    model: STevs,
    data: tuple[Dataset, Dataset | None],
    out_dir: str | os.PathLike,
    options: TrainOptions,
    config: Mapping[str, Any],
    **loop_options: Any,
) -> TrainResult:
    """Prepare the features of ``data`` (training, validation) (:func:`prepare_features`)
    and run the loop, unless ``out_dir`` already holds this very run, finished."""
    done = finished_result(ModelDir(out_dir), config, options)
    if done is not None:
        return done
    train_data, val_data = prepare_features(model, *data, options, config)
    return train_model(model, train_data, val_data, out_dir, options, config, **loop_options)


def _tail_view(
    options: TrainOptions, method: str, preset: Preset, overrides: Mapping[str, Any]
) -> TrainOptions:
    """``options`` for a method that trains its encoder's last stage over frozen earlier
    stages (``train_tail_stages``): it reads the frozen encoder's ``tail`` embedding view."""
    switches = get_method(method).switches
    if not overrides.get("train_tail_stages", switches.get("train_tail_stages", 0)):
        if options.embedding_view == "tail":
            raise StevsInputError(
                None, f"--embedding-view tail is what stevs_tail reads, not {method}"
            )
        return options
    if preset.backbone.pooling != "stages":
        raise StevsInputError(
            None, f"{method} trains the last stage of a stage backbone (a CNN, Swin); "
            f"{preset.name}'s {preset.backbone.name} pools {preset.backbone.pooling} tokens",
        )  # fmt: skip
    if not options.freeze_backbone or options.train_stages is not None:
        raise StevsInputError(
            None,
            f"{method} trains a copy of the frozen encoder's last stage: train with "
            "--freeze-backbone and without --train-stages",
        )
    if options.embedding_view not in ("none", "tail"):
        raise StevsInputError(
            None, f"{method} reads the 'tail' embedding view, not --embedding-view "
            f"{options.embedding_view}",
        )  # fmt: skip
    return replace(options, embedding_view="tail")


def _training_data(fold: Fold, preset: Preset) -> tuple[Dataset, Dataset]:
    """The fold's training and validation spots as Datasets."""
    from stevs.data import SpotDataset

    train_data = SpotDataset(fold, "train")
    if len(train_data) == 0:
        raise StevsInputError(fold.path, "the training split has no spots")
    val_data = SpotDataset(fold, "val")
    if train_data.patch_shape and train_data.patch_shape[0] != preset.backbone.img_size:
        log.info(
            "patches are %d px, the %s backbone takes %d px: resizing on the device",
            train_data.patch_shape[0],
            preset.name,
            preset.backbone.img_size,
        )
    return train_data, val_data


def _run_config(
    fold: Fold, method: str, preset: Preset, model: STevs, options: TrainOptions
) -> dict[str, Any]:
    """``config.json`` of a torch run: what rebuilds the model and what it was trained on."""
    return {
        "method": method,
        "fold": fold.fold,
        "fold_path": fold.path,
        "fold_sha256": file_sha256(fold.path) if fold.path else None,
        "preset": preset.to_dict(),
        "model": model.config.to_dict(),
        "genes": list(fold.genes),
        "headline_genes": list(fold.headline_genes),
        "normalisation": dict(fold.normalisation),
        "patch_px": preset.patch_px,
        "mpp": preset.mpp,
        "patch_um": preset.patch_um,
        "patches": training_patch_scale(fold),
        "training_slides": sorted(fold.slides_of("train", "val")),
        "training": asdict(options),
        "stevs_version": __version__,
    }


def train_fold(
    fold: Fold | str | os.PathLike,
    method: str,
    out_dir: str | os.PathLike,
    options: TrainOptions | None = None,
    *,
    preset: str = "cpu_small",
    backbone: str | None = None,
    weights: str | None = None,
    **config_overrides: Any,
) -> TrainResult:
    """Train the torch method ``method`` with ``preset`` on a fold (a :class:`Fold` or path)."""
    fold_obj = fold if isinstance(fold, Fold) else read_fold(fold)
    if get_method(method).kind != "torch":
        raise StevsInputError(None, f"{method} is not a torch method; see stevs.methods")
    preset_obj = get_preset(preset, backbone=backbone, weights=weights)
    options = (options or TrainOptions()).resolved(preset_obj)
    options = _tail_view(options, method, preset_obj, config_overrides)
    build = {
        "latent_dim": options.latent_dim,
        "frozen": bool(options.freeze_backbone),
        **config_overrides,
    }
    train_data, val_data = _training_data(fold_obj, preset_obj)
    torch.manual_seed(options.seed)  # the model's initial weights depend on the seed only
    model = create_model(method, preset_obj, fold_obj.genes, fold_obj.normalisation, **build)
    selection_options = replace(options, refit=False)
    config = _run_config(fold_obj, method, preset_obj, model, selection_options)
    config.update(n_train_spots=len(train_data), n_val_spots=len(val_data))
    log.info(
        "training %s (%s) on fold %s: %d train / %d val spots, %d genes, device %s",
        method, preset_obj.name, fold_obj.fold, len(train_data), len(val_data),
        len(fold_obj.genes), resolve_device(options.device),
    )  # fmt: skip
    if not options.refit or len(val_data) == 0:
        if options.refit:
            log.info("no validation spots: nothing to select on, no refit")
        val = val_data if len(val_data) else None
        return fit_model(model, (train_data, val), out_dir, options, config)
    done = _finished_refit(out_dir, config, selection_options)
    if done is not None:
        return done
    selection_dir = Path(out_dir) / REFIT_SELECTION_DIR
    selection = fit_model(
        model, (train_data, val_data), selection_dir, selection_options, config,
        keep_checkpoint=True,
    )  # fmt: skip
    if not selection.finished:  # time-limited: the rerun continues the selection run
        return selection
    # the refit model is built exactly as the selection's (frozen: context + linear path)
    result = _refit(fold_obj, method, preset_obj, build, options, config, selection, out_dir)
    if result.finished:  # the selection's resume state was kept until now
        selection_folder = ModelDir(selection_dir)
        selection_folder.remove_checkpoint()
        if not options.keep_selection:
            selection_folder.remove()
    return result


def _finished_refit(
    out_dir: str | os.PathLike, config: Mapping[str, Any], selection_options: TrainOptions
) -> TrainResult | None:
    """The stored result when ``out_dir`` holds a finished refit of this very selection run
    (its selection folder may be gone), else None."""
    key = run_key(config, selection_options)
    done = stored_result(
        ModelDir(out_dir), lambda saved: (saved.get("selection") or {}).get("run_key") == key
    )
    if done is None:
        return None
    selection = ModelDir(out_dir).read_config()["selection"]
    return replace(done, best_val_pearson=selection.get(VAL_METRIC))


def _refit(
    fold: Fold,
    method: str,
    preset: Preset,
    build: dict[str, Any],
    options: TrainOptions,
    config: dict[str, Any],
    selection: TrainResult,
    out_dir: str | os.PathLike,
) -> TrainResult:
    """Retrain on train + val for the selection run's best epoch count; ``metrics.csv``
    keeps the selection run's validation curve, then the refit's rows."""
    from stevs.data import SpotDataset

    epochs = max(1, selection.best_epoch)
    fit_data = ConcatDataset([SpotDataset(fold, "train"), SpotDataset(fold, "val")])
    torch.manual_seed(options.seed)
    model = create_model(method, preset, fold.genes, fold.normalisation, **build)
    refit_config = {
        **config,
        "training": asdict(options),
        "n_train_spots": len(fit_data),
        "refit_epochs": epochs,
        "refit_rule": REFIT_RULE,
        "selection": {
            "best_epoch": selection.best_epoch,
            "epochs_done": selection.epochs_done,
            VAL_METRIC: selection.best_val_pearson,
            "n_train_spots": config.get("n_train_spots"),
            "n_val_spots": config.get("n_val_spots"),
            "run_key": run_key(config, replace(options, refit=False)),
        },
    }
    log.info("refit: %d epochs on %d train + val spots", epochs, len(fit_data))
    result = fit_model(model, (fit_data, None), out_dir, options, refit_config, stop_after=epochs)
    rows = [{**r, "stage": "selection"} for r in selection.history]
    rows += [{**r, "stage": "refit"} for r in result.history]
    ModelDir(out_dir).write_metrics(rows)
    return replace(result, best_val_pearson=selection.best_val_pearson, history=rows)
