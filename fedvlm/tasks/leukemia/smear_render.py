"""Rendering of peripheral-blood-smear-like fields for the synthetic leukemia generator.

Images are built in optical density (OD): every cell adds a stain OD to a canvas, and the field
is ``light × exp(−OD)`` (Beer–Lambert), so overlapping red cells look darker where they overlap,
as on a real smear. Each cell is drawn with numpy on a small local patch around its centre; the
many red cells of a field are summed in one vectorised call from a cached bank of sprites.

Cell types and how they look (radii in pixels of a 64 px field at magnification 1):

* red blood cells (r ≈ 4.6): pink discs with a slightly darker rim and a pale central pallor;
* neutrophils (r ≈ 6): pale lilac cytoplasm, a dark purple nucleus of 2–4 lobes;
* small lymphocytes (r ≈ 4.3): a round, dense, dark nucleus with a thin blue rim;
* blasts (r ≈ 7.5): large cells whose round/oval nucleus fills most of the cell, lighter purple
  fine-grained chromatin, 1–3 pale nucleoli, sometimes a thin reddish Auer rod;
* atypical lymphoid cells (r ≈ 6): the *equivocal* cell of ambiguous fields, drawn identically
  whether it is a reactive lymphocyte (healthy patient) or a lymphocyte-like blast (leukemia),
  so its presence says nothing about the label.

A :class:`SmearStyle` holds what differs between acquisition sites: stain colours (eosin and
azure strength, a channel gain), background light, magnification, blur and sensor noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedvlm.tasks.leukemia.smear_raster import ellipse_distance, gaussian_blur, patch_offsets, smooth_noise, soft_disc

REFERENCE_SIZE = 64
"""Image side (pixels) at which the cell radii below are given; they scale with the image."""

RED_CELL_RADIUS = 4.6
NEUTROPHIL_RADIUS = 6.0
LYMPHOCYTE_RADIUS = 4.3
BLAST_RADIUS = 7.5
ATYPICAL_RADIUS = 6.1

NORMAL_WHITE_CELL_COUNT_WEIGHTS = (0.35, 0.45, 0.20)
"""Probability of 0, 1 or 2 normal white cells per field, the same for every patient."""
NEUTROPHIL_FRACTION = 0.65
AUER_ROD_PER_BLAST = 0.5
"""In a patient with Auer rods, the share of blasts that show one."""
_NORMAL_COUNT_CUMULATIVE = np.cumsum(NORMAL_WHITE_CELL_COUNT_WEIGHTS)[:-1]
_BASE_RADIUS = {
    "blast": BLAST_RADIUS,
    "atypical": ATYPICAL_RADIUS,
    "neutrophil": NEUTROPHIL_RADIUS,
    "lymphocyte": LYMPHOCYTE_RADIUS,
}
SITE_STYLE_SEED = 20240917
"""Site appearance is a property of the site, not of the generator seed."""
RED_CELL_SPRITE_SEED = 7
RED_CELL_SPRITE_VARIANTS = 64


def _optical_density(rgb: tuple[float, float, float]) -> np.ndarray:
    return -np.log(np.asarray(rgb, dtype=np.float32))


# Transmitted colour of each stained component at full thickness (fractions of white light).
_BASE_OD = {
    "plasma": _optical_density((0.985, 0.955, 0.965)),
    "red_cell": _optical_density((0.90, 0.60, 0.64)),
    "neutrophil_cytoplasm": _optical_density((0.94, 0.88, 0.91)),
    "dense_nucleus": _optical_density((0.40, 0.20, 0.55)),
    "lymphoid_cytoplasm": _optical_density((0.74, 0.81, 0.93)),
    "blast_chromatin": _optical_density((0.62, 0.45, 0.75)),
    "blast_cytoplasm": _optical_density((0.76, 0.78, 0.91)),
    "atypical_chromatin": _optical_density((0.50, 0.31, 0.63)),
    "auer_rod": _optical_density((0.62, 0.22, 0.36)),
}
_EOSIN_COMPONENTS = ("plasma", "red_cell", "neutrophil_cytoplasm", "auer_rod")
_BACKGROUND_LIGHT = np.array([0.975, 0.945, 0.95], dtype=np.float32)


@dataclass(frozen=True, eq=False)
class SmearStyle:
    """How one acquisition site stains, magnifies and images its smears.

    Attributes:
        stain_od: Optical density (RGB, shape ``(3,)``) of each stained component, by name.
        background_light: RGB of the empty glass, in ``(0, 1]``.
        magnification: Cell radius scale (≈0.8–1.25 across sites).
        blur_sigma: Gaussian blur (pixels of a 64 px field).
        noise_std: Standard deviation of per-pixel sensor noise, as a fraction of full scale.
    """

    stain_od: dict[str, np.ndarray]
    background_light: np.ndarray
    magnification: float
    blur_sigma: float
    noise_std: float


def site_styles(num_sites: int, seed: int = SITE_STYLE_SEED) -> list[SmearStyle]:
    """One :class:`SmearStyle` per site, drawn once from ``seed``.

    Eosin-stained parts (red cells, plasma, granules) and azure-stained parts (nuclei, blue
    cytoplasm) vary in strength independently, and a per-channel gain shifts hue/saturation.

    Args:
        num_sites: How many sites.
        seed: Seed of the site appearance (fixed by default so a site always looks the same).

    Returns:
        ``num_sites`` styles, site ``k`` at index ``k``.
    """
    rng = np.random.default_rng(seed)
    styles = []
    for _ in range(num_sites):
        eosin, azure = rng.uniform(0.75, 1.25, size=2)
        channel_gain = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
        strength = {name: eosin if name in _EOSIN_COMPONENTS else azure for name in _BASE_OD}
        stain_od = {name: (od * strength[name] * channel_gain).astype(np.float32) for name, od in _BASE_OD.items()}
        light = np.clip(_BACKGROUND_LIGHT + rng.uniform(-0.04, 0.03, size=3), 0.8, 1.0)
        styles.append(
            SmearStyle(
                stain_od=stain_od,
                background_light=light.astype(np.float32),
                magnification=float(rng.uniform(0.8, 1.25)),
                blur_sigma=float(rng.uniform(0.3, 0.9)),
                noise_std=float(rng.uniform(0.004, 0.02)),
            )
        )
    return styles


@dataclass(frozen=True)
class SmearContents:
    """The diagnostically relevant cells of one field (normal cells are added by the renderer).

    Attributes:
        blasts: Number of clearly drawn blasts.
        atypical_cells: Number of equivocal atypical lymphoid cells.
        auer_rods: Whether blasts may carry an Auer rod (each blast then has one with
            probability ``AUER_ROD_PER_BLAST``).
    """

    blasts: int = 0
    atypical_cells: int = 0
    auer_rods: bool = False


@dataclass(frozen=True, eq=False)
class RenderedSmear:
    """A rendered field and where its diagnostically relevant cells are.

    Attributes:
        image: ``H×W×3`` ``uint8`` image.
        blast_centres: ``(x, y)`` centres of the blasts drawn.
        atypical_centres: ``(x, y)`` centres of the atypical lymphoid cells drawn.
    """

    image: np.ndarray
    blast_centres: tuple[tuple[float, float], ...]
    atypical_centres: tuple[tuple[float, float], ...]


@dataclass(frozen=True, eq=False)
class _Stamp:
    """A channel-first ``3×P×P`` OD patch and the image pixel its top-left corner goes to."""

    od: np.ndarray
    x0: int
    y0: int


def _tint(density: np.ndarray, od: np.ndarray) -> np.ndarray:
    """Channel-first OD ``3×P×P`` of a stain at the given ``P×P`` density."""
    return od[:, None, None] * density[None]


@functools.lru_cache(maxsize=64)
def _red_cell_sprites(radius: float, variants: int = RED_CELL_SPRITE_VARIANTS) -> np.ndarray:
    """A bank of red-cell density sprites of one radius (varied shape, pallor, sub-pixel offset).

    Drawn from a fixed seed, so caching never changes what a patient's random stream produces.
    """
    rng = np.random.default_rng(RED_CELL_SPRITE_SEED)
    shape = (variants, 1, 1)
    half = int(np.ceil(radius * 1.25)) + 1
    span = np.arange(-half, half + 1, dtype=np.float32)
    offsets = rng.uniform(-0.5, 0.5, size=(variants, 2)).astype(np.float32)
    dx = span[None, None, :] - offsets[:, 0, None, None]
    dy = span[None, :, None] - offsets[:, 1, None, None]
    radii = radius * rng.uniform(0.92, 1.08, size=shape).astype(np.float32)
    aspect = rng.uniform(1.0, 1.15, size=shape).astype(np.float32)
    angle = rng.uniform(0, np.pi, size=shape).astype(np.float32)
    pallor = rng.uniform(0.35, 0.6, size=shape).astype(np.float32)
    distance = ellipse_distance(dx, dy, aspect, angle)
    rho = distance / radii
    central_pallor = pallor * np.exp(-((rho / 0.42) ** 2))
    darker_rim = 0.22 * np.exp(-(((rho - 0.82) / 0.14) ** 2))
    thickness = 1.0 - central_pallor + darker_rim
    return (thickness * soft_disc(distance, radii)).astype(np.float32)


def draw_red_cells(
    rng: np.random.Generator,
    centres: np.ndarray,
    radius: float,
    canvas_shape: tuple[int, int],
    pad: int,
) -> np.ndarray:
    """Red cells: pink discs with a darker rim and a pale central pallor, all in one numpy pass.

    Each cell is a sprite from a cached bank (varied shape and pallor) with its own stain
    intensity; the sprites are summed into a density map with one ``bincount``.

    Args:
        rng: Random source.
        centres: ``(K, 2)`` cell centres ``(x, y)`` in image pixels.
        radius: Mean radius in pixels.
        canvas_shape: ``(height, width)`` of the padded canvas.
        pad: Offset of the image inside the canvas.

    Returns:
        Red-cell stain density (multiply by the red-cell OD) on the canvas.
    """
    height, width = canvas_shape
    sprites = _red_cell_sprites(round(radius, 2))
    if len(centres) == 0:
        return np.zeros(canvas_shape, dtype=np.float32)
    size = sprites.shape[1]
    half = size // 2
    chosen = sprites[rng.integers(len(sprites), size=len(centres))]
    intensity = rng.uniform(0.85, 1.1, size=(len(centres), 1, 1)).astype(np.float32)
    corner = np.floor(centres).astype(int) - half + pad
    rows = corner[:, 1, None] + np.arange(size)
    cols = corner[:, 0, None] + np.arange(size)
    flat = (rows[:, :, None] * width + cols[:, None, :]).ravel()
    density = np.bincount(flat, weights=(chosen * intensity).ravel(), minlength=height * width)
    return density.reshape(height, width).astype(np.float32)


def draw_neutrophil(rng: np.random.Generator, style: SmearStyle, centre: tuple[float, float], radius: float) -> _Stamp:
    """A neutrophil: pale granular cytoplasm and a dark nucleus of 2–4 connected lobes."""
    dx, dy, x0, y0 = patch_offsets(*centre, int(np.ceil(radius)) + 2)
    distance = np.sqrt(dx**2 + dy**2)
    cell = soft_disc(distance, radius)
    lobes = int(rng.integers(2, 5))
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.arange(lobes) * rng.uniform(1.0, 1.35)
    lobe_radius = radius * rng.uniform(0.26, 0.32)
    nucleus = np.zeros_like(distance)
    for lobe_angle in angles:
        lx = 0.42 * radius * np.cos(lobe_angle)
        ly = 0.42 * radius * np.sin(lobe_angle)
        lobe = soft_disc(np.sqrt((dx - lx) ** 2 + (dy - ly) ** 2), lobe_radius)
        nucleus = np.maximum(nucleus, lobe)
    granules = 0.85 + 0.3 * rng.random(distance.shape, dtype=np.float32)
    od = _tint(cell * (1 - nucleus) * granules, style.stain_od["neutrophil_cytoplasm"])
    od = od + _tint(0.95 * nucleus, style.stain_od["dense_nucleus"])
    return _Stamp(od, x0, y0)


def draw_lymphocyte(rng: np.random.Generator, style: SmearStyle, centre: tuple[float, float], radius: float) -> _Stamp:
    """A small lymphocyte: a round, dense, coarsely clumped dark nucleus and a thin blue rim."""
    half = int(np.ceil(radius)) + 2
    dx, dy, x0, y0 = patch_offsets(*centre, half)
    cell = soft_disc(np.sqrt(dx**2 + dy**2), radius)
    shift = radius * 0.08 * rng.standard_normal(2)
    nucleus = soft_disc(np.sqrt((dx - shift[0]) ** 2 + (dy - shift[1]) ** 2), 0.82 * radius)
    clumps = 0.85 + 0.3 * smooth_noise(rng, 2 * half + 1, 4)
    od = _tint(cell * (1 - nucleus), style.stain_od["lymphoid_cytoplasm"])
    od = od + _tint(nucleus * clumps, style.stain_od["dense_nucleus"])
    return _Stamp(od, x0, y0)


def draw_atypical_lymphoid_cell(
    rng: np.random.Generator, style: SmearStyle, centre: tuple[float, float], radius: float
) -> _Stamp:
    """An equivocal cell between a reactive lymphocyte and a small blast.

    Medium size, a moderately large oval nucleus of intermediate chromatin, abundant pale blue
    cytoplasm, no nucleoli. Drawn the same way for both labels on purpose.
    """
    half = int(np.ceil(radius * 1.1)) + 2
    dx, dy, x0, y0 = patch_offsets(*centre, half)
    aspect, angle = rng.uniform(1.0, 1.2), rng.uniform(0, np.pi)
    cell = soft_disc(ellipse_distance(dx, dy, aspect, angle), radius)
    shift = radius * 0.12 * rng.standard_normal(2)
    nucleus_aspect = rng.uniform(1.0, 1.25)
    nucleus_distance = ellipse_distance(dx - shift[0], dy - shift[1], nucleus_aspect, angle)
    nucleus = soft_disc(nucleus_distance, 0.7 * radius)
    chromatin = 0.8 + 0.35 * smooth_noise(rng, 2 * half + 1, 5)
    od = _tint(cell * (1 - nucleus), style.stain_od["lymphoid_cytoplasm"])
    od = od + _tint(nucleus * chromatin, style.stain_od["atypical_chromatin"])
    return _Stamp(od, x0, y0)


def draw_blast(
    rng: np.random.Generator,
    style: SmearStyle,
    centre: tuple[float, float],
    radius: float,
    auer_rod: bool,
) -> _Stamp:
    """A blast: large cell, nucleus filling most of it, fine pale chromatin, 1–3 nucleoli.

    Args:
        rng: Random source.
        style: Site style (stain colours).
        centre: ``(x, y)`` in pixels.
        radius: Cell radius in pixels.
        auer_rod: Whether to draw a thin reddish Auer rod in the cytoplasm.

    Returns:
        The cell's OD stamp.
    """
    half = int(np.ceil(radius * 1.12)) + 2
    dx, dy, x0, y0 = patch_offsets(*centre, half)
    angle = rng.uniform(0, np.pi)
    cell = soft_disc(ellipse_distance(dx, dy, rng.uniform(1.0, 1.15), angle), radius)
    nucleus_radius = radius * rng.uniform(0.76, 0.84)
    offset_angle = rng.uniform(0, 2 * np.pi)
    # With a rod the nucleus sits further off-centre, leaving a crescent of cytoplasm for it.
    offset = radius * (rng.uniform(0.16, 0.22) if auer_rod else rng.uniform(0.04, 0.12))
    nx, ny = offset * np.cos(offset_angle), offset * np.sin(offset_angle)
    nucleus_aspect = rng.uniform(1.0, 1.2)
    nucleus = soft_disc(ellipse_distance(dx - nx, dy - ny, nucleus_aspect, angle), nucleus_radius)
    chromatin = 0.8 + 0.4 * rng.random(cell.shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        spot_angle, spot_distance = rng.uniform(0, 2 * np.pi), nucleus_radius * rng.uniform(0, 0.5)
        sx, sy = nx + spot_distance * np.cos(spot_angle), ny + spot_distance * np.sin(spot_angle)
        spot_radius = nucleus_radius * rng.uniform(0.14, 0.2)
        nucleolus = soft_disc(np.sqrt((dx - sx) ** 2 + (dy - sy) ** 2), spot_radius)
        chromatin = chromatin * (1 - 0.6 * nucleolus)
    od = _tint(cell * (1 - nucleus), style.stain_od["blast_cytoplasm"])
    od = od + _tint(nucleus * chromatin, style.stain_od["blast_chromatin"])
    if auer_rod:
        # Centred in the crescent, tilted from the tangent, crossing onto the nucleus edge.
        middle = 0.55 * (radius + nucleus_radius - offset)
        rx, ry = -middle * np.cos(offset_angle), -middle * np.sin(offset_angle)
        tilt = offset_angle + np.pi / 2 + rng.uniform(-0.5, 0.5)
        tx, ty = np.cos(tilt), np.sin(tilt)
        along = np.clip((dx - rx) * tx + (dy - ry) * ty, -0.3 * radius, 0.3 * radius)
        gap = np.sqrt((dx - rx - along * tx) ** 2 + (dy - ry - along * ty) ** 2)
        rod = soft_disc(gap, 0.04 * radius + 0.15) * cell
        od = od * (1 - rod) + _tint(1.4 * rod, style.stain_od["auer_rod"])
    return _Stamp(od, x0, y0)


def _place_white_cells(rng: np.random.Generator, radii: list[float], size: int, tries: int = 24) -> np.ndarray:
    """Centres for cells of the given radii, inside the field and overlapping little if possible."""
    centres = np.zeros((len(radii), 2), dtype=np.float32)
    for index, radius in enumerate(radii):
        margin = min(0.7 * radius, size / 2 - 1)
        candidates = rng.uniform(margin, size - margin, size=(tries, 2)).astype(np.float32)
        if index == 0:
            centres[0] = candidates[0]
            continue
        gaps = np.linalg.norm(candidates[:, None] - centres[None, :index], axis=-1)
        slack = gaps - 0.9 * (radius + np.asarray(radii[:index], dtype=np.float32))[None, :]
        worst = slack.min(axis=1)
        fitting = np.flatnonzero(worst >= 0)
        centres[index] = candidates[fitting[0] if len(fitting) else int(np.argmax(worst))]
    return centres


def _red_cell_centres(
    rng: np.random.Generator,
    size: int,
    radius: float,
    white_centres: np.ndarray,
    white_radii: np.ndarray,
) -> np.ndarray:
    """A jittered hexagonal packing of red cells with gaps, cleared around the white cells."""
    spacing = 2.0 * radius * rng.uniform(1.0, 1.12)
    rows = np.arange(-1, int(size / (spacing * 0.866)) + 2)
    cols = np.arange(-1, int(size / spacing) + 2)
    grid_y, grid_x = np.meshgrid(rows * spacing * 0.866, cols * spacing, indexing="ij")
    grid_x = grid_x + (rows[:, None] % 2) * spacing / 2
    centres = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1) + rng.uniform(-spacing, spacing, 2)
    centres = centres + rng.normal(0, 0.22 * radius, size=centres.shape)
    keep = rng.random(len(centres)) > 0.12
    keep &= np.all((centres > -radius) & (centres < size + radius), axis=1)
    if len(white_centres):
        gaps = np.linalg.norm(centres[:, None] - white_centres[None], axis=-1)
        keep &= np.all(gaps > white_radii[None] + 0.6 * radius, axis=1)
    return centres[keep].astype(np.float32)


def render_smear(
    rng: np.random.Generator, image_size: int, style: SmearStyle, contents: SmearContents
) -> RenderedSmear:
    """Render one smear field.

    Args:
        rng: Random source (all randomness of the field comes from it).
        image_size: Side of the square image in pixels; cells scale with it.
        style: The acquiring site's style.
        contents: The blasts and atypical cells to draw; 0–2 normal white cells and the red
            cells are added whatever the contents.

    Returns:
        The image and the centres of its blasts and atypical cells.
    """
    scale = image_size / REFERENCE_SIZE * style.magnification
    normal_count = int(np.searchsorted(_NORMAL_COUNT_CUMULATIVE, rng.random(), side="right"))
    kinds = ["blast"] * contents.blasts + ["atypical"] * contents.atypical_cells
    for _ in range(normal_count):
        kinds.append("neutrophil" if rng.random() < NEUTROPHIL_FRACTION else "lymphocyte")
    radii = [_BASE_RADIUS[kind] * scale * float(rng.uniform(0.9, 1.1)) for kind in kinds]
    white_centres = _place_white_cells(rng, radii, image_size)
    red_radius = RED_CELL_RADIUS * scale
    red_centres = _red_cell_centres(rng, image_size, red_radius, white_centres, np.asarray(radii))

    # Red cells are centred up to one radius outside the field; white cells inside it.
    pad = int(np.ceil(max([2.3 * red_radius, *(0.5 * r for r in radii)]))) + 4
    side = image_size + 2 * pad
    red_density = draw_red_cells(rng, red_centres, red_radius, (side, side), pad)
    canvas = _tint(red_density, style.stain_od["red_cell"])
    for kind, radius, (cx, cy) in zip(kinds, radii, white_centres, strict=True):
        if kind == "blast":
            auer_rod = contents.auer_rods and rng.random() < AUER_ROD_PER_BLAST
            stamp = draw_blast(rng, style, (cx, cy), radius, auer_rod)
        elif kind == "atypical":
            stamp = draw_atypical_lymphoid_cell(rng, style, (cx, cy), radius)
        elif kind == "neutrophil":
            stamp = draw_neutrophil(rng, style, (cx, cy), radius)
        else:
            stamp = draw_lymphocyte(rng, style, (cx, cy), radius)
        height, width = stamp.od.shape[1:]
        y0, x0 = stamp.y0 + pad, stamp.x0 + pad
        canvas[:, y0 : y0 + height, x0 : x0 + width] += stamp.od
    od = canvas[:, pad : pad + image_size, pad : pad + image_size]
    od += _tint(0.7 + 0.6 * smooth_noise(rng, image_size, 5), style.stain_od["plasma"])
    image = style.background_light[:, None, None] * np.exp(-od)
    image = gaussian_blur(image, style.blur_sigma * image_size / REFERENCE_SIZE)
    # Uniform noise of the site's standard deviation: as good as Gaussian here, and cheaper.
    noise = rng.random(image.shape, dtype=np.float32) - 0.5
    image += noise * np.float32(style.noise_std * np.sqrt(12.0))
    pixels = np.clip(image.transpose(1, 2, 0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    points = list(zip(kinds, ((float(x), float(y)) for x, y in white_centres), strict=True))
    return RenderedSmear(
        image=pixels,
        blast_centres=tuple(point for kind, point in points if kind == "blast"),
        atypical_centres=tuple(point for kind, point in points if kind == "atypical"),
    )
