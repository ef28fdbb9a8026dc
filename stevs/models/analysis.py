"""What a trained STevs model's latent does: posterior collapse, the experts' shares of the
Product of Experts, and how far apart the experts' posteriors sit.

For a set of spots (a fold's training slides, or its held-out slides) :func:`latent_statistics`
computes, from the model's own encoders (no expression needed):

- ``kl_per_dim``: the mean over spots of KL(q(z | x) || N(0, 1)) of each latent dimension
  (nats), and ``active_dims``, the dimensions whose KL exceeds :data:`ACTIVE_KL_NATS`; the
  others have collapsed onto the prior (posterior collapse) and carry nothing;
- ``precision_share``: each expert's share of the PoE precision (image, spatial and the
  N(0, 1) prior, whose precision is 1), averaged over spots and latent dimensions: who
  decides the joint posterior;
- ``expert_sym_kl`` and ``expert_mean_sq_distance``: the symmetric KL between the image and
  spatial experts' posteriors and the squared distance of their means (summed over the
  latent, mean over spots): what the alignment loss pulls together (compare ``stevs`` with
  ``stevs_no_align``).

:func:`latent_analysis` puts the training and held-out statistics of one model together; the
model folder (:class:`stevs.io.model_dir.ModelDir`) stores it as ``latent.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from stevs.models.poe import clamp_logvar, kl_standard_normal, symmetric_kl
from stevs.models.stevs import STevs

#: a latent dimension is active when its mean KL to the prior exceeds this (nats)
ACTIVE_KL_NATS = 0.01
#: the experts of the PoE, by the key :meth:`STevs.inference` returns their posterior under
EXPERTS = (("image", "q_img"), ("spatial", "q_spatial"))


def has_latent(model: STevs) -> bool:
    """Whether the model has a latent posterior to analyse (not the regression head)."""
    return model.config.head == "vae"


@torch.no_grad()
def latent_statistics(model: STevs, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The latent statistics of the spots in ``batches`` (dicts with ``embedding`` or
    ``patch``, ``coords`` and, for models with a context, ``context``), in eval mode."""
    if not has_latent(model):
        raise ValueError("the regression head has no latent to analyse")
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, Tensor] = {}
    n = 0

    def add(name: str, value: Tensor) -> None:
        value = value.double().sum(0).cpu()
        sums[name] = sums[name] + value if name in sums else value

    for batch in batches:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        out = model.inference(
            moved.get("patch"), moved.get("coords"), moved.get("embedding"),
            context=moved.get("context"), sample=False,
        )  # fmt: skip
        mu, logvar = out["qz"]
        add("kl", kl_standard_normal(mu.unsqueeze(-1), logvar.unsqueeze(-1)))  # per dim
        experts = [(name, out[key]) for name, key in EXPERTS if key in out]
        if experts:
            precisions = {name: torch.exp(-clamp_logvar(q[1])) for name, q in experts}
            total = 1.0 + sum(precisions.values())
            for name, precision in precisions.items():
                add(f"share_{name}", (precision / total).mean(-1))
            add("share_prior", (1.0 / total).mean(-1))
        if len(experts) == 2:
            (_, q_img), (_, q_spatial) = experts
            add("sym_kl", symmetric_kl(*q_img, *q_spatial))
            add("mean_sq", ((q_img[0] - q_spatial[0]) ** 2).sum(-1))
        n += int(mu.shape[0])
    if n == 0:
        raise ValueError("no spots to analyse")
    return _summary(sums, n)


def _summary(sums: Mapping[str, Tensor], n: int) -> dict[str, Any]:
    """Means over ``n`` spots of the accumulated sums, as JSON-friendly values."""
    kl = (sums["kl"] / n).tolist()
    shares = {k[len("share_") :]: float(v) / n for k, v in sums.items() if k.startswith("share_")}
    return {
        "n_spots": n,
        "kl_per_dim": [round(v, 6) for v in kl],
        "kl_total": float(sum(kl)),
        "active_dims": int(sum(v > ACTIVE_KL_NATS for v in kl)),
        "precision_share": shares or None,
        "expert_sym_kl": float(sums["sym_kl"]) / n if "sym_kl" in sums else None,
        "expert_mean_sq_distance": float(sums["mean_sq"]) / n if "mean_sq" in sums else None,
    }


def latent_analysis(
    model: STevs, splits: Mapping[str, Iterable[Mapping[str, Any]]]
) -> dict[str, Any]:
    """The model's latent statistics on each named set of spots (``train``, ``heldout``),
    with what they were computed under (latent size, threshold, alignment)."""
    c = model.config
    return {
        "latent_dim": c.latent_dim,
        "active_kl_nats": ACTIVE_KL_NATS,
        "combine": c.combine,
        "align": c.align if c.aligned else None,
        "align_weight": c.align_weight if c.aligned else 0.0,
        "splits": {name: latent_statistics(model, batches) for name, batches in splits.items()},
    }
