"""Training throughput: the patch-cache data path against in-memory tensors, in one run.

Builds a synthetic study (slide AnnDatas + HDF5 patch caches + a fold file, following
docs/architecture.md), then times the same training step (to device, augmentation,
forward, backward, AdamW step) fed two ways:

- ``cache``: ``stevs.data.SpotDataset`` + the training DataLoader (``--workers`` processes);
- ``memory``: the same spots pre-stacked as tensors, batches sliced in the main process.

The goal is that the data path costs under 10% (``overhead = 1 - cache / memory``).

    python benchmarks/train.py --quick                  # < 1 minute on 2 CPU cores
    python benchmarks/train.py --spots 4096 --steps 40  # cpu_small, fuller run
    python benchmarks/train.py --preset swin_t --device cuda --spots 8192 --steps 100
    python benchmarks/train.py ... --channels-last --compile   # as benchmarks/gpu_check.sh

On CUDA the forward pass runs under bf16 autocast and the peak GPU memory is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
import torch

from stevs.data import SpotDataset
from stevs.device import resolve_device
from stevs.io.fold_file import Fold, SlideEntry, write_fold
from stevs.models import create_model, get_preset
from stevs.training.batches import (
    EpochSampler,
    augment_patches,
    collate,
    make_loader,
    to_device,
)

N_GENES = 64


def write_study(directory: Path, n_spots: int, patch_px: int, n_slides: int = 2) -> Path:
    """``n_slides`` synthetic slides (AnnData + patch cache) and a fold file; its path."""
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(N_GENES)]
    entries = []
    per_slide = n_spots // n_slides
    for s in range(n_slides):
        slide = f"bench{s}"
        darkness = rng.uniform(0, 1, per_slide)
        base = np.array([200, 120, 180], dtype=np.float32)
        patches = np.empty((per_slide, patch_px, patch_px, 3), dtype=np.uint8)
        for i in range(per_slide):  # no full-size temporaries for big runs
            noise = rng.integers(0, 30, (patch_px, patch_px, 3))
            patches[i] = np.clip(base * (1 - 0.6 * darkness[i]) + noise, 0, 255)
        counts = rng.poisson(np.exp(1 + np.outer(darkness, np.linspace(-1, 1, N_GENES)))) + 1
        barcodes = [f"{slide}-{i}" for i in range(per_slide)]
        side = int(np.ceil(np.sqrt(per_slide)))
        xy = np.stack(np.divmod(np.arange(per_slide), side), axis=1)[:, ::-1] * 100.0
        adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)))
        adata.obs_names, adata.var_names = barcodes, genes
        adata.obsm["spatial"] = xy
        adata.write_h5ad(directory / f"{slide}.h5ad")
        with h5py.File(directory / f"{slide}.h5", "w") as handle:
            handle.create_dataset("patches", data=patches, chunks=(1, patch_px, patch_px, 3))
            handle.create_dataset(
                "barcodes", data=np.array(barcodes, dtype=object), dtype=h5py.string_dtype()
            )
            handle.create_dataset("centers_px", data=xy)
            handle.attrs.update({"patch_px": patch_px, "mpp_target": 2.0, "slide": slide})
        entries.append(
            SlideEntry(
                slide, slide, str(directory / f"{slide}.h5ad"), str(directory / f"{slide}.h5")
            )
        )
    fold = Fold(
        fold="bench",
        scheme="leave_one_slide_out",
        seed=0,
        train=[e.slide for e in entries[:-1]] if n_slides > 1 else [entries[0].slide],
        val=[],
        test=[entries[-1].slide],
        genes=genes,
        headline_genes=genes,
        panel={"method": "gene_list", "n": N_GENES},
        normalisation={
            "method": "log1p_cp10k",
            "target_sum": 1e4,
            "mean": [1.0] * N_GENES,
            "std": [1.0] * N_GENES,
        },
        slides=entries,
    )
    return write_fold(fold, directory / "bench.json")


def time_steps(
    model,
    optimizer,
    batches,
    device: torch.device,
    steps: int,
    warmup: int,
    channels_last: bool = False,
) -> float:
    """Spots per second over ``steps`` training steps after ``warmup`` untimed ones.

    On CUDA the forward pass runs under bf16 autocast; ``channels_last`` hands the patches
    to the model in NHWC memory order (the model itself is converted by the caller).
    """
    model.train()
    iterator = iter(batches)
    n_spots = 0
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            n_spots = 0
        batch = to_device(next(iterator), device)
        batch["patch"] = augment_patches(batch["patch"])
        if channels_last:
            batch["patch"] = batch["patch"].contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = model(batch, 0.1)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        n_spots += int(batch["target"].shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_spots / (time.perf_counter() - start)


def cycle(loader, sampler):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def memory_batches(dataset: SpotDataset, batch_size: int):
    """All spots stacked once; batches are random slices (the in-memory reference)."""
    items = collate([dataset[i] for i in range(len(dataset))])
    n = len(dataset)
    generator = torch.Generator().manual_seed(0)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in items.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--method", default="stevs")
    parser.add_argument("--spots", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="small run, under a minute")
    parser.add_argument("--json", help="write the numbers here too")
    parser.add_argument(
        "--channels-last", action="store_true", help="model and patches in NHWC memory order"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (inductor; 'eager' checks the code path without compiling)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.spots, args.steps, args.warmup = 768, 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    preset = get_preset(args.preset, weights="none")
    results: dict[str, object] = {
        "preset": args.preset,
        "method": args.method,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "spots": args.spots,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "workers": args.workers,
        "patch_px": preset.patch_px,
        "bf16_autocast": device.type == "cuda",
        "channels_last": args.channels_last,
        "compile": args.compile_backend if args.compile else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        fold_path = write_study(Path(tmp), args.spots * 2, preset.patch_px)
        dataset = SpotDataset(fold_path, "train")
        torch.manual_seed(0)
        model = create_model(args.method, preset, dataset.genes, dataset.fold.normalisation)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if args.compile:
            model = torch.compile(model, backend=args.compile_backend)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sampler = EpochSampler(len(dataset), 0)
        loader = make_loader(dataset, args.batch_size, args.workers, device, sampler, True)
        # alternate the two feeds twice so that drift in machine load hits both alike
        cache, memory = [], []
        cache_iter, memory_iter = cycle(loader, sampler), memory_batches(dataset, args.batch_size)
        timing = (device, args.steps, args.warmup, args.channels_last)
        for _ in range(2):
            cache.append(time_steps(model, optimizer, cache_iter, *timing))
            memory.append(time_steps(model, optimizer, memory_iter, *timing))
        dataset.close()
    if device.type == "cuda":
        results["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    results["cache_spots_per_s"] = round(float(np.mean(cache)), 1)
    results["memory_spots_per_s"] = round(float(np.mean(memory)), 1)
    results["data_path_overhead"] = round(
        1 - results["cache_spots_per_s"] / results["memory_spots_per_s"], 3
    )
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
