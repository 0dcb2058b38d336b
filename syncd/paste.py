"""Rigid renders' scale-and-paste augmentation (SynCD §1.3, the original's `scale_shift` / `get_depth`).

Each rendered view (at the canvas size, 1024 in the original) is shrunk by s ~ U(0.7, 0.95) - U(0.9, 0.95) when
the object covers < 20% of the render; views covering < 10% are rejected - and pasted on a black canvas at
x ~ U{0, canvas - s'}, y ~ U{max(canvas - s' - 100, 0), canvas - s'} (s' = int(canvas * s): near the bottom,
the object "on the ground"). Depth gets the same scale and offset; the depth image is the min-max normalised
inverse depth (background = infinitely far = inverse 0). Correspondence rows move with the paste (see
`syncd.warp.shift_scale_correspondences`: ndc' = s ndc + (1 - 2 shift / canvas) - s per axis).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CANVAS = 1024  #: the original's canvas side (renders are resized to it before the paste)
BOTTOM_BAND = 100  #: the paste's top edge lies within this many canvas pixels (of 1024) of the lowest position
MIN_AREA = 0.1  #: views whose object covers less of the render are rejected
SMALL_AREA = 0.2  #: below this the scale range narrows to (0.9, 0.95)


@dataclass(frozen=True)
class Paste:
    """One view's paste: scale s, top-left offset (x, y) in canvas pixels, canvas side."""
    scale: float
    x: int
    y: int
    canvas: int = CANVAS

    @property
    def side(self) -> int:
        """Side of the shrunk render in canvas pixels (the original's int(canvas * s))."""
        return int(self.canvas * self.scale)

    @property
    def shift_yx(self) -> tuple[int, int]:
        return self.y, self.x


def scale_range(area: float) -> tuple[float, float] | None:
    """The original's area rule: None (reject) below 0.1, (0.9, 0.95) below 0.2, else (0.7, 0.95)."""
    if area < MIN_AREA:
        return None
    return (0.9, 0.95) if area < SMALL_AREA else (0.7, 0.95)


def sample_paste(area: float, rng: random.Random, canvas: int = CANVAS) -> Paste | None:
    """Random scale and offset for a view whose object covers `area` (fraction of pixels) of the render."""
    rule = scale_range(area)
    if rule is None:
        return None
    s = rng.uniform(*rule)
    side = int(canvas * s)
    band = round(BOTTOM_BAND * canvas / CANVAS)
    x = rng.randint(0, canvas - side)
    y = rng.randint(max(canvas - side - band, 0), canvas - side)
    return Paste(s, x, y, canvas)


def paste(img: torch.Tensor, p: Paste, fill: float = 0.0, mode: str = "bilinear") -> torch.Tensor:
    """img [..., C, H, W] (the render at canvas resolution) -> [..., C, canvas, canvas]: shrunk to p.side and
    placed with its top-left corner at (p.y, p.x) on a canvas of `fill`. mode "nearest" keeps values exact
    (depth, masks, coordinates); "bilinear"/"bicubic" are antialiased (colour)."""
    lead = img.shape[:-3]
    x = img.reshape(-1, *img.shape[-3:])
    kw = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    small = F.interpolate(x.float(), size=(p.side, p.side), mode=mode, **kw).to(img.dtype)
    out = torch.full((x.shape[0], x.shape[1], p.canvas, p.canvas), fill, dtype=img.dtype, device=img.device)
    out[..., p.y:p.y + p.side, p.x:p.x + p.side] = small
    return out.reshape(*lead, x.shape[1], p.canvas, p.canvas)


def inverse_depth_image(depth: torch.Tensor) -> torch.Tensor:
    """Camera depth [..., H, W] (0 or inf = background) -> the original's depth image: d = 1/z (0 on background),
    (d - min d) / (max d - min d) per image over all pixels, in [0, 1] (near = 1)."""
    fg = (depth > 0) & torch.isfinite(depth)
    inv = torch.where(fg, 1.0 / torch.where(fg, depth, torch.ones_like(depth)), torch.zeros_like(depth))
    flat = inv.flatten(-2)
    lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    return (inv - lo) / (hi - lo).clamp_min(1e-12)
