"""Image files <-> RGB PIL images <-> [-1, 1] tensors, the form every diffusion model trains on."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


#: The smallest side a training image may have: below it, resizing to the training resolution only blows up a
#: few pixels (a 1x1 image becomes a flat colour), which is almost certainly a wrong file.
MIN_TRAINING_SIDE = 8

# Pillow opens 16-bit greyscale PNGs in these modes; its convert("RGB") clips them at 255 instead of scaling.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit "L" by scaling 0..65535 onto 0..255 (x / 257, rounded)."""
    if img.mode not in _WIDE_MODES:
        return img
    wide = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (not dropped, which would leave arbitrary colours)."""
    img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as RGB; unreadable files are a UsageError, and so is
    an image with a side shorter than `min_side` pixels (training data: see MIN_TRAINING_SIDE)."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise UsageError(f"image not found: {path}; check the path") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"cannot read image {path}: {' '.join(str(e).split())}; replace or remove the file") from None
    if min_side is not None and min(rgb.size) < min_side:
        raise UsageError(
            f"image {path} is only {rgb.width}x{rgb.height} pixels (at least {min_side} on each side needed); "
            "replace or remove the file"
        )
    return rgb


def check_images(paths: Iterable[str | os.PathLike], min_side: int | None = MIN_TRAINING_SIDE) -> None:
    """Open every image once, so a bad one (unreadable, truncated, too small) is reported before a model loads
    rather than minutes into training."""
    for path in paths:
        load_rgb(path, min_side=min_side)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder`, sorted by name, hidden files skipped."""
    root = Path(folder)
    files = []
    if root.is_dir():
        files = sorted(
            p for p in root.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
    if not files:
        why = "" if root.is_dir() else " (no such folder)"
        raise UsageError(f"no images found in {folder}{why} (supported: {', '.join(IMAGE_EXTENSIONS)})")
    return files


def image_to_tensor(
    img: Image.Image, size: int | tuple[int, int], center_crop: bool = True, hflip: bool = False
) -> torch.Tensor:
    """Resize (bicubic) so the image covers `size` (int, or (H, W)), crop, and scale to [-1, 1].

    `center_crop=False` crops at a random offset and `hflip=True` flips with probability 1/2, both drawn from
    torch's global RNG so that seeding (and accelerate's RNG checkpointing) covers them.
    Returns: [3, H, W] float32.
    """
    height, width = (size, size) if isinstance(size, int) else size
    scale = max(height / img.height, width / img.width)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (new_h - height) // 2, (new_w - width) // 2
    else:
        top = int(torch.randint(new_h - height + 1, ()))
        left = int(torch.randint(new_w - width + 1, ()))
    img = img.crop((left, top, left + width, top + height))
    if hflip and torch.rand(()) < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


def tensor_to_pil(t: torch.Tensor) -> Image.Image | list[Image.Image]:
    """[3, H, W] in [-1, 1] -> one image; [N, 3, H, W] -> a list of N images. Values outside are clipped."""
    if t.dim() == 4:
        return [tensor_to_pil(x) for x in t]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected [3, H, W] or [N, 3, H, W], got {tuple(t.shape)}")
    pixels = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
