"""Rendering of frontal chest-radiograph-like images for the synthetic CXR generator.

Everything is an analytic function of the pixel grid, evaluated with numpy on whole ``S×S``
arrays, so one image costs a fixed number of array operations whatever its content. The image
is built as X-ray *attenuation* ``A`` (0 for air outside the body), turned into brightness with
``1 − exp(−exposure·A)`` (dense is bright, as on film), then given the site's look.

Coordinates: the patient lives in a unit square, ``u`` across the image (left to right) and
``v`` down. The radiological convention holds: the patient's **right** is on the image's
**left**. Inside each half of the chest, ``t`` is the distance from the midline, positive
towards that side's chest wall. A site's field of view and offset map pixels to ``(u, v)``, so
anatomy, findings and masks all move together.

Anatomy (unit-square sizes): soft tissue of the trunk and shoulders; two lungs with a rounded
apex (``v ≈ 0.13``), straight lateral walls (``|t| ≈ 0.36``) and diaphragm domes that meet the
walls in sharp costophrenic angles (``v ≈ 0.8``, the right dome higher); mediastinum, spine with
vertebral end plates, trachea, aortic knob, the cardiac silhouette (an ellipse shifted to the
patient's left, its width ``ctr × thoracic width``), clavicles, posterior and faint anterior
ribs, the gastric bubble under the left dome and radiating vascular lung markings.

Findings (:data:`FINDINGS`), each a :class:`FindingSpec` whose ``extent`` means:

* ``Cardiomegaly``: the cardiothoracic ratio (> 0.5); its mask is the cardiac silhouette.
* ``Pleural Effusion``: fluid height above the costophrenic angle; fluid fills the lung base up
  to a meniscus that climbs the lateral wall, hiding the angle and the dome (``side`` right,
  left or bilateral).
* ``Consolidation``: the radius of an irregular opacity centred in a lung zone (``zone``
  upper / middle / lower, ``side`` right or left).
* ``Pneumothorax``: the fraction by which the lung collapses towards its medial base; the rim
  between chest wall and the bright visceral pleural line is lucent and has no lung markings.
* ``Edema``: the spread of a bilateral perihilar ("batwing") haze with prominent vessels.

``lesion_mask`` holds index + 1 of the finding in :data:`FINDINGS` (0 background). Where
findings overlap, the one with the **smaller** whole region wins (regions are painted largest
first), so a small lesion inside a large one stays visible; a finding is hidden only where the
union of smaller ones covers all of it. Each box is tight around its finding's own whole region
(:attr:`RenderedCxr.finding_masks`), which may include pixels another finding won.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedvlm.tasks.cxr.raster import GAMMA_LEVELS, blur, clip01, gamma_table, ramp, smooth_noise, unit_grid

FINDINGS = ("Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumothorax")
"""Drawable findings, spelled as in CheXpert; ``lesion_mask`` value = index + 1."""
SIDES = ("right", "left", "bilateral")
ZONES = ("upper", "middle", "lower")
ZONE_CENTRE_V = {"upper": (0.2, 0.3), "middle": (0.38, 0.48), "lower": (0.54, 0.62)}
"""Range of a consolidation's centre height ``v`` in each lung zone."""
REFERENCE_SIZE = 64
"""Image side at which blur and marker sizes are given; they scale with the image."""
SITE_STYLE_SEED = 20250301
"""Site appearance is a property of the site, not of the generator seed."""

_GLYPHS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}
_MARKER_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class CxrAnatomy:
    """One patient's body habitus and positioning (drawn per study by :func:`sample_anatomy`).

    Attributes:
        centre_x: Midline ``u``.
        half_width: Lateral lung wall distance from the midline (right, left).
        apex_v: Height of the lung apices.
        dome_v: Height of the top of the right and left diaphragm domes.
        dome_depth: How far below the dome top the costophrenic angles lie.
        ctr: Cardiothoracic ratio (heart width / internal thoracic width).
        air: How much the lungs' air lowers attenuation (depth of inspiration).
        rib_phase: Vertical phase of the rib pattern (fraction of a rib spacing).
        rib_spacing: Vertical distance between posterior ribs.
        markings: Strength of the vascular lung markings.
    """

    centre_x: float
    half_width: tuple[float, float]
    apex_v: float
    dome_v: tuple[float, float]
    dome_depth: float
    ctr: float
    air: float
    rib_phase: float
    rib_spacing: float
    markings: float

    @property
    def thoracic_width(self) -> float:
        """Internal thoracic width: lateral wall to lateral wall at the widest level."""
        return self.half_width[0] + self.half_width[1] + 2 * _WALL_FLARE


_WALL_FLARE = 0.02
"""How much the lateral lung walls widen from mid-chest to the costophrenic angles."""


def sample_anatomy(rng: np.random.Generator, ctr: float | None = None) -> CxrAnatomy:
    """Draw a normal habitus; ``ctr`` overrides the normal cardiothoracic ratio (0.4–0.5)."""
    width = rng.uniform(0.33, 0.375)
    return CxrAnatomy(
        centre_x=float(0.5 + rng.uniform(-0.015, 0.015)),
        half_width=(float(width + rng.uniform(-0.01, 0.01)), float(width + rng.uniform(-0.01, 0.01))),
        apex_v=float(rng.uniform(0.11, 0.15)),
        dome_v=(float(rng.uniform(0.63, 0.68)), float(rng.uniform(0.66, 0.71))),
        dome_depth=float(rng.uniform(0.1, 0.14)),
        ctr=float(rng.uniform(0.4, 0.5) if ctr is None else ctr),
        air=float(rng.uniform(0.62, 0.75)),
        rib_phase=float(rng.random()),
        rib_spacing=float(rng.uniform(0.064, 0.074)),
        markings=float(rng.uniform(0.7, 1.2)),
    )


@dataclass(frozen=True)
class FindingSpec:
    """One finding to draw (see the module docstring for what ``extent`` means per label).

    Attributes:
        label: An entry of :data:`FINDINGS`.
        severity: 0 mild / small, 1 moderate, 2 severe / large.
        extent: Size of the finding (label-specific).
        intensity: Opacity (or lucency) strength, about 0.5–1.
        side: ``"right"``, ``"left"``, ``"bilateral"`` or ``None`` (cardiomegaly).
        zone: ``"upper"``, ``"middle"``, ``"lower"`` (consolidation), else ``None``.
        centre: ``(t, v)`` of a consolidation's centre, else ``None``.
        texture_seed: Seed of the finding's own texture, so that adding a finding never changes
            the random stream of the rest of the image.
    """

    label: str
    severity: int
    extent: float
    intensity: float = 1.0
    side: str | None = None
    zone: str | None = None
    centre: tuple[float, float] | None = None
    texture_seed: int = 0


@dataclass(frozen=True, eq=False)
class CxrStyle:
    """How one site acquires and processes its radiographs.

    Attributes:
        field_of_view: Unit-square span of the image (> 1 zooms out).
        offset: ``(du, dv)`` shift of the field of view.
        exposure: Attenuation scale (low: under-penetrated, darker film).
        black_level: Brightness mapped to 0 (window lower bound).
        white_level: Brightness mapped to 255 (window upper bound).
        gamma: Display gamma applied after windowing.
        blur_sigma: Gaussian blur in pixels of a 64 px image.
        noise_std: Per-pixel quantum noise as a fraction of full scale.
        marker: Burned-in side marker letter (``"L"``/``"R"``) or ``None``.
        marker_corner: One of ``top-left``, ``top-right``, ``bottom-left``, ``bottom-right``.
    """

    field_of_view: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)
    exposure: float = 1.5
    black_level: float = 0.02
    white_level: float = 0.95
    gamma: float = 1.0
    blur_sigma: float = 0.6
    noise_std: float = 0.02
    marker: str | None = None
    marker_corner: str = "top-right"


def site_styles(num_sites: int, strength: float = 1.0, seed: int = SITE_STYLE_SEED) -> list[CxrStyle]:
    """One :class:`CxrStyle` per site, drawn once from ``seed``.

    Every continuous parameter is ``reference + strength × (site draw − reference)``, so
    ``strength=0`` gives every site the reference :class:`CxrStyle` (and no marker).

    Args:
        num_sites: How many sites.
        strength: Style-shift strength in ``[0, 1]``.
        seed: Seed of the site appearance (fixed by default so a site always looks the same).

    Returns:
        ``num_sites`` styles, site ``k`` at index ``k``.
    """
    rng = np.random.default_rng(seed)
    reference = CxrStyle()
    styles = []
    for _ in range(num_sites):
        drawn = CxrStyle(
            field_of_view=float(rng.uniform(0.94, 1.14)),
            offset=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.04))),
            exposure=float(rng.uniform(1.15, 1.9)),
            black_level=float(rng.uniform(0.0, 0.12)),
            white_level=float(rng.uniform(0.85, 1.0)),
            gamma=float(np.exp(rng.uniform(-0.35, 0.35))),
            blur_sigma=float(rng.uniform(0.3, 1.2)),
            noise_std=float(rng.uniform(0.008, 0.05)),
            marker=str(rng.choice(["L", "R"])) if rng.random() < 0.6 else None,
            marker_corner=str(rng.choice(_MARKER_CORNERS)),
        )

        def mix(name: str, drawn: CxrStyle = drawn) -> float:
            base, value = getattr(reference, name), getattr(drawn, name)
            return float(base + strength * (value - base))

        styles.append(
            CxrStyle(
                field_of_view=mix("field_of_view"),
                offset=(strength * drawn.offset[0], strength * drawn.offset[1]),
                exposure=mix("exposure"),
                black_level=mix("black_level"),
                white_level=mix("white_level"),
                gamma=float(np.exp(strength * np.log(drawn.gamma))),
                blur_sigma=mix("blur_sigma"),
                noise_std=mix("noise_std"),
                marker=drawn.marker if strength > 0 else None,
                marker_corner=drawn.marker_corner,
            )
        )
    return styles


@dataclass(frozen=True, eq=False)
class RenderedCxr:
    """A rendered radiograph and where its findings are.

    Attributes:
        image: ``H×W`` ``uint8`` image.
        lesion_mask: ``H×W`` ``uint8``: index + 1 in :data:`FINDINGS`, 0 background.
        finding_masks: Each drawn finding's whole region (boolean ``H×W``), by label.
        lung_mask: Where the (uncollapsed) lung fields are, boolean ``H×W``.
    """

    image: np.ndarray
    lesion_mask: np.ndarray
    finding_masks: dict[str, np.ndarray]
    lung_mask: np.ndarray


def _lung(t: np.ndarray, v: np.ndarray, anatomy: CxrAnatomy, side: int) -> np.ndarray:
    """Soft mask of one lung (``side`` 0 right, 1 left) at half-chest coordinates ``(t, v)``."""
    width, apex, dome_top = anatomy.half_width[side], anatomy.apex_v, anatomy.dome_v[side]
    t_apex, t_medial = 0.21 * width / 0.355, 0.05 + 0.02 * side  # the heart pushes the left lung out
    below_apex = np.maximum(v - apex, 0.0)
    lateral = t_apex + (width - t_apex) * np.sqrt(np.minimum(below_apex / 0.3, 1.0))
    lateral += _WALL_FLARE * clip01((v - 0.45) / 0.35)
    medial = t_apex - (t_apex - t_medial) * np.sqrt(np.minimum(below_apex / 0.16, 1.0))
    t_peak = 0.5 * width
    across = (t - t_peak) / (width - t_peak)
    dome = dome_top + anatomy.dome_depth * np.where(across > 0, across**2, 0.3 * across**2)
    return ramp(t - medial) * ramp(lateral - t) * ramp(v - apex) * ramp(dome - v)


def _segment_distance(u: np.ndarray, v: np.ndarray, start: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    """Distance from each ``(u, v)`` to the segment ``start``–``end``."""
    du, dv = end[0] - start[0], end[1] - start[1]
    along = clip01(((u - start[0]) * du + (v - start[1]) * dv) / (du * du + dv * dv))
    return np.sqrt((u - start[0] - along * du) ** 2 + (v - start[1] - along * dv) ** 2)


def _heart(u: np.ndarray, v: np.ndarray, anatomy: CxrAnatomy) -> np.ndarray:
    """Soft mask of the cardiac silhouette, cut off at the diaphragm."""
    half_width = 0.5 * anatomy.ctr * anatomy.thoracic_width
    centre_u = anatomy.centre_x + 0.28 * half_width  # two thirds of the heart lie left of the midline
    centre_v = anatomy.dome_v[1] - 0.07
    height = 0.12 + 0.3 * half_width
    radius = np.sqrt(((u - centre_u) / half_width) ** 2 + ((v - centre_v) / height) ** 2)
    return ramp((1.0 - radius) * half_width) * ramp(anatomy.dome_v[1] + 0.05 - v)


def _ribs(t: np.ndarray, v: np.ndarray, anatomy: CxrAnatomy) -> np.ndarray:
    """Posterior ribs (arched bands with bright cortical edges) and faint anterior ribs."""
    lateral = np.abs(t) / 0.36
    posterior = (v + 0.06 * lateral - 0.2 * lateral**2) / anatomy.rib_spacing + anatomy.rib_phase
    phase = posterior - np.floor(posterior)
    band = ramp(0.17 - np.abs(phase - 0.25), 0.06)
    cortex = np.maximum(1.0 - np.abs(np.abs(phase - 0.25) - 0.17) * 20.0, 0.0)
    anterior = (v + 0.1 * lateral**2 - 0.24 * lateral) / (1.4 * anatomy.rib_spacing) + 0.37
    front = ramp(0.13 - np.abs(anterior - np.floor(anterior) - 0.5), 0.08)
    within = ramp(v - anatomy.apex_v + 0.04, 0.02) * ramp(0.8 - v, 0.06) * ramp(0.4 - np.abs(t), 0.01)
    fading = 1.0 - 0.5 * clip01((v - 0.3) / 0.4)
    return within * fading * (0.06 * band + 0.05 * cortex + 0.03 * front)


def _clavicles(u: np.ndarray, v: np.ndarray, anatomy: CxrAnatomy) -> np.ndarray:
    """Both clavicles: bright bars from the sternal notch up and out to the shoulders."""
    centre, top = anatomy.centre_x, anatomy.apex_v
    total = np.zeros_like(u)
    for sign in (-1.0, 1.0):
        start, end = (centre + sign * 0.04, top + 0.07), (centre + sign * 0.34, top - 0.025)
        distance = _segment_distance(u, v, start, end)
        along = clip01((u - start[0]) / (end[0] - start[0]))
        total = np.maximum(total, ramp(0.014 + 0.006 * along - distance, 0.005))
    return total


def _body(u: np.ndarray, v: np.ndarray, anatomy: CxrAnatomy) -> np.ndarray:
    """Soft-tissue thickness of trunk, neck and shoulders (0 in the air around the patient)."""
    across = np.abs(u - anatomy.centre_x)
    trunk = max(anatomy.half_width) + 0.06 - 0.03 * clip01((v - 0.75) / 0.25)
    half = trunk + 0.07 * clip01((0.32 - v) / 0.15)
    shoulder_top = 0.02 + 0.16 * clip01((across - 0.08) / 0.4) ** 1.5
    inside = ramp(half - across, 0.01) * ramp(v - shoulder_top, 0.015)
    arms = ramp(np.abs(across - half - 0.13) * -1.0 + 0.1, 0.01) * ramp(v - shoulder_top - 0.02, 0.02)
    return inside * (0.8 + 0.2 * clip01(1.0 - (across / half) ** 2)) + 0.75 * arms


@functools.lru_cache(maxsize=16)
def _hilar_polar_grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angle, radius and radial fall-off about the two hila of a reference (unjittered) chest."""
    grid = unit_grid(size)
    across, down = np.abs(grid[None, :] - 0.5) - 0.1, grid[:, None] - 0.45
    radius = np.sqrt(across * across + down * down)
    return np.arctan2(down, across).astype(np.float32), radius, np.exp(-5.0 * radius)


def _markings(rng: np.random.Generator, size: int) -> np.ndarray:
    """Vessels radiating from the hila: angular streaks fading towards the periphery.

    Drawn about the hila of a reference chest: the few pixels by which a study's positioning
    moves the real hila do not show in a texture this fine.
    """
    angle, radius, fall_off = _hilar_polar_grid(size)
    texture = smooth_noise(rng, size, 10)
    wobble = smooth_noise(rng, size, 7) * 9.0
    streaks = (np.cos(angle * 17.0 + wobble + radius * 14.0) * 0.5 + 0.5) * texture
    return 1.5 * streaks * streaks * streaks * fall_off + 0.3 * texture


def _finding_region(
    label: str, spec: FindingSpec, u: np.ndarray, v: np.ndarray, anatomy: CxrAnatomy, lungs: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation change of one finding and its soft region (mask = region > 0.5)."""
    size = u.shape[1]
    halves = (anatomy.centre_x - u, u - anatomy.centre_x)
    sides = (0, 1) if spec.side in ("bilateral", None) else (SIDES.index(str(spec.side)),)
    texture = np.random.default_rng(spec.texture_seed)
    change = np.zeros((size, size), dtype=np.float32)
    region = np.zeros((size, size), dtype=np.float32)
    if label == "Pleural Effusion":
        for side in sides:
            t, width = halves[side], anatomy.half_width[side]
            across = clip01((t - 0.05) / (width - 0.05))
            level = anatomy.dome_v[side] + anatomy.dome_depth - spec.extent
            meniscus = level + 0.6 * spec.extent * (1.0 - across) ** 2
            fluid = lungs[side] * ramp(v - meniscus, 0.008)
            layered = 0.75 + 0.25 * clip01((v - meniscus) / 0.05)
            change += fluid * layered * anatomy.air * 0.9 * spec.intensity
            region = np.maximum(region, fluid)
    elif label == "Consolidation":
        assert spec.centre is not None
        side = sides[0]
        centre_t, centre_v = spec.centre
        distance = np.sqrt(((halves[side] - centre_t) / 1.15) ** 2 + (v - centre_v) ** 2)
        edge = 1.0 - distance / spec.extent + 0.7 * (smooth_noise(texture, size, 9) - 0.5)
        blob = lungs[side] * clip01(edge * 3.0)
        mottled = 0.75 + 0.5 * smooth_noise(texture, size, 20)
        change += blob * mottled * anatomy.air * 0.75 * spec.intensity
        region = blob
    elif label == "Edema":
        for side in sides:
            dt, dv = (halves[side] - 0.11) / spec.extent, (v - 0.46) / (0.85 * spec.extent)
            haze = np.exp(-(dt * dt + dv * dv)) * lungs[side]
            patchy = 0.7 + 0.6 * smooth_noise(texture, size, 12)
            change += haze * patchy * anatomy.air * 0.4 * spec.intensity
            region = np.maximum(region, haze * 1.4)
    elif label == "Pneumothorax":
        side = sides[0]
        t = halves[side]
        anchor_t, anchor_v = 0.08, anatomy.dome_v[side]
        shrink = 1.0 - spec.extent
        t_lung = anchor_t + (t - anchor_t) / shrink
        v_lung = np.where(v < anchor_v, anchor_v + (v - anchor_v) / shrink, v)
        collapsed = _lung(t_lung, v_lung, anatomy, side)
        rim = clip01(lungs[side] - collapsed)
        pleural_line = 4.0 * collapsed * (1.0 - collapsed) * lungs[side]
        change += -0.3 * anatomy.air * rim * spec.intensity + 0.25 * pleural_line + 0.05 * collapsed * spec.severity
        region = rim
    elif label == "Cardiomegaly":
        region = _heart(u, v, anatomy)
    else:
        raise ValueError(f"unknown finding {label!r}; drawable findings: {', '.join(FINDINGS)}")
    return change, region


def _burn_marker(image: np.ndarray, letter: str, corner: str) -> None:
    """Burn a bright side-marker letter with a dark frame into a corner of a ``uint8`` image."""
    size = image.shape[0]
    scale = max(1, round(size / REFERENCE_SIZE))
    glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[letter]], dtype=bool)
    glyph = np.kron(glyph, np.ones((scale, scale), dtype=bool))
    height, width = glyph.shape
    margin = 2 * scale
    y0 = margin if corner.startswith("top") else size - margin - height
    x0 = margin if corner.endswith("left") else size - margin - width
    box = image[y0 - scale : y0 + height + scale, x0 - scale : x0 + width + scale]
    box[...] = 12
    image[y0 : y0 + height, x0 : x0 + width][glyph] = 250


def render_cxr(
    rng: np.random.Generator,
    image_size: int,
    anatomy: CxrAnatomy,
    findings: tuple[FindingSpec, ...],
    style: CxrStyle,
    jitter: tuple[float, float, float] = (0.0, 0.0, 0.0),
    leads: tuple[tuple[float, float], ...] = (),
) -> RenderedCxr:
    """Render one frontal radiograph.

    The random stream is used in the same way whatever the findings (they draw their textures
    from their own ``texture_seed``), so the same ``rng`` state with and without a finding
    gives images that differ only by the finding.

    Args:
        rng: Random source of markings and noise.
        image_size: Side of the square image in pixels.
        anatomy: The patient's habitus; a ``Cardiomegaly`` finding's ``extent`` replaces its
            ``ctr``.
        findings: What to draw (at most one per label).
        style: The acquiring site's look.
        jitter: Per-study positioning ``(zoom factor − 1, du, dv)`` on top of the style's.
        leads: ``(u, v)`` positions of ECG monitoring electrodes (bright rings) to draw.

    Returns:
        The image, the lesion mask and each finding's region.
    """
    by_label = {spec.label: spec for spec in findings}
    if "Cardiomegaly" in by_label:
        anatomy = _with_ctr(anatomy, by_label["Cardiomegaly"].extent)
    grid = unit_grid(image_size)
    fov = style.field_of_view * (1.0 + jitter[0])
    u_axis = 0.5 + (grid - 0.5) * fov + style.offset[0] + jitter[1]
    v_axis = 0.5 + (grid - 0.5) * fov + style.offset[1] + jitter[2]
    # A row and a column: whatever depends on one coordinate only stays one-dimensional.
    u, v = u_axis[None, :], v_axis[:, None]
    halves = (anatomy.centre_x - u, u - anatomy.centre_x)
    lungs = tuple(_lung(halves[side], v, anatomy, side) for side in (0, 1))
    heart = _heart(u, v, anatomy)
    across = np.abs(u - anatomy.centre_x)

    attenuation = _body(u, v, anatomy)
    spine = ramp(0.03 - across, 0.008) * (0.75 + 0.25 * np.cos(v * (2 * np.pi / 0.05)) ** 8)
    mediastinum = ramp(0.06 + 0.04 * clip01((v - 0.2) / 0.2) - across, 0.01) * ramp(v - 0.05, 0.02)
    knob = ramp(0.035 - np.hypot(u - anatomy.centre_x - 0.055, v - anatomy.apex_v - 0.2), 0.008)
    trachea = ramp(0.016 - across, 0.004) * ramp(anatomy.apex_v + 0.2 - v, 0.01)
    bubble_v = anatomy.dome_v[1] + 0.06
    bubble = ramp(1.0 - np.hypot((u - anatomy.centre_x - 0.17) / 0.055, (v - bubble_v) / 0.03), 0.15)
    air_space = clip01(lungs[0] + lungs[1]) * (1.0 - heart) * (1.0 - knob)
    markings = _markings(rng, image_size)
    if "Pneumothorax" in by_label:  # no lung markings peripheral to the pleural line
        ptx = by_label["Pneumothorax"]
        _, rim = _finding_region("Pneumothorax", ptx, u, v, anatomy, lungs)
        markings = markings * (1.0 - rim)
    if "Edema" in by_label:  # engorged, indistinct vessels
        markings = markings * (1.0 + 0.4 * by_label["Edema"].intensity)
    hila = sum(ramp(0.04 - np.hypot(halves[side] - 0.1, (v - 0.44 - 0.02 * side) / 1.6), 0.025) for side in (0, 1))
    basal = clip01((v - 0.3) / 0.45)  # more overlying soft tissue towards the bases
    attenuation = attenuation + 0.3 * np.maximum(np.maximum(mediastinum, heart), knob) + 0.2 * spine
    attenuation = attenuation - anatomy.air * air_space * (1.0 - 0.25 * basal) - 0.25 * trachea - 0.4 * bubble
    attenuation = attenuation + (0.25 * anatomy.markings * markings + 0.18 * hila) * air_space
    attenuation = attenuation + _ribs(np.where(u < anatomy.centre_x, -1.0, 1.0) * across, v, anatomy)
    attenuation = attenuation + 0.2 * _clavicles(u, v, anatomy)
    for lead_u, lead_v in leads:
        distance = np.hypot(u - lead_u, v - lead_v)
        attenuation = attenuation + 0.6 * ramp(0.017 - distance, 0.004) * ramp(distance - 0.007, 0.004)

    finding_masks: dict[str, np.ndarray] = {}
    for label in FINDINGS:
        if label in by_label:
            change, region = _finding_region(label, by_label[label], u, v, anatomy, lungs)
            attenuation = attenuation + change
            finding_masks[label] = region > 0.5
    lesion_mask = np.zeros((image_size, image_size), dtype=np.uint8)
    # Largest region first, so that a smaller finding inside a larger one stays visible.
    for label in sorted(finding_masks, key=lambda name: -int(finding_masks[name].sum())):
        lesion_mask[finding_masks[label]] = FINDINGS.index(label) + 1

    brightness = 1.0 - np.exp(-style.exposure * np.maximum(attenuation, 0.0))
    brightness = blur(brightness.astype(np.float32), style.blur_sigma * image_size / REFERENCE_SIZE)
    # Uniform noise of the site's standard deviation: as good as Gaussian here, and cheaper.
    brightness += (rng.random(brightness.shape, dtype=np.float32) - 0.5) * np.float32(style.noise_std * np.sqrt(12.0))
    window = (brightness - style.black_level) * (1.0 / (style.white_level - style.black_level))
    levels = (clip01(window) * (GAMMA_LEVELS - 1) + 0.5).astype(np.intp)
    image = gamma_table(round(style.gamma, 3))[levels]
    if style.marker is not None:
        _burn_marker(image, style.marker, style.marker_corner)
    lung_mask = (lungs[0] > 0.5) | (lungs[1] > 0.5)
    return RenderedCxr(image=image, lesion_mask=lesion_mask, finding_masks=finding_masks, lung_mask=lung_mask)


def _with_ctr(anatomy: CxrAnatomy, ctr: float) -> CxrAnatomy:
    return CxrAnatomy(**{**anatomy.__dict__, "ctr": ctr})
