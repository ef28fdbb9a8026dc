"""``uns["spatial"]``: the Visium-like image entry that lets scanpy and squidpy draw spots
over the H&E (``scanpy.pl.spatial(adata, color=gene)`` with default arguments).

Layout, as ``scanpy.read_visium`` builds it::

    uns["spatial"][library_id] = {
        "images": {"hires": uint8 (h, w, 3), "lowres": uint8 (h', w', 3)},
        "scalefactors": {"tissue_hires_scalef", "tissue_lowres_scalef",
                         "spot_diameter_fullres", "fiducial_diameter_fullres"},
        "metadata": {"source_image_path", "software_version", "images_source"},
    }

with ``library_id`` the slide id and the scale factors mapping ``obsm["spatial"]`` (level-0
px) onto the images. :func:`spatial_uns` is the one builder; :func:`spaceranger_spatial_uns`
feeds it Space Ranger's own PNGs and ``scalefactors_json.json``, :func:`slide_spatial_uns`
thumbnails of the slide image (legacy ST, ``.h5ad`` input, Visium without images, H&E-only
slides). :func:`check_spatial_uns` validates an entry read back from a file. Prediction
files copy their slide AnnData's entry (``stevs.io.slide_adata.spots_of``), never re-reading
the image.

Space Ranger's ``spatial/`` folder is read here only: :func:`read_scalefactors` (the one
reader of ``scalefactors_json.json``) and :func:`spaceranger_image`, which recognises
``tissue_hires_image.png`` / ``tissue_lowres_image.png`` given as the slide image (data sets
shipped without the full-resolution scan) and gives its scale factor.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stevs import __version__
from stevs.errors import StevsInputError
from stevs.io.thumbnail import read_thumbnail

log = logging.getLogger(__name__)

#: longest side of ``hires`` (Space Ranger's 2000 px) and ``lowres`` (600 px)
HIRES_MAX_SIDE = 2000
LOWRES_MAX_SIDE = 600
#: Space Ranger's fiducial/spot diameter ratio (for ``fiducial_diameter_fullres``)
FIDUCIAL_TO_SPOT = 1.615
#: Space Ranger's image files in ``outs/spatial/``
SPACERANGER_FILES = {
    "hires": "tissue_hires_image.png",
    "lowres": "tissue_lowres_image.png",
    "scalefactors": "scalefactors_json.json",
}
#: tolerated mismatch (relative, plus 2 px) between an image's size and slide size * scalef
SIZE_TOLERANCE = 0.02
SCALEFACTOR_KEYS = (
    "tissue_hires_scalef",
    "tissue_lowres_scalef",
    "spot_diameter_fullres",
    "fiducial_diameter_fullres",
)


def resize_max(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``image`` with its longest side at most ``max_side`` (Lanczos), and the factor applied."""
    height, width = image.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    if factor >= 1.0:
        return image, 1.0
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(resized), size[0] / width


def _rgb_uint8(image: Any, what: str) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(f"{what} must be uint8 (h, w, 3), got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def _positive(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return number


def spatial_uns(
    hires: np.ndarray,
    hires_scalef: float,
    spot_diameter_fullres: float,
    *,
    lowres: np.ndarray | None = None,
    lowres_scalef: float | None = None,
    fiducial_diameter_fullres: float | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``uns["spatial"][library_id]``: the one builder.

    ``hires`` is an RGB image of the whole slide, ``hires_scalef`` its px per level-0 px; a
    larger ``hires`` is shrunk to :data:`HIRES_MAX_SIDE`, and ``lowres`` (when not given)
    made from it at :data:`LOWRES_MAX_SIDE`. ``fiducial_diameter_fullres`` defaults to Space
    Ranger's ratio to the spot diameter.
    """
    hires = _rgb_uint8(hires, "hires image")
    hires_scalef = _positive(hires_scalef, "tissue_hires_scalef")
    hires, factor = resize_max(hires, HIRES_MAX_SIDE)
    hires_scalef *= factor
    if lowres is None:
        lowres, factor = resize_max(hires, LOWRES_MAX_SIDE)
        lowres_scalef = hires_scalef * factor
    lowres = _rgb_uint8(lowres, "lowres image")
    lowres_scalef = _positive(lowres_scalef, "tissue_lowres_scalef")
    diameter = _positive(spot_diameter_fullres, "spot_diameter_fullres")
    fiducial = diameter * FIDUCIAL_TO_SPOT
    if fiducial_diameter_fullres is not None:
        fiducial = _positive(fiducial_diameter_fullres, "fiducial_diameter_fullres")
    meta = {"software_version": f"stevs {__version__}", **(metadata or {})}
    return {
        "images": {"hires": hires, "lowres": lowres},
        "scalefactors": {
            "tissue_hires_scalef": hires_scalef,
            "tissue_lowres_scalef": lowres_scalef,
            "spot_diameter_fullres": diameter,
            "fiducial_diameter_fullres": fiducial,
        },
        "metadata": {k: str(v) for k, v in meta.items() if v is not None},
    }


def slide_spatial_uns(
    slide: Any, spot_diameter_fullres: float, image_path: str | os.PathLike
) -> dict[str, Any]:
    """The entry from an open slide (``stevs.io.slide.SlideReader``): thumbnails of it.

    ``hires`` is the whole slide with its longest side :data:`HIRES_MAX_SIDE` (never
    enlarged), read block by block (:func:`stevs.io.thumbnail.read_thumbnail`), so memory
    stays bounded.
    """
    width, height = slide.dimensions
    hires = read_thumbnail(slide, min(HIRES_MAX_SIDE, max(width, height)))
    scalef = max(hires.shape[:2]) / max(width, height)
    metadata = {"source_image_path": str(image_path), "images_source": "stevs thumbnail"}
    return spatial_uns(hires, scalef, spot_diameter_fullres, metadata=metadata)


def read_scalefactors(path: str | os.PathLike) -> dict[str, Any]:
    """Space Ranger's ``scalefactors_json.json`` as a dict; not a JSON object is an error
    naming the file (keys are checked by the reader that needs them)."""
    try:
        factors = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StevsInputError(path, f"invalid JSON: {err}") from err
    if not isinstance(factors, dict):
        raise StevsInputError(path, "scale factors must be a JSON object")
    return factors


@dataclass(frozen=True)
class SpaceRangerImage:
    """Space Ranger's hires or lowres PNG given as the slide image."""

    path: Path
    key: str  # "hires" or "lowres"
    scalef: float  # px of this image per full-resolution px
    factors: dict[str, Any]  # the folder's scale factors (full-resolution frame)

    def fullres_mpp(self, spot_diameter_um: float) -> float | None:
        """µm per full-resolution px: ``microns_per_pixel`` (Visium HD), else the spot
        diameter over ``spot_diameter_fullres``; None when neither is known."""
        try:
            return _positive(self.factors.get("microns_per_pixel"), "microns_per_pixel")
        except ValueError:
            pass
        try:
            diameter_px = _positive(self.factors.get("spot_diameter_fullres"), "diameter")
            return _positive(spot_diameter_um / diameter_px, "microns per pixel")
        except ValueError:
            return None

    def image_frame(self) -> dict[str, Any]:
        """The scale factors with this image as level 0 (image scale factors divided by,
        diameters in px multiplied by, :attr:`scalef`)."""
        out = dict(self.factors)
        for key in ("tissue_hires_scalef", "tissue_lowres_scalef", "microns_per_pixel"):
            if isinstance(out.get(key), int | float):
                out[key] = out[key] / self.scalef
        for key in ("spot_diameter_fullres", "fiducial_diameter_fullres"):
            if isinstance(out.get(key), int | float):
                out[key] = out[key] * self.scalef
        return out


def spaceranger_image(image: str | os.PathLike) -> SpaceRangerImage | None:
    """``image`` as Space Ranger's ``tissue_hires_image.png`` / ``tissue_lowres_image.png``
    in a folder with ``scalefactors_json.json``; None for any other image."""
    image = Path(image)
    names = {name: key for key, name in SPACERANGER_FILES.items() if key != "scalefactors"}
    factors_path = image.parent / SPACERANGER_FILES["scalefactors"]
    if image.name not in names or not factors_path.is_file():
        return None
    key = names[image.name]
    factors = read_scalefactors(factors_path)
    try:
        scalef = _positive(factors.get(f"tissue_{key}_scalef"), f"tissue_{key}_scalef")
    except ValueError as err:
        raise StevsInputError(factors_path, f"invalid scale factors: {err}") from err
    return SpaceRangerImage(image, key, scalef, factors)


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise StevsInputError(path, f"cannot read Space Ranger's image: {err}") from err


def _size_matches(image: np.ndarray, scalef: float, dimensions: tuple[int, int]) -> bool:
    height, width = image.shape[:2]
    for got, full in ((width, dimensions[0]), (height, dimensions[1])):
        expected = full * scalef
        if abs(got - expected) > SIZE_TOLERANCE * expected + 2:
            return False
    return True


def spaceranger_spatial_uns(
    spatial_dir: str | os.PathLike,
    dimensions: tuple[int, int],
    image_path: str | os.PathLike,
    level0_scalef: float = 1.0,
) -> dict[str, Any] | None:
    """The entry from Space Ranger's ``outs/spatial/`` PNGs and scale factors.

    ``None`` (logged) when a file is missing or the images do not fit the slide image of
    ``dimensions`` (level-0 width, height) at their scale factors: the caller then makes
    thumbnails of the slide instead. ``level0_scalef``: px of the slide image per
    full-resolution px (Space Ranger's own hires or lowres PNG as the slide image: its
    scale factor); the entry's scale factors map the slide image's px.
    """
    spatial_dir = Path(spatial_dir)
    paths = {key: spatial_dir / name for key, name in SPACERANGER_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        log.info("%s: no %s; images made from the slide", spatial_dir, ", ".join(missing))
        return None
    factors = read_scalefactors(paths["scalefactors"])
    try:
        hires_scalef = _positive(factors["tissue_hires_scalef"], "tissue_hires_scalef")
        lowres_scalef = _positive(factors["tissue_lowres_scalef"], "tissue_lowres_scalef")
        diameter = _positive(factors["spot_diameter_fullres"], "spot_diameter_fullres")
        level0_scalef = _positive(level0_scalef, "level0_scalef")
        fiducial = factors.get("fiducial_diameter_fullres")
        if fiducial is not None:
            fiducial = _positive(fiducial, "fiducial_diameter_fullres") * level0_scalef
    except (KeyError, TypeError, ValueError) as err:
        raise StevsInputError(paths["scalefactors"], f"invalid scale factors: {err}") from err
    hires_scalef, lowres_scalef = hires_scalef / level0_scalef, lowres_scalef / level0_scalef
    diameter *= level0_scalef
    hires, lowres = _read_png(paths["hires"]), _read_png(paths["lowres"])
    if not (
        _size_matches(hires, hires_scalef, dimensions)
        and _size_matches(lowres, lowres_scalef, dimensions)
    ):
        log.warning(
            "%s: Space Ranger's images (%s, %s) do not fit the slide image (%d x %d px) at "
            "their scale factors; images made from the slide instead",
            spatial_dir, hires.shape[1::-1], lowres.shape[1::-1], *dimensions,
        )  # fmt: skip
        return None
    return spatial_uns(
        hires,
        hires_scalef,
        diameter,
        lowres=lowres,
        lowres_scalef=lowres_scalef,
        fiducial_diameter_fullres=fiducial,
        metadata={"source_image_path": str(image_path), "images_source": str(spatial_dir)},
    )


def check_spatial_uns(
    uns_spatial: Any, path: str | os.PathLike | None = None, *, images: bool = True
) -> None:
    """Validate ``uns["spatial"]`` ({library_id: entry}) as read from a file; errors name it.
    ``images=False``: read without some of its images, so none is required."""
    if not isinstance(uns_spatial, Mapping) or not uns_spatial:
        raise StevsInputError(path, "uns['spatial'] must be a non-empty dict of libraries")
    for library, entry in uns_spatial.items():
        where = f"uns['spatial']['{library}']"
        if not isinstance(entry, Mapping):
            raise StevsInputError(path, f"{where} must be a dict")
        images, factors = entry.get("images"), entry.get("scalefactors")
        if not isinstance(images, Mapping) or not isinstance(factors, Mapping):
            raise StevsInputError(path, f"{where} needs 'images' and 'scalefactors'")
        try:
            present = [key for key in ("hires", "lowres") if key in images]
            if not present and images:
                raise ValueError(f"{where}['images'] needs 'hires' or 'lowres'")
            for key in present:
                _rgb_uint8(images.get(key), f"{where}['images']['{key}']")
            for key in SCALEFACTOR_KEYS:
                _positive(factors.get(key), f"{where}['scalefactors']['{key}']")
        except (TypeError, ValueError) as err:
            raise StevsInputError(path, str(err)) from err


def lowres_only(uns_spatial: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``uns["spatial"]`` whose libraries carry only the ``lowres`` image, stored
    under both keys, ``lowres`` and ``hires``, with ``tissue_hires_scalef`` set to its scale.

    Prediction files (one per run, fold and slide) carry this: a file stays about 1.6 MB
    (0.9 MB with one key) instead of the ~8 MB a 2000 px ``hires`` image costs (the slide
    AnnData keeps both), and ``sc.pl.spatial`` draws it with ``img_key="lowres"`` and with
    ``"hires"``, the default of scanpy and of squidpy's ``spatial_scatter`` (squidpy 1.8
    refuses a file with ``lowres`` only unless given ``img_res_key="lowres"``). The scale
    factors stay true: each maps ``obsm["spatial"]`` onto the image stored under its key.
    """
    out: dict[str, Any] = {}
    for library, entry in uns_spatial.items():
        images = dict(entry.get("images", {}))
        factors = dict(entry.get("scalefactors", {}))
        if "lowres" in images and "tissue_lowres_scalef" in factors:
            images = {"hires": images["lowres"], "lowres": images["lowres"]}
            factors["tissue_hires_scalef"] = factors["tissue_lowres_scalef"]
        out[library] = {**entry, "images": images, "scalefactors": factors}
    return out
