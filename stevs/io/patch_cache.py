"""The HDF5 patch cache (``results/patches/{slide}.h5``): its one reader and one writer.

Layout (docs/architecture.md, "Patch cache"): datasets ``patches`` uint8 (N, H, W, 3)
chunked (1, H, W, 3), ``barcodes`` (N,) utf-8, ``centers_px`` float64 (N, 2) level-0
(x, y), ``outside_fraction`` and ``tissue_fraction`` float32 (N,); attributes
``mpp_source``, ``mpp_target``, ``patch_px``, ``patch_um``, ``slide``, ``source_path``,
``stevs_version``, ``read_level``, ``resample``, ``tissue_threshold_saturation``.

HEST-compatible datasets beside ours (the layout of HEST's ``dump_patches`` /
``hestcore.wsi.WSIPatcher.to_h5``, read by ``hestcore.datasets.H5HESTDataset`` and HEST's
benchmark): ``img`` is a second name (HDF5 hard link) of ``patches``, so no pixel is stored
twice; ``barcode`` (N, 1) utf-8; ``coords`` int64 (N, 2) level-0 (x, y) of each patch's
top-left corner, ``centre - patch_size_src // 2`` as HEST computes it. ``img`` and ``coords``
carry HEST's attributes ``patch_size_src`` (level-0 px of a patch side), ``patch_size_target``
(= patch_px), ``downsample`` (mpp_target / mpp_source), ``pixel_size`` (µm per level-0 px)
and, on ``img``, ``name`` (the slide id).

:class:`PatchCacheWriter` writes a cache atomically (a temporary sibling renamed when
complete) and byte-deterministically: every chunk is allocated at creation and patches are
written as raw chunks, so the bytes do not depend on the order in which rows arrive.
:class:`PatchCache` validates a cache on open and reads patches lazily, one HDF5 handle per
process, so it can be used from DataLoader workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from stevs import __version__
from stevs.atomic import atomic_path, is_hdf5_with
from stevs.errors import StevsInputError

PATCHES = "patches"
BARCODES = "barcodes"
CENTERS = "centers_px"
OUTSIDE = "outside_fraction"
TISSUE = "tissue_fraction"
#: HEST's patch-file keys (``hestcore.datasets.H5HESTDataset`` reads these three)
HEST_IMG = "img"
HEST_BARCODE = "barcode"
HEST_COORDS = "coords"


@dataclass(frozen=True)
class PatchScale:
    """Side (px) and resolution (µm per px) of the patches of a cache."""

    patch_px: int
    mpp_target: float

    @property
    def patch_um(self) -> float:
        """Field of view: side of a patch in µm."""
        return self.patch_px * self.mpp_target

    def matches(self, other: PatchScale, rel_tol: float = 1e-6) -> bool:
        """Same side in px and resolution within ``rel_tol``."""
        return int(other.patch_px) == int(self.patch_px) and math.isclose(
            float(other.mpp_target), float(self.mpp_target), rel_tol=rel_tol
        )

    def describe(self) -> str:
        """E.g. ``"64 px at 2 µm/px (128 µm)"``."""
        return f"{self.patch_px} px at {self.mpp_target:g} µm/px ({self.patch_um:g} µm)"

    def to_dict(self) -> dict[str, float]:
        """``{"patch_px", "mpp_target", "patch_um"}`` (e.g. for a model's config.json)."""
        return {
            "patch_px": int(self.patch_px),
            "mpp_target": float(self.mpp_target),
            "patch_um": float(self.patch_um),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatchScale:
        """From :meth:`to_dict`'s keys (``mpp_target`` may be replaced by ``patch_um``).

        Raises ``ValueError`` naming the problem when the entry is incomplete or invalid.
        """
        try:
            patch_px = data["patch_px"]
            if isinstance(patch_px, bool) or int(patch_px) != float(patch_px):
                raise ValueError(f"patch_px must be a whole number, not {patch_px!r}")
            mpp = data.get("mpp_target")
            if mpp is None:
                mpp = float(data["patch_um"]) / int(patch_px)
            scale = cls(int(patch_px), float(mpp))
        except KeyError as err:
            raise ValueError(f"patch scale lacks {err.args[0]!r}") from err
        except (TypeError, ZeroDivisionError) as err:
            raise ValueError(f"unreadable patch scale {dict(data)!r}: {err}") from err
        if scale.patch_px <= 0 or not (math.isfinite(scale.mpp_target) and scale.mpp_target > 0):
            raise ValueError(f"patch scale must be positive, got {scale.describe()}")
        return scale


def hdf5_attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open_file(path: Path) -> h5py.File:
    if not path.is_file():
        raise StevsInputError(path, "patch cache not found (run 'stevs tile' first)")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise StevsInputError(
            path, f"not a readable HDF5 patch cache (corrupt or truncated?): {err}"
        ) from err


def _damaged(path: Path, err: BaseException, what: str = "the cache") -> StevsInputError:
    """A read failing inside the file: corrupt or truncated, to be tiled again."""
    if isinstance(err, StevsInputError):
        return err
    reason = " ".join(str(err).split())[:200]
    return StevsInputError(
        path,
        f"cannot read {what}: the patch cache is damaged or truncated ({type(err).__name__}: "
        f"{reason}); delete it and run 'stevs tile' again",
    )


def _check_patches(path: Path, handle: h5py.File) -> tuple[int, int, int]:
    for key in (PATCHES, BARCODES, CENTERS):
        if key not in handle or not isinstance(handle[key], h5py.Dataset):
            raise StevsInputError(path, f"not a patch cache: no '{key}' dataset")
    patches = handle[PATCHES]
    if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[3] != 3:
        raise StevsInputError(
            path, f"patches must be uint8 (N, H, W, 3), not {patches.dtype} {patches.shape}"
        )
    return tuple(int(v) for v in patches.shape[1:])  # type: ignore[return-value]


def _read_barcodes(path: Path, handle: h5py.File, n: int) -> list[str]:
    dataset = handle[BARCODES]
    if dataset.shape != (n,):
        raise StevsInputError(
            path, f"barcodes must be ({n},) like the patches, not {dataset.shape}"
        )
    try:
        barcodes = [str(b) for b in dataset.asstr()[()]]
    except (TypeError, ValueError, UnicodeDecodeError) as err:
        raise StevsInputError(path, f"barcodes are not utf-8 strings: {err}") from err
    if len(set(barcodes)) != n:
        seen: set[str] = set()
        twice = sorted({b for b in barcodes if b in seen or seen.add(b)})
        raise StevsInputError(
            path, f"{len(twice)} barcodes occur more than once, e.g. {', '.join(twice[:3])}"
        )
    return barcodes


def _read_vector(path: Path, handle: h5py.File, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A numeric dataset of a known shape; a missing optional fraction reads as NaN."""
    if key not in handle and key in (OUTSIDE, TISSUE):
        return np.full(shape, np.nan, np.float32)
    values = np.asarray(handle[key][()])
    if values.shape != shape or not np.issubdtype(values.dtype, np.number):
        raise StevsInputError(
            path, f"{key} must be numeric {shape}, not {values.dtype} {values.shape}"
        )
    return values.astype(np.float64 if key == CENTERS else np.float32)


def _read_scale(path: Path, attrs: Mapping[str, Any]) -> PatchScale:
    missing = [k for k in ("patch_px", "mpp_target") if k not in attrs]
    if missing:
        raise StevsInputError(path, f"patch cache lacks the attribute(s) {', '.join(missing)}")
    try:
        return PatchScale.from_dict(attrs)
    except ValueError as err:
        raise StevsInputError(path, f"bad patch scale attributes: {err}") from err


class PatchCache:
    """Read side of a patch cache; validates on open, errors are StevsInputError(path, ...).

    ``slide``: the slide the cache is opened for; a cache that records another slide (its
    ``slide`` attribute: a cache renamed or copied) is refused, naming both.
    """

    def __init__(self, path: str | os.PathLike, slide: str | None = None) -> None:
        self.path = Path(path)
        try:
            self._read_index()
        except (OSError, KeyError, RuntimeError) as err:  # HDF5's errors of a damaged file
            raise _damaged(self.path, err) from err
        recorded = self.attrs.get("slide")
        if slide is not None and recorded not in (None, "", slide):
            raise StevsInputError(
                self.path,
                f"this is the patch cache of slide '{recorded}', not of '{slide}' (renamed or "
                f"copied?); run 'stevs tile' for {slide}",
            )
        self._row = {b: i for i, b in enumerate(self.barcodes)}
        self._pid: int | None = None
        self._file: h5py.File | None = None

    def _read_index(self) -> None:
        """Shape, barcodes, centres, fractions and attributes, validated."""
        with _open_file(self.path) as handle:
            self.patch_shape = _check_patches(self.path, handle)
            n = int(handle[PATCHES].shape[0])
            self.barcodes = _read_barcodes(self.path, handle, n)
            self.centers_px = _read_vector(self.path, handle, CENTERS, (n, 2))
            self.outside_fraction = _read_vector(self.path, handle, OUTSIDE, (n,))
            self.tissue_fraction = _read_vector(self.path, handle, TISSUE, (n,))
            self.attrs: dict[str, Any] = {k: hdf5_attr_value(v) for k, v in handle.attrs.items()}
        self.scale = _read_scale(self.path, self.attrs)
        if self.patch_shape[:2] != (self.scale.patch_px, self.scale.patch_px):
            raise StevsInputError(
                self.path,
                f"patches are {self.patch_shape[1]}x{self.patch_shape[0]} px but the "
                f"patch_px attribute says {self.scale.patch_px}",
            )

    def __len__(self) -> int:
        return len(self.barcodes)

    def __repr__(self) -> str:
        return f"PatchCache({str(self.path)!r}: {len(self)} patches of {self.scale.describe()})"

    def rows_of(self, barcodes: Sequence[str]) -> np.ndarray:
        """Rows (int64) of ``barcodes``; every one must be in the cache."""
        missing = [str(b) for b in barcodes if str(b) not in self._row]
        if missing:
            raise StevsInputError(
                self.path,
                f"{len(missing)} of {len(barcodes)} spots have no patch, e.g. "
                f"{', '.join(missing[:3])}",
            )
        return np.fromiter((self._row[str(b)] for b in barcodes), np.int64, len(barcodes))

    def _patches(self) -> h5py.Dataset:
        """The ``patches`` dataset of this process's own handle (opened on first use)."""
        if self._pid != os.getpid() or self._file is None:
            # a forked DataLoader worker must not reuse its parent's HDF5 handle
            self._file = _open_file(self.path)
            self._pid = os.getpid()
        return self._file[PATCHES]

    def __getitem__(self, row: int) -> np.ndarray:
        """One patch, (H, W, 3) uint8."""
        n = len(self)
        index = int(row)
        if not -n <= index < n:
            raise IndexError(f"{self.path}: row {row} outside 0..{n - 1}")
        try:
            return self._patches()[index % n]
        except (OSError, KeyError, RuntimeError) as err:
            raise _damaged(self.path, err, f"patch row {index % n}") from err

    def read_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Patches of ``rows`` (any order, repeats allowed): (n, H, W, 3) uint8."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size == 0:
            return np.empty((0, *self.patch_shape), np.uint8)
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"{self.path}: rows must lie in 0..{len(self) - 1}")
        unique, inverse = np.unique(rows, return_inverse=True)
        try:
            return self._patches()[unique][inverse]  # h5py wants increasing indices
        except (OSError, KeyError, RuntimeError) as err:
            raise _damaged(self.path, err, f"{len(unique)} patch rows") from err

    def close(self) -> None:
        """Close this process's handle (a later read reopens it)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._pid, self._file = None, None

    def __enter__(self) -> PatchCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": None, "_file": None}


class HestPatchFile:
    """Read side of a HEST patch file (HEST-Benchmark's ``patches/{sample}.h5``, HEST-1k's
    ``patches/``): ``img`` uint8 (N, H, W, 3), ``barcode`` (N, 1) and ``coords`` (N, 2), the
    three keys ``hestcore.datasets.H5HESTDataset`` reads (and a stevs patch cache carries
    beside its own). Rows in file order; patches read lazily, one handle per process."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StevsInputError(self.path, "HEST patch file not found")
        try:
            with h5py.File(self.path, "r") as handle:
                missing = [k for k in (HEST_IMG, HEST_BARCODE, HEST_COORDS) if k not in handle]
                if missing:
                    raise StevsInputError(
                        self.path, f"not a HEST patch file: no {', '.join(missing)} dataset"
                    )
                img = handle[HEST_IMG]
                if img.dtype != np.uint8 or img.ndim != 4 or img.shape[3] != 3:
                    raise StevsInputError(
                        self.path, f"img must be uint8 (N, H, W, 3), not {img.dtype} {img.shape}"
                    )
                self.patch_shape = tuple(int(v) for v in img.shape[1:])
                n = int(img.shape[0])
                raw = np.asarray(handle[HEST_BARCODE][()]).reshape(-1)
                self.coords = np.asarray(handle[HEST_COORDS][()], dtype=np.float64)
        except OSError as err:
            raise StevsInputError(self.path, f"not a readable HDF5 file: {err}") from err
        self.barcodes = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in raw]
        if len(self.barcodes) != n or self.coords.shape != (n, 2):
            raise StevsInputError(
                self.path,
                f"barcode {raw.shape} and coords {self.coords.shape} must have one row per "
                f"patch ({n})",
            )
        self._pid: int | None = None
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.barcodes)

    def read_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Patches of ``rows`` (any order, repeats allowed): (n, H, W, 3) uint8."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size == 0:
            return np.empty((0, *self.patch_shape), np.uint8)
        if self._pid != os.getpid() or self._file is None:
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._file[HEST_IMG][unique][inverse]

    def close(self) -> None:
        """Close this process's handle (a later read reopens it)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._pid, self._file = None, None

    def __enter__(self) -> HestPatchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": None, "_file": None}


def read_patch_scale(path: str | os.PathLike) -> PatchScale:
    """The patch scale of a cache, from its attributes (StevsInputError if unreadable)."""
    path = Path(path)
    with _open_file(path) as handle:
        attrs = {k: hdf5_attr_value(v) for k, v in handle.attrs.items()}
    return _read_scale(path, attrs)


def hest_attrs(scale: PatchScale, mpp_source: float) -> dict[str, float | int]:
    """HEST's ``coords``/``img`` attributes for patches of ``scale`` cut from a slide at
    ``mpp_source`` µm per level-0 px (``WSIPatcher.to_h5``'s keys and meaning)."""
    downsample = float(scale.mpp_target) / float(mpp_source)
    return {
        "patch_size_src": round(scale.patch_px * downsample),
        "patch_size_target": int(scale.patch_px),
        "downsample": downsample,
        "pixel_size": float(mpp_source),
    }


def hest_topleft(centers_px: np.ndarray, scale: PatchScale, mpp_source: float) -> np.ndarray:
    """Level-0 top-left corners (int64 (N, 2)) of patches centred on ``centers_px``, as
    HEST's ``dump_patches`` computes them: ``(centre - size_src // 2).astype(int)``."""
    size_src = scale.patch_px * float(scale.mpp_target) / float(mpp_source)
    return (np.asarray(centers_px, np.float64) - size_src // 2).astype(np.int64)


@dataclass(frozen=True)
class PatchCacheInfo:
    """Attributes of a cache besides its scale (see the module docstring)."""

    slide: str
    source_path: str
    mpp_source: float  # µm per level-0 px of the image
    read_level: int
    resample: str
    tissue_threshold_saturation: int


class PatchCacheWriter:
    """Write side of a patch cache: ``with PatchCacheWriter(...) as w: w.write(row, patch)``.

    The file appears at ``path`` only when the block ends without an exception and every
    row has been written; otherwise nothing is left behind. ``tissue_fraction=None``: the
    tissue fractions (and ``info``'s saturation threshold) come later, by
    :meth:`set_tissue` before the block ends, so tissue detection can run while patches
    are written; the file is the same, byte for byte.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        barcodes: Sequence[str],
        centers_px: np.ndarray,
        outside_fraction: np.ndarray,
        tissue_fraction: np.ndarray | None,
        scale: PatchScale,
        info: PatchCacheInfo,
    ) -> None:
        self.path = Path(path)
        self.barcodes = [str(b) for b in barcodes]
        n = len(self.barcodes)
        self.centers_px = np.asarray(centers_px, np.float64)
        self.outside_fraction = np.asarray(outside_fraction, np.float32)
        self._tissue_set = tissue_fraction is not None
        self.tissue_fraction = np.zeros(n, np.float32)  # placeholder until set_tissue
        if tissue_fraction is not None:
            self.tissue_fraction = np.asarray(tissue_fraction, np.float32)
        if self.centers_px.shape != (n, 2):
            raise ValueError(f"centers_px must be ({n}, 2), not {self.centers_px.shape}")
        if self.outside_fraction.shape != (n,) or self.tissue_fraction.shape != (n,):
            raise ValueError(f"outside_fraction and tissue_fraction must be ({n},)")
        if len(set(self.barcodes)) != n:
            raise ValueError("barcodes must be unique")
        self.scale = scale
        self.info = info
        self.patch_shape = (scale.patch_px, scale.patch_px, 3)
        self._written = np.zeros(n, bool)
        self._stack: ExitStack | None = None
        self._file: h5py.File | None = None
        self._patches: h5py.Dataset | None = None

    def _create(self, file: h5py.File) -> h5py.Dataset:
        """Datasets and attributes; returns the empty ``patches``, all chunks allocated."""
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        # every chunk is placed at creation, so write order cannot change the file's bytes
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        patches = file.create_dataset(
            PATCHES,
            shape=(len(self.barcodes), *self.patch_shape),
            dtype=np.uint8,
            chunks=(1, *self.patch_shape),
            track_times=False,
            dcpl=dcpl,
            fill_time="never",
        )
        barcodes = np.array(self.barcodes, dtype=object)
        string = h5py.string_dtype("utf-8")
        file.create_dataset(BARCODES, data=barcodes, dtype=string, track_times=False)
        file.create_dataset(CENTERS, data=self.centers_px, track_times=False)
        file.create_dataset(OUTSIDE, data=self.outside_fraction, track_times=False)
        file.create_dataset(TISSUE, data=self.tissue_fraction, track_times=False)
        self._create_hest(file, patches)
        attrs = {
            "mpp_source": float(self.info.mpp_source),
            "mpp_target": float(self.scale.mpp_target),
            "patch_px": int(self.scale.patch_px),
            "patch_um": float(self.scale.patch_um),
            "slide": self.info.slide,
            "source_path": self.info.source_path,
            "stevs_version": __version__,
            "read_level": int(self.info.read_level),
            "resample": self.info.resample,
            "tissue_threshold_saturation": int(self.info.tissue_threshold_saturation),
        }
        for key, value in attrs.items():
            file.attrs[key] = value
        return patches

    def _create_hest(self, file: h5py.File, patches: h5py.Dataset) -> None:
        """HEST's ``img`` (a hard link to ``patches``), ``barcode`` and ``coords``."""
        file[HEST_IMG] = patches  # one dataset, two names: no pixel stored twice
        barcode = np.array(self.barcodes, dtype=object).reshape(-1, 1)
        string = h5py.string_dtype("utf-8")
        file.create_dataset(HEST_BARCODE, data=barcode, dtype=string, track_times=False)
        coords = hest_topleft(self.centers_px, self.scale, self.info.mpp_source)
        file.create_dataset(HEST_COORDS, data=coords, track_times=False)
        attrs = hest_attrs(self.scale, self.info.mpp_source)
        for key, value in attrs.items():
            file[HEST_COORDS].attrs[key] = value
            patches.attrs[key] = value
        patches.attrs["name"] = self.info.slide

    def __enter__(self) -> PatchCacheWriter:
        with ExitStack() as stack:
            ours = lambda p: is_hdf5_with(p, PATCHES, CENTERS)  # noqa: E731
            tmp = stack.enter_context(atomic_path(self.path, replaces=ours))
            file = stack.enter_context(h5py.File(tmp, "w"))
            self._patches = self._create(file)
            self._file = file
            self._stack = stack.pop_all()
        return self

    def set_tissue(self, tissue_fraction: np.ndarray, threshold: int) -> None:
        """Store the tissue fractions and their saturation threshold (left open at
        construction), in place: same datasets and bytes as if they had been given then."""
        values = np.asarray(tissue_fraction, np.float32)
        if values.shape != self.tissue_fraction.shape:
            raise ValueError(f"tissue_fraction must be {self.tissue_fraction.shape}")
        self.tissue_fraction, self._tissue_set = values, True
        self.info = replace(self.info, tissue_threshold_saturation=int(threshold))
        if self._file is not None:
            self._file[TISSUE][...] = values
            self._file.attrs.modify("tissue_threshold_saturation", int(threshold))

    def write(self, row: int, patch: np.ndarray) -> None:
        """Store the patch of ``row`` (uint8 (H, W, 3))."""
        if self._patches is None:
            raise RuntimeError("PatchCacheWriter.write outside its 'with' block")
        if patch.shape != self.patch_shape or patch.dtype != np.uint8:
            raise ValueError(
                f"patch must be uint8 {self.patch_shape}, not {patch.dtype} {patch.shape}"
            )
        # uncompressed one-patch chunks: the array's bytes, no conversion nor copy
        self._patches.id.write_direct_chunk((int(row), 0, 0, 0), np.ascontiguousarray(patch))
        self._written[int(row)] = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack, self._patches, self._file = self._stack, None, None, None
        if stack is None:
            return
        error: ValueError | None = None
        if exc_type is None and not self._written.all():
            missing = np.flatnonzero(~self._written)
            error = ValueError(f"{len(missing)} patches were never written (e.g. row {missing[0]})")
        elif exc_type is None and not self._tissue_set:
            error = ValueError("tissue_fraction was never set (PatchCacheWriter.set_tissue)")
        if error is not None:
            stack.__exit__(type(error), error, None)
            raise error
        stack.__exit__(exc_type, exc, tb)
