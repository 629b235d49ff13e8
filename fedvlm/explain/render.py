"""Rendering explanations: heatmap PNGs, highlighted reports and the HTML page around them.

Positive attributions (pushing the explained probability up) are red, negative ones blue; the
colour scale of a heatmap or a report is symmetric around 0 and set by its largest ``|φ|``.
Nothing here needs a display: PNGs are composed with PIL and a matplotlib colormap.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from fedvlm.errors import DataError

COLORMAP = "bwr"
HEATMAP_ALPHA = 0.55
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.side { display: flex; gap: 2em; flex-wrap: wrap; }
.panel { flex: 1 1 320px; }
img.smear { width: 256px; image-rendering: pixelated; border: 1px solid #ccc; margin-right: .5em; }
.report { line-height: 1.9; }
.report span { padding: 1px 2px; border-radius: 3px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.note { color: #666; font-size: 90%; }
"""


def heatmap_overlay(pixels: np.ndarray, attributions: np.ndarray, grid: tuple[int, int]) -> Image.Image:
    """The image with the patch attributions blended over it, at the image's size.

    Args:
        pixels: ``H×W×3`` ``uint8`` image.
        attributions: ``φ`` ``[rows * cols]``, row-major over the patch grid.
        grid: ``(rows, cols)``.

    Raises:
        DataError: If ``attributions`` does not fit the grid.
    """
    rows, cols = grid
    if len(attributions) != rows * cols:
        raise DataError(f"{len(attributions)} attributions do not fill a {rows}x{cols} patch grid")
    height, width = pixels.shape[:2]
    scale = float(np.abs(attributions).max()) or 1.0
    colours = matplotlib.colormaps[COLORMAP](0.5 + 0.5 * np.asarray(attributions).reshape(rows, cols) / scale)
    patch_colours = Image.fromarray((colours[..., :3] * 255).astype(np.uint8))
    heat = np.asarray(patch_colours.resize((width, height), Image.Resampling.NEAREST), dtype=np.float64)
    blended = (1 - HEATMAP_ALPHA) * pixels.astype(np.float64) + HEATMAP_ALPHA * heat
    return Image.fromarray(np.clip(blended, 0, 255).round().astype(np.uint8))


def save_heatmap_png(pixels: np.ndarray, attributions: np.ndarray, grid: tuple[int, int], path: Path) -> Path:
    """Write :func:`heatmap_overlay` as a PNG; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_overlay(pixels, attributions, grid).save(path, format="PNG")
    return path


def highlight_words_html(words: Sequence[str], attributions: np.ndarray) -> str:
    """The words as HTML spans shaded red (positive) or blue (negative) by ``|φ|``, HTML-escaped,
    each with its value as a tooltip.

    Raises:
        DataError: If there is not one attribution per word.

    Example:
        >>> highlight_words_html(["blasts", "<b>"], np.array([0.2, -0.1]))  # doctest: +ELLIPSIS
        '<span ... title="+0.2000">blasts</span> <span ... title="-0.1000">&lt;b&gt;</span>'
    """
    if len(words) != len(attributions):
        raise DataError(f"{len(attributions)} attributions for {len(words)} words")
    scale = float(np.abs(attributions).max()) if len(attributions) else 0.0
    spans = []
    for word, phi in zip(words, attributions, strict=True):
        strength = abs(float(phi)) / scale if scale > 0 else 0.0
        rgb = "220,40,40" if phi > 0 else "40,90,220"
        spans.append(
            f'<span style="background: rgba({rgb},{0.85 * strength:.3f})" title="{float(phi):+.4f}">'
            f"{html.escape(word)}</span>"
        )
    return " ".join(spans)


def html_page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
