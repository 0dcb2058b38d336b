"""Prior-preservation images: fill a folder up to N images of a class prompt with the base model.

Resumable: images are named by index (class_00000.jpg, ...) and the seed of batch k depends only on
(seed, first index of k), so an interrupted run continues where it stopped and gives the same set.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.data import list_images
from common.errors import UsageError
from common.io import atomic_save_image
from common.pipelines.text2image import generate


def count_images(folder: str | Path) -> int:
    """How many readable-looking images `folder` holds (0 when it is missing or has none)."""
    try:
        return len(list_images(folder))
    except UsageError:
        return 0


def ensure_class_images(pipe, prompt: str, folder: str | Path, num_images: int, *, batch_size: int = 4,
                        seed: int = 0, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                        eta: float = 1.0, height: int | None = None, width: int | None = None,
                        show_progress: bool = True) -> list[Path]:
    """Generate the missing `num_images - existing` images of `prompt` into `folder`; returns the new paths.

    Defaults are the Custom Diffusion paper's generated prior: 50 steps of the pipeline's own scheduler (PNDM
    for SD-1.4, as the original; eta applies only to DDIM-like schedulers), eta 1, guidance 6.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = {p.name for p in folder.iterdir()}
    todo = [i for i in range(num_images) if f"class_{i:05d}.jpg" not in existing]
    missing = num_images - count_images(folder)
    todo = todo[:max(missing, 0)]
    written: list[Path] = []
    device = pipe._execution_device
    for start in tqdm(range(0, len(todo), batch_size), desc=f"class images ({prompt})", disable=not show_progress):
        indices = todo[start: start + batch_size]
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + indices[0])
        images = generate(pipe, [prompt] * len(indices), num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, eta=eta, height=height, width=width,
                          generator=generator, output_type="pil", progress=False)
        for i, image in zip(indices, images):
            path = folder / f"class_{i:05d}.jpg"
            atomic_save_image(image, path)
            written.append(path)
    return written
