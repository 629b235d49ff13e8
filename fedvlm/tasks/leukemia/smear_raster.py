"""Raster helpers of the blood-smear renderer: patch offsets, anti-aliased discs and ellipses,
smooth noise, and a separable Gaussian blur of channel-first images renormalised at the borders
(no BLAS: small patches are cheaper with shifted adds)."""

from __future__ import annotations

import functools

import numpy as np


def patch_offsets(cx: float, cy: float, half: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pixel-centre offsets from ``(cx, cy)`` over a ``(2·half+1)²`` patch, and its corner."""
    x0, y0 = int(np.floor(cx)) - half, int(np.floor(cy)) - half
    span = np.arange(2 * half + 1, dtype=np.float32) + 0.5
    return (x0 + span - cx)[None, :], (y0 + span - cy)[:, None], x0, y0


def soft_disc(distance: np.ndarray, radius: float | np.ndarray) -> np.ndarray:
    """Anti-aliased disc coverage (1 inside, 0 outside, a one-pixel ramp at the edge)."""
    # Two ufuncs instead of np.clip: several times less call overhead on small patches.
    return np.minimum(np.maximum(radius - distance + 0.5, 0.0), 1.0)


def ellipse_distance(
    dx: np.ndarray, dy: np.ndarray, aspect: float | np.ndarray, angle: float | np.ndarray
) -> np.ndarray:
    """Distance in which an ellipse of area-equivalent radius ``r`` is the level set ``r``."""
    cos, sin = np.cos(angle), np.sin(angle)
    along = dx * cos + dy * sin
    across = dy * cos - dx * sin
    root = np.sqrt(aspect)
    return np.sqrt((along / root) ** 2 + (across * root) ** 2)


@functools.lru_cache(maxsize=256)
def bilinear_weights(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower grid index and fractional offset of each of ``size`` samples over ``cells`` knots."""
    position = np.linspace(0, cells - 1, size, dtype=np.float32)
    low = np.minimum(position.astype(int), cells - 2)
    return low, position - low


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled ``cells×cells`` uniform noise on a ``size×size`` grid, in [0, 1]."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    low, frac = bilinear_weights(size, cells)
    rows = coarse[low] * (1 - frac[:, None]) + coarse[low + 1] * frac[:, None]
    return rows[:, low] * (1 - frac[None, :]) + rows[:, low + 1] * frac[None, :]


@functools.lru_cache(maxsize=64)
def blur_taps(size: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian taps ``w[0..reach]`` and the per-position weight sum, for border renormalising."""
    reach = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(reach + 1) / sigma) ** 2).astype(np.float32)
    coverage = np.full(size, taps[0], dtype=np.float32)
    for shift in range(1, reach + 1):
        coverage[shift:] += taps[shift]
        coverage[:-shift] += taps[shift]
    return taps, coverage


def blur_axis(image: np.ndarray, taps: np.ndarray, coverage: np.ndarray, axis: int) -> np.ndarray:
    """Convolve a ``C×S×S`` image with symmetric ``taps`` along ``axis`` (1 or 2), no BLAS."""
    size = image.shape[axis]

    def span(start: int, stop: int) -> tuple[slice, ...]:
        return (slice(None),) * axis + (slice(start, stop),)

    blurred = taps[0] * image
    for shift in range(1, min(len(taps), size)):
        blurred[span(shift, size)] += taps[shift] * image[span(0, size - shift)]
        blurred[span(0, size - shift)] += taps[shift] * image[span(shift, size)]
    blurred /= coverage if axis == 2 else coverage[:, None]
    return blurred


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a channel-first ``C×S×S`` image, renormalised at the borders."""
    taps, coverage = blur_taps(image.shape[-1], round(sigma, 3))
    return blur_axis(blur_axis(image, taps, coverage, axis=1), taps, coverage, axis=2)
