"""Expression readers: Space Ranger ``outs/`` (CSV or parquet positions), Visium HD bins,
legacy ST count tables, AnnData ``.h5ad``, HEST-1k samples, SpatialData zarr stores.

Each reader returns an :class:`anndata.AnnData` with raw integer counts in ``X`` (CSR),
unique barcodes as ``obs_names``, gene symbols as ``var_names`` (``var["gene_ids"]`` where
the input has gene ids: Space Ranger's features, an ``.h5ad``'s ``var["gene_ids"]``), spot
centres in level-0 pixels (x, y) in ``obsm["spatial"]`` and
``obs["array_row"]``/``obs["array_col"]`` where the technology has an array. Slide-level
metadata (mpp, patient, images, ...) is added by :mod:`stevs.io.ingest`; a reader that
knows it from its input (HEST metadata, Visium HD scale factors) leaves it in
``uns["source_meta"]`` (technology, spot_pitch_um, spot_diameter_um, optional spot_shape,
mpp, mpp_source, patient, spatial_dir) for ingest to take.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from stevs.errors import StevsInputError
from stevs.geometry import median_spot_pitch
from stevs.io.samples import hest_metadata_path
from stevs.io.visium_uns import SPACERANGER_FILES, read_scalefactors

log = logging.getLogger(__name__)

Technology = Literal["visium", "st", "h5ad"]

#: centre-to-centre spot pitch and spot diameter in microns per technology
SPOT_GEOMETRY_UM: dict[str, tuple[float, float]] = {
    "visium": (100.0, 55.0),
    "st": (200.0, 100.0),
}
#: microns per unit step of (array_col, array_row): Visium's columns step by 2 along a row
ARRAY_STEP_UM: dict[str, tuple[float, float]] = {
    "visium": (50.0, 100.0 * np.sqrt(3) / 2),
    "st": (200.0, 200.0),
}

VISIUM_POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
ST_COORD_PATTERN = re.compile(r"^\s*(-?\d+(?:\.\d+)?)x(-?\d+(?:\.\d+)?)\s*$")


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise StevsInputError(path, f"{what} not found")
    return path


def _check_unique(names: pd.Index, path: Path, what: str) -> None:
    duplicated = names[names.duplicated()].unique()
    if len(duplicated):
        shown = ", ".join(map(str, duplicated[:5]))
        raise StevsInputError(path, f"{len(duplicated)} duplicate {what}, e.g. {shown}")


def _check_not_empty(counts: sparse.spmatrix, path: Path) -> None:
    if counts.shape[0] == 0 or counts.shape[1] == 0:
        raise StevsInputError(
            path, f"empty expression matrix ({counts.shape[0]} spots x {counts.shape[1]} genes)"
        )
    if counts.nnz == 0 or counts.sum() == 0:
        raise StevsInputError(path, "expression matrix holds no counts (all zero)")


def _check_integer_counts(counts: sparse.spmatrix, path: Path, where: str = "X") -> None:
    data = counts.data if sparse.issparse(counts) else np.asarray(counts)
    if data.size and (np.any(data < 0) or not np.allclose(data, np.round(data))):
        raise StevsInputError(
            path, f"{where} holds negative or non-integer values: raw counts are needed"
        )


def _join_positions(
    counts: sparse.csr_matrix,
    count_barcodes: pd.Index,
    positions: pd.DataFrame,
    counts_path: Path,
    positions_path: Path,
) -> tuple[sparse.csr_matrix, pd.DataFrame]:
    """Keep spots present in both the matrix and the positions; report the others."""
    _check_unique(count_barcodes, counts_path, "spot barcodes in the expression matrix")
    _check_unique(positions.index, positions_path, "spot barcodes in the spot positions")
    only_counts = count_barcodes.difference(positions.index)
    only_positions = positions.index.difference(count_barcodes)
    if len(only_counts):
        log.warning(
            "%s: %d spots in the expression matrix have no position in %s and are dropped "
            "(e.g. %s)",
            counts_path,
            len(only_counts),
            positions_path,
            ", ".join(map(str, only_counts[:3])),
        )
    if len(only_positions):
        log.warning(
            "%s: %d spots with a position have no expression in %s and are dropped (e.g. %s)",
            positions_path,
            len(only_positions),
            counts_path,
            ", ".join(map(str, only_positions[:3])),
        )
    keep = count_barcodes.isin(positions.index)
    if not keep.any():
        raise StevsInputError(
            counts_path, f"no spot barcode in common with the spot positions in {positions_path}"
        )
    counts = counts[np.flatnonzero(keep)]
    return counts.tocsr(), positions.loc[count_barcodes[keep]]


def _make_adata(
    counts: sparse.csr_matrix, obs: pd.DataFrame, var: pd.DataFrame, spatial: np.ndarray
) -> ad.AnnData:
    counts = sparse.csr_matrix(counts)
    counts.data = np.rint(counts.data).astype(np.int32)  # validated as integers before
    counts.eliminate_zeros()
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = np.asarray(spatial, dtype=np.float64)
    return adata


# -- Space Ranger ------------------------------------------------------------------------


def read_10x_h5(path: Path) -> tuple[sparse.csr_matrix, pd.Index, pd.DataFrame]:
    """A 10x HDF5 feature-barcode matrix -> spots x genes counts, barcodes, var.

    Read by ``scanpy.read_10x_h5``: Cell Ranger / Space Ranger v3+ files (``/matrix``,
    Gene Expression features only) and the older v2 layout (one group per genome, which
    must be single). ``var`` holds ``gene_ids`` (and ``feature_types``; v2 matrices are gene
    expression only); duplicate gene names are made unique. Any failure to read the file
    is a :class:`StevsInputError` naming it.
    """
    import scanpy as sc

    _require_file(path, "feature-barcode matrix")
    try:
        with warnings.catch_warnings():  # duplicate names: genes made unique, spots checked
            warnings.filterwarnings("ignore", "(Variable|Observation) names are not unique")
            adata = sc.read_10x_h5(path)
    except Exception as err:  # scanpy raises a bare Exception for missing datasets
        reason = f"{err}: {err.__cause__}" if err.__cause__ is not None else str(err)
        if isinstance(err, IndexError):  # scanpy's v2 reader found no genome group
            reason = "no /matrix group (v3) and no genome group (v2)"
        raise StevsInputError(
            path, f"not a 10x HDF5 feature-barcode matrix (v2 or v3): {reason}"
        ) from err
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str)))
    var["gene_ids"] = adata.var["gene_ids"].astype(str).to_numpy()
    types = adata.var.get("feature_types")
    var["feature_types"] = "Gene Expression" if types is None else types.astype(str).to_numpy()
    if var.index.duplicated().any():
        var.index = ad.utils.make_index_unique(var.index)
    return sparse.csr_matrix(adata.X), pd.Index(adata.obs_names.astype(str)), var


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except ImportError as err:
        raise StevsInputError(
            path, f"reading Space Ranger parquet positions needs pyarrow ({err})"
        ) from err
    except (OSError, ValueError) as err:
        raise StevsInputError(path, f"not a readable parquet table: {err}") from err


def _read_positions_csv(path: Path) -> pd.DataFrame:
    """A Space Ranger positions table, with or without its header line.

    Space Ranger 1 writes ``tissue_positions_list.csv`` without a header, 2+ writes
    ``tissue_positions.csv`` with one; either file name is read whichever it holds (a header
    is a first line starting with ``barcode``).
    """
    try:
        with path.open(encoding="utf-8") as handle:
            first = handle.readline()
        has_header = first.split(",", 1)[0].strip().strip('"') == "barcode"
        if has_header:
            table = pd.read_csv(path)
        else:
            table = pd.read_csv(path, header=None, names=VISIUM_POSITION_COLUMNS)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise StevsInputError(path, f"cannot read the spot positions: {err}") from err
    return _checked_positions(table, path)


def _checked_positions(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Space Ranger's position columns present and numeric; barcodes as strings."""
    missing = [c for c in VISIUM_POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise StevsInputError(path, f"missing columns {missing}")
    numeric = VISIUM_POSITION_COLUMNS[1:]
    values = table[numeric].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise StevsInputError(
            path,
            f"{int(bad.sum())} rows have non-numeric {', '.join(numeric)} (e.g. data row "
            f"{row + 1}: {table.iloc[row].tolist()})",
        )
    table[numeric] = values
    return table.astype({"barcode": str})


def read_visium_positions(spatial_dir: Path) -> tuple[pd.DataFrame, Path]:
    """In-tissue spot positions: ``tissue_positions.parquet`` (Space Ranger 2+, Visium HD),
    else ``tissue_positions.csv`` or the older ``tissue_positions_list.csv`` (with or without
    a header line)."""
    candidates = [
        spatial_dir / "tissue_positions.parquet",
        spatial_dir / "tissue_positions.csv",
        spatial_dir / "tissue_positions_list.csv",
    ]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise StevsInputError(
            spatial_dir,
            "no tissue_positions.parquet, tissue_positions.csv or tissue_positions_list.csv "
            "in this folder",
        )
    if path.suffix == ".parquet":
        table = _checked_positions(_read_parquet(path), path)
    else:
        table = _read_positions_csv(path)
    table = table.set_index("barcode")
    table = table.loc[table["in_tissue"].astype(int) == 1]
    if table.empty:
        raise StevsInputError(path, "no spot is marked in_tissue")
    return table, path


def read_visium(outs: str | os.PathLike) -> ad.AnnData:
    """A Space Ranger ``outs/`` folder: in-tissue spots, full-resolution pixel positions."""
    outs = Path(outs)
    if not outs.is_dir():
        raise StevsInputError(outs, "Space Ranger outs folder not found")
    matrix_path = outs / "filtered_feature_bc_matrix.h5"
    counts, barcodes, var = read_10x_h5(matrix_path)
    _check_integer_counts(counts, matrix_path)
    positions, positions_path = read_visium_positions(outs / "spatial")
    counts, positions = _join_positions(counts, barcodes, positions, matrix_path, positions_path)
    _check_not_empty(counts, matrix_path)
    spatial = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    obs = pd.DataFrame(
        {
            "array_row": positions["array_row"].astype(int).to_numpy(),
            "array_col": positions["array_col"].astype(int).to_numpy(),
        },
        index=positions.index.astype(str),
    )
    adata = _make_adata(counts, obs, var, spatial)
    scalefactors = outs / "spatial" / SPACERANGER_FILES["scalefactors"]
    if scalefactors.is_file():
        adata.uns["scalefactors"] = read_scalefactors(scalefactors)
    return adata


# -- Visium HD ---------------------------------------------------------------------------

#: bin folders of a Visium HD ``outs/binned_outputs``, in the order they are preferred
VISIUM_HD_BINS = ("square_008um", "square_016um", "square_002um")
VISIUM_HD_BIN_PATTERN = re.compile(r"square_0*(\d+)um$")


def visium_hd_bin_dir(path: Path) -> Path:
    """The bin folder of a Visium HD sheet entry: the folder itself when it holds a
    ``filtered_feature_bc_matrix.h5``, else ``binned_outputs/square_008um`` (or 016um, 002um)
    under it (``path`` being Space Ranger's ``outs/``)."""
    if (path / "filtered_feature_bc_matrix.h5").is_file():
        return path
    for name in VISIUM_HD_BINS:
        for candidate in (path / "binned_outputs" / name, path / name):
            if (candidate / "filtered_feature_bc_matrix.h5").is_file():
                return candidate
    raise StevsInputError(
        path,
        "not a Visium HD bin folder: no filtered_feature_bc_matrix.h5 here or under "
        f"binned_outputs/{{{','.join(VISIUM_HD_BINS)}}}",
    )


def _bin_size_um(bin_dir: Path, factors: dict) -> float:
    if "bin_size_um" in factors:
        return float(factors["bin_size_um"])
    match = VISIUM_HD_BIN_PATTERN.search(bin_dir.name)
    if match is None:
        raise StevsInputError(
            bin_dir,
            "bin size unknown: no bin_size_um in the scale factors and the folder "
            "is not named square_NNNum",
        )
    return float(match[1])


def read_visium_hd(path: str | os.PathLike) -> ad.AnnData:
    """Visium HD binned output: each square bin is a spot (pitch = side = the bin size).

    ``path``: a ``binned_outputs/square_008um``-like folder (``filtered_feature_bc_matrix.h5``
    + ``spatial/tissue_positions.parquet`` + ``spatial/scalefactors_json.json``) or the
    ``outs/`` above it. Microns per pixel: the scale factors' ``microns_per_pixel`` when
    present, else the bin pitch fitted on the bins' array positions.
    """
    path = Path(path)
    if not path.is_dir():
        raise StevsInputError(path, "Visium HD folder not found")
    bin_dir = visium_hd_bin_dir(path)
    adata = read_visium(bin_dir)
    factors = adata.uns.pop("scalefactors", None) or {}
    bin_um = _bin_size_um(bin_dir, factors)
    if not (math.isfinite(bin_um) and bin_um > 0):
        raise StevsInputError(bin_dir, f"bin size must be positive, got {bin_um}")
    meta: dict = {
        "technology": "visium_hd",
        "spot_pitch_um": bin_um,
        "spot_diameter_um": bin_um,
        "spot_shape": "square",
        "spatial_dir": str(bin_dir / "spatial"),
    }
    mpp = factors.get("microns_per_pixel")
    if mpp is not None and math.isfinite(float(mpp)) and float(mpp) > 0:
        meta.update(mpp=float(mpp), mpp_source="scalefactors")
    else:
        meta.update(mpp=fit_grid_mpp(adata, (bin_um, bin_um)), mpp_source="spot_grid")
    adata.uns["source_meta"] = meta
    return adata


# -- HEST-1k -----------------------------------------------------------------------------

#: HEST metadata ``st_technology`` -> stevs technology
HEST_TECHNOLOGIES = {
    "visium": "visium",
    "spatial transcriptomics": "st",
    "visium hd": "visium_hd",
    "xenium": "xenium",
}


def _positive_number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def read_hest_metadata(path: Path) -> dict:
    """HEST-1k sample metadata: pixel size (``pixel_size_um_estimated``, else
    ``pixel_size_um_embedded``), technology, spot diameter and pitch (µm), patient."""
    _require_file(path, "HEST metadata file")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StevsInputError(path, f"not a readable JSON file: {err}") from err
    if not isinstance(meta, dict):
        raise StevsInputError(path, "HEST metadata must be a JSON object")
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
        mpp = _positive_number(meta.get(key))
        if mpp is not None:
            break
    else:
        raise StevsInputError(path, "no positive pixel_size_um_estimated or pixel_size_um_embedded")
    raw = str(meta.get("st_technology", "")).strip().lower()
    technology = HEST_TECHNOLOGIES.get(raw, raw or "unknown")
    pitch, diameter = SPOT_GEOMETRY_UM.get(technology, (float("nan"), float("nan")))
    pitch = _positive_number(meta.get("inter_spot_dist")) or pitch
    diameter = _positive_number(meta.get("spot_diameter")) or diameter
    patient = meta.get("patient")
    return {
        "technology": technology,
        "spot_pitch_um": float(pitch),
        "spot_diameter_um": float(diameter),
        "mpp": mpp,
        "mpp_source": f"hest_metadata:{key}",
        "patient": str(patient) if patient not in (None, "") else "",
    }


def read_hest(path: str | os.PathLike) -> ad.AnnData:
    """A HEST-1k sample: ``st/{id}.h5ad`` (raw counts, ``obsm["spatial"]`` spot centres in
    level-0 px of ``wsis/{id}.tif``) and ``metadata/{id}.json`` (its pixel size etc.)."""
    path = Path(path)
    adata = read_h5ad_expression(path)
    adata.uns.pop("source_mpp", None)
    adata.uns["source_meta"] = read_hest_metadata(hest_metadata_path(path))
    return adata


def read_hest_bench_expression(
    path: str | os.PathLike, barcodes: list[str], genes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """A HEST-Benchmark task's ``adata/{sample}.h5ad`` at ``barcodes`` (the patch file's, in
    its order) and ``genes``: (spots x genes float64 values of X, as stored; each spot's total
    over all genes). HEST's ``load_adata`` (src/hest/bench/st_dataset.py:37-45) takes
    ``adata[barcodes][:, genes]`` the same way, as float64 before its log1p."""
    path = Path(path)
    _require_file(path, "HEST-Benchmark AnnData")
    try:
        source = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as err:
        raise StevsInputError(path, f"not a readable .h5ad file: {err}") from err
    for what, names in (("spot barcodes", source.obs_names), ("gene names", source.var_names)):
        _check_unique(pd.Index(names), path, what)
    rows = source.obs_names.get_indexer(barcodes)
    columns = source.var_names.get_indexer(genes)
    for what, index, names in (("spots", rows, barcodes), ("genes", columns, genes)):
        if (index < 0).any():
            missing = [n for n, i in zip(names, index, strict=True) if i < 0]
            raise StevsInputError(
                path, f"{len(missing)} {what} of the benchmark missing, e.g. {missing[:3]}"
            )
    matrix = sparse.csr_matrix(source.X[rows], dtype=np.float64)
    values = matrix[:, columns].toarray()
    return values, np.asarray(matrix.sum(axis=1), dtype=np.float64).reshape(-1)


# -- SpatialData -------------------------------------------------------------------------


def _one_table(path: Path, sdata: object) -> tuple[ad.AnnData, str, str, str]:
    """The store's table annotating one shapes element: (table, region, region_key,
    instance_key)."""
    tables = dict(sdata.tables)  # type: ignore[attr-defined]
    if not tables:
        raise StevsInputError(path, "SpatialData store has no table")
    name = "table" if "table" in tables else next(iter(tables))
    if len(tables) > 1 and name != "table":
        raise StevsInputError(path, f"{len(tables)} tables and none named 'table'")
    table = tables[name]
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else list(region or [])
    if len(regions) != 1:
        raise StevsInputError(
            path, f"table '{name}' must annotate one shapes element, not {regions}"
        )
    if regions[0] not in sdata.shapes:  # type: ignore[attr-defined]
        raise StevsInputError(
            path, f"table '{name}' annotates '{regions[0]}', not a shapes element"
        )
    return table, regions[0], attrs["region_key"], attrs["instance_key"]


def read_spatialdata(path: str | os.PathLike) -> ad.AnnData:
    """A SpatialData zarr store: the table's raw counts (X or ``layers["counts"]``) and the
    centres of the spot shapes it annotates in their own (intrinsic) coordinates, which are
    level-0 px of the sample sheet's image in the stores of spatialdata-io's Visium reader
    and of ``stevs export``. Circle radii give the drawn spot diameter."""
    path = Path(path)
    if not path.exists():
        raise StevsInputError(path, "SpatialData store not found")
    try:
        import spatialdata as sd
    except ImportError as err:
        raise StevsInputError(
            path, f"reading SpatialData needs the 'interop' extra: {err}"
        ) from err
    try:
        sdata = sd.read_zarr(path)
    except Exception as err:  # zarr / ome-zarr raise many kinds
        raise StevsInputError(path, f"not a readable SpatialData zarr store: {err}") from err
    table, region, region_key, instance_key = _one_table(path, sdata)
    shapes = sdata.shapes[region]  # intrinsic coordinates: level-0 px of the image
    rows = table.obs[region_key].astype(str) == region
    instances = table.obs.loc[rows, instance_key].to_numpy()
    missing = pd.Index(instances).difference(shapes.index)
    if len(missing):
        raise StevsInputError(path, f"{len(missing)} table rows have no shape in '{region}'")
    geometry = shapes.loc[instances]
    centroids = geometry.geometry.centroid
    spatial = np.column_stack([centroids.x.to_numpy(), centroids.y.to_numpy()])
    subset = table[rows.to_numpy()]
    counts = subset.layers["counts"] if "counts" in subset.layers else subset.X
    where = 'layers["counts"]' if "counts" in subset.layers else "X"
    counts = sparse.csr_matrix(counts)
    _check_integer_counts(counts, path, f"the table's {where}")
    obs = pd.DataFrame(index=subset.obs_names.astype(str))
    _check_unique(obs.index, path, "spot names in the table")
    for column in ("array_row", "array_col"):
        if column in subset.obs:
            obs[column] = subset.obs[column].astype(int).to_numpy()
    var = pd.DataFrame(index=subset.var_names.astype(str))
    if "gene_ids" in subset.var.columns:
        var["gene_ids"] = subset.var["gene_ids"].astype(str).to_numpy()
    _check_not_empty(counts, path)
    adata = _make_adata(counts, obs, var, spatial)
    if "radius" in geometry.columns:
        adata.uns["scalefactors"] = {
            "spot_diameter_fullres": float(2 * np.median(geometry["radius"].to_numpy(float)))
        }
    return adata


# -- legacy ST ---------------------------------------------------------------------------


def _st_keys(labels: pd.Index) -> list[str] | None:
    keys = []
    for label in labels:
        match = ST_COORD_PATTERN.match(str(label))
        if match is None:
            return None
        keys.append(f"{round(float(match[1]))}x{round(float(match[2]))}")
    return keys


def read_st_counts(path: Path) -> tuple[sparse.csr_matrix, pd.Index, pd.Index]:
    """A legacy ST count table (TSV, optionally gzipped): rows ``XxY`` spots, columns genes."""
    _require_file(path, "ST count table")
    try:
        table = pd.read_csv(path, sep="\t", index_col=0)
    except (OSError, ValueError, pd.errors.ParserError, EOFError) as err:
        raise StevsInputError(path, f"cannot read count table: {err}") from err
    keys = _st_keys(table.index)
    if keys is None and _st_keys(table.columns) is not None:
        table = table.T
        keys = _st_keys(table.index)
    if keys is None:
        raise StevsInputError(path, "spot labels must look like 'XxY' (e.g. '10x13')")
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise StevsInputError(path, f"empty expression matrix {table.shape}")
    try:
        values = table.to_numpy(dtype=np.float64)
    except ValueError as err:
        raise StevsInputError(path, f"non-numeric counts: {err}") from err
    counts = sparse.csr_matrix(values)
    _check_integer_counts(counts, path, "the count table")
    genes = pd.Index(table.columns.astype(str))
    if genes.duplicated().any():
        genes = pd.Index(ad.utils.make_index_unique(genes))
    return counts, pd.Index(keys), genes


def read_st_spots(path: Path) -> pd.DataFrame:
    """A legacy ST spot file: x, y (array), pixel_x, pixel_y, optional selected."""
    _require_file(path, "ST spot file")
    try:
        table = pd.read_csv(path, sep=None, engine="python")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise StevsInputError(path, f"cannot read spot file: {err}") from err
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in table.columns]
    if missing:
        raise StevsInputError(path, f"missing columns {missing} (need x, y, pixel_x, pixel_y)")
    if "selected" in table.columns:
        table = table.loc[table["selected"].astype(int) == 1]
    bad = table[["x", "y", "pixel_x", "pixel_y"]].isna().any(axis=1)
    if bad.any():
        raise StevsInputError(path, f"{int(bad.sum())} spots with missing coordinates")
    table = table.copy()
    table.index = pd.Index(
        [f"{round(x)}x{round(y)}" for x, y in zip(table["x"], table["y"], strict=True)]
    )
    return table


def read_legacy_st(counts_path: str | os.PathLike, spots_path: str | os.PathLike) -> ad.AnnData:
    """Legacy ST: count table joined to its spot file on ``f"{round(x)}x{round(y)}"``."""
    counts_path, spots_path = Path(counts_path), Path(spots_path)
    counts, keys, genes = read_st_counts(counts_path)
    spots = read_st_spots(spots_path)
    counts, spots = _join_positions(counts, keys, spots, counts_path, spots_path)
    _check_not_empty(counts, counts_path)
    obs = pd.DataFrame(
        {
            "array_row": spots["y"].round().astype(int).to_numpy(),
            "array_col": spots["x"].round().astype(int).to_numpy(),
        },
        index=spots.index.astype(str),
    )
    spatial = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    return _make_adata(counts, obs, pd.DataFrame(index=genes), spatial)


# -- AnnData -----------------------------------------------------------------------------


def read_h5ad_expression(path: str | os.PathLike) -> ad.AnnData:
    """An AnnData with ``obsm["spatial"]`` (level-0 px) and raw counts in X or layers."""
    path = Path(path)
    _require_file(path, "AnnData file")
    try:
        source = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as err:
        raise StevsInputError(path, f"not a readable .h5ad file: {err}") from err
    if "spatial" not in source.obsm:
        raise StevsInputError(path, 'no obsm["spatial"] with spot centres in pixels')
    spatial = np.asarray(source.obsm["spatial"], dtype=np.float64)
    if spatial.ndim != 2 or spatial.shape[1] < 2:
        raise StevsInputError(path, f'obsm["spatial"] must be (n_spots, 2), got {spatial.shape}')
    counts = source.layers["counts"] if "counts" in source.layers else source.X
    where = 'layers["counts"]' if "counts" in source.layers else "X"
    counts = sparse.csr_matrix(counts)
    _check_integer_counts(counts, path, where)
    _check_unique(pd.Index(source.obs_names), path, "spot barcodes")
    _check_not_empty(counts, path)
    obs = pd.DataFrame(index=source.obs_names.astype(str))
    for column in ("array_row", "array_col"):
        if column in source.obs:
            obs[column] = source.obs[column].astype(int).to_numpy()
    var = pd.DataFrame(index=source.var_names.astype(str))
    if "gene_ids" in source.var.columns:  # e.g. Space Ranger's, through scanpy
        var["gene_ids"] = source.var["gene_ids"].astype(str).to_numpy()
    if var.index.duplicated().any():
        var.index = ad.utils.make_index_unique(var.index)
    adata = _make_adata(counts, obs, var, spatial[:, :2])
    if isinstance(source.uns.get("stevs"), dict) and "mpp" in source.uns["stevs"]:
        adata.uns["source_mpp"] = float(source.uns["stevs"]["mpp"])
    return adata


def fit_grid_mpp(adata: ad.AnnData, array_step_um: tuple[float, float]) -> float | None:
    """Microns per pixel from a least-squares fit of pixel positions on (array_col,
    array_row), given the µm per array step along each; ``None`` without a usable array."""
    if not {"array_row", "array_col"} <= set(adata.obs.columns):
        return None
    spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    grid = adata.obs[["array_col", "array_row"]].to_numpy(np.float64)
    if len(np.unique(grid[:, 0])) < 2 or len(np.unique(grid[:, 1])) < 2:
        return None
    design = np.column_stack([grid, np.ones(len(grid))])
    coef, *_ = np.linalg.lstsq(design, spatial, rcond=None)
    px_per_col, px_per_row = np.hypot(coef[0, 0], coef[0, 1]), np.hypot(coef[1, 0], coef[1, 1])
    um_per_col, um_per_row = array_step_um
    return float((um_per_col / px_per_col + um_per_row / px_per_row) / 2)


def estimate_mpp_from_spot_grid(adata: ad.AnnData, technology: str) -> float:
    """Microns per pixel from the spot grid of a known technology.

    With array coordinates, a least-squares fit of pixel positions on (array_col,
    array_row) gives the pixels per array step (robust to jittered spot positions);
    without them, the median nearest-neighbour distance stands for the pitch.
    """
    fitted = fit_grid_mpp(adata, ARRAY_STEP_UM[technology])
    if fitted is not None:
        return fitted
    spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    return SPOT_GEOMETRY_UM[technology][0] / estimate_spot_pitch_px(spatial)


def estimate_spot_pitch_px(spatial: np.ndarray) -> float:
    """Median nearest-neighbour distance between spot centres, in pixels."""
    if len(spatial) < 3:
        raise ValueError("at least 3 spots are needed to estimate the spot pitch")
    return median_spot_pitch(spatial)
