"""The model ensemble of H&E-only prediction: which models predict together, at which patch
scale, which genes are drawn, and how their predictions combine.

The patch scale of a model is read from its ``config.json``: a ``patches`` entry
(``patch_px``, ``mpp_target``) when training recorded one, else the scale of the first
existing training patch cache of the fold it was trained on (``fold_path``), else the
preset's ``patch_px``/``mpp``, which may differ from what the model saw (a warning says so).
Several models are combined gene by gene: mean of the means, and std
``sqrt(mean of variances + variance of means)`` (law of total variance).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stevs.errors import StevsInputError
from stevs.io.fold_file import read_fold, training_patch_cache, training_patch_scale
from stevs.io.model_dir import ModelDir
from stevs.io.patch_cache import PatchScale
from stevs.methods import check_he_only

log = logging.getLogger(__name__)

#: relative difference of patch scales (µm per px, px) tolerated between model and cache
SCALE_TOLERANCE = 0.02
#: genes drawn by default (headline genes first)
DEFAULT_MAP_GENES = 6


@dataclass(frozen=True)
class TrainedScale:
    """The patch scale models were trained on, and where that was read."""

    scale: PatchScale
    source: str
    certain: bool = True  # False when read from the preset, which may not be what was tiled

    def matches(self, other: PatchScale) -> bool:
        """Same patch side and resolution within :data:`SCALE_TOLERANCE`."""
        return self.scale.matches(other, rel_tol=SCALE_TOLERANCE)

    def describe(self) -> str:
        """E.g. ``"64 px at 2 µm/px (128 µm)"``."""
        return self.scale.describe()


def _fold_cache_scale(fold_path: str) -> TrainedScale | None:
    """The scale of the first existing training patch cache of the fold a model names."""
    with contextlib.suppress(StevsInputError, OSError, ValueError):
        fold = read_fold(fold_path)
        path, scale = training_patch_cache(fold), training_patch_scale(fold)
        if path is not None and scale is not None:
            return TrainedScale(PatchScale.from_dict(scale), f"patch cache {path}")
    return None


def model_patch_scale(config: dict[str, Any], config_path: str | os.PathLike) -> TrainedScale:
    """The patch scale a model was trained on (see the module docstring for the sources)."""
    config_path = Path(config_path)
    recorded = config.get("patches")
    if isinstance(recorded, dict) and "patch_px" in recorded:
        try:
            return TrainedScale(PatchScale.from_dict(recorded), f"{config_path} (patches)")
        except (KeyError, TypeError, ValueError) as err:
            raise StevsInputError(config_path, f"unreadable 'patches' entry: {err}") from err
    fold_path = config.get("fold_path")
    if fold_path and Path(fold_path).is_file():
        found = _fold_cache_scale(fold_path)
        if found is not None:
            return found
    try:
        preset = PatchScale(int(config["patch_px"]), float(config["mpp"]))
    except (KeyError, TypeError, ValueError) as err:
        raise StevsInputError(
            config_path, f"cannot tell which patch scale the model was trained on: {err}"
        ) from err
    return TrainedScale(preset, f"{config_path} (the preset's patch_px/mpp)", certain=False)


@dataclass
class ModelSet:
    """Trained models that predict together: shared normalisation and patch scale; the panel
    is the union of theirs, each gene averaged over the models that predict it."""

    dirs: list[Path]
    configs: list[dict[str, Any]]
    genes: list[str]
    normalisation: dict[str, Any]
    scale: TrainedScale
    headline_genes: list[str] = field(default_factory=list)

    def columns(self, index: int) -> np.ndarray:
        """Positions of model ``index``'s genes in :attr:`genes`."""
        position = {g: i for i, g in enumerate(self.genes)}
        return np.array([position[g] for g in self.configs[index]["genes"]], dtype=np.int64)

    def models_per_gene(self) -> np.ndarray:
        """How many models predict each gene of :attr:`genes`."""
        counts = np.zeros(len(self.genes), dtype=np.int64)
        for index in range(len(self.dirs)):
            counts[self.columns(index)] += 1
        return counts


def _headline_genes(config: dict[str, Any]) -> list[str]:
    """A model's headline genes: its config's, else its fold file's, else none."""
    if config.get("headline_genes"):
        return [str(g) for g in config["headline_genes"]]
    fold_path = config.get("fold_path")
    if not fold_path or not Path(fold_path).is_file():
        return []
    with contextlib.suppress(StevsInputError):
        return list(read_fold(fold_path).headline_genes)
    return []


def _check_same(first_dir: Path, first: dict, directory: Path, config: dict, scales: list) -> None:
    """Refuse combining models whose normalisation or patch scale differ."""
    path = directory / "config.json"
    norm, other_norm = first.get("normalisation") or {}, config.get("normalisation") or {}
    for key in ("method", "target_sum"):
        if other_norm.get(key) != norm.get(key):
            raise StevsInputError(
                path,
                f"normalisation {key} {other_norm.get(key)!r} differs from {first_dir}'s "
                f"{norm.get(key)!r}: their predictions cannot be averaged",
            )
    if not scales[-1].matches(scales[0].scale):
        raise StevsInputError(
            path,
            f"trained on patches of {scales[-1].describe()} (from {scales[-1].source}), but "
            f"{first_dir} on {scales[0].describe()} (from {scales[0].source}): "
            "models of one ensemble must share the patch scale",
        )


def check_models(model_dirs: Sequence[str | os.PathLike]) -> ModelSet:
    """Read the models' configs; refuse models that cannot predict H&E-only slides or cannot
    be combined (normalisation, patch scale)."""
    if not model_dirs:
        raise StevsInputError(None, "no model given (--models)")
    dirs = [Path(d) for d in model_dirs]
    configs, scales = [], []
    for directory in dirs:
        folder = ModelDir(directory)
        config = folder.read_config()
        check_he_only(config["method"], str(folder.config_path))
        configs.append(config)
        scales.append(model_patch_scale(config, folder.config_path))
        _check_same(dirs[0], configs[0], directory, config, scales)
    genes = list(dict.fromkeys(str(g) for c in configs for g in c["genes"]))
    scale = next((s for s in scales if s.certain), scales[0])
    models = ModelSet(
        dirs, configs, genes, dict(configs[0].get("normalisation") or {}), scale,
        list(dict.fromkeys(g for c in configs for g in _headline_genes(c))),
    )  # fmt: skip
    shared = int((models.models_per_gene() == len(dirs)).sum())
    if shared < len(genes):
        log.info(
            "%d models: %d genes predicted by all of them, %d by fewer (var['n_models'])",
            len(dirs),
            shared,
            len(genes) - shared,
        )
    return models


def resolve_patch_scale(
    models: ModelSet, patch_px: int | None, patch_um: float | None
) -> TrainedScale:
    """The scale to tile at: the models'; a scale given must agree with it."""
    if patch_px is None and patch_um is None:
        return models.scale
    trained = models.scale.scale
    px = int(patch_px) if patch_px is not None else trained.patch_px
    um = float(patch_um) if patch_um is not None else px * trained.mpp_target
    if not (math.isfinite(um) and um > 0 and px > 0):
        raise StevsInputError(None, f"patch size must be positive, got {px} px / {um!r} µm")
    asked = PatchScale(px, um / px)
    if models.scale.matches(asked):
        return models.scale
    config_path = models.dirs[0] / "config.json"
    message = (
        f"the model was trained on patches of {models.scale.describe()} (from "
        f"{models.scale.source}), not the {asked.describe()} asked for"
    )
    if models.scale.certain:
        raise StevsInputError(config_path, message + ": use a model trained at that scale")
    log.warning("%s: %s; tiling at the asked scale", config_path, message)
    return TrainedScale(asked, "the command line")


def combine_predictions(
    means: Sequence[np.ndarray],
    stds: Sequence[np.ndarray],
    columns: Sequence[np.ndarray] | None = None,
    n_genes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble of models, gene by gene: the mean of the means and std = sqrt(mean variance +
    variance of means) over the models that predict a gene.

    ``columns[i]`` places model ``i``'s genes in a union panel of ``n_genes``; without it all
    models share one panel.
    """
    if not means or len(means) != len(stds):
        raise ValueError("need one std per mean, at least one model")
    if columns is None:
        columns = [np.arange(np.shape(m)[1]) for m in means]
        n_genes = np.shape(means[0])[1]
    shape = (len(means), np.shape(means[0])[0], int(n_genes))
    stacked, variances = np.full(shape, np.nan), np.full(shape, np.nan)
    for i, (mean, std, cols) in enumerate(zip(means, stds, columns, strict=True)):
        stacked[i][:, cols] = np.asarray(mean, np.float64)
        variances[i][:, cols] = np.asarray(std, np.float64) ** 2
    mean = np.nanmean(stacked, axis=0)
    variance = np.nanmean(variances, axis=0) + np.nanvar(stacked, axis=0)
    return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


def choose_genes(models: ModelSet, genes: Sequence[str] | None) -> list[str]:
    """Genes to draw: those asked for (all must be in the panel) or the headline genes."""
    if genes:
        missing = [g for g in genes if g not in models.genes]
        if missing:
            raise StevsInputError(
                models.dirs[0] / "config.json",
                f"gene(s) {', '.join(missing)} are not in the model's panel of "
                f"{len(models.genes)} genes (e.g. {', '.join(models.genes[:5])})",
            )
        return list(dict.fromkeys(genes))
    headline = [g for g in models.headline_genes if g in models.genes]
    ordered = list(dict.fromkeys(headline + models.genes))
    return ordered[:DEFAULT_MAP_GENES]
