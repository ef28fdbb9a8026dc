"""``stevs train``: train a method of the registry on one fold.

Torch methods go through :func:`stevs.training.fold.train_fold` (fold preparation, the loop of
:mod:`stevs.training.loop`, the refit), ridge methods through :func:`stevs.baselines.train_ridge`;
the method registry (:mod:`stevs.methods`) picks which.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from stevs.atomic import check_writable
from stevs.cli import options_from_args
from stevs.device import resolve_device
from stevs.io.embedding_cache import VIEWS
from stevs.io.fold_file import add_patches_dir_argument, fold_argument
from stevs.io.model_dir import LOG, ModelDir
from stevs.methods import METHOD_NAMES, get_method
from stevs.models.context import CONTEXTS
from stevs.models.poe import ALIGNMENTS
from stevs.models.presets import PRESETS
from stevs.models.stevs import LINEAR_PATHS, LINEAR_RANKS
from stevs.options import non_negative_float, non_negative_int, positive_float, positive_int
from stevs.training.fold import train_fold
from stevs.training.latent import write_latent_analysis
from stevs.training.options import TrainOptions

log = logging.getLogger("stevs.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs train``."""
    parser.add_argument("--fold", required=True, help="fold file (results/folds/{fold}.json)")
    parser.add_argument(
        "--method", default="stevs", choices=METHOD_NAMES, help="STevs or a baseline"
    )
    parser.add_argument(
        "--preset",
        default="cpu_small",
        choices=sorted(PRESETS),
        help="encoder preset: backbone, patch size and training defaults (stevs encoders)",
    )
    parser.add_argument(
        "--out", required=True, help="output folder (resumes if it has a checkpoint)"
    )
    parser.add_argument(
        "--backbone",
        help="a preset (its whole encoder recipe, e.g. uni) or a timm model name (timm's "
        "defaults) replacing the preset's backbone",
    )
    parser.add_argument(
        "--weights",
        help="backbone weights: 'none', 'timm' (timm's hub), 'hf' (the recipe's Hugging Face "
        "file, from the cache) or a local file (default: the preset's own choice)",
    )
    parser.add_argument(
        "--epochs", type=positive_int(), help="most epochs to train (default: the preset's)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int(), help="spots per batch (default: the preset's)"
    )
    parser.add_argument(
        "--lr", type=positive_float(), help="learning rate of the heads (default: the preset's)"
    )
    parser.add_argument(
        "--lr-backbone",
        type=non_negative_float(),
        help="learning rate of the backbone (default: the preset's)",
    )
    parser.add_argument(
        "--latent-dim", type=positive_int(), help="latent dimensions (default: the preset's)"
    )
    parser.add_argument(
        "--patience",
        type=positive_int(),
        help="early-stopping patience, epochs (default: the preset's)",
    )
    parser.add_argument(
        "--beta",
        type=non_negative_float(),
        help="KL weight after warm-up (default: the preset's)",
    )
    parser.add_argument(
        "--align", choices=ALIGNMENTS, help="alignment divergence, stevs (default: the preset's)"
    )
    parser.add_argument(
        "--align-weight",
        type=non_negative_float(),
        help="lambda of the alignment loss (default: the preset's)",
    )
    parser.add_argument(
        "--likelihood",
        choices=("gaussian", "nb"),
        help="gaussian, or add a negative binomial count term (default: the preset's)",
    )
    parser.add_argument(
        "--context",
        choices=CONTEXTS,
        help="neighbourhood context, frozen backbone only (default: the method's)",
    )
    parser.add_argument(
        "--context-radius",
        type=positive_float(),
        help="neighbours within, in pitches; also ridge_context (default: the method's)",
    )
    parser.add_argument(
        "--linear-path",
        choices=LINEAR_PATHS,
        help="linear map from the image features (default: the method's)",
    )
    parser.add_argument(
        "--linear-rank",
        choices=LINEAR_RANKS,
        help="ridge path: full, or reduced rank by CV (default: the method's)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int(), default=0, help="training seed (weights, batches)"
    )
    parser.add_argument(
        "--workers", type=non_negative_int(), default=2, help="DataLoader worker processes"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--freeze-backbone",
        action="store_true",
        default=None,
        help="train the heads on a frozen backbone (default: the preset's choice)",
    )
    parser.add_argument(
        "--train-stages",
        type=positive_int(),
        help="partial fine-tuning: train only the backbone's last N stages (the earlier ones "
        "frozen, batch-norm statistics included) at --lr-backbone; default: all of it",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--no-augment", action="store_true", help="no flips or colour jitter while training"
    )
    parser.add_argument(
        "--max-minutes",
        type=positive_float(),
        help="stop (resumably) after this long (default: no limit)",
    )
    parser.add_argument(
        "--checkpoint-minutes",
        type=non_negative_float(),
        default=1.0,
        help="resume checkpoint after the first epoch, then at most every this many minutes "
        "(0: after every epoch)",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="after early stopping picks epoch E on val, retrain on train + val for E epochs",
    )
    parser.add_argument(
        "--keep-selection",
        action="store_true",
        help="with --refit: keep the selection run's model folder (OUT/selection/)",
    )
    parser.add_argument(
        "--embeddings",
        help="frozen backbone: folder of embedding caches, stevs embed (default: embed on the fly)",
    )
    parser.add_argument(
        "--embedding-view", default="none", choices=VIEWS,
        help="frozen backbone / ridge_embed: test-time view of the embeddings",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=positive_int(), help="torch CPU threads (default: torch's choice)"
    )
    add_patches_dir_argument(parser)


def _options(args: argparse.Namespace) -> TrainOptions:
    """Training options from ``stevs train``'s arguments."""
    return options_from_args(TrainOptions, args, lr_heads=args.lr, augment=not args.no_augment)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Model switches given on the command line (``--align`` only where the method aligns)."""
    overrides = {
        key: getattr(args, key)
        for key in (
            "beta",
            "align_weight",
            "likelihood",
            "context",
            "context_radius",
            "linear_path",
            "linear_rank",
        )
        if getattr(args, key) is not None
    }
    if args.align is not None and get_method(args.method).switches.get("align", "") is not None:
        overrides["align"] = args.align
    return overrides


def run(args: argparse.Namespace) -> int:
    """``stevs train``: dispatch through the method registry."""
    if args.threads:  # torch's threads and the BLAS pools numpy and scikit-learn use
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    method = get_method(args.method)
    resolve_device(args.device)  # also for ridge methods, which run on the CPU anyway
    out = check_writable(args.out)
    ModelDir(out).check_replaceable()  # a folder of the user's at --out stays as it was
    handler = logging.FileHandler(out / LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("stevs").addHandler(handler)
    fold = fold_argument(args.fold, args.patches_dir)
    try:
        if method.kind == "ridge":
            backbone = {"backbone": args.backbone} if args.backbone else {}  # else its default
            if method.encoder == "frozen":
                backbone.update(embeddings=args.embeddings, view=args.embedding_view)
            if method.features == "embedding+context" and args.context_radius is not None:
                backbone["context_radius"] = args.context_radius
            method.entry("train")(fold, args.method, out, seed=args.seed, **backbone)
            log.info("done: %s -> %s", args.method, out)
            return 0
        result = train_fold(
            fold,
            args.method,
            out,
            _options(args),
            preset=args.preset,
            backbone=args.backbone,
            weights=args.weights,
            **_overrides(args),
        )
        if result.finished:  # the latent analysis beside the model (stevs.models.analysis)
            write_latent_analysis(fold, out, device=str(resolve_device(args.device)))
    finally:
        logging.getLogger("stevs").removeHandler(handler)
        handler.close()
    log.info(
        "done: %d epochs, best epoch %d, val headline r %s -> %s",
        result.epochs_done,
        result.best_epoch,
        "n/a" if result.best_val_pearson is None else f"{result.best_val_pearson:.3f}",
        out,
    )
    return 0
