"""The report's latent-analysis section: what each STevs model's latent does, read back from
the ``latent.json`` that ``stevs train`` writes beside the model (:mod:`stevs.models.analysis`,
one writer: :meth:`stevs.io.model_dir.ModelDir.write_latent`)."""

from __future__ import annotations

import html
import logging
from pathlib import Path

import pandas as pd

from stevs.errors import StevsInputError
from stevs.io.model_dir import LATENT, ModelDir
from stevs.report.tables import run_of

log = logging.getLogger(__name__)

#: the table's numeric columns, in order
LATENT_COLUMNS = ["active_dims", "latent_dim", "kl_total", "share_image", "share_spatial",
                  "share_prior", "expert_sym_kl", "expert_mean_sq_distance"]  # fmt: skip


def collect_latent(models_dir: str | Path) -> pd.DataFrame:
    """One row per (model folder, analysed split) of ``{models}/{run}/{fold}/latent.json``;
    analyses of other weights than the folder's (stale) are left out."""
    models_dir = Path(models_dir)
    rows = []
    for path in sorted(models_dir.glob(f"**/{LATENT}")):
        folder = path.parent
        try:
            run = run_of(folder.parent.relative_to(models_dir), path)
            record = ModelDir(folder).read_latent()
        except StevsInputError as err:
            log.warning("%s, skipped", err)
            continue
        if record is None:
            log.warning("%s describes other weights than its folder's, skipped", path)
            continue
        method = Path(run["run"]).parent.name if run["encoder"] else run["run"]
        for split, stats in record["splits"].items():
            shares = stats.get("precision_share") or {}
            rows.append({
                "encoder": run["encoder"], "method": method, "seed": run["seed"],
                "fold": folder.name, "split": split, "latent_dim": record["latent_dim"],
                "active_kl_nats": record.get("active_kl_nats"),
                "active_dims": stats["active_dims"], "kl_total": stats["kl_total"],
                **{f"share_{k}": shares.get(k) for k in ("image", "spatial", "prior")},
                "expert_sym_kl": stats.get("expert_sym_kl"),
                "expert_mean_sq_distance": stats.get("expert_mean_sq_distance"),
            })  # fmt: skip
    return pd.DataFrame(rows)


def latent_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per encoder, method and split: the mean over models (seeds x folds)."""
    keys = ["encoder", "method", "split"]
    values = rows[keys + LATENT_COLUMNS].astype({c: float for c in LATENT_COLUMNS})
    table = values.groupby(keys, sort=True).mean().reset_index()
    table.insert(3, "models", rows.groupby(keys, sort=True).size().to_numpy())
    return table


def latent_section(models_dir: str | Path) -> str:
    """The report section ("" when no model folder holds a latent analysis)."""
    rows = collect_latent(models_dir)
    if rows.empty:
        return ""
    thresholds = sorted({str(v) for v in rows["active_kl_nats"]})
    table = latent_table(rows).to_html(
        index=False, float_format=lambda v: f"{v:.3f}", table_id="latent", border=0, na_rep="–"
    )
    return (
        "<h2>Latent analysis</h2><p>"
        + html.escape(
            "Per model, on the spots it was fitted on (train) and on the held-out slides "
            "(heldout), mean over seeds and folds: active_dims counts latent dimensions "
            f"whose mean KL to the prior exceeds {' / '.join(thresholds)} nats (the rest have "
            "collapsed onto the prior); share_image / share_spatial / share_prior are each "
            "expert's share of the Product of Experts' precision (who decides the joint "
            "posterior); "
            "expert_sym_kl and expert_mean_sq_distance say how far the image and spatial "
            "experts' posteriors sit apart, what the alignment loss pulls together (compare "
            "stevs with stevs_no_align). From latent.json in each model folder."
        )
        + "</p>"
        + table
    )
