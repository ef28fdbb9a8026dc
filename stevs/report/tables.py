"""The report's tables: the evaluations read back, seeds averaged, STevs against the baselines.

:func:`collect_metrics` reads what ``stevs evaluate`` wrote; :func:`summarise_methods`
averages the seeds of each fold and summarises each (encoder, method) across folds;
:func:`compare_to_baselines` sets a method against the best baseline on its encoder, with a
test paired over held-out slides (:func:`paired_test`). Which methods are baselines, and
which of them run without an encoder, is the method registry's answer
(:mod:`stevs.methods`), never a list kept here.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stevs import methods
from stevs.errors import StevsInputError
from stevs.metrics import PER_GENE_COLUMNS, pooled_path, summary_path

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
    metrics_dir: str | os.PathLike, only: Sequence[str | os.PathLike] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """All evaluations under ``metrics_dir`` (or just the per-gene tables ``only``, each
    under it) -> (per_gene, fold summaries, pooled) tables, each with the run columns
    ``encoder``, ``seed`` and ``run`` (see :func:`run_of`)."""
    metrics_dir = Path(metrics_dir)
    summaries = (
        sorted(metrics_dir.rglob("*.summary.tsv"))
        if only is None
        else sorted({summary_path(_under(Path(path), metrics_dir)) for path in only})
    )
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


def _under(path: Path, folder: Path) -> Path:
    """``path`` (a per-gene table, or its summary / pooled table) checked to lie under
    ``folder`` and to exist, as the per-gene table's path under ``folder``."""
    for suffix in (".summary.tsv", ".pooled.tsv"):
        if path.name.endswith(suffix):
            path = path.with_name(path.name.removesuffix(suffix) + ".tsv")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise StevsInputError(path, f"a metrics table outside --metrics {folder}")
    if not path.is_file():
        raise StevsInputError(path, "metrics table not found")
    return folder / path.resolve().relative_to(folder.resolve())


def partial_runs(folds: pd.DataFrame) -> list[str]:
    """What makes the comparison of runs unequal, one line each: a run scored on fewer folds
    than the others of its protocol, a fold scored on part of its test spots."""
    folds = _with_runs(folds)
    protocol = folds["protocol"] if "protocol" in folds else pd.Series("stevs", folds.index)
    notes = []
    for name, group in folds.groupby(protocol.fillna("stevs"), sort=True):
        every = sorted(set(group["fold"]))
        for run, scored in group.groupby("run", sort=True)["fold"]:
            lacking = [f for f in every if f not in set(scored)]
            if lacking:
                notes.append(
                    f"{run}: not scored on {', '.join(lacking)} (protocol {name}: other runs "
                    f"cover {', '.join(every)})"
                )
    if "n_spots_missing" in folds:
        gaps = folds[folds["n_spots_missing"].fillna(0) > 0]
        notes += [
            f"{row.run} {row.fold}: {int(row.n_spots_missing)} test spot(s) not scored"
            for row in gaps.itertuples()
        ]
    return notes


def check_complete(folds: pd.DataFrame, metrics_dir: str | os.PathLike, allow: bool) -> list[str]:
    """:func:`partial_runs`, an error naming ``metrics_dir`` unless ``allow`` (then the
    notes, for the report to show)."""
    notes = partial_runs(folds)
    if notes and not allow:
        more = f" (and {len(notes) - 1} more)" if len(notes) > 1 else ""
        raise StevsInputError(
            metrics_dir,
            f"runs are not scored on the same data: {notes[0]}{more}; evaluate what is "
            "missing, or report with --allow-partial (a labelled partial comparison)",
        )
    return notes


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


#: encoder id of the encoder-free methods in the workflow's layout
NO_ENCODER = "none"


def baseline_candidates(
    encoder: str, available: Collection[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The (encoder, baseline) rows of ``available`` that a method on ``encoder`` is set
    against: each registry baseline (:func:`stevs.methods.baselines`, in registry order) on
    the same encoder and, for one that needs no encoder, also its run under the encoder id
    ``none`` (or a bare run without one). Unknown method names are never baselines."""
    candidates = []
    for name in methods.baselines():
        encoder_free = methods.REGISTRY[name].encoder == "none"
        encoders = dict.fromkeys((encoder, NO_ENCODER, "") if encoder_free else (encoder,))
        candidates += [(e, name) for e in encoders if (e, name) in available]
    return candidates


def slide_headline_r(per_gene: pd.DataFrame) -> pd.Series:
    """Per (encoder, method, slide): the held-out slide's headline r (per-gene Pearson r
    averaged over the headline genes), averaged over seeds first, then over the folds that
    test the slide (a slide split into spot blocks is one slide, not one per fold)."""
    per_gene = _with_runs(per_gene)
    headline = per_gene[per_gene["headline"].astype(bool)]
    per_run = headline.groupby(["encoder", "method", "fold", "slide", "seed"])["pearson_r"].mean()
    per_fold = per_run.groupby(["encoder", "method", "fold", "slide"]).mean()
    return per_fold.groupby(["encoder", "method", "slide"]).mean()


def compare_to_baselines(
    per_gene: pd.DataFrame, folds: pd.DataFrame, method: str = "stevs"
) -> pd.DataFrame:
    """``method`` on each encoder E against the best baseline on E (the registry's
    baselines on E, or an encoder-free one: see :func:`baseline_candidates`), by mean
    headline r.

    Paired test over held-out slides (:func:`paired_test` of :func:`slide_headline_r`: the
    slide is the unit, the genes of one slide are not independent samples); and a sign
    count over folds (seed-averaged headline r). The difference of the means is a ``tie``
    when it is not larger than the seed sd (the larger of the two methods'), else
    ``ahead`` / ``behind``; with one seed there is no seed sd and the verdict says so.
    """
    folds, per_gene = _with_runs(folds), _with_runs(per_gene)
    summary = summarise_methods(folds).set_index(["encoder", "method"])
    pair = _pairing(per_gene, folds, summary)
    rows = []
    for encoder in sorted({e for e, m in summary.index if m == method}):
        candidates = baseline_candidates(encoder, summary.index)
        if not candidates:
            continue
        mean = summary["pearson_r_mean_headline_mean"]
        best = max(candidates, key=lambda candidate: mean[candidate])
        row = pair((encoder, method), best)
        rows.append({"encoder": encoder, "method": method, "baseline": best[1],
                     "baseline_encoder": best[0], **row})  # fmt: skip
    return pd.DataFrame(rows)


def _pairing(per_gene: pd.DataFrame, folds: pd.DataFrame, summary: pd.DataFrame) -> Any:
    """A function (encoder, method) x (encoder, method) -> the numbers of one pair: both
    mean headline r, ``difference``, ``seed_sd`` (the larger of the two), ``folds_ahead`` /
    ``n_folds``, :func:`paired_test` over the held-out slides and the ``verdict``."""
    r = slide_headline_r(per_gene)
    fold_r = folds.groupby(["encoder", "method", "fold"])["pearson_r_mean_headline"].mean()
    mean = summary["pearson_r_mean_headline_mean"]

    def pair(key: tuple[str, str], other: tuple[str, str]) -> dict[str, Any]:
        diff = float(mean[key] - mean[other])
        per_fold = pd.concat([fold_r[key], fold_r[other]], axis=1, join="inner")
        sds = summary.loc[[key, other], "pearson_r_mean_headline_seed_sd"]
        noise = float(sds.max()) if sds.notna().any() else float("nan")
        return {
            "headline_r": float(mean[key]), "baseline_headline_r": float(mean[other]),
            "difference": diff, "seed_sd": noise,
            "folds_ahead": int((per_fold.iloc[:, 0] > per_fold.iloc[:, 1]).sum()),
            "n_folds": len(per_fold), **paired_test(r[key], r[other]),
            "verdict": _verdict(diff, noise),
        }  # fmt: skip

    return pair


def encoder_groups(summary: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
    """Encoder -> the (encoder, method) rows compared on it, best mean headline r first:
    its own methods and every encoder-free one (encoder ``none`` or none given), which needs
    no encoder and so runs beside each. Without any encoder-using method: one group per
    encoder id present."""
    keys = list(zip(summary["encoder"], summary["method"], strict=True))
    free = [k for k in keys if k[0] in (NO_ENCODER, "")]
    encoders = sorted({e for e, _ in keys if e not in (NO_ENCODER, "")})
    mean = dict(zip(keys, summary["pearson_r_mean_headline_mean"].astype(float), strict=True))
    groups = {e: [k for k in keys if k[0] == e] + free for e in encoders}
    if not groups:
        groups = {e: [k for k in keys if k[0] == e] for e in sorted({e for e, _ in free})}
    order = {k: -mean[k] if np.isfinite(mean[k]) else np.inf for k in keys}
    return {e: sorted(rows, key=lambda k: (order[k], k[1])) for e, rows in groups.items()}


def leaderboard(per_gene: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Per encoder group (:func:`encoder_groups`), best first: each (encoder, method) with its
    mean headline r and, against the group's leader (the leader: against the runner-up),
    the :func:`_pairing` numbers, paired test and verdict included; ``rank`` 1 leads."""
    folds, per_gene = _with_runs(folds), _with_runs(per_gene)
    summary = summarise_methods(folds)
    indexed = summary.set_index(["encoder", "method"])
    pair = _pairing(per_gene, folds, indexed)
    rows = []
    for group, keys in encoder_groups(summary).items():
        for rank, key in enumerate(keys, start=1):
            other = (keys[1] if rank == 1 else keys[0]) if len(keys) > 1 else key
            numbers = pair(key, other) if other != key else {}
            if numbers:
                numbers["against_headline_r"] = numbers.pop("baseline_headline_r")
            rows.append({
                "group": group, "rank": rank, "encoder": key[0], "method": key[1],
                "headline_r": float(indexed.loc[key, "pearson_r_mean_headline_mean"]),
                "headline_r_std": float(indexed.loc[key, "pearson_r_mean_headline_std"]),
                "n_seeds": int(indexed.loc[key, "n_seeds"]),
                "against": f"{other[1]}" if len(keys) > 1 else "", **numbers,
            })  # fmt: skip
    return pd.DataFrame(rows)


def verdict_line(group: str, rows: pd.DataFrame) -> str:
    """One sentence on an encoder group of :func:`leaderboard`: which method leads, by how
    much over the runner-up, over how many held-out slides and seeds, and whether that is
    more than the noise (the slide-level test and the seed sd)."""
    where = f"On {group}" if group not in (NO_ENCODER, "") else "Without an encoder"
    lead = rows.iloc[0]
    if len(rows) < 2:
        return f"{where}: only {lead['method']} ran (headline r {lead['headline_r']:.3f})."
    seeds = int(rows["n_seeds"].max())
    p = lead["slide_wilcoxon_p"]
    if lead["n_slides"] < MIN_TEST_SLIDES:
        noise = (
            f"{TOO_FEW_SLIDES} whether this is more than the noise ({lead['n_slides']} "
            f"held-out, the test needs {MIN_TEST_SLIDES})"
        )
    elif not np.isfinite(p):
        noise = f"not more than the noise ({lead['slide_test']})"
    elif p < 0.05 and not str(lead["verdict"]).startswith("tie"):
        noise = f"more than the noise ({lead['slide_test']})"
    else:
        noise = f"not more than the noise ({lead['slide_test']}; {lead['verdict']})"
    return (
        f"{where}: {lead['method']} leads with headline r {lead['headline_r']:.3f}, "
        f"{lead['difference']:+.3f} over {lead['against']} ({lead['against_headline_r']:.3f}), "
        f"ahead on {lead['slides_ahead']} of {lead['n_slides']} held-out slides, "
        f"{seeds} seed{'s' if seeds != 1 else ''}: {noise}."
    )


#: fewest held-out slides :func:`paired_test` tests on (with 5, the smallest two-sided
#: Wilcoxon p is 2 / 2**5 = 0.0625)
MIN_TEST_SLIDES = 5
#: what the report says instead of a p-value below :data:`MIN_TEST_SLIDES`
TOO_FEW_SLIDES = "too few slides to test"


def paired_test(ours: pd.Series, theirs: pd.Series) -> dict[str, Any]:
    """Two per-slide headline r series (:func:`slide_headline_r`), paired by slide ->
    ``n_slides``, ``slides_ahead``, the two-sided ``slide_wilcoxon_p``
    (``scipy.stats.wilcoxon``, signed-rank over the slides' differences; NaN below
    :data:`MIN_TEST_SLIDES` slides or when every slide ties) and ``slide_test``, the
    report's words: the test and its p, or "too few slides to test"."""
    from scipy.stats import wilcoxon

    pairs = pd.concat([ours, theirs], axis=1, join="inner").dropna()
    delta = pairs.iloc[:, 0] - pairs.iloc[:, 1]
    n = len(delta)
    row: dict[str, Any] = {"n_slides": n, "slides_ahead": int((delta > 0).sum()),
                           "slide_wilcoxon_p": float("nan")}  # fmt: skip
    if n < MIN_TEST_SLIDES:
        row["slide_test"] = f"{TOO_FEW_SLIDES} ({n} held-out, fewer than {MIN_TEST_SLIDES})"
    elif not (delta != 0).any():
        row["slide_test"] = f"no difference on any of {n} slides"
    else:
        row["slide_wilcoxon_p"] = float(wilcoxon(delta.to_numpy()).pvalue)
        row["slide_test"] = f"Wilcoxon over {n} slides: p = {row['slide_wilcoxon_p']:.2g}"
    return row


def _verdict(difference: float, noise: float) -> str:
    """``ahead`` / ``behind`` beyond the seed sd, else ``tie``; one seed: no sd to judge."""
    if not np.isfinite(noise):
        return ("ahead" if difference > 0 else "behind") + " (one seed: no seed sd)"
    if abs(difference) <= noise:
        return "tie (inside the seed sd)"
    return "ahead" if difference > 0 else "behind"
