"""Image files <-> RGB PIL images <-> [-1, 1] tensors, the form every diffusion model trains on."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (not dropped, which would leave arbitrary colours)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as RGB; unreadable files are a UsageError."""
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise UsageError(f"image not found: {path}; check the path") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"cannot read image {path}: {' '.join(str(e).split())}; replace or remove the file") from None


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
