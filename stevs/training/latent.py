"""The latent analysis of a finished STevs model (:mod:`stevs.models.analysis`) on its fold:
the spots it was fitted on (training slides, + validation after a refit) and the held-out
(test) slides,
written as the model folder's ``latent.json``. ``stevs train`` runs it after training."""

from __future__ import annotations

import logging
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from stevs.io.embedding_cache import embedding_path
from stevs.io.fold_file import Fold, read_fold
from stevs.io.model_dir import ModelDir
from stevs.models.analysis import has_latent, latent_analysis
from stevs.models.factory import load_model
from stevs.models.stevs import STevs
from stevs.training.batches import make_loader
from stevs.training.options import TrainOptions

log = logging.getLogger("stevs.train")

#: the sets of spots analysed: name -> the fold's splits they come from (``train``: the
#: spots the model was fitted on, the validation spots too after a refit)
ANALYSED_SPLITS = {"train": ("train",), "heldout": ("test",)}


def _options(config: dict[str, Any]) -> TrainOptions:
    """The run's training options as ``config.json`` records them."""
    recorded = config.get("training") or {}
    known = {f.name for f in fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in recorded.items() if k in known})


def _spots(model: STevs, fold: Fold, parts: tuple[str, ...], options: TrainOptions,
           config: dict[str, Any]) -> Dataset | None:  # fmt: skip
    """The spots of ``parts`` as the model reads them: patches, or frozen embeddings with
    their neighbourhood context (among the spots of each slide of the set)."""
    from stevs.data import SpotDataset
    from stevs.training.fold import frozen_embeddings, with_context

    datasets = [SpotDataset(fold, part) for part in parts]
    datasets = [d for d in datasets if len(d) > 0]
    if not datasets:
        return None
    data: Dataset = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    if options.freeze_backbone and model.backbone is not None:
        if options.embeddings and not all(
            embedding_path(options.embeddings, fold.slides[int(i)].slide).is_file()
            for d in datasets
            for i in set(d.slide_index.tolist())
        ):  # held-out slides may not be embedded yet when training ends: embed them here
            options = replace(options, embeddings=None)
        data = with_context(model, frozen_embeddings(model, [data], options, config)[0])
    return data


def write_latent_analysis(
    fold: Fold | str | os.PathLike, model_dir: str | os.PathLike, device: str = "cpu"
) -> Path | None:
    """Analyse the model in ``model_dir`` on ``fold`` and write its ``latent.json``; None
    (nothing written) for a model without a latent (the regression head). A folder whose
    ``latent.json`` already describes its weights is left as it is."""
    folder = ModelDir(model_dir)
    if folder.read_latent() is not None:
        return folder.latent_path
    fold_obj = fold if isinstance(fold, Fold) else read_fold(fold)
    model, config = load_model(model_dir, device=device)
    if not has_latent(model):
        return None
    options = _options(config)
    splits = {}
    for name, parts in ANALYSED_SPLITS.items():
        if name == "train" and "refit_epochs" in config:  # refitted on train + val
            parts = ("train", "val")
        data = _spots(model, fold_obj, parts, options, config)
        if data is not None:
            batch_size = int(options.batch_size or 64)
            splits[name] = make_loader(data, batch_size, 0, model.target_mean.device, None)
    analysis = latent_analysis(model, splits)
    for name, stats in analysis["splits"].items():
        log.info(
            "latent (%s): %d of %d dimensions active, PoE precision shares %s",
            name, stats["active_dims"], analysis["latent_dim"], stats["precision_share"],
        )  # fmt: skip
    return folder.write_latent(analysis)
