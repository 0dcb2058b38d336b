"""Toy multi-image sets: one object identity (shape + colour) seen in several pictures, with exact masks.

Multi-image personalisation methods (SynCD's tuples, reference-image samplers) need several views of the same
object and its foreground mask. In the toy world an identity is a (shape, colour) pair; its views vary the
background, the size and the position, and the scene generator gives the object's mask exactly (the same
supersampled shape test that draws it), so no segmentation model is involved.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from common.toyworld.scenes import (
    _SUPERSAMPLE,
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    Scene,
    _article,
    _inside,
    render,
    single_object_scene,
)

#: (size, position) of the views drawn for an identity: every placement the training scenes use.
PLACEMENTS: tuple[tuple[str, str], ...] = (("large", "center"),) + tuple(("small", p) for p in POSITIONS)


def object_mask(scene: Scene, obj: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """bool [size, size]: the pixels object `obj` of `scene` covers at all (any of its 4x4 subsamples), as drawn
    by `render` (objects drawn later cover it)."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    gx, gy = np.meshgrid(coords, coords)
    inside = lambda o: _inside(o.shape, (gx - o.center[0]) / o.radius, (gy - o.center[1]) / o.radius)
    covered = inside(scene.objects[obj])
    for later in scene.objects[obj + 1:]:
        covered &= ~inside(later)
    return covered.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).any(axis=(1, 3))


def identity_views(shape: str, color: str, n: int, rng: np.random.Generator,
                   backgrounds: Sequence[str] | None = None) -> list[Scene]:
    """`n` single-object scenes of one identity: distinct backgrounds (never `color`; from `backgrounds` when
    given, else all colours) and random placements from PLACEMENTS."""
    pool = [b for b in (backgrounds or COLORS) if b != color]
    if n > len(pool):
        raise ValueError(f"{n} views need {n} backgrounds other than {color}; {len(pool)} available")
    bgs = rng.choice(pool, size=n, replace=False).tolist()
    out = []
    for bg in bgs:
        size, position = PLACEMENTS[rng.integers(len(PLACEMENTS))]
        out.append(single_object_scene(shape, color, bg, size=size, position=position))
    return out


def colourless_caption(scene: Scene) -> str:
    """'a circle on a blue background': the caption without the object's colour (the identity must then come
    from reference pictures, not from the text)."""
    return f"{_article(scene.objects[0].shape)} on {_article(scene.background)} background"


def identity_sets(shapes: Sequence[str], per_identity: int, views: int, seed: int = 0) -> list[list[Scene]]:
    """`per_identity` sets of `views` scenes for every (shape, colour); a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    return [identity_views(s, c, views, rng) for s in shapes for c in COLORS for _ in range(per_identity)]


def write_image_sets(folder: str | Path, sets: Sequence[Sequence[Scene]], prompts: Sequence[Sequence[str]],
                     size: int = IMAGE_SIZE) -> Path:
    """Write sets of views as `<folder>/<k>_<j>.png`, masks `<folder>/masks/<k>_<j>.jpg` (255 = object) and
    `<folder>/metadata.json` = [{"filenames": [...], "prompts": [...]}] (SynCD's tuple layout, first view = the
    target). Returns the folder."""
    folder = Path(folder)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (scenes, texts) in enumerate(zip(sets, prompts, strict=True)):
        names = []
        for j, scene in enumerate(scenes):
            name = f"{k}_{j}"
            render(scene, size).save(folder / f"{name}.png")
            Image.fromarray(object_mask(scene, size=size).astype(np.uint8) * 255).save(
                folder / "masks" / f"{name}.jpg", quality=100)
            names.append(f"{name}.png")
        entries.append({"filenames": names, "prompts": list(texts)})
    (folder / "metadata.json").write_text(json.dumps(entries), encoding="utf-8")
    return folder
