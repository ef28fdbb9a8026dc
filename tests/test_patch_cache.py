"""Tests of the patch cache format's reader and writer (stevs.io.patch_cache)."""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from stevs.errors import StevsInputError
from stevs.io.patch_cache import (
    PatchCache,
    PatchCacheInfo,
    PatchCacheWriter,
    PatchScale,
    read_patch_scale,
)

N, PX = 5, 8
SCALE = PatchScale(PX, 2.0)
INFO = PatchCacheInfo(
    slide="s1",
    source_path="/data/s1.tif",
    mpp_source=0.5,
    read_level=1,
    resample="bicubic (Pillow, antialiased)",
    tissue_threshold_saturation=23,
)


def patches(n: int = N) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, PX, PX, 3), dtype=np.uint8)


def writer(
    path: Path, n: int = N, later: bool = False, info: PatchCacheInfo = INFO
) -> PatchCacheWriter:
    """A writer of ``n`` rows; ``later``: tissue fractions left for ``set_tissue``."""
    return PatchCacheWriter(
        path,
        barcodes=[f"AC{i}-1" for i in range(n)],
        centers_px=np.arange(2 * n, dtype=np.float64).reshape(n, 2),
        outside_fraction=np.linspace(0, 0.5, n),
        tissue_fraction=None if later else np.linspace(1, 0, n),
        scale=SCALE,
        info=info,
    )


def write_cache(path: Path, order: list[int] | None = None) -> Path:
    data = patches()
    with writer(path) as w:
        for row in order or range(N):
            w.write(row, data[row])
    return path


def test_round_trip_keeps_every_key(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "c.h5")
    with PatchCache(path) as cache:
        assert len(cache) == N and cache.patch_shape == (PX, PX, 3)
        assert cache.barcodes == [f"AC{i}-1" for i in range(N)]
        np.testing.assert_array_equal(cache.centers_px, np.arange(2 * N).reshape(N, 2))
        assert cache.centers_px.dtype == np.float64 and cache.tissue_fraction.dtype == np.float32
        np.testing.assert_allclose(cache.outside_fraction, np.linspace(0, 0.5, N), rtol=1e-6)
        np.testing.assert_allclose(cache.tissue_fraction, np.linspace(1, 0, N), rtol=1e-6)
        np.testing.assert_array_equal(cache[3], patches()[3])
        np.testing.assert_array_equal(cache[-1], patches()[N - 1])
        rows = cache.rows_of(["AC4-1", "AC0-1", "AC4-1"])
        assert rows.dtype == np.int64 and rows.tolist() == [4, 0, 4]
        np.testing.assert_array_equal(cache.read_rows(rows), patches()[[4, 0, 4]])
        assert cache.read_rows(np.array([], np.int64)).shape == (0, PX, PX, 3)
        assert cache.scale == SCALE and cache.attrs["slide"] == "s1"
        assert cache.attrs["tissue_threshold_saturation"] == 23
        assert cache.attrs["read_level"] == 1 and isinstance(cache.attrs["stevs_version"], str)
        with pytest.raises(IndexError):
            cache[N]
    with h5py.File(path) as f:  # the documented layout
        assert f["patches"].chunks == (1, PX, PX, 3) and f["patches"].dtype == np.uint8
        assert h5py.check_string_dtype(f["barcodes"].dtype).encoding == "utf-8"
        assert f.attrs["patch_um"] == 16.0 and f.attrs["mpp_source"] == 0.5
    assert read_patch_scale(path) == SCALE


def test_bytes_do_not_depend_on_write_order(tmp_path: Path) -> None:
    first = write_cache(tmp_path / "a.h5")
    second = write_cache(tmp_path / "b.h5", order=[4, 2, 0, 3, 1])
    assert (
        hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    )


def test_tissue_set_later_gives_the_same_bytes(tmp_path: Path) -> None:
    first = write_cache(tmp_path / "a.h5", order=[4, 2, 0, 1, 3])
    data = patches()
    placeholder = replace(INFO, tissue_threshold_saturation=0)
    late = writer(tmp_path / "b.h5", later=True, info=placeholder)
    with late as w:
        for row in (0, 3):
            w.write(row, data[row])
        w.set_tissue(np.linspace(1, 0, N), 23)  # while patches are still coming
        for row in (1, 2, 4):
            w.write(row, data[row])
    assert (tmp_path / "b.h5").read_bytes() == first.read_bytes()
    with PatchCache(tmp_path / "b.h5") as cache:
        assert cache.attrs["tissue_threshold_saturation"] == 23
        np.testing.assert_allclose(cache.tissue_fraction, np.linspace(1, 0, N), rtol=1e-6)


def test_tissue_never_set_leaves_nothing_behind(tmp_path: Path) -> None:
    late = writer(tmp_path / "c.h5", later=True)
    with pytest.raises(ValueError, match="tissue_fraction was never set"), late as w:
        for row, patch in enumerate(patches()):
            w.write(row, patch)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="tissue_fraction must be"):
        late.set_tissue(np.zeros(N + 1), 20)


def test_finished_file_has_normal_permissions(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "c.h5")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


def test_exception_or_missing_rows_leave_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="boom"), writer(path) as w:
        w.write(0, patches()[0])
        assert len(list(tmp_path.iterdir())) == 1  # only the temporary
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="4 patches were never written"), writer(path) as w:
        w.write(2, patches()[2])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="patch must be uint8"), writer(path) as w:
        w.write(0, np.zeros((PX, PX, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_cache_is_picklable_and_reopens_lazily(tmp_path: Path) -> None:
    cache = PatchCache(write_cache(tmp_path / "c.h5"))
    first = cache[1]  # opens a handle
    assert cache._file is not None
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._file is None
    np.testing.assert_array_equal(clone[1], first)
    clone.close()
    cache.close()
    np.testing.assert_array_equal(cache[2], patches()[2])  # reopens after close
    cache.close()


def test_scale_helpers() -> None:
    assert SCALE.patch_um == 16.0
    assert SCALE.describe() == "8 px at 2 µm/px (16 µm)"
    assert SCALE.to_dict() == {"patch_px": 8, "mpp_target": 2.0, "patch_um": 16.0}
    assert PatchScale.from_dict(SCALE.to_dict()) == SCALE
    assert PatchScale.from_dict({"patch_px": 8, "patch_um": 16.0}) == SCALE
    assert SCALE.matches(PatchScale(8, 2.0 * (1 + 1e-9)))
    assert not SCALE.matches(PatchScale(8, 2.01)) and SCALE.matches(PatchScale(8, 2.01), 0.01)
    assert not SCALE.matches(PatchScale(16, 2.0))
    for bad in ({"mpp_target": 2.0}, {"patch_px": 0, "mpp_target": 1.0}, {"patch_px": 8.5}):
        with pytest.raises(ValueError):
            PatchScale.from_dict(bad)


def _hand_made(path: Path, **changes: object) -> Path:
    """A cache written with h5py directly, with one thing broken."""
    n = 3
    data = {
        "patches": np.zeros((n, PX, PX, 3), np.uint8),
        "barcodes": np.array(["a", "b", "c"], dtype=object),
        "centers_px": np.zeros((n, 2)),
    }
    attrs = {"patch_px": PX, "mpp_target": 1.0}
    for key, value in changes.items():
        target = attrs if key in attrs else data
        if value is None:
            del target[key]
        else:
            target[key] = value
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
        f.attrs.update(attrs)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patches": None}, "no 'patches' dataset"),
        ({"patches": np.zeros((3, PX, PX, 3), np.float32)}, "patches must be uint8"),
        ({"patches": np.zeros((3, PX, PX), np.uint8)}, "patches must be uint8"),
        ({"barcodes": np.array(["a", "b"], dtype=object)}, r"barcodes must be \(3,\)"),
        ({"barcodes": np.array(["a", "b", "a"], dtype=object)}, "1 barcodes occur more"),
        ({"centers_px": np.zeros((3, 3))}, r"centers_px must be numeric \(3, 2\)"),
        ({"mpp_target": None}, "lacks the attribute.*mpp_target"),
        ({"patch_px": 16}, "patch_px attribute says 16"),
        ({"patch_px": -1}, "bad patch scale"),
    ],
)
def test_each_validation_error_names_the_file(tmp_path: Path, changes, message) -> None:
    path = _hand_made(tmp_path / "bad.h5", **changes)
    with pytest.raises(StevsInputError, match=message) as info:
        PatchCache(path)
    assert str(info.value).startswith(str(path))


def test_missing_corrupt_and_unknown_rows(tmp_path: Path) -> None:
    with pytest.raises(StevsInputError, match="not found") as info:
        PatchCache(tmp_path / "gone.h5")
    assert str(tmp_path / "gone.h5") in str(info.value)
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(StevsInputError, match="corrupt or truncated"):
        PatchCache(corrupt)
    with pytest.raises(StevsInputError, match="corrupt or truncated"):
        read_patch_scale(corrupt)
    cache = PatchCache(_hand_made(tmp_path / "ok.h5"))
    assert np.isnan(cache.tissue_fraction).all()  # optional fractions: unknown
    with pytest.raises(StevsInputError, match="3 of 4 spots have no patch, e.g. x, y, z") as info:
        cache.rows_of(["a", "x", "y", "z"])
    assert str(tmp_path / "ok.h5") in str(info.value)
