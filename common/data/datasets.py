"""Image datasets for fine-tuning: a plain folder with one prompt, or a folder with per-image captions.

Items are dicts {"pixel_values": [3, H, W] in [-1, 1], "prompt": str, "path": str}. Augmentation randomness
comes from torch's global RNG, so `--seed` and accelerate's RNG checkpointing cover it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data.images import MIN_TRAINING_SIDE, check_images, image_to_tensor, list_images, load_rgb
from common.errors import UsageError

METADATA_FILE = "metadata.jsonl"


class _CaptionedImages(Dataset):
    """(path, prompt) pairs loaded and transformed on access."""

    def __init__(
        self,
        items: list[tuple[Path, str]],
        size: int | tuple[int, int],
        center_crop: bool,
        hflip: bool,
        transform: Callable[[Image.Image], torch.Tensor] | None,
    ) -> None:
        self.items = items
        self.size = size
        self.center_crop = center_crop
        self.hflip = hflip
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def check(self) -> None:
        """Open every image now (the Trainer calls this before the model loads); see `check_images`."""
        check_images(path for path, _ in self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, prompt = self.items[index]
        img = load_rgb(path, min_side=MIN_TRAINING_SIDE)
        if self.transform is not None:
            pixels = self.transform(img)
        else:
            pixels = image_to_tensor(img, self.size, center_crop=self.center_crop, hflip=self.hflip)
        return {"pixel_values": pixels, "prompt": prompt, "path": str(path)}


class ImageFolderDataset(_CaptionedImages):
    """Every image directly in `folder`, all with the same `prompt`; `transform` replaces resize-and-crop."""

    def __init__(
        self,
        folder: str | os.PathLike,
        size: int | tuple[int, int],
        prompt: str = "",
        center_crop: bool = True,
        hflip: bool = False,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        super().__init__([(p, prompt) for p in list_images(folder)], size, center_crop, hflip, transform)


def read_metadata_jsonl(folder: str | os.PathLike, caption_column: str = "text") -> list[tuple[Path, str]]:
    """(image path, caption) per line of `folder/metadata.jsonl` (the Hugging Face imagefolder layout)."""
    meta = Path(folder) / METADATA_FILE
    if not meta.is_file():
        raise UsageError(
            f"no {METADATA_FILE} in {folder}; add one with a line like "
            f'{{"file_name": "0.jpg", "{caption_column}": "a photo of ..."}} per image'
        )
    items = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("file_name"), str):
            raise UsageError(f'{where}: missing "file_name" (the image path relative to {folder})')
        if not isinstance(row.get(caption_column), str):
            keys = ", ".join(k for k in row if k != "file_name") or "none"
            raise UsageError(
                f'{where}: missing text column "{caption_column}" (other keys: {keys}); '
                "add it or choose the caption column that the file uses"
            )
        path = Path(folder) / row["file_name"]
        if not path.is_file():
            raise UsageError(f"{where}: image not found: {path}")
        items.append((path, row[caption_column]))
    if not items:
        raise UsageError(f"{meta} lists no images; add one JSON line per image")
    return items


class MetadataJsonlDataset(_CaptionedImages):
    """Images listed in `folder/metadata.jsonl`, each with its caption from `caption_column`."""

    def __init__(
        self,
        folder: str | os.PathLike,
        size: int | tuple[int, int],
        caption_column: str = "text",
        center_crop: bool = True,
        hflip: bool = False,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(read_metadata_jsonl(folder, caption_column), size, center_crop, hflip, transform)
