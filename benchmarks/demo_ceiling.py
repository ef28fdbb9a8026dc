"""How much of the demo's held-out expression any model can predict: its ceilings.

The demo's expression is known (``truth/{slide}.npz`` of ``stevs demo``): each spot's log-rate
is its patient's baseline plus a linear function of the spot's tissue composition, and its
counts are negative binomial draws around it. For each fold of a finished demo run and each
held-out slide this prints the evaluation's headline Pearson r
(:func:`stevs.metrics.headline_pearson`, the fold's panel, headline genes and normalisation) of
two predictions no trained model can beat:

- ``oracle``: the slide's own noise-free expected counts, normalised as the targets are: the
  limit set by count noise alone (a predictor that knows the held-out patient's genes);
- ``composition_ridge``: a ridge (scikit-learn ``RidgeCV``, alphas 1e-3..1e3) from the true
  spot composition of the fold's training and validation slides to their observed targets,
  applied to the held-out slide's true composition: a perfect reader of tissue composition
  from the image that, like every model here, has never seen the held-out patient.

Methods' headline r beside them come from the run's ``report/folds.tsv``.

    python benchmarks/demo_ceiling.py results --truth resources/demo/truth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV

from stevs.io.fold_file import Fold, read_fold
from stevs.metrics import headline_pearson, load_observed, normalise_counts

ALPHAS = np.logspace(-3, 3, 13)


def read_truth(truth_dir: Path, slide: str, barcodes: pd.Index) -> dict[str, np.ndarray]:
    """The truth arrays of ``slide`` with spots in the order of ``barcodes``."""
    with np.load(truth_dir / f"{slide}.npz", allow_pickle=False) as npz:
        truth = {key: npz[key] for key in npz.files}
    order = pd.Index(truth["spot_barcodes"].astype(str)).get_indexer(barcodes)
    if (order < 0).any():
        raise SystemExit(f"{truth_dir / slide}.npz: spots of the slide are missing from it")
    spot_keys = ("spot_composition", "spot_expected_counts")
    return {**truth, **{key: truth[key][order] for key in spot_keys}}


def slide_arrays(fold: Fold, slide: str, truth_dir: Path) -> dict[str, np.ndarray]:
    """Observed targets, the oracle's expected expression and the true composition."""
    observed, barcodes, _ = load_observed(fold, slide)
    truth = read_truth(truth_dir, slide, barcodes)
    expected = normalise_counts(
        truth["spot_expected_counts"], truth["gene_names"].astype(str), fold.genes,
        fold.normalisation_method, fold.target_sum,
    )  # fmt: skip
    return {"observed": observed, "oracle": expected, "composition": truth["spot_composition"]}


def fold_ceilings(fold: Fold, truth_dir: Path) -> list[dict[str, object]]:
    """The two ceilings' headline r on each held-out slide of ``fold``."""
    fitted = [slide_arrays(fold, s, truth_dir) for s in fold.slides_of("train", "val")]
    probe = RidgeCV(alphas=ALPHAS).fit(
        np.concatenate([a["composition"] for a in fitted]),
        np.concatenate([a["observed"] for a in fitted]),
    )
    rows = []
    for slide in fold.slides_of("test"):
        arrays = slide_arrays(fold, slide, truth_dir)
        slides = np.full(len(arrays["observed"]), slide)
        predictions = {
            "oracle": arrays["oracle"],
            "composition_ridge": probe.predict(arrays["composition"]),
        }
        for name, predicted in predictions.items():
            r = headline_pearson(
                arrays["observed"], predicted, slides, fold.genes, fold.headline_genes
            )
            rows.append({"fold": fold.fold, "slide": slide, "prediction": name, "headline_r": r})
    return rows


def methods_table(results: Path) -> pd.DataFrame:
    """Each run's headline r per fold (mean over seeds) from the report's ``folds.tsv``."""
    folds = pd.read_csv(results / "report" / "folds.tsv", sep="\t")
    keys = ["encoder", "method", "fold"]
    return folds.groupby(keys, as_index=False)["pearson_r_mean_headline"].mean()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a finished demo run's results folder")
    parser.add_argument("--truth", type=Path, default=Path("resources/demo/truth"))
    args = parser.parse_args(argv)
    rows = []
    for path in sorted((args.results / "folds").glob("fold*.json")):
        rows += fold_ceilings(read_fold(path), args.truth)
    ceilings = pd.DataFrame(rows)
    print(ceilings.to_string(index=False, float_format="%.3f"))
    per_fold = ceilings.groupby(["prediction", "fold"])["headline_r"].mean().unstack()
    per_fold["mean"] = per_fold.mean(axis=1)
    print("\nceilings, headline r per fold (mean over its held-out slides):")
    print(per_fold.to_string(float_format="%.3f"))
    if (args.results / "report" / "folds.tsv").is_file():
        table = methods_table(args.results).pivot_table(
            index=["encoder", "method"], columns="fold", values="pearson_r_mean_headline"
        )
        table["mean"] = table.mean(axis=1)
        print("\nmethods, headline r per fold (report/folds.tsv, mean over seeds):")
        print(table.sort_values("mean", ascending=False).to_string(float_format="%.3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
