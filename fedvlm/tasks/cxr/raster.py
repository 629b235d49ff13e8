"""Raster helpers of the chest X-ray renderer: soft steps, pixel grids, smooth noise, a
separable Gaussian blur renormalised at the borders, and the display gamma table (all cached
per size, since every study of a run is drawn at one size)."""

from __future__ import annotations

import functools

import numpy as np

EDGE = 0.006
"""Half-width of the soft edge of anatomical shapes, in unit-square coordinates."""


def ramp(signed: np.ndarray, width: float = EDGE) -> np.ndarray:
    """Soft step: 0 below ``−width``, 1 above ``width`` (cheaper than a sigmoid)."""
    # Two ufuncs instead of np.clip: several times less call overhead on small arrays.
    return np.minimum(np.maximum(signed * (0.5 / width) + 0.5, 0.0), 1.0)


def clip01(values: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(values, 0.0), 1.0)


@functools.lru_cache(maxsize=16)
def unit_grid(size: int) -> np.ndarray:
    """Pixel-centre positions ``(i + 0.5) / size`` as a float32 vector."""
    return (np.arange(size, dtype=np.float32) + 0.5) / size


@functools.lru_cache(maxsize=64)
def bilinear_matrix(size: int, cells: int) -> np.ndarray:
    """``size×cells`` matrix that linearly interpolates ``cells`` knots at ``size`` samples."""
    position = np.linspace(0, cells - 1, size)
    low = np.minimum(position.astype(int), cells - 2)
    frac = position - low
    matrix = np.zeros((size, cells), dtype=np.float32)
    matrix[np.arange(size), low] = 1 - frac
    matrix[np.arange(size), low + 1] = frac
    return matrix


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled ``cells×cells`` uniform noise on a ``size×size`` grid, in [0, 1]."""
    matrix = bilinear_matrix(size, cells)
    return matrix @ rng.random((cells, cells), dtype=np.float32) @ matrix.T


@functools.lru_cache(maxsize=64)
def blur_matrix(size: int, sigma: float) -> np.ndarray:
    """``size×size`` Gaussian blur matrix whose rows sum to 1 (renormalised at the borders)."""
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    weights = np.exp(-0.5 * (offsets / sigma) ** 2) * (np.abs(offsets) <= np.ceil(3 * sigma))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, renormalised at the borders.

    Small images use two matrix products (fastest in numpy); large ones shifted adds, since a
    multi-threaded BLAS call on a busy machine costs more than it saves there.
    """
    if sigma <= 0.05:
        return image
    matrix = blur_matrix(image.shape[0], round(sigma, 2))
    if image.shape[0] <= MATMUL_BLUR_MAX_SIZE:
        return matrix @ image @ matrix.T
    reach = int(np.ceil(3 * sigma))
    taps = matrix[reach, : 2 * reach + 1] / matrix[reach, : 2 * reach + 1].sum()
    coverage = np.convolve(np.ones(image.shape[0], dtype=np.float32), taps, mode="same")
    blurred = image
    for axis in (0, 1):
        padded = np.zeros_like(blurred)
        for offset, tap in zip(range(-reach, reach + 1), taps, strict=True):
            padded += tap * np.roll(blurred, offset, axis=axis) * roll_valid(blurred.shape[0], offset, axis)
        blurred = padded / (coverage[:, None] if axis == 0 else coverage[None, :])
    return blurred


MATMUL_BLUR_MAX_SIZE = 128


@functools.lru_cache(maxsize=256)
def roll_valid(size: int, offset: int, axis: int) -> np.ndarray:
    """1 where ``np.roll`` by ``offset`` brought in a real neighbour, 0 where it wrapped around."""
    valid = np.ones(size, dtype=np.float32)
    if offset > 0:
        valid[:offset] = 0.0
    elif offset < 0:
        valid[offset:] = 0.0
    return valid[:, None] if axis == 0 else valid[None, :]


GAMMA_LEVELS = 4096


@functools.lru_cache(maxsize=128)
def gamma_table(gamma: float) -> np.ndarray:
    """``uint8`` display value of each of :data:`GAMMA_LEVELS` windowed brightness levels."""
    return (np.linspace(0.0, 1.0, GAMMA_LEVELS) ** gamma * 255.0 + 0.5).astype(np.uint8)
