"""Benchmark: stevs tiling vs the naive one-read-per-spot loop (patches/s and peak memory).

Two inputs:

(a) a synthetic pyramidal TIFF (40,960 x 40,960 px at 0.25 µm/px, JPEG tiles of a
    periodic H&E-like texture, written from pre-encoded tiles so it takes seconds) with
    spots on a Visium hexagonal 100 µm pitch (~12,000 spots);
(b) the her2st section C2 (plain 9274 x 9911 JPEG, ~0.686 µm/px, 187 legacy-ST spots).

Variants, each in its own subprocess so that peak memory (``VmHWM`` of
``/proc/self/status``: ``ru_maxrss`` would carry the parent's peak over ``exec``) is its own:

* ``naive``: what ST-Net/HisToGene-style code does: for every spot one
  ``OpenSlide.read_region`` at level 0 (for a plain JPEG: crop of the whole decoded image),
  then a Pillow resize to 224 x 224; written to the same HDF5 layout;
* ``stevs-tN``: :func:`stevs.tiling.tile_slide` with N threads.

The patches of ``naive`` and ``stevs-t1`` are compared (mean absolute difference, PSNR).

Usage::

    .venv/bin/python benchmarks/tiling.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/tiling.py --quick    # 10,240 px slide, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "out" / "tiling"
DEFAULT_HER2ST = REPO.parent / "shared" / "data" / "her2st"
TILE = 256
PERIOD = 2048  # the texture repeats every 2048 level-0 px (8 tiles)
PATCH_PX, PATCH_MPP = 224, 0.5


# -- synthetic slide ---------------------------------------------------------------------------


def _periodic_noise(rng: np.random.Generator, size: int, scale_px: float) -> np.ndarray:
    """Smooth periodic noise in [0, 1] with features about ``scale_px`` wide."""
    freq = np.fft.fftfreq(size)
    radius2 = freq[:, None] ** 2 + freq[None, :] ** 2
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) * np.exp(
        -radius2 * (math.pi * scale_px) ** 2
    )
    field = np.fft.ifft2(spectrum).real
    return (field - field.min()) / (np.ptp(field) + 1e-12)


def he_texture(size: int = PERIOD, seed: int = 0) -> np.ndarray:
    """A periodic H&E-like RGB texture at 0.25 µm/px: stroma, nuclei, a few lumens."""
    rng = np.random.default_rng(seed)
    stroma = _periodic_noise(rng, size, 60.0)
    image = np.empty((size, size, 3), np.float32)
    pink_dark, pink_light = np.array([200, 110, 170]), np.array([240, 190, 220])
    image[:] = pink_dark + (pink_light - pink_dark) * stroma[..., None]
    # nuclei: random impulses convolved (periodically) with a disc of radius ~3 µm
    impulses = (rng.random((size, size)) < 1.0 / 900).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    dy, dx = np.minimum(yy, size - yy), np.minimum(xx, size - xx)
    disc = (dx**2 + dy**2 <= 12**2).astype(np.float32)
    nuclei = np.clip(np.fft.ifft2(np.fft.fft2(impulses) * np.fft.fft2(disc)).real, 0, 1)
    image += (np.array([80, 50, 130]) - image) * (0.85 * nuclei[..., None])
    lumen = _periodic_noise(rng, size, 150.0) > 0.8
    image[lumen] = (246, 244, 247)
    image += rng.normal(0, 4, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _encoded_tiles(block: np.ndarray, scratch: Path) -> list[bytes]:
    """JPEG tile bytes of ``block`` exactly as tifffile writes them (row-major)."""
    import tifffile

    with tifffile.TiffWriter(scratch) as tif:
        tif.write(
            block,
            tile=(TILE, TILE),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 85},
        )
    with tifffile.TiffFile(scratch) as tif:
        page = tif.pages[0]
        assert page.jpegtables is None
        fh = tif.filehandle
        tiles = []
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(offset)
            tiles.append(fh.read(count))
    scratch.unlink()
    return tiles


def make_synthetic_slide(path: Path, size: int, mpp: float = 0.25) -> Path:
    """A ``size`` x ``size`` pyramidal JPEG TIFF of a periodic texture, made in seconds.

    Each level is the area average of the texture (so levels agree with each other) and
    only one period of it is JPEG-encoded per level; the tile bytes are then repeated.
    """
    import tifffile

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    texture = he_texture()
    levels = []
    k = 0
    while True:
        factor = 2**k
        levels.append((k, size // factor))
        if size // factor <= 1024:
            break
        k += 1
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for k, level_size in levels:
            factor = 2**k
            period = PERIOD // factor
            block = (
                texture.reshape(period, factor, period, factor, 3)
                .mean(axis=(1, 3))
                .round()
                .astype(np.uint8)
            )
            if period < TILE:
                block = np.tile(block, (TILE // period, TILE // period, 1))
            tiles = _encoded_tiles(block, path.with_name(f"{path.name}.level{k}.tif"))
            per_row = block.shape[1] // TILE
            n_tiles = math.ceil(level_size / TILE)

            def tile_bytes(per_row: int = per_row, n_tiles: int = n_tiles, tiles=tiles):
                for row in range(n_tiles):
                    for col in range(n_tiles):
                        yield tiles[(row % per_row) * per_row + col % per_row]

            resolution = 1e4 / (mpp * factor)
            tif.write(
                tile_bytes(),
                shape=(level_size, level_size, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                subfiletype=1 if k else 0,
                resolution=(resolution, resolution),
                resolutionunit="CENTIMETER",
            )
    os.replace(tmp, path)
    return path


def visium_spots(size: int, mpp: float, pitch_um: float = 100.0, margin_px: int = 100):
    """Integer spot centres on a hexagonal grid (Visium), row by row."""
    pitch = pitch_um / mpp
    row_step = pitch * math.sqrt(3) / 2
    centres = []
    for row in range(int((size - 1 - margin_px) // row_step) + 1):
        y = margin_px + row * row_step
        x0 = margin_px + (pitch / 2 if row % 2 else 0.0)
        for col in range(int((size - 1 - x0) // pitch) + 1):
            centres.append((round(x0 + col * pitch), round(y)))
    return np.array(centres, np.float64)


def write_slide_adata(path: Path, image: Path, centres: np.ndarray, mpp: float, size) -> Path:
    """A minimal slide AnnData (docs/architecture.md) for tiling."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    n = len(centres)
    adata = anndata.AnnData(
        X=sp.csr_matrix((n, 1), dtype=np.int32),
        obs=pd.DataFrame(index=[f"spot{i:06d}" for i in range(n)]),
        var=pd.DataFrame(index=["GENE"]),
    )
    adata.obsm["spatial"] = centres
    adata.uns["stevs"] = {
        "slide": path.stem,
        "mpp": mpp,
        "image_path": str(image),
        "image_width": int(size[0]),
        "image_height": int(size[1]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def her2st_adata(her2st: Path, section: str, out_dir: Path) -> Path:
    """Slide AnnData of a her2st section: pixel centres from the spot file."""
    import pandas as pd
    from PIL import Image

    spots = pd.read_csv(her2st / "spots" / f"{section}_selection.tsv", sep="\t")
    sections = pd.read_csv(her2st / "sections.tsv", sep="\t").set_index("section")
    mpp = 200.0 / float(sections.loc[section, "px_per_array_x"])
    image = her2st / "images" / f"{section}.jpg"
    with Image.open(image) as im:
        size = im.size
    centres = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    return write_slide_adata(out_dir / f"her2st_{section}.h5ad", image, centres, mpp, size)


# -- variants (each run in its own subprocess) ---------------------------------------------------


def run_naive(adata_path: Path, out: Path) -> int:
    """One level-0 read per spot, then a Pillow resize (ST-Net/HisToGene style)."""
    import anndata
    import h5py
    from PIL import Image

    adata = anndata.read_h5ad(adata_path, backed="r")
    centres = np.asarray(adata.obsm["spatial"])
    meta = adata.uns["stevs"]
    adata.file.close()
    side = round(PATCH_PX * PATCH_MPP / float(meta["mpp"]))
    image_path = meta["image_path"]
    if image_path.lower().endswith((".jpg", ".jpeg", ".png")):
        Image.MAX_IMAGE_PIXELS = None
        whole = Image.open(image_path).convert("RGB")

        def read(x: int, y: int) -> Image.Image:
            return whole.crop((x, y, x + side, y + side))
    else:
        import openslide

        slide = openslide.OpenSlide(image_path)

        def read(x: int, y: int) -> Image.Image:
            return slide.read_region((x, y), 0, (side, side)).convert("RGB")

    with h5py.File(out, "w") as f:
        shape = (len(centres), PATCH_PX, PATCH_PX, 3)
        patches = f.create_dataset("patches", shape, np.uint8, chunks=(1, *shape[1:]))
        for i, (x, y) in enumerate(centres):
            patch = read(int(x - side / 2), int(y - side / 2)).resize((PATCH_PX, PATCH_PX))
            patches[i] = np.asarray(patch)
    return len(centres)


def run_stevs(
    adata_path: Path,
    out: Path,
    threads: int,
    patch_px: int = PATCH_PX,
    patch_mpp: float = PATCH_MPP,
) -> int:
    from stevs.tiling import tile_slide

    tile_slide(adata_path, out, patch_px, patch_mpp, threads=threads, progress=False)
    import h5py

    with h5py.File(out) as f:
        return len(f["patches"])


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB) since its ``exec``.

    ``VmHWM`` from ``/proc/self/status`` where there is one (Linux): ``ru_maxrss`` keeps the
    high-water mark of the process that forked it across ``exec``, so a subprocess of a
    large benchmark driver would report the driver's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args: argparse.Namespace) -> None:
    """Entry point of a variant subprocess: prints one JSON line."""
    start = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    if args.variant == "naive":
        n = run_naive(Path(args.adata), Path(args.out))
    else:
        threads = int(args.variant.split("-t")[1])
        n = run_stevs(Path(args.adata), Path(args.out), threads, args.patch_px, args.patch_mpp)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime - cpu_start  # all threads of this process
    peak_mb = peak_rss_mb()
    print(json.dumps({"patches": n, "seconds": seconds, "cpu_s": cpu_s, "peak_rss_mb": peak_mb}))


# -- comparison and orchestration ----------------------------------------------------------------


def _best_shift_mae(a: np.ndarray, b: np.ndarray, reach: int = 2) -> tuple[float, int, int]:
    """Smallest mean absolute difference of the central crops over integer shifts of b."""
    inner = a[reach:-reach, reach:-reach]
    size = inner.shape[0]
    best = (float("inf"), 0, 0)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            moved = b[reach + dy : reach + dy + size, reach + dx : reach + dx + size]
            best = min(best, (float(np.abs(inner - moved).mean()), dy, dx))
    return best


def compare_patches(ours: Path, naive: Path) -> dict[str, float]:
    """How close the naive loop's patches are to ours, for patches inside the slide.

    Patches crossing the slide's edge are counted apart: OpenSlide's ``read_region``
    returns transparent pixels there, which the naive loop turns black; ours are white.
    """
    import h5py

    with h5py.File(ours) as fa, h5py.File(naive) as fb:
        pa, pb = fa["patches"], fb["patches"]
        assert pa.shape == pb.shape, (pa.shape, pb.shape)
        inside = fa["outside_fraction"][:] == 0
        per_patch_mae, total_se, shifted = [], 0.0, []
        sample = set(np.flatnonzero(inside)[:: max(1, int(inside.sum()) // 100)].tolist())
        for start in range(0, len(pa), 256):
            da = pa[start : start + 256].astype(np.float32)
            db = pb[start : start + 256].astype(np.float32)
            keep = inside[start : start + 256]
            diff = (da - db)[keep]
            per_patch_mae.extend(np.abs(diff).mean(axis=(1, 2, 3)).tolist())
            total_se += float((diff**2).sum())
            for k in range(len(da)):
                if start + k in sample:
                    shifted.append(_best_shift_mae(da[k], db[k]))
        mse = total_se / max(1, int(inside.sum()) * int(np.prod(pa.shape[1:])))
    per_patch_mae = np.array(per_patch_mae)
    shifts = [(dy, dx) for _, dy, dx in shifted]
    return {
        "inside_patches": int(inside.sum()),
        "edge_patches": int((~inside).sum()),
        "mae": float(per_patch_mae.mean()),
        "mae_p99_patch": float(np.percentile(per_patch_mae, 99)),
        "psnr_db": float(10 * math.log10(255**2 / mse)) if mse > 0 else float("inf"),
        "mae_best_shift": float(np.median([m for m, _, _ in shifted])),
        "best_shift_px": max(set(shifts), key=shifts.count),
    }


def run_in_subprocess(
    variant: str,
    adata: Path,
    out: Path,
    before: Path | None = None,
    patch: tuple[int, float] = (PATCH_PX, PATCH_MPP),
) -> dict:
    """One variant in its own process; ``before-tN`` runs the stevs checkout ``before``."""
    out.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--variant", variant.replace("before", "stevs")]
    command += ["--adata", str(adata), "--patch-px", str(patch[0]), "--patch-mpp", str(patch[1])]
    code = before if variant.startswith("before") else REPO
    env = {**os.environ, "PYTHONPATH": str(code)}
    result = subprocess.run(
        [*command, "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=3600,
        env=env,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark(
    name: str, adata: Path, out_dir: Path, threads: list[int], before: Path | None = None
) -> list[dict]:
    """naive, [before-t1,] stevs-tN on one input, side by side; agreement naive vs stevs-t1."""
    rows = []
    variants = ["naive", *(["before-t1"] if before else []), *(f"stevs-t{t}" for t in threads)]
    outputs = {v: out_dir / f"{name}.{v}.h5" for v in variants}
    for variant in variants:
        print(f"  {name}: {variant} ...", flush=True)
        stats = run_in_subprocess(variant, adata, outputs[variant], before)
        stats.update(
            dataset=name, variant=variant, patches_per_s=stats["patches"] / stats["seconds"]
        )
        rows.append(stats)
        print(
            f"    {stats['patches']} patches in {stats['seconds']:.1f} s = "
            f"{stats['patches_per_s']:.0f}/s, peak RSS {stats['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    agreement = compare_patches(outputs[f"stevs-t{threads[0]}"], outputs["naive"])
    if before:
        agreement["before_vs_stevs"] = compare_before(outputs["before-t1"], outputs["stevs-t1"])
    naive_rate, naive_cpu = rows[0]["patches_per_s"], rows[0]["cpu_s"]
    for row in rows:
        row["speedup_vs_naive"] = row["patches_per_s"] / naive_rate
        row["cpu_speedup_vs_naive"] = naive_cpu / row["cpu_s"]
    rows[0]["agreement_vs_stevs"] = agreement
    for path in outputs.values():
        path.unlink(missing_ok=True)
    return rows


def compare_before(before: Path, ours: Path) -> dict[str, float]:
    """How far this version's patches and tissue fractions are from the version before."""
    import h5py

    with h5py.File(before) as fa, h5py.File(ours) as fb:
        diffs, equal = [], 0
        for start in range(0, len(fa["patches"]), 256):
            a = fa["patches"][start : start + 256].astype(np.int16)
            b = fb["patches"][start : start + 256].astype(np.int16)
            d = np.abs(a - b).mean(axis=(1, 2, 3))
            diffs.extend(d.tolist())
            equal += int((d == 0).sum())
        tissue = np.abs(fa["tissue_fraction"][:] - fb["tissue_fraction"][:])
    return {
        "patches_identical": equal,
        "patches": len(diffs),
        "mae": float(np.mean(diffs)),
        "mae_max_patch": float(np.max(diffs)),
        "tissue_fraction_max_abs_diff": float(tissue.max()),
    }


def hd_grid(size: int, mpp: float, pitch_um: float) -> np.ndarray:
    """Bin centres of a Visium HD-like square grid (``pitch_um``) over the whole slide."""
    pitch = pitch_um / mpp
    axis = np.arange(pitch / 2, size - pitch / 2 + 1e-9, pitch)
    xs, ys = np.meshgrid(axis, axis)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).round()


def compressed_size(path: Path, compression: str, scratch: Path) -> tuple[int, float]:
    """Bytes of a copy of a patch cache whose ``patches`` are compressed, and seconds taken."""
    import h5py

    started = time.perf_counter()
    with h5py.File(path) as src, h5py.File(scratch, "w") as dst:
        patches = src["patches"]
        out = dst.create_dataset(
            "patches", patches.shape, np.uint8, chunks=patches.chunks, compression=compression
        )
        for start in range(0, len(patches), 1024):
            out[start : start + 1024] = patches[start : start + 1024]
        for key in src:
            if key != "patches":
                src.copy(key, dst)
    size = scratch.stat().st_size
    scratch.unlink()
    return size, time.perf_counter() - started


def hd_benchmark(out_dir: Path, size: int, threads: list[int], patch: tuple[int, float]) -> list:
    """Tiling a Visium HD-scale grid of 16 µm bins: patches/s, peak memory, cache size."""
    mpp = 0.25
    slide = make_synthetic_slide(out_dir / f"synthetic_{size}.tif", size, mpp)
    centres = hd_grid(size, mpp, 16.0)
    adata = write_slide_adata(out_dir / f"hd_{size}.h5ad", slide, centres, mpp, (size, size))
    print(
        f"HD case: {len(centres):,} bins of 16 µm on {size} px, {patch[0]} px at {patch[1]} µm/px"
    )
    rows = []
    for t in threads:
        out = out_dir / f"hd_{size}.t{t}.h5"
        stats = run_in_subprocess(f"stevs-t{t}", adata, out, patch=patch)
        stats.update(dataset=f"hd_{size}", variant=f"stevs-t{t}", bins=len(centres))
        stats["patches_per_s"] = stats["patches"] / stats["seconds"]
        stats["cache_mb"] = out.stat().st_size / 1e6
        if t == threads[0]:
            for method in ("lzf", "gzip"):
                nbytes, seconds = compressed_size(out, method, out_dir / "hd_copy.h5")
                stats[f"cache_{method}_mb"] = nbytes / 1e6
                stats[f"{method}_copy_s"] = seconds
        out.unlink()
        print(f"    {json.dumps(stats)}", flush=True)
        rows.append(stats)
    return rows


def _print_results(rows: list[dict]) -> None:
    print(
        "| input | variant | patches | seconds | patches/s | speed-up | CPU s | patches per "
        "CPU s | CPU speed-up | peak RSS (MB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['dataset']} | {row['variant']} | {row['patches']} | {row['seconds']:.1f} "
            f"| {row['patches_per_s']:.0f} | {row['speedup_vs_naive']:.2f}x "
            f"| {row['cpu_s']:.1f} | {row['patches'] / row['cpu_s']:.0f} "
            f"| {row['cpu_speedup_vs_naive']:.2f}x | {row['peak_rss_mb']:.0f} |"
        )
    for row in rows:
        if "agreement_vs_stevs" in row:
            a = row["agreement_vs_stevs"]
            print(
                f"{row['dataset']}: naive vs stevs, {a['inside_patches']} patches inside the "
                f"slide: mean abs diff {a['mae']:.2f} of 255 (99th pct patch "
                f"{a['mae_p99_patch']:.2f}), PSNR {a['psnr_db']:.1f} dB; after the best integer "
                f"shift {a['best_shift_px']} (dy, dx) of the naive patch: {a['mae_best_shift']:.2f}"
                f"; {a['edge_patches']} edge patches (naive: black padding, stevs: white)"
            )
            if "before_vs_stevs" in a:
                b = a["before_vs_stevs"]
                print(
                    f"{row['dataset']}: before vs now: {b['patches_identical']} of {b['patches']} "
                    f"patches identical, mean abs diff {b['mae']:.3f} (worst patch "
                    f"{b['mae_max_patch']:.3f}); tissue_fraction differs by at most "
                    f"{b['tissue_fraction_max_abs_diff']:.4f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic slide (< 1 min)")
    parser.add_argument("--size", type=int, help="synthetic slide side in px (40960; quick 10240)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--her2st", type=Path, default=DEFAULT_HER2ST)
    parser.add_argument("--section", default="C2")
    parser.add_argument(
        "--before", type=Path, help="a stevs checkout to run side by side (variant before-t1)"
    )
    parser.add_argument(
        "--hd",
        type=int,
        nargs="?",
        const=20_480,
        metavar="SIZE",
        help="only the Visium HD-scale case: 16 µm bins over a SIZE px slide (20480: 102,400 bins)",
    )
    parser.add_argument("--hd-patch-px", type=int, default=64, help="HD patch side (64 px)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--adata", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--patch-px", type=int, default=PATCH_PX, help=argparse.SUPPRESS)
    parser.add_argument("--patch-mpp", type=float, default=PATCH_MPP, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.hd:
        rows = hd_benchmark(out_dir, args.hd, args.threads, (args.hd_patch_px, PATCH_MPP))
        print(
            "| bins | threads | seconds | patches/s | peak RSS (MB) | cache MB | lzf MB | gzip MB |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['bins']:,} | {r['variant'][-1]} | {r['seconds']:.1f} | "
                f"{r['patches_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['cache_mb']:.0f} | "
                f"{r.get('cache_lzf_mb', math.nan):.0f} | {r.get('cache_gzip_mb', math.nan):.0f} |"
            )
        (out_dir / f"results_hd_{args.hd}.json").write_text(json.dumps(rows, indent=2))
        return

    size = args.size or (10_240 if args.quick else 40_960)
    mpp = 0.25
    started = time.perf_counter()
    slide = make_synthetic_slide(out_dir / f"synthetic_{size}.tif", size, mpp)
    centres = visium_spots(size, mpp)
    synthetic = write_slide_adata(
        out_dir / f"synthetic_{size}.h5ad", slide, centres, mpp, (size, size)
    )
    print(
        f"synthetic slide {size} x {size} px ({slide.stat().st_size / 1e6:.0f} MB), "
        f"{len(centres)} spots, ready in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    rows = benchmark(f"synthetic_{size}", synthetic, out_dir, args.threads, args.before)
    if (args.her2st / "images").is_dir():
        rows += benchmark(
            f"her2st_{args.section}",
            her2st_adata(args.her2st, args.section, out_dir),
            out_dir,
            args.threads,
            args.before,
        )
    else:
        print(f"her2st data not found under {args.her2st}: skipped")
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"python {platform.python_version()}; patches {PATCH_PX} px at {PATCH_MPP} µm/px"
    )
    _print_results(rows)
    (out_dir / f"results_{size}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
