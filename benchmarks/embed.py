"""Embedding throughput per encoder preset: patches/s of the frozen embedding pass
(:func:`stevs.embed.embed_patches`) from a patch file on disk, and how far its autocast
precision moves the features from float32.

For each preset, N random patches at the preset's input size are written to a temporary
HEST-layout patch file (``img``, ``barcode``, ``coords``), the encoder is built with random
weights (the published recipe, or ``--scale tiny``: :func:`stevs.models.presets.scaled_down`)
and the file is embedded twice after a warm-up batch: in float32, then in the precision the
preset runs in (``--precision auto``: the preset's own on CUDA, e.g. bfloat16 / HEST's
float16; float32 on a CPU). Reported per preset: patches/s of each pass, the largest absolute
difference between them relative to the float32 features' largest value, peak GPU memory.

    python benchmarks/embed.py --scale tiny --patches 256            # CPU, about 1 minute
    python benchmarks/embed.py --scale full --device cuda --patches 2048 --workers 8
    python benchmarks/embed.py --presets uni virchow2 --scale full --device cuda
    python benchmarks/embed.py --scale full --device cuda --batch-size auto   # sized to memory
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import torch

from stevs.device import resolve_device, resolve_precision
from stevs.embed import MIN_BATCH, auto_batch_size, batch_size_option, embed_patches, place_encoder
from stevs.io.patch_cache import HestPatchFile
from stevs.models.backbones import ImageBackbone
from stevs.models.presets import ENCODERS, scaled_down


def write_patch_file(path: Path, n: int, px: int, seed: int = 0) -> Path:
    """N random uint8 patches of ``px`` in HEST's patch-file layout."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        img = f.create_dataset("img", (n, px, px, 3), np.uint8, chunks=(1, px, px, 3))
        for start in range(0, n, 256):
            stop = min(n, start + 256)
            img[start:stop] = rng.integers(0, 256, (stop - start, px, px, 3), dtype=np.uint8)
        f["barcode"] = np.array([f"s{i}" for i in range(n)], dtype="S").reshape(-1, 1)
        f["coords"] = np.zeros((n, 2), np.int64)
    return path


def build(name: str, scale: str, device: torch.device) -> ImageBackbone:
    """The preset's encoder with random weights, full size or scaled down, on ``device``
    (parameters created there: a ViT-g is initialised on the GPU in seconds)."""
    spec = replace(ENCODERS[name].backbone, weights="none", weights_path=None)
    if scale == "tiny":
        spec = scaled_down(spec)
    with torch.device(device):
        backbone = ImageBackbone(spec)
    return place_encoder(backbone, device)[0]


def timed(backbone: ImageBackbone, patches: HestPatchFile, options: argparse.Namespace,
          precision: str, channels_last: bool) -> tuple[np.ndarray, float]:  # fmt: skip
    """Embed every patch; (features, patches/s) after a one-batch warm-up."""
    run = {"batch_size": options.batch_size, "workers": options.workers, "progress": False,
           "precision": precision, "channels_last": channels_last}  # fmt: skip
    embed_patches(backbone, patches, np.arange(min(len(patches), options.batch_size)), **run)
    device = next(backbone.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    features = embed_patches(backbone, patches, **run)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return features, len(patches) / (time.perf_counter() - start)


def measure(name: str, options: argparse.Namespace, folder: Path) -> dict:
    """One preset's row."""
    device = resolve_device(options.device)
    backbone = build(name, options.scale, device)
    px = backbone.spec.img_size
    path = folder / f"{px}.h5"
    if not path.exists():
        write_patch_file(path, options.patches, px)
    precision = resolve_precision(options.precision, device, ENCODERS[name].embed_precision)
    channels_last = device.type == "cuda" and backbone.spec.pooling == "stages"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with HestPatchFile(path) as patches:
        if options.batch_size is None:  # --batch-size auto: sized once, to the fast pass
            probe = patches.read_rows(np.arange(min(len(patches), MIN_BATCH)))
            size = auto_batch_size(backbone, probe, "none", precision, channels_last)
            options = argparse.Namespace(**{**vars(options), "batch_size": size})
        full, fp32_rate = timed(backbone, patches, options, "float32", channels_last)
        fast, rate = timed(backbone, patches, options, precision, channels_last)
    scale = float(np.abs(full).max()) or 1.0
    row = {
        "preset": name, "scale": options.scale, "device": str(device), "px": px,
        "dim": int(full.shape[1]), "patches": len(full), "precision": precision,
        "batch_size": options.batch_size,
        "patches_per_s": round(rate, 1), "patches_per_s_float32": round(fp32_rate, 1),
        "max_rel_diff": float(np.abs(fast - full).max()) / scale,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda" else None,
    }  # fmt: skip
    del backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally write) one JSON row per preset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--batch-size", type=batch_size_option, default=64, help="or auto")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write the rows here")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stevs-embed-bench-") as tmp:
        for name in options.presets:
            rows.append(measure(name, options, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    if options.json:
        meta = {"python": sys.version.split()[0], "torch": torch.__version__,
                "machine": platform.processor() or platform.machine()}  # fmt: skip
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name(0)
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
