"""Training options and results: what a run is asked to do and what it produced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from stevs.models.presets import Preset


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
    #: trainable backbone: train only its last N feature stages (None: all of it)
    train_stages: int | None = None
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    compile: bool = False
    augment: bool = True
    max_minutes: float | None = None
    #: the resume checkpoint: after the first epoch, then at most every this many minutes
    #: (0: after every epoch), and at the epoch --max-minutes stops at
    checkpoint_minutes: float = 1.0
    latent_dim: int | None = None
    #: frozen backbone: test-time view of the embeddings (stevs.embed: none | dihedral8)
    embedding_view: str = "none"
    #: frozen backbone: folder of embedding caches (stevs embed) read instead of embedding
    embeddings: str | None = None
    #: after early stopping on val, retrain from scratch on train + val for the best epochs
    refit: bool = False
    #: refit: keep the selection run's model folder ({out}/selection/) beside the refit
    keep_selection: bool = False

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
