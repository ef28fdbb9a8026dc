"""HEST-Benchmark from one command (``stevs hest-bench``): HEST's protocol, exactly, on a local
copy of its bench folder with one stevs encoder preset, and STevs on the same features.

The bench folder is HEST's ``bench_data`` (Hugging Face dataset ``MahmoodLab/hest-bench``):
one folder per task (``IDC``, ``PRAD``, ...) holding ``splits/train_{i}.csv`` +
``test_{i}.csv`` (``sample_id``, ``patches_path``, ``expr_path``), ``patches/*.h5`` (``img``,
``barcode``, ``coords``), ``adata/*.h5ad`` and ``var_50genes.json``. The protocol, as
mahmoodlab/HEST ``src/hest/bench/benchmark.py`` and ``trainer.py`` run it:

* every patch of every sample is embedded once per task, at the size it is stored (224 px at
  0.5 µm/px; ``predict_folds`` embeds on split 0 and reuses it; benchmark.py:253-271);
* targets: ``adata[barcodes][:, genes]`` in the patch file's barcode order, ``log1p`` of X
  (``load_adata`` / ``normalize_adata``, st_dataset.py:11-45; ``normalize`` True by default);
* per split, the train samples' spots are concatenated, ``StandardScaler`` + ``PCA(256,
  random_state=seed)`` is fitted on them and applied to the test spots, both cast to float32
  (``torch.Tensor``; benchmark.py:310-315);
* ``Ridge(solver="lsqr", alpha=100 / (n_components * n_genes), fit_intercept=False,
  max_iter=1000, random_state=seed)`` (trainer.py:11-22);
* per gene, ``scipy.stats.pearsonr`` over all test spots of the split pooled; the split's
  score is the mean over genes (and std) (trainer.py:66-91);
* the task's score is the mean over splits, ± their (population) std
  (``merge_fold_results``, benchmark.py:331-352); seed 1 (``BenchmarkConfig``).

STevs runs beside the probe on the same embeddings: per split, a frozen-encoder STevs
(neighbourhood context, ridge linear path; the preset's defaults) trained with the stevs
training loop on the training samples' spots for ``--stevs-epochs`` epochs (no validation
split: HEST has none, so no early stopping), scored on the same test spots by the same
formula. Its model folders sit under ``{out}/models/``; a rerun reuses finished ones.

Outputs in ``--out``: ``hest_bench.tsv`` (task rows, one column per method, "mean ± sd",
and the average over tasks), ``leaderboard.md`` (the HEST README's shape: method rows, task
columns, Average), ``dataset_results.csv`` (HEST's own file: ``dataset``,
``{name}_mean``, ``{name}_std``), ``per_split.tsv``, ``per_gene.tsv`` and ``run.json`` (the
options, tasks and stevs version).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stevs import __version__
from stevs.atomic import (
    atomic_path,
    atomic_write_text,
    check_replaceable,
    first_bytes,
    is_json_with,
    is_tsv_with,
)
from stevs.errors import StevsInputError
from stevs.io.expression import read_hest_bench_expression
from stevs.io.patch_cache import HestPatchFile
from stevs.io.samples import read_hest_bench_splits
from stevs.metrics import hest_pearson, is_stevs_table, write_tsv_atomic
from stevs.models.presets import PRESETS, Preset, get_preset
from stevs.options import non_negative_int, positive_int
from stevs.panels import normalise, read_gene_list

log = logging.getLogger("stevs.hest_bench")

#: HEST's defaults (benchmark.py ``BenchmarkConfig``)
HEST_SEED = 1
HEST_LATENT_DIM = 256
HEST_GENE_LIST = "var_50genes.json"
#: the methods of the table: HEST's probe, and STevs on the same features
PROBE, STEVS = "hest_probe", "stevs"


@dataclass
class Sample:
    """One bench sample: its spots' embeddings, HEST targets and what STevs needs."""

    sample_id: str
    embeddings: np.ndarray  # (n, D) float32, patch-file order
    values: np.ndarray  # (n, G) X at the genes, float64, as stored
    library_size: np.ndarray  # (n,) total of X over all genes
    coords: np.ndarray  # (n, 2) HEST's level-0 top-left corners

    @property
    def targets(self) -> np.ndarray:
        """HEST's targets: log1p of X (st_dataset.py:33), float64."""
        return normalise(self.values, self.library_size, "log1p", dtype=np.float64)


@dataclass
class BenchOptions:
    """What ``stevs hest-bench`` runs: the encoder and HEST's / STevs's settings."""

    encoder: str
    weights: str | None = None
    latent_dim: int = HEST_LATENT_DIM
    seed: int = HEST_SEED
    gene_list: str = HEST_GENE_LIST
    stevs: bool = True
    stevs_epochs: int = 10
    device: str = "auto"
    batch_size: int | None = None  # None: stevs.embed.auto_batch_size
    workers: int = 0
    precision: str = "auto"


# --------------------------------------------------------------------------- HEST's formulas


def hest_probe(
    x_train: np.ndarray, x_test: np.ndarray, y_train: np.ndarray, latent_dim: int, seed: int
) -> tuple[np.ndarray, dict[str, float]]:
    """HEST's linear probe: standardise + PCA fitted on the training spots (benchmark.py:310-315,
    cast to float32 as its ``torch.Tensor`` does), then ridge without intercept, alpha
    ``100 / (n_components * n_genes)`` (trainer.py:11-22). Predictions of the test spots."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    limit = min(x_train.shape)
    if latent_dim > limit:
        raise StevsInputError(
            None,
            f"--latent-dim {latent_dim}: PCA needs at most min(training spots, embedding "
            f"width) = {limit} components",
        )
    pipe = Pipeline(
        [("scaler", StandardScaler()), ("PCA", PCA(n_components=latent_dim, random_state=seed))]
    )
    train = pipe.fit_transform(x_train).astype(np.float32)
    test = pipe.transform(x_test).astype(np.float32)
    alpha = 100 / (train.shape[1] * y_train.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=1000)
    reg.fit(train, y_train)
    return reg.predict(test), {"alpha": alpha, "n_components": int(train.shape[1])}


def split_score(observed: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-gene r (:func:`stevs.metrics.hest_pearson`) and HEST's split score: their
    ``np.mean`` and ``np.std`` (trainer.py:90-91; a NaN gene makes the mean NaN, as there)."""
    r = hest_pearson(observed, predicted)
    return r, float(np.mean(r)), float(np.std(r))


def task_score(split_means: list[float]) -> tuple[float, float]:
    """HEST's task score: mean and population std of the split means (benchmark.py:350-352)."""
    return float(np.mean(split_means)), float(np.std(split_means))


# --------------------------------------------------------------------------- data


def bench_tasks(bench_dir: Path, tasks: list[str] | None) -> list[str]:
    """The tasks to run: those named, else every folder of ``bench_dir`` with ``splits/``."""
    if not bench_dir.is_dir():
        raise StevsInputError(bench_dir, "bench folder not found (HEST's bench_data)")
    found = sorted(p.name for p in bench_dir.iterdir() if (p / "splits").is_dir())
    if tasks:
        unknown = [t for t in tasks if t not in found]
        if unknown:
            raise StevsInputError(
                bench_dir, f"no task {', '.join(unknown)} (a folder with splits/); has {found}"
            )
        return list(tasks)
    if not found:
        raise StevsInputError(bench_dir, "no task folder with a splits/ folder inside")
    return found


def load_sample(task_dir: Path, row: dict[str, str], genes: list[str], embed: Any) -> Sample:
    """Embed one sample's patch file and read its expression at the patch file's barcodes."""
    with HestPatchFile(task_dir / row["patches_path"]) as patches:
        embeddings = embed(patches)
        barcodes, coords = list(patches.barcodes), patches.coords
    values, library = read_hest_bench_expression(task_dir / row["expr_path"], barcodes, genes)
    return Sample(row["sample_id"], embeddings, values, library, coords)


def _stack(samples: list[Sample], what: str) -> np.ndarray:
    return np.concatenate([getattr(s, what) for s in samples])


# --------------------------------------------------------------------------- STevs


def _embedding_data(samples: list[Sample]) -> Any:
    """The samples' spots as the training loop's frozen-embedding items (each sample is a
    slide: per-slide normalised coordinates, its index as the slide)."""
    import torch

    from stevs.data import normalise_coords
    from stevs.training.batches import EmbeddingDataset

    targets = _stack(samples, "targets").astype(np.float32)
    items = {
        "coords": torch.from_numpy(np.concatenate([normalise_coords(s.coords) for s in samples])),
        "target": torch.from_numpy(targets),
        "counts": torch.from_numpy(_stack(samples, "values").astype(np.float32)),
        "library_size": torch.from_numpy(_stack(samples, "library_size").astype(np.float32)),
        "slide": torch.from_numpy(
            np.concatenate([np.full(len(s.values), i, np.int64) for i, s in enumerate(samples)])
        ),
    }
    return EmbeddingDataset(torch.from_numpy(_stack(samples, "embeddings")), items)


def stevs_split(
    train: list[Sample],
    test: list[Sample],
    genes: list[str],
    preset: Preset,
    backbone: Any,
    options: BenchOptions,
    out_dir: Path,
) -> np.ndarray:
    """A frozen-encoder STevs trained on the training samples' embeddings (the stevs loop,
    ``options.stevs_epochs`` epochs) -> its predicted means of the test spots (log1p)."""
    import torch

    from stevs.io.model_dir import ModelDir
    from stevs.models.factory import create_model
    from stevs.panels import TrainingCounts, normalisation_stats
    from stevs.predict import predict_patches
    from stevs.training.fold import fit_model
    from stevs.training.options import TrainOptions

    values, library = _stack(train, "values"), _stack(train, "library_size")
    batch = np.concatenate([np.full(len(s.values), s.sample_id) for s in train])
    norm = normalisation_stats(TrainingCounts(values, library, batch, genes), genes, "log1p")
    train_options = TrainOptions(
        epochs=options.stevs_epochs, freeze_backbone=True, seed=options.seed, workers=0,
        device=options.device,
    ).resolved(preset)  # fmt: skip
    torch.manual_seed(options.seed)
    model = create_model("stevs", preset, genes, norm, frozen=True, backbone=backbone)
    config = {
        "method": STEVS, "fold": out_dir.name, "preset": preset.to_dict(),
        "model": model.config.to_dict(), "genes": genes, "headline_genes": genes,
        "normalisation": norm, "training_slides": sorted(s.sample_id for s in train),
        "protocol": "hest_bench", "training": asdict(train_options),
    }  # fmt: skip
    fit_model(model, (_embedding_data(train), None), out_dir, train_options, config)
    state = ModelDir(out_dir).read_tensors()  # the stored run (also when it was already done)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("backbone.") for k in missing):
        raise StevsInputError(out_dir, "the model folder does not hold this STevs model")
    mean, _ = predict_patches(model.eval(), _embedding_data(test), n_samples=0, progress=False)
    return mean.astype(np.float64)


# --------------------------------------------------------------------------- the run


def _encoder(options: BenchOptions) -> tuple[Preset, Any, Any]:
    """The preset, its frozen backbone on the device, and ``patch file -> embeddings``."""
    from stevs.device import resolve_device, resolve_precision
    from stevs.embed import embed_patches, place_encoder
    from stevs.models.backbones import ImageBackbone

    preset = get_preset(options.encoder, weights=options.weights)
    if preset.backbone.weights == "none":
        log.warning("%s: random weights (--weights none): a test run, not a benchmark", preset.name)
    device = resolve_device(options.device)
    backbone, channels_last = place_encoder(ImageBackbone(preset.backbone), device)
    precision = resolve_precision(options.precision, device, preset.embed_precision)
    log.info("%s on %s, %s", preset.name, device, precision)

    def embed(patches: HestPatchFile) -> np.ndarray:
        return embed_patches(
            backbone, patches, batch_size=options.batch_size, workers=options.workers,
            precision=precision, channels_last=channels_last, progress=False,
        )  # fmt: skip

    return preset, backbone, embed


def run_task(
    task_dir: Path, options: BenchOptions, encoder: tuple[Preset, Any, Any], out: Path
) -> list[dict[str, Any]]:
    """Every split of one task: per split and method, the per-gene r and HEST's numbers."""
    preset, backbone, embed = encoder
    splits = read_hest_bench_splits(task_dir / "splits")
    genes = read_gene_list(task_dir / options.gene_list)
    samples: dict[str, Sample] = {}
    for train_rows, test_rows in splits:  # every sample embedded once per task
        for row in [*train_rows, *test_rows]:
            if row["sample_id"] not in samples:
                samples[row["sample_id"]] = load_sample(task_dir, row, genes, embed)
    results = []
    for index, (train_rows, test_rows) in enumerate(splits):
        train = [samples[r["sample_id"]] for r in train_rows]
        test = [samples[r["sample_id"]] for r in test_rows]
        observed = _stack(test, "targets")
        predicted, fitted = hest_probe(
            _stack(train, "embeddings"), _stack(test, "embeddings"), _stack(train, "targets"),
            options.latent_dim, options.seed,
        )  # fmt: skip
        methods = {PROBE: predicted}
        if options.stevs:
            folder = out / "models" / preset.name / task_dir.name / f"split{index}"
            methods[STEVS] = stevs_split(train, test, genes, preset, backbone, options, folder)
        for method, prediction in methods.items():
            r, mean, std = split_score(observed, prediction)
            log.info("%s split %d %s: pearson %.4f ± %.4f", task_dir.name, index, method, mean,
                     std)  # fmt: skip
            results.append({
                "task": task_dir.name, "method": method, "split": index, "genes": genes,
                "r": r, "pearson_mean": mean, "pearson_std": std,
                "n_train": sum(len(s.values) for s in train), "n_test": len(observed),
                **(fitted if method == PROBE else {}),
            })  # fmt: skip
    return results


def _label(method: str, encoder: str) -> str:
    """A table column: the encoder's name for HEST's probe, ``encoder+stevs`` for STevs."""
    return encoder if method == PROBE else f"{encoder}+{method}"


def _cell(mean: float, std: float) -> str:
    return "nan" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def tables(results: list[dict[str, Any]], encoder: str) -> dict[str, pd.DataFrame]:
    """The long tables (per gene, per split) and the per-task table (task x method)."""
    per_gene = pd.DataFrame([
        {"task": r["task"], "method": _label(r["method"], encoder), "split": r["split"],
         "gene": gene, "pearson_r": value}
        for r in results for gene, value in zip(r["genes"], r["r"], strict=True)
    ])  # fmt: skip
    keep = ["task", "method", "split", "pearson_mean", "pearson_std", "n_train", "n_test",
            "alpha", "n_components"]  # fmt: skip
    per_split = pd.DataFrame(results).reindex(columns=keep)
    per_split["method"] = [_label(m, encoder) for m in per_split["method"]]
    rows = []
    for (task, method), group in per_split.groupby(["task", "method"], sort=False):
        mean, std = task_score(list(group["pearson_mean"]))
        rows.append({"task": task, "method": method, "mean": mean, "std": std})
    per_task = pd.DataFrame(rows)
    return {"per_gene": per_gene, "per_split": per_split, "per_task": per_task}


def write_tables(found: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    """``hest_bench.tsv``, ``leaderboard.md``, ``dataset_results.csv`` and the long tables."""
    per_task = found["per_task"]
    methods = list(dict.fromkeys(per_task["method"]))
    tasks = list(dict.fromkeys(per_task["task"]))
    mean = per_task.pivot(index="task", columns="method", values="mean").loc[tasks, methods]
    std = per_task.pivot(index="task", columns="method", values="std").loc[tasks, methods]
    cells = pd.DataFrame(
        {m: [_cell(mean.at[t, m], std.at[t, m]) for t in tasks] for m in methods}, index=tasks
    )
    # the average over tasks, NaN-propagating as np.mean there (benchmark.py:167-168)
    cells.loc["Average"] = [f"{np.mean(mean[m].to_numpy()):.4f}" for m in methods]
    table = cells.rename_axis("task").reset_index()
    hest = pd.DataFrame({"dataset": tasks})
    for m in methods:
        hest[f"{m}_mean"], hest[f"{m}_std"] = mean[m].to_numpy(), std[m].to_numpy()
    board = table.set_index("task").T.rename_axis("Model").reset_index()
    checks = output_checks(out)
    csv, md = out / "dataset_results.csv", out / "leaderboard.md"
    with atomic_path(out / "hest_bench.tsv", replaces=checks[out / "hest_bench.tsv"]) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    return [
        write_tsv_atomic(found["per_gene"], out / "per_gene.tsv"),
        write_tsv_atomic(found["per_split"], out / "per_split.tsv"),
        atomic_write_text(csv, hest.to_csv(), checks[csv]),
        atomic_write_text(md, _markdown(board), checks[md]),
        out / "hest_bench.tsv",
    ]


def output_checks(out: Path) -> dict[Path, Callable[[Path], bool]]:
    """Each file ``stevs hest-bench`` writes in ``out`` and how it knows an earlier one of
    its own (anything else there is never replaced)."""
    return {
        out / "per_gene.tsv": is_stevs_table,
        out / "per_split.tsv": is_stevs_table,
        out / "hest_bench.tsv": lambda p: is_tsv_with(p, "task"),
        out / "dataset_results.csv": lambda p: first_bytes(p).startswith(b",dataset,"),
        out / "leaderboard.md": lambda p: first_bytes(p).startswith(b"| Model |"),
        out / "run.json": lambda p: is_json_with(p, "stevs_version", "bench_dir", "tasks"),
    }


def _markdown(table: pd.DataFrame) -> str:
    """A markdown table, as the HEST README's leaderboard."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def run_bench(
    bench_dir: str | os.PathLike, out: str | os.PathLike, options: BenchOptions,
    tasks: list[str] | None = None,
) -> dict[str, pd.DataFrame]:  # fmt: skip
    """HEST-Benchmark with ``options.encoder`` (and STevs beside it) -> tables in ``out``."""
    from stevs.atomic import check_writable

    bench, out = Path(bench_dir), Path(out)
    names = bench_tasks(bench, tasks)
    check_writable(out)
    check_replaceable(output_checks(out))  # before any work
    encoder = _encoder(options)
    results = []
    for name in names:
        results += run_task(bench / name, options, encoder, out)
    found = tables(results, options.encoder)
    paths = write_tables(found, out)
    run = {"stevs_version": __version__, "bench_dir": str(bench.resolve()), "tasks": names,
           "options": asdict(options)}  # fmt: skip
    run_json = out / "run.json"
    atomic_write_text(run_json, json.dumps(run, indent=1) + "\n", output_checks(out)[run_json])
    log.info("HEST-Benchmark, %s: %s", options.encoder, paths[-1])
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs hest-bench``."""
    from stevs.embed import add_embedding_arguments

    parser.add_argument("--bench-dir", required=True, help="HEST's bench_data folder (tasks)")
    parser.add_argument("--encoder", required=True, choices=sorted(PRESETS), help="preset")
    parser.add_argument(
        "--weights", help="encoder weights: 'hf' (default for the published encoders: the "
        "Hugging Face cache), 'timm', 'none' (random: a test) or a local file",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="folder of the tables (and STevs models)")
    parser.add_argument("--tasks", nargs="+", help="task folders to run (default: all)")
    parser.add_argument("--latent-dim", type=positive_int(), default=HEST_LATENT_DIM,
                        help="PCA components of HEST's probe")  # fmt: skip
    parser.add_argument(
        "--seed",
        type=non_negative_int(),
        default=HEST_SEED,
        help="seed of HEST's probe and of STevs",
    )
    parser.add_argument("--gene-list", default=HEST_GENE_LIST, help="file in each task folder")
    parser.add_argument("--no-stevs", dest="stevs", action="store_false",
                        help="HEST's probe only")  # fmt: skip
    parser.add_argument(
        "--stevs-epochs", type=positive_int(), default=10, help="STevs's epochs per split"
    )
    add_embedding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``stevs hest-bench``."""
    from stevs.cli import options_from_args

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_bench(args.bench_dir, args.out, options_from_args(BenchOptions, args), args.tasks)
    return 0
