"""Output folders (as the original: <save_top_dir>/<tag>[/<timestamp>]) and the image artefacts."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import PIL.Image
import torch

from common.errors import UsageError
from common.io import atomic_save_image, atomic_write
from common.pipelines.text2image import to_pil


def check_save_dir(save_top_dir: str, tag: str, save_dir_now: bool) -> None:
    """Refuse an existing result folder before any model is loaded (make_save_dir checks again)."""
    path = Path(save_top_dir) / tag
    if not save_dir_now and path.is_dir() and any(path.iterdir()):
        raise UsageError(f"output folder {path} already exists: pass --save_dir_now, another --tag or remove it")


def make_save_dir(save_top_dir: str, tag: str, save_dir_now: bool) -> Path:
    """<top>/<tag>, or <top>/<tag>/<YYYYmmdd-HHMMSS> with --save_dir_now. An existing folder with results is
    refused (the original silently exits 0 there; we say why); an empty one (a run that failed before writing
    anything) is reused. Call it after the inputs are checked and the models loaded."""
    path = Path(save_top_dir) / tag
    if save_dir_now:
        path = path / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    elif path.is_dir() and any(path.iterdir()):
        raise UsageError(f"output folder {path} already exists: pass --save_dir_now, another --tag or remove it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"cannot create output folder {path}: a file is in the way") from None
    except PermissionError:
        raise UsageError(f"cannot create output folder {path}: permission denied") from None
    return path


def save_images(images: torch.Tensor, folder: Path, pattern: str) -> list[Path]:
    """images [B, 3, H, W] in [-1, 1] -> folder/pattern.format(i)."""
    paths = []
    for i, img in enumerate(to_pil(images)):
        path = folder / pattern.format(i)
        atomic_save_image(img, path)
        paths.append(path)
    return paths


def sheet(images: torch.Tensor, pad: int = 4) -> PIL.Image.Image:
    """Side-by-side sheet of [B, 3, H, W] images in [-1, 1] (heights must match)."""
    pils = to_pil(images)
    w = sum(p.width for p in pils) + pad * (len(pils) - 1)
    out = PIL.Image.new("RGB", (w, pils[0].height), "white")
    x = 0
    for p in pils:
        out.paste(p, (x, 0))
        x += p.width + pad
    return out


def save_gif(frames: list[PIL.Image.Image], path: Path, duration_ms: int = 60) -> None:
    with atomic_write(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)


def morph_frames(canonical: torch.Tensor, views: list, num_frames: int = 12, hold: int = 6) -> list[PIL.Image.Image]:
    """Frames going view 0 -> 1 -> ... -> 0. canonical [3, s, s] in [-1, 1].

    Permutation views move every pixel in a straight line from its place in one view to its place in the
    next (holes show the cross-fade); other views (negate, inner_rotate) cross-fade.
    """
    s = canonical.shape[-1]
    shown = [v.view(canonical) for v in views]
    frames = []
    for a in range(len(views)):
        b = (a + 1) % len(views)
        frames += to_pil(shown[a][None]) * hold
        pa, pb = _positions(views[a], s), _positions(views[b], s)
        for k in range(1, num_frames):
            w = k / num_frames
            w = w * w * (3 - 2 * w)  # ease in-out
            frame = (1 - w) * shown[a] + w * shown[b]
            if pa is not None and pb is not None:
                pos = ((1 - w) * pa + w * pb).round().long().clamp(0, s - 1)
                flat = frame.flatten(1).clone()
                flat[:, pos[:, 0] * s + pos[:, 1]] = canonical.flatten(1)
                frame = flat.view_as(frame)
            frames += to_pil(frame[None])
    return frames


def _positions(view, size: int) -> torch.Tensor | None:
    """Where each canonical pixel lands in the view: [s*s, 2] (row, col), or None if not a permutation."""
    if not view.is_permutation or view.name == "negate":
        return None
    where = view.inverse_index(size)
    return torch.stack([where // size, where % size], 1).float()
