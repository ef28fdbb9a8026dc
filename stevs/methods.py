"""The method registry: one table from a method's name to how it trains, loads and predicts.

Every place that needs to know which methods exist (``stevs train --method``, the workflow's
config schema and its checks, ``stevs predict``, ``stevs predict-slide``, the report) reads
:data:`REGISTRY`; nothing looks at which files a model folder holds to guess its kind.

Importing this module is cheap (no torch): the training, loading and prediction entry points
are named as ``"module:function"`` and imported only when called, so the workflow can check
a config against the registry before any job runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from stevs.errors import StevsInputError

#: families of methods; each family shares one trainer, loader and predictor
Kind = Literal["torch", "ridge"]


@dataclass(frozen=True)
class Method:
    """One method of the comparison.

    ``switches`` are the :class:`stevs.models.stevs.STevsConfig` fields a torch method sets
    (ablations are switches of one model, never copies); ``features`` is what a ridge probe
    regresses on (``embedding``: a frozen encoder's embedding of the spot;
    ``embedding+context``: that and the mean embedding of its neighbours within the
    encoder preset's ``context_radius``, :mod:`stevs.models.context`, as STevs sees them;
    ``color_texture``: hand-made features); ``reduced_rank``: a ridge probe reduced to the
    rank its inner CV picks (:func:`stevs.models.ridge.reduce_rank`). ``he_only`` says
    whether the method can predict an H&E-only slide (a Visium-like grid laid over detected
    tissue, no measured expression): true for every method that reads the image.
    ``baseline``: a method STevs is compared against (the report's "best baseline").
    ``encoder``: which image encoder a run needs: ``"any"`` (a torch method, trained or
    frozen), ``"frozen"`` (a probe of a frozen encoder's embeddings, or a torch method that
    reads them: ``stevs_tail``), ``"none"`` (no encoder: one run, under the encoder id
    ``none``). ``embedding_view``: the embedding-cache view the method reads whatever the
    config's ``embeddings.view`` (``tail``: a frozen encoder's stages but the last, pooled,
    and the last stage's input maps); None: the config's view.
    """

    name: str
    kind: Kind
    description: str
    uses_image: bool = True
    uses_spatial: bool = False
    he_only: bool = True
    switches: Mapping[str, Any] = field(default_factory=dict)
    features: str | None = None
    baseline: bool = False
    encoder: Literal["any", "frozen", "none"] = "any"
    reduced_rank: bool = False
    embedding_view: str | None = None

    @property
    def seeded(self) -> bool:
        """Whether runs differ by seed (torch: one run per training seed; ridge: one run)."""
        return self.kind == "torch"

    @property
    def needs_gpu(self) -> bool:
        """Whether a run of this method profits from a GPU (the workflow's ``gpu`` resource)."""
        return self.kind == "torch"

    @property
    def is_regression_head(self) -> bool:
        """The ST-Net-style head: the backbone with a linear regression head, no VAE."""
        return self.switches.get("head") == "regression"

    def reads_embeddings(self, frozen: bool, pretrained: bool) -> bool:
        """Whether a run on an encoder (``frozen``, with ``pretrained`` weights) reads the
        shared embedding cache: a probe of a frozen encoder always; a torch method on a
        frozen pretrained encoder (a frozen random encoder differs per seed: it embeds
        in-run)."""
        if self.encoder == "none" or not frozen:
            return False
        return self.encoder == "frozen" or (self.uses_image and pretrained)

    @property
    def entry_points(self) -> Mapping[str, str]:
        """``train`` / ``load`` / ``predict`` -> ``"module:function"`` of the method's kind."""
        return ENTRY_POINTS[self.kind]

    def entry(self, what: str) -> Callable[..., Any]:
        """The ``train``, ``load`` or ``predict`` function of this method's kind."""
        module, _, name = self.entry_points[what].partition(":")
        return getattr(importlib.import_module(module), name)


#: kind -> the functions that train a fold, load a model folder and predict a fold's test
#: slides. Signatures: ``train(fold, method, out_dir, **options)``, ``load(model_dir,
#: device=...)``, ``predict(model_dir, fold, out_dir, **options)``.
ENTRY_POINTS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "torch": {
            "train": "stevs.training.fold:train_fold",
            "load": "stevs.models.factory:load_model",
            "predict": "stevs.predict:predict_fold",
        },
        "ridge": {
            "train": "stevs.baselines:train_ridge",
            "load": "stevs.models.ridge:load_ridge",
            "predict": "stevs.baselines:predict_ridge",
        },
    }
)

_METHODS = (
    Method(
        "stevs",
        "torch",
        "STevs: image expert x spatial expert (Product of Experts) with latent alignment",
        uses_spatial=True,
    ),
    Method(
        "stevs_image_only",
        "torch",
        "STevs ablation: image expert only",
        switches={"use_spatial": False, "align": None},
    ),
    Method(
        "stevs_spatial_only",
        "torch",
        "STevs ablation: spatial expert only (coordinates, no image)",
        uses_image=False,
        uses_spatial=True,
        he_only=False,
        switches={"use_image": False, "align": None, "context": "none", "linear_path": "none"},
    ),
    Method(
        "stevs_no_align",
        "torch",
        "STevs ablation: Product of Experts without the alignment loss",
        uses_spatial=True,
        switches={"align": None},
    ),
    Method(
        "stevs_concat",
        "torch",
        "STevs ablation: concatenated features instead of a Product of Experts",
        uses_spatial=True,
        switches={"combine": "concat", "align": None},
    ),
    Method(
        "stevs_tail",
        "torch",
        "STevs with a trainable copy of the frozen encoder's last stage (partial fine-tuning; "
        "context and probe on the frozen features)",
        uses_spatial=True,
        switches={"train_tail_stages": 1},
        encoder="frozen",
        embedding_view="tail",
    ),
    Method(
        "stnet",
        "torch",
        "ST-Net-style baseline: the image backbone with a linear regression head",
        # the ST-Net design: its own patch only, whatever the preset's context
        switches={"head": "regression", "use_spatial": False, "align": None, "context": "none"},
        baseline=True,
    ),
    Method(
        "ridge_embed",
        "ridge",
        "ridge probe on frozen backbone embeddings (HEST-Benchmark recipe)",
        he_only=False,
        features="embedding",
        baseline=True,
        encoder="frozen",
    ),
    Method(
        "ridge_context",
        "ridge",
        "ridge probe on [frozen embedding, mean embedding of the neighbours]: STevs's context",
        he_only=False,
        features="embedding+context",
        baseline=True,
        encoder="frozen",
    ),
    Method(
        "ridge_rrr",
        "ridge",
        "reduced-rank ridge probe on frozen embeddings (rank by the probe's inner CV)",
        he_only=False,
        features="embedding",
        baseline=True,
        encoder="frozen",
        reduced_rank=True,
    ),
    Method(
        "ridge_color",
        "ridge",
        "ridge on hand-made colour and texture features: the floor",
        he_only=False,
        features="color_texture",
        baseline=True,
        encoder="none",
    ),
)

#: method name -> :class:`Method`, in the order the report lists them
REGISTRY: Mapping[str, Method] = MappingProxyType({m.name: m for m in _METHODS})
#: every method name
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)


def names(kind: Kind | None = None) -> list[str]:
    """Method names, all or of one kind."""
    return [m.name for m in REGISTRY.values() if kind is None or m.kind == kind]


def baselines() -> list[str]:
    """The baseline methods, in registry order."""
    return [m.name for m in REGISTRY.values() if m.baseline]


def torch_switches() -> dict[str, dict[str, Any]]:
    """Torch method name -> its :class:`stevs.models.stevs.STevsConfig` switches."""
    return {m.name: dict(m.switches) for m in REGISTRY.values() if m.kind == "torch"}


def get_method(name: str, source: str | None = None) -> Method:
    """The registry entry of ``name``, or a :class:`StevsInputError` listing the choices."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise StevsInputError(
            source, f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}"
        ) from None


def check_he_only(name: str, source: str | None = None) -> Method:
    """The method ``name`` if it can predict H&E-only slides, else a clear error."""
    method = get_method(name, source)
    if not method.he_only:
        able = [m.name for m in REGISTRY.values() if m.he_only]
        raise StevsInputError(
            source,
            f"method {name!r} cannot predict H&E-only slides ({method.description}); "
            f"use one of {', '.join(able)}",
        )
    return method
