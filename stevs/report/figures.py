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


def run_label(encoder: str, method: str) -> str:
    """A figure's name for an (encoder, method) row: the method over its encoder."""
    return f"{method}\n{encoder}" if encoder not in ("", "none") else f"{method}\n(no encoder)"


def bar_charts(summary: pd.DataFrame) -> dict[str, str]:
    """One bar chart per table metric, one bar per (encoder, method) row of ``summary``
    (mean across folds, std as error bar), coloured by encoder -> base64 PNGs."""
    plt = _pyplot()
    figures = {}
    rows = summary.assign(encoder=summary["encoder"].fillna("").astype(str))
    rows = rows.sort_values(["encoder", "method"]).reset_index(drop=True)
    labels = [run_label(e, m) for e, m in zip(rows["encoder"], rows["method"], strict=True)]
    encoders = list(dict.fromkeys(rows["encoder"]))
    colours = [f"C{encoders.index(e) % 10}" for e in rows["encoder"]]
    for metric in TABLE_METRICS:
        means = rows[f"{metric}_mean"].to_numpy(dtype=float)
        if not np.isfinite(means).any():
            continue
        stds = np.nan_to_num(rows[f"{metric}_std"].to_numpy(dtype=float))
        fig, ax = plt.subplots(figsize=(max(3.0, 0.9 * len(rows) + 1.5), 3.0))
        ax.bar(range(len(rows)), np.nan_to_num(means), yerr=stds, capsize=3, color=colours)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.axhline(0, color="black", linewidth=0.6)
        figures[metric] = _png(fig)
    return figures


def gene_r_distribution(per_gene: pd.DataFrame) -> str | None:
    """Box + strip plot of per gene x test-slide Pearson r, one box per (encoder, method),
    coloured by encoder as the bars are (seeds pooled; constant genes out)."""
    plt = _pyplot()
    per_gene = per_gene.assign(encoder=per_gene.get("encoder", "")).fillna({"encoder": ""})
    keys = sorted(per_gene.groupby(["encoder", "method"]).groups)
    grouped = per_gene.groupby(["encoder", "method"])["pearson_r"]
    data = [grouped.get_group(k).dropna().to_numpy() for k in keys]
    if not any(len(d) for d in data):
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(keys) + 2), 3.6))
    boxes = ax.boxplot(data, showfliers=False, patch_artist=True)
    encoders = list(dict.fromkeys(str(e) for e, _ in keys))
    for box, (encoder, _) in zip(boxes["boxes"], keys, strict=True):
        box.set(facecolor=f"C{encoders.index(str(encoder)) % 10}", alpha=0.6)
    labels = [run_label(str(e), str(m)) for e, m in keys]
    ax.set_xticks(range(1, len(keys) + 1), labels, rotation=60, ha="right", fontsize=7)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=4, alpha=0.4, color="k")
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_ylabel("Pearson r per gene and test slide")
    return _png(fig)


def epoch_logs(models_dir: Path, run: str) -> list[tuple[str, pd.DataFrame]]:
    """(fold, per-epoch log) of each ``{run}/{fold}/metrics.csv`` that has epochs and
    something to draw (a ridge's log, one row per penalty, has none); a refit's rows are
    left out: the selection run's curve is the one shown."""
    logs = []
    for path in sorted((models_dir / run).glob("*/metrics.csv")):
        try:
            table = ModelDir(path.parent).read_metrics()
        except StevsInputError as err:
            log.warning("%s, skipped", err)
            continue
        if table is None or "epoch" not in table:
            continue
        if "stage" in table:
            table = table[table["stage"] != "refit"]
        drawn = [c for c in table.columns if c == VAL_METRIC or "loss" in c]
        if len(table) and table[drawn].notna().any().any():
            logs.append((path.parent.name, table))
    return logs


def training_curves(models_dir: Path, methods: Sequence[str]) -> dict[str, str]:
    """Validation r and loss curves per run from ``{run}/{fold}/metrics.csv``; runs without
    epochs (the ridges) get no figure rather than empty panels."""
    plt = _pyplot()
    figures = {}
    for method in methods:
        logs = epoch_logs(models_dir, method)
        if not logs:
            continue
        has_r = any(VAL_METRIC in table for _, table in logs)
        fig, axes = plt.subplots(1, 2 if has_r else 1, figsize=(9 if has_r else 4.5, 3.0),
                                 squeeze=False)  # fmt: skip
        ax_loss = axes[0, -1]
        for index, (fold, table) in enumerate(logs):
            colour = f"C{index % 10}"
            if has_r and VAL_METRIC in table:
                axes[0, 0].plot(table["epoch"], table[VAL_METRIC], color=colour, label=fold)
            loss_columns = [c for c in table.columns if "loss" in c]
            for style, column in zip(["-", "--", ":", "-."] * 4, loss_columns, strict=False):
                ax_loss.plot(table["epoch"], table[column], style, color=colour,
                             label=f"{fold}: {column}")  # fmt: skip
        if has_r:
            axes[0, 0].set(xlabel="epoch", ylabel="validation headline r", title=method)
        ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{method}: losses")
        for ax in axes[0]:
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
    max_methods: int = 3,
) -> tuple[list[tuple[str, str]], list[str]]:
    """Observed vs predicted maps of the ``n_genes`` genes ``lead_method`` predicts best on
    each test slide -> ([(caption, base64 PNG)], [notes on what was skipped])."""
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
        r_lookup = per_gene[(per_gene["fold"] == fold_name) & (per_gene["slide"] == slide)]
        r_lookup = r_lookup.set_index(["method", "gene"])["pearson_r"]
        panels = map_panels(observed, fold.genes, genes, preds, barcodes, r_lookup)
        xy = preds[lead_method].spatial
        xy = np.zeros((len(barcodes), 2)) if xy is None else np.asarray(xy)
        background = read_background(preds[lead_method].path)
        figures.append((f"{fold_name} / test slide {slide}", map_figure(panels, xy, background)))
    return figures, notes


def run_title(run: str) -> str:
    """A map column's title: ``method (seedN)`` over the encoder, for a workflow run."""
    parts = run.split("/")
    if len(parts) != 3:
        return run
    return f"{parts[1]} ({parts[2]})\n{parts[0] if parts[0] != 'none' else 'no encoder'}"


def map_panels(
    observed: np.ndarray,
    panel: Sequence[str],
    genes: Sequence[str],
    preds: dict[str, Prediction],
    barcodes: pd.Index,
    r_lookup: pd.Series,
) -> list[list[tuple[str, np.ndarray]]]:
    """Per gene (a row): (title, values per spot) of the observed map, then of each run's
    prediction of it on the same spots (a run missing some of the spots is left out)."""
    rows = []
    for gene in genes:
        column = panel.index(gene)
        row = [(f"{gene}: observed", observed[:, column])]
        for name, pred in preds.items():
            index = pred.barcodes.get_indexer(barcodes)
            if (index >= 0).all():
                r = r_lookup.get((name, gene), float("nan"))
                row.append((f"{run_title(name)}\n{gene}: r = {r:.2f}", pred.mean[index, column]))
        rows.append(row)
    return rows


def map_figure(
    panels: list[list[tuple[str, np.ndarray]]], xy: np.ndarray, background: Background | None
) -> str:
    """One row per gene of :func:`map_panels`, observed beside predicted, each row on one
    colour scale (1st-99th percentile of all its maps) with one colour bar -> base64 PNG."""
    plt = _pyplot()
    n_cols = max(len(row) for row in panels)
    dot = float(np.clip(9000.0 / max(len(xy), 1), 2.0, 60.0))
    fig, axes = plt.subplots(len(panels), n_cols, figsize=(3.6 * n_cols, 3.5 * len(panels)),
                             squeeze=False, layout="constrained")  # fmt: skip
    for r, row in enumerate(panels):
        every = np.concatenate([values for _, values in row])
        limits = tuple(np.percentile(every, [1, 99])) if len(every) else (0.0, 1.0)
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= len(row):
                ax.axis("off")
                continue
            title, values = row[c]
            points = draw_spot_map(ax, xy, values, background, dot=dot, limits=limits)
            ax.set_title(title, fontsize=9)
        colorbar = fig.colorbar(points, ax=list(axes[r]), fraction=0.02, pad=0.01)
        colorbar.ax.tick_params(labelsize=7)
    return _png(fig)


def draw_spot_map(
    ax: Any,
    xy: np.ndarray,
    values: np.ndarray,
    background: Background | None,
    *,
    dot: float,
    limits: tuple[float, float] | None = None,
) -> Any:
    """Spots coloured by ``values`` over the slide's H&E when the prediction file carries
    one, cropped to the spots; the colour scale runs over ``limits`` (default: the 1st-99th
    percentile of ``values``, with a colour bar of its own). Returns the scatter."""
    if background is not None and len(xy):
        height, width = background.image.shape[:2]
        extent = (0, width / background.scalef, height / background.scalef, 0)
        ax.imshow(background.image, extent=extent)
        pad = 0.05 * float(np.ptp(xy, axis=0).max() or 1.0)
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    else:
        ax.invert_yaxis()
    own = limits is None
    if limits is None:
        limits = tuple(np.percentile(values, [1, 99])) if len(values) else (0.0, 1.0)
    points = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=dot, cmap="viridis", vmin=limits[0],
                        vmax=limits[1], linewidths=0)  # fmt: skip
    if own:
        colorbar = ax.figure.colorbar(points, ax=ax, fraction=0.046, pad=0.02)
        colorbar.ax.tick_params(labelsize=6)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return points
