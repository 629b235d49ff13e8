"""Reading and writing blood-smear image files as ``H×W×3`` ``uint8`` RGB arrays.

Every loader hands image *paths* to the rest of the pipeline; this module is the one place that
decodes them, so JPEG (ALL-IDB1), TIFF (ALL-IDB2), BMP (C-NMC 2019) and PNG (generated data,
:func:`fedvlm.tasks.leukemia.manifest.write_manifest`) all end up in the same form.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from fedvlm.errors import DataError

TIFF_SUFFIXES = frozenset({".tif", ".tiff"})


def read_image(path: Path) -> np.ndarray:
    """Decode an image file into an ``H×W×3`` ``uint8`` RGB array.

    Pillow decodes JPEG, PNG, BMP and most TIFFs; TIFFs it cannot read (floating-point or
    many-channel microscopy exports) are decoded with ``tifffile``. Grayscale is repeated over
    three channels, an alpha channel is dropped, and 16-bit or float pixels are scaled to 0..255.

    Args:
        path: The image file.

    Returns:
        The pixels, shape ``(H, W, 3)``, dtype ``uint8``.

    Raises:
        DataError: Naming ``path`` when the file is missing, corrupt or not an image.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "smear.png"
        >>> write_image(target, np.full((2, 3, 3), 7, dtype=np.uint8))
        >>> read_image(target).shape
        (2, 3, 3)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        pixels = _read_with_pillow(path)
    except (UnidentifiedImageError, OSError, ValueError) as pillow_error:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise DataError(f"cannot decode image {path}: {pillow_error}") from pillow_error
        try:
            pixels = tifffile.imread(path)
        except Exception as tiff_error:  # tifffile raises many unrelated types on corrupt files
            raise DataError(f"cannot decode TIFF image {path}: {tiff_error}") from tiff_error
    return _to_rgb_uint8(np.asarray(pixels), path)


def read_grayscale_image(path: Path, at_least: int | None = None) -> Image.Image:
    """Decode an image file into an 8-bit grayscale (mode ``L``) Pillow image: the rounded mean of
    its RGB channels.

    The same values as ``read_image(path).mean(axis=2)`` rounded, but an 8-bit grayscale file
    (a radiograph JPEG or PNG) is used as decoded, without expanding it to three channels and
    back (about 4× faster on a 512-px JPEG); it stays a Pillow image, so that equalising and
    resizing need no copy.

    Args:
        path: The image file.
        at_least: With a grayscale JPEG, let the decoder scale it down by 1/2, 1/4 or 1/8 in the
            DCT domain while both sides stay ≥ ``at_least`` (Pillow's ``draft``, as ``thumbnail``
            does): a 3,000-px radiograph meant for 224 px is decoded at 1/8 of the work. The pixels
            then differ slightly from a full decode resized.

    Raises:
        DataError: Naming ``path`` when the file is missing, corrupt or not an image.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "film.png"
        >>> Image.fromarray(np.full((2, 3), 9, dtype=np.uint8)).save(target)
        >>> np.asarray(read_grayscale_image(target)).tolist()
        [[9, 9, 9], [9, 9, 9]]
    """
    path = Path(path)
    try:
        image = Image.open(path)
        if image.mode == "L":
            if at_least is not None and image.format == "JPEG":
                image.draft("L", (at_least, at_least))
            image.load()  # decodes, and closes the file of a single-frame image
            return image
        image.close()
    except (UnidentifiedImageError, OSError, ValueError):
        pass  # read_image names the file, or decodes what Pillow cannot (TIFF)
    return Image.fromarray(read_image(path).mean(axis=2).round().astype(np.uint8))


def write_image(path: Path, pixels: np.ndarray) -> None:
    """Write an ``H×W×3`` ``uint8`` RGB array as a lossless PNG, atomically.

    The PNG goes through :func:`atomic_destination`, so a failed write never leaves a truncated
    image behind. Parent folders are created.

    Args:
        path: Destination file (conventionally ending in ``.png``).
        pixels: The image, shape ``(H, W, 3)``, dtype ``uint8``.

    Raises:
        DataError: Naming ``path`` when ``pixels`` is not an ``H×W×3`` ``uint8`` array.
    """
    path = Path(path)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise DataError(
            f"cannot write {path}: expected an H×W×3 uint8 array, got shape {pixels.shape} dtype {pixels.dtype}"
        )
    with atomic_destination(path) as temp_path:
        Image.fromarray(pixels).save(temp_path, format="PNG")


@contextmanager
def atomic_destination(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` only once the block succeeds.

    The temporary file lives in the same folder so that :func:`os.replace` is an atomic rename;
    if the block raises, the temporary file is removed and ``path`` is left untouched. Parent
    folders are created.

    Args:
        path: The file to (re)write.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _read_with_pillow(path: Path) -> np.ndarray:
    """Pillow's decoding of ``path``; 8-bit modes are converted to RGB by Pillow itself."""
    with Image.open(path) as image:
        image.load()
        if image.mode in {"I", "I;16", "I;16B", "I;16L", "F"}:
            # Converting these modes to RGB in Pillow clips at 255; scale them ourselves instead.
            return np.asarray(image)
        return np.asarray(image.convert("RGB"))


def _to_rgb_uint8(pixels: np.ndarray, path: Path) -> np.ndarray:
    """Bring decoded pixels of any channel layout and depth to ``H×W×3`` ``uint8``."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if pixels.ndim != 3:
        raise DataError(f"cannot use image {path}: expected a 2-D image, got shape {pixels.shape}")
    channels = pixels.shape[2]
    if channels in (1, 2):  # gray, or gray + alpha
        pixels = np.repeat(pixels[:, :, :1], 3, axis=2)
    elif channels >= 3:  # RGB, or RGB + alpha / extra bands
        pixels = pixels[:, :, :3]
    return np.ascontiguousarray(_scale_to_uint8(pixels, path))


def _scale_to_uint8(pixels: np.ndarray, path: Path) -> np.ndarray:
    """Scale pixels to 0..255 by the range of their type (not of their values)."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.integer):
        if pixels.size and pixels.min() < 0:
            raise DataError(f"cannot use image {path}: it has negative pixel values")
        # Pillow holds 16-bit PNGs in 32-bit mode "I"; treat such values as 16-bit.
        full_scale = np.iinfo(pixels.dtype).max
        if np.issubdtype(pixels.dtype, np.signedinteger) and pixels.max(initial=0) <= 65535:
            full_scale = 65535
        return np.rint(pixels.astype(np.float64) * (255.0 / full_scale)).astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.floating):
        if pixels.size and (np.isnan(pixels).any() or pixels.min() < 0.0 or pixels.max() > 1.0):
            raise DataError(f"cannot use image {path}: floating-point pixels must lie in 0..1")
        return np.rint(pixels.astype(np.float64) * 255.0).astype(np.uint8)
    raise DataError(f"cannot use image {path}: unsupported pixel type {pixels.dtype}")
