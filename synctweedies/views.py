"""Visual-anagram views: pixel rearrangements (and negation) of a square image, with their inverses.

Every rearranging view is an index map built by applying the transform to an image of pixel ids, so
`view(x).flatten(-2) == x.flatten(-2)[..., index]` and the permutation behind each view is explicit (the
GIF morph moves pixels along it). Sizes are generic: the same seeded permutation is used at 64 and 256, so
stage I and stage II see the same anagram.
Definitions we chose where the original's are asset-based: `jigsaw` = 4x4 square pieces permuted and
rotated (seed 11); `inner_circle` = the centred disc of radius 0.375 s turned by 180 degrees.
As the original (Visual Anagrams' permutations): `square_hinge` = a 3x3 grid of s//3 squares, each turned by
90 degrees, clockwise where row + column is even and counter-clockwise where it is odd (the s - 3 (s//3)
last rows/columns stay); `inner_rotate` = the disc turned clockwise on screen by the angle (the original's
`TF.rotate(-angle)`, nearest), its inverse counter-clockwise.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from common.errors import UsageError

DISC = 0.375  # inner disc radius as a fraction of the size: 24 px at 64, 96 px at 256


class View:
    """One view. x: [..., C, s, s]. `index(s)` is None for views that are not pixel rearrangements."""

    name = "view"
    is_permutation = True

    def view(self, x: torch.Tensor) -> torch.Tensor:
        return _take(x, self.index(x.shape[-1]))

    def inverse_view(self, x: torch.Tensor) -> torch.Tensor:
        return _take(x, self.inverse_index(x.shape[-1]))

    def index(self, size: int) -> torch.Tensor:
        raise NotImplementedError

    def inverse_index(self, size: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_inverse", {})
        if size not in cache:
            cache[size] = torch.argsort(self.index(size))
        return cache[size]

    def __repr__(self) -> str:
        return self.name


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    s = x.shape[-1]
    return x.flatten(-2)[..., index.to(x.device)].unflatten(-1, (s, s))


def _ids(size: int) -> torch.Tensor:
    return torch.arange(size * size).view(size, size)


class MapView(View):
    """A view given by a function on the [s, s] grid of pixel ids."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn
        self._cache: dict[int, torch.Tensor] = {}

    def index(self, size: int) -> torch.Tensor:
        if size not in self._cache:
            self._cache[size] = self.fn(_ids(size)).flatten()
        return self._cache[size]


class NegateView(View):
    """x -> -x on the first three (colour / eps) channels; IF's variance channels keep their sign."""

    name = "negate"

    def view(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., : min(3, x.shape[-3]), :, :] *= -1
        return out

    inverse_view = view

    def index(self, size: int) -> torch.Tensor:
        return _ids(size).flatten()


class InnerRotateView(View):
    """The centred disc turned clockwise (on screen) by `angle` degrees with nearest sampling, as the original's
    `TF.rotate(x, -angle)`; the inverse turns it back counter-clockwise. A 1-to-n map unless angle % 90 == 0."""

    name = "inner_rotate"
    is_permutation = False

    def __init__(self, angle: float = 45.0):
        self.angle = angle

    def index(self, size: int) -> torch.Tensor:
        return _disc_rotation(size, -self.angle)

    def inverse_index(self, size: int) -> torch.Tensor:
        return _disc_rotation(size, self.angle)


@lru_cache(maxsize=None)
def _disc_rotation(size: int, angle: float) -> torch.Tensor:
    """The disc turned counter-clockwise on screen by `angle` (negative: clockwise), nearest sampling:
    output pixel p inside the disc takes the input pixel nearest to R(-angle) p (about the centre)."""
    c = (size - 1) / 2
    ii, jj = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    y, x = ii - c, jj - c
    inside = y ** 2 + x ** 2 < (DISC * size) ** 2  # strict, as the original's mask
    a = math.radians(angle)
    # image rows grow downwards: a counter-clockwise turn on screen by `a` samples the source at R(-a)
    sx = math.cos(a) * x - math.sin(a) * y
    sy = math.sin(a) * x + math.cos(a) * y
    si = (sy + c).round().clamp(0, size - 1).long()
    sj = (sx + c).round().clamp(0, size - 1).long()
    ids = _ids(size)
    return torch.where(inside, si * size + sj, ids).flatten()


def _grid_permute(ids: torch.Tensor, n: int, seed: int, rotate: bool = False) -> torch.Tensor:
    """Cut the grid into n x n blocks and move them by a seeded permutation (optionally turning each)."""
    s = ids.shape[-1]
    n = min(n, s)
    if s % n:
        raise UsageError(f"a {n}x{n} block permutation needs an image size divisible by {n}, got {s}")
    b = s // n
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n * n, generator=g)
    turns = torch.randint(0, 4, (n * n,), generator=g) if rotate else torch.zeros(n * n, dtype=torch.long)
    blocks = ids.view(n, b, n, b).permute(0, 2, 1, 3).reshape(n * n, b, b)
    moved = torch.stack([torch.rot90(blocks[perm[k]], int(turns[k]), (0, 1)) for k in range(n * n)])
    return moved.view(n, n, b, b).permute(0, 2, 1, 3).reshape(s, s)


def _skew(ids: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    s = ids.shape[-1]
    cols = [torch.roll(ids[:, j], int(factor * (j - s / 2))) for j in range(s)]
    return torch.stack(cols, dim=1)


def _inner_circle(ids: torch.Tensor) -> torch.Tensor:
    s = ids.shape[-1]
    c = (s - 1) / 2
    ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    inside = (ii - c) ** 2 + (jj - c) ** 2 < (DISC * s) ** 2
    return torch.where(inside, torch.rot90(ids, 2, (0, 1)), ids)


def _square_hinge(ids: torch.Tensor) -> torch.Tensor:
    """3x3 squares of side s//3; square (row r, column c) turns clockwise when r + c is even, else
    counter-clockwise. Rows/columns beyond 3 (s//3) stay where they are."""
    s = ids.shape[-1]
    q = s // 3
    out = ids.clone()
    for r in range(3):
        for c in range(3):
            block = ids[r * q:(r + 1) * q, c * q:(c + 1) * q]
            out[r * q:(r + 1) * q, c * q:(c + 1) * q] = torch.rot90(block, -1 if (r + c) % 2 == 0 else 1, (0, 1))
    return out


def _builders(rotate_angle: float) -> dict:
    return {
        "identity": lambda: MapView("identity", lambda ids: ids),
        "flip": lambda: MapView("flip", lambda ids: ids.flip(0)),
        "rotate_cw": lambda: MapView("rotate_cw", lambda ids: torch.rot90(ids, -1, (0, 1))),
        "rotate_ccw": lambda: MapView("rotate_ccw", lambda ids: torch.rot90(ids, 1, (0, 1))),
        "rotate_180": lambda: MapView("rotate_180", lambda ids: torch.rot90(ids, 2, (0, 1))),
        "negate": NegateView,
        "skew": lambda: MapView("skew", _skew),
        "patch_permute": lambda: MapView("patch_permute", lambda ids: _grid_permute(ids, 8, seed=0)),
        "pixel_permute": lambda: MapView("pixel_permute", lambda ids: _grid_permute(ids, 64, seed=0)),
        "jigsaw": lambda: MapView("jigsaw", lambda ids: _grid_permute(ids, 4, seed=11, rotate=True)),
        "inner_circle": lambda: MapView("inner_circle", _inner_circle),
        "square_hinge": lambda: MapView("square_hinge", _square_hinge),
        "inner_rotate": lambda: InnerRotateView(rotate_angle),
    }


VIEW_NAMES = tuple(_builders(45.0))


def get_views(names: list[str], rotate_angle: float = 45.0) -> list[View]:
    """Views by name (the original's `get_views`). Unknown names raise a one-line UsageError."""
    builders = _builders(rotate_angle)
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise UsageError(f"unknown view name(s) {', '.join(unknown)}: choose from {', '.join(VIEW_NAMES)}")
    return [builders[n]() for n in names]
