"""Object masks: read from any image mode, brought to latent and token grids, boxed, grown and merged.

Masks are torch tensors [H, W] (or batched [..., H, W]): bool for "inside the object", float in [0, 1] for
soft masks and loss weights. Token grids follow FLUX packing: 2x2 latent patches, row-major, so a token
mask lines up with `common.train.conditioning.flux_pack_latents`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import UsageError

RESIZE_MODES = ("nearest", "any", "area", "bilinear")
# Full-scale value of Pillow's integer and float modes (a 16-bit PNG opens as "I;16" or "I").
_FULL_SCALE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def _mask_values(img: Image.Image) -> np.ndarray:
    """[H, W] float64 in [0, 1]: the alpha channel when it varies (a cut-out), else the luminance."""
    if img.mode in _FULL_SCALE:
        return np.clip(np.asarray(img, dtype=np.float64) / _FULL_SCALE[img.mode], 0.0, 1.0)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA"), dtype=np.float64)[..., 3]
        if alpha.min() != alpha.max():
            return alpha / 255.0
    return np.asarray(img.convert("L"), dtype=np.float64) / 255.0


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None, *, threshold: float = 0.5,
              soft: bool = False, mode: str = "nearest") -> torch.Tensor:
    """A mask file as bool [H, W] (value > `threshold`, values scaled to [0, 1]) or, with `soft`, float [H, W].

    Any Pillow mode loads: "1", "L", "P", RGB (luminance), RGBA/LA (the alpha channel when it varies),
    16-bit and float images. `size` = (h, w) resizes with `resize_mask(..., mode)` before thresholding.
    SynCD binarises with `threshold=0`; MuDI's 8-bit `> 128` is `threshold=128/255`.
    """
    try:
        with Image.open(path) as img:
            img.load()
            values = _mask_values(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise UsageError(f"mask not found: {path}; check the path") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"cannot read mask {path}: {' '.join(str(e).split())}; replace the file") from None
    mask = torch.from_numpy(values).float()
    if soft:
        return mask if size is None else resize_mask(mask, size, mode).float()
    if size is None:
        return mask > threshold
    if mode in ("nearest", "any"):
        return resize_mask(mask > threshold, size, mode)
    return resize_mask(mask, size, mode) > threshold


def _as_4d(mask: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    lead = tuple(mask.shape[:-2])
    return mask.reshape(-1, 1, *mask.shape[-2:]), lead


def resize_mask(mask: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """mask [..., H, W] -> [..., h, w].

    "nearest" keeps the dtype; "any" marks a cell if any covered pixel is set (bool out; for shrinking to a
    latent grid without losing thin parts); "area" gives the covered fraction and "bilinear" torch's bilinear
    interpolation (float out; MuDI's loss-mask downsampling).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown mask resize mode {mode!r}; choose from {', '.join(RESIZE_MODES)}")
    x, lead = _as_4d(mask)
    h, w = size
    if mode == "nearest":
        out = F.interpolate(x.float(), size=(h, w), mode="nearest-exact").to(mask.dtype)
    elif mode == "any":
        out = F.adaptive_max_pool2d((x.float() > 0).float(), (h, w)) > 0
    elif mode == "area":
        out = F.adaptive_avg_pool2d(x.float(), (h, w))
    else:
        out = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
    return out.reshape(*lead, h, w)


def to_token_grid(mask: torch.Tensor, latent_hw: tuple[int, int], patch: int = 1, mode: str = "any") -> torch.Tensor:
    """mask [..., H, W] -> per-token values [..., (h/patch) * (w/patch)] for a latent of size `latent_hw`.

    patch=1: one token per latent cell (UNet attention at full latent resolution); patch=2: FLUX's packed
    2x2 patches, row-major like `flux_pack_latents`. `mode` as in `resize_mask` ("any": a token is in the
    object if any of its pixels is).
    """
    h, w = latent_hw
    if h % patch or w % patch:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {patch}")
    grid = resize_mask(mask, (h // patch, w // patch), mode=mode)
    return grid.reshape(*grid.shape[:-2], -1)


def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the set pixels of a [H, W] mask, x1 and y1 exclusive (PIL crop box); None if empty.

    MuDI's released code crops to (x0, y0, x1 - 1, y1 - 1) (its max index used as an exclusive end).
    """
    if mask.ndim != 2:
        raise ValueError(f"mask_bbox takes one [H, W] mask, got shape {tuple(mask.shape)}")
    rows, cols = torch.nonzero(mask > 0 if mask.dtype != torch.bool else mask, as_tuple=True)
    if rows.numel() == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def dilate_mask(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Grow a mask [..., H, W] by `px` pixels in every direction (a (2px+1)^2 square); bool in, bool out."""
    if px < 0:
        raise ValueError(f"dilation must be >= 0 pixels, got {px}")
    x, lead = _as_4d(mask)
    binary = (x > 0).float() if mask.dtype != torch.bool else x.float()
    if px:
        binary = F.max_pool2d(binary, kernel_size=2 * px + 1, stride=1, padding=px)
    return (binary > 0).reshape(*lead, *mask.shape[-2:])


def union_masks(masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """The pixelwise union of same-shaped masks: logical or for bool masks, max for soft ones."""
    masks = list(masks)
    if not masks:
        raise ValueError("union_masks needs at least one mask")
    out = masks[0]
    for m in masks[1:]:
        if m.shape != out.shape:
            raise ValueError(f"cannot unite masks of shapes {tuple(out.shape)} and {tuple(m.shape)}")
        out = out | m if out.dtype == torch.bool and m.dtype == torch.bool else torch.maximum(out.float(), m.float())
    return out
