"""The prediction AnnData (``results/predictions/{method}/{fold}/{slide}.h5ad`` and the
H&E-only ``{slide}.h5ad`` of ``stevs predict-slide``): its one writer and one reader.

Layout (docs/architecture.md, "Prediction AnnData"): ``X`` float32 predicted expression on
the panel (the targets' normalisation), ``layers["std"]`` float32 predictive standard
deviation, ``obs`` and ``obsm["spatial"]`` of the slide's spots, ``uns["spatial"]`` the
slide's Visium-like H&E images and scale factors (``scanpy.pl.spatial`` draws the file
over the H&E), ``var["gene_ids"]`` where the slide has gene ids, ``uns["stevs"]`` = method,
fold, slide, model_sha256, normalisation, stevs_version (plus what the writer adds). A
prediction with a NaN or infinite value is never written: it is an error. Written gzip
(the images dominate the file).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from stevs import __version__
from stevs.atomic import atomic_path, is_hdf5_with
from stevs.errors import StevsInputError
from stevs.io.slide_adata import SlideSpots


def new_prediction(
    mean: np.ndarray,
    std: np.ndarray,
    genes: Sequence[str],
    spots: SlideSpots,
    meta: Mapping[str, Any],
    *,
    source: str | os.PathLike | None = None,
) -> Any:
    """The prediction AnnData of one slide on ``spots`` (its obs, coordinates, images and
    gene ids: :func:`stevs.io.slide_adata.spots_of`); non-finite values are an error naming
    ``source``."""
    import anndata as ad

    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    n_spots = len(spots.obs)
    if mean.shape != std.shape or mean.shape != (n_spots, len(genes)):
        raise ValueError(f"mean {mean.shape}, std {std.shape}, {n_spots} spots x {len(genes)}")
    bad = int((~np.isfinite(mean)).sum() + (~np.isfinite(std)).sum())
    if bad:
        raise StevsInputError(
            source,
            f"the model predicted {bad} NaN or infinite values: its weights are corrupt or "
            "training diverged; retrain it (nothing was written)",
        )
    var = pd.DataFrame(index=pd.Index(list(genes)))
    if spots.gene_ids is not None:
        var["gene_ids"] = spots.gene_ids.reindex(var.index).fillna("").astype(str).to_numpy()
    adata = ad.AnnData(X=mean, obs=spots.obs.copy(), var=var)
    adata.layers["std"] = std
    adata.obsm["spatial"] = np.asarray(spots.spatial, dtype=np.float64)
    if spots.images:
        adata.uns["spatial"] = dict(spots.images)
    adata.uns["stevs"] = {k: v for k, v in meta.items() if v is not None}
    adata.uns["stevs"].setdefault("stevs_version", __version__)
    return adata


def prediction_meta(config: Mapping[str, Any], fold: Any, slide: str, sha: str) -> dict:
    """``uns["stevs"]`` of a prediction file."""
    return {
        "method": config.get("method"),
        "fold": fold.fold,
        "slide": slide,
        "model_sha256": sha,
        "normalisation": {"method": fold.normalisation_method, "target_sum": fold.target_sum},
    }


def is_prediction_file(path: str | os.PathLike) -> bool:
    """True for a prediction file :func:`write_prediction` wrote (what it may replace)."""
    return is_hdf5_with(path, "uns/stevs/model_sha256")


def write_prediction(adata: Any, path: str | os.PathLike) -> Path:
    """Write a prediction AnnData atomically (gzip); an existing file is replaced only if it
    is a prediction file (``uns["stevs"]`` with ``model_sha256``)."""
    with atomic_path(path, suffix=".h5ad", replaces=is_prediction_file) as tmp:
        adata.write_h5ad(tmp, compression="gzip")
    return Path(path)


#: the file that lists a fold's prediction files (``stevs predict``), the workflow's output
#: of the predict rule: a file, so that Snakemake keeps no timestamp file in the folder
MANIFEST = "predictions.tsv"


def write_manifest(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Write ``{out_dir}/predictions.tsv``: one row per prediction file written (``slide``,
    ``file`` relative to ``out_dir``), atomically and last, once every file is in place."""
    rows = pd.DataFrame(
        {"slide": [Path(p).stem for p in paths], "file": [Path(p).name for p in paths]}
    )
    with atomic_path(Path(out_dir) / MANIFEST) as tmp:
        rows.to_csv(tmp, sep="\t", index=False)
    return Path(out_dir) / MANIFEST


def read_manifest(path: str | os.PathLike) -> dict[str, Path]:
    """Slide -> prediction file of a :func:`write_manifest` file."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise StevsInputError(path, f"unreadable prediction list: {err}") from None
    if list(table.columns) != ["slide", "file"]:
        raise StevsInputError(path, "a prediction list has the columns slide, file")
    return {row.slide: path.parent / row.file for row in table.itertuples()}


@dataclass
class Prediction:
    """A prediction file restricted to some genes, as evaluation and the report use it."""

    path: Path
    mean: np.ndarray  # float64 (n, G)
    std: np.ndarray | None  # float64 (n, G) or None
    barcodes: pd.Index
    spatial: np.ndarray | None
    meta: dict[str, Any]


def _dense(matrix: Any) -> np.ndarray:
    return matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)


@dataclass
class _Parts:
    """The elements of a prediction file that evaluation reads (never the H&E images)."""

    X: Any
    var_names: pd.Index
    obs_names: pd.Index
    layers: dict[str, Any]
    obsm: dict[str, Any]
    uns: dict[str, Any]


def _read_parts(path: Path) -> _Parts:
    """``X``, names, ``layers["std"]``, ``obsm["spatial"]`` and ``uns["stevs"]`` only: the
    ``uns["spatial"]`` images are most of the file and evaluation does not need them."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as file:

        def optional(key: str) -> dict[str, Any]:
            name = key.rsplit("/", 1)[1]
            return {name: read_elem(file[key])} if key in file else {}

        return _Parts(
            X=read_elem(file["X"]),
            var_names=pd.Index(read_elem(file["var"]).index),
            obs_names=pd.Index(read_elem(file["obs"]).index),
            layers=optional("layers/std"),
            obsm=optional("obsm/spatial"),
            uns=optional("uns/stevs"),
        )


def read_prediction(path: str | os.PathLike, genes: Sequence[str]) -> Prediction:
    """Read a prediction file on ``genes`` (in that order); checks names the file."""
    path = Path(path)
    if not path.is_file():
        raise StevsInputError(path, "prediction file not found")
    try:
        pred = _read_parts(path)
    except Exception as err:
        raise StevsInputError(path, f"cannot read the prediction file: {err}") from err
    gene_index = pred.var_names.get_indexer(list(genes))
    if (gene_index < 0).any():
        missing = [g for g, i in zip(genes, gene_index, strict=True) if i < 0][:5]
        raise StevsInputError(path, f"prediction lacks panel genes, e.g. {missing}")
    if pred.obs_names.has_duplicates:
        raise StevsInputError(path, "duplicate spot barcodes")
    mean = np.asarray(_dense(pred.X)[:, gene_index], dtype=np.float64)
    if not np.isfinite(mean).all():
        raise StevsInputError(path, "predicted expression holds NaN or infinite values")
    std = None
    if "std" in pred.layers:
        std = np.asarray(_dense(pred.layers["std"])[:, gene_index], dtype=np.float64)
        if (std < 0).any() or not np.isfinite(std).all():
            raise StevsInputError(path, "layers['std'] holds negative or non-finite values")
    spatial = np.asarray(pred.obsm["spatial"]) if "spatial" in pred.obsm else None
    meta = dict(pred.uns.get("stevs", {}))
    return Prediction(path, mean, std, pred.obs_names.copy(), spatial, meta)


@dataclass
class Background:
    """The H&E image a prediction file carries, with its scale to ``obsm["spatial"]`` px."""

    image: np.ndarray  # uint8 (h, w, 3)
    scalef: float  # image px per level-0 px


def read_background(path: str | os.PathLike) -> Background | None:
    """The lowres (else hires) H&E of a prediction file's ``uns["spatial"]``; None if absent."""
    import h5py
    from anndata.io import read_elem

    path = Path(path)
    try:
        with h5py.File(path, "r") as file:
            libraries = file.get("uns/spatial")
            if libraries is None or not len(libraries):
                return None
            entry = libraries[next(iter(libraries))]
            for key, factor in (
                ("lowres", "tissue_lowres_scalef"),
                ("hires", "tissue_hires_scalef"),
            ):
                if f"images/{key}" in entry and f"scalefactors/{factor}" in entry:
                    image = np.asarray(read_elem(entry[f"images/{key}"]))
                    scalef = float(read_elem(entry[f"scalefactors/{factor}"]))
                    return Background(image, scalef)
    except OSError as err:
        raise StevsInputError(path, f"cannot read the prediction file: {err}") from err
    return None
