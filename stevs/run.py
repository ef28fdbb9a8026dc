"""``stevs run``: the workflow's runs of one method on one fold in one process: train,
predict, evaluate, for each training seed.

``stevs train`` on a fold, then ``stevs predict`` of the fold's test slides with the model it
wrote, then ``stevs evaluate`` of those predictions: the same three commands with their own
defaults (prediction: 64 spots a batch, 16 posterior samples, sampling seed 0), so the files
are the ones the three commands write one after the other. With ``--seeds``, the three run
for each seed, into the paths with ``{seed}`` filled in. What one process saves is each
command's start (imports, 3-7 s a command on a CPU) and what the seeds share: the fold's
slides, read once (:func:`stevs.data.slide_panel`), and the ridge path's fit
(:func:`stevs.models.ridge.fit_probe`). The workflow's ``run_fold`` rule runs this, one job
per encoder x method x fold (docs/benchmarks.md, "Job cost").
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from stevs import metrics, predict, train
from stevs.atomic import check_writable
from stevs.cli import command_parser
from stevs.errors import StevsInputError
from stevs.options import non_negative_int

log = logging.getLogger("stevs.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs run``: ``stevs train``'s, and where the predictions and scores go."""
    train.add_arguments(parser)
    parser.add_argument(
        "--predictions",
        required=True,
        help="folder of the test slides' predictions ({slide}.h5ad and predictions.tsv, "
        "as stevs predict --out-dir)",
    )
    parser.add_argument(
        "--metrics",
        required=True,
        help="per gene x slide TSV, with FOO.summary.tsv and FOO.pooled.tsv beside it "
        "(as stevs evaluate --out)",
    )
    parser.add_argument(
        "--protocol",
        choices=metrics.PROTOCOLS,
        default="stevs",
        help="evaluation protocol, as stevs evaluate --protocol",
    )
    parser.add_argument(
        "--seeds",
        type=non_negative_int(),
        nargs="+",
        help="train, predict and evaluate once per seed (default: --seed alone); --out, "
        "--predictions and --metrics then hold '{seed}', filled in per seed",
    )


def seed_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per seed: ``--seed`` alone, or each of ``--seeds`` with ``{seed}`` in
    the output paths filled in."""
    if not args.seeds:
        return [args]
    paths = {"out": args.out, "predictions": args.predictions, "metrics": args.metrics}
    lacking = [name for name, path in paths.items() if "{seed}" not in path]
    if len(set(args.seeds)) != len(args.seeds) or lacking:
        raise StevsInputError(
            None,
            f"--seeds {' '.join(map(str, args.seeds))}: give each seed once, and '{{seed}}' in "
            f"--{', --'.join(lacking or ['out'])}",
        )
    return [
        argparse.Namespace(
            **{
                **vars(args),
                **{name: path.replace("{seed}", str(seed)) for name, path in paths.items()},
                "seed": seed,
                "seeds": None,
            }
        )
        for seed in args.seeds
    ]


def _stage_args(args: argparse.Namespace) -> tuple[argparse.Namespace, argparse.Namespace]:
    """The arguments of the predict and evaluate stages, parsed by their own commands'
    parsers (so their defaults are those commands' defaults)."""
    shared = ["--fold", args.fold]
    if args.patches_dir:
        shared += ["--patches-dir", args.patches_dir]
    predict_argv = [*shared, "--model-dir", args.out, "--out-dir", args.predictions]
    predict_argv += ["--device", args.device]
    if args.embeddings:
        predict_argv += ["--embeddings", args.embeddings]
    if args.threads:
        predict_argv += ["--threads", str(args.threads)]
    evaluate_argv = ["--fold", args.fold, "--predictions", args.predictions]
    evaluate_argv += ["--method", args.method, "--protocol", args.protocol, "--out", args.metrics]
    return (
        command_parser("predict")[1].parse_args(predict_argv),
        command_parser("evaluate")[1].parse_args(evaluate_argv),
    )


def _stages(runs: Sequence[argparse.Namespace]) -> list[tuple[argparse.Namespace, ...]]:
    """(train, predict, evaluate) arguments per seed, every seed's outputs checked first."""
    for args in runs:  # refused (a file of the user's) before any folder is made
        metrics.check_evaluation_outputs(args.metrics)
    for args in runs:
        check_writable(args.predictions)
    return [(args, *_stage_args(args)) for args in runs]


def run(args: argparse.Namespace) -> int:
    """``stevs run``: the three stages per seed; every output checked before training starts."""
    for train_args, predict_args, evaluate_args in _stages(seed_runs(args)):
        code = train.run(train_args) or predict.run(predict_args) or metrics.run(evaluate_args)
        if code:
            return code
    return 0
