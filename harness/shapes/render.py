"""Procedural renderer of the shapes world: one coloured, textured shape on a background.

An image is fully determined by its `Scene` (the attributes a caption names) and a seed
(layout, exact tints, background pattern). Shapes are polygons drawn with PIL at four
times the output size and averaged down, so edges are anti-aliased. Textures are computed
on the output pixel grid, so stripes and dots stay a few pixels wide at 32x32.

Backgrounds vary in colour (any hue, light, mid or dark) and texture (plain, gradient,
grain, blotches) on purpose: a diffusion model's samples come out with tinted, grainy
backgrounds, and an oracle that saw only clean backgrounds misjudges them.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
STYLES = ("plain", "striped", "dotted", "checkered", "swirl")
# "any" means the caption does not mention the background, so any tone may be drawn.
BACKGROUND_TONES = ("light", "dark", "any")

# Base RGB of each colour in [0, 1]; renders jitter each channel by up to COLOUR_JITTER.
COLOUR_RGB = {
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.68, 0.20),
    "blue": (0.10, 0.30, 0.95),
    "purple": (0.58, 0.15, 0.80),
}
COLOUR_JITTER = 0.05
# Minimum RGB (Euclidean) distance between the shape colour and the background's mean colour.
MIN_BACKGROUND_DISTANCE = 0.45


@dataclass(frozen=True)
class Scene:
    """The attributes of one image, each one of the module's value tuples."""

    shape: str
    colour: str
    style: str
    background: str = "any"

    def __post_init__(self) -> None:
        for value, allowed, field_name in (
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOURS, "colour"),
            (self.style, STYLES, "style"),
            (self.background, BACKGROUND_TONES, "background"),
        ):
            if value not in allowed:
                raise ValueError(f"invalid {field_name} {value!r}; valid: {', '.join(allowed)}")


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw every attribute uniformly."""
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=COLOURS[rng.integers(len(COLOURS))],
        style=STYLES[rng.integers(len(STYLES))],
        background=BACKGROUND_TONES[rng.integers(len(BACKGROUND_TONES))],
    )


# -- shape outlines --------------------------------------------------------------------------


def _regular_polygon(points: int, phase: float) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(points) / points
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _outline(shape: str) -> np.ndarray:
    """Polygon vertices (N, 2) of a shape in unit coordinates, y pointing down, radius about 1."""
    if shape == "circle":
        return _regular_polygon(48, 0.0)
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        return _regular_polygon(3, -np.pi / 2) * 1.05 + np.array([0.0, 0.15])
    if shape == "star":
        outer = _regular_polygon(5, -np.pi / 2)
        inner = _regular_polygon(5, -np.pi / 2 + np.pi / 5) * 0.42
        vertices = np.empty((10, 2))
        vertices[0::2], vertices[1::2] = outer, inner
        return vertices * 1.05 + np.array([0.0, 0.08])
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, -y - 2.5], axis=1) / 16.5
    if shape == "cross":
        a, b = 0.3, 0.9  # half-width of an arm, half-length of the cross
        return np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a],
             [-b, a], [-b, -a], [-a, -a]]
        )
    raise ValueError(f"invalid shape {shape!r}; valid: {', '.join(SHAPES)}")


def _shape_mask(
    shape: str, centre: tuple[float, float], radius: float, angle: float
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of shape (IMAGE_SIZE, IMAGE_SIZE)."""
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    vertices = _outline(shape) @ rotation.T * radius + np.asarray(centre)
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon([tuple(v) for v in vertices * SUPERSAMPLE], fill=255)
    coverage = np.asarray(canvas, dtype=np.float32) / 255.0
    return coverage.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


# -- fill textures ---------------------------------------------------------------------------


def _texture(
    style: str, rng: np.random.Generator, centre: tuple[float, float]
) -> np.ndarray:
    """Share of the primary colour per pixel, in [0, 1]; the rest takes the secondary tone."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    if style == "plain":
        return np.ones((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    if style == "striped":
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi + rng.uniform(-0.15, 0.15)
        period = rng.uniform(4.5, 6.0)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
        return np.clip(wave * 2.5 + 0.5, 0, 1)
    if style == "dotted":
        period = rng.uniform(5.0, 6.0)
        dot_radius = rng.uniform(1.2, 1.6)
        ox, oy = rng.uniform(0, period, size=2)
        dx = (x - ox) % period - period / 2
        dy = (y - oy) % period - period / 2
        distance = np.sqrt(dx**2 + dy**2)
        return np.clip(distance - dot_radius + 0.5, 0, 1)
    if style == "checkered":
        cell = rng.uniform(5.0, 6.0)
        ox, oy = rng.uniform(0, 2 * cell, size=2)
        parity = (np.floor((x - ox) / cell) + np.floor((y - oy) / cell)) % 2
        return parity.astype(np.float32)
    if style == "swirl":
        arms = rng.integers(2, 4)
        twist = rng.uniform(0.45, 0.65) * rng.choice([-1.0, 1.0])
        dx, dy = x - centre[0], y - centre[1]
        theta = np.arctan2(dy, dx)
        radius = np.sqrt(dx**2 + dy**2)
        wave = np.sin(arms * theta + twist * radius + rng.uniform(0, 2 * np.pi))
        return np.clip(wave * 2.5 + 0.5, 0, 1)
    raise ValueError(f"invalid style {style!r}; valid: {', '.join(STYLES)}")


# -- backgrounds -----------------------------------------------------------------------------


def _background_base(tone: str, rng: np.random.Generator) -> np.ndarray:
    if tone == "any":
        tone = ("light", "mid", "dark")[rng.integers(3)]
    hue = rng.uniform()
    if tone == "light":
        saturation, value = rng.uniform(0.0, 0.35), rng.uniform(0.78, 1.0)
    elif tone == "dark":
        saturation, value = rng.uniform(0.0, 0.6), rng.uniform(0.04, 0.32)
    else:
        saturation, value = rng.uniform(0.0, 0.5), rng.uniform(0.38, 0.72)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32)


def _background(
    tone: str, avoid: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw an (H, W, 3) background whose base colour is far from `avoid` (the shape colour)."""
    base = _background_base(tone, rng)
    for _ in range(100):
        if np.linalg.norm(base - avoid) >= MIN_BACKGROUND_DISTANCE:
            break
        base = _background_base(tone, rng)
    image = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()

    kind = rng.integers(4)
    if kind == 1:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE - 0.5
        ramp = (x * np.cos(angle) + y * np.sin(angle))[..., None]
        image = image + ramp * rng.uniform(-0.25, 0.25, size=3)
    elif kind == 2:  # blotches: smooth low-frequency colour noise
        coarse = rng.normal(0, rng.uniform(0.04, 0.12), size=(4, 4, 3)).astype(np.float32)
        smooth = Image.fromarray(((coarse + 0.5) * 255).clip(0, 255).astype(np.uint8))
        smooth = smooth.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        image = image + np.asarray(smooth, np.float32) / 255.0 - 0.5
    if kind == 3 or rng.uniform() < 0.3:  # grain, alone or on top of the others
        image = image + rng.normal(0, rng.uniform(0.01, 0.06), size=image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


# -- the whole image -------------------------------------------------------------------------


def render(scene: Scene, seed: int) -> np.ndarray:
    """Render a scene as float32 RGB of shape (IMAGE_SIZE, IMAGE_SIZE, 3) in [0, 1].

    The same scene and seed always give the same array.
    """
    rng = np.random.default_rng(seed)
    radius = rng.uniform(8.0, 11.5)
    margin = radius * 0.95
    centre = (
        float(rng.uniform(margin, IMAGE_SIZE - margin)),
        float(rng.uniform(margin, IMAGE_SIZE - margin)),
    )
    angle = rng.uniform(-0.2, 0.2)

    primary = np.clip(
        np.array(COLOUR_RGB[scene.colour]) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 1
    ).astype(np.float32)
    background = _background(scene.background, primary, rng)
    # The pattern's second tone contrasts with the background, so the outline stays visible.
    if background.mean() < 0.5:
        secondary = primary * 0.35 + 0.65
    else:
        secondary = primary * 0.3
    share = _texture(scene.style, rng, centre)[..., None]
    fill = share * primary + (1 - share) * secondary

    coverage = _shape_mask(scene.shape, centre, radius, angle)[..., None]
    return (coverage * fill + (1 - coverage) * background).astype(np.float32)


def render_batch(scenes: list[Scene], seeds: list[int]) -> np.ndarray:
    """Render scenes as (B, 3, H, W) float32 in [0, 1], the layout torch models take."""
    images = [render(scene, seed) for scene, seed in zip(scenes, seeds, strict=True)]
    return np.stack(images).transpose(0, 3, 1, 2).copy()
