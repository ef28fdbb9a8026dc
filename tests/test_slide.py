"""Slide readers: geometry, mpp, backends agree, bad images are refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import write_pyramid_tiff
from PIL import Image

from stevs.errors import StevsInputError
from stevs.io.slide import ImageReader, OpenSlideReader, TiffReader, open_slide
from stevs.io.thumbnail import read_thumbnail


def test_openslide_reads_pyramid_levels_and_mpp(tmp_path, pattern_image):
    path = write_pyramid_tiff(tmp_path / "s.tif", pattern_image, mpp=0.25)
    with open_slide(path) as auto:  # a plain tiled TIFF: tifffile, same levels as OpenSlide
        assert isinstance(auto, TiffReader) and auto.level_count == 3
        assert auto.tile_size(0) == (64, 64)
    with open_slide(path, backend="openslide") as slide:
        assert isinstance(slide, OpenSlideReader)
        assert slide.dimensions == (520, 400)
        assert slide.level_count == 3
        assert slide.level_downsamples == pytest.approx([1, 2, 4], rel=0.01)
        assert slide.mpp == pytest.approx(0.25)
        assert slide.mpp_source == "metadata"


def test_given_mpp_overrides_metadata(tmp_path, pattern_image):
    path = write_pyramid_tiff(tmp_path / "s.tif", pattern_image, mpp=0.25)
    with open_slide(path, mpp=0.3) as slide:
        assert slide.mpp == 0.3 and slide.mpp_source == "given"


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_level0_read_is_exact(tmp_path, pattern_image, backend):
    path = write_pyramid_tiff(tmp_path / "s.tif", pattern_image)
    with open_slide(path, backend=backend) as slide:
        region = slide.read_region((100, 60, 150, 90))
    np.testing.assert_array_equal(region, pattern_image[60:150, 100:250])


def test_two_backends_give_the_same_pixels(tmp_path, pattern_image):
    path = write_pyramid_tiff(tmp_path / "s.tif", pattern_image)
    box, size = (33.5, 41.25, 300, 200), (75, 50)
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tifffile") as b:
        first, second = a.read_region(box, size), b.read_region(box, size)
    assert first.shape == second.shape == (50, 75, 3)
    np.testing.assert_array_equal(first, second)


def test_downsampled_read_matches_a_resize_of_level0(tmp_path, pattern_image):
    path = write_pyramid_tiff(tmp_path / "s.tif", pattern_image)
    with open_slide(path) as slide:
        region = slide.read_region((0, 0, 520, 400), (130, 100)).astype(float)
    expected = np.asarray(Image.fromarray(pattern_image).resize((130, 100), Image.BICUBIC))
    assert np.abs(region - expected).mean() < 2.0


def test_outside_the_slide_is_white(tmp_path, pattern_image):
    path = write_pyramid_tiff(tmp_path / "s.tif", pattern_image)
    for backend in ("openslide", "tifffile"):
        with open_slide(path, backend=backend) as slide:
            region = slide.read_region((-20, -10, 60, 40))
        assert (region[:10] == 255).all() and (region[:, :20] == 255).all()
        np.testing.assert_array_equal(region[10:, 20:], pattern_image[:30, :40])


def test_plain_image_backend_and_unknown_mpp(tmp_path, pattern_image):
    path = tmp_path / "section.png"
    Image.fromarray(pattern_image).save(path)
    with open_slide(path) as slide:
        assert isinstance(slide, ImageReader)
        assert slide.mpp is None
        np.testing.assert_array_equal(slide.read_region((5, 6, 20, 10)), pattern_image[6:16, 5:25])
        assert read_thumbnail(slide, 130).shape == (100, 130, 3)
        with pytest.raises(StevsInputError, match="section.png.*microns per pixel unknown"):
            slide.require_mpp()


def test_rgba_grey_and_16bit_images_are_converted(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent -> white
    rgba[:10, :, 3] = 255  # opaque top half -> red-ish
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    with open_slide(tmp_path / "rgba.png") as slide:
        pixels = slide.read_region((0, 0, 30, 20))
    assert (pixels[15] == 255).all() and tuple(pixels[0, 0]) == (200, 0, 0)

    grey = np.full((20, 30), 77, np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    with open_slide(tmp_path / "grey.png") as slide:
        assert tuple(slide.read_region((0, 0, 30, 20))[3, 3]) == (77, 77, 77)

    deep = np.full((64, 64, 3), 65535, np.uint16)
    deep[:32] = 256 * 100
    tifffile.imwrite(tmp_path / "deep.tif", deep, photometric="rgb")
    with open_slide(tmp_path / "deep.tif") as slide:
        assert isinstance(slide, TiffReader)
        pixels = slide.read_region((0, 0, 64, 64))
    assert pixels.dtype == np.uint8 and pixels[0, 0, 0] == 100 and pixels[40, 0, 0] == 255


def test_bad_images_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(StevsInputError, match="missing.svs: slide image not found"):
        open_slide(tmp_path / "missing.svs")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(StevsInputError, match="broken.jpg: cannot read image"):
        open_slide(broken)
    unknown = tmp_path / "slide.xyz"
    unknown.write_bytes(b"nothing")
    with pytest.raises(StevsInputError, match="slide.xyz: unrecognised slide format"):
        open_slide(unknown)
    floats = tmp_path / "float.tif"
    tifffile.imwrite(floats, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(StevsInputError, match="float.tif: unsupported pixel type float32"):
        open_slide(floats)
    five = tmp_path / "five.tif"
    tifffile.imwrite(
        five, np.zeros((5, 8, 8), np.uint8), photometric="minisblack", planarconfig="separate"
    )
    with pytest.raises(StevsInputError, match="five.tif"):
        with open_slide(five) as slide:
            slide.read_region((0, 0, 8, 8))
    with pytest.raises(StevsInputError, match="microns per pixel must be positive"):
        open_slide(floats, mpp=-1)


def test_her2st_jpeg_reads(her2st_dir):
    import pandas as pd

    spots = pd.read_csv(her2st_dir / "spots" / "C2_selection.tsv", sep="\t")
    x, y = spots.loc[0, ["pixel_x", "pixel_y"]]
    with open_slide(her2st_dir / "images" / "C2.jpg") as slide:
        assert slide.dimensions == (9274, 9911)
        assert slide.mpp is None  # the JPEG's dpi field is meaningless
        patch = slide.read_region((x - 72, y - 72, 145, 145), (64, 64))
        thumb = read_thumbnail(slide, 256)
    assert patch.shape == (64, 64, 3) and patch.dtype == np.uint8
    assert patch.std() > 5  # tissue, not blank glass
    assert thumb.shape[0] == 256


def _banded_jpeg(path, image: np.ndarray, restart_rows: int = 1, **options):
    """A 4:2:0 JPEG with restart markers every ``restart_rows`` rows of 16 px blocks."""
    options = options or {"restart_marker_rows": restart_rows}
    Image.fromarray(image).save(path, "JPEG", quality=90, subsampling=2, **options)
    return path


@pytest.fixture
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:700, 0:650]
    base = np.stack([xx % 256, yy % 256, (xx * yy) % 256], axis=-1).astype(np.float64)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("restart_rows", [1, 3])
def test_jpeg_bands_decode_the_same_pixels_as_the_whole_image(tmp_path, photo, restart_rows):
    from stevs.io import jpeg_bands

    path = _banded_jpeg(tmp_path / "banded.jpg", photo, restart_rows)
    bands = jpeg_bands.parse_jpeg_bands(path)
    assert bands is not None and bands.granule_px == 16 * restart_rows
    for level in range(4):
        with Image.open(path) as whole:
            if level:
                whole.draft("RGB", (whole.width // 2**level, whole.height // 2**level))
            expected = np.asarray(whole)
        scale, step = 2**level, bands.granule_px
        for row0, row1 in ((0, step), (step, 5 * step), (640 - 640 % step, 700)):
            got = bands.decode_rows(row0, row1, level)
            np.testing.assert_array_equal(got, expected[row0 // scale : -(-row1 // scale)])
    with open_slide(path, mpp=0.5) as slide:  # the reader: bands at level 0, equal pixels
        assert isinstance(slide, ImageReader) and slide.tile_size(0) is not None
        with Image.open(path) as whole:
            np.testing.assert_array_equal(
                slide.read_region((-5, 100, 660, 300)), _white_pad(np.asarray(whole), -5, 100)
            )


def _white_pad(image: np.ndarray, x: int, y: int) -> np.ndarray:
    out = np.full((300, 660, 3), 255, np.uint8)
    out[:, -x : -x + image.shape[1]] = image[y : y + 300]
    return out


def test_jpegs_without_usable_restart_markers_are_decoded_whole(tmp_path, photo):
    from stevs.io import jpeg_bands

    plain = tmp_path / "plain.jpg"
    Image.fromarray(photo).save(plain, quality=90)
    progressive = tmp_path / "progressive.jpg"
    Image.fromarray(photo).save(progressive, quality=90, progressive=True)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_banded_jpeg(tmp_path / "b.jpg", photo).read_bytes()[:-5000])
    # 41 blocks a row, intervals of 5 blocks: intervals do not start at block rows
    unaligned = _banded_jpeg(tmp_path / "unaligned.jpg", photo, restart_marker_blocks=5)
    for path in (plain, progressive, truncated, unaligned):
        assert jpeg_bands.parse_jpeg_bands(path) is None
    with open_slide(plain) as slide:
        assert slide.tile_size(0) is None
        with Image.open(plain) as whole:
            np.testing.assert_array_equal(slide.read_region((0, 0, 650, 700)), np.asarray(whole))
    with pytest.raises(StevsInputError, match="truncated.jpg: cannot read image"):
        open_slide(truncated)


def test_pixel_cache_is_bounded_and_loads_each_key_once():
    from stevs.io.slide import PixelCache

    calls = []

    def load(key):
        calls.append(key)
        return np.zeros(100, np.uint8)

    cache = PixelCache(max_bytes=250)
    for key in (1, 2, 1, 3, 1):
        cache.get(key, lambda key=key: load(key))
    assert calls == [1, 2, 3]  # 1 stayed (recently used), 2 was evicted for 3
    cache.get(2, lambda: load(2))
    assert calls == [1, 2, 3, 2]
