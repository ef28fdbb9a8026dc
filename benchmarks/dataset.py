"""Benchmark: patches per second from ``SpotDataset`` through a DataLoader.

Builds synthetic slide AnnDatas + HDF5 patch caches (default 4 slides x 2,500 spots of
224 x 224 patches, ~1.5 GB), writes leave-one-slide-out folds, then iterates the training
split of fold0 with batch 64 for 0, 2 and 4 workers and reports patches/s.

    .venv/bin/python benchmarks/dataset.py            # full size
    .venv/bin/python benchmarks/dataset.py --quick    # < 1 minute

The caches are read right after being written, so they sit in the page cache: the numbers
measure the HDF5 + DataLoader path, not a cold disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from stevs.data import SpotDataset
from stevs.folds import FoldOptions, make_folds

BANK = 64  # distinct synthetic textures per slide, cycled over the spots


def write_slide(root: Path, slide: str, n_spots: int, patch_px: int, compression: str | None):
    """One slide AnnData + a patch cache (one patch per chunk) of smooth random textures."""
    rng = np.random.default_rng(zlib.crc32(slide.encode()))
    side = int(np.ceil(np.sqrt(n_spots)))
    grid = np.indices((side, side)).reshape(2, -1).T[:n_spots]
    coords = 1000.0 + 200.0 * grid[:, ::-1].astype(np.float64)
    genes = [f"G{i:03d}" for i in range(120)]
    counts = rng.poisson(rng.gamma(0.8, 3.0, len(genes)), size=(n_spots, len(genes)))
    barcodes = [f"{slide}-{i:05d}" for i in range(n_spots)]
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame(index=genes),
    )
    adata.obsm["spatial"] = coords
    adata.uns["stevs"] = {"slide": slide, "patient": slide, "mpp": 0.5, "spot_pitch_um": 100.0}
    path = root / "slides" / f"{slide}.h5ad"
    adata.write_h5ad(path)

    coarse = rng.integers(60, 230, size=(BANK, patch_px // 8, patch_px // 8, 3), dtype=np.uint8)
    bank = coarse.repeat(8, axis=1).repeat(8, axis=2)
    bank = bank + rng.integers(0, 20, size=bank.shape, dtype=np.uint8)  # stain-like grain
    with h5py.File(root / "patches" / f"{slide}.h5", "w") as handle:
        data = handle.create_dataset(
            "patches",
            shape=(n_spots, patch_px, patch_px, 3),
            dtype=np.uint8,
            chunks=(1, patch_px, patch_px, 3),
            compression=compression,
        )
        for start in range(0, n_spots, 256):
            stop = min(start + 256, n_spots)
            data[start:stop] = bank[np.arange(start, stop) % BANK]
        handle.create_dataset("barcodes", data=np.asarray(barcodes, dtype=object))
        handle.create_dataset("centers_px", data=coords)
        handle.attrs.update({"patch_px": patch_px, "mpp_target": 2.0, "slide": slide})
    return path


def measure(dataset: SpotDataset, workers: int, batch_size: int, max_batches: int) -> dict:
    """Patches per second over up to ``max_batches`` batches, worker start-up included."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )
    start = time.perf_counter()
    first_batch_at = start
    n_patches = n_after_first = 0
    for index, batch in enumerate(loader):
        size = int(batch["patch"].shape[0])
        n_patches += size
        if index == 0:
            first_batch_at = time.perf_counter()
        else:
            n_after_first += size
        if index + 1 >= max_batches:
            break
    end = time.perf_counter()
    del loader
    seconds = end - start
    steady = n_after_first / (end - first_batch_at) if n_after_first else float("nan")
    return {
        "workers": workers,
        "patches": n_patches,
        "seconds": round(seconds, 3),
        "first_batch_s": round(first_batch_at - start, 3),
        "patches_per_s": round(n_patches / seconds, 1),
        "steady_patches_per_s": round(steady, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run, under a minute")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--spots", type=int, default=2500, help="spots per slide")
    parser.add_argument("--patch-px", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--max-batches", type=int, default=80, help="batches per measurement")
    parser.add_argument("--compression", choices=["none", "gzip", "lzf"], default="none")
    parser.add_argument("--workdir", help="keep the synthetic data here (default: temporary)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.slides, args.spots, args.max_batches = 2, 400, 5
    torch.set_num_threads(1)
    compression = None if args.compression == "none" else args.compression

    root = Path(args.workdir or tempfile.mkdtemp(prefix="stevs-bench-dataset-"))
    try:
        (root / "slides").mkdir(parents=True, exist_ok=True)
        (root / "patches").mkdir(exist_ok=True)
        start = time.perf_counter()
        paths = [
            write_slide(root, f"s{i}", args.spots, args.patch_px, compression)
            for i in tqdm(range(args.slides), desc="writing synthetic slides")
        ]
        write_s = time.perf_counter() - start
        options = FoldOptions(scheme="leave_one_slide_out", panel="highly_expressed", n_genes=50)
        fold = make_folds(paths, root / "patches", root / "folds", options)[0]
        start = time.perf_counter()
        dataset = SpotDataset(fold, "train")
        init_s = time.perf_counter() - start
        results = [measure(dataset, w, args.batch_size, args.max_batches) for w in args.workers]
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"{os.cpu_count()} CPU cores visible",
        "slides": args.slides,
        "spots_per_slide": args.spots,
        "patch_px": args.patch_px,
        "compression": args.compression,
        "batch_size": args.batch_size,
        "train_spots": len(dataset),
        "write_cache_s": round(write_s, 1),
        "dataset_init_s": round(init_s, 2),
        "results": results,
    }
    print(f"dataset init: {init_s:.2f} s for {len(dataset)} training spots")
    print(
        f"{'workers':>8} {'patches':>8} {'seconds':>8} {'first s':>8} {'patches/s':>10} "
        f"{'steady/s':>9}"
    )
    for row in results:
        print(
            f"{row['workers']:>8} {row['patches']:>8} {row['seconds']:>8.2f} "
            f"{row['first_batch_s']:>8.2f} {row['patches_per_s']:>10.1f} "
            f"{row['steady_patches_per_s']:>9.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
