"""Procedural toy scenes: flat-coloured shapes on a flat background, with their captions.

The toy world is small enough that a text-to-image model and a CLIP trained on it fit on a CPU, yet rich
enough to show each method's effect: colour and shape binding, several objects, held-out shapes that base
training never sees (star, heart, ring) and that personalisation methods must learn from a few images.

A scene is a pure function of (seed, index): `make_scene(i, seed)` gives the same picture and caption on
every machine. Shapes are drawn as signed-distance masks at 4x resolution and box-filtered down, so edges
are anti-aliased and nothing depends on a drawing library.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

BASE_SHAPES = ("circle", "square", "triangle", "cross", "diamond")
HELD_OUT_SHAPES = ("star", "heart", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (240, 220, 40),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SIZES = {"small": 0.2, "large": 0.34}  # radius as a fraction of the image side
POSITIONS = {  # centre (x, y) in [0, 1], y down; "center" is written without a phrase in short captions
    "center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7),
}
POSITION_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}
IMAGE_SIZE = 32
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One object: shape name, colour name, size name, centre (x, y) in [0, 1] and radius fraction."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]
    radius: float
    position: str = "center"


@dataclass(frozen=True)
class Scene:
    """Objects drawn in order on a background colour; `caption` is the full caption (see `caption_of`)."""

    objects: tuple[ShapeSpec, ...]
    background: str
    caption: str = field(default="")


# ------------------------------------------------------------------------------------------------ shape masks


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` of unit radius at the origin; x, y: coordinate grids (y down)."""
    r = np.hypot(x, y)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    if shape == "triangle":  # apex up, equilateral, inscribed in the unit circle
        return (y <= 0.5) & (np.sqrt(3) * x - y <= 1.0) & (-np.sqrt(3) * x - y <= 1.0)
    if shape == "cross":
        return ((np.abs(x) <= 0.3) & (np.abs(y) <= 1.0)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 1.0))
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "heart":  # two round lobes on top of a downward point (y down)
        lobes = (np.hypot(x - 0.45, y + 0.35) <= 0.5) | (np.hypot(x + 0.45, y + 0.35) <= 0.5)
        point = (y >= -0.35) & (y <= 0.95) & (np.abs(x) <= 0.93 * (0.95 - y) / 1.3)
        return lobes | point
    if shape == "star":  # five points, inner radius 0.45
        theta = np.arctan2(x, -y)  # 0 at the top
        sector = 2 * np.pi / 5
        a = np.mod(theta, sector) - sector / 2
        # distance of the star edge from the centre at angle a within one point's sector
        inner, outer = 0.45, 1.0
        tip = np.array([0.0, outer])
        valley = np.array([inner * np.sin(sector / 2), inner * np.cos(sector / 2)])
        px, py = r * np.sin(np.abs(a)), r * np.cos(np.abs(a))
        # inside when on the centre's side of the tip-valley line
        ex, ey = valley - tip
        cross = ex * (py - tip[1]) - ey * (px - tip[0])
        return cross <= 0
    raise ValueError(f"unknown shape '{shape}'; shapes: {', '.join(BASE_SHAPES + HELD_OUT_SHAPES)}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `scene` as a size x size RGB image (anti-aliased by 4x supersampling)."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    gx, gy = np.meshgrid(coords, coords)
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = COLORS[scene.background]
    for obj in scene.objects:
        cx, cy = obj.center
        mask = _inside(obj.shape, (gx - cx) / obj.radius, (gy - cy) / obj.radius)
        canvas[mask] = COLORS[obj.color]
    small = canvas.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def object_phrase(obj: ShapeSpec, with_size: bool = False) -> str:
    """'red circle' or 'small red circle'."""
    return f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"


def caption_of(objects: tuple[ShapeSpec, ...], background: str, *, with_size: bool = False,
               with_position: bool = False) -> str:
    """'a red circle on a blue background'; two objects: 'a red circle and a green square on a ...' (left first).

    `with_size` adds 'small'/'large'; `with_position` adds where a single object sits ('on the left').
    """
    phrases = " and ".join(_article(object_phrase(o, with_size)) for o in objects)
    where = ""
    if with_position and len(objects) == 1 and objects[0].position != "center":
        where = f" {POSITION_PHRASES[objects[0].position]}"
    return f"{phrases}{where} on {_article(background)} background"


def caption_variants(scene: Scene) -> list[str]:
    """Every caption that describes `scene` truthfully: with or without size, with or without position."""
    out = []
    for with_size in (False, True):
        for with_position in (False, True):
            c = caption_of(scene.objects, scene.background, with_size=with_size, with_position=with_position)
            if c not in out:
                out.append(c)
    return out


# ------------------------------------------------------------------------------------------------------ sampling


def _object(rng: np.random.Generator, shapes: tuple[str, ...], color: str, position: str, size: str) -> ShapeSpec:
    cx, cy = POSITIONS[position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    return ShapeSpec(rng.choice(shapes).item(), color, size, (cx + jitter[0], cy + jitter[1]), SIZES[size], position)


def sample_scene(rng: np.random.Generator, shapes: tuple[str, ...] = BASE_SHAPES, two_object_prob: float = 0.25) -> Scene:
    """A random scene from `rng`: one object (any size and position) or two small ones (left and right)."""
    colors = list(COLORS)
    background = colors[rng.integers(len(colors))]
    others = [c for c in colors if c != background]
    if rng.random() < two_object_prob:
        c1, c2 = rng.choice(others, size=2, replace=False).tolist()
        objs = (_object(rng, shapes, c1, "left", "small"), _object(rng, shapes, c2, "right", "small"))
    else:
        color = others[rng.integers(len(others))]
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        size = "small" if position != "center" else list(SIZES)[rng.integers(len(SIZES))]
        objs = (_object(rng, shapes, color, position, size),)
    return Scene(objs, background, caption_of(objs, background, with_size=True, with_position=True))


def make_scene(index: int, seed: int = 0, shapes: tuple[str, ...] = BASE_SHAPES,
               two_object_prob: float = 0.25) -> Scene:
    """Scene number `index` of the dataset with `seed`: a pure function of its arguments."""
    return sample_scene(np.random.default_rng([seed, index]), shapes, two_object_prob)


def single_object_scene(shape: str, color: str, background: str, *, size: str = "large",
                        position: str = "center") -> Scene:
    """The canonical scene of one object (no jitter): references, prompts and tests use it."""
    cx, cy = POSITIONS[position]
    obj = ShapeSpec(shape, color, size, (cx, cy), SIZES[size], position)
    return Scene((obj,), background, caption_of((obj,), background, with_size=True, with_position=True))


def train_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One truthful caption of `scene`, picked at random (size and position words appear half the time)."""
    variants = caption_variants(scene)
    return variants[rng.integers(len(variants))]
