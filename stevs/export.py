"""``stevs export``: a stevs AnnData (slide, prediction or H&E-only prediction) as a
SpatialData zarr store (:mod:`stevs.io.spatialdata_zarr`), for spatialdata, napari-spatialdata
and spatialdata-plot.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import anndata as ad

from stevs.errors import StevsInputError
from stevs.io.spatialdata_zarr import write_spatialdata

log = logging.getLogger(__name__)


def read_stevs_adata(path: str | Path) -> ad.AnnData:
    """Any AnnData stevs wrote: needs ``obsm["spatial"]`` and one ``uns["spatial"]`` library."""
    path = Path(path)
    if not path.is_file():
        raise StevsInputError(path, "AnnData file not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many kinds
        raise StevsInputError(path, f"not a readable .h5ad file: {err}") from err
    if "spatial" not in adata.obsm:
        raise StevsInputError(path, 'no obsm["spatial"] spot centres')
    return adata


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, help="a slide, prediction or H&E-only prediction .h5ad"
    )
    parser.add_argument("--out", required=True, help="SpatialData store to write (.zarr)")


def run(args: argparse.Namespace) -> None:
    try:
        import spatialdata  # noqa: F401
    except ImportError as err:
        raise StevsInputError(
            args.out, f"stevs export needs the 'interop' extra (pip install stevs[interop]): {err}"
        ) from err
    adata = read_stevs_adata(args.input)
    out = write_spatialdata(adata, args.out, source=args.input)
    log.info("wrote %s (%d spots x %d genes)", out, adata.n_obs, adata.n_vars)
