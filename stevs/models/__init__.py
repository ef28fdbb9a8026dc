"""The model layer: timm backbones, experts, Product of Experts, decoders, presets, the ridge
probe, and the one factory (``create_model``) with ``save_model`` / ``load_model``.

Nothing here imports the stages above it (training, baselines, prediction, embedding).
"""

from stevs.models.backbones import BackboneSpec, ImageBackbone, effnet_lite0_package_state_dict
from stevs.models.factory import create_model, load_model, save_model
from stevs.models.poe import kl_normal, kl_standard_normal, product_of_experts, symmetric_kl
from stevs.models.presets import PRESETS, Preset, get_preset
from stevs.models.stevs import LossOutput, STevs, STevsConfig

__all__ = [
    "PRESETS",
    "BackboneSpec",
    "ImageBackbone",
    "LossOutput",
    "Preset",
    "STevs",
    "STevsConfig",
    "create_model",
    "effnet_lite0_package_state_dict",
    "get_preset",
    "kl_normal",
    "kl_standard_normal",
    "load_model",
    "product_of_experts",
    "save_model",
    "symmetric_kl",
]
