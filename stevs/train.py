"""Train STevs, its ablations or the ST-Net-style baseline on one fold (``stevs train``).

Why a plain PyTorch loop and not Lightning: the loop is ~300 lines, has no extra dependency,
and owns exactly the behaviour the workflow relies on: a checkpoint after every epoch that
holds only tensors and plain types (loaded back with ``weights_only=True``), bit-identical
resume on CPU (RNG states, per-epoch shuffling seeded by ``seed + epoch``) of the same run
only, early stopping on the evaluation's headline Pearson r of the validation spots and
atomic outputs. Multi-GPU stays reachable: the
model's ``forward`` returns the loss, so it is wrapped in ``DistributedDataParallel`` when the
script runs under ``torchrun`` (``WORLD_SIZE > 1``), with a ``DistributedSampler``; rank 0
validates and writes, and broadcasts the early-stopping decision.

Outputs in ``--out`` (a model folder of :mod:`stevs.io.model_dir`): ``checkpoint.pt`` (resume
state) and ``metrics.csv`` (one row per epoch: every loss term, ``val_pearson_r_mean_headline``,
learning rates, time) after every epoch, ``train.log``, and when training ends
``model.safetensors`` (best weights) with ``config.json`` (rebuilds the model) beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from stevs import __version__
from stevs.atomic import check_writable
from stevs.cli import options_from_args
from stevs.errors import StevsInputError
from stevs.hashing import file_sha256
from stevs.io.fold_file import Fold, read_fold
from stevs.io.model_dir import LOG, ModelDir
from stevs.methods import METHOD_NAMES, get_method
from stevs.metrics import VAL_METRIC, headline_pearson
from stevs.models.context import CONTEXTS
from stevs.models.poe import ALIGNMENTS
from stevs.models.presets import PRESETS, Preset, get_preset
from stevs.models.stevs import LINEAR_PATHS, LINEAR_RANKS, STevs, STevsConfig

log = logging.getLogger("stevs.train")

CHECKPOINT_FORMAT = 1
#: keys of the Dataset item moved to the device as tensors
TENSOR_KEYS = ("patch", "embedding", "coords", "target", "counts", "library_size", "slide")


@dataclass
class TrainOptions:
    """Training hyper-parameters; ``None`` takes the preset's value."""

    epochs: int | None = None
    batch_size: int | None = None
    lr_backbone: float | None = None
    lr_heads: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    kl_warmup_epochs: float | None = None
    patience: int | None = None
    grad_clip: float | None = None
    freeze_backbone: bool | None = None
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    compile: bool = False
    augment: bool = True
    max_minutes: float | None = None
    latent_dim: int | None = None
    #: frozen backbone: test-time view of the embeddings (stevs.embed: none | dihedral8)
    embedding_view: str = "none"
    #: frozen backbone: folder of embedding caches (stevs embed) read instead of embedding
    embeddings: str | None = None
    #: after early stopping on val, retrain from scratch on train + val for the best epochs
    refit: bool = False

    def resolved(self, preset: Preset) -> TrainOptions:
        """A copy with every ``None`` replaced by the preset's default."""
        values = asdict(self)
        for f in fields(self):
            if values[f.name] is None and hasattr(preset, f.name):
                values[f.name] = getattr(preset, f.name)
        return TrainOptions(**values)


@dataclass
class TrainResult:
    """What a finished (or time-limited) run produced."""

    out_dir: Path
    epochs_done: int
    best_epoch: int
    best_val_pearson: float | None
    finished: bool
    history: list[dict[str, float]]


# ------------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; a device this machine lacks, or a
    name torch does not know, is an error saying which devices there are."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise StevsInputError(
            None, f"--device {name} is not a device name; use auto, cpu, cuda, cuda:N or mps"
        ) from err
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
    }
    if not available.get(device.type, True):
        there = ", ".join(["cpu", *[k for k, v in available.items() if v]])
        raise StevsInputError(None, f"--device {name}: this machine has no {device.type} ({there})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise StevsInputError(None, f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies of a state dict (no shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings as lists."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], Tensor) else list(values)
    return batch


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensor entries of a batch to ``device`` (non-blocking)."""
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v)
        for k, v in batch.items()
    }


def augment_patches(patch: Tensor) -> Tensor:
    """Random flips, 90-degree rotations and colour jitter, per patch, on the device.

    uint8 (B, 3, H, W) -> float (B, 3, H, W) in [0, 255]. Uses the global torch RNG of the
    device (saved in checkpoints), so a resumed run draws the same augmentations.

    Hand-written, not ``torchvision.transforms.v2.ColorJitter``: v2 draws one set of factors
    per call, so per-patch factors need a Python loop over the batch. Measured (1 CPU thread,
    64 patches of 64 px): this whole function (turns, flips and jitter) 14.5 ms per batch,
    v2's jitter alone in a per-patch loop 15.7 ms; on a GPU the loop is also 64 small kernel
    launches per operation instead of one.
    """
    x = patch.float()
    b = x.shape[0]
    device = x.device
    turns = torch.randint(0, 4 if x.shape[-1] == x.shape[-2] else 1, (b,), device=device)
    rotated = x.clone()
    for k in range(1, 4):
        chosen = turns == k
        if bool(chosen.any()):
            rotated[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    flip = (torch.rand(b, device=device) < 0.5).view(b, 1, 1, 1)
    x = torch.where(flip, rotated.flip(3), rotated)
    brightness = torch.empty(b, 1, 1, 1, device=device).uniform_(0.85, 1.15)
    contrast = torch.empty(b, 1, 1, 1, device=device).uniform_(0.85, 1.15)
    saturation = torch.empty(b, 1, 1, 1, device=device).uniform_(0.85, 1.15)
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * saturation + grey
    return x.clamp(0.0, 255.0)


def augment_coords(coords: Tensor, jitter: float = 0.05) -> Tensor:
    """Random flips and 90-degree rotations of per-slide normalised coordinates, per spot,
    plus a small scale and shift jitter.

    A slide's absolute layout says nothing about another slide's, so the spatial expert must
    not memorise where the training slides' regions lie: under these transforms it can only
    learn what survives them (how far a spot lies from the tissue's centre), and it learns to
    be uncertain otherwise, which keeps it from outvoting the image expert in the Product of
    Experts on held-out slides.
    """
    xy = coords.float()
    b = xy.shape[0]
    device = xy.device
    swap = torch.rand(b, 1, device=device) < 0.5
    xy = torch.where(swap, xy.flip(1), xy)
    signs = torch.randint(0, 2, (b, 2), device=device).float() * 2 - 1
    scale = torch.empty(b, 1, device=device).uniform_(1 - jitter, 1 + jitter)
    shift = torch.empty(b, 2, device=device).uniform_(-jitter, jitter)
    return xy * signs * scale + shift


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on ``seed + epoch`` (so a resumed epoch is identical)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class EmbeddingDataset(Dataset):
    """Dataset items with the patch replaced by its cached backbone embedding."""

    def __init__(self, embeddings: Tensor, items: Mapping[str, Any]) -> None:
        self.embeddings = embeddings
        self.items = items

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {k: v[index] for k, v in self.items.items()}
        item["embedding"] = self.embeddings[index]
        return item


def read_cached_embeddings(
    datasets: Sequence[Any], folder: str, key: Any
) -> EmbeddingDataset:
    """The items of ``SpotDataset`` s with each spot's embedding from the embedding caches
    in ``folder`` (:mod:`stevs.io.embedding_cache`, checked against ``key``), no patches."""
    from stevs.io.embedding_cache import EmbeddingCache, embedding_path

    embeddings, items = [], {"coords": [], "target": [], "counts": [], "library_size": [],
                             "slide": []}  # fmt: skip
    barcodes: list[str] = []
    for data in datasets:
        for index in np.unique(data.slide_index):
            rows = np.flatnonzero(data.slide_index == index)
            slide = data.slide_ids[int(index)]
            cache = EmbeddingCache(embedding_path(folder, slide)).check(key)
            chosen = [data.barcodes[i] for i in rows]
            embeddings.append(torch.from_numpy(cache.read(chosen)))
            for name, values in (("coords", data.coords), ("target", data.targets),
                                 ("counts", data.counts), ("library_size", data.library_sizes),
                                 ("slide", data.slide_index)):  # fmt: skip
                items[name].append(torch.from_numpy(np.asarray(values[rows])))
            barcodes.extend(chosen)
    merged: dict[str, Any] = {k: torch.cat(v) for k, v in items.items() if v}
    merged["barcode"] = barcodes
    return EmbeddingDataset(torch.cat(embeddings) if embeddings else torch.zeros(0, 0), merged)


def embedding_key_of(config: Mapping[str, Any], view: str) -> Any:
    """The embedding-cache key a frozen run of ``config`` (a model folder's config.json)
    needs: the preset, its backbone and weights as trained, the patch scale, the view."""
    from stevs.embed import embedding_key
    from stevs.models.backbones import BackboneSpec

    scale = config.get("patches") or {}
    preset = (config.get("preset") or {}).get("name", "")
    spec = BackboneSpec.from_dict((config.get("model") or {}).get("backbone") or {})
    return embedding_key(
        preset, spec, view, scale.get("patch_px", 0), scale.get("mpp_target", 0.0)
    )


@torch.no_grad()
def cache_embeddings(
    model: STevs,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    workers: int,
    view: str = "none",
) -> EmbeddingDataset:
    """Run the (frozen) backbone once over ``dataset`` (averaged over the test-time
    ``view``, :func:`stevs.embed.embed_view`); keep everything but the patches."""
    from stevs.embed import embed_view

    loader = make_loader(dataset, batch_size, workers, device, sampler=None)
    model.eval()
    embeddings: list[Tensor] = []
    keep: dict[str, list[Any]] = {}
    for batch in tqdm(loader, desc="embedding patches", unit="batch", mininterval=2):
        patch = batch["patch"].to(device, non_blocking=True)
        embeddings.append(embed_view(model.embed, patch, view).cpu())
        for key, value in batch.items():
            if key != "patch":
                keep.setdefault(key, []).append(value)
    items: dict[str, Any] = {}
    for key, values in keep.items():
        if isinstance(values[0], Tensor):
            items[key] = torch.cat(values)
        else:
            items[key] = [v for chunk in values for v in chunk]
    feature_dim = model.backbone.feature_dim if model.backbone is not None else 0
    return EmbeddingDataset(
        torch.cat(embeddings) if embeddings else torch.zeros(0, feature_dim), items
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    sampler: Sampler | None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with the item collate, pinned memory on CUDA, persistent workers."""
    in_memory = isinstance(dataset, EmbeddingDataset)
    workers = 0 if in_memory else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 1% of the peak (a ``LambdaLR`` factor).

    Why not torch's ``SequentialLR(LinearLR, CosineAnnealingLR)`` or timm's
    ``CosineLRScheduler``: both take one absolute floor (``eta_min`` / ``lr_min``) for every
    parameter group, while the backbone and the heads have different peaks and each decays
    to 1% of its own; a per-group factor through torch's ``LambdaLR`` does exactly that.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(
    model: STevs,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable,
    config: Mapping[str, Any],
) -> dict[str, float]:
    """The validation spots' :data:`VAL_METRIC` (the evaluation's headline Pearson r, through
    :func:`stevs.metrics.headline_pearson`) and MSE."""
    model.eval()
    predictions, truths, slides = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast():
            mean, _ = model.predict(
                batch.get("patch"), batch.get("coords"), batch.get("embedding"), n_samples=0,
                context=batch.get("context"),
            )  # fmt: skip
        predictions.append(mean.float().cpu().numpy())
        truths.append(batch["target"].float().cpu().numpy())
        slides.append(batch["slide"].cpu().numpy())
    if not predictions:
        return {}
    prediction, truth = np.concatenate(predictions), np.concatenate(truths)
    genes = list(config.get("genes") or [f"gene{i}" for i in range(truth.shape[1])])
    headline = list(config.get("headline_genes") or genes)
    score = headline_pearson(truth, prediction, np.concatenate(slides), genes, headline)
    return {VAL_METRIC: score, "val_mse": float(((prediction - truth) ** 2).mean())}


# ------------------------------------------------------------------------------- model


def build_model(
    method: str,
    preset: Preset,
    genes: Sequence[str],
    normalisation: Mapping[str, Any] | None,
    *,
    latent_dim: int | None = None,
    frozen: bool = False,
    **config_overrides: Any,
) -> STevs:
    """A fresh model of ``method`` with ``preset``'s backbone, standardising with the fold's
    training mean/std (``normalisation``). With a ``frozen`` backbone the preset's context and
    linear path apply (:meth:`Preset.model_defaults`); the method's switches win over the
    preset, ``config_overrides`` (command-line options) over both."""
    defaults = {"beta": preset.beta, **preset.model_defaults(frozen)}
    config = STevsConfig.for_method(
        method,
        n_genes=len(genes),
        backbone=preset.backbone,
        latent_dim=latent_dim or preset.latent_dim,
        hidden_dim=preset.hidden_dim,
        **defaults,
    )
    config = replace(config, **config_overrides)
    model = STevs(config)
    if normalisation and normalisation.get("mean") is not None:
        if len(normalisation["mean"]) != len(genes) or len(normalisation["std"]) != len(genes):
            raise StevsInputError(None, "normalisation mean/std do not match the gene panel")
        model.set_normalisation(normalisation["mean"], normalisation["std"])
    elif config.standardise:
        model.config.standardise = False
    return model


# ------------------------------------------------------------------------------- training


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _distributed() -> tuple[bool, int, int]:
    """(is distributed, rank, world size) from an initialised process group or torchrun env."""
    import torch.distributed as dist

    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", 1)) > 1
    ):
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


#: options that do not change the weights a run produces; a checkpoint resumes across them
_RUN_ONLY_OPTIONS = ("workers", "device", "compile", "max_minutes", "embeddings")


@dataclass
class TrainState:
    """What a checkpoint carries besides the model, optimiser, scheduler and RNG states."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_model: dict[str, Tensor] | None = None
    bad_epochs: int = 0
    finished: bool = False

    def observe(self, score: float, model: nn.Module, has_val: bool, patience: int) -> bool:
        """Keep the best weights after an epoch; True when early stopping says stop."""
        if not has_val:  # nothing to select on: keep the last epoch
            improved = True
        elif math.isfinite(score):
            improved = score > self.best_score + 1e-4
        else:
            improved = self.best_model is None
        if improved:
            self.best_score = score if math.isfinite(score) else -math.inf
            self.best_epoch = self.epoch
            self.best_model = cpu_state_dict(model)
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return has_val and self.bad_epochs >= patience


@dataclass
class _Run:
    """Everything one training run holds while it goes through its epochs."""

    model: STevs
    step_model: nn.Module  # the model as the optimiser steps it (DDP / compiled wrapper)
    folder: ModelDir
    options: TrainOptions
    config: Mapping[str, Any]
    device: torch.device
    loader: DataLoader
    val_loader: DataLoader | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    frozen: bool
    distributed: bool
    is_main: bool
    world: int
    #: the epoch after which the run ends (refit: the selected epoch; else options.epochs)
    last_epoch: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.loader))

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA, nothing elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def run_key(config: Mapping[str, Any], options: TrainOptions) -> dict[str, Any]:
    """What decides a run's weights: a checkpoint resumes only when this is unchanged."""
    training = {k: v for k, v in asdict(options).items() if k not in _RUN_ONLY_OPTIONS}
    keep = ("method", "fold_sha256", "preset", "model", "genes", "normalisation", "patches",
            "refit_epochs")  # fmt: skip
    return json.loads(json.dumps({**{k: config.get(k) for k in keep}, "training": training}))


def _check_options(options: TrainOptions) -> None:
    for name in ("epochs", "batch_size"):
        value = getattr(options, name)
        if not isinstance(value, int) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise StevsInputError(None, f"{flag} must be a whole number >= 1, got {value!r}")


def _place(options: TrainOptions) -> tuple[torch.device, TrainOptions, bool, int, int]:
    """Device, options with a worker count the machine can run, and the DDP layout."""
    distributed, rank, world = _distributed()
    device = resolve_device(options.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    cores = os.cpu_count() or 1
    if device.type == "cpu" and options.workers >= cores:
        log.info("%d CPU cores: using %d data workers, not %d", cores, cores - 1, options.workers)
        options = replace(options, workers=cores - 1)
    return device, options, distributed, rank, world


def _make_optimizer(model: STevs, options: TrainOptions, frozen: bool) -> torch.optim.Optimizer:
    groups = []
    if not frozen and model.backbone_parameters():
        groups.append({"params": model.backbone_parameters(), "lr": options.lr_backbone})
    groups.append({"params": model.head_parameters(), "lr": options.lr_heads})
    return torch.optim.AdamW(groups, weight_decay=options.weight_decay)


def _setup(
    model: STevs,
    train_data: Dataset,
    val_data: Dataset | None,
    folder: ModelDir,
    options: TrainOptions,
    config: Mapping[str, Any],
) -> _Run:
    """Place the model, cache frozen embeddings, build loaders, optimiser and scheduler."""
    device, options, distributed, rank, world = _place(options)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    model.to(device)
    frozen = bool(options.freeze_backbone) and model.backbone is not None
    if frozen:
        model.backbone.requires_grad_(False)
        if not isinstance(train_data, EmbeddingDataset):  # else embedded by the caller
            train_data, val_data = _frozen_data(
                model, train_data, val_data, options, config, device
            )
    train_data, val_data = _model_features(model, train_data, val_data, frozen, config)
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler: Any = DistributedSampler(train_data, seed=options.seed, drop_last=True)
    else:
        sampler = EpochSampler(len(train_data), options.seed)
    drop_last = len(train_data) >= 2 * options.batch_size
    loader = make_loader(
        train_data, options.batch_size, options.workers, device, sampler, drop_last
    )
    val_loader = None
    if rank == 0 and val_data is not None and len(val_data) > 0:
        val_loader = make_loader(val_data, options.batch_size, options.workers, device, None)
    optimizer = _make_optimizer(model, options, frozen)
    steps = max(1, len(loader))
    warmup, total = int(options.warmup_epochs * steps), options.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total)
    )
    step_model: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        step_model = DistributedDataParallel(model, device_ids=ids)
    if options.compile:
        step_model = torch.compile(step_model)
    return _Run(
        model, step_model, folder, options, config, device, loader, val_loader, optimizer,
        scheduler, frozen, distributed, rank == 0, world,
    )  # fmt: skip


def with_context(model: STevs, data: EmbeddingDataset) -> EmbeddingDataset:
    """``data`` with the neighbourhood context of each spot (:mod:`stevs.models.context`)
    among its split's spots of the same slide, when the model uses it."""
    if not model.config.uses_context or "context" in data.items:
        return data
    from stevs.models.context import neighbour_mean

    context = neighbour_mean(
        data.embeddings, data.items["coords"], data.items["slide"], model.config.context_radius
    )
    return EmbeddingDataset(data.embeddings, {**data.items, "context": context})


def _model_features(
    model: STevs,
    train_data: Dataset,
    val_data: Dataset | None,
    frozen: bool,
    config: Mapping[str, Any],
) -> tuple[Dataset, Dataset | None]:
    """Neighbourhood context and the linear path's fit, for the models that have them."""
    from stevs.models.stevs import fit_linear_path

    c = model.config
    if not (c.uses_context or model.linear is not None):
        return train_data, val_data
    if not frozen or not isinstance(train_data, EmbeddingDataset):
        raise StevsInputError(
            None, "context / linear_path need frozen embeddings: train with --freeze-backbone"
        )
    train_data = with_context(model, train_data)
    if isinstance(val_data, EmbeddingDataset):
        val_data = with_context(model, val_data)
    if model.linear is not None:
        features = model.image_features(train_data.embeddings, train_data.items.get("context"))
        genes = list(config.get("genes") or [f"gene{i}" for i in range(c.n_genes)])
        slides = train_data.items["slide"].numpy()
        headline = list(config.get("headline_genes") or genes)
        target = train_data.items["target"]
        fitted, oof = fit_linear_path(model, features, target, slides, genes, headline)
        log.info("linear path: %s", fitted)
        if oof is not None:  # the latent path learns what the probe leaves on unseen slides
            items = {**train_data.items, "linear_offset": oof}
            train_data = EmbeddingDataset(train_data.embeddings, items)
    return train_data, val_data


def _frozen_data(
    model: STevs,
    train_data: Dataset,
    val_data: Dataset | None,
    options: TrainOptions,
    config: Mapping[str, Any],
    device: torch.device,
) -> tuple[Dataset, Dataset | None]:
    """Training and validation items with embeddings instead of patches: read from the
    embedding caches of ``options.embeddings``, else computed here once."""
    parts = [d for d in (train_data, val_data) if d is not None and len(d) > 0]
    if options.embeddings:
        key = embedding_key_of(config, options.embedding_view)
        log.info("frozen backbone: reading embeddings from %s", options.embeddings)
        read = [
            read_cached_embeddings(getattr(d, "datasets", [d]), options.embeddings, key)
            for d in parts
        ]
    else:
        log.info("frozen backbone: embedding %d training spots", len(train_data))
        read = [
            cache_embeddings(model, d, device, options.batch_size, 0, options.embedding_view)
            for d in parts
        ]
    return read[0], (read[1] if len(read) > 1 else None)


def _resume(run: _Run) -> TrainState:
    """The state of a checkpoint of this very run, else a fresh one (saying why)."""
    state = TrainState()
    checkpoint = run.folder.read_checkpoint()
    if checkpoint is None:
        return state
    key = run_key(run.config, run.options)
    if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("run_key") != key:
        old = checkpoint.get("run_key") or {}
        changed = sorted(k for k in key if old.get(k) != key[k]) or ["checkpoint format"]
        if "training" in changed and isinstance(old.get("training"), dict):
            changed.remove("training")
            changed += sorted(
                f"training.{k}"
                for k in key["training"]
                if old["training"].get(k) != key["training"][k]
            )
        log.warning(
            "%s was made by another run (changed: %s): training from scratch",
            run.folder.checkpoint_path,
            ", ".join(changed),
        )
        return state
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    _set_rng_state(checkpoint["rng"], run.device)
    state = TrainState(**{k: checkpoint[k] for k in asdict(TrainState())})
    log.info("resuming from %s after epoch %d", run.folder.checkpoint_path, state.epoch)
    return state


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One pass over the training loader: the epoch's mean loss terms and throughput."""
    options, model = run.options, run.model
    run.loader.sampler.set_epoch(epoch)
    model.train()
    if run.frozen:
        model.backbone.eval()
    sums: dict[str, float] = {}
    n_batches = n_spots = 0
    kl_weight_sum = 0.0
    kl_warmup_steps = max(1, int(options.kl_warmup_epochs * run.steps_per_epoch))
    start = time.monotonic()
    bar = tqdm(run.loader, desc=f"epoch {epoch}/{options.epochs}", unit="batch", mininterval=2,
               disable=not run.is_main)  # fmt: skip
    for batch in bar:
        batch = to_device(batch, run.device)
        if "patch" in batch and not run.frozen and options.augment:
            batch["patch"] = augment_patches(batch["patch"])
        if "coords" in batch and options.augment:
            batch["coords"] = augment_coords(batch["coords"])
        step = (epoch - 1) * run.steps_per_epoch + n_batches
        kl_weight = model.config.beta * min(1.0, step / kl_warmup_steps)
        kl_weight_sum += kl_weight
        with run.autocast():
            output = run.step_model(batch, kl_weight)
        values = output.floats()
        if not all(math.isfinite(v) for v in values.values()):
            raise StevsInputError(
                run.folder.path,
                f"training diverged at epoch {epoch} (non-finite loss terms: {values}); "
                "try a lower --lr / --lr-backbone, or another --seed",
            )
        run.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if options.grad_clip and options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        n_batches += 1
        n_spots += int(batch["target"].shape[0])
        bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
    bar.close()
    seconds = time.monotonic() - start
    row: dict[str, float] = {"epoch": epoch}
    row.update({f"train_{k}": v / max(1, n_batches) for k, v in sums.items()})
    row["kl_weight"] = kl_weight_sum / max(1, n_batches)  # the epoch's mean
    row["train_seconds"] = seconds
    row["train_spots_per_s"] = n_spots * run.world / max(seconds, 1e-9)
    return row


def _end_epoch(run: _Run, state: TrainState, row: dict[str, float], started: float) -> None:
    """Validate, select, decide on early stopping and write the checkpoint of an epoch."""
    for i, group in enumerate(run.optimizer.param_groups):
        name = "lr_heads" if i == len(run.optimizer.param_groups) - 1 else "lr_backbone"
        row[name] = float(group["lr"])
    if run.val_loader is not None:
        row.update(evaluate(run.model, run.val_loader, run.device, run.autocast, run.config))
    row["epoch_seconds"] = time.monotonic() - started
    state.history.append(row)
    state.epoch = int(row["epoch"])
    score = row.get(VAL_METRIC, float("nan"))
    stop = state.observe(score, run.model, run.val_loader is not None, run.options.patience)
    if run.distributed:
        import torch.distributed as dist

        flag = torch.tensor([float(stop)], device=run.device)
        dist.broadcast(flag, 0)
        stop = bool(flag.item())
    if stop:
        log.info("early stopping after epoch %d (best epoch %d)", state.epoch, state.best_epoch)
    state.finished = stop or state.epoch >= (run.last_epoch or run.options.epochs)
    log.info(
        "epoch %d: %s",
        state.epoch,
        ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
    )
    if run.is_main:
        run.folder.write_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "run_key": run_key(run.config, run.options),
                "model": cpu_state_dict(run.model),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "rng": _rng_state(run.device),
                **asdict(state),
            }
        )
        run.folder.write_metrics(state.history)


def _finish(run: _Run, state: TrainState) -> TrainResult:
    """Write the best weights and, beside them, the config of the run that made them."""
    best = state.best_model if state.best_model is not None else cpu_state_dict(run.model)
    if run.is_main:
        metadata = {
            "method": run.config.get("method"),
            "best_epoch": state.best_epoch,
            "epochs_done": state.epoch,
            "stevs_version": __version__,
        }
        run.folder.write_tensors(best, metadata)
        run.folder.write_config(
            {**run.config, "best_epoch": state.best_epoch, "epochs_done": state.epoch}
        )
        run.folder.write_metrics(state.history)
    best_score = state.best_score
    return TrainResult(
        out_dir=run.folder.path,
        epochs_done=state.epoch,
        best_epoch=state.best_epoch,
        best_val_pearson=best_score if math.isfinite(best_score) else None,
        finished=bool(state.finished),
        history=list(state.history),
    )


def train_model(
    model: STevs,
    train_data: Dataset,
    val_data: Dataset | None,
    out_dir: str | os.PathLike,
    options: TrainOptions,
    config: Mapping[str, Any],
    *,
    on_epoch_end: Callable[[int], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``model``, resuming from ``out_dir/checkpoint.pt`` when that checkpoint belongs
    to this very run (same :func:`run_key`), else from scratch.

    ``options`` must be resolved (no ``None``); ``config`` goes to ``config.json`` beside the
    final weights. ``on_epoch_end(epoch)`` runs after each epoch's checkpoint is written
    (tests use it to simulate a kill). ``stop_after``: end after this epoch, with the
    learning-rate schedule still laid out over ``options.epochs`` (the refit).
    """
    _check_options(options)
    run = _setup(model, train_data, val_data, ModelDir(out_dir), options, config)
    run.last_epoch = min(options.epochs, stop_after or options.epochs)
    state = _resume(run)
    started = time.monotonic()
    while not state.finished and state.epoch < run.last_epoch:
        epoch_start = time.monotonic()
        row = _train_epoch(run, state.epoch + 1)
        _end_epoch(run, state, row, epoch_start)
        if on_epoch_end is not None:
            on_epoch_end(state.epoch)
        minutes = (time.monotonic() - started) / 60
        if options.max_minutes and minutes > options.max_minutes and not state.finished:
            log.warning(
                "--max-minutes %.1f reached after epoch %d; writing the best weights so far; "
                "rerun the same command to continue",
                options.max_minutes,
                state.epoch,
            )
            break
    return _finish(run, state)


def training_patch_scale(fold: Fold) -> dict[str, float] | None:
    """The scale of the patch caches the model is trained on (what it really saw)."""
    from stevs.io.patch_cache import read_patch_scale

    for slide in fold.train:
        path = Path(fold.slide_entry(slide).patches)
        if path.is_file():
            return read_patch_scale(path).to_dict()
    return None


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
    train_data, val_data = _training_data(fold_obj, preset_obj)
    torch.manual_seed(options.seed)  # the model's initial weights depend on the seed only
    model = build_model(
        method,
        preset_obj,
        fold_obj.genes,
        fold_obj.normalisation,
        latent_dim=options.latent_dim,
        frozen=bool(options.freeze_backbone),
        **config_overrides,
    )
    selection_options = replace(options, refit=False)
    config = _run_config(fold_obj, method, preset_obj, model, selection_options)
    config.update(n_train_spots=len(train_data), n_val_spots=len(val_data))
    log.info(
        "training %s (%s) on fold %s: %d train / %d val spots, %d genes, device %s",
        method,
        preset_obj.name,
        fold_obj.fold,
        len(train_data),
        len(val_data),
        len(fold_obj.genes),
        resolve_device(options.device),
    )
    if not options.refit or len(val_data) == 0:
        if options.refit:
            log.info("no validation spots: nothing to select on, no refit")
        return train_model(
            model, train_data, val_data if len(val_data) else None, out_dir, options, config
        )
    selection = train_model(
        model, train_data, val_data, Path(out_dir) / REFIT_SELECTION_DIR, selection_options,
        config,
    )  # fmt: skip
    if not selection.finished:  # time-limited: the rerun continues the selection run
        return selection
    # the refit model is built exactly as the selection's (frozen: context + linear path)
    build = {
        "latent_dim": options.latent_dim,
        "frozen": bool(options.freeze_backbone),
        **config_overrides,
    }
    return _refit(fold_obj, method, preset_obj, build, options, config, selection, out_dir)


#: where a refitting run keeps its selection run (a model folder inside the fold's)
REFIT_SELECTION_DIR = "selection"
#: the refit rule, as config.json and the report state it
REFIT_RULE = (
    "early stopping on the validation slides' headline Pearson r picks epoch E; the model is "
    "then retrained from scratch with the same seed on training + validation spots for E "
    "epochs, its learning-rate schedule (warm-up, cosine) laid out over the same number of "
    "planned epochs as the selection run's and cut after epoch E; that model is the fold's"
)


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
    from torch.utils.data import ConcatDataset

    from stevs.data import SpotDataset

    epochs = max(1, selection.best_epoch)
    fit_data = ConcatDataset([SpotDataset(fold, "train"), SpotDataset(fold, "val")])
    torch.manual_seed(options.seed)
    model = build_model(method, preset, fold.genes, fold.normalisation, **build)
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
        },
    }
    log.info("refit: %d epochs on %d train + val spots", epochs, len(fit_data))
    result = train_model(model, fit_data, None, out_dir, options, refit_config, stop_after=epochs)
    rows = [{**r, "stage": "selection"} for r in selection.history]
    rows += [{**r, "stage": "refit"} for r in result.history]
    ModelDir(out_dir).write_metrics(rows)
    return replace(result, best_val_pearson=selection.best_val_pearson, history=rows)


# ------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs train``."""
    parser.add_argument("--fold", required=True, help="fold file (results/folds/FOLD.json)")
    parser.add_argument("--method", default="stevs", choices=METHOD_NAMES)
    parser.add_argument("--preset", default="cpu_small", choices=sorted(PRESETS))
    parser.add_argument(
        "--out", required=True, help="output folder (resumes if it has a checkpoint)"
    )
    parser.add_argument("--backbone", help="timm model name replacing the preset's backbone")
    parser.add_argument(
        "--weights", help="backbone weights: 'none', 'timm' (timm's hub) or a local file"
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="learning rate of the heads")
    parser.add_argument("--lr-backbone", type=float, help="learning rate of the backbone")
    parser.add_argument("--latent-dim", type=int)
    parser.add_argument("--patience", type=int, help="early-stopping patience (epochs)")
    parser.add_argument("--beta", type=float, help="KL weight (after warm-up)")
    parser.add_argument("--align", choices=ALIGNMENTS, help="alignment divergence (stevs)")
    parser.add_argument("--align-weight", type=float, help="lambda of the alignment loss")
    parser.add_argument(
        "--likelihood", choices=("gaussian", "nb"), help="add a negative binomial count term"
    )
    parser.add_argument(
        "--context", choices=CONTEXTS, help="neighbourhood context (frozen backbone only)"
    )
    parser.add_argument("--context-radius", type=float, help="neighbours within, in pitches")
    parser.add_argument(
        "--linear-path", choices=LINEAR_PATHS, help="linear map from the image features"
    )
    parser.add_argument(
        "--linear-rank", choices=LINEAR_RANKS, help="ridge path: full, or reduced rank by CV"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--freeze-backbone", action="store_true", default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--max-minutes", type=float, help="stop (resumably) after this long")
    parser.add_argument(
        "--refit",
        action="store_true",
        help="after early stopping picks epoch E on val, retrain on train + val for E epochs",
    )
    parser.add_argument(
        "--embeddings", help="frozen backbone: folder of embedding caches (stevs embed)"
    )
    parser.add_argument(
        "--embedding-view", default="none", choices=("none", "dihedral8"),
        help="frozen backbone / ridge_embed: test-time view of the embeddings",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def _options(args: argparse.Namespace) -> TrainOptions:
    """Training options from ``stevs train``'s arguments."""
    return options_from_args(TrainOptions, args, lr_heads=args.lr, augment=not args.no_augment)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Model switches given on the command line (``--align`` only where the method aligns)."""
    overrides = {
        key: getattr(args, key)
        for key in (
            "beta",
            "align_weight",
            "likelihood",
            "context",
            "context_radius",
            "linear_path",
            "linear_rank",
        )
        if getattr(args, key) is not None
    }
    if args.align is not None and get_method(args.method).switches.get("align", "") is not None:
        overrides["align"] = args.align
    return overrides


def run(args: argparse.Namespace) -> int:
    """``stevs train``: dispatch through the method registry."""
    if args.threads:  # torch's threads and the BLAS pools numpy and scikit-learn use
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    method = get_method(args.method)
    resolve_device(args.device)  # also for ridge methods, which run on the CPU anyway
    out = check_writable(args.out)
    handler = logging.FileHandler(out / LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("stevs").addHandler(handler)
    try:
        if method.kind == "ridge":
            backbone = {"backbone": args.backbone} if args.backbone else {}  # else its default
            if method.features == "embedding":
                backbone.update(embeddings=args.embeddings, view=args.embedding_view)
            method.entry("train")(args.fold, args.method, out, seed=args.seed, **backbone)
            log.info("done: %s -> %s", args.method, out)
            return 0
        result = train_fold(
            args.fold,
            args.method,
            out,
            _options(args),
            preset=args.preset,
            backbone=args.backbone,
            weights=args.weights,
            **_overrides(args),
        )
    finally:
        logging.getLogger("stevs").removeHandler(handler)
        handler.close()
    log.info(
        "done: %d epochs, best epoch %d, val headline r %s -> %s",
        result.epochs_done,
        result.best_epoch,
        "n/a" if result.best_val_pearson is None else f"{result.best_val_pearson:.3f}",
        out,
    )
    return 0
