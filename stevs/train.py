"""Train STevs, its ablations or the ST-Net-style baseline on one fold (``stevs train``).

Why a plain PyTorch loop and not Lightning: the loop is ~300 lines, has no extra dependency,
and owns exactly the behaviour the workflow relies on: a checkpoint after every epoch that
holds only tensors and plain types (loaded back with ``weights_only=True``), bit-identical
resume on CPU (RNG states, per-epoch shuffling seeded by ``seed + epoch``), early stopping on
the validation slides' mean Pearson r and atomic outputs. Multi-GPU stays reachable: the
model's ``forward`` returns the loss, so it is wrapped in ``DistributedDataParallel`` when the
script runs under ``torchrun`` (``WORLD_SIZE > 1``), with a ``DistributedSampler``; rank 0
validates and writes, and broadcasts the early-stopping decision.

Outputs in ``--out``: ``config.json`` (rebuilds the model), ``checkpoint.pt`` (resume state),
``metrics.csv`` (one row per epoch: every loss term, val mean Pearson r, learning rates,
time), ``train.log`` and, when training ends, ``model.safetensors`` (best weights).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from stevs import __version__
from stevs.atomic import atomic_write_bytes
from stevs.baselines import RIDGE_METHODS
from stevs.errors import StevsInputError
from stevs.models.poe import ALIGNMENTS
from stevs.models.presets import PRESETS, Preset, get_preset
from stevs.models.stevs import METHODS, STevs, STevsConfig

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
    """``auto`` -> cuda if available, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies of a state dict (no shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_safetensors(state_dict: Mapping[str, Tensor], path: Path, metadata: dict | None) -> None:
    """Atomic safetensors file."""
    from safetensors.torch import save

    data = save(dict(state_dict), metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, data)


def write_metrics_csv(history: Sequence[Mapping[str, float]], path: Path) -> None:
    """One row per epoch; the columns are the union of keys, in first-seen order."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    atomic_write_bytes(path, text.getvalue().encode())


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


def pearson_per_gene(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson r of every column; NaN where either side is constant."""
    p = prediction - prediction.mean(0)
    t = truth - truth.mean(0)
    denom = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * t).sum(0) / denom, np.nan)


def mean_pearson_by_slide(prediction: np.ndarray, truth: np.ndarray, slides: np.ndarray) -> float:
    """Mean over slides of the mean over genes of per-gene Pearson r (NaN genes skipped)."""
    per_slide = []
    for slide in np.unique(slides):
        rows = slides == slide
        if rows.sum() < 3:
            continue
        r = pearson_per_gene(prediction[rows], truth[rows])
        if np.isfinite(r).any():
            per_slide.append(float(np.nanmean(r)))
    return float(np.mean(per_slide)) if per_slide else float("nan")


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


@torch.no_grad()
def cache_embeddings(
    model: STevs, dataset: Dataset, device: torch.device, batch_size: int, workers: int
) -> EmbeddingDataset:
    """Run the (frozen) backbone once over ``dataset``; keep everything but the patches."""
    loader = make_loader(dataset, batch_size, workers, device, sampler=None)
    model.eval()
    embeddings: list[Tensor] = []
    keep: dict[str, list[Any]] = {}
    for batch in tqdm(loader, desc="embedding patches", unit="batch", mininterval=2):
        patch = batch["patch"].to(device, non_blocking=True)
        embeddings.append(model.embed(patch).float().cpu())
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
    """Linear warm-up to 1, then cosine decay to 1% of the peak."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(
    model: STevs, loader: DataLoader, device: torch.device, autocast: Callable
) -> dict[str, float]:
    """Mean Pearson r (per slide, then averaged) and MSE on a validation loader."""
    model.eval()
    predictions, truths, slides = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast():
            mean, _ = model.predict(
                batch.get("patch"), batch.get("coords"), batch.get("embedding"), n_samples=0
            )
        predictions.append(mean.float().cpu().numpy())
        truths.append(batch["target"].float().cpu().numpy())
        slides.append(batch["slide"].cpu().numpy())
    if not predictions:
        return {}
    prediction, truth = np.concatenate(predictions), np.concatenate(truths)
    return {
        "val_pearson": mean_pearson_by_slide(prediction, truth, np.concatenate(slides)),
        "val_mse": float(((prediction - truth) ** 2).mean()),
    }


# ------------------------------------------------------------------------------- model


def build_model(
    method: str,
    preset: Preset,
    genes: Sequence[str],
    normalisation: Mapping[str, Any] | None,
    *,
    latent_dim: int | None = None,
    **config_overrides: Any,
) -> STevs:
    """A fresh model of ``method`` with ``preset``'s backbone, standardising with the fold's
    training mean/std (``normalisation``)."""
    config = STevsConfig.for_method(
        method,
        n_genes=len(genes),
        backbone=preset.backbone,
        latent_dim=latent_dim or preset.latent_dim,
        hidden_dim=preset.hidden_dim,
        **{"beta": preset.beta, **config_overrides},
    )
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


def train_model(
    model: STevs,
    train_data: Dataset,
    val_data: Dataset | None,
    out_dir: str | os.PathLike,
    options: TrainOptions,
    config: Mapping[str, Any],
    *,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` (resuming from ``out_dir/checkpoint.pt`` when present).

    ``options`` must be resolved (no ``None``); ``config`` is written to ``config.json``.
    ``on_epoch_end(epoch)`` runs after each epoch's checkpoint is written (tests use it to
    simulate a kill).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    distributed, rank, world = _distributed()
    device = resolve_device(options.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    is_main = rank == 0
    cores = os.cpu_count() or 1
    if device.type == "cpu" and options.workers >= cores:
        log.info("%d CPU cores: using %d data workers, not %d", cores, cores - 1, options.workers)
        options = replace(options, workers=cores - 1)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    if is_main:
        atomic_write_bytes(out / "config.json", json.dumps(config, indent=2).encode())
    model.to(device)
    freeze = bool(options.freeze_backbone) and model.backbone is not None
    if freeze:
        model.backbone.requires_grad_(False)
        log.info("frozen backbone: caching embeddings of %d training spots", len(train_data))
        train_data = cache_embeddings(
            model, train_data, device, options.batch_size, options.workers
        )
        if val_data is not None and len(val_data) > 0:
            val_data = cache_embeddings(
                model, val_data, device, options.batch_size, options.workers
            )

    groups = []
    if not freeze and model.backbone_parameters():
        groups.append({"params": model.backbone_parameters(), "lr": options.lr_backbone})
    groups.append({"params": model.head_parameters(), "lr": options.lr_heads})
    optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)

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
    if is_main and val_data is not None and len(val_data) > 0:
        val_loader = make_loader(val_data, options.batch_size, options.workers, device, None)
    steps_per_epoch = max(1, len(loader))
    total_steps = options.epochs * steps_per_epoch
    warmup_steps = int(options.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps)
    )
    kl_warmup_steps = max(1, int(options.kl_warmup_epochs * steps_per_epoch))

    state: dict[str, Any] = {
        "epoch": 0,
        "history": [],
        "best_score": -math.inf,
        "best_epoch": 0,
        "best_model": None,
        "bad_epochs": 0,
        "finished": False,
    }
    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.is_file():
        try:
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise StevsInputError(checkpoint_path, f"cannot read the checkpoint: {err}") from err
        if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("method") != config.get(
            "method"
        ):
            raise StevsInputError(
                checkpoint_path,
                "checkpoint belongs to another kind of run; delete it or choose another --out",
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(checkpoint["rng"], device)
        state.update({k: checkpoint[k] for k in state})
        log.info("resuming from %s after epoch %d", checkpoint_path, state["epoch"])

    train_model_ref: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model_ref = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if options.compile:
        train_model_ref = torch.compile(train_model_ref)

    use_bf16 = device.type == "cuda"

    def autocast() -> contextlib.AbstractContextManager:
        if use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    beta = model.config.beta
    started = time.monotonic()
    stopped_for_time = False
    while not state["finished"] and state["epoch"] < options.epochs:
        epoch = state["epoch"] + 1
        sampler.set_epoch(epoch)
        model.train()
        if freeze:
            model.backbone.eval()
        sums: dict[str, float] = {}
        n_batches = 0
        n_spots = 0
        kl_weight_sum = 0.0
        epoch_start = time.monotonic()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{options.epochs}",
            unit="batch",
            mininterval=2,
            disable=not is_main,
        )
        for batch in bar:
            batch = to_device(batch, device)
            if "patch" in batch and not freeze and options.augment:
                batch["patch"] = augment_patches(batch["patch"])
            if "coords" in batch and options.augment:
                batch["coords"] = augment_coords(batch["coords"])
            step = (epoch - 1) * steps_per_epoch + n_batches
            kl_weight = beta * min(1.0, step / kl_warmup_steps)
            kl_weight_sum += kl_weight
            with autocast():
                output = train_model_ref(batch, kl_weight)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            if options.grad_clip and options.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            optimizer.step()
            scheduler.step()
            values = output.floats()
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f"non-finite loss terms at epoch {epoch}: {values}")
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            n_batches += 1
            n_spots += int(batch["target"].shape[0])
            bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        bar.close()
        train_seconds = time.monotonic() - epoch_start
        row: dict[str, float] = {"epoch": epoch}
        row.update({f"train_{k}": v / max(1, n_batches) for k, v in sums.items()})
        row["kl_weight"] = kl_weight_sum / max(1, n_batches)  # the epoch's mean
        for i, group in enumerate(optimizer.param_groups):
            name = "lr_heads" if i == len(optimizer.param_groups) - 1 else "lr_backbone"
            row[name] = float(group["lr"])
        if val_loader is not None:
            row.update(evaluate(model, val_loader, device, autocast))
        row["train_seconds"] = train_seconds
        row["train_spots_per_s"] = n_spots * world / max(train_seconds, 1e-9)
        row["epoch_seconds"] = time.monotonic() - epoch_start
        state["history"].append(row)
        state["epoch"] = epoch

        score = row.get("val_pearson", float("nan"))
        if val_loader is None:  # nothing to select on: keep the last epoch
            improved = True
        elif math.isfinite(score):
            improved = score > state["best_score"] + 1e-4
        else:
            improved = state["best_model"] is None
        if improved:
            state["best_score"] = score if math.isfinite(score) else -math.inf
            state["best_epoch"] = epoch
            state["best_model"] = cpu_state_dict(model)
            state["bad_epochs"] = 0
        else:
            state["bad_epochs"] += 1
        stop = val_loader is not None and state["bad_epochs"] >= options.patience
        if distributed:
            import torch.distributed as dist

            flag = torch.tensor([float(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            log.info("early stopping after epoch %d (best epoch %d)", epoch, state["best_epoch"])
        state["finished"] = stop or epoch >= options.epochs
        log.info(
            "epoch %d: %s",
            epoch,
            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
        )
        if is_main:
            checkpoint = {
                "format": CHECKPOINT_FORMAT,
                "method": config.get("method"),
                "model": cpu_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(device),
                **state,
            }
            atomic_torch_save(checkpoint, checkpoint_path)
            write_metrics_csv(state["history"], out / "metrics.csv")
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if options.max_minutes and (time.monotonic() - started) / 60 > options.max_minutes:
            stopped_for_time = not state["finished"]
            if stopped_for_time:
                log.warning(
                    "--max-minutes %.1f reached after epoch %d; writing the best weights so far; "
                    "rerun the same command to continue",
                    options.max_minutes,
                    epoch,
                )
            break

    best = state["best_model"] if state["best_model"] is not None else cpu_state_dict(model)
    if is_main:
        metadata = {
            "method": config.get("method"),
            "best_epoch": state["best_epoch"],
            "epochs_done": state["epoch"],
            "stevs_version": __version__,
        }
        save_safetensors(best, out / "model.safetensors", metadata)
    best_score = state["best_score"]
    return TrainResult(
        out_dir=out,
        epochs_done=state["epoch"],
        best_epoch=state["best_epoch"],
        best_val_pearson=best_score if math.isfinite(best_score) else None,
        finished=bool(state["finished"]),
        history=list(state["history"]),
    )


def training_patch_scale(fold: Any) -> dict[str, float] | None:
    """The scale of the patch caches the model is trained on (what it really saw)."""
    import h5py

    for slide in fold.train:
        path = Path(fold.slide_entry(slide).patches)
        if path.is_file():
            with h5py.File(path, "r") as h5:
                attrs = dict(h5.attrs)
            if {"patch_px", "mpp_target", "patch_um"} <= set(attrs):
                return {
                    "patch_px": int(attrs["patch_px"]),
                    "mpp_target": float(attrs["mpp_target"]),
                    "patch_um": float(attrs["patch_um"]),
                }
            return None
    return None


def train_fold(
    fold: Any,
    method: str,
    preset_name: str,
    out_dir: str | os.PathLike,
    options: TrainOptions | None = None,
    *,
    backbone: str | None = None,
    weights: str | None = None,
    **config_overrides: Any,
) -> TrainResult:
    """Train ``method`` with ``preset_name`` on a fold (a :class:`stevs.folds.Fold` or path)."""
    from stevs.data import SpotDataset
    from stevs.folds import Fold, load_fold

    fold_obj = fold if isinstance(fold, Fold) else load_fold(fold)
    if method not in METHODS:
        raise StevsInputError(
            None, f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
        )
    preset = get_preset(preset_name, backbone=backbone, weights=weights)
    options = (options or TrainOptions()).resolved(preset)
    train_data = SpotDataset(fold_obj, "train")
    if len(train_data) == 0:
        raise StevsInputError(fold_obj.path, "the training split has no spots")
    val_data = SpotDataset(fold_obj, "val")
    if train_data.patch_shape and train_data.patch_shape[0] != preset.backbone.img_size:
        log.info(
            "patches are %d px, the %s backbone takes %d px: resizing on the device",
            train_data.patch_shape[0],
            preset.name,
            preset.backbone.img_size,
        )
    torch.manual_seed(options.seed)  # the model's initial weights depend on the seed only
    model = build_model(
        method,
        preset,
        fold_obj.genes,
        fold_obj.normalisation,
        latent_dim=options.latent_dim,
        **config_overrides,
    )
    config = {
        "method": method,
        "fold": fold_obj.fold,
        "fold_path": fold_obj.path,
        "preset": preset.to_dict(),
        "model": model.config.to_dict(),
        "genes": list(fold_obj.genes),
        "normalisation": dict(fold_obj.normalisation),
        "patch_px": preset.patch_px,
        "mpp": preset.mpp,
        "patch_um": preset.patch_um,
        "patches": training_patch_scale(fold_obj),
        "training": asdict(options),
        "n_train_spots": len(train_data),
        "n_val_spots": len(val_data),
        "stevs_version": __version__,
    }
    log.info(
        "training %s (%s) on fold %s: %d train / %d val spots, %d genes, device %s",
        method,
        preset.name,
        fold_obj.fold,
        len(train_data),
        len(val_data),
        len(fold_obj.genes),
        resolve_device(options.device),
    )
    return train_model(
        model, train_data, val_data if len(val_data) else None, out_dir, options, config
    )


# ------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs train``."""
    parser.add_argument("--fold", required=True, help="fold file (results/folds/FOLD.json)")
    parser.add_argument("--method", default="stevs", choices=sorted([*METHODS, *RIDGE_METHODS]))
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--freeze-backbone", action="store_true", default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--max-minutes", type=float, help="stop (resumably) after this long")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    """``stevs train``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.method in RIDGE_METHODS:
        from stevs.baselines import DEFAULT_BACKBONE, train_ridge

        train_ridge(
            args.fold, args.method, out, backbone=args.backbone or DEFAULT_BACKBONE, seed=args.seed
        )
        log.info("done: %s -> %s", args.method, out / "model.safetensors")
        return 0
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("stevs").addHandler(handler)
    try:
        options = TrainOptions(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr_heads=args.lr,
            lr_backbone=args.lr_backbone,
            latent_dim=args.latent_dim,
            patience=args.patience,
            seed=args.seed,
            workers=args.workers,
            device=args.device,
            freeze_backbone=args.freeze_backbone,
            compile=args.compile,
            augment=not args.no_augment,
            max_minutes=args.max_minutes,
        )
        overrides = {
            key: getattr(args, key)
            for key in ("beta", "align_weight", "likelihood")
            if getattr(args, key) is not None
        }
        if args.align is not None and METHODS[args.method].get("align", "") is not None:
            overrides["align"] = args.align
        result = train_fold(
            args.fold,
            args.method,
            args.preset,
            out,
            options,
            backbone=args.backbone,
            weights=args.weights,
            **overrides,
        )
    finally:
        logging.getLogger("stevs").removeHandler(handler)
        handler.close()
    log.info(
        "done: %d epochs, best epoch %d, val mean Pearson r %s -> %s",
        result.epochs_done,
        result.best_epoch,
        "n/a" if result.best_val_pearson is None else f"{result.best_val_pearson:.3f}",
        out / "model.safetensors",
    )
    return 0
