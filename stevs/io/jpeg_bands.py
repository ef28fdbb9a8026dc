"""Decode horizontal bands of a baseline JPEG without decoding the whole image.

A plain JPEG cannot be read in parts in general, but most large ones can: when the encoder
wrote *restart markers* (Photoshop, libjpeg's ``-restart``, the her2st and ST-Net
sections: one restart interval per row of 16 px blocks), every restart interval is coded
independently of the ones before it. A band of block rows is then a JPEG of its own: the
file's header with the frame height changed, followed by the band's intervals with their
``RSTn`` markers renumbered from 0. Pillow (libjpeg-turbo) decodes it, optionally scaled
by 1/2, 1/4 or 1/8 in the DCT domain (``Image.draft``), which is several times cheaper
than decoding at full size and resizing.

Bands are decoded with one extra block row of context above and below, then cropped, so
that libjpeg's chroma upsampling (which looks at the neighbouring chroma rows) sees the
same neighbours as in a whole-image decode: the pixels equal those of decoding the whole
file at the same scale (``tests/test_slide.py`` checks this).

:func:`parse_jpeg_bands` returns ``None`` for files this does not apply to (progressive or
arithmetic-coded JPEGs, no restart markers, intervals not aligned to block rows, truncated
scans); the slide reader then decodes the whole image instead.
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
from PIL import JpegImagePlugin

#: start-of-frame markers of sequential Huffman-coded JPEGs (baseline, extended)
_SEQUENTIAL_SOF = {0xC0, 0xC1}
_RESTART = re.compile(rb"\xff[\xd0-\xd7]")
_EOI = b"\xff\xd9"
#: DCT-domain scales libjpeg can decode at (1, 1/2, 1/4, 1/8)
MAX_DRAFT_LEVEL = 3


@dataclass(frozen=True)
class JpegBands:
    """Where the restart intervals of a baseline JPEG lie, and how to cut bands from them."""

    path: str
    data: bytes
    width: int
    height: int
    mcu_height: int  # px per block row (8 or 16)
    rows_per_granule: int  # block rows per smallest decodable band
    intervals_per_granule: int
    header: bytes  # SOI .. end of the SOS segment
    sof_height_at: int  # offset of the frame height (uint16) in ``header``
    starts: np.ndarray  # byte offset of each restart interval's entropy-coded data
    ends: np.ndarray  # end (exclusive) of each interval's data

    @property
    def block_rows(self) -> int:
        return -(-self.height // self.mcu_height)

    @property
    def granule_px(self) -> int:
        """Level-0 rows per granule: bands start and end at multiples of this."""
        return self.rows_per_granule * self.mcu_height

    def band_jpeg(self, row0: int, row1: int) -> bytes:
        """A JPEG of level-0 rows ``[row0, row1)``; both must be granule-aligned (or the end)."""
        g0, g1 = row0 // self.granule_px, -(-row1 // self.granule_px)
        first, last = g0 * self.intervals_per_granule, g1 * self.intervals_per_granule
        last = min(last, len(self.starts))
        header = bytearray(self.header)
        band_height = min(row1, self.height) - row0
        struct.pack_into(">H", header, self.sof_height_at, band_height)
        parts: list[bytes | bytearray] = [header]
        view = memoryview(self.data)
        for k, index in enumerate(range(first, last)):
            if k:
                parts.append(bytes((0xFF, 0xD0 + (k - 1) % 8)))
            parts.append(view[self.starts[index] : self.ends[index]])
        parts.append(_EOI)
        return b"".join(parts)

    def decode_rows(self, row0: int, row1: int, level: int) -> np.ndarray:
        """Level-0 rows ``[row0, row1)`` (granule-aligned) at scale ``2**-level`` (<= 3).

        One granule of context is decoded above and below and cropped off, so the pixels
        are those of a whole-image decode at that scale. Returns uint8 (h, w[, 3]). Full
        scale goes through imagecodecs' libjpeg-turbo straight into an array (about 3x
        faster than Pillow plus its copy to numpy, same pixels); scaled decodes through
        Pillow's draft mode, whose output is small.
        """
        if not 0 <= level <= MAX_DRAFT_LEVEL:
            raise ValueError(f"level must be 0-{MAX_DRAFT_LEVEL}, got {level}")
        top = max(0, row0 - self.granule_px)
        bottom = min(self.height, row1 + self.granule_px)
        band = self.band_jpeg(top, bottom)
        scale = 2**level
        first = (row0 - top) // scale
        count = -(-min(row1, self.height) // scale) - row0 // scale
        if level == 0 and _jpeg8_decode is not None:
            return _jpeg8_decode(band)[first : first + count]
        # the plugin class directly: Image.open's decompression-bomb check is for untrusted
        # sizes, and the slide reader has checked this image's size already
        image = JpegImagePlugin.JpegImageFile(io.BytesIO(band))
        if level:
            image.draft(image.mode, (max(1, image.width // scale), max(1, image.height // scale)))
            if image.size != (-(-self.width // scale), -(-(bottom - top) // scale)):
                raise ValueError(f"JPEG draft did not scale by 1/{scale}")
        return np.asarray(image)[first : first + count]


def _imagecodecs_decoder():
    try:
        from imagecodecs import jpeg8_decode
    except ImportError:  # optional: Pillow decodes the same pixels, a little slower
        return None
    return jpeg8_decode


_jpeg8_decode = _imagecodecs_decoder()


def _segments(data: bytes) -> tuple[dict[str, object], int] | None:
    """Frame facts and where the scan's entropy-coded data starts (``None``: unsupported)."""
    facts: dict[str, object] = {"restart": 0}
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body = pos + 4
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SEQUENTIAL_SOF:
                return None  # progressive, lossless or arithmetic coded
            _, height, width, n_comp = struct.unpack_from(">BHHB", data, body)
            sampling = [data[body + 7 + 3 * k] for k in range(n_comp)]
            facts.update(
                width=width,
                height=height,
                n_comp=n_comp,
                sof_height_at=body + 1,
                mcu_height=8 * max(s & 0x0F for s in sampling),
                mcu_width=8 * max(s >> 4 for s in sampling),
            )
        elif marker == 0xDD:
            (facts["restart"],) = struct.unpack_from(">H", data, body)
        elif marker == 0xDA:
            if "width" not in facts or data[body] != facts["n_comp"]:
                return None  # no frame yet, or a non-interleaved scan
            return facts, pos + 2 + length
        pos += 2 + length
    return None


def parse_jpeg_bands(path: str | os.PathLike) -> JpegBands | None:
    """The band layout of a JPEG file, or ``None`` when bands cannot be decoded from it."""
    with open(path, "rb") as handle:
        data = handle.read()
    if not data.startswith(b"\xff\xd8"):
        return None
    found = _segments(data)
    if found is None:
        return None
    facts, scan = found
    restart = int(facts["restart"])
    width, height = int(facts["width"]), int(facts["height"])
    mcu_w, mcu_h = int(facts["mcu_width"]), int(facts["mcu_height"])
    if restart <= 0 or width <= 0 or height <= 0:
        return None
    per_row = -(-width // mcu_w)
    if restart % per_row == 0:
        rows_per_granule, intervals_per_granule = restart // per_row, 1
    elif per_row % restart == 0:
        rows_per_granule, intervals_per_granule = 1, per_row // restart
    else:
        return None  # intervals do not start at block rows
    end = data.rfind(_EOI)
    if end < scan:
        return None
    markers = np.array([m.start() for m in _RESTART.finditer(data, scan, end)], np.int64)
    n_intervals = -(-(per_row * -(-height // mcu_h)) // restart)
    if len(markers) != n_intervals - 1:
        return None  # truncated, or more than one scan
    return JpegBands(
        path=str(path),
        data=data,
        width=width,
        height=height,
        mcu_height=mcu_h,
        rows_per_granule=rows_per_granule,
        intervals_per_granule=intervals_per_granule,
        header=data[:scan],
        sof_height_at=int(facts["sof_height_at"]),
        starts=np.r_[scan, markers + 2],
        ends=np.r_[markers, end],
    )
