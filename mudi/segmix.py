"""Seg-Mix: paste segmented subjects of different identities side by side on a plain canvas (spec §1.1).

Pure functions over uint8 arrays (image [h, w, 3], mask [h, w] with foreground > threshold), so each rule is
testable alone. Randomness comes from `rng`, anything with python `random`'s interface (the module itself
by default, which the Trainer seeds per item).

For n subjects the canvas is cut into n slots of width S // n: the first subject is left-aligned at a random
margin in [1, margin_max], the last right-aligned the same way, middle ones centred in their slot (the rule
of MuDI's multi-subject inference code). With n = 2 this is the original training collage exactly. Subjects
may overlap; a random stacking order decides which one is on top (no blending).
"""
from __future__ import annotations

import random as _random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import UsageError

BBOX_THRESHOLD = 128  # bbox_mask in the original: mask > 128
PASTE_THRESHOLD = 122  # pasting / background: mask > 122
PROMPT_TEMPLATES = {
    "sdxl": "a photo of {subjects}, simple background.",
    "flux": "a close out photo of {subjects}, {background} simple background, pasted, sticker, unnatural, glued, "
            "clip-art, attached, collage, low quality.",
}
_ARTICLE = {"sdxl": "a ", "flux": "a small "}


@dataclass(frozen=True)
class SegMixConfig:
    """Canvas side `canvas`; `margin` kept free in each slot; side margins drawn in [1, margin_max];
    random scale in [scale_low, 1] x f_max; `white_prob`: chance of a white (else black) background."""

    model: str = "sdxl"
    canvas: int = 1024
    margin: int = 32
    margin_max: int = 256
    scale_low: float = 0.75
    white_prob: float = 1.0

    @classmethod
    def for_model(cls, model: str, resolution: int) -> SegMixConfig:
        """SDXL: fixed 1024 canvas (as the original), margins 32 / 256, scales 0.75-1, always white.
        FLUX: canvas = resolution, margins 32 / 64 (scaled down below 512 px), scales 0.9-1, white 3 times in 4."""
        if model == "sdxl":
            return cls("sdxl", 1024, 32, 256, 0.75, 1.0)
        if model == "flux":
            return cls("flux", resolution, min(32, resolution // 16), min(64, resolution // 8), 0.9, 0.75)
        raise ValueError(f"unknown model {model!r}")


@dataclass
class Subject:
    """A subject cropped to its mask's box. image: [h, w, 3] uint8; mask: [h, w] uint8 (0..255)."""

    image: np.ndarray
    mask: np.ndarray
    id: str = ""


@dataclass
class Collage:
    """image: [H, W, 3] uint8; merged: [H, W] bool (any subject); masks: per subject (input order) [H, W] bool
    of the pixels it owns after stacking; boxes: per subject (x0, y0, x1, y1); on_top: subject indices in
    paste order (last = on top)."""

    image: np.ndarray
    merged: np.ndarray
    masks: list[np.ndarray]
    boxes: list[tuple[int, int, int, int]]
    on_top: list[int] = field(default_factory=list)
    white: bool = True


def segmix_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) of mask > 128, max inclusive — as the original's `bbox_mask`. Cropping with PIL's
    `crop(box)` treats the max as exclusive, so the last foreground row and column are dropped (kept as is)."""
    fg = mask > BBOX_THRESHOLD
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        raise UsageError("a subject mask has no foreground (no pixel > 128); fix or remove that mask")
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def crop_subject(image: np.ndarray, mask: np.ndarray, id: str = "") -> Subject:
    """Crop image [H, W, 3] and mask [H, W] (uint8) to the mask's box, PIL convention (see `segmix_bbox`)."""
    if image.shape[:2] != mask.shape:
        raise UsageError(f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                         f"{image.shape[1]}x{image.shape[0]}")
    x0, y0, x1, y1 = segmix_bbox(mask)
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"a subject mask's foreground is {x1 - x0 + 1}x{y1 - y0 + 1} px; Seg-Mix needs at least 2x2")
    return Subject(image[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy(), id)


def _hw(canvas: int | tuple[int, int]) -> tuple[int, int]:
    return (canvas, canvas) if isinstance(canvas, int) else (int(canvas[0]), int(canvas[1]))


def max_factor(subject: Subject, canvas: int | tuple[int, int], n: int, margin: int) -> float:
    """f_max = min((W // n - margin) / w, (H - margin) / h): the subject fits its slot, full height.
    `canvas`: side S, or (H, W)."""
    h, w = subject.mask.shape
    ch, cw = _hw(canvas)
    return min((cw // n - margin) / w, (ch - margin) / h)


def scale_factors(ids: Sequence[str], id_order: Sequence[str], relative_scale: float, scale_low: float,
                  rng: Any = _random) -> list[float]:
    """Fraction of f_max per subject. relative_scale 0: U(scale_low, 1) each. s > 0: the first id of the map
    at 1, the second at s; s < 0: first at |s|, second at 1 (the original's {"a", "b"} rule, by position)."""
    if relative_scale == 0:
        return [rng.uniform(scale_low, 1.0) for _ in ids]
    check_relative_scale(relative_scale, len(id_order))
    table = {id_order[0]: 1.0, id_order[1]: relative_scale} if relative_scale > 0 else \
        {id_order[0]: -relative_scale, id_order[1]: 1.0}
    return [table[i] for i in ids]


def check_relative_scale(value: float, num_ids: int) -> None:
    if not -1.0 <= value <= 1.0:
        raise UsageError(f"--relative_scale must be in [-1, 1], got {value}")
    if value != 0 and num_ids != 2:
        raise UsageError(f"--relative_scale {value} fixes the sizes of exactly two subjects; the data has {num_ids} ids")


def resize_subject(subject: Subject, factor: float) -> Subject:
    """Resize to (int(w f), int(h f)) with PIL's default resampling (bicubic), image and mask alike."""
    h, w = subject.mask.shape
    size = (max(1, int(w * factor)), max(1, int(h * factor)))
    img = np.asarray(Image.fromarray(subject.image).resize(size, Image.Resampling.BICUBIC))
    mask = np.asarray(Image.fromarray(subject.mask).resize(size, Image.Resampling.BICUBIC))
    return Subject(img, mask, subject.id)


def slot_x(slot: int, n: int, width: int, canvas: int, side_margin: int) -> int:
    """Left edge of a subject of `width` in `slot` of n: left-aligned, right-aligned, or centred in its slot."""
    if slot == 0:
        return side_margin
    if slot == n - 1:
        return canvas - side_margin - width
    return (canvas // (2 * n)) * (2 * slot + 1) - width // 2


def collage(subjects: Sequence[Subject], canvas: int | tuple[int, int], margin_max: int, *,
            height_sync: bool = False, white: bool = True, rng: Any = _random) -> Collage:
    """Place resized subjects on an S x S (or H x W) canvas: random slots, heights, side margins, stacking order.

    Pixels of a subject outside its mask (> 122) are not pasted; where subjects overlap the one pasted last wins.
    Background is 255 (white) or 0.
    """
    n = len(subjects)
    if n < 2:
        raise ValueError("a collage needs at least two subjects")
    ch, cw = _hw(canvas)
    slots = rng.sample(range(n), n)  # slots[k]: slot of subject k
    if height_sync:
        y = rng.randint(0, max(0, ch - max(s.mask.shape[0] for s in subjects)))
        ys = [y] * n
    else:
        ys = [rng.randint(0, max(0, ch - s.mask.shape[0])) for s in subjects]
    side = [rng.randint(1, margin_max) for _ in range(2)]  # left margin of slot 0, right margin of slot n-1
    order = rng.sample(range(n), n)  # paste order, last on top
    image = np.zeros((ch, cw, 3), np.uint8)
    owner = np.full((ch, cw), -1, np.int64)
    boxes: list[tuple[int, int, int, int]] = []
    for k, s in enumerate(subjects):
        h, w = s.mask.shape
        x = slot_x(slots[k], n, w, cw, side[0] if slots[k] == 0 else side[1])
        boxes.append((x, ys[k], x + w, ys[k] + h))
    for k in order:
        s, (x0, y0, x1, y1) = subjects[k], boxes[k]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, cw), min(y1, ch)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        fg = s.mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] > PASTE_THRESHOLD
        region = image[cy0:cy1, cx0:cx1]
        region[fg] = s.image[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0][fg]
        owner[cy0:cy1, cx0:cx1][fg] = k
    merged = owner >= 0
    if white:
        image[~merged] = 255
    return Collage(image, merged, [owner == k for k in range(n)], boxes, list(order), white)


def collage_pair(left: Subject, right: Subject, canvas: int | tuple[int, int], margin_max: int, *,
                 height_sync: bool = False, white: bool = True, rng: Any = _random) -> Collage:
    """The original two-subject `image_collage`, draw for draw: `left` left-aligned, `right` right-aligned.

    Draws from `rng` in the original's order: y of left then right (one shared y with `height_sync`, drawn only
    when there is room), is_left (left pasted first, so right on top), left margin, right margin. Returns a
    Collage whose subjects are (left, right)."""
    ch, cw = _hw(canvas)
    (h0, w0), (h1, w1) = left.mask.shape, right.mask.shape
    if height_sync:
        room = ch - max(h0, h1)
        y0 = y1 = rng.randint(0, room) if room > 0 else 0
    else:
        y0, y1 = rng.randint(0, ch - h0), rng.randint(0, ch - h1)
    is_left = rng.random() < 0.5
    lm, rm = rng.randint(1, margin_max), rng.randint(1, margin_max)
    boxes = [(lm, y0, lm + w0, y0 + h0), (cw - rm - w1, y1, cw - rm, y1 + h1)]
    order = [0, 1] if is_left else [1, 0]
    image = np.zeros((ch, cw, 3), np.uint8)
    owner = np.full((ch, cw), -1, np.int64)
    for k in order:
        s, (x0, ya, x1, yb) = (left, right)[k], boxes[k]
        fg = s.mask > PASTE_THRESHOLD
        image[ya:yb, x0:x1][fg] = s.image[fg]
        owner[ya:yb, x0:x1][fg] = k
    merged = owner >= 0
    if white:
        image[~merged] = 255
    return Collage(image, merged, [owner == 0, owner == 1], boxes, order, white)


def segmix_prompt(placeholders: Sequence[str], model: str = "sdxl", white: bool = True) -> str:
    """The Seg-Mix caption: subjects in draw order (own id first), not in canvas order."""
    article = _ARTICLE[model]
    subjects = " and ".join(article + p for p in placeholders)
    return PROMPT_TEMPLATES[model].format(subjects=subjects, background="white" if white else "black")


def loss_mask_map(merged: np.ndarray | torch.Tensor, size: int, soft_alpha: float) -> torch.Tensor:
    """[1, size, size]: bilinear downsample of the union mask, times (1 - soft_alpha), plus soft_alpha.

    soft_alpha 1 -> all ones (no masking); 0 -> background ignored; in between -> background weighted soft_alpha.
    """
    m = torch.as_tensor(np.asarray(merged), dtype=torch.float32)[None, None]
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0]
    return m * (1 - soft_alpha) + soft_alpha
