"""STevs model options on frozen embeddings: cache each slide's embeddings once, then fit
many variants per fold in seconds (issue 15's "make STevs win" measurements).

Every fold's slides are embedded once with a preset's frozen backbone (all spots of the
slide's patch cache; ``--tta`` also caches the mean over the 8 flips/turns) into
``--cache``. Variants then train on those embeddings through :func:`stevs.training.fold.fit_model`
(the workflow's own loop: AdamW, warm-ups, early stopping on the validation section's
headline r) and are scored on the test slides with :func:`stevs.metrics.headline_pearson`,
next to ridge probes fitted on the same spots (training slides only, and training +
validation as ``ridge_embed`` does).

    python benchmarks/model_options.py --root . --folds 'results/her2st_effnet/folds/fold*.json'
    python benchmarks/model_options.py --root /path/to/demo --folds 'results/folds/fold*.json'

Run from anywhere: fold files name their slides relative to ``--root``. Prints one TSV row
per (variant, seed, fold) and a summary (mean over folds, sd over seeds) at the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from stevs.baselines import read_patches
from stevs.io.fold_file import Fold, read_fold
from stevs.io.slide_adata import read_slide_adata
from stevs.metrics import headline_pearson, load_observed
from stevs.models import create_model
from stevs.models.presets import get_preset
from stevs.models.ridge import fit_ridge
from stevs.training.batches import EmbeddingDataset
from stevs.training.fold import fit_model, with_context
from stevs.training.options import TrainOptions

VARIANTS: dict[str, dict[str, Any]] = {
    "stevs": {},
    "stevs_image_only": {"method": "stevs_image_only"},
    "stnet": {"method": "stnet"},
}


@dataclass
class SlideEmbeddings:
    """One slide's cached embeddings (all spots of its patch cache) and spot centres."""

    barcodes: list[str]
    embedding: np.ndarray  # (N, F)
    centers_px: np.ndarray  # (N, 2)
    pitch_px: float


def _views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/turns of (N, 3, H, W) patches."""
    return [torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(3)) for k in range(4)]


def embed_slide(fold: Fold, slide: str, preset: str, tta: bool, cache: Path) -> SlideEmbeddings:
    """Embeddings of every spot of ``slide`` (cached in ``cache``)."""
    from stevs.models.backbones import ImageBackbone

    view = "tta8" if tta else "plain"
    path = cache / f"{slide}.{preset}.{view}.npz"
    adata = read_slide_adata(fold.slide_entry(slide).adata)
    meta = adata.uns["stevs"]
    pitch_px = float(meta["spot_pitch_um"]) / float(meta["mpp"])
    if path.is_file():
        data = np.load(path)
        return SlideEmbeddings(list(data["barcodes"]), data["embedding"], data["centers"], pitch_px)
    patches, barcodes = read_patches(fold, slide)
    backbone = ImageBackbone(get_preset(preset).backbone).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(patches), 64):
            x = torch.from_numpy(np.ascontiguousarray(patches[start : start + 64]))
            x = x.permute(0, 3, 1, 2)
            views = _views(x) if tta else [x]
            out.append(torch.stack([backbone(v) for v in views]).mean(0).numpy())
    embedding = np.concatenate(out).astype(np.float32)
    index = adata.obs_names.get_indexer(barcodes)
    centers = np.asarray(adata.obsm["spatial"], dtype=np.float64)[index]
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, barcodes=np.asarray(barcodes), embedding=embedding, centers=centers)
    return SlideEmbeddings(list(barcodes), embedding, centers, pitch_px)


def neighbour_mean(emb: SlideEmbeddings, radius_pitches: float) -> np.ndarray:
    """Mean embedding of each spot's neighbours within ``radius_pitches`` (itself excluded;
    its own embedding when it has none)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(emb.centers_px)
    pairs = tree.query_ball_point(emb.centers_px, r=radius_pitches * emb.pitch_px * 1.01)
    out = np.empty_like(emb.embedding)
    for i, nbrs in enumerate(pairs):
        others = [j for j in nbrs if j != i]
        out[i] = emb.embedding[others].mean(0) if others else emb.embedding[i]
    return out


def slide_normalised(embedding: np.ndarray, how: str) -> np.ndarray:
    """One slide's embeddings centred (``center``) or z-scored (``zscore``) per feature over
    all of that slide's spots (no expression used), or as they are (``none``)."""
    if how == "none":
        return embedding
    out = embedding - embedding.mean(0, keepdims=True)
    if how == "zscore":
        out = out / np.maximum(embedding.std(0, keepdims=True), 1e-6)
    return out


def split_data(
    fold: Fold,
    part: str,
    embs: Mapping[str, SlideEmbeddings],
    features: str,
    radius: float,
    slide_norm: str = "none",
) -> dict[str, Any]:
    """Features, targets, coords and slide indices of a fold's ``part`` spots."""
    from stevs.data import normalise_coords

    xs, ys, slides, coords = [], [], [], []
    for slide in fold.split_slides(part):
        emb = embs[slide]
        barcodes = fold.spots_for(part, slide) or emb.barcodes
        rows = np.asarray([emb.barcodes.index(b) for b in barcodes])
        x = slide_normalised(emb.embedding, slide_norm)
        emb = SlideEmbeddings(emb.barcodes, x, emb.centers_px, emb.pitch_px)
        if features == "own+nbr":
            x = np.concatenate([x, neighbour_mean(emb, radius)], axis=1)
        y, _, _ = load_observed(fold, slide, barcodes)
        xs.append(x[rows])
        ys.append(y)
        coords.append(normalise_coords(emb.centers_px)[rows])
        slides.append(np.full(len(rows), fold.slide_index(slide)))
    return {
        "x": np.concatenate(xs).astype(np.float32),
        "y": np.concatenate(ys).astype(np.float32),
        "coords": np.concatenate(coords).astype(np.float32),
        "slide": np.concatenate(slides),
    }


_PROBES: dict[str, Any] = {}


def _cached_fit_ridge(features: np.ndarray, targets: np.ndarray, groups: Any, genes: Any,
                      **kwargs: Any) -> Any:  # fmt: skip
    """``fit_ridge`` memoised on its inputs: the linear path's probe is the same for every
    seed of a fold, so it is fitted once (the fit is deterministic)."""
    import hashlib

    digest = hashlib.sha256()
    for array in (features, targets, np.asarray(groups)):
        digest.update(np.ascontiguousarray(array).tobytes())
    key = digest.hexdigest() + json.dumps(kwargs, sort_keys=True)
    if key not in _PROBES:
        _PROBES[key] = fit_ridge(features, targets, groups, genes, **kwargs)
    return _PROBES[key]


def score(fold: Fold, data: Mapping[str, Any], prediction: np.ndarray) -> float:
    return headline_pearson(data["y"], prediction, data["slide"], fold.genes, fold.headline_genes)


def ridge_score(
    fold: Fold, train: list[Mapping[str, Any]], test: Mapping[str, Any], rank: int = 0
) -> float:
    x = np.concatenate([d["x"] for d in train])
    y = np.concatenate([d["y"] for d in train])
    groups = np.concatenate([d["slide"] for d in train])
    model = fit_ridge(x, y, groups, fold.genes)
    if rank:  # reduced-rank ridge: rank -1 = chosen by inner CV, else that rank
        from stevs.models.ridge import REDUCED_RANKS, reduce_rank

        ranks = REDUCED_RANKS if rank < 0 else [rank]
        model = reduce_rank(model, x, y, groups, ranks=ranks, headline_genes=fold.headline_genes)
        print(f"# {fold.fold}: reduced rank {model.meta['rank']}", flush=True)
    return score(fold, test, model.predict(test["x"]))


def as_dataset(data: Mapping[str, Any]) -> EmbeddingDataset:
    n = len(data["y"])
    items = {
        "coords": torch.from_numpy(data["coords"]),
        "target": torch.from_numpy(data["y"]),
        "counts": torch.zeros(n, data["y"].shape[1]),
        "library_size": torch.ones(n),
        "slide": torch.from_numpy(data["slide"].astype(np.int64)),
    }
    return EmbeddingDataset(torch.from_numpy(data["x"]), items)


def stevs_score(
    fold: Fold,
    variant: Mapping[str, Any],
    splits: Mapping[str, Mapping[str, Any]],
    preset: str,
    seed: int,
) -> tuple[float, float, int]:
    """(test headline r, val headline r, best epoch) of one STevs variant and seed."""
    options = dict(variant)
    method = options.pop("method", "stevs")
    train_opts = {k: options.pop(k) for k in list(options) if k in TrainOptions.__annotations__}
    preset_obj = get_preset(preset)
    opts = TrainOptions(seed=seed, workers=0, device="cpu", freeze_backbone=True, **train_opts)
    opts = opts.resolved(preset_obj)
    torch.manual_seed(seed)
    # frozen=False: a variant starts from the plain model and sets its options explicitly
    model = create_model(method, preset_obj, fold.genes, fold.normalisation, **options)
    config = {"method": method, "genes": fold.genes, "headline_genes": fold.headline_genes}
    with tempfile.TemporaryDirectory() as tmp:
        data = (as_dataset(splits["train"]), as_dataset(splits["val"]))
        result = fit_model(model, data, tmp, opts, config)
        model.load_state_dict(load_file(str(Path(tmp) / "model.safetensors")))
    test = splits["test"]
    data = with_context(model, as_dataset(test))
    mean, _ = model.predict(
        embedding=data.embeddings, coords=data.items["coords"], n_samples=0,
        context=data.items.get("context"),
    )  # fmt: skip
    return score(fold, test, mean.numpy()), float(result.best_val_pearson), result.best_epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--folds", required=True)
    parser.add_argument("--preset", default="effnet_lite0_in1k")
    parser.add_argument("--cache", default="benchmarks/out/embeddings")
    parser.add_argument("--variants", default="stevs", help="comma list or 'ridge'")
    parser.add_argument("--extra", default="{}", help="JSON: name -> variant options")
    parser.add_argument("--features", default="own", choices=("own", "own+nbr"))
    parser.add_argument("--radius", type=float, default=1.0, help="neighbours, in spot pitches")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--slide-norm", default="none", choices=("none", "center", "zscore"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import stevs.models.ridge

    stevs.models.ridge.fit_ridge = _cached_fit_ridge  # type: ignore[assignment]
    cache = Path(args.cache).resolve()
    os.chdir(args.root)
    variants = {**VARIANTS, **json.loads(args.extra)}
    folds = [read_fold(p) for p in sorted(glob.glob(args.folds))]
    results: dict[str, dict[int, list[float]]] = {}
    print("variant\tseed\tfold\ttest_r\tval_r\tbest_epoch\tseconds", flush=True)
    prepared = []
    for fold in folds:
        wanted = set(fold.train) | set(fold.val) | set(fold.test)
        embs = {s: embed_slide(fold, s, args.preset, args.tta, cache) for s in wanted}
        splits = {p: split_data(fold, p, embs, args.features, args.radius, args.slide_norm)
                  for p in ("train", "val", "test")}  # fmt: skip
        prepared.append((fold, splits))
    for name in args.variants.split(","):  # variant by variant: each finishes all folds
        seeds = [0] if name.startswith("ridge") else [int(s) for s in args.seeds.split(",")]
        for fold, splits in prepared:
            for seed in seeds:
                start = time.monotonic()
                if name.startswith("ridge"):
                    with_val = name.startswith("ridge_trainval")
                    rank = name.split("_rrr")[1] if "_rrr" in name else "0"
                    rank = -1 if rank == "cv" else int(rank)
                    parts = [splits["train"]] + ([splits["val"]] if with_val else [])
                    r, val, epoch = ridge_score(fold, parts, splits["test"], rank), 0.0, 0
                else:
                    r, val, epoch = stevs_score(fold, variants[name], splits, args.preset, seed)
                results.setdefault(name, {}).setdefault(seed, []).append(r)
                print(f"{name}\t{seed}\t{fold.fold}\t{r:.4f}\t{val:.4f}\t{epoch}\t"
                      f"{time.monotonic() - start:.1f}", flush=True)  # fmt: skip
    print("\nvariant\tmean over folds (per seed)\tmean\tsd over seeds\tper fold (mean over seeds)")
    for name, by_seed in results.items():
        means = [float(np.mean(v)) for v in by_seed.values()]
        per_fold = np.mean(np.asarray(list(by_seed.values())), axis=0)
        print(f"{name}\t{' '.join(f'{m:.4f}' for m in means)}\t{np.mean(means):.4f}\t"
              f"{np.std(means, ddof=1) if len(means) > 1 else 0.0:.4f}\t"
              f"{' '.join(f'{v:.3f}' for v in per_fold)}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
