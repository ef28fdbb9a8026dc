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


def hed_jitter(
    patches: np.ndarray, seed: int, sigma: float = 0.05, bias: float = 0.01
) -> np.ndarray:
    """uint8 (N, H, W, 3) patches with their stains jittered in HED space (Tellez et al.
    2018): each of haematoxylin, eosin and DAB scaled by U(1 - sigma, 1 + sigma) and shifted
    by U(-bias, bias), one draw for all the patches given (a section's stain varies as a
    whole)."""
    from skimage.color import hed2rgb, rgb2hed

    rng = np.random.default_rng(seed)
    alpha, beta = rng.uniform(1 - sigma, 1 + sigma, 3), rng.uniform(-bias, bias, 3)
    out = np.empty_like(patches)
    for start in range(0, len(patches), 256):
        hed = rgb2hed(patches[start : start + 256]) * alpha + beta
        out[start : start + 256] = np.round(np.clip(hed2rgb(hed), 0, 1) * 255)
    return out


def embed_slide(
    fold: Fold, slide: str, preset: str, tta: bool, cache: Path, hed: int = 0
) -> SlideEmbeddings:
    """Embeddings of every spot of ``slide`` (cached in ``cache``); ``hed`` > 0: of the
    patches stain-jittered by :func:`hed_jitter` with seed ``hed``."""
    from stevs.models.backbones import ImageBackbone

    view = ("tta8" if tta else "plain") + (f".hed{hed}" if hed else "")
    path = cache / f"{slide}.{preset}.{view}.npz"
    adata = read_slide_adata(fold.slide_entry(slide).adata)
    meta = adata.uns["stevs"]
    pitch_px = float(meta["spot_pitch_um"]) / float(meta["mpp"])
    if path.is_file():
        data = np.load(path)
        return SlideEmbeddings(list(data["barcodes"]), data["embedding"], data["centers"], pitch_px)
    patches, barcodes = read_patches(fold, slide)
    if hed:
        patches = hed_jitter(patches, seed=1000 * hed + fold.slide_index(slide))
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


def tail_inputs(fold: Fold, slide: str, preset: str, cache: Path) -> SlideEmbeddings:
    """Per spot of ``slide``: the ``tail`` embedding view of the preset's frozen backbone
    (:meth:`stevs.models.backbones.ImageBackbone.tail_inputs`; EfficientNet-Lite0: the pooled
    features of stages 0-3, the input maps of its last block, blocks.6), which ``stevs_tail``
    reads (cached)."""
    from stevs.models.backbones import ImageBackbone

    path = cache / f"{slide}.{preset}.tail.npz"
    plain = embed_slide(fold, slide, preset, False, cache)
    if path.is_file():
        data = np.load(path)
        return SlideEmbeddings(plain.barcodes, data["inputs"], plain.centers_px, plain.pitch_px)
    patches, barcodes = read_patches(fold, slide)
    assert barcodes == plain.barcodes
    backbone = ImageBackbone(get_preset(preset).backbone).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(patches), 64):
            x = torch.from_numpy(np.ascontiguousarray(patches[start : start + 64]))
            out.append(backbone.tail_inputs(x.permute(0, 3, 1, 2)).numpy())
    inputs = np.concatenate(out).astype(np.float32)
    np.savez(path, inputs=inputs)
    return SlideEmbeddings(plain.barcodes, inputs, plain.centers_px, plain.pitch_px)


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
    columns: np.ndarray | None = None,
) -> dict[str, Any]:
    """Features, targets, coords and slide indices of a fold's ``part`` spots; ``columns``
    keeps only those embedding columns (some of the backbone's stages)."""
    from stevs.data import normalise_coords
    from stevs.models.context import neighbour_mean

    xs, ys, slides, coords, contexts = [], [], [], [], []
    for slide in fold.split_slides(part):
        emb = embs[slide]
        barcodes = fold.spots_for(part, slide) or emb.barcodes
        rows = np.asarray([emb.barcodes.index(b) for b in barcodes])
        x = slide_normalised(emb.embedding, slide_norm)[rows]
        if columns is not None:
            x = x[:, columns]
        # the neighbourhood context among the split's spots of the slide, as STevs and
        # ridge_context compute it; own+nbr: the probe's features are [own, context]
        context = neighbour_mean(x, emb.centers_px[rows], None, radius).numpy()
        contexts.append(context)
        y, _, _ = load_observed(fold, slide, barcodes)
        xs.append(np.concatenate([x, context], axis=1) if features == "own+nbr" else x)
        ys.append(y)
        coords.append(normalise_coords(emb.centers_px)[rows])
        slides.append(np.full(len(rows), fold.slide_index(slide)))
    return {
        "x": np.concatenate(xs).astype(np.float32),
        "context": np.concatenate(contexts).astype(np.float32),
        "y": np.concatenate(ys).astype(np.float32),
        "coords": np.concatenate(coords).astype(np.float32),
        "slide": np.concatenate(slides),
    }


def score(fold: Fold, data: Mapping[str, Any], prediction: np.ndarray) -> float:
    return headline_pearson(data["y"], prediction, data["slide"], fold.genes, fold.headline_genes)


def ridge_score(
    fold: Fold, train: list[Mapping[str, Any]], test: Mapping[str, Any], rank: int = 0
) -> tuple[float, np.ndarray]:
    x = np.concatenate([d["x"] for d in train])
    y = np.concatenate([d["y"] for d in train])
    groups = np.concatenate([d["slide"] for d in train])
    model = fit_ridge(x, y, groups, fold.genes)
    if rank:  # reduced-rank ridge: rank -1 = chosen by inner CV, else that rank
        from stevs.models.ridge import REDUCED_RANKS, reduce_rank

        ranks = REDUCED_RANKS if rank < 0 else [rank]
        model = reduce_rank(model, x, y, groups, ranks=ranks, headline_genes=fold.headline_genes)
        print(f"# {fold.fold}: reduced rank {model.meta['rank']}", flush=True)
    prediction = model.predict(test["x"])
    return score(fold, test, prediction), prediction


def as_dataset(data: Mapping[str, Any]) -> EmbeddingDataset:
    n = len(data["y"])
    items = {
        "coords": torch.from_numpy(data["coords"]),
        "target": torch.from_numpy(data["y"]),
        "counts": torch.zeros(n, data["y"].shape[1]),
        "library_size": torch.ones(n),
        "slide": torch.from_numpy(data["slide"].astype(np.int64)),
        "context": torch.from_numpy(data["context"]),  # used by models with a context
    }
    return EmbeddingDataset(torch.from_numpy(data["x"]), items)


def stevs_score(
    fold: Fold,
    variant: Mapping[str, Any],
    splits: Mapping[str, Mapping[str, Any]],
    preset: str,
    seed: int,
) -> tuple[float, float, int, np.ndarray]:
    """(test headline r, val headline r, best epoch, test prediction) of one STevs variant
    and seed; a variant with ``"hed": true`` trains on the stain-jittered copies too."""
    options = dict(variant)
    method = options.pop("method", "stevs")
    train = splits["train_aug"] if options.pop("hed", False) else splits["train"]
    tail = options.pop("tail", False)
    train_opts = {k: options.pop(k) for k in list(options) if k in TrainOptions.__annotations__}
    preset_obj = get_preset(preset)
    train_opts = {"freeze_backbone": True, **train_opts}
    opts = TrainOptions(seed=seed, workers=0, device="cpu", **train_opts).resolved(preset_obj)
    torch.manual_seed(seed)
    if tail:  # stevs_tail's model: the last stage trains (at lr_backbone) on the tail view
        options["train_tail_stages"] = 1
        splits = {k: {**v, "x": v["tail"]} for k, v in splits.items() if "tail" in v}
        train = splits["train"]
    # frozen=False: a variant starts from the plain model and sets its options explicitly
    model = create_model(method, preset_obj, fold.genes, fold.normalisation, **options)
    config = {"method": method, "genes": fold.genes, "headline_genes": fold.headline_genes}
    with tempfile.TemporaryDirectory() as tmp:
        data = (as_dataset(train), as_dataset(splits["val"]))
        result = fit_model(model, data, tmp, opts, config)
        model.load_state_dict(load_file(str(Path(tmp) / "model.safetensors")))
    test = splits["test"]
    data = with_context(model, as_dataset(test))
    mean, _ = model.predict(
        embedding=data.embeddings, coords=data.items["coords"], n_samples=0,
        context=data.items.get("context"),
    )  # fmt: skip
    prediction = mean.numpy()
    return (
        score(fold, test, prediction),
        float(result.best_val_pearson),
        result.best_epoch,
        prediction,
    )


def stage_columns(preset: str, stages: str) -> np.ndarray | None:
    """Embedding columns of the backbone's stages ``stages`` ("all", "last" or a comma list
    of stage indices): the embedding is every stage's pooled features, concatenated."""
    if stages == "all":
        return None
    from stevs.models.backbones import ImageBackbone

    widths = ImageBackbone(get_preset(preset).backbone).stage_channels
    wanted = [len(widths) - 1] if stages == "last" else [int(i) for i in stages.split(",")]
    ends = np.cumsum(widths)
    return np.concatenate([np.arange(ends[i] - widths[i], ends[i]) for i in wanted])


def prepare_fold(fold: Fold, args: argparse.Namespace, cache: Path, columns: Any) -> dict:
    """The fold's splits on cached embeddings; with ``--hed-views K``, ``train_aug`` and
    ``val_aug``: the split's spots once as they are and once per stain-jittered copy."""
    wanted = set(fold.train) | set(fold.val) | set(fold.test)
    options = (args.features, args.radius, args.slide_norm, columns)
    views = [
        {s: embed_slide(fold, s, args.preset, args.tta, cache, hed) for s in wanted}
        for hed in range(args.hed_views + 1)
    ]
    splits = {p: split_data(fold, p, views[0], *options) for p in ("train", "val", "test")}
    if args.tail:  # stevs_tail's inputs, beside the plain embeddings (context, probes)
        tails = {s: tail_inputs(fold, s, args.preset, cache) for s in wanted}
        for part in ("train", "val", "test"):
            splits[part]["tail"] = split_data(fold, part, tails, "own", args.radius)["x"]
    if args.hed_views:
        for part in ("train", "val"):
            copies = [splits[part]] + [split_data(fold, part, v, *options) for v in views[1:]]
            splits[f"{part}_aug"] = {k: np.concatenate([c[k] for c in copies]) for k in copies[0]}
    return splits


def _with_context(data: Mapping[str, Any]) -> dict[str, Any]:
    return {**data, "x": np.concatenate([data["x"], data["context"]], axis=1)}


def run_one(name: str, fold: Fold, splits: Mapping, variants: Mapping, args: Any, seed: int):
    """(test r, val r, best epoch, test prediction) of one variant on one fold and seed."""
    if not name.startswith("ridge"):
        return stevs_score(fold, variants[name], splits, args.preset, seed)
    with_val = name.startswith("ridge_trainval")
    rank = name.split("_rrr")[1].split("_")[0] if "_rrr" in name else "0"  # ridge_*_rrrcv_*
    rank = -1 if rank == "cv" else int(rank)
    suffix = "_aug" if name.endswith("_hed") else ""
    parts = [splits["train" + suffix]] + ([splits["val" + suffix]] if with_val else [])
    test = splits["test"]
    if "_ctx" in name:  # ridge_context: [own, neighbours' mean]
        parts, test = [_with_context(p) for p in parts], _with_context(test)
    r, prediction = ridge_score(fold, parts, test, rank)
    return r, 0.0, 0, prediction


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--folds", required=True)
    parser.add_argument("--preset", default="effnet_lite0_in1k")
    parser.add_argument("--cache", default="benchmarks/out/embeddings")
    parser.add_argument("--variants", default="stevs", help="comma list or 'ridge'")
    parser.add_argument("--extra", default="{}", help="JSON: name -> variant options")
    parser.add_argument("--features", default="own", choices=("own", "own+nbr"))
    parser.add_argument("--radius", type=float, default=1.5, help="neighbours, in spot pitches")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--slide-norm", default="none", choices=("none", "center", "zscore"))
    parser.add_argument("--stages", default="all", help="'all', 'last' or stage indices 0,1,..")
    parser.add_argument("--hed-views", type=int, default=0, help="stain-jittered copies")
    parser.add_argument("--tail", action="store_true", help="cache the tail view (stevs_tail)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache).resolve()
    os.chdir(args.root)
    variants = {**VARIANTS, **json.loads(args.extra)}
    folds = [read_fold(p) for p in sorted(glob.glob(args.folds))]
    columns = stage_columns(args.preset, args.stages)
    results: dict[str, dict[int, list[float]]] = {}
    ensembles: dict[str, list[float]] = {}
    print("variant\tseed\tfold\ttest_r\tval_r\tbest_epoch\tseconds", flush=True)
    prepared = [(fold, prepare_fold(fold, args, cache, columns)) for fold in folds]
    for name in args.variants.split(","):  # variant by variant: each finishes all folds
        seeds = [0] if name.startswith("ridge") else [int(s) for s in args.seeds.split(",")]
        for fold, splits in prepared:
            predictions = []
            for seed in seeds:
                start = time.monotonic()
                r, val, epoch, prediction = run_one(name, fold, splits, variants, args, seed)
                predictions.append(prediction)
                results.setdefault(name, {}).setdefault(seed, []).append(r)
                print(f"{name}\t{seed}\t{fold.fold}\t{r:.4f}\t{val:.4f}\t{epoch}\t"
                      f"{time.monotonic() - start:.1f}", flush=True)  # fmt: skip
            if len(seeds) > 1:  # the seed ensemble: predictions averaged over the seeds
                mean = np.mean(predictions, axis=0)
                ensembles.setdefault(name, []).append(score(fold, splits["test"], mean))
    print("\nvariant\tmean over folds (per seed)\tmean\tsd over seeds\tper fold (mean over seeds)")
    for name, by_seed in results.items():
        means = [float(np.mean(v)) for v in by_seed.values()]
        per_fold = np.mean(np.asarray(list(by_seed.values())), axis=0)
        print(f"{name}\t{' '.join(f'{m:.4f}' for m in means)}\t{np.mean(means):.4f}\t"
              f"{np.std(means, ddof=1) if len(means) > 1 else 0.0:.4f}\t"
              f"{' '.join(f'{v:.3f}' for v in per_fold)}", flush=True)  # fmt: skip
    for name, per_fold in ensembles.items():
        print(f"{name}+seed_ensemble\t\t{np.mean(per_fold):.4f}\t\t"
              f"{' '.join(f'{v:.3f}' for v in per_fold)}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
