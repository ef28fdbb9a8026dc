"""The training loop: a prepared model and prepared datasets -> a model folder.

Why a plain PyTorch loop and not Lightning: the loop is short, has no extra dependency, and
owns exactly the behaviour the workflow relies on: a checkpoint after every epoch that holds
only tensors and plain types (loaded back with ``weights_only=True``), bit-identical resume
on CPU (RNG states, per-epoch shuffling seeded by ``seed + epoch``) of the same run only,
early stopping on the evaluation's headline Pearson r of the validation spots and atomic
outputs. Multi-GPU stays reachable: the model's ``forward`` returns the loss, so it is
wrapped in ``DistributedDataParallel`` when the script runs under ``torchrun``
(``WORLD_SIZE > 1``), with a ``DistributedSampler``; rank 0 validates and writes, and
broadcasts the early-stopping decision.

The loop knows nothing of folds, caches or probes: frozen embeddings, the neighbourhood
context and the linear path's fit are prepared above it (:mod:`stevs.training.fold`).

Outputs in ``out_dir`` (a model folder of :mod:`stevs.io.model_dir`): ``checkpoint.pt``
(resume state) and ``metrics.csv`` (one row per epoch: every loss term,
``val_pearson_r_mean_headline``, learning rates, time) after every epoch, and when training
ends ``model.safetensors`` (best weights) with ``config.json`` beside it
(:func:`stevs.models.factory.save_model`); the checkpoint is then removed (a killed or
time-limited run keeps it, so the rerun resumes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from stevs import __version__
from stevs.device import autocast, resolve_device
from stevs.errors import StevsInputError, StevsInterrupted
from stevs.io.model_dir import ModelDir
from stevs.metrics import VAL_METRIC, headline_pearson
from stevs.models.factory import save_model
from stevs.models.stevs import STevs
from stevs.training.batches import (
    EpochSampler,
    augment_coords,
    augment_patches,
    make_loader,
    to_device,
)
from stevs.training.options import TrainOptions, TrainResult

log = logging.getLogger("stevs.train")

CHECKPOINT_FORMAT = 1


def cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies of a state dict (no shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


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
_RUN_ONLY_OPTIONS = (
    "workers", "device", "compile", "max_minutes", "embeddings", "keep_selection",
    "checkpoint_minutes",
)  # fmt: skip


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
    #: when this process last wrote the resume checkpoint (time.monotonic; None: not yet)
    checkpoint_at: float | None = None
    #: the epoch of that checkpoint
    checkpoint_epoch: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.loader))

    def autocast(self) -> Any:
        """bf16 autocast on CUDA, nothing elsewhere."""
        return autocast(self.device)


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
    if options.train_stages is not None and options.freeze_backbone:
        raise StevsInputError(
            None, "--train-stages trains part of the backbone: drop --freeze-backbone"
        )


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
    trained = [p for p in model.backbone_parameters() if p.requires_grad]
    if trained:  # a trainable backbone, its last stages, or the tail over a frozen one
        groups.append({"params": trained, "lr": options.lr_backbone})
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
    """Place the model, build loaders, optimiser and scheduler (the data come prepared:
    :func:`stevs.training.fold.prepare_features` for frozen embeddings, context, probe)."""
    device, options, distributed, rank, world = _place(options)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    model.to(device)
    frozen = bool(options.freeze_backbone) and model.backbone is not None
    if frozen:
        model.backbone.requires_grad_(False)
    elif options.train_stages and model.backbone is not None:
        trained = model.backbone.train_last_stages(options.train_stages)
        log.info("backbone: training its last %d stage(s), %d parameters",
                 options.train_stages, trained)  # fmt: skip
    _check_prepared(model, train_data)
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


def _warn_other_run(path: Any, old: Mapping[str, Any], key: Mapping[str, Any]) -> None:
    """Say which parts of the run key differ from those of the run that wrote ``path``."""
    changed = sorted(k for k in key if old.get(k) != key[k]) or ["checkpoint format"]
    if "training" in changed and isinstance(old.get("training"), dict):
        changed.remove("training")
        changed += sorted(
            f"training.{k}" for k in key["training"] if old["training"].get(k) != key["training"][k]
        )
    log.warning(
        "%s was made by another run (changed: %s): training from scratch", path, ", ".join(changed)
    )


def _resume(run: _Run) -> TrainState:
    """The state of a checkpoint of this very run, else a fresh one (saying why)."""
    state = TrainState()
    checkpoint = run.folder.read_checkpoint()
    if checkpoint is None:
        return state
    key = run_key(run.config, run.options)
    if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("run_key") != key:
        _warn_other_run(run.folder.checkpoint_path, checkpoint.get("run_key") or {}, key)
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
    """Validate, select and decide on early stopping after an epoch."""
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


def _checkpoint_due(run: _Run, state: TrainState, stopped: bool, keep: bool) -> bool:
    """Whether this epoch writes the resume checkpoint: the first epoch this process runs,
    then once ``checkpoint_minutes`` have passed since the last one (0: every epoch), and
    the epoch a time limit stops at; a finished run only when its checkpoint is kept (a
    refit's selection run), since ``_finish`` removes it otherwise. Measured on her2st: a
    checkpoint per 1-second epoch cost 4 of a 31-second training job."""
    if not run.is_main:
        return False
    if state.finished:
        return keep
    if stopped or run.checkpoint_at is None:
        return True
    return time.monotonic() - run.checkpoint_at >= 60 * run.options.checkpoint_minutes


def _write_checkpoint(run: _Run, state: TrainState) -> None:
    """The resume state after ``state.epoch`` and the metrics so far."""
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
    run.checkpoint_at, run.checkpoint_epoch = time.monotonic(), state.epoch


def _check_prepared(model: STevs, train_data: Dataset) -> None:
    """The neighbourhood context must come with the data (prepared above the loop)."""
    items = getattr(train_data, "items", None)
    if model.config.uses_context and (items is None or "context" not in items):
        raise StevsInputError(
            None,
            "context / linear_path need frozen embeddings with their context: train with "
            "--freeze-backbone (stevs.training.fold.prepare_features)",
        )


def _finish(run: _Run, state: TrainState, keep_checkpoint: bool = False) -> TrainResult:
    """Write the best weights and, beside them, the config of the run that made them; a
    finished run's checkpoint is removed (unless ``keep_checkpoint``)."""
    best = state.best_model if state.best_model is not None else cpu_state_dict(run.model)
    if run.is_main:
        metadata = {
            "method": run.config.get("method"),
            "best_epoch": state.best_epoch,
            "epochs_done": state.epoch,
            "stevs_version": __version__,
        }
        config = {
            "training": asdict(run.options),
            **run.config,
            "best_epoch": state.best_epoch,
            "epochs_done": state.epoch,
            "best_val_pearson": state.best_score if math.isfinite(state.best_score) else None,
            "finished": bool(state.finished),
            "run_key": run_key(run.config, run.options),
        }
        save_model(run.folder, best, config, metadata)
        run.folder.write_metrics(state.history)
        if state.finished and not keep_checkpoint:
            run.folder.remove_checkpoint()
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
    keep_checkpoint: bool = False,
) -> TrainResult:
    """Train ``model``, resuming from ``out_dir/checkpoint.pt`` when that checkpoint belongs
    to this very run (same :func:`run_key`), else from scratch.

    ``options`` must be resolved (no ``None``); ``config`` goes to ``config.json`` beside the
    final weights. ``on_epoch_end(epoch)`` runs after each epoch and its checkpoint, when
    one is due (``options.checkpoint_minutes``; tests use it to simulate a kill).
    ``stop_after``: end after this epoch, with the learning-rate schedule still laid out
    over ``options.epochs`` (the refit). A folder that already holds this very run,
    finished, is returned as it is. ``keep_checkpoint``: keep the resume state after the
    run finishes (a refit's selection run, until the refit ends).
    """
    _check_options(options)
    done = finished_result(ModelDir(out_dir), config, options)
    if done is not None:
        return done
    run = _setup(model, train_data, val_data, ModelDir(out_dir), options, config)
    run.last_epoch = min(options.epochs, stop_after or options.epochs)
    state = _resume(run)
    try:
        stopped = _epochs(run, state, on_epoch_end, keep_checkpoint)
    except KeyboardInterrupt as err:
        raise StevsInterrupted(_where_stopped(run, state)) from err
    if stopped:
        log.warning(
            "--max-minutes %.1f reached after epoch %d; writing the best weights so far; "
            "rerun the same command to continue",
            options.max_minutes,
            state.epoch,
        )
    return _finish(run, state, keep_checkpoint)


def _where_stopped(run: _Run, state: TrainState) -> str:
    """Where Ctrl-C stopped training: the epoch and the checkpoint a rerun resumes from."""
    checkpoint = run.folder.checkpoint_path
    saved = run.checkpoint_epoch or state.epoch  # none written yet: the one resumed from
    if saved and checkpoint.is_file():
        done = "epoch 1 is" if saved == 1 else f"epochs 1-{saved} are"
        return (
            f"{run.folder.path}: training stopped in epoch {state.epoch + 1}; {done} saved "
            f"in {checkpoint}, the rerun resumes from there"
        )
    return f"{run.folder.path}: training stopped in epoch 1, before any checkpoint"


def _epochs(
    run: _Run,
    state: TrainState,
    on_epoch_end: Callable[[int], None] | None,
    keep_checkpoint: bool,
) -> bool:
    """Train epochs until the run is finished or its last epoch; True when ``--max-minutes``
    stopped it first."""
    started = time.monotonic()
    limit = run.options.max_minutes
    while not state.finished and state.epoch < run.last_epoch:
        epoch_start = time.monotonic()
        row = _train_epoch(run, state.epoch + 1)
        _end_epoch(run, state, row, epoch_start)
        minutes = (time.monotonic() - started) / 60
        stopped = bool(limit and minutes > limit and not state.finished)
        if _checkpoint_due(run, state, stopped, keep_checkpoint):
            _write_checkpoint(run, state)
        if on_epoch_end is not None:
            on_epoch_end(state.epoch)
        if stopped:
            return True
    return False


def finished_result(
    folder: ModelDir, config: Mapping[str, Any], options: TrainOptions
) -> TrainResult | None:
    """The result stored in ``folder`` when it holds this very run (same :func:`run_key`)
    finished and not resumable (no checkpoint), else None."""
    key = run_key(config, options)

    def same_run(saved: Mapping[str, Any]) -> bool:
        if saved.get("run_key") == key:
            return True
        _warn_other_run(folder.weights_path, saved.get("run_key") or {}, key)
        return False

    return stored_result(folder, same_run)


def stored_result(
    folder: ModelDir, same_run: Callable[[Mapping[str, Any]], bool]
) -> TrainResult | None:
    """The finished run stored in ``folder`` (no checkpoint; ``config.json`` says finished)
    when ``same_run(config)`` accepts it, else None."""
    if folder.checkpoint_path.is_file() or not folder.weights_path.is_file():
        return None
    try:
        saved = folder.read_config()
    except StevsInputError:
        return None
    if not saved.get("finished") or not same_run(saved):
        return None
    log.info("%s holds this run, finished: nothing to train", folder.path)
    metrics = folder.read_metrics()
    score = saved.get("best_val_pearson")
    return TrainResult(
        out_dir=folder.path,
        epochs_done=int(saved.get("epochs_done", 0)),
        best_epoch=int(saved.get("best_epoch", 0)),
        best_val_pearson=None if score is None else float(score),
        finished=True,
        history=[] if metrics is None else metrics.to_dict("records"),
    )
