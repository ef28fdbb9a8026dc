"""The report page: ``index.html``, one self-contained file (figures inlined as base64 PNG),
and the TSV tables beside it (see :mod:`stevs.report` for what each holds)."""

from __future__ import annotations

import datetime as dt
import html
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stevs.atomic import atomic_write_text, check_replaceable
from stevs.io.fold_file import read_fold
from stevs.methods import baselines
from stevs.metrics import HEST_BENCH_METRICS, SUMMARY_METRICS, is_stevs_table, write_tsv_atomic
from stevs.report.figures import bar_charts, gene_r_distribution, spatial_maps, training_curves
from stevs.report.latent import latent_section
from stevs.report.provenance import provenance_html
from stevs.report.tables import (
    LOWER_IS_BETTER,
    MIN_TEST_SLIDES,
    TABLE_METRICS,
    TOO_FEW_SLIDES,
    check_complete,
    collect_metrics,
    compare_to_baselines,
    leaderboard,
    summarise_methods,
    verdict_line,
)

log = logging.getLogger(__name__)

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
#verdict { background: #eef3fb; border-left: 4px solid #4c72b0; padding: .3em 1em; }
#verdict p { margin: .4em 0; }
tr.group th { text-align: left; background: #dde6f3; }
#leaderboard td { text-align: left; }
#leaderboard td.num { text-align: right; }
#leaderboard th { text-align: left; }
td.verdict { white-space: nowrap; }
.maps img { max-width: 100%; }
"""


def _group_name(encoder: str) -> str:
    """An encoder group's heading."""
    if encoder in ("", "none"):
        return "no image encoder"
    return f"encoder <code>{html.escape(encoder)}</code>"


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
    width, previous = len(TABLE_METRICS) + 5, None
    summary = summary.assign(_group=summary["encoder"].fillna("").astype(str))
    for index, (_, row) in enumerate(summary.sort_values(["_group", "method"]).iterrows()):
        group = row["_group"]
        if index == 0 or group != previous:
            rows.append(f"<tr class=group><th colspan={width}>{_group_name(group)}</th></tr>")
        previous = group
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
    "For each encoder: STevs against the best (by mean headline r) of the baselines "
    f"({', '.join(baselines())}) on the same encoder, an encoder-free one on any. The test's "
    "unit is the held-out slide (the genes of one slide are not independent samples): per "
    "test slide, STevs's headline r minus the baseline's, seeds averaged first; "
    "<code>slide_wilcoxon_p</code>: scipy.stats.wilcoxon (two-sided signed-rank) over those "
    f"differences, only with at least {MIN_TEST_SLIDES} slides (with 5 the smallest "
    "possible p is 0.0625); with fewer, <code>slide_test</code> says "
    f'"{TOO_FEW_SLIDES}". <code>slides_ahead</code> / <code>folds_ahead</code>: slides / '
    "folds where STevs's seed-averaged headline r is higher. A difference of means not "
    "larger than the seed sd (the larger of the two methods') is a tie, whatever the test "
    "says."
)


#: the comparison table's columns, verdict and test first so that they stay on screen
COMPARISON_COLUMNS = [
    "encoder", "method", "baseline", "difference", "verdict", "slide_wilcoxon_p", "slide_test",
    "slides_ahead",
    "n_slides", "headline_r", "baseline_headline_r", "seed_sd", "folds_ahead", "n_folds",
    "baseline_encoder",
]  # fmt: skip


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


def partial_section(notes: list[str]) -> list[str]:
    """The warning that opens a partial comparison (``stevs report --allow-partial``)."""
    if not notes:
        return []
    for note in notes:
        log.warning("partial comparison: %s", note)
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return [
        "<h2>PARTIAL comparison</h2><p>These runs are not scored on the same data, so their "
        f"means are not comparable:</p><ul>{items}</ul>"
    ]


#: the tables of a report folder (beside ``index.html``)
REPORT_TABLES = ("summary.tsv", "folds.tsv", "per_gene.tsv", "comparison.tsv", "pooled.tsv")
#: how ``index.html`` of a report starts (how a rerun recognises the page it may replace)
PAGE_TITLE = "<title>STevs report</title>"


def is_report_page(path: Path) -> bool:
    """True for an ``index.html`` this module wrote."""
    try:
        with open(path, "rb") as handle:
            return PAGE_TITLE.encode() in handle.read(4096)
    except OSError:
        return False


def check_report_outputs(out_dir: Path) -> None:
    """Before any work: files in ``out_dir`` at the report's names must be a report's."""
    targets = {out_dir / name: is_stevs_table for name in REPORT_TABLES}
    check_replaceable({**targets, out_dir / "index.html": is_report_page})


def build_report(
    metrics_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    predictions_dir: str | os.PathLike | None = None,
    folds_dir: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    config_path: str | os.PathLike | None = None,
    max_map_slides: int = 4,
    allow_partial: bool = False,
    only: Sequence[str | os.PathLike] | None = None,
) -> Path:
    """Write the TSV tables and ``index.html`` into ``out_dir``; returns the HTML path.
    Runs scored on other folds or on part of the test spots are an error unless
    ``allow_partial`` (then the page lists them at the top). ``only``: read just these
    per-gene tables under ``metrics_dir`` (see :func:`collect_metrics`)."""
    out_dir = Path(out_dir)
    check_report_outputs(out_dir)
    per_gene, folds, pooled = collect_metrics(metrics_dir, only)
    partial = check_complete(folds, metrics_dir, allow_partial)
    summary = summarise_methods(folds)
    comparison = compare_to_baselines(per_gene, folds)
    runs, lead_run = shown_runs(folds, summary)
    fold_files, fold_data = read_fold_files(folds_dir)
    fold_columns = ["encoder", "method", "seed", "fold",
                    *[m for m in SUMMARY_METRICS if m in folds.columns]]  # fmt: skip

    board = leaderboard(per_gene, folds)
    sections = [
        first_screen(board),
        *partial_section(partial),
        *table_sections(summary, comparison, folds),
        *figure_sections(summary, per_gene),
        "<h2>Per fold</h2><p>Also in <code>folds.tsv</code>.</p>"
        + _frame_html(folds[fold_columns], "folds"),
    ]
    if predictions_dir is not None:
        runs_per_gene = per_gene.assign(method=per_gene["run"])
        maps, notes = spatial_maps(
            runs_per_gene, Path(predictions_dir), fold_files, runs, lead_method=lead_run,
            max_slides=max_map_slides,
        )  # fmt: skip
        sections.append(maps_section(maps, notes, lead_run))
    if models_dir is not None:
        sections.append(curves_section(training_curves(Path(models_dir), runs)))
        sections.append(latent_section(models_dir))
    sections.append(f"<h2 id=how>How to read this</h2>{how_to_read(fold_data)}{PROTOCOL_HTML}")
    sections.append(provenance_html(fold_data, config_path))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_tsv_atomic(summary, out_dir / "summary.tsv")
    write_tsv_atomic(folds[fold_columns], out_dir / "folds.tsv")
    write_tsv_atomic(per_gene, out_dir / "per_gene.tsv")
    write_tsv_atomic(comparison, out_dir / "comparison.tsv")
    if not pooled.empty:
        write_tsv_atomic(pooled, out_dir / "pooled.tsv")
    page = page_html(summary, folds, sections)
    return atomic_write_text(out_dir / "index.html", page, replaces=is_report_page)


def first_screen(board: pd.DataFrame) -> str:
    """What the page opens with: one verdict line per encoder (:func:`verdict_line`) and the
    leaderboard grouped by encoder, each method against its group's leader."""
    lines = "".join(
        f"<p class=verdict>{html.escape(verdict_line(group, rows))}</p>"
        for group, rows in board.groupby("group", sort=True)
    )
    rows = []
    for group, table in board.groupby("group", sort=True):
        rows.append(f"<tr class=group><th colspan=8>{_group_name(group)}</th></tr>")
        rows += [_board_row(row, str(group)) for row in table.itertuples()]
    return (
        f"<section id=verdict>{lines}</section>"
        '<table id="leaderboard"><thead><tr><th>method</th><th>headline r (folds)</th>'
        "<th>seeds</th><th>compared with</th><th>difference</th><th>slides ahead</th>"
        "<th>p (slides)</th><th>verdict</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        "<p>Headline r: per-slide Pearson r on the held-out slides, averaged over the "
        "headline genes, mean &plusmn; sd across folds. p: two-sided Wilcoxon signed-rank "
        f"test over the held-out slides (needs at least {MIN_TEST_SLIDES}); verdict: a "
        "difference not larger than the seed sd is a tie. How every number is made: "
        "<a href='#how'>How to read this</a>.</p>"
    )


def _board_row(row: Any, group: str) -> str:
    """One method's row of the first screen's table (a :func:`leaderboard` row)."""
    free = " (no encoder)" if row.encoder in ("", "none") and group not in ("", "none") else ""
    cells = (
        f'<tr data-method="{html.escape(row.method)}" data-encoder="{html.escape(row.encoder)}">'
        f"<td>{row.rank}. {html.escape(row.method)}{free}</td>"
        f"<td class=num>{_fmt(row.headline_r, row.headline_r_std)}</td>"
        f"<td class=num>{row.n_seeds}</td>"
    )
    if not row.against:
        return f"{cells}<td colspan=5>only method</td></tr>"
    if row.n_slides < MIN_TEST_SLIDES:
        p_text = TOO_FEW_SLIDES
    else:  # NaN: every slide tied
        p_text = f"{row.slide_wilcoxon_p:.2g}" if np.isfinite(row.slide_wilcoxon_p) else "–"
    versus = "runner-up" if row.rank == 1 else "leader"
    return (
        f"{cells}<td>{versus} {html.escape(row.against)}</td>"
        f"<td class=num>{row.difference:+.3f}</td>"
        f"<td class=num>{row.slides_ahead} / {row.n_slides}</td>"
        f"<td>{p_text}</td><td class=verdict>{html.escape(row.verdict)}</td></tr>"
    )


def shown_runs(folds: pd.DataFrame, summary: pd.DataFrame) -> tuple[list[str], str]:
    """The runs the maps and curves show: one (the lowest seed) of each encoder x method,
    sorted; and that run of the best (encoder, method) by mean headline r."""
    first = folds.sort_values("seed").drop_duplicates(["encoder", "method"])
    runs = first.sort_values(["encoder", "method"])["run"].tolist()
    lead = summary.sort_values("pearson_r_mean_headline_mean", ascending=False, na_position="last")
    lead_key = (lead["encoder"].iloc[0], lead["method"].iloc[0])
    return runs, str(first.set_index(["encoder", "method"]).loc[lead_key, "run"])


def read_fold_files(
    folds_dir: str | os.PathLike | None,
) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Fold name -> its ``{fold}.json`` in ``folds_dir``, and -> its contents (both empty
    without a folder)."""
    fold_files: dict[str, Path] = {}
    fold_data: dict[str, dict[str, Any]] = {}
    if folds_dir is not None:
        for path in sorted(Path(folds_dir).glob("*.json")):
            data = read_fold(path).to_dict()
            name = str(data["fold"])
            fold_files[name], fold_data[name] = path, data
    return fold_files, fold_data


def table_sections(
    summary: pd.DataFrame, comparison: pd.DataFrame, folds: pd.DataFrame
) -> list[str]:
    """The method-by-metric table, the comparison with the baselines (when there is one)
    and the HEST-Benchmark section (when a fold used its protocol)."""
    sections = [
        "<h2>Methods by metric</h2>"
        "<p>Grouped by image encoder. Per fold the training seeds are averaged; each cell is"
        " the mean &plusmn; std across folds (also in <code>summary.tsv</code>, with the sd"
        " over seeds); the best value of each column is in bold (for coverage: closest to"
        " 0.90).</p>" + summary_table_html(summary)
    ]
    if not comparison.empty:
        sections.append(
            "<h2>STevs against the best baseline on the same encoder</h2><p>"
            f"{COMPARISON_WORDS}</p>" + _frame_html(comparison[COMPARISON_COLUMNS], "comparison")
        )
    hest = hest_bench_html(folds)
    if hest:
        sections.append(hest)
    return sections


def figure_sections(summary: pd.DataFrame, per_gene: pd.DataFrame) -> list[str]:
    """The bar charts of every table metric and the per-gene r distribution, one bar and
    one box per (encoder, method)."""
    bars = bar_charts(summary)
    sections = [
        "<h2>Metrics per encoder and method</h2><div class=figs>"
        + "".join(f'<img alt="{m}" src="data:image/png;base64,{b}">' for m, b in bars.items())
        + "</div>"
    ]
    distribution = gene_r_distribution(per_gene)
    if distribution:
        sections.append(
            "<h2>Per-gene Pearson r</h2><p>Each point is one gene on one test slide (constant "
            f'genes left out).</p><img alt="per-gene r" src="data:image/png;base64,{distribution}">'
        )
    return sections


def maps_section(maps: list[tuple[str, str]], notes: list[str], lead_run: str) -> str:
    """The spatial maps of :func:`stevs.report.figures.spatial_maps`, with its notes."""
    body = "".join(
        f"<h3>{html.escape(caption)}</h3><img class=map alt='{html.escape(caption)}' "
        f"src='data:image/png;base64,{png}'>"
        for caption, png in maps
    )
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        "<h2>Spatial maps</h2><p>Observed and predicted expression of the genes that "
        f"<b>{html.escape(lead_run)}</b> (best headline r) predicts best on each test "
        "slide, observed beside predicted; each gene (row) has one colour scale, from the 1st to "
        "the 99th percentile of all its maps, so that colours compare across the row.</p>"
        + (body or "<p>No maps could be drawn.</p>")
        + (f"<ul class=note>{note_html}</ul>" if note_html else "")
    )


def curves_section(curves: dict[str, str]) -> str:
    """The training curves per run ("" without any)."""
    if not curves:
        return ""
    return "<h2>Training curves</h2>" + "".join(
        f"<h3>{html.escape(m)}</h3><img alt='{html.escape(m)} training' "
        f"src='data:image/png;base64,{png}'>"
        for m, png in curves.items()
    )


def page_html(summary: pd.DataFrame, folds: pd.DataFrame, sections: list[str]) -> str:
    """The whole page: title, one line of counts and the generation time, the sections."""
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"{PAGE_TITLE}<style>{CSS}</style></head><body>"
        f"<h1>STevs: spatial expression from H&amp;E, held-out results</h1>"
        f"<p>{len(summary)} method x encoder rows, {folds['fold'].nunique()} folds, "
        f"{folds['seed'].nunique()} training seed(s); generated {generated}.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
