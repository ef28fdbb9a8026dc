"""The report's figures, as base64 PNG strings for the self-contained page: bar charts of
the summary, the per-gene r distribution, training curves and spatial maps of observed vs
predicted expression over the slide's H&E."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stevs.errors import StevsInputError
from stevs.io.fold_file import read_fold
from stevs.io.model_dir import ModelDir
from stevs.io.prediction import Background, Prediction, read_background, read_prediction
from stevs.metrics import VAL_METRIC, load_observed
from stevs.report.tables import TABLE_METRICS

log = logging.getLogger(__name__)


def _png(fig: Any) -> str:
    """Matplotlib figure -> base64 PNG string; closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_charts(summary: pd.DataFrame) -> dict[str, str]:
    """One bar chart per table metric (mean across folds, std as error bar) -> base64 PNGs."""
    plt = _pyplot()
    figures = {}
    for metric in TABLE_METRICS:
        means = summary[f"{metric}_mean"].to_numpy(dtype=float)
        if not np.isfinite(means).any():
            continue
        stds = np.nan_to_num(summary[f"{metric}_std"].to_numpy(dtype=float))
        fig, ax = plt.subplots(figsize=(max(3.0, 0.8 * len(summary) + 1.5), 2.8))
        ax.bar(summary["method"], np.nan_to_num(means), yerr=stds, capsize=3, color="#4c72b0")
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        figures[metric] = _png(fig)
    return figures


def gene_r_distribution(per_gene: pd.DataFrame) -> str | None:
    """Box + strip plot of per gene x test-slide Pearson r per method (constant genes out)."""
    plt = _pyplot()
    methods = sorted(per_gene["method"].unique())
    data = [per_gene.loc[per_gene["method"] == m, "pearson_r"].dropna().to_numpy() for m in methods]
    if not any(len(d) for d in data):
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(methods) + 2), 3.2))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, fontsize=8)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=4, alpha=0.4, color="k")
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_ylabel("Pearson r per gene and test slide")
    return _png(fig)


def training_curves(models_dir: Path, methods: Sequence[str]) -> dict[str, str]:
    """Validation r and loss curves per method from ``{method}/{fold}/metrics.csv``."""
    plt = _pyplot()
    figures = {}
    for method in methods:
        logs = sorted((models_dir / method).glob("*/metrics.csv"))
        if not logs:
            continue
        fig, (ax_r, ax_loss) = plt.subplots(1, 2, figsize=(8, 2.8))
        for index, path in enumerate(logs):
            try:
                table = ModelDir(path.parent).read_metrics()
            except StevsInputError as err:
                log.warning("%s, skipped", err)
                continue
            if table is None or "epoch" not in table:
                continue
            if "stage" in table:  # a refit's rows: the selection run's curve is the one shown
                table = table[table["stage"] != "refit"]
            colour = f"C{index % 10}"
            if VAL_METRIC in table:
                ax_r.plot(table["epoch"], table[VAL_METRIC], color=colour, label=path.parent.name)
            loss_columns = [c for c in table.columns if "loss" in c]
            for style, column in zip(["-", "--", ":", "-."] * 4, loss_columns, strict=False):
                ax_loss.plot(table["epoch"], table[column], style, color=colour,
                             label=f"{path.parent.name}: {column}")  # fmt: skip
        ax_r.set(xlabel="epoch", ylabel="validation headline r", title=method)
        ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{method}: losses")
        for ax in (ax_r, ax_loss):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        figures[method] = _png(fig)
    return figures


def spatial_maps(
    per_gene: pd.DataFrame,
    predictions_dir: Path,
    fold_files: dict[str, Path],
    methods: Sequence[str],
    *,
    lead_method: str,
    max_slides: int = 4,
    n_genes: int = 3,
    max_methods: int = 4,
) -> tuple[list[tuple[str, str]], list[str]]:
    """Observed vs predicted maps of the ``n_genes`` genes ``lead_method`` predicts best on
    each test slide -> ([(caption, base64 PNG)], [notes on what was skipped])."""
    plt = _pyplot()
    figures, notes = [], []
    lead = per_gene[per_gene["method"] == lead_method]
    shown_methods = [lead_method] + [m for m in methods if m != lead_method][: max_methods - 1]
    for (fold_name, slide), rows in lead.groupby(["fold", "slide"], sort=True):
        if len(figures) >= max_slides:
            notes.append(f"maps limited to {max_slides} test slides")
            break
        if fold_name not in fold_files:
            notes.append(f"{fold_name}/{slide}: fold file not found, no map")
            continue
        genes = rows.dropna(subset=["pearson_r"]).nlargest(n_genes, "pearson_r")["gene"].tolist()
        try:
            fold = read_fold(fold_files[fold_name])
            preds: dict[str, Prediction] = {}
            for method in shown_methods:
                path = predictions_dir / method / fold_name / f"{slide}.h5ad"
                if path.exists():
                    preds[method] = read_prediction(path, fold.genes)
            if lead_method not in preds:
                notes.append(f"{fold_name}/{slide}: no {lead_method} prediction file, no map")
                continue
            barcodes = preds[lead_method].barcodes
            observed, _, _ = load_observed(fold, slide, barcodes)
        except (StevsInputError, OSError, KeyError) as err:
            notes.append(f"{fold_name}/{slide}: {err}")
            continue
        xy = preds[lead_method].spatial
        xy = np.zeros((len(barcodes), 2)) if xy is None else np.asarray(xy)
        columns = ["observed", *preds]
        dot = float(np.clip(3000.0 / max(len(xy), 1), 1.0, 20.0))
        fig, axes = plt.subplots(
            len(genes), len(columns), figsize=(2.4 * len(columns), 2.3 * len(genes)), squeeze=False
        )
        r_lookup = per_gene[(per_gene["fold"] == fold_name) & (per_gene["slide"] == slide)]
        r_lookup = r_lookup.set_index(["method", "gene"])["pearson_r"]
        background = read_background(preds[lead_method].path)
        for row, gene in enumerate(genes):
            for col, name in enumerate(columns):
                ax = axes[row, col]
                if name == "observed":
                    values = observed[:, fold.genes.index(gene)]
                    title = f"{gene}: observed"
                else:
                    rows = preds[name].barcodes.get_indexer(barcodes)
                    if (rows < 0).any():
                        ax.axis("off")
                        continue
                    values = preds[name].mean[rows, fold.genes.index(gene)]
                    r = r_lookup.get((name, gene), float("nan"))
                    title = f"{name} (r={r:.2f})"
                draw_spot_map(ax, xy, values, background, dot=dot)
                ax.set_title(title, fontsize=8)
        figures.append((f"{fold_name} / test slide {slide}", _png(fig)))
    return figures, notes


def draw_spot_map(
    ax: Any, xy: np.ndarray, values: np.ndarray, background: Background | None, *, dot: float
) -> None:
    """Spots coloured by ``values`` (1st-99th percentile, with a colour bar) over the slide's
    H&E when the prediction file carries one, cropped to the spots."""
    if background is not None and len(xy):
        height, width = background.image.shape[:2]
        extent = (0, width / background.scalef, height / background.scalef, 0)
        ax.imshow(background.image, extent=extent)
        pad = 0.05 * float(np.ptp(xy, axis=0).max() or 1.0)
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    else:
        ax.invert_yaxis()
    low, high = np.percentile(values, [1, 99]) if len(values) else (0, 1)
    points = ax.scatter(
        xy[:, 0], xy[:, 1], c=values, s=dot, cmap="viridis", vmin=low, vmax=high, linewidths=0
    )
    colorbar = ax.figure.colorbar(points, ax=ax, fraction=0.046, pad=0.02)
    colorbar.ax.tick_params(labelsize=6)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
