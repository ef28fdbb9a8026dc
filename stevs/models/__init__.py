"""The model layer: timm backbones, experts, Product of Experts, decoders, presets, the ridge
probe, and the one factory (``create_model``) with ``save_model`` / ``load_model``.

Nothing here imports the stages above it (training, baselines, prediction, embedding).
The names below are loaded on first use, so that ``stevs.models.presets`` (plain data, read
by the workflow while Snakemake parses its rules) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: exported name -> the module that defines it
_EXPORTS = {
    "BackboneSpec": "stevs.models.backbone_spec",
    "ImageBackbone": "stevs.models.backbones",
    "effnet_lite0_package_state_dict": "stevs.models.backbones",
    "create_model": "stevs.models.factory",
    "load_model": "stevs.models.factory",
    "save_model": "stevs.models.factory",
    "kl_normal": "stevs.models.poe",
    "kl_standard_normal": "stevs.models.poe",
    "product_of_experts": "stevs.models.poe",
    "symmetric_kl": "stevs.models.poe",
    "PRESETS": "stevs.models.presets",
    "Preset": "stevs.models.presets",
    "get_preset": "stevs.models.presets",
    "LossOutput": "stevs.models.stevs",
    "STevs": "stevs.models.stevs",
    "STevsConfig": "stevs.models.stevs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """``stevs.models.NAME``: imported from its module the first time it is asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stevs.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
