"""STevs models: timm backbones, experts, Product of Experts, decoders and presets."""

from stevs.models.backbones import BackboneSpec, ImageBackbone, effnet_lite0_package_state_dict
from stevs.models.poe import kl_normal, kl_standard_normal, product_of_experts, symmetric_kl
from stevs.models.presets import PRESETS, Preset, get_preset
from stevs.models.stevs import METHODS, LossOutput, STevs, STevsConfig

__all__ = [
    "METHODS",
    "PRESETS",
    "BackboneSpec",
    "ImageBackbone",
    "LossOutput",
    "Preset",
    "STevs",
    "STevsConfig",
    "effnet_lite0_package_state_dict",
    "get_preset",
    "kl_normal",
    "kl_standard_normal",
    "product_of_experts",
    "symmetric_kl",
]
