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

The package, by responsibility: :mod:`~stevs.report.tables` (the evaluations read back,
seeds averaged, the comparison with the baselines and its paired test),
:mod:`~stevs.report.figures` (matplotlib figures), :mod:`~stevs.report.provenance`
(versions, commits, fold protocol, config) and :mod:`~stevs.report.page` (the HTML page and
the files it writes). This module is the ``stevs report`` command.
"""

from __future__ import annotations

import argparse
import logging

from stevs.options import non_negative_int
from stevs.report.page import build_report
from stevs.report.tables import (
    TABLE_METRICS,
    collect_metrics,
    compare_to_baselines,
    summarise_methods,
)

__all__ = [
    "TABLE_METRICS",
    "add_arguments",
    "build_report",
    "collect_metrics",
    "compare_to_baselines",
    "run",
    "summarise_methods",
]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs report``."""
    parser.add_argument(
        "--metrics",
        required=True,
        help="folder of {encoder}/{method}/seed{seed}/{fold}.tsv tables (stevs evaluate)",
    )
    parser.add_argument(
        "--predictions",
        help="folder of {encoder}/{method}/seed{seed}/{fold}/{slide}.h5ad, for the maps "
        "(default: no maps)",
    )
    parser.add_argument(
        "--folds",
        help="folder of {fold}.json fold files, for the protocol and the maps (default: none)",
    )
    parser.add_argument(
        "--models",
        help="folder of {encoder}/{method}/seed{seed}/{fold}/metrics.csv, for the training "
        "curves (default: no curves)",
    )
    parser.add_argument(
        "--config",
        help="the config the run used (the workflow passes {results}/config.yaml, the merged "
        "config), copied into the report (default: none)",
    )
    parser.add_argument("--out", required=True, help="report folder (index.html + TSVs)")
    parser.add_argument(
        "--max-map-slides", type=non_negative_int(), default=4, help="most test slides with maps"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="TSV",
        help="read only these per-gene tables ({fold}.tsv under --metrics; their .summary.tsv "
        "and .pooled.tsv beside them), e.g. the runs of one config (default: every table "
        "under --metrics)",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="report runs scored on fewer folds or test spots than the others, labelled "
        "PARTIAL (default: an error)",
    )


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
        allow_partial=args.allow_partial,
        only=args.only,
    )
    log.info("report written to %s", index)
    return 0
