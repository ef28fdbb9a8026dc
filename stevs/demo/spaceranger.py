"""Space Ranger ``outs/`` writing of the demo: 10x HDF5 matrix, positions, images, scale factors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stevs import __version__
from stevs.atomic import atomic_path
from stevs.demo.constants import SPOT_DIAMETER_UM
from stevs.demo.files import write_text
from stevs.demo.layout import SpotGrid
from stevs.io.visium_uns import FIDUCIAL_TO_SPOT, HIRES_MAX_SIDE, LOWRES_MAX_SIDE


def _resized(levels: list[np.ndarray], max_side: int) -> tuple[np.ndarray, float]:
    """The whole image with its longer side at most ``max_side``, and its scale factor."""
    from PIL import Image

    full = max(levels[0].shape[:2])
    scale = min(1.0, max_side / full)
    target = (round(levels[0].shape[1] * scale), round(levels[0].shape[0] * scale))
    source = levels[0]
    for level in levels:  # the smallest level still at least as large as the target
        if level.shape[1] >= target[0] and level.shape[0] >= target[1]:
            source = level
    if source.shape[1::-1] == target:
        return source, scale
    resized = Image.fromarray(source).resize(target, Image.Resampling.LANCZOS)
    return np.asarray(resized), scale


def _write_png(path: Path, image: np.ndarray) -> None:
    """Save an RGB uint8 image as PNG atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=3)


def write_10x_h5(
    path: Path, counts: np.ndarray, barcodes: np.ndarray, genes: tuple[str, ...], slide_id: str
) -> None:
    """A Cell Ranger / Space Ranger HDF5 v3 matrix (CSC genes x barcodes) of ``counts``."""
    import h5py

    n_spots, n_genes = counts.shape
    # CSC of the (genes x spots) matrix = CSR of (spots x genes)
    nonzero = counts != 0
    indptr = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]).astype(np.int64)
    indices = np.nonzero(nonzero)[1].astype(np.int64)
    data = counts[nonzero].astype(np.int32)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["software_version"] = f"stevs {__version__} demo"
        f.attrs["chemistry_description"] = "Visium Spatial Gene Expression (synthetic)"
        f.attrs["library_ids"] = np.array([slide_id.encode()])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        matrix = f.create_group("matrix")
        matrix.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        matrix.create_dataset("data", data=data, compression="gzip", compression_opts=4)
        matrix.create_dataset("indices", data=indices, compression="gzip", compression_opts=4)
        matrix.create_dataset("indptr", data=indptr)
        matrix.create_dataset("shape", data=np.array([n_genes, n_spots], dtype=np.int32))
        features = matrix.create_group("features")
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        ids = [f"STEVSDEMO{i:05d}".encode() for i in range(1, n_genes + 1)]
        features.create_dataset("id", data=np.array(ids))
        features.create_dataset("name", data=np.array([g.encode() for g in genes]))
        features.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n_genes))
        features.create_dataset("genome", data=np.array([b"synthetic"] * n_genes))


def write_tissue_positions(
    path: Path, grid: SpotGrid, in_tissue: np.ndarray, mpp: float, header: bool
) -> None:
    """Space Ranger positions: all grid spots, pixel row = y, pixel col = x (level-0 px)."""
    lines = []
    if header:
        lines.append("barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres")
    px_row = np.rint(grid.y_um / mpp).astype(int)
    px_col = np.rint(grid.x_um / mpp).astype(int)
    for i in range(grid.barcodes.size):
        lines.append(
            f"{grid.barcodes[i]},{int(in_tissue[i])},{grid.array_row[i]},{grid.array_col[i]},"
            f"{px_row[i]},{px_col[i]}"
        )
    write_text(path, "\n".join(lines) + "\n")


def write_spaceranger_outs(
    out_dir: Path,
    slide_id: str,
    grid: SpotGrid,
    in_tissue: np.ndarray,
    counts: np.ndarray,
    levels: list[np.ndarray],
    mpp: float,
    gene_names: tuple[str, ...],
    header: bool,
) -> str:
    """Write ``{slide_id}/outs`` (matrix of the in-tissue spots + ``spatial/``); returns it.

    ``header`` selects the headed ``tissue_positions.csv`` of Space Ranger 2+ over the
    header-less 1.x ``tissue_positions_list.csv``.
    """
    outs = out_dir / slide_id / "outs"
    spatial = outs / "spatial"
    positions_name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    write_tissue_positions(spatial / positions_name, grid, in_tissue, mpp, header)
    hires, hires_scale = _resized(levels, HIRES_MAX_SIDE)
    lowres, lowres_scale = _resized(levels, LOWRES_MAX_SIDE)
    _write_png(spatial / "tissue_hires_image.png", hires)
    _write_png(spatial / "tissue_lowres_image.png", lowres)
    scalefactors = {
        "spot_diameter_fullres": SPOT_DIAMETER_UM / mpp,
        "tissue_hires_scalef": hires_scale,
        "fiducial_diameter_fullres": SPOT_DIAMETER_UM * FIDUCIAL_TO_SPOT / mpp,
        "tissue_lowres_scalef": lowres_scale,
    }
    write_text(spatial / "scalefactors_json.json", json.dumps(scalefactors, indent=4))
    write_10x_h5(
        outs / "filtered_feature_bc_matrix.h5",
        counts,
        grid.barcodes[in_tissue],
        gene_names,
        slide_id,
    )
    return f"{slide_id}/outs"
