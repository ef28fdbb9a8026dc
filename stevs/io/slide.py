"""Whole-slide image readers behind one interface (after TRIDENT's slide-reader split).

``open_slide(path, mpp=None)`` picks a backend:

* :class:`OpenSlideReader` for the vendor formats OpenSlide reads (SVS, NDPI, MRXS, ...);
* :class:`TiffReader` for plain tiled TIFFs (OpenSlide's "generic-tiff": faster through
  tifffile, which decodes tiles straight to RGB) and the TIFFs OpenSlide refuses (OME-TIFF,
  stripped TIFF), read tile by tile (decoded tiles cached, bounded) so a pyramidal file is
  never decoded whole;
* :class:`ImageReader` for plain JPEG/PNG images (e.g. the her2st sections). A JPEG with
  restart markers (most large ones) is decoded band by band where reads fall, coarse levels
  in the DCT domain (:mod:`stevs.io.jpeg_bands`); other images are decoded whole (about 3
  bytes per pixel), which is fine for the 9k x 9k sections of legacy ST but not for
  gigapixel scans, which come as pyramidal files.

Every reader returns uint8 RGB. RGBA is composited over white, grey is replicated to
three channels, 16-bit samples are scaled to 8 bits by the bit depth the data use (a 16-bit
file holding 12-bit data, white at 4095, is scaled by 4095, not 65535: :func:`data_bits`);
anything else is refused with an error that names the file.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from stevs.errors import StevsInputError
from stevs.geometry import MPP_RANGE  # metadata outside this range is ignored
from stevs.io.jpeg_bands import MAX_DRAFT_LEVEL, JpegBands, parse_jpeg_bands

log = logging.getLogger(__name__)

PLAIN_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".ome.tif", ".ome.tiff"}
#: the most a patch may be upsampled from an image's level 0 (more is a blurred guess)
MAX_UPSAMPLING = 4.0
#: Pillow refuses images above this many pixels unless told otherwise; WSIs are larger
MAX_IMAGE_PIXELS = 50_000 * 50_000
#: decoded pyramid tiles (tifffile) and JPEG bands kept per open slide, in bytes: enough for
#: the windows of about two rows of windows, bounded whatever the slide's size
TILE_CACHE_BYTES = 192 * 2**20
BAND_CACHE_BYTES = 96 * 2**20
#: height of a decoded band of a plain JPEG, in pixels of the level read
BAND_PX = 256

Box = tuple[float, float, float, float]


#: pixels of the level a 16-bit slide's bit depth is read from (the smallest level, or
#: tiles of it spread over the slide up to about this many pixels)
BIT_DEPTH_SAMPLE_PX = 4096 * 4096


def data_bits(max_value: int) -> int:
    """Bits 16-bit samples really use, from their largest value: an H&E image is white
    somewhere (glass, background), so 12-bit data reach above 2048 and stay <= 4095."""
    return min(16, max(8, int(max_value).bit_length()))


def composite_to_rgb(array: np.ndarray, path: str | os.PathLike, bits: int = 16) -> np.ndarray:
    """Convert an image array (H, W[, C]) of any common layout to uint8 RGB; 16-bit samples
    holding ``bits``-bit data are scaled by ``2**bits - 1``."""
    if array.dtype == np.uint16:
        top = (1 << bits) - 1
        array = np.minimum((array.astype(np.uint32) * 255 + top // 2) // top, 255)
        array = array.astype(np.uint8)
    elif array.dtype != np.uint8:
        raise StevsInputError(
            path, f"unsupported pixel type {array.dtype}: expected 8- or 16-bit RGB"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise StevsInputError(path, f"unsupported image shape {array.shape}")
    channels = array.shape[2]
    if channels == 3:
        return np.ascontiguousarray(array)
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels in (2, 4):
        if (array[:, :, -1] == 255).all():  # opaque (the usual OpenSlide read): no blending
            colour = array[:, :, :-1]
            return np.ascontiguousarray(np.repeat(colour, 3, axis=2) if channels == 2 else colour)
        colour, alpha = array[:, :, :-1], array[:, :, -1:].astype(np.uint16)
        if channels == 2:
            colour = np.repeat(colour, 3, axis=2)
        # over white in integer math: round((c * a + 255 * (255 - a)) / 255), exact (255 is
        # odd, so there are no ties) and at most 65,152: fits uint16
        blended = colour * alpha + ((255 * 255 + 127) - 255 * alpha)
        return (blended // 255).astype(np.uint8)
    raise StevsInputError(
        path, f"unsupported image with {channels} channels: expected RGB, RGBA or grey"
    )


def _valid_mpp(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value) if MPP_RANGE[0] <= value <= MPP_RANGE[1] else None


class PixelCache:
    """A thread-safe least-recently-used cache of decoded pixel blocks, bounded in bytes.

    ``get(key, load)`` returns the cached array or calls ``load()`` once per key even when
    several threads ask at the same time (the others wait for it).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}

    def _cached(self, key: Hashable) -> np.ndarray | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if (value := self._cached(key)) is not None:
                return value
            pending = self._loading.setdefault(key, threading.Lock())
        with pending:
            with self._lock:
                if (value := self._cached(key)) is not None:
                    return value
            try:
                value = load()
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._items[key] = value
                self._bytes += value.nbytes
                while self._bytes > self.max_bytes and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
            return value


class SlideReader(ABC):
    """A whole-slide image: pyramid geometry, microns per pixel and region reads."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None) -> None:
        self.path = str(path)
        self.mpp_source: Literal["given", "metadata"] | None = None
        self.mpp: float | None = None
        if mpp is not None:
            if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
                raise StevsInputError(path, f"microns per pixel must be positive, got {mpp!r}")
            self.mpp, self.mpp_source = float(mpp), "given"

    def _set_metadata_mpp(self, value: float | None) -> None:
        if self.mpp is None and (value := _valid_mpp(value)) is not None:
            self.mpp, self.mpp_source = value, "metadata"

    # -- geometry ----------------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) of every pyramid level, finest first."""

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.level_dimensions[0]

    @property
    def level_downsamples(self) -> list[float]:
        width0, height0 = self.dimensions
        return [(width0 / w + height0 / h) / 2.0 for w, h in self.level_dimensions]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= downsample * (1.0 + 1e-6):
                best = level
        return best

    def tile_size(self, level: int) -> tuple[int, int] | None:
        """(width, height) of the blocks ``level`` is decoded in, when it has such a grid.

        Reads aligned to it decode each block once; ``None``: no grid (any box costs alike).
        """
        return None

    def require_mpp(self) -> float:
        """Microns per level-0 pixel, or a clear error when unknown."""
        if self.mpp is None:
            raise StevsInputError(
                self.path,
                "microns per pixel unknown: the file's metadata has none; give it in the "
                "sample sheet's 'mpp' column",
            )
        return self.mpp

    # -- pixels ------------------------------------------------------------------------
    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of a box in level coordinates as uint8 RGB; white outside the level."""

    def read_region(
        self,
        box: Box | Sequence[float],
        out_size: tuple[int, int] | None = None,
        resample: Image.Resampling = Image.Resampling.BICUBIC,
    ) -> np.ndarray:
        """Read a level-0 box ``(x, y, w, h)`` (floats allowed) resampled to ``out_size``.

        The box is read from the coarsest level still at least as fine as the output and
        resampled with an antialiasing filter; pixels outside the slide are white.
        Returns uint8 RGB of shape (out_h, out_w, 3).
        """
        x, y, width, height = (float(v) for v in box)
        if not (width > 0 and height > 0) or not all(map(math.isfinite, (x, y, width, height))):
            raise StevsInputError(self.path, f"invalid region {tuple(box)!r}")
        out_w, out_h = (round(width), round(height)) if out_size is None else out_size
        if out_w <= 0 or out_h <= 0:
            raise StevsInputError(self.path, f"invalid output size {(out_w, out_h)!r}")
        level = self.best_level(min(width / out_w, height / out_h))
        scale = self.level_downsamples[level]
        lx0, ly0 = x / scale, y / scale
        lx1, ly1 = (x + width) / scale, (y + height) / scale
        ix0, iy0 = math.floor(lx0) - 2, math.floor(ly0) - 2
        ix1, iy1 = math.ceil(lx1) + 2, math.ceil(ly1) + 2
        pixels = self._read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        sub_box = (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
        if (ix1 - ix0 - 4, iy1 - iy0 - 4) == (out_w, out_h) and sub_box[:2] == (2.0, 2.0):
            return np.ascontiguousarray(pixels[2 : 2 + out_h, 2 : 2 + out_w])
        image = Image.fromarray(pixels).resize((out_w, out_h), resample, box=sub_box)
        return np.asarray(image)

    # -- context manager ---------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )


def _canvas(x: int, y: int, width: int, height: int, full_w: int, full_h: int) -> np.ndarray:
    """An array for a box of a level: white where it lies outside, uninitialised (to be
    filled) when it lies wholly inside."""
    if x >= 0 and y >= 0 and x + width <= full_w and y + height <= full_h:
        return np.empty((height, width, 3), np.uint8)
    return np.full((height, width, 3), 255, np.uint8)


def _paste_into_white(
    pixels: np.ndarray, x: int, y: int, width: int, height: int, canvas: bool = True
) -> tuple[np.ndarray | None, slice, slice, slice, slice]:
    """Clip a requested box to an array, returning a white canvas and matching slices.

    ``canvas=False``: only the slices (the caller has its canvas).
    """
    canvas = np.full((height, width, 3), 255, np.uint8) if canvas else None
    full_h, full_w = pixels.shape[:2]
    sx0, sy0 = max(x, 0), max(y, 0)
    sx1, sy1 = min(x + width, full_w), min(y + height, full_h)
    if sx1 <= sx0 or sy1 <= sy0:
        empty = slice(0, 0)
        return canvas, empty, empty, empty, empty
    return (
        canvas,
        slice(sy0 - y, sy1 - y),
        slice(sx0 - x, sx1 - x),
        slice(sy0, sy1),
        slice(sx0, sx1),
    )


class OpenSlideReader(SlideReader):
    """Formats OpenSlide reads: SVS, NDPI, MRXS, SCN, generic tiled TIFF, ..."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None) -> None:
        import openslide

        super().__init__(path, mpp)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as err:
            raise StevsInputError(path, f"OpenSlide cannot read this slide: {err}") from err
        props = self._slide.properties
        mpp_x = props.get(openslide.PROPERTY_NAME_MPP_X)
        mpp_y = props.get(openslide.PROPERTY_NAME_MPP_Y)
        if mpp_x is not None:
            mpp_x = float(mpp_x)
            if mpp_y is not None and abs(float(mpp_y) - mpp_x) > 0.01 * mpp_x:
                log.warning("%s: anisotropic pixels (mpp x %s, y %s); using x", path, mpp_x, mpp_y)
            self._set_metadata_mpp(mpp_x)
        self._lock = threading.Lock()

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self._slide.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._slide.level_downsamples]

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        scale = self.level_downsamples[level]
        location = (round(x * scale), round(y * scale))
        region = self._slide.read_region(location, level, (width, height))
        return composite_to_rgb(np.asarray(region), self.path)

    def close(self) -> None:
        self._slide.close()


class TiffReader(SlideReader):
    """TIFF/OME-TIFF through tifffile, decoding only the tiles a read touches."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None) -> None:
        import tifffile

        super().__init__(path, mpp)
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            self._pages = [level.keyframe for level in series.levels]
        except (tifffile.TiffFileError, IndexError, ValueError) as err:
            raise StevsInputError(path, f"not a readable TIFF: {err}") from err
        page = self._pages[0]
        if page.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise StevsInputError(
                path, f"unsupported pixel type {page.dtype}: expected 8- or 16-bit RGB"
            )
        self._set_metadata_mpp(self._metadata_mpp())
        self._lock = threading.Lock()
        self._bits = 16
        if page.dtype == np.uint16:
            self._bits = data_bits(self._max_sample())
            log.warning(
                "%s: 16-bit image holding %d-bit data, scaled by %d to 8 bits per channel",
                path,
                self._bits,
                (1 << self._bits) - 1,
            )
        self._whole_pages: dict[int, np.ndarray] = {}
        self._tiles = PixelCache(TILE_CACHE_BYTES)

    def _max_sample(self) -> int:
        """The largest sample value: the MaxSampleValue tag where it is below 65535, else
        the largest value of the smallest level (of tiles spread over it, if that is big)."""
        tag = self._pages[0].tags.get("MaxSampleValue")
        if tag is not None and 0 < int(np.max(tag.value)) < 65535:
            return int(np.max(tag.value))
        page = self._pages[-1]
        if not page.is_tiled or page.imagewidth * page.imagelength <= BIT_DEPTH_SAMPLE_PX:
            return int(page.asarray().max())
        tiles = len(page.dataoffsets)
        wanted = max(1, BIT_DEPTH_SAMPLE_PX // (int(page.tilewidth) * int(page.tilelength)))
        largest = 0
        for index in np.linspace(0, tiles - 1, min(tiles, wanted)).astype(int):
            self._tif.filehandle.seek(page.dataoffsets[index])
            data = self._tif.filehandle.read(page.databytecounts[index])
            segment = page.decode(data, int(index), jpegtables=page.jpegtables)[0] if data else None
            largest = max(largest, 0 if segment is None else int(np.max(segment)))
        return largest

    def _metadata_mpp(self) -> float | None:
        if self._tif.is_ome and self._tif.ome_metadata:
            try:
                root = ET.fromstring(self._tif.ome_metadata)
                pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
                size = float(pixels.attrib["PhysicalSizeX"])
                unit = pixels.attrib.get("PhysicalSizeXUnit", "µm")
                factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit)
                if factor is not None:
                    return size * factor
            except (StopIteration, KeyError, ValueError, ET.ParseError):
                pass
        tags = self._pages[0].tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            numerator, denominator = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            if numerator > 0 and denominator > 0:
                per_unit = numerator / denominator
                if unit == 3:  # centimetre
                    return 1e4 / per_unit
                if unit == 2:  # inch; often a meaningless 72 dpi, rejected by range check
                    return 25_400 / per_unit
        return None

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(int(page.imagewidth), int(page.imagelength)) for page in self._pages]

    def tile_size(self, level: int) -> tuple[int, int] | None:
        page = self._pages[level]
        return (int(page.tilewidth), int(page.tilelength)) if page.is_tiled else None

    def _tile(self, level: int, index: int) -> np.ndarray:
        """Tile ``index`` of ``level`` as uint8 RGB, clipped to the level (cached)."""
        page = self._pages[level]
        with self._lock:
            fh = self._tif.filehandle
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            fh.seek(offset)
            data = fh.read(count) if count else None
        tile_w, tile_h = int(page.tilewidth), int(page.tilelength)
        full_w, full_h = self.level_dimensions[level]
        ty0 = index // math.ceil(full_w / tile_w) * tile_h
        tx0 = index % math.ceil(full_w / tile_w) * tile_w
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        if segment is None:  # a missing tile: white
            return np.full((min(tile_h, full_h - ty0), min(tile_w, full_w - tx0), 3), 255, np.uint8)
        tile = np.asarray(segment).reshape(tile_h, tile_w, -1)
        tile = composite_to_rgb(tile, self.path, self._bits)
        return tile[: full_h - ty0, : full_w - tx0]

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        if not page.is_tiled:
            if level not in self._whole_pages:
                with self._lock:
                    pixels = page.asarray()
                    self._whole_pages[level] = composite_to_rgb(pixels, self.path, self._bits)
            canvas, cy, cx, sy, sx = _paste_into_white(
                self._whole_pages[level], x, y, width, height
            )
            canvas[cy, cx] = self._whole_pages[level][sy, sx]
            return canvas
        tile_w, tile_h = int(page.tilewidth), int(page.tilelength)
        full_w, full_h = self.level_dimensions[level]
        canvas = _canvas(x, y, width, height, full_w, full_h)
        tiles_across = math.ceil(full_w / tile_w)
        for tile_row in range(max(y, 0) // tile_h, min(y + height, full_h - 1) // tile_h + 1):
            for tile_col in range(max(x, 0) // tile_w, min(x + width, full_w - 1) // tile_w + 1):
                index = tile_row * tiles_across + tile_col
                tile = self._tiles.get(
                    (level, index), lambda level=level, index=index: self._tile(level, index)
                )
                ty0, tx0 = tile_row * tile_h, tile_col * tile_w
                _, cy, cx, sy, sx = _paste_into_white(tile, x - tx0, y - ty0, width, height, False)
                canvas[cy, cx] = tile[sy, sx]
        return canvas

    def close(self) -> None:
        self._tif.close()


class ImageReader(SlideReader):
    """Plain JPEG/PNG, decoded no more than reads need.

    A JPEG with restart markers at block rows (:mod:`stevs.io.jpeg_bands`) is decoded band
    by band, only where a read falls, and its coarser levels (1/2, 1/4, 1/8) are decoded in
    the DCT domain rather than resized: memory stays bounded by a band cache. Other images
    are decoded whole on open (about 3 bytes per pixel), with a lazily built 2x pyramid.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        self._bands: JpegBands | None = None
        self._whole: dict[int, np.ndarray] = {}
        with _lifted_pixel_limit(), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(path) as image:
                    width, height = image.size
                    if image.format == "JPEG" and image.mode in ("RGB", "L"):
                        self._bands = parse_jpeg_bands(path)
                    if self._bands is None or self._bands.width != width:
                        self._bands = None
                        image.load()
                        self._whole[0] = self._to_rgb_array(image)
            except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise StevsInputError(path, f"cannot read image: {err}") from err
        dims = [(width, height)]
        while max(width, height) > 512:
            width, height = (width + 1) // 2, (height + 1) // 2
            dims.append((width, height))
        self._dims = dims
        self._level_lock = threading.RLock()
        self._band_cache = PixelCache(BAND_CACHE_BYTES)

    def _to_rgb_array(self, image: Image.Image) -> np.ndarray:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image)
            maximum = max(int(array.max()), 1)
            if image.mode.startswith("I;16"):  # by the bits the data use, as for a TIFF
                maximum = (1 << data_bits(maximum)) - 1
            array = (array.astype(np.float64) * (255.0 / maximum)).round().astype(np.uint8)
            log.warning("%s: %s image scaled by %d to 8-bit grey", self.path, image.mode, maximum)
            return composite_to_rgb(array, self.path)
        if image.mode in ("RGB", "RGBA", "L", "LA"):
            return composite_to_rgb(np.asarray(image), self.path)
        if image.mode in ("P", "PA", "CMYK", "YCbCr", "1"):
            converted = image.convert("RGBA" if "transparency" in image.info else "RGB")
            return composite_to_rgb(np.asarray(converted), self.path)
        raise StevsInputError(self.path, f"unsupported image mode {image.mode!r}")

    def _decode_rows(self, row0: int, row1: int, level: int) -> np.ndarray:
        """Level-0 rows ``[row0, row1)`` of a banded JPEG at ``level`` (<= 3) as uint8 RGB."""
        assert self._bands is not None
        try:
            pixels = self._bands.decode_rows(row0, row1, level)
        except (OSError, ValueError) as err:
            problem = f"cannot decode image rows {row0}-{row1}: {err}"
            raise StevsInputError(self.path, problem) from err
        return composite_to_rgb(pixels, self.path)

    def _level(self, level: int) -> np.ndarray:
        """The whole of ``level``, decoded (banded JPEG) or reduced from the level above."""
        if level not in self._whole:
            with self._level_lock:
                if level in self._whole:
                    return self._whole[level]
                if self._bands is not None and level <= MAX_DRAFT_LEVEL:
                    self._whole[level] = self._decode_rows(0, self._bands.height, level)
                else:
                    reduced = Image.fromarray(self._level(level - 1)).reduce(2)
                    self._whole[level] = np.asarray(reduced)
        return self._whole[level]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._dims)

    def _band_rows(self, level: int) -> int:
        """Level-0 rows per cached band of ``level`` (a multiple of the JPEG's granule)."""
        assert self._bands is not None
        granule = self._bands.granule_px
        return max(1, round(BAND_PX * 2**level / granule)) * granule

    def tile_size(self, level: int) -> tuple[int, int] | None:
        if self._bands is None or level > MAX_DRAFT_LEVEL:
            return None
        side = self._band_rows(level) // 2**level
        return (side, side)

    def _read_bands(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        band_rows, scale = self._band_rows(level), 2**level
        band_h = band_rows // scale  # level rows per band (all but the last band)
        full_w, full_h = self._dims[level]
        canvas = _canvas(x, y, width, height, full_w, full_h)
        for band in range(max(y, 0) // band_h, min(y + height, full_h - 1) // band_h + 1):
            row0 = band * band_rows
            pixels = self._band_cache.get(
                (level, band),
                lambda row0=row0: self._decode_rows(row0, row0 + band_rows, level),
            )
            _, cy, cx, sy, sx = _paste_into_white(
                pixels, x, y - band * band_h, width, height, False
            )
            canvas[cy, cx] = pixels[sy, sx]
        return canvas

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self._bands is not None and level <= MAX_DRAFT_LEVEL and level not in self._whole:
            return self._read_bands(level, x, y, width, height)
        pixels = self._level(level)
        canvas, cy, cx, sy, sx = _paste_into_white(pixels, x, y, width, height)
        canvas[cy, cx] = pixels[sy, sx]
        return canvas


@contextmanager
def _lifted_pixel_limit():
    """Allow large sections (e.g. 9k x 9k JPEGs) in this block only, not globally."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return (
        ".ome" + path.suffix.lower()
        if name.endswith((".ome.tif", ".ome.tiff"))
        else (path.suffix.lower())
    )


def _generic_tiff(path: Path, mpp: float | None) -> SlideReader:
    """A plain tiled TIFF: tifffile, unless it sees fewer pyramid levels than OpenSlide.

    tifffile decodes the JPEG/deflate tiles straight to RGB (no RGBA round trip through
    OpenSlide's ARGB buffers and Pillow), about twice as fast per region on 256 px tiles.
    """
    import openslide

    try:
        reader = TiffReader(path, mpp)
    except StevsInputError:
        return OpenSlideReader(path, mpp)
    with openslide.OpenSlide(str(path)) as other:
        levels = other.level_count
    if reader.level_count < levels:
        reader.close()
        return OpenSlideReader(path, mpp)
    return reader


def open_slide(
    path: str | os.PathLike,
    mpp: float | None = None,
    backend: Literal["auto", "openslide", "tifffile", "image"] = "auto",
) -> SlideReader:
    """Open a slide with the backend that suits it; use as a context manager.

    ``mpp`` (microns per level-0 pixel, e.g. from the sample sheet) overrides the file's
    metadata. Raises :class:`StevsInputError` naming the file when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise StevsInputError(path, "slide image not found")
    suffix = _suffix(path)
    if backend == "auto":
        if suffix in PLAIN_IMAGE_SUFFIXES:
            backend = "image"
        else:
            import openslide

            fmt = openslide.OpenSlide.detect_format(str(path))
            if fmt == "generic-tiff" and suffix in TIFF_SUFFIXES:
                return _generic_tiff(path, mpp)
            if fmt is not None and not suffix.startswith(".ome"):
                backend = "openslide"
            elif suffix in TIFF_SUFFIXES:
                backend = "tifffile"
            else:
                raise StevsInputError(
                    path,
                    "unrecognised slide format: not an OpenSlide format, TIFF, JPEG or PNG",
                )
    readers = {"openslide": OpenSlideReader, "tifffile": TiffReader, "image": ImageReader}
    return readers[backend](path, mpp)
