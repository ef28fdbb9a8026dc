"""The results report (``stevs report``): TSV tables and one self-contained HTML page.

Reads what ``stevs evaluate`` wrote (``{metrics}/{run}/{fold}.tsv`` with its
``.summary.tsv`` and ``.pooled.tsv``; a run is ``{encoder}/{method}/seed{seed}`` as the
workflow lays it out, or a bare ``{method}``) and, where present, the fold files, the
prediction AnnDatas, the training logs (``{models}/{run}/{fold}/metrics.csv``) and the run's
config. Writes ``index.html`` (figures inlined as base64 PNG), ``summary.tsv`` (encoder x
method x metric: per fold the mean over seeds, then mean and std across folds, and the sd
over seeds of the headline), ``folds.tsv`` (run x fold), ``per_gene.tsv`` (run x fold x test
slide x gene), ``pooled.tsv`` (pooled-over-slides r per run x fold x gene) and
``comparison.tsv`` (STevs against the best baseline on the same encoder, with the paired
test of :func:`compare_to_baselines`).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import logging
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stevs.atomic import atomic_write_text
from stevs.errors import StevsInputError
from stevs.io.fold_file import read_fold
from stevs.io.model_dir import ModelDir
from stevs.io.prediction import Background, Prediction, read_background, read_prediction
from stevs.metrics import (
    HEST_BENCH_METRICS,
    PER_GENE_COLUMNS,
    SUMMARY_METRICS,
    VAL_METRIC,
    load_observed,
    pooled_path,
    write_tsv_atomic,
)

log = logging.getLogger(__name__)

#: metrics of the method-by-metric table, headline first
TABLE_METRICS = [
    "pearson_r_mean_headline",
    "pearson_r_mean_all",
    "pooled_pearson_r_mean_headline",
    "pooled_pearson_r_mean_all",
    "spearman_rho_mean_headline",
    "spearman_rho_mean_all",
    "mse_mean",
    "mae_mean",
    "coverage90_mean",
    "pearson_r_top50_optimistic",
]
LOWER_IS_BETTER = {"mse_mean", "mae_mean"}
#: the fold file's ``validation`` mode in words
VALIDATION_WORDS = {
    "slide": "validation carved out of the training data as whole training slides, "
    "never the test fold",
    "patient": "validation carved out of the training data as whole training patients, "
    "never the test fold",
    "blocks": "validation carved out of the training data as spatial blocks of training "
    "slides (buffered from held-out spots), never the test fold",
}
VERSION_PACKAGES = ["stevs", "torch", "timm", "numpy", "scipy", "scikit-learn", "anndata", "pandas"]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
/* wide tables scroll inside the page instead of running off it */
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; display: block;
        overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #eef7ee; }
.note { background: #fff8e6; border-left: 4px solid #e0a800; padding: .5em 1em; }
.optimistic { color: #a15c00; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; }
.figs img { max-width: 380px; margin: 4px; border: 1px solid #eee; }
dt { font-weight: bold; } dd { margin-bottom: .4em; }
"""


# --------------------------------------------------------------------------- tables


#: the columns that name a run (the workflow's ``{encoder}/{method}/seed{seed}``)
RUN_COLUMNS = ["encoder", "method", "seed", "run"]


def run_of(relative: Path, source: Path) -> dict[str, Any]:
    """``encoder``, ``seed`` and ``run`` (the relative folder) of a metrics file's folder:
    ``{encoder}/{method}/seed{seed}``, or a bare ``{method}`` (no encoder, seed 0)."""
    parts = relative.parts
    if len(parts) == 1:
        return {"encoder": "", "seed": 0, "run": parts[0]}
    if len(parts) == 3 and parts[2].startswith("seed") and parts[2][4:].isdigit():
        return {"encoder": parts[0], "seed": int(parts[2][4:]), "run": relative.as_posix()}
    raise StevsInputError(source, "metrics must lie in {method}/ or {encoder}/{method}/seedN/")


def collect_metrics(
    metrics_dir: str | os.PathLike,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """All evaluations under ``metrics_dir`` -> (per_gene, fold summaries, pooled) tables,
    each with the run columns ``encoder``, ``seed`` and ``run`` (see :func:`run_of`)."""
    metrics_dir = Path(metrics_dir)
    summaries = sorted(metrics_dir.rglob("*.summary.tsv"))
    if not summaries:
        raise StevsInputError(metrics_dir, "no {run}/{fold}.summary.tsv files found")
    per_gene, folds, pooled = [], [], []
    for summary_file in summaries:
        table_file = summary_file.with_name(summary_file.name.replace(".summary.tsv", ".tsv"))
        if not table_file.exists():
            raise StevsInputError(table_file, "per-gene table missing beside its summary")
        run = run_of(summary_file.parent.relative_to(metrics_dir), summary_file)
        try:
            folds.append(pd.read_csv(summary_file, sep="\t").assign(**run))
            per_gene.append(pd.read_csv(table_file, sep="\t").assign(**run))
            if pooled_path(table_file).exists():
                pooled.append(pd.read_csv(pooled_path(table_file), sep="\t").assign(**run))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise StevsInputError(summary_file, f"unreadable metrics table: {err}") from None
    per_gene_df = pd.concat(per_gene, ignore_index=True)
    missing = set(PER_GENE_COLUMNS) - set(per_gene_df.columns)
    if missing:
        raise StevsInputError(metrics_dir, f"per-gene tables lack columns {sorted(missing)}")
    folds_df = pd.concat(folds, ignore_index=True).sort_values(["encoder", "method", "seed",
                                                                "fold"])  # fmt: skip
    folds_df["method"] = folds_df["method"].astype(str)
    folds_df["fold"] = folds_df["fold"].astype(str)
    per_gene_df["method"] = per_gene_df["method"].astype(str)
    per_gene_df["fold"] = per_gene_df["fold"].astype(str)
    per_gene_df["slide"] = per_gene_df["slide"].astype(str)
    pooled_df = pd.concat(pooled, ignore_index=True) if pooled else pd.DataFrame()
    return per_gene_df, folds_df.reset_index(drop=True), pooled_df


def _with_runs(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the run columns (a bare per-method table: no encoder, seed 0)."""
    defaults = {"encoder": "", "seed": 0}
    table = table.assign(**{k: v for k, v in defaults.items() if k not in table})
    return table if "run" in table else table.assign(run=table["method"])


def seed_sd(folds: pd.DataFrame, metric: str = "pearson_r_mean_headline") -> float:
    """The sd over seeds of a method's mean-over-folds ``metric`` (NaN with one seed)."""
    per_seed = folds.groupby("seed")[metric].mean()
    return float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan")


def summarise_methods(folds: pd.DataFrame) -> pd.DataFrame:
    """Fold summaries -> one row per (encoder, method): ``n_folds``, ``n_seeds``,
    ``{metric}_mean``/``_std`` and ``pearson_r_mean_headline_seed_sd``.

    Per fold the seeds are averaged first; ``_std`` is then the sample std across folds
    (NaN with a single fold), ``_seed_sd`` the sd over seeds of the mean over folds. A fold
    with NaN for a metric (e.g. no predictive std, so no coverage) is left out of that
    metric only.
    """
    folds = _with_runs(folds)
    rows = []
    for (encoder, method), group in folds.groupby(["encoder", "method"], sort=True):
        per_fold = group.groupby("fold").mean(numeric_only=True)
        row: dict[str, Any] = {
            "encoder": encoder, "method": method, "n_folds": len(per_fold),
            "n_seeds": int(group["seed"].nunique()),
        }  # fmt: skip
        for metric in TABLE_METRICS:
            values = per_fold[metric].astype(float).dropna() if metric in per_fold else pd.Series()
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        row["pearson_r_mean_headline_seed_sd"] = seed_sd(group)
        row["n_constant_total"] = int(group["n_constant"].sum()) if "n_constant" in group else 0
        rows.append(row)
    return pd.DataFrame(rows)


#: the baselines STevs is compared with: on its own encoder, and the encoder-free floor
BASELINES = ("stnet", "ridge_embed", "ridge_color")
#: encoder of the encoder-free methods in the workflow's layout
NO_ENCODER = "none"


def compare_to_baselines(
    per_gene: pd.DataFrame, folds: pd.DataFrame, method: str = "stevs"
) -> pd.DataFrame:
    """``method`` on each encoder E against the best baseline on E (``stnet``,
    ``ridge_embed`` on E, or the encoder-free ``ridge_color``), by mean headline r.

    Paired test: ``scipy.stats.wilcoxon`` over (fold, test slide, headline gene) pairs of
    per-gene Pearson r, each averaged over seeds first; and a sign count over folds
    (seed-averaged headline r). The difference of the means is a ``tie`` when it is not
    larger than the seed sd (the larger of the two methods'), else ``ahead`` / ``behind``;
    with one seed there is no seed sd and the verdict says so.
    """
    from scipy.stats import wilcoxon

    folds, per_gene = _with_runs(folds), _with_runs(per_gene)
    summary = summarise_methods(folds).set_index(["encoder", "method"])
    headline = per_gene[per_gene["headline"].astype(bool)]
    r = headline.groupby(["encoder", "method", "fold", "slide", "gene"])["pearson_r"].mean()
    fold_r = folds.groupby(["encoder", "method", "fold"])["pearson_r_mean_headline"].mean()
    rows = []
    for encoder in sorted({e for e, m in summary.index if m == method}):
        candidates = [
            (e, b) for b in BASELINES for e in (encoder, NO_ENCODER, "")
            if (e, b) in summary.index and (b == "ridge_color" or e == encoder)
        ]  # fmt: skip
        if not candidates:
            continue
        mean = summary["pearson_r_mean_headline_mean"]
        best = max(candidates, key=lambda key: mean[key])
        diff = float(mean[(encoder, method)] - mean[best])
        pairs = pd.concat([r[(encoder, method)], r[best]], axis=1, join="inner").dropna()
        delta = pairs.iloc[:, 0] - pairs.iloc[:, 1]
        p_value = float(wilcoxon(delta).pvalue) if (delta != 0).any() else float("nan")
        per_fold = pd.concat([fold_r[(encoder, method)], fold_r[best]], axis=1, join="inner")
        sds = summary.loc[[(encoder, method), best], "pearson_r_mean_headline_seed_sd"]
        noise = float(sds.max()) if sds.notna().any() else float("nan")
        rows.append({
            "encoder": encoder, "method": method, "baseline": best[1],
            "baseline_encoder": best[0], "headline_r": float(mean[(encoder, method)]),
            "baseline_headline_r": float(mean[best]), "difference": diff,
            "seed_sd": float(noise), "folds_ahead": int((per_fold.iloc[:, 0]
                                                         > per_fold.iloc[:, 1]).sum()),
            "n_folds": len(per_fold), "n_pairs": len(delta), "wilcoxon_p": p_value,
            "verdict": _verdict(diff, float(noise)),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _verdict(difference: float, noise: float) -> str:
    """``ahead`` / ``behind`` beyond the seed sd, else ``tie``; one seed: no sd to judge."""
    if not np.isfinite(noise):
        return ("ahead" if difference > 0 else "behind") + " (one seed: no seed sd)"
    if abs(difference) <= noise:
        return "tie (inside the seed sd)"
    return "ahead" if difference > 0 else "behind"


# --------------------------------------------------------------------------- figures


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


# --------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    versions = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit(cwd: str | os.PathLike = ".") -> str:
    """``<sha>`` (plus `` (uncommitted changes)``) of the git checkout at ``cwd``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"{sha} (uncommitted changes)" if dirty else sha


def describe_fold(data: dict[str, Any]) -> str:
    """One fold file in words: scheme, seed, slides, how validation was chosen, the panel."""
    name = data.get("fold", "?")
    scheme = data.get("scheme", "unknown scheme")
    parts = [
        f"<b>{html.escape(str(name))}</b>: {html.escape(str(scheme))}, seed {data.get('seed')}"
    ]

    def slides(key: str) -> str:
        ids = [str(s) for s in data.get(key, [])]
        return f"{len(ids)} ({html.escape(', '.join(ids[:8]))}{', ...' if len(ids) > 8 else ''})"

    parts.append(
        f"train slides {slides('train')}; validation {slides('val')}; test {slides('test')}"
    )
    if data.get("spots"):
        counts = {k: sum(len(v) for v in d.values()) for k, d in data["spots"].items()}
        parts.append(
            "within-slice: spots split into spatial blocks, "
            + ", ".join(f"{k} {v} spots" for k, v in counts.items())
        )
    validation = data.get("validation")
    has_val = bool(data.get("val") or (data.get("spots") or {}).get("val"))
    if not has_val:
        parts.append("no validation set")
    elif validation in VALIDATION_WORDS:
        parts.append(VALIDATION_WORDS[validation])
    else:
        parts.append("validation carved out of the training data, never the test fold")
    if data.get("shared_patients"):
        shared = ", ".join(map(str, data["shared_patients"]))
        parts.append(f"<b>test patients also seen in training: {html.escape(shared)}</b>")
    panel = data.get("panel") or {}
    genes = data.get("genes", [])
    headline = data.get("headline_genes", [])
    panel_words = f"panel of {len(genes)} genes"
    if panel.get("method"):
        panel_words += f" ({html.escape(str(panel['method']))})"
    dropped = panel.get("dropped")
    if isinstance(dropped, dict) and any(dropped.values()):
        panel_words += ", dropped: " + html.escape(
            ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
        )
    parts.append(
        f"{panel_words}, chosen on training spots only; {len(headline)} headline genes "
        "(the most variable training genes)"
    )
    norm = data.get("normalisation") or {}
    parts.append(
        f"targets normalised {html.escape(str(norm.get('method', 'log1p_cp10k')))}"
        f" (target sum {norm.get('target_sum', 1e4):g})"
    )
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------- HTML


def _fmt(value: float, std: float | None = None) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    text = f"{value:.3f}"
    if std is not None and np.isfinite(std):
        text += f" ± {std:.3f}"
    return text


def hest_bench_html(folds: pd.DataFrame) -> str:
    """The HEST-Benchmark protocol section ("" unless some fold was evaluated with it)."""
    if "protocol" not in folds or not (folds["protocol"] == "hest_bench").any():
        return ""
    rows = []
    for method, group in folds[folds["protocol"] == "hest_bench"].groupby("method"):
        values = group["hest_bench_pearson_r"].astype(float).dropna()
        std = float(values.std(ddof=0)) if len(values) > 1 else None
        cell = _fmt(float(values.mean()) if len(values) else float("nan"), std)
        rows.append(f"<tr><td>{html.escape(method)}</td><td>{len(group)}</td><td>{cell}</td></tr>")
    return (
        "<h2>HEST-Benchmark protocol</h2><p>"
        + html.escape(HEST_BENCH_METRICS["hest_bench_pearson_r"])
        + "; mean &plusmn; std over splits (folds), as HEST-Benchmark reports. Comparable with"
        " its leaderboard only on the same samples, splits and gene list.</p>"
        "<table id=hest_bench><tr><th>method</th><th>splits</th>"
        "<th>hest_bench_pearson_r</th></tr>" + "".join(rows) + "</table>"
    )


def summary_table_html(summary: pd.DataFrame) -> str:
    """The method-by-metric table; each cell carries its exact numbers as data attributes."""
    head = "".join(
        f'<th class="{"optimistic" if "optimistic" in m else ""}">{html.escape(m)}</th>'
        for m in TABLE_METRICS
    )
    rows = []
    for _, row in summary.iterrows():
        cells = []
        for metric in TABLE_METRICS:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            column = summary[f"{metric}_mean"].astype(float)
            if metric == "coverage90_mean":  # calibration: closest to the nominal 0.90
                distance = (column - 0.90).abs()
                best = len(summary) > 1 and np.isfinite(mean) and abs(mean - 0.9) == distance.min()
            else:
                best_value = column.min() if metric in LOWER_IS_BETTER else column.max()
                best = len(summary) > 1 and np.isfinite(mean) and mean == best_value
            cells.append(
                f'<td data-metric="{metric}" data-mean="{mean!r}" data-std="{std!r}"'
                f"{' class=best' if best else ''}>{_fmt(mean, std)}</td>"
            )
        encoder = str(row.get("encoder", "") or "")
        seeds = int(row.get("n_seeds", 1) or 1)
        rows.append(
            f'<tr data-method="{html.escape(str(row["method"]))}"'
            f' data-encoder="{html.escape(encoder)}"><td>'
            f"{html.escape(str(row['method']))}</td><td>{html.escape(encoder or '–')}</td>"
            f"<td>{int(row['n_folds'])}</td><td>{seeds}</td>"
            f"{''.join(cells)}<td>{int(row['n_constant_total'])}</td></tr>"
        )
    return (
        '<table id="summary"><thead><tr><th>method</th><th>encoder</th><th>folds</th>'
        f"<th>seeds</th>{head}<th>constant gene x slide pairs</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


#: the protocol that makes the comparison fair, as the report states it
PROTOCOL_HTML = """
<p><b>Protocol.</b> Every method is fitted on the same spots: the training and validation
slides of the fold. The ridge baselines fit on both (their penalty chosen by an inner
cross-validation grouped by slide). The deep methods first train on the training slides
with early stopping on the validation slides' headline r (the same metric as below), which
picks the best epoch E; with <code>training.refit</code> (the workflow's default) they are
then retrained from scratch, with the same seed, on training + validation spots for exactly
E epochs, the learning-rate schedule laid out as in the selection run and cut after epoch
E, and that model is the fold's (its <code>config.json</code> records
<code>refit_epochs</code>; <code>metrics.csv</code> keeps the selection run's validation
curve). Methods are compared on the same image encoder (the <em>encoder</em> column; a
frozen encoder's embeddings are computed once per slide and shared by every method on it;
<code>ridge_color</code> uses no encoder). Deep methods run once per training seed and their
numbers are averaged over seeds per fold; the ridge baselines are deterministic and run
once.</p>
"""
#: how the comparison table is computed, in words
COMPARISON_WORDS = (
    "For each encoder: STevs against the best (by mean headline r) of the ST-Net head and "
    "the ridge probe on the same encoder and the encoder-free colour/texture ridge. "
    "<code>wilcoxon_p</code>: scipy.stats.wilcoxon (two-sided) over (fold, test slide, "
    "headline gene) pairs of per-gene Pearson r, each averaged over seeds; "
    "<code>folds_ahead</code>: folds where STevs's seed-averaged headline r is higher. A "
    "difference of means not larger than the seed sd (the larger of the two methods') is a "
    "tie, whatever the test says."
)


def _frame_html(table: pd.DataFrame, table_id: str) -> str:
    return table.to_html(index=False, float_format=lambda v: f"{v:.3f}", table_id=table_id,
                         border=0, na_rep="–")  # fmt: skip


def how_to_read(folds: dict[str, dict[str, Any]]) -> str:
    """The "how to read this" paragraph and the definition of every metric."""
    panel_sizes = sorted({len(d.get("genes", [])) for d in folds.values()})
    headline_sizes = sorted({len(d.get("headline_genes", [])) for d in folds.values()})
    panel = (
        f"the fold's gene panel ({'/'.join(map(str, panel_sizes))} genes, chosen on training "
        "slides only)"
        if panel_sizes
        else "the fold's gene panel"
    )
    definitions = "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
        for k, v in SUMMARY_METRICS.items()
        if k in TABLE_METRICS
    )
    return f"""
<p>Every number is computed on held-out test data (slides never seen in training; for
within-slice folds, spatially blocked test spots), on {panel}, with
expression normalised as in the fold file (log1p of counts per 10,000 unless stated).
<b>Headline: <code>pearson_r_mean_headline</code></b>, the Pearson r between observed and
predicted expression over the spots of each test slide, averaged per gene over the fold's
test slides and then over the headline genes (the
{"/".join(map(str, headline_sizes)) or "50"} most variable training genes, fixed before
testing). Each cell is the mean &plusmn; sample standard deviation across folds. Per-slide
r and r <code>pooled</code> over all spots of a fold's test slides are different numbers and
are shown in separate columns; pooled r also rewards getting slide-level shifts right.
<span class="optimistic"><code>pearson_r_top50_optimistic</code> picks the 50 best genes
after seeing the test data, as some papers do: it is optimistic by construction and not a
fair comparison number (with 50 or fewer panel genes it equals the mean over all).</span>
Genes constant in a test slide have no r: they are left out of the means and counted in
the last column. MSE and MAE are in normalised units
(lower is better); <code>coverage90_mean</code> should be close to 0.90 for methods that
give a predictive standard deviation.</p>
<dl>{definitions}</dl>
"""


def build_report(
    metrics_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    predictions_dir: str | os.PathLike | None = None,
    folds_dir: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    config_path: str | os.PathLike | None = None,
    max_map_slides: int = 4,
) -> Path:
    """Write the TSV tables and ``index.html`` into ``out_dir``; returns the HTML path."""
    out_dir = Path(out_dir)
    per_gene, folds, pooled = collect_metrics(metrics_dir)
    summary = summarise_methods(folds)
    comparison = compare_to_baselines(per_gene, folds)
    # maps and curves show one run (the lowest seed) of each encoder x method
    first = folds.sort_values("seed").drop_duplicates(["encoder", "method"])
    methods = first.sort_values(["encoder", "method"])["run"].tolist()
    lead = summary.sort_values("pearson_r_mean_headline_mean", ascending=False, na_position="last")
    lead_key = (lead["encoder"].iloc[0], lead["method"].iloc[0])
    lead_method = str(first.set_index(["encoder", "method"]).loc[lead_key, "run"])
    runs_per_gene = per_gene.assign(method=per_gene["run"])

    fold_files: dict[str, Path] = {}
    fold_data: dict[str, dict[str, Any]] = {}
    if folds_dir is not None:
        for path in sorted(Path(folds_dir).glob("*.json")):
            data = read_fold(path).to_dict()
            name = str(data["fold"])
            fold_files[name], fold_data[name] = path, data

    sections = [f"<h2>How to read this</h2>{how_to_read(fold_data)}{PROTOCOL_HTML}"]
    sections.append(
        "<h2>Methods by metric</h2>"
        "<p>Grouped by image encoder. Per fold the training seeds are averaged; each cell is"
        " the mean &plusmn; std across folds (also in <code>summary.tsv</code>, with the sd"
        " over seeds); the best value of each column is in bold (for coverage: closest to"
        " 0.90).</p>"
        + summary_table_html(summary)
    )
    if not comparison.empty:
        sections.append(
            "<h2>STevs against the best baseline on the same encoder</h2><p>"
            f"{COMPARISON_WORDS}</p>" + _frame_html(comparison, "comparison")
        )
    hest = hest_bench_html(folds)
    if hest:
        sections.append(hest)
    bars = bar_charts(summary)
    sections.append(
        "<h2>Metrics per method</h2><div class=figs>"
        + "".join(f'<img alt="{m}" src="data:image/png;base64,{b}">' for m, b in bars.items())
        + "</div>"
    )
    distribution = gene_r_distribution(per_gene)
    if distribution:
        sections.append(
            "<h2>Per-gene Pearson r</h2><p>Each point is one gene on one test slide (constant "
            f'genes left out).</p><img alt="per-gene r" src="data:image/png;base64,{distribution}">'
        )
    fold_columns = ["encoder", "method", "seed", "fold",
                    *[m for m in SUMMARY_METRICS if m in folds.columns]]  # fmt: skip
    sections.append(
        "<h2>Per fold</h2><p>Also in <code>folds.tsv</code>.</p>"
        + _frame_html(folds[fold_columns], "folds")
    )
    if predictions_dir is not None:
        maps, notes = spatial_maps(
            runs_per_gene, Path(predictions_dir), fold_files, methods, lead_method=lead_method,
            max_slides=max_map_slides,
        )  # fmt: skip
        body = "".join(
            f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' "
            f"src='data:image/png;base64,{png}'>"
            for caption, png in maps
        )
        note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        sections.append(
            "<h2>Spatial maps</h2><p>Observed and predicted expression of the genes that "
            f"<b>{html.escape(lead_method)}</b> (best headline r) predicts best on each test "
            "slide; colour scales run from the 1st to the 99th percentile of each map.</p>"
            + (body or "<p>No maps could be drawn.</p>")
            + (f"<ul class=note>{note_html}</ul>" if note_html else "")
        )
    if models_dir is not None:
        curves = training_curves(Path(models_dir), methods)
        if curves:
            sections.append(
                "<h2>Training curves</h2>"
                + "".join(
                    f"<h3>{html.escape(m)}</h3><img alt='{html.escape(m)} training' "
                    f"src='data:image/png;base64,{png}'>"
                    for m, png in curves.items()
                )
            )
    sections.append(provenance_html(fold_data, config_path))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_tsv_atomic(summary, out_dir / "summary.tsv")
    write_tsv_atomic(folds[fold_columns], out_dir / "folds.tsv")
    write_tsv_atomic(per_gene, out_dir / "per_gene.tsv")
    write_tsv_atomic(comparison, out_dir / "comparison.tsv")
    if not pooled.empty:
        write_tsv_atomic(pooled, out_dir / "pooled.tsv")
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>STevs report</title><style>{CSS}</style></head><body>"
        f"<h1>STevs: spatial expression from H&amp;E, held-out results</h1>"
        f"<p>{len(summary)} method x encoder rows, {folds['fold'].nunique()} folds, "
        f"{folds['seed'].nunique()} training seed(s); generated {generated}.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
    return atomic_write_text(out_dir / "index.html", page)


def provenance_html(
    fold_data: dict[str, dict[str, Any]], config_path: str | os.PathLike | None
) -> str:
    """Versions, git commit, seeds, fold protocol in words and the config file verbatim.

    ``config_path`` is the config the run used: in the workflow, ``{results}/config.yaml``,
    the merged config Snakemake ran with (every ``--configfile``, ``--config`` overrides and
    the schema's defaults). Its seeds are every key named ``seed`` at any depth
    (``training.seed``, ``folds.seed``, ``demo.seed``).
    """
    versions = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
        for k, v in package_versions().items()
    )
    seeds = sorted({str(d.get("seed")) for d in fold_data.values()})
    config_text, config_seeds, config_name = "(no config file given)", "n/a", ""
    if config_path is not None:
        path = Path(config_path)
        if not path.exists():
            raise StevsInputError(path, "config file not found")
        config_text = path.read_text()
        try:
            import yaml

            parsed = yaml.safe_load(config_text)
        except Exception as err:  # yaml errors: the report shows the text anyway
            log.warning("%s: config not parsed (%s)", path, err)
            parsed = None
        found = _config_seeds(parsed)
        config_seeds = ", ".join(f"{k} {v}" for k, v in found) if found else "none set"
        config_name = html.escape(str(path))
    protocol = "".join(f"<li>{describe_fold(d)}</li>" for d in fold_data.values())
    return (
        "<h2>Provenance</h2><table id='versions'><tr><th>package</th><th>version</th></tr>"
        f"{versions}</table>"
        f"<p>git commit: <code>{html.escape(git_commit())}</code> (working directory); "
        f"stevs source: <code>{html.escape(git_commit(Path(__file__).resolve().parent))}</code><br>"
        f"seeds (config): <code>{html.escape(config_seeds)}</code>; fold seeds: "
        f"<code>{html.escape(', '.join(seeds) or 'n/a')}</code></p>"
        "<h3>Fold protocol</h3>"
        + (f"<ul>{protocol}</ul>" if protocol else "<p>No fold files given.</p>")
        + "<h3>Config</h3>"
        + (
            f"<p>The config this run used (<code>{config_name}</code>):</p>"
            if config_path is not None
            else ""
        )
        + f"<pre id='config'>{html.escape(config_text)}</pre>"
    )


def _config_seeds(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every ``seed`` (or ``seeds`` list) key of a parsed config, at any depth, as (dotted
    key, value)."""
    if not isinstance(config, dict):
        return []
    found: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key == "seed" and not isinstance(value, dict | list):
            found.append((name, value))
        elif key == "seeds" and isinstance(value, list):
            found.append((name, ",".join(map(str, value))))
        elif isinstance(value, dict):
            found += _config_seeds(value, f"{name}.")
    return found


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs report``."""
    parser.add_argument("--metrics", required=True, help="folder of {method}/{fold}.tsv tables")
    parser.add_argument("--predictions", help="folder of {method}/{fold}/{slide}.h5ad (maps)")
    parser.add_argument("--folds", help="folder of {fold}.json fold files (protocol, maps)")
    parser.add_argument("--models", help="folder of {method}/{fold}/metrics.csv (curves)")
    parser.add_argument(
        "--config",
        help="the config the run used (the workflow passes {results}/config.yaml, the merged "
        "config), copied into the report",
    )
    parser.add_argument("--out", required=True, help="report folder (index.html + TSVs)")
    parser.add_argument("--max-map-slides", type=int, default=4, help="test slides with maps")


def run(args: argparse.Namespace) -> int:
    """``stevs report``: build the report folder."""
    index = build_report(
        args.metrics,
        args.out,
        predictions_dir=args.predictions,
        folds_dir=args.folds,
        models_dir=args.models,
        config_path=args.config,
        max_map_slides=args.max_map_slides,
    )
    log.info("report written to %s", index)
    return 0
