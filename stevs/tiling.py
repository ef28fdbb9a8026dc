"""Spot-centred patches at a fixed physical field of view -> HDF5 patch cache.

For every spot (of a slide AnnData, or of a grid), a ``patch_px`` x ``patch_px`` RGB patch
centred on the spot is cut at ``patch_mpp`` microns per pixel (default 224 px at 0.5 µm/px
= 112 µm) and written, in spot order, to the patch cache of ``docs/architecture.md``.

How it stays fast and bounded in memory:

* Spots are grouped into *windows*: cells of a square grid a few patches wide, rounded to
  whole tiles of the level read (:meth:`SlideReader.tile_size`: a pyramid's tiles, a JPEG's
  decoded bands) so that a tile is decoded for one window, and the few it shares with a
  neighbour come from the reader's bounded tile cache. Each window is read once, from the
  coarsest pyramid level still at least as fine as the target resolution, and every patch
  of the window is resampled from it (Pillow, antialiased bicubic, sub-pixel exact box).
  When that level already has the target resolution (e.g. level 1 of a 0.25 µm/px scan
  for 0.5 µm/px patches), patches are cut at the nearest whole pixel instead: no
  interpolation blur, centre within half a target pixel of the spot. Only a handful of
  windows (two per thread) are held at a time, so a gigapixel pyramidal slide is never
  held whole. A plain JPEG with restart markers is decoded band by band where windows fall
  (:mod:`stevs.io.jpeg_bands`); other plain JPEG/PNG images are decoded whole (about 3
  bytes per pixel), so memory grows with such an image.
* Windows run in a thread pool (``threads``); OpenSlide, tifffile's codecs, numpy and
  Pillow's resampling release the GIL. A writer thread (:class:`BackgroundWriter`) stores
  the patches while the next window decodes, into an HDF5 dataset whose chunks are all
  allocated up front, so the file's bytes do not depend on the order in which windows
  finish: reruns with the same inputs give the same bytes.
* With ``threads`` > 1 the tissue mask is detected in the same pool while the first
  windows decode (its thumbnail decode and resize release the GIL too); the tissue
  fractions are written into the cache once it is ready
  (:meth:`PatchCacheWriter.set_tissue`, the same bytes), and spots off the tissue are
  refused then, before the cache file appears.

Geometry: ``obsm["spatial"]`` holds level-0 pixel coordinates with integer values at pixel
centres (the image convention of scanpy and matplotlib), so a spot at ``(x, y)`` is centred
on the continuous point ``(x + 0.5, y + 0.5)`` where pixel ``i`` spans ``[i, i + 1)``.
A patch covers the level-0 box of side ``patch_px * patch_mpp / mpp`` around that point;
parts outside the slide are white and counted in ``outside_fraction``. ``tissue_fraction``
is the share of the patch's box on the slide's tissue mask (:mod:`stevs.tissue`: Otsu on
the saturation of a thumbnail, as in CLAM, cleaned by morphology), the same mask
``stevs predict-slide`` selects its grid spots with. The cache is written by
:class:`stevs.io.patch_cache.PatchCacheWriter`. Measured spots (``stevs tile``) must fall
on that tissue: :func:`stevs.tiling_checks.check_spots_on_tissue` stops coordinates in
another image's scale. The QC picture (``--qc``) is drawn by :mod:`stevs.tiling_qc`.

:func:`tile_spots` tiles spot centres on an open slide; :func:`tile_slide` (``stevs tile``)
reads them from a slide AnnData.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stevs.atomic import check_replaceable, is_stevs_png
from stevs.errors import StevsInputError
from stevs.io.patch_cache import PatchCacheInfo, PatchCacheWriter, PatchScale
from stevs.io.slide import MAX_UPSAMPLING, MPP_RANGE, SlideReader, open_slide
from stevs.options import in_range, positive_float, positive_int
from stevs.tiling_checks import (
    PATCH_MPP_RANGE,
    PATCH_PX_RANGE,
    check_centers,
    check_spots_match_image,
    check_spots_on_tissue,
    check_tiling_settings,
    read_slide_spots,
)
from stevs.tiling_qc import draw_qc, save_qc
from stevs.tissue import TissueDetection, detect_tissue

log = logging.getLogger(__name__)

DEFAULT_PATCH_PX = 224
DEFAULT_PATCH_MPP = 0.5
#: side of a window's grid cell, in patches
DEFAULT_WINDOW_PATCHES = 4
RESAMPLE = Image.Resampling.BICUBIC
RESAMPLE_NAME = "bicubic (Pillow, antialiased)"
#: extra source pixels around each patch box so the bicubic filter's support is inside
#: the window (factor times the filter support of 2, plus rounding)
_SUPPORT_MARGIN = 2


@dataclass(frozen=True)
class TileGeometry:
    """How patches map onto the slide's pyramid."""

    mpp_source: float  # µm per level-0 px
    patch_px: int
    patch_mpp: float
    level: int  # pyramid level the patches are read from
    level_downsample: float  # level-0 px per level px

    @property
    def patch_um(self) -> float:
        return self.patch_px * self.patch_mpp

    @property
    def patch_level0_px(self) -> float:
        """Side of a patch's box in level-0 pixels."""
        return self.patch_px * self.patch_mpp / self.mpp_source

    @property
    def level_to_target(self) -> float:
        """Level pixels per target pixel (>= 1 except when the slide is coarser)."""
        return self.patch_mpp / self.mpp_source / self.level_downsample

    @property
    def at_level_resolution(self) -> bool:
        """True when the read level's pixels are target pixels (patches need no resampling)."""
        return abs(self.level_to_target - 1.0) < 1e-6

    def boxes(self, centers_px: np.ndarray) -> np.ndarray:
        """Level-0 boxes (left, top, right, bottom) of the patches around spot centres."""
        half = self.patch_level0_px / 2.0
        cx = centers_px[:, 0] + 0.5
        cy = centers_px[:, 1] + 0.5
        return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)


@dataclass(frozen=True)
class Window:
    """A box of one pyramid level, read once, serving the patches ``indices``."""

    x: int  # level px
    y: int
    width: int
    height: int
    indices: np.ndarray  # spot indices (obs order) served by this window


# -- geometry ------------------------------------------------------------------------------


def outside_fractions(boxes: np.ndarray, dimensions: tuple[int, int]) -> np.ndarray:
    """Fraction of each level-0 box (left, top, right, bottom) lying outside the slide."""
    width, height = dimensions
    inside_w = np.clip(np.minimum(boxes[:, 2], width) - np.maximum(boxes[:, 0], 0), 0, None)
    inside_h = np.clip(np.minimum(boxes[:, 3], height) - np.maximum(boxes[:, 1], 0), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.clip(1.0 - inside_w * inside_h / area, 0.0, 1.0).astype(np.float32)


def plan_windows(
    boxes: np.ndarray,
    geometry: TileGeometry,
    window_patches: int,
    tile: tuple[int, int] | None = None,
) -> list[Window]:
    """Group patches into windows: grid cells ``window_patches`` patches wide.

    Each window is the bounding box, in pixels of the read level, of its patches' boxes plus
    a margin for the resampling filter. With ``tile`` (the read level's tile or band size,
    :meth:`SlideReader.tile_size`), cells are whole multiples of it on its grid, so most
    tiles are decoded for one window only. Windows are ordered row by row, so neighbouring
    windows (sharing pyramid tiles) are read close together in time.
    """
    if window_patches < 1:
        raise ValueError(f"window_patches must be >= 1, got {window_patches}")
    cell = window_patches * geometry.patch_level0_px / geometry.level_downsample  # level px
    cell_w = cell_h = cell
    if tile is not None:
        cell_w = max(1, round(cell / tile[0])) * tile[0]
        cell_h = max(1, round(cell / tile[1])) * tile[1]
    level_boxes = boxes / geometry.level_downsample
    centres_x = (level_boxes[:, 0] + level_boxes[:, 2]) / 2.0
    centres_y = (level_boxes[:, 1] + level_boxes[:, 3]) / 2.0
    cell_col = np.floor(centres_x / cell_w).astype(np.int64)
    cell_row = np.floor(centres_y / cell_h).astype(np.int64)
    order = np.lexsort((np.arange(len(boxes)), cell_col, cell_row))
    keys = np.stack([cell_row[order], cell_col[order]], axis=1)
    starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
    ends = np.r_[starts[1:], len(order)]
    margin = math.ceil(_SUPPORT_MARGIN * max(geometry.level_to_target, 1.0)) + 1
    windows = []
    for start, end in zip(starts, ends, strict=True):
        indices = np.sort(order[start:end])
        sub = level_boxes[indices]
        x0 = math.floor(sub[:, 0].min()) - margin
        y0 = math.floor(sub[:, 1].min()) - margin
        x1 = math.ceil(sub[:, 2].max()) + margin
        y1 = math.ceil(sub[:, 3].max()) + margin
        windows.append(Window(x0, y0, x1 - x0, y1 - y0, indices))
    return windows


def read_window(slide: SlideReader, window: Window, geometry: TileGeometry) -> np.ndarray:
    """The pixels of a window at its level (uint8 RGB), white outside the slide."""
    scale = geometry.level_downsample
    box = (window.x * scale, window.y * scale, window.width * scale, window.height * scale)
    try:
        return slide.read_region(box, (window.width, window.height))
    except StevsInputError:
        raise
    except Exception as err:  # a codec or I/O error of a damaged file
        raise StevsInputError(
            slide.path,
            f"cannot read level {geometry.level} (downsample {scale:g}) at level-0 box "
            f"{tuple(round(v) for v in box)}: {type(err).__name__}: {err}",
        ) from err


def cut_patches(
    window_pixels: np.ndarray, window: Window, boxes: np.ndarray, geometry: TileGeometry
) -> np.ndarray:
    """The patches of ``window`` from its pixels: uint8 (n, P, P, 3).

    When the read level already has the target resolution, a patch is the window's pixels
    at the nearest whole-pixel position (centre within half a target pixel of the spot,
    no interpolation blur); otherwise it is resampled from its exact sub-pixel box.
    """
    size = geometry.patch_px
    out = np.empty((len(window.indices), size, size, 3), np.uint8)
    level_boxes = boxes[window.indices] / geometry.level_downsample
    if geometry.at_level_resolution:
        cols = np.floor(level_boxes[:, 0] - window.x + 0.5).astype(np.int64)
        rows = np.floor(level_boxes[:, 1] - window.y + 0.5).astype(np.int64)
        for k, (row, col) in enumerate(zip(rows, cols, strict=True)):
            out[k] = window_pixels[row : row + size, col : col + size]
        return out
    image = Image.fromarray(window_pixels)
    for k, (left, top, right, bottom) in enumerate(level_boxes):
        sub_box = (left - window.x, top - window.y, right - window.x, bottom - window.y)
        out[k] = np.asarray(image.resize((size, size), RESAMPLE, box=sub_box))
    return out


# -- pyramid level ----------------------------------------------------------------------------


def plan_geometry(
    slide: SlideReader, mpp_source: float, patch_px: int, patch_mpp: float
) -> TileGeometry:
    """Pick the pyramid level for the target resolution and check it makes sense."""
    downsample = patch_mpp / mpp_source
    if downsample < 1.0 / MAX_UPSAMPLING:
        raise StevsInputError(
            slide.path,
            f"target {patch_mpp:g} µm/px is {1 / downsample:.1f}x finer than the slide "
            f"({mpp_source:g} µm/px); at most {MAX_UPSAMPLING:g}x upsampling is allowed",
        )
    side = patch_px * downsample
    if side > max(slide.dimensions):
        raise StevsInputError(
            slide.path,
            f"a patch of {patch_px * patch_mpp:g} µm ({side:.0f} px) is larger than the "
            f"whole slide ({slide.dimensions[0]}x{slide.dimensions[1]} px)",
        )
    if downsample < 1.0:
        log.info("%s: patches are upsampled %.2fx from level 0", slide.path, 1 / downsample)
    level = slide.best_level(downsample)
    return TileGeometry(
        mpp_source=mpp_source,
        patch_px=int(patch_px),
        patch_mpp=float(patch_mpp),
        level=level,
        level_downsample=float(slide.level_downsamples[level]),
    )


# -- writing -----------------------------------------------------------------------------------


def _iter_window_results(
    slide: SlideReader,
    windows: list[Window],
    boxes: np.ndarray,
    geometry: TileGeometry,
    pool: ThreadPoolExecutor | None,
    threads: int,
) -> Iterator[tuple[Window, np.ndarray]]:
    """Patches per window, computed in ``pool`` (``None``: here) with at most 2 windows per
    thread queued."""

    def work(window: Window) -> np.ndarray:
        return cut_patches(read_window(slide, window, geometry), window, boxes, geometry)

    if pool is None:
        for window in windows:
            yield window, work(window)
        return
    pending: dict[Future, Window] = {}
    queue = iter(windows)
    try:
        for window in queue:
            pending[pool.submit(work, window)] = window
            if len(pending) >= 2 * threads:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                window = pending.pop(future)
                yield window, future.result()
                nxt = next(queue, None)
                if nxt is not None:
                    pending[pool.submit(work, nxt)] = nxt
    finally:
        for future in pending:
            future.cancel()


class BackgroundWriter:
    """Hands windows of patches to a thread that writes them, so decoding and HDF5 overlap.

    HDF5 calls hold the GIL but the decoders (libjpeg-turbo via imagecodecs/Pillow,
    OpenSlide) release it, so the next window decodes while this one is written. At most
    ``depth`` windows wait in the queue (bounded memory); an error of the writer thread is
    raised in the caller at its next :meth:`put` or at the end of the block.
    """

    _DONE = object()

    def __init__(self, writer: PatchCacheWriter, depth: int = 4) -> None:
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stevs-write", daemon=True)

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._DONE:
            if self._error is not None:
                continue  # drain after a failure, so put() never blocks forever
            indices, patches = item
            try:
                for index, patch in zip(indices, patches, strict=True):
                    self._writer.write(int(index), patch)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller
                self._error = err

    def put(self, indices: np.ndarray, patches: np.ndarray) -> None:
        """Queue the patches of rows ``indices`` for writing."""
        if self._error is not None:
            raise self._error
        self._queue.put((indices, patches))

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(self._DONE)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


def tile_spots(
    slide: SlideReader,
    barcodes: Sequence[str],
    centers_px: np.ndarray,
    out_path: str | os.PathLike,
    *,
    slide_id: str,
    patch_px: int = DEFAULT_PATCH_PX,
    patch_mpp: float = DEFAULT_PATCH_MPP,
    threads: int = 1,
    qc_path: str | os.PathLike | None = None,
    window_patches: int = DEFAULT_WINDOW_PATCHES,
    progress: bool | None = None,
    tissue: TissueDetection | None = None,
    spots_path: str | os.PathLike | None = None,
    spot_diameter_um: float = float("nan"),
) -> Path:
    """Cut a patch centred on every spot of an open slide into the patch cache ``out_path``.

    ``centers_px``: (n, 2) level-0 (x, y), pixel centres at integers, in ``barcodes``'
    order. ``tissue``: the slide's :func:`stevs.tissue.detect_tissue` when the caller has it
    already (else it is computed). ``progress=None`` shows a progress bar on a terminal only.
    A QC PNG is written to ``qc_path`` when given. ``spots_path``: the file the measured
    spots come from; when given, spots mostly off the slide's tissue are refused naming it
    (:func:`check_spots_on_tissue`). ``spot_diameter_um``: the spots' size, drawn in the QC
    picture when known. Returns ``out_path``.
    """
    check_tiling_settings(patch_px, patch_mpp, threads, window_patches, slide.path)
    if qc_path is not None:  # a picture of the user's there stops it before the work
        check_replaceable({Path(qc_path): is_stevs_png})
    barcodes = [str(b) for b in barcodes]
    centers_px = np.asarray(centers_px, np.float64)
    check_centers(slide.path, barcodes, centers_px, slide)
    mpp_source = slide.require_mpp()
    geometry = plan_geometry(slide, mpp_source, patch_px, patch_mpp)
    boxes = geometry.boxes(centers_px)
    outside = outside_fractions(boxes, slide.dimensions)
    windows = plan_windows(boxes, geometry, window_patches, slide.tile_size(geometry.level))
    log.info(
        "%s: %d patches of %d px at %g µm/px from level %d (downsample %g) of %s "
        "in %d windows, %d threads; %d cross the slide's edge",
        slide_id,
        len(boxes),
        patch_px,
        patch_mpp,
        geometry.level,
        geometry.level_downsample,
        slide.path,
        len(windows),
        threads,
        int(np.count_nonzero(outside > 0)),
    )
    with ExitStack() as stack:
        pool = None
        if threads > 1:
            pool = stack.enter_context(
                ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stevs-tile")
            )
        # with threads to spare, the tissue is detected while the first windows decode
        detection: Future[TissueDetection] | None = None
        if tissue is None and pool is not None:
            detection = pool.submit(detect_tissue, slide, mpp_source)
        elif tissue is None:
            tissue = detect_tissue(slide, mpp_source)
        writer = PatchCacheWriter(
            out_path,
            barcodes=barcodes,
            centers_px=centers_px,
            outside_fraction=outside,
            tissue_fraction=None,
            scale=PatchScale(geometry.patch_px, geometry.patch_mpp),
            info=PatchCacheInfo(
                slide=slide_id,
                source_path=str(slide.path),
                mpp_source=mpp_source,
                read_level=geometry.level,
                resample=RESAMPLE_NAME,
                tissue_threshold_saturation=0,  # set with the tissue fractions
            ),
        )
        with writer:
            if tissue is not None:  # given or detected already: refuse misplaced spots first
                _store_tissue(writer, tissue, boxes, slide.path, spots_path)
            bar = tqdm(
                total=len(boxes),
                unit="patch",
                desc=f"tile {slide_id}",
                disable=None if progress is None else not progress,
            )
            with bar, BackgroundWriter(writer) as background:
                for window, cut in _iter_window_results(
                    slide, windows, boxes, geometry, pool, threads
                ):
                    background.put(window.indices, cut)
                    bar.update(len(window.indices))
            if detection is not None:
                tissue = detection.result()
                _store_tissue(writer, tissue, boxes, slide.path, spots_path)
    assert tissue is not None
    if qc_path is not None:
        diameter_px = spot_diameter_um / mpp_source
        picture = draw_qc(tissue.thumbnail, boxes, outside, slide.dimensions, slide_id,
                          spot_diameter_px=diameter_px)  # fmt: skip
        save_qc(picture, qc_path)
    return Path(out_path)


def _store_tissue(
    writer: PatchCacheWriter,
    tissue: TissueDetection,
    boxes: np.ndarray,
    slide_path: str | os.PathLike,
    spots_path: str | os.PathLike | None,
) -> None:
    """Each patch box's tissue fraction into ``writer``, after refusing spots mostly off the
    tissue (:func:`check_spots_on_tissue`, when ``spots_path`` names their file)."""
    tissue_fraction = tissue.box_fractions(boxes)
    if spots_path is not None:
        check_spots_on_tissue(spots_path, slide_path, tissue, boxes, tissue_fraction)
    writer.set_tissue(tissue_fraction, tissue.threshold)


def tile_slide(
    slide_adata_path: str | os.PathLike,
    out_path: str | os.PathLike,
    patch_px: int = DEFAULT_PATCH_PX,
    patch_mpp: float = DEFAULT_PATCH_MPP,
    threads: int = 1,
    qc_path: str | os.PathLike | None = None,
    image_path: str | os.PathLike | None = None,
    mpp_override: float | None = None,
    window_patches: int = DEFAULT_WINDOW_PATCHES,
    progress: bool | None = None,
) -> Path:
    """:func:`tile_spots` for every spot of a slide AnnData (``stevs tile``).

    ``image_path`` defaults to ``uns["stevs"]["image_path"]``, the slide's microns per
    pixel to ``uns["stevs"]["mpp"]`` (``mpp_override`` wins over both it and the image's
    metadata). Returns ``out_path``.
    """
    check_tiling_settings(patch_px, patch_mpp, threads, window_patches, slide_adata_path)
    spots = read_slide_spots(slide_adata_path)
    image = image_path if image_path is not None else spots.image_path
    if image is None:
        raise StevsInputError(
            spots.path, "no image path: uns['stevs']['image_path'] is missing; give --image"
        )
    if mpp_override is not None and not (math.isfinite(mpp_override) and mpp_override > 0):
        raise StevsInputError(image, f"mpp override must be positive, got {mpp_override!r}")
    mpp = mpp_override if mpp_override is not None else spots.mpp
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise StevsInputError(spots.path, f"uns['stevs']['mpp'] must be positive, got {mpp!r}")
    with open_slide(image, mpp=mpp) as slide:
        slide.require_mpp()
        check_spots_match_image(spots, slide)
        return tile_spots(
            slide,
            spots.barcodes,
            spots.centers_px,
            out_path,
            slide_id=spots.slide,
            patch_px=patch_px,
            patch_mpp=patch_mpp,
            threads=threads,
            qc_path=qc_path,
            window_patches=window_patches,
            progress=progress,
            spots_path=spots.path,
            spot_diameter_um=spots.spot_diameter_um,
        )


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs tile``."""
    parser.add_argument("--slide", required=True, help="slide AnnData (results/slides/X.h5ad)")
    parser.add_argument("--out", required=True, help="patch cache to write (.h5)")
    parser.add_argument(
        "--image", help="slide image (default: the slide AnnData's uns['stevs']['image_path'])"
    )
    parser.add_argument(
        "--mpp-override",
        type=in_range(*MPP_RANGE),
        help="microns per level-0 pixel of the image, overriding the AnnData and the file "
        "(default: the AnnData's, else the image file's)",
    )
    parser.add_argument(
        "--patch-px",
        type=in_range(*PATCH_PX_RANGE, integer=True),
        default=DEFAULT_PATCH_PX,
        help="patch side in pixels (224)",
    )
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--patch-mpp",
        type=in_range(*PATCH_MPP_RANGE),
        help=f"patch resolution, µm per pixel (default: {DEFAULT_PATCH_MPP} unless --patch-um)",
    )
    scale.add_argument(
        "--patch-um",
        type=positive_float(),
        help="patch side in µm, instead of --patch-mpp (default: unset)",
    )
    parser.add_argument("--threads", type=positive_int(), default=1, help="parallel readers")
    parser.add_argument(
        "--qc",
        help="QC picture to write (PNG): thumbnail with every spot's circle and the patch box of "
        "a sample of spots (default: none written)",
    )
    parser.add_argument(
        "--window-patches",
        type=positive_int(),
        default=DEFAULT_WINDOW_PATCHES,
        help="side of a read window, in patches (4); larger = fewer, bigger reads",
    )


def _patch_mpp(args: argparse.Namespace) -> float:
    """Patch resolution of ``stevs tile``: ``--patch-mpp``, or ``--patch-um`` / ``--patch-px``."""
    if args.patch_um is None:
        return DEFAULT_PATCH_MPP if args.patch_mpp is None else args.patch_mpp
    return args.patch_um / args.patch_px  # both > 0: their argparse types


def run(args: argparse.Namespace) -> int:
    """Run ``stevs tile``."""
    tile_slide(
        args.slide,
        args.out,
        patch_px=args.patch_px,
        threads=args.threads,
        patch_mpp=_patch_mpp(args),
        window_patches=args.window_patches,
        image_path=args.image,
        mpp_override=args.mpp_override,
        qc_path=args.qc,
    )
    return 0
