"""SpatialData zarr stores (``results/export/{method}/{fold}/{slide}.zarr``): the one writer.

Any AnnData stevs writes (a slide, a prediction, an H&E-only prediction) becomes a store
that ``spatialdata.read_zarr`` and spatialdata-plot open:

- image ``{library}_image``: the largest H&E image of ``uns["spatial"][library]`` (``hires``
  when present, else ``lowres``), (c, y, x) uint8, with a ``Scale`` of 1 / its scale factor
  to the ``global`` coordinate system, so ``global`` is level-0 px of the slide image;
- shapes ``{library}_spots``: one circle per spot at ``obsm["spatial"]`` (identity to
  ``global``), radius half ``spot_diameter_fullres``, index 0..n-1;
- table ``table``: ``X``, ``layers``, ``obs`` and ``var`` of the AnnData (barcodes stay its
  obs names), ``obs["region"]`` = the shapes' name (region key), ``obs["spot_id"]`` = the
  row of its circle (instance key), ``uns["stevs"]`` as it was.

:func:`stevs.io.expression.read_spatialdata` reads such a store back (sheet format
``spatialdata``). spatialdata is imported lazily (the ``interop`` extra): ``import stevs``
never needs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from stevs.atomic import atomic_dir
from stevs.errors import StevsInputError

REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
TABLE = "table"
#: root attribute of a store stevs wrote (what lets a rerun replace it)
MARKER = "stevs"


def _library(path: Path, adata: ad.AnnData) -> tuple[str, dict[str, Any]]:
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or len(spatial) != 1:
        raise StevsInputError(
            path, 'needs exactly one library in uns["spatial"] (re-ingest with this stevs)'
        )
    library, entry = next(iter(spatial.items()))
    return str(library), entry


def _largest_image(path: Path, entry: dict[str, Any]) -> tuple[np.ndarray, float]:
    images, factors = entry.get("images", {}), entry.get("scalefactors", {})
    for key in ("hires", "lowres"):
        if key in images:
            return np.asarray(images[key]), float(factors[f"tissue_{key}_scalef"])
    raise StevsInputError(path, 'uns["spatial"] has no hires or lowres image')


def spatialdata_of(adata: ad.AnnData, path: str | os.PathLike = "") -> Any:
    """The :class:`spatialdata.SpatialData` of a stevs AnnData (see the module docstring)."""
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import Point
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    path = Path(path)
    library, entry = _library(path, adata)
    image, scalef = _largest_image(path, entry)
    diameter = float(entry.get("scalefactors", {}).get("spot_diameter_fullres", np.nan))
    if not (np.isfinite(diameter) and diameter > 0):
        raise StevsInputError(path, "uns['spatial'] has no positive spot_diameter_fullres")
    xy = np.asarray(adata.obsm["spatial"], np.float64)
    image_name, shapes_name = f"{library}_image", f"{library}_spots"
    pixels = Image2DModel.parse(
        np.ascontiguousarray(image[..., :3].transpose(2, 0, 1)),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={"global": Scale([1 / scalef, 1 / scalef], axes=("y", "x"))},
    )
    circles = gpd.GeoDataFrame(
        {"radius": np.full(len(xy), diameter / 2)},
        geometry=[Point(x, y) for x, y in xy],
        index=np.arange(len(xy)),
    )
    shapes = ShapesModel.parse(circles, transformations={"global": Identity()})
    table = ad.AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        layers={k: v for k, v in adata.layers.items()},
        uns={"stevs": dict(adata.uns.get("stevs", {}))},
    )
    table.obs[REGION_KEY] = np.full(len(xy), shapes_name)
    table.obs[REGION_KEY] = table.obs[REGION_KEY].astype("category")
    table.obs[INSTANCE_KEY] = np.arange(len(xy))
    table = TableModel.parse(
        table, region=shapes_name, region_key=REGION_KEY, instance_key=INSTANCE_KEY
    )
    return sd.SpatialData(
        images={image_name: pixels}, shapes={shapes_name: shapes}, tables={TABLE: table}
    )


def is_stevs_store(path: str | os.PathLike) -> bool:
    """True for a zarr store :func:`write_spatialdata` wrote: zarr's own group metadata
    (``zarr.json`` or ``.zgroup``) whose attributes carry :data:`MARKER`."""
    import zarr

    path = Path(path)
    if not ((path / "zarr.json").is_file() or (path / ".zgroup").is_file()):
        return False
    try:
        return MARKER in zarr.open_group(str(path), mode="r").attrs
    except Exception:  # zarr raises many kinds for a damaged store: not ours to replace
        return False


def write_spatialdata(adata: ad.AnnData, out: str | os.PathLike, source: str = "") -> Path:
    """Write ``adata`` as a SpatialData zarr store at ``out`` (atomically: the store appears
    whole or not at all); ``source`` names the input in errors. An existing ``out`` is
    replaced only if it is a store written here (:func:`is_stevs_store`)."""
    import zarr

    from stevs import __version__

    with atomic_dir(out, replaces=is_stevs_store) as tmp:
        sdata = spatialdata_of(adata, source)
        sdata.write(tmp)
        zarr.open_group(str(tmp), mode="r+").attrs[MARKER] = {"stevs_version": __version__}
    return Path(out)
