"""Tests of image decoding (every format the layouts use) and atomic PNG writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, UnidentifiedImageError

from fedvlm.data.images import read_image, write_image
from fedvlm.errors import DataError


def _smear_pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_formats_read_back_pixel_identical(tmp_path: Path, suffix: str) -> None:
    pixels = _smear_pixels()
    path = tmp_path / f"smear{suffix}"
    Image.fromarray(pixels).save(path)

    decoded = read_image(path)

    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, pixels)


def test_jpeg_reads_as_rgb_close_to_the_original(tmp_path: Path) -> None:
    # A smooth gradient, so lossy JPEG stays within a few grey levels.
    ramp = np.linspace(0, 255, 8, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (8, 1))] * 3, axis=2)
    path = tmp_path / "Im001_1.jpg"
    Image.fromarray(pixels).save(path, quality=95)

    decoded = read_image(path)

    assert decoded.shape == (8, 8, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - pixels.astype(int)).mean() < 8


def test_grayscale_is_repeated_over_three_channels(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)

    decoded = read_image(path)

    np.testing.assert_array_equal(decoded, np.stack([gray] * 3, axis=2))


def test_rgba_alpha_is_dropped(tmp_path: Path) -> None:
    pixels = _smear_pixels()
    transparent = np.zeros((8, 8, 1), dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([pixels, transparent], axis=2)).save(path)

    np.testing.assert_array_equal(read_image(path), pixels)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_is_scaled_by_the_type_range(tmp_path: Path, suffix: str) -> None:
    deep = np.array([[0, 257, 128 * 257, 65535]], dtype=np.uint16)
    path = tmp_path / f"deep{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, deep)
    else:
        Image.fromarray(deep).save(path)

    decoded = read_image(path)

    np.testing.assert_array_equal(decoded[:, :, 0], [[0, 1, 128, 255]])
    np.testing.assert_array_equal(decoded[:, :, 0], decoded[:, :, 2])


def test_float_tiff_pillow_cannot_read_is_decoded_by_tifffile(tmp_path: Path) -> None:
    unit = np.array([[[0.0, 0.25, 1.0], [0.5, 1.0, 0.0]]], dtype=np.float32)
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, unit)
    with pytest.raises(UnidentifiedImageError):
        Image.open(path)

    decoded = read_image(path)

    # rint(255 * 0.25) = 64, rint(255 * 0.5) = 128 (127.5 rounds to even).
    np.testing.assert_array_equal(decoded, [[[0, 64, 255], [128, 255, 0]]])


def test_float_tiff_outside_unit_range_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "counts.tif"
    tifffile.imwrite(path, np.full((4, 4, 3), 300.0, dtype=np.float32))

    with pytest.raises(DataError, match=r"counts\.tif: floating-point pixels must lie in 0\.\.1"):
        read_image(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"image file not found: .*absent\.png"):
        read_image(tmp_path / "absent.png")


@pytest.mark.parametrize("name", ["junk.png", "junk.jpg", "junk.bmp", "junk.tif"])
def test_undecodable_file_names_the_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not an image")

    with pytest.raises(DataError, match=rf"cannot decode .*{name.replace('.', '[.]')}"):
        read_image(path)


def test_truncated_jpeg_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "Im007_1.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(DataError, match=r"cannot decode image .*Im007_1\.jpg"):
        read_image(path)


def test_write_image_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    pixels = _smear_pixels(3)
    path = tmp_path / "nested" / "smear.png"

    write_image(path, pixels)

    np.testing.assert_array_equal(read_image(path), pixels)
    assert [entry.name for entry in path.parent.iterdir()] == ["smear.png"]


def test_write_image_rejects_a_non_rgb_uint8_array(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot write .*gray\.png: expected an H×W×3 uint8"):
        write_image(tmp_path / "gray.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"dtype float64"):
        write_image(tmp_path / "float.png", np.zeros((8, 8, 3)))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file_and_no_partial_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "smear.png"
    old_pixels = _smear_pixels(4)
    write_image(path, old_pixels)

    def failing_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        Path(str(fp)).write_bytes(b"half a PNG")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(path, _smear_pixels(5))
    monkeypatch.undo()

    np.testing.assert_array_equal(read_image(path), old_pixels)
    assert [entry.name for entry in tmp_path.iterdir()] == ["smear.png"]


@pytest.mark.parametrize(
    ("name", "pixels"),
    [
        ("gray.png", np.arange(48, dtype=np.uint8).reshape(6, 8) * 5),
        ("gray.jpg", np.arange(48, dtype=np.uint8).reshape(6, 8) * 5),
        ("colour.png", np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)),
        ("deep.png", np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300),  # 16-bit: scaled, not clipped
    ],
)
def test_grayscale_reading_is_the_rounded_channel_mean_of_rgb_reading(
    tmp_path: Path, name: str, pixels: np.ndarray
) -> None:
    from fedvlm.data.images import read_grayscale_image

    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    expected = read_image(path).mean(axis=2).round().astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(read_grayscale_image(path)), expected)


def test_grayscale_reading_of_a_missing_or_corrupt_file_names_it(tmp_path: Path) -> None:
    from fedvlm.data.images import read_grayscale_image

    with pytest.raises(DataError, match="image file not found: .*absent.png"):
        read_grayscale_image(tmp_path / "absent.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        read_grayscale_image(tmp_path / "broken.jpg")


def test_a_grayscale_jpeg_decodes_in_draft_no_smaller_than_asked_and_close_to_full(tmp_path: Path) -> None:
    from fedvlm.data.images import read_grayscale_image

    yy, xx = np.mgrid[0:400, 0:520]
    path = tmp_path / "film.jpg"
    Image.fromarray(((xx + 2 * yy) % 256).astype(np.uint8)).save(path, quality=95)
    full = read_grayscale_image(path)
    draft = read_grayscale_image(path, at_least=96)
    assert full.size == (520, 400) and draft.size == (130, 100)  # 1/4: one more halving would go below 96
    small = [np.asarray(image.resize((96, 96), Image.Resampling.BILINEAR), dtype=float) for image in (full, draft)]
    assert np.abs(small[0] - small[1]).mean() < 3.0  # gray levels, out of 255
