"""STevs: a multimodal VAE over H&E patches and spot coordinates, and its ablations.

The module is split the way scvi-tools modules are: :meth:`STevs.inference` (encoders ->
expert posteriors -> Product of Experts), :meth:`STevs.generative` (decoder) and
:meth:`STevs.loss` (a :class:`LossOutput` of named terms). Ablations are switches of one
:class:`STevsConfig` (read from the method registry :data:`stevs.methods.REGISTRY`), never
copies; the ST-Net-style baseline is the same backbone with a linear regression head
(``head="regression"``).

Targets arrive in the fold's normalisation (log1p_cp10k); with ``standardise`` the model
z-scores them with the fold's training mean/std (buffers) and :meth:`STevs.predict` maps its
outputs back, so callers only ever see the targets' units.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from stevs.methods import torch_switches
from stevs.models.backbones import BackboneSpec, ImageBackbone
from stevs.models.context import CONTEXTS
from stevs.models.decoders import GaussianDecoder, NegativeBinomialDecoder, negative_binomial_nll
from stevs.models.experts import GaussianHead, SpatialEncoder, mlp
from stevs.models.poe import (
    ALIGNMENTS,
    alignment_loss,
    gaussian_nll,
    kl_standard_normal,
    product_of_experts,
    reparameterize,
)

#: linear paths of :class:`STevsConfig`
LINEAR_PATHS = ("none", "learned", "ridge")
#: ranks of the ridge linear path: the full probe, or reduced rank chosen by inner CV
LINEAR_RANKS = ("full", "cv")


@dataclass
class STevsConfig:
    """Architecture and loss switches; ``to_dict``/``from_dict`` round-trip through JSON."""

    n_genes: int
    backbone: BackboneSpec
    latent_dim: int = 32
    hidden_dim: int = 256
    head: str = "vae"  # "vae" | "regression" (ST-Net-style baseline)
    use_image: bool = True
    use_spatial: bool = True
    combine: str = "poe"  # "poe" | "concat"
    align: str | None = "sym_kl"
    # sym-KL sums over the latent dims and grows fast when the experts' widths differ; at
    # 0.1 it held the image expert as broad as the (uninformative on new slides) spatial one
    align_weight: float = 0.01
    beta: float = 1.0
    expert_elbo_weight: float = 1.0
    nll_beta: float = 0.5  # beta-NLL power (0: plain heteroscedastic NLL)
    likelihood: str = "gaussian"  # "gaussian" | "nb" (adds a count likelihood)
    nb_weight: float = 1.0
    n_freqs: int = 6
    dropout: float = 0.1
    standardise: bool = True
    # image features beside the spot's own embedding: "neighbours" = the mean embedding of
    # the spots within context_radius pitches on the same slide (stevs.models.context)
    context: str = "none"
    context_radius: float = 1.5
    # a linear map from the (standardised) image features to the decoder's mean, beside the
    # latent path: "none"; "learned" (zero-initialised, trained with the rest); "ridge"
    # (the closed-form ridge probe of the training spots, fixed: the latent model learns what
    # the probe leaves; see fit_linear_path)
    linear_path: str = "none"
    # "ridge": train the latent path against the probe's out-of-fold predictions of the
    # training spots (inner CV by slide) instead of its in-sample fit; measured a tie on
    # her2st (0.410 vs 0.412) at 3 more fits per run, so off
    linear_stacking: bool = False
    # "ridge": "full" = the probe as ridge_embed fits it; "cv" = its reduced-rank version
    # (stevs.models.ridge.reduce_rank: the genes share r programmes, r by the probe's inner CV,
    # full rank kept unless lower is better), as the VAE's decoder shares its latent
    linear_rank: str = "full"
    # partial fine-tuning over a frozen encoder: 1 = a trainable copy of the backbone's last
    # stage (``STevs.tail``) reads that stage's input maps (the ``tail`` embedding view) and
    # replaces the frozen last stage's pooled features; the context and the linear path's
    # fit stay on the frozen features; 0 = off
    train_tail_stages: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head not in ("vae", "regression"):
            raise ValueError(f"head must be 'vae' or 'regression', not {self.head!r}")
        if self.combine not in ("poe", "concat"):
            raise ValueError(f"combine must be 'poe' or 'concat', not {self.combine!r}")
        if self.align is not None and self.align not in ALIGNMENTS:
            raise ValueError(f"align must be one of {ALIGNMENTS} or None, not {self.align!r}")
        if self.likelihood not in ("gaussian", "nb"):
            raise ValueError(f"likelihood must be 'gaussian' or 'nb', not {self.likelihood!r}")
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, not {self.context!r}")
        if self.linear_path not in LINEAR_PATHS:
            raise ValueError(f"linear_path must be one of {LINEAR_PATHS}, not {self.linear_path!r}")
        if self.linear_rank not in LINEAR_RANKS:
            raise ValueError(f"linear_rank must be one of {LINEAR_RANKS}, not {self.linear_rank!r}")
        if not self.use_image and (self.context != "none" or self.linear_path != "none"):
            raise ValueError("context and linear_path need the image (use_image)")
        if self.train_tail_stages not in (0, 1):
            raise ValueError(
                f"train_tail_stages must be 0 or 1 (the last stage), not {self.train_tail_stages!r}"
            )
        if self.train_tail_stages and not self.use_image:
            raise ValueError("train_tail_stages needs the image (use_image)")
        if not (self.use_image or self.use_spatial):
            raise ValueError("at least one of use_image / use_spatial must be on")
        if self.head == "regression" and not self.use_image:
            raise ValueError("the regression head needs the image")

    @classmethod
    def for_method(cls, method: str, **kwargs: Any) -> STevsConfig:
        """The configuration of a named torch method of the registry (its switches)."""
        switches = torch_switches()
        if method not in switches:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(switches)}")
        return replace(cls(**kwargs), **switches[method])

    @property
    def aligned(self) -> bool:
        """Whether the alignment loss is active (needs both experts under PoE)."""
        return self.align is not None and self.experts_separate

    @property
    def uses_context(self) -> bool:
        """Whether the image features include the neighbourhood context."""
        return self.use_image and self.context != "none"

    @property
    def experts_separate(self) -> bool:
        """Whether both experts have their own posterior (PoE with image and spatial)."""
        return self.combine == "poe" and self.use_image and self.use_spatial

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["backbone"] = self.backbone.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> STevsConfig:
        kwargs = dict(data)
        kwargs["backbone"] = BackboneSpec.from_dict(kwargs["backbone"])
        return cls(**kwargs)


@dataclass
class LossOutput:
    """The optimised ``loss`` and every named term (per-spot means), for logging."""

    loss: Tensor
    terms: dict[str, Tensor]

    def floats(self) -> dict[str, float]:
        """Terms as Python floats, ``loss`` included."""
        values = {k: float(v.detach()) for k, v in self.terms.items()}
        return {"loss": float(self.loss.detach()), **values}


class STevs(nn.Module):
    """Image expert (timm backbone) + spatial expert + PoE + decoder; or the ST-Net head."""

    def __init__(self, config: STevsConfig, backbone: ImageBackbone | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.backbone: ImageBackbone | None = None
        if c.use_image:
            self.backbone = backbone if backbone is not None else ImageBackbone(c.backbone)
        feature_dim = self.backbone.feature_dim if self.backbone is not None else 0
        self.tail: nn.Module | None = None
        if c.train_tail_stages and self.backbone is not None:
            self._build_tail(self.backbone)
        feature_dim *= 2 if c.uses_context else 1  # [own, neighbour mean]
        self.feature_dim = feature_dim
        genes = c.n_genes
        self.register_buffer("target_mean", torch.zeros(genes))
        self.register_buffer("target_std", torch.ones(genes))
        self.register_buffer("residual_std", torch.ones(genes))  # regression head's error
        self.linear: nn.Linear | None = None
        if c.linear_path != "none" and c.head == "vae":
            self.register_buffer("feature_mean", torch.zeros(feature_dim))
            self.register_buffer("feature_std", torch.ones(feature_dim))
            self.linear = nn.Linear(feature_dim, genes)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
            self.linear.requires_grad_(c.linear_path == "learned")
        if c.head == "regression":
            self.regressor = nn.Linear(feature_dim, genes)
            return
        self.image_encoder = (
            mlp(feature_dim, c.hidden_dim, c.hidden_dim, layers=1, dropout=c.dropout)
            if c.use_image
            else None
        )
        self.spatial_encoder = (
            SpatialEncoder(c.hidden_dim, c.n_freqs, c.dropout) if c.use_spatial else None
        )
        if c.combine == "concat":
            joint_dim = c.hidden_dim * (int(c.use_image) + int(c.use_spatial))
            self.joint_head = GaussianHead(joint_dim, c.latent_dim, c.hidden_dim, 1, c.dropout)
        else:
            self.image_head = (
                GaussianHead(c.hidden_dim, c.latent_dim, c.hidden_dim, 1, c.dropout)
                if c.use_image
                else None
            )
            # the spatial expert starts as broad as the prior, so that the image expert
            # leads the product until coordinates prove informative
            self.spatial_head = (
                GaussianHead(c.hidden_dim, c.latent_dim, c.hidden_dim, 1, c.dropout, 0.0)
                if c.use_spatial
                else None
            )
        decoder_cls = NegativeBinomialDecoder if c.likelihood == "nb" else GaussianDecoder
        self.decoder = decoder_cls(c.latent_dim, genes, c.hidden_dim, c.dropout)
        if c.linear_path == "ridge":  # start exactly at the probe; the latent path adds to it
            nn.init.zeros_(self.decoder.mean.weight)
            nn.init.zeros_(self.decoder.mean.bias)

    # ----------------------------------------------------------------- plumbing
    def set_normalisation(self, mean: Tensor | Any, std: Tensor | Any) -> None:
        """Store the fold's per-gene training mean/std used to standardise targets."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1).clamp_min(1e-6)
        self.target_mean.copy_(mean_t)
        self.target_std.copy_(std_t)

    def standardise(self, target: Tensor) -> Tensor:
        """Targets' units -> the model's internal units."""
        if not self.config.standardise:
            return target
        return (target - self.target_mean) / self.target_std

    def set_feature_normalisation(self, mean: Tensor | Any, std: Tensor | Any) -> None:
        """Store the training spots' per-feature mean/std the linear path standardises by."""
        if self.linear is None:
            raise RuntimeError("this model has no linear path")
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).reshape(-1))
        self.feature_std.copy_(
            torch.as_tensor(std, dtype=torch.float32).reshape(-1).clamp_min(1e-6)
        )

    def _build_tail(self, backbone: ImageBackbone) -> None:
        """The trainable copy of the frozen backbone's last stage and the layout of the
        ``tail`` view it reads: [pooled earlier stages, the last stage's input maps]."""
        self.tail = copy.deepcopy(backbone.last_stage())
        backbone.requires_grad_(False).eval()  # its batch-norm statistics stay as loaded
        self.tail.requires_grad_(True)
        self.tail_shape = backbone.tail_input_shape()
        self.frozen_dim = backbone.feature_dim - backbone.stage_channels[-1]
        self.tail_input_dim = self.frozen_dim + math.prod(self.tail_shape)

    def _through_last_stage(self, embedding: Tensor, stage: nn.Module) -> Tensor:
        """A ``tail`` view embedding (N, tail_input_dim) -> (N, feature_dim) features with
        ``stage`` (the trainable tail, or the frozen backbone's own) as the last stage."""
        if embedding.shape[1] != self.tail_input_dim:
            raise ValueError(
                f"this model fine-tunes its encoder's last stage: it reads the 'tail' embedding "
                f"view ({self.tail_input_dim} values per spot), not {embedding.shape[1]}"
            )
        frozen, maps = embedding[:, : self.frozen_dim], embedding[:, self.frozen_dim :]
        maps = maps.reshape(-1, *self.tail_shape)
        chunk = max(1, len(maps)) if torch.is_grad_enabled() else 512  # bounded when predicting
        pooled = [
            self.backbone.pool([stage(maps[i : i + chunk])]) for i in range(0, len(maps), chunk)
        ]
        return torch.cat([frozen, torch.cat(pooled) if pooled else frozen[:, :0]], dim=1)

    def frozen_embedding(self, embedding: Tensor) -> Tensor:
        """The frozen encoder's embedding of the spots (what the neighbourhood context and
        the probe see): ``embedding`` itself, or for a model with a trained tail its ``tail``
        view passed through the frozen backbone's own last stage."""
        if self.tail is None:
            return embedding
        self.backbone.eval()
        with torch.no_grad():
            return self._through_last_stage(embedding.float(), self.backbone.last_stage())

    def train(self, mode: bool = True) -> STevs:
        """``nn.Module.train``; a frozen backbone under a trained tail stays in eval mode."""
        super().train(mode)
        if self.tail is not None:
            self.backbone.eval()
        return self

    def image_features(self, embedding: Tensor, context: Tensor | None = None) -> Tensor:
        """Backbone embedding (+ neighbourhood context) -> the image expert's input; a model
        with a trained tail takes the ``tail`` view and runs its tail over the maps."""
        features = embedding.float()
        if self.tail is not None:
            features = self._through_last_stage(features, self.tail)
        if self.config.uses_context:
            if context is None:
                raise ValueError("this model uses the neighbourhood context: give context")
            features = torch.cat([features, context.float()], dim=1)
        return features

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters (trained at the backbone's learning rate), the tail's
        included."""
        if self.backbone is None:
            return []
        tail = list(self.tail.parameters()) if self.tail is not None else []
        return list(self.backbone.parameters()) + tail

    def head_parameters(self) -> list[nn.Parameter]:
        backbone_ids = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in backbone_ids]

    def embed(self, patch: Tensor) -> Tensor:
        """Backbone features (N, feature_dim) of uint8 patches (N, 3, H, W); with a trained
        tail, the ``tail`` view that :meth:`image_features` reads."""
        if self.backbone is None:
            raise RuntimeError("this model has no image expert")
        if self.tail is not None:
            return self.backbone.tail_inputs(patch)
        return self.backbone(patch)

    # ----------------------------------------------------------------- scvi-style split
    def inference(
        self,
        patch: Tensor | None = None,
        coords: Tensor | None = None,
        embedding: Tensor | None = None,
        *,
        context: Tensor | None = None,
        linear_offset: Tensor | None = None,
        sample: bool | None = None,
    ) -> dict[str, Any]:
        """Encoders -> expert posteriors -> joint posterior ``qz`` and a draw ``z``.

        ``embedding`` (precomputed backbone features) replaces ``patch`` in the frozen-backbone
        mode; ``context`` is the neighbourhood context (:mod:`stevs.models.context`) of models
        that use it. ``sample`` defaults to ``self.training``; otherwise ``z`` is the posterior
        mean. With a linear path, ``out["linear"]`` is its part of the decoder's mean, or
        ``linear_offset`` when given (the probe's out-of-fold predictions in training).
        """
        c = self.config
        out: dict[str, Any] = {}
        features = None
        if c.use_image:
            if embedding is None:
                if patch is None:
                    raise ValueError("the image expert needs patch or embedding")
                embedding = self.embed(patch)
            features = self.image_features(embedding, context)
            if linear_offset is not None and self.linear is not None:
                out["linear"] = linear_offset.float()
            elif self.linear is not None:
                out["linear"] = self.linear((features - self.feature_mean) / self.feature_std)
        if c.head == "regression":
            out["prediction"] = self.regressor(features)
            return out
        h_img = self.image_encoder(features) if self.image_encoder is not None else None
        h_spatial = None
        if self.spatial_encoder is not None:
            if coords is None:
                raise ValueError("the spatial expert needs coords")
            h_spatial = self.spatial_encoder(coords)
        if c.combine == "concat":
            joint = torch.cat([h for h in (h_img, h_spatial) if h is not None], dim=1)
            qz = self.joint_head(joint)
        else:
            mus, logvars = [], []
            if h_img is not None:
                out["q_img"] = self.image_head(h_img)
                mus.append(out["q_img"][0])
                logvars.append(out["q_img"][1])
            if h_spatial is not None:
                out["q_spatial"] = self.spatial_head(h_spatial)
                mus.append(out["q_spatial"][0])
                logvars.append(out["q_spatial"][1])
            qz = product_of_experts(mus, logvars, include_prior=True)
        out["qz"] = qz
        do_sample = self.training if sample is None else sample
        out["z"] = reparameterize(*qz) if do_sample else qz[0]
        return out

    def generative(self, z: Tensor, offset: Tensor | None = None) -> dict[str, Tensor]:
        """Decoder: z -> per-gene mean/logvar (and NB rate/dispersion); ``offset`` (the
        linear path's output) is added to the mean."""
        out = self.decoder(z)
        if offset is not None:
            out = {**out, "mean": out["mean"] + offset}
        return out

    def _reconstruction(
        self, gen: Mapping[str, Tensor], target: Tensor, batch: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        terms = {"recon": gaussian_nll(target, gen["mean"], gen["logvar"], self.config.nll_beta)}
        if self.config.likelihood == "nb":
            terms["nb"] = negative_binomial_nll(
                batch["counts"].float(),
                batch["library_size"].float(),
                gen["rate_logit"],
                gen["log_theta"],
            )
        return terms

    def loss(
        self,
        batch: Mapping[str, Tensor],
        inference_out: Mapping[str, Any],
        generative_out: Mapping[str, Tensor] | None,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Reconstruction + kl_weight * KL(qz || prior) + expert ELBOs + lambda * alignment.

        ``kl_weight`` is beta times the warm-up factor. Terms are per-spot means; ``mse`` (in
        standardised units, mean over genes) is reported for monitoring and not optimised
        except by the regression head. The optimised ``loss`` is divided by the gene count so
        that learning rates and gradient clipping do not depend on the panel size.
        """
        c = self.config
        target = self.standardise(batch["target"].float())
        n_genes = float(c.n_genes)
        if c.head == "regression":
            prediction = inference_out["prediction"].float()
            mse = ((prediction - target) ** 2).mean()
            if self.training:
                with torch.no_grad():
                    rms = ((prediction - target) ** 2).mean(0).sqrt()
                    self.residual_std.mul_(0.99).add_(0.01 * rms)
            return LossOutput(loss=mse, terms={"mse": mse})
        assert generative_out is not None
        terms: dict[str, Tensor] = {}
        recon = self._reconstruction(generative_out, target, batch)
        total = torch.zeros((), device=target.device)
        for name, value in recon.items():
            weight = c.nb_weight if name == "nb" else 1.0
            terms[name] = value.mean()
            total = total + weight * terms[name]
        terms["kl"] = kl_standard_normal(*inference_out["qz"]).mean()
        total = total + kl_weight * terms["kl"]
        if c.experts_separate and c.expert_elbo_weight > 0:
            for key, name in (("q_img", "elbo_img"), ("q_spatial", "elbo_spatial")):
                mu, logvar = inference_out[key]
                z = reparameterize(mu, logvar) if self.training else mu
                gen = self.generative(z, inference_out.get("linear"))
                expert_recon = self._reconstruction(gen, target, batch)
                elbo = sum(
                    (c.nb_weight if n == "nb" else 1.0) * v.mean() for n, v in expert_recon.items()
                )
                terms[name] = elbo + kl_weight * kl_standard_normal(mu, logvar).mean()
                total = total + c.expert_elbo_weight * terms[name]
        if c.aligned:
            align = alignment_loss(c.align)
            divergence = align(*inference_out["q_img"], *inference_out["q_spatial"])
            terms["align"] = divergence.mean()
            total = total + c.align_weight * terms["align"]
        terms["mse"] = ((generative_out["mean"].float() - target) ** 2).mean().detach()
        return LossOutput(loss=total / n_genes, terms=terms)

    def forward(self, batch: Mapping[str, Tensor], kl_weight: float = 1.0) -> LossOutput:
        """Inference, generative and loss in one call (what DDP wraps)."""
        inference_out = self.inference(
            batch.get("patch"), batch.get("coords"), batch.get("embedding"),
            context=batch.get("context"),
            linear_offset=batch.get("linear_offset"),
        )  # fmt: skip
        generative_out = None
        if self.config.head != "regression":
            generative_out = self.generative(inference_out["z"], inference_out.get("linear"))
        return self.loss(batch, inference_out, generative_out, kl_weight)

    # ----------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict(
        self,
        patch: Tensor | None = None,
        coords: Tensor | None = None,
        embedding: Tensor | None = None,
        n_samples: int = 16,
        *,
        context: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Predicted mean and predictive std per gene, in the targets' normalisation.

        The mean decodes the posterior mean; the std combines the decoder's variance with the
        spread of ``n_samples`` decoded posterior samples (law of total variance); with
        ``n_samples=0`` only the decoder variance at the posterior mean. Runs in eval mode.
        """
        was_training = self.training
        self.eval()
        try:
            inference_out = self.inference(patch, coords, embedding, context=context, sample=False)
            offset = inference_out.get("linear")
            if self.config.head == "regression":
                mean = inference_out["prediction"].float()
                std = self.residual_std.expand_as(mean)
            else:
                mu, logvar = inference_out["qz"]
                at_mean = self.generative(mu, offset)
                mean = at_mean["mean"].float()
                if n_samples <= 0:  # decoder variance at the posterior mean only (fast)
                    variance = torch.exp(at_mean["logvar"].float())
                else:
                    draws = [
                        self.generative(reparameterize(mu, logvar), offset)
                        for _ in range(n_samples)
                    ]
                    variance = torch.stack([torch.exp(g["logvar"].float()) for g in draws]).mean(0)
                    if n_samples > 1:
                        variance = variance + torch.stack([g["mean"].float() for g in draws]).var(0)
                std = variance.sqrt()
        finally:
            self.train(was_training)
        if self.config.standardise:
            mean = mean * self.target_std + self.target_mean
            std = std * self.target_std
        return mean, std


@torch.no_grad()
def fit_linear_path(
    model: STevs,
    features: Tensor,
    target: Tensor,
    groups: Any,
    genes: list[str],
    headline_genes: list[str] | None = None,
) -> tuple[dict[str, Any], Tensor | None]:
    """Set the linear path of ``model`` from its training spots: (what was fitted, the
    probe's out-of-fold predictions of the training spots or None).

    ``features`` (N, F) are :meth:`STevs.image_features` of the training spots, ``target``
    (N, G) their targets in the fold's normalisation, ``groups`` their slides. Both kinds
    standardise the features with the training mean/std. ``ridge`` then sets the weights to
    the closed-form ridge probe of :func:`stevs.models.ridge.fit_ridge` (standardise, PCA,
    penalty chosen by inner CV grouped by slide: the ``ridge_embed`` recipe) on the model's
    standardised targets, collapsed to one linear map; ``learned`` leaves them at zero.
    With ``linear_stacking``, the out-of-fold predictions come from refitting the probe (same
    penalty) on the inner CV's splits, grouped by slide, in the model's standardised units.
    """
    if model.linear is None:
        return {}, None
    x = features.detach().double().cpu().numpy()
    if model.config.linear_path == "learned":
        model.set_feature_normalisation(x.mean(0), x.std(0))
        return {"linear_path": "learned"}, None
    from stevs.models.ridge import fit_probe, linear_map, out_of_fold_predictions

    y = model.standardise(target.detach().float().to(model.target_mean.device)).cpu().numpy()
    reduced = model.config.linear_rank == "cv"
    probe = fit_probe(x, y, groups, genes, reduced=reduced, headline_genes=headline_genes)
    model.set_feature_normalisation(probe.feature_mean, probe.feature_scale)
    weight, bias = linear_map(probe)  # (F, G) on standardised features
    model.linear.weight.copy_(torch.as_tensor(weight.T, dtype=torch.float32))
    model.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    kept = ("n_components", "n_train_spots", "rank")
    info = {"linear_path": "ridge", "alpha": probe.alpha,
            **{k: probe.meta[k] for k in kept if k in probe.meta}}  # fmt: skip
    if not model.config.linear_stacking:
        return info, None
    oof = out_of_fold_predictions(x, y, groups, probe.alpha)
    return info, torch.as_tensor(oof, dtype=torch.float32)
