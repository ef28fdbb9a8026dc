"""Benchmark: ``stevs predict-slide`` on a gigapixel slide (time per stage, peak memory).

The slide is the synthetic pyramidal JPEG TIFF of ``benchmarks/tiling.py`` (a periodic
H&E-like texture at 0.25 µm/px, written from pre-encoded tiles in seconds): 40,960 px a
side (1.68 gigapixels, 5 GB decoded) in the full run, 10,240 px in ``--quick``. The model
is an untrained ``cpu_small`` STevs (random weights; speed does not depend on them) on
64 px patches at 2 µm/px; the Visium grid (55 µm spots, 100 µm pitch) is laid over the
tissue. Each run is a subprocess, so its peak resident memory (``VmHWM``) is its own.

Usage::

    .venv/bin/python -W ignore benchmarks/predict_slide.py            # full (minutes)
    .venv/bin/python -W ignore benchmarks/predict_slide.py --quick    # < 1 minute
    .venv/bin/python -W ignore benchmarks/predict_slide.py --quick --hd --threads 1  # 16 µm bins
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "out" / "predict_slide"
GENES = ["TUMOUR_1", "STROMA_1", "FAT_1", "IMMUNE_1", "GENE_001", "GENE_002"]


def _tiling_benchmark():
    """benchmarks/tiling.py as a module (for its synthetic slide writer)."""
    spec = importlib.util.spec_from_file_location("bench_tiling", REPO / "benchmarks" / "tiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(directory: Path) -> Path:
    """An untrained cpu_small STevs folder as 'stevs train' writes it (64 px at 2 µm/px)."""
    import torch

    from stevs.io.model_dir import ModelDir
    from stevs.models import create_model
    from stevs.models.presets import get_preset

    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(0)
    preset = get_preset("cpu_small")
    norm = {"method": "log1p_cp10k", "target_sum": 1e4, "mean": [1.0] * 6, "std": [1.0] * 6}
    model = create_model("stevs", preset, GENES, norm)
    directory.mkdir(parents=True, exist_ok=True)
    ModelDir(directory).write_tensors(model.state_dict(), {"method": "stevs"})
    config = {
        "method": "stevs",
        "fold": "fold0",
        "model": model.config.to_dict(),
        "genes": GENES,
        "normalisation": norm,
        "patches": {"patch_px": 64, "mpp_target": 2.0},
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def child(args: argparse.Namespace) -> None:
    """One predict_slide run; prints a JSON line with its timings and peak memory."""
    import torch

    from stevs.predict_slide import predict_slide

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = predict_slide(
        args.slide,
        "bench",
        [args.model],
        args.out / f"run_t{args.threads}",
        threads=args.threads,
        device="cpu",
        batch_size=64,
        n_samples=args.samples,
        genes=GENES[:2],
        progress=False,
        grid=args.grid,
        pitch_um=args.pitch,
        spot_um=args.spot,
    )
    total = time.perf_counter() - started
    peak_mb = _tiling_benchmark().peak_rss_mb()
    print(
        json.dumps(
            {
                "threads": args.threads,
                "spots": result.n_spots,
                "seconds": round(total, 2),
                "spots_per_s": round(result.n_spots / total, 1),
                "stages": {k: round(v, 2) for k, v in result.seconds.items()},
                "peak_rss_mb": round(peak_mb),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,240 px slide (< 1 minute)")
    parser.add_argument("--size", type=int, help="slide side in px (overrides --quick)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=16, help="posterior samples")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--grid", default="visium", help="visium (default) or square")
    parser.add_argument("--pitch", type=float, default=100.0, help="grid pitch in µm (100)")
    parser.add_argument("--spot", type=float, default=55.0, help="spot diameter in µm (55)")
    parser.add_argument(
        "--hd",
        action="store_true",
        help="Visium HD-scale grid: square 16 µm bins (--grid square --pitch 16 --spot 16)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hd:
        args.grid, args.pitch, args.spot = "square", 16.0, 16.0
    if args.child:
        args.threads = args.threads[0]
        child(args)
        return

    size = args.size or (10_240 if args.quick else 40_960)
    started = time.perf_counter()
    slide = _tiling_benchmark().make_synthetic_slide(args.out / f"slide_{size}.tif", size)
    print(
        f"slide {slide}: {size} x {size} px ({size * size / 1e9:.2f} Gpx), "
        f"made in {time.perf_counter() - started:.1f} s"
    )
    model = make_model(args.out / "model")
    results = []
    for threads in args.threads:
        command = [
            sys.executable, "-W", "ignore", __file__, "--child", "--slide", str(slide),
            "--model", str(model), "--threads", str(threads), "--samples", str(args.samples),
            "--out", str(args.out), "--grid", args.grid, "--pitch", str(args.pitch),
            "--spot", str(args.spot),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            sys.exit(f"run with {threads} threads failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result.update(slide_px=size, grid=f"{args.grid} {args.pitch:g} µm, {args.spot:g} µm spots")
        results.append(result)
        print(json.dumps(result))
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"python {platform.python_version()}\n"
    )
    print(
        "| threads | spots | total s | tissue s | tiling s | predict s | outputs s "
        "| spots/s | peak RSS MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["stages"]
        print(
            f"| {r['threads']} | {r['spots']:,} | {r['seconds']} | {s['tissue']} | "
            f"{s['tiling']} | {s['predict']} | {s['outputs']} | {r['spots_per_s']} | "
            f"{r['peak_rss_mb']:,} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
