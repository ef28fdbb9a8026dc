"""The model folder (``results/models/{method}/{fold}/``): the one owner of its files.

Every method writes the same complete folder (docs/architecture.md, "Model folder"):

* ``config.json``: method (a :mod:`stevs.methods` name), fold, genes, normalisation, the
  patch scale of the training caches, and what rebuilds the model;
* ``model.safetensors``: the weights (tensors or arrays), metadata keys in sorted order; a
  frozen pretrained backbone is recorded in ``config.json`` (``backbone_weights``: source and
  hash), not stored (:mod:`stevs.models.factory`);
* ``checkpoint.pt``: resume state of torch methods (plain tensors, ``weights_only=True``),
  removed once the run finishes (a killed run keeps it, so the rerun resumes);
* ``metrics.csv``: one row per epoch (torch) or per penalty (ridge);
* ``train.log``: the training log;
* ``latent.json``: torch VAE methods, the latent analysis of the finished model
  (:mod:`stevs.models.analysis`: active dimensions, the experts' PoE shares, their distance)
  on its training and held-out slides, with the weights' SHA-256 it describes.

``config.json`` is written only together with the weights it describes (by the run that made
them), so it never describes other weights.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stevs.atomic import atomic_write_bytes, atomic_write_text, check_replaceable, is_json_with
from stevs.errors import StevsInputError
from stevs.hashing import file_sha256

if TYPE_CHECKING:
    from stevs.io.fold_file import Fold

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
LOG = "train.log"
LATENT = "latent.json"


def _metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """safetensors metadata as strings (:func:`_canonical` fixes their order in the file)."""
    return {k: str(metadata[k]) for k in sorted(metadata or {})}


def _canonical(data: bytes) -> bytes:
    """A safetensors file with its JSON header in sorted key order.

    safetensors keeps the metadata in a Rust HashMap, so its order (and the file's bytes and
    checksum) changes from process to process even for equal weights; the header is
    rewritten with sorted keys, padded with spaces to 8 bytes as the format asks. The data
    offsets are relative to the end of the header, so the tensors are untouched.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


#: how a line of ``train.log`` starts (``stevs.train``'s log format)
LOG_LINE = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ stevs")


def is_model_config(path: Path) -> bool:
    """A model's ``config.json``: a JSON object with its method and gene panel."""
    return is_json_with(path, "method", "genes")


def is_model_weights(path: Path) -> bool:
    """A ``model.safetensors`` stevs wrote: its header's metadata names the method."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size)) if 0 < size < 100_000_000 else None
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and "method" in (header.get("__metadata__") or {})


def is_latent_analysis(path: Path) -> bool:
    """A ``latent.json``: a JSON object with its analysed sets and the weights' hash."""
    return is_json_with(path, "splits", "weights_sha256")


def is_checkpoint(path: Path) -> bool:
    """A ``checkpoint.pt``: torch's zip format (whose run it is, resuming checks)."""
    return zipfile.is_zipfile(path)


#: the first column of ``metrics.csv``: a torch model's per epoch, a ridge's per alpha
METRICS_FIRST_COLUMNS = (b"epoch", b"alpha")


def is_metrics_table(path: Path) -> bool:
    """A ``metrics.csv``: one row per epoch (torch) or per alpha tried (ridge), or empty."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline().strip()
    except OSError:
        return False
    return not first or first.split(b",")[0] in METRICS_FIRST_COLUMNS


def is_train_log(path: Path) -> bool:
    """A ``train.log``: empty, or starting with a line of stevs's log format."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline()
    except OSError:
        return False
    return not first or bool(LOG_LINE.match(first))


class ModelDir:
    """One model folder; methods name the file they read or write."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def latent_path(self) -> Path:
        return self.path / LATENT

    def own_files(self) -> dict[Path, Any]:
        """The folder's files, each with the test that recognises an earlier one of stevs."""
        return {
            self.config_path: is_model_config,
            self.weights_path: is_model_weights,
            self.checkpoint_path: is_checkpoint,
            self.metrics_path: is_metrics_table,
            self.log_path: is_train_log,
            self.latent_path: is_latent_analysis,
        }

    def check_replaceable(self) -> None:
        """Before training: a file at one of the folder's names that is not an earlier one
        of its kind (a user's ``config.json``) is an error naming it."""
        check_replaceable(self.own_files())

    # -- config.json ---------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        """``config.json``, checked: a known method, a non-empty gene panel."""
        from stevs.methods import get_method

        for path in (self.config_path, self.weights_path):
            if not path.is_file():
                raise StevsInputError(path, "missing; is this the output folder of 'stevs train'?")
        try:
            config = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise StevsInputError(self.config_path, f"not a readable model config: {err}") from err
        if not isinstance(config, dict):
            raise StevsInputError(self.config_path, "a model config holds a JSON object")
        get_method(str(config.get("method")), str(self.config_path))
        genes = config.get("genes")
        if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
            raise StevsInputError(self.config_path, "'genes' must be a non-empty list of names")
        return config

    def write_config(self, config: Mapping[str, Any]) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(
            self.config_path, json.dumps(config, indent=2) + "\n", replaces=is_model_config
        )

    # -- weights -------------------------------------------------------------------------------

    def write_tensors(self, tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> Path:
        """torch tensors -> ``model.safetensors`` (atomic)."""
        from safetensors.torch import save

        self.path.mkdir(parents=True, exist_ok=True)
        data = save(dict(tensors), metadata=_metadata(metadata))
        return atomic_write_bytes(self.weights_path, _canonical(data), replaces=is_model_weights)

    def write_arrays(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> Path:
        """numpy arrays -> ``model.safetensors`` (atomic)."""
        from safetensors.numpy import save

        self.path.mkdir(parents=True, exist_ok=True)
        plain = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        data = save(plain, metadata=_metadata(metadata))
        return atomic_write_bytes(self.weights_path, _canonical(data), replaces=is_model_weights)

    def read_tensors(self) -> dict[str, Any]:
        """``model.safetensors`` as torch tensors (CPU)."""
        from safetensors.torch import load_file

        return self._read(lambda path: load_file(path, device="cpu"))

    def read_arrays(self) -> dict[str, np.ndarray]:
        """``model.safetensors`` as numpy arrays."""
        from safetensors.numpy import load_file

        return self._read(load_file)

    def _read(self, loader: Any) -> dict[str, Any]:
        if not self.weights_path.is_file():
            raise StevsInputError(self.weights_path, "model weights not found")
        try:
            return dict(loader(str(self.weights_path)))
        except Exception as err:  # safetensors raises its own error types
            raise StevsInputError(self.weights_path, f"cannot read the weights: {err}") from err

    def weights_sha256(self) -> str:
        return file_sha256(self.weights_path)

    # -- checkpoint ----------------------------------------------------------------------------

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The resume state, or None when there is none."""
        import torch

        if not self.checkpoint_path.is_file():
            return None
        try:
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise StevsInputError(
                self.checkpoint_path, f"cannot read the checkpoint: {err}"
            ) from err

    def remove_checkpoint(self) -> None:
        """Remove the resume state of a finished run (a file this folder's run wrote)."""
        self.checkpoint_path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Remove a model folder's own files (those named here), then the folder if that
        left it empty; anything else in it stays (and one of them not of stevs is an error
        naming it, nothing removed)."""
        self.check_replaceable()
        for path in (self.config_path, self.weights_path, self.checkpoint_path,
                     self.metrics_path, self.log_path, self.latent_path):  # fmt: skip
            path.unlink(missing_ok=True)
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def write_checkpoint(self, state: Mapping[str, Any]) -> Path:
        import torch

        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        return atomic_write_bytes(self.checkpoint_path, buffer.getvalue(), replaces=is_checkpoint)

    # -- latent.json ---------------------------------------------------------------------------

    def write_latent(self, analysis: Mapping[str, Any]) -> Path:
        """The latent analysis of this folder's weights (their SHA-256 recorded in it)."""
        record = {**analysis, "weights_sha256": self.weights_sha256()}
        text = json.dumps(record, indent=1) + "\n"
        return atomic_write_text(self.latent_path, text, replaces=is_latent_analysis)

    def read_latent(self) -> dict[str, Any] | None:
        """``latent.json``, or None when the folder has none or it describes other weights
        than the folder's (an older run's)."""
        if not self.latent_path.is_file():
            return None
        path = self.latent_path
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise StevsInputError(path, f"not a readable latent analysis: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get("splits"), dict):
            raise StevsInputError(path, "a latent analysis holds an object with 'splits'")
        if not self.weights_path.is_file():
            return None
        return record if record.get("weights_sha256") == self.weights_sha256() else None

    # -- metrics.csv ---------------------------------------------------------------------------

    def write_metrics(self, history: Sequence[Mapping[str, Any]]) -> Path:
        """One row per epoch; the columns are the union of keys, in first-seen order."""
        columns: list[str] = []
        for row in history:
            columns += [k for k in row if k not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history)
        return atomic_write_text(self.metrics_path, text.getvalue(), replaces=is_metrics_table)

    def read_metrics(self) -> Any:
        """``metrics.csv`` as a DataFrame, or None when the folder has none."""
        import pandas as pd

        if not self.metrics_path.is_file():
            return None
        try:
            return pd.read_csv(self.metrics_path)
        except Exception as err:
            raise StevsInputError(self.metrics_path, f"cannot read the metrics: {err}") from err


def check_trained_scale(config: Mapping[str, Any], patches: str | os.PathLike) -> None:
    """Refuse a patch cache cut at another field of view or pixel size than the model's
    training caches (``config["patches"]``), naming both scales."""
    from stevs.io.patch_cache import PatchScale, read_patch_scale

    if not config.get("patches"):
        return
    trained = PatchScale.from_dict(config["patches"])
    cache = read_patch_scale(patches)
    if not trained.matches(cache):
        raise StevsInputError(
            patches,
            f"patches are {cache.describe()} but the model was trained on {trained.describe()}; "
            "tile this slide at the model's scale (stevs tile --patch-px / --patch-um)",
        )


def trained_slides(config: Mapping[str, Any]) -> list[str] | None:
    """The slides a model was fitted on (train + val): ``config["training_slides"]``, else
    those of the fold file it records (older configs), else None (unknown)."""
    from stevs.io.fold_file import read_fold

    if config.get("training_slides") is not None:
        return [str(s) for s in config["training_slides"]]
    fold_path = config.get("fold_path")
    if fold_path and Path(fold_path).is_file():
        fold = read_fold(fold_path)
        return sorted(set(fold.train) | set(fold.val))
    return None


def _leaked_slides(config: Mapping[str, Any], fold: Fold, test: Sequence[str]) -> list[str]:
    """Test slides of ``fold`` the model was trained on. A fold that splits a slide into
    spots (within-slice) may test on a training slide, but only with the model of that
    very fold: its own spot split keeps the test spots out of training."""
    trained = trained_slides(config)
    if trained is None:  # an old config without its slides: only its own fold is safe
        return [] if config.get("fold") == fold.fold else list(test)
    same_fold = config.get("fold") == fold.fold and sorted(trained) == sorted(
        fold.slides_of("train", "val")
    )
    spot_split = bool(fold.spots) and same_fold
    return [s for s in test if s in trained and not (spot_split and fold.spots_for("test", s))]


def check_model_fits_fold(
    config: Mapping[str, Any], fold: Fold, model_dir: str | os.PathLike, slides: Sequence[str]
) -> None:
    """The one rule for applying a model to a fold's test ``slides``: the same gene panel,
    the same target normalisation, patch caches at the model's scale, and no test slide
    among the slides the model was trained on. Otherwise an error naming both."""
    where = f"the model in {model_dir} (fold {config.get('fold')})"
    if list(config["genes"]) != list(fold.genes):
        raise StevsInputError(
            fold.path, f"the fold's gene panel differs from the panel of {where}; "
            "predict with the fold the model was trained on",
        )  # fmt: skip
    norm = config.get("normalisation") or {}
    for key in ("method", "target_sum"):
        if key in norm and norm.get(key) != fold.normalisation.get(key):
            raise StevsInputError(
                fold.path,
                f"normalisation {key} is {fold.normalisation.get(key)!r} but {where} was "
                f"trained on {norm.get(key)!r}; predict with the fold the model was trained on",
            )
    leaked = _leaked_slides(config, fold, slides)
    if leaked:
        raise StevsInputError(
            fold.path,
            f"test slide(s) {', '.join(leaked)} of fold {fold.fold} were training slides of "
            f"{where}: its scores would be inflated; predict with the fold the model was "
            "trained on",
        )
    for slide in slides:
        check_trained_scale(config, fold.slide_entry(slide).patches)
