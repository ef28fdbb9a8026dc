"""Published checkpoints into timm models: the Hugging Face cache, key layouts, the fit check.

Pathology encoders publish their weights on the Hugging Face hub, most of them gated. On a
cluster without internet, download a repository's weight file once where there is internet
(``hf download ORG/REPO FILE`` after accepting its licence, into the ``HF_HOME``
the jobs will see) and run with ``HF_HUB_OFFLINE=1``: :func:`hub_state_dict` then reads the
file from the cache and never touches the network. A copy of the file anywhere works too
(weight source ``file``).

Checkpoints come in three key layouts (``BackboneSpec.layout``): ``timm`` (timm's own
names, as UNI, Virchow, H-Optimus and Prov-GigaPath publish them), ``conch_v1_5`` (CONCH
v1.5's vision tower: ``trunk.`` is a timm ViT, ``attn_pool_contrast.`` / ``ln_contrast.`` its
attentional pooler) and ``hf_dinov2`` (Hugging Face ``Dinov2Model`` names, as Phikon-v2 and
Hibou-L publish them), converted here into timm's names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stevs.errors import StevsInputError

LAYOUTS = ("timm", "conch_v1_5", "hf_dinov2")

#: prefix of the pooling head's keys inside :class:`stevs.models.backbones.ImageBackbone`
HEAD_PREFIX = "head."


#: the two names timm's ``hf-hub:`` loader looks for (safetensors first): a cache that timm
#: filled for a repository serves :func:`hub_file` too
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_file(repo: str, filename: str) -> str:
    """The local path of the weight file ``filename`` of Hugging Face repository ``repo``
    (or, for timm's file names, the other one), from the cache when it is there: with
    ``HF_HUB_OFFLINE=1`` only from the cache."""
    from huggingface_hub import hf_hub_download

    names = [filename] + [name for name in TIMM_HUB_FILES if filename in TIMM_HUB_FILES]
    errors = []
    for name in dict.fromkeys(names):
        try:
            return str(hf_hub_download(repo, name))
        except Exception as err:  # offline without a cached copy, gated repo without a token
            errors.append(err)
    err = errors[0]
    raise StevsInputError(
        None,
        f"cannot get {filename} of Hugging Face repository {repo} ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Without internet, download it "
        f"once where there is internet (accept the licence at huggingface.co/{repo}, "
        f"then HF_HOME=/shared/hf hf download {repo} {filename}) and run "
        "with HF_HOME=/shared/hf HF_HUB_OFFLINE=1; or pass --weights FILE",
    ) from err


def to_timm_layout(state_dict: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """A checkpoint in ``layout`` renamed to the keys of :class:`ImageBackbone`'s parts:
    the timm model's own names, and ``head.`` for a pooling head."""
    if layout == "timm":
        return dict(state_dict)
    if layout == "conch_v1_5":
        renamed = {}
        for key, value in state_dict.items():
            if key.startswith("trunk."):
                renamed[key[len("trunk.") :]] = value
            else:
                renamed[HEAD_PREFIX + key] = value
        return renamed
    if layout == "hf_dinov2":
        return _from_hf_dinov2(state_dict)
    raise StevsInputError(None, f"unknown checkpoint layout {layout!r} ({', '.join(LAYOUTS)})")


_HF_DINOV2_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_DINOV2_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _from_hf_dinov2(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``Dinov2Model`` keys -> timm ``VisionTransformer`` keys (query, key and
    value are packed into one ``qkv``; the mask token, unused at inference, is dropped)."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.").removeprefix("dinov2.")
        if key == "embeddings.mask_token":
            continue
        if key in _HF_DINOV2_TOP:
            out[_HF_DINOV2_TOP[key]] = value
            continue
        parts = key.split(".")
        if parts[:2] != ["encoder", "layer"]:
            out[key] = value  # left as is: the fit check names it
            continue
        block, rest = f"blocks.{parts[2]}", ".".join(parts[3:])
        stem, _, kind = rest.rpartition(".")
        if stem.startswith("attention.attention."):
            qkv.setdefault(f"{block}.attn.qkv.{kind}", {})[stem.rsplit(".", 1)[-1]] = value
        elif rest in _HF_DINOV2_BLOCK:
            out[f"{block}.{_HF_DINOV2_BLOCK[rest]}"] = value
        else:
            out[f"{block}.{_HF_DINOV2_BLOCK.get(stem, stem)}.{kind}"] = value
    for key, parts_ in qkv.items():
        out[key] = torch.cat([parts_["query"], parts_["key"], parts_["value"]], dim=0)
    if "reg_token" in out and "pos_embed" in out and "cls_token" in out:
        # with registers timm adds positions to the patch tokens only (no_embed_class):
        # the class token's position is folded into the class token, the same sum
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def resample_pos_embed(
    state_dict: dict[str, Tensor], model: nn.Module, layout: str = "timm"
) -> dict[str, Tensor]:
    """``pos_embed`` of another patch grid resampled to ``model``'s: bilinear without
    antialias as CONCH v1.5's loader does (its 224 px checkpoint runs at 448 px), bicubic
    for Hugging Face Dinov2 checkpoints (as ``Dinov2Model`` interpolates its positions)."""
    source, target = state_dict.get("pos_embed"), getattr(model, "pos_embed", None)
    if source is None or target is None or source.shape == target.shape:
        return state_dict
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = model.patch_embed.grid_size
    old = int(math.isqrt(source.shape[1] - prefix))
    patches = source[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    mode = "bicubic" if layout == "hf_dinov2" else "bilinear"
    patches = F.interpolate(patches, size=grid, mode=mode, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(source.dtype)
    return {**state_dict, "pos_embed": torch.cat([source[:, :prefix], patches], dim=1)}


def check_fits(state_dict: Mapping[str, Tensor], model: nn.Module, source: str) -> None:
    """Raise naming the first tensor of ``model`` that ``state_dict`` lacks or has in another
    shape (then the first key the model does not have)."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            problem = f"has no tensor {key} (shape {tuple(tensor.shape)})"
        elif tuple(state_dict[key].shape) != tuple(tensor.shape):
            got = tuple(state_dict[key].shape)
            problem = f"tensor {key} has shape {got}, the model needs {tuple(tensor.shape)}"
        else:
            continue
        raise StevsInputError(source, f"weights do not fit the model: {problem}")
    extra = [key for key in state_dict if key not in expected]
    if extra:
        raise StevsInputError(
            source, f"weights do not fit the model: tensor {extra[0]} is not in the model"
        )
