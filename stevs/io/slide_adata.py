"""The slide AnnData (``results/slides/{slide}.h5ad``): its one reader and one writer.

Layout (docs/architecture.md, "Slide AnnData"): ``X`` raw integer counts (CSR), unique
barcodes as ``obs_names``, unique genes as ``var_names``, ``obsm["spatial"]`` float64
(n, 2) spot centres in level-0 px (x, y), ``uns["stevs"]`` the :class:`SlideMeta`,
``uns["spatial"][slide]`` the Visium-like H&E images and scale factors
(:mod:`stevs.io.visium_uns`), ``var["gene_ids"]`` where the input had gene ids.
Every stage reads a slide through :func:`read_slide_adata` (validated, errors name the
file) and :func:`slide_meta`; :mod:`stevs.io.ingest` writes it with
:func:`write_slide_adata`, building ``uns["stevs"]`` from a :class:`SlideMeta`, never by hand.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stevs import __version__
from stevs.atomic import atomic_path, is_hdf5_with
from stevs.errors import StevsInputError
from stevs.io.visium_uns import check_spatial_uns, lowres_only

if TYPE_CHECKING:  # pandas and scipy are imported where used: `stevs tile` needs neither
    import pandas as pd
    from scipy import sparse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideMeta:
    """``uns["stevs"]`` of a slide AnnData: what the slide is and where it came from."""

    slide: str
    patient: str
    mpp: float | None
    mpp_source: str = ""
    spot_diameter_um: float = float("nan")
    spot_pitch_um: float = float("nan")
    technology: str = ""
    image_path: str = ""
    image_width: int | None = None
    image_height: int | None = None
    expression_path: str = ""
    spots_path: str = ""
    stevs_version: str = __version__

    def to_uns(self) -> dict[str, Any]:
        """The ``uns["stevs"]`` dict (``None`` entries left out: h5ad cannot store them)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_uns(cls, uns: Any, path: str | os.PathLike | None = None) -> SlideMeta:
        """Parse ``uns["stevs"]``; unknown keys are ignored, missing ones take defaults."""
        uns = {} if uns is None else uns
        if not isinstance(uns, dict):
            raise StevsInputError(path, "uns['stevs'] must be a dict")
        known = {f.name for f in fields(cls)}
        values = {k: _plain(v) for k, v in uns.items() if k in known}
        fallback = Path(path).name.removesuffix(".h5ad") if path is not None else ""
        values["slide"] = str(values.get("slide") or fallback)
        values["patient"] = str(values.get("patient") or values["slide"])
        mpp = values.get("mpp")
        values["mpp"] = None if mpp is None or not math.isfinite(float(mpp)) else float(mpp)
        for key in ("image_width", "image_height"):
            if values.get(key) is not None:
                values[key] = int(values[key])
        return cls(**values)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of the image the spots were read against, when recorded."""
        if self.image_width is None or self.image_height is None:
            return None
        return (self.image_width, self.image_height)


def _plain(value: Any) -> Any:
    """numpy scalars (as h5py returns them) -> Python scalars."""
    return value.item() if isinstance(value, np.generic) else value


def _fail(path: Path, problem: str) -> None:
    raise StevsInputError(path, problem)


def check_slide_adata(adata: Any, path: str | os.PathLike, *, images: bool = True) -> None:
    """Validate an in-memory slide AnnData; errors name ``path``. ``images=False``: read
    without some H&E images (:func:`read_slide_adata`), so an image may be missing."""
    path = Path(path)
    if "spatial" not in adata.obsm:
        _fail(path, "obsm['spatial'] (spot centres in px) is missing")
    coords = np.asarray(adata.obsm["spatial"])
    if coords.ndim != 2 or coords.shape[1] != 2:
        _fail(path, f"obsm['spatial'] must be (n_spots, 2) x, y pixels, got {coords.shape}")
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        examples = ", ".join(str(b) for b in adata.obs_names[np.flatnonzero(bad)[:3]])
        _fail(path, f"{int(bad.sum())} spots have NaN or infinite coordinates (e.g. {examples})")
    if adata.n_obs == 0:
        _fail(path, "the slide AnnData has no spots")
    if not adata.obs_names.is_unique:
        _fail(path, "spot barcodes (obs_names) must be unique")
    if not adata.var_names.is_unique:
        _fail(path, "gene names (var_names) must be unique")
    SlideMeta.from_uns(adata.uns.get("stevs"), path)
    if "spatial" in adata.uns:
        check_spatial_uns(adata.uns["spatial"], path, images=images)


def read_slide_adata(
    path: str | os.PathLike, *, backed: bool = False, images: Collection[str] | None = None
) -> Any:
    """Read and validate a slide AnnData. ``backed=True`` leaves ``X`` on disk (read-only);
    close it with ``adata.file.close()``. ``images`` names the H&E images of
    ``uns["spatial"]`` to read (``()``: none, ``("lowres",)``); the default reads them all.
    The ``hires`` image is most of a slide's read (0.3 of 0.4 s on a her2st section), and
    counts, coordinates and metadata need none."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise StevsInputError(path, "slide AnnData not found (run 'stevs ingest' first)")
    try:
        adata = None if images is None or backed else _read_with_images(path, images)
        if adata is None:
            adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:
        raise StevsInputError(path, f"cannot read the slide AnnData: {err}") from err
    try:
        check_slide_adata(adata, path, images=images is None or backed)
    except StevsInputError:
        if backed:
            adata.file.close()
        raise
    return adata


def _read_with_images(path: Path, images: Collection[str]) -> Any:
    """The slide AnnData with only the ``images`` of ``uns["spatial"]`` (anndata's own
    element reader, element by element); None for a file this cannot read that way (not
    HDF5, or elements without anndata's encoding: :func:`read_slide_adata` then reads the
    whole file, as before)."""
    import anndata as ad
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as handle:
            elems = {key: read_elem(handle[key]) for key in handle if key != "uns"}
            group = handle["uns"] if "uns" in handle else {}
            uns = {key: read_elem(group[key]) for key in group if key != "spatial"}
            if "spatial" in group:
                uns["spatial"] = {
                    library: _spatial_entry(entry, images)
                    for library, entry in group["spatial"].items()
                }
        return ad.AnnData(**elems, uns=uns)
    except Exception as err:  # noqa: BLE001 - the whole-file read reports what is wrong
        log.debug("%s: element-wise read failed (%s); reading the whole file", path, err)
        return None


def _spatial_entry(entry: Any, images: Collection[str]) -> dict[str, Any]:
    from anndata.io import read_elem

    out = {key: read_elem(entry[key]) for key in entry if key != "images"}
    if "images" in entry:
        stored = entry["images"]
        out["images"] = {key: read_elem(stored[key]) for key in images if key in stored}
    return out


def _h5_strings(dataset: Any) -> list[str]:
    return [str(v) for v in dataset.asstr()[()]]


def read_slide_centres(path: str | os.PathLike) -> tuple[list[str], np.ndarray, SlideMeta]:
    """Barcodes, ``obsm["spatial"]`` and ``uns["stevs"]`` of a slide AnnData, checked.

    Read with h5py alone when the file has the usual h5ad layout (anndata's import, about a
    second, is most of what a small slide costs to tile); any other layout goes through
    :func:`read_slide_adata`. The same checks on centres and barcodes as there.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise StevsInputError(path, "slide AnnData not found (run 'stevs ingest' first)")
    try:
        with h5py.File(path, "r") as handle:
            obs = handle["obs"]
            barcodes = _h5_strings(obs[obs.attrs["_index"]])
            coords = np.asarray(handle["obsm/spatial"][()], np.float64)
            group = handle["uns/stevs"] if "uns/stevs" in handle else {}
            uns = {}
            for key in group:
                value = group[key][()]
                uns[key] = value.decode() if isinstance(value, bytes) else _plain(value)
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        adata = read_slide_adata(path, backed=True)
        try:
            barcodes = [str(b) for b in adata.obs_names]
            return barcodes, np.asarray(adata.obsm["spatial"], np.float64), slide_meta(adata, path)
        finally:
            adata.file.close()
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(barcodes):
        _fail(path, f"obsm['spatial'] must be (n_spots, 2) x, y pixels, got {coords.shape}")
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        examples = ", ".join(barcodes[i] for i in np.flatnonzero(bad)[:3])
        _fail(path, f"{int(bad.sum())} spots have NaN or infinite coordinates (e.g. {examples})")
    if not barcodes:
        _fail(path, "the slide AnnData has no spots")
    if len(set(barcodes)) != len(barcodes):
        _fail(path, "spot barcodes (obs_names) must be unique")
    return barcodes, coords, SlideMeta.from_uns(uns, path)


def slide_meta(adata: Any, path: str | os.PathLike | None = None) -> SlideMeta:
    """The :class:`SlideMeta` of a slide AnnData read by :func:`read_slide_adata`."""
    return SlideMeta.from_uns(adata.uns.get("stevs"), path)


def raw_counts(adata: Any, path: str | os.PathLike | None = None) -> sparse.csr_matrix:
    """``X`` as CSR raw counts; negative values are an error naming ``path``."""
    from scipy import sparse

    counts = sparse.csr_matrix(adata.X)
    if counts.nnz and (counts.data < 0).any():
        raise StevsInputError(path, "X must hold raw counts (found negative values)")
    return counts


def write_slide_adata(adata: Any, meta: SlideMeta, path: str | os.PathLike) -> Path:
    """Set ``uns["stevs"]`` from ``meta``, validate and write atomically (gzip)."""
    adata.uns["stevs"] = meta.to_uns()
    check_slide_adata(adata, path)
    with atomic_path(path, suffix=".h5ad", replaces=is_slide_adata_file) as tmp:
        adata.write_h5ad(tmp, compression="gzip")
    return Path(path)


def is_slide_adata_file(path: Path) -> bool:
    """True for a slide AnnData :func:`write_slide_adata` wrote (what it may replace)."""
    return is_hdf5_with(path, "uns/stevs/patient", "uns/stevs/expression_path")


@dataclass(frozen=True)
class SlideSpots:
    """What a prediction file takes from its slide: spots, images, gene ids."""

    obs: pd.DataFrame
    spatial: np.ndarray  # float64 (n, 2) level-0 px (x, y)
    images: dict[str, Any]  # ``uns["spatial"]`` ({library_id: entry}); {} when absent
    gene_ids: pd.Series | None = None  # ``var["gene_ids"]`` by gene name, when known


def spots_of(path: str | os.PathLike, barcodes: Any) -> SlideSpots:
    """``obs``, ``obsm["spatial"]``, ``uns["spatial"]`` and ``var["gene_ids"]`` of a slide
    AnnData, for the outputs made on ``barcodes`` (prediction files copy them)."""
    source = read_slide_adata(path, images=("lowres",))
    if any(
        "lowres" not in entry.get("images", {}) for entry in source.uns.get("spatial", {}).values()
    ):
        source = read_slide_adata(path)  # no lowres image: prediction files take the hires
    rows = source.obs_names.get_indexer(list(barcodes))
    if (rows < 0).any():
        raise StevsInputError(path, f"{int((rows < 0).sum())} spots are not spots of this slide")
    gene_ids = None
    if "gene_ids" in source.var.columns:
        gene_ids = source.var["gene_ids"].astype(str)
    images = lowres_only(source.uns.get("spatial", {}))
    if not images:
        log.warning(
            "%s has no uns['spatial'] (ingested by an older stevs?): its predictions cannot "
            "be drawn over the H&E; re-run 'stevs ingest' for it",
            path,
        )
    return SlideSpots(
        source.obs.iloc[rows], np.asarray(source.obsm["spatial"])[rows], images, gene_ids
    )
