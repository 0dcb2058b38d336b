"""Toy-world datasets for the Trainer: scene index -> (image, caption), rendered on the fly.

The caption of an item is one of its truthful variants (with or without size/position words), drawn from
the random state the Trainer's `ItemSeededDataset` seeds per (seed, epoch, index), so resume replays it.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

from common.models.tokenizer import clip_tokenizer
from common.toyworld.scenes import BASE_SHAPES, make_scene, render, train_caption


@functools.lru_cache(maxsize=1)
def toy_tokenizer():
    """The offline CLIP tokenizer (77 tokens), built once per process: toy-clip and toy-sd both use it."""
    return clip_tokenizer()


def image_tensor(img) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 in [-1, 1] (the VAE's range)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


class SceneDataset(Dataset):
    """`num_scenes` scenes of dataset `seed` over `shapes`; item: {"pixels": [3, 32, 32] in [-1, 1], "caption"}.

    `empty_caption_prob` replaces the caption with "" (for classifier-free guidance training).
    """

    def __init__(self, num_scenes: int, seed: int = 0, shapes: tuple[str, ...] = BASE_SHAPES,
                 empty_caption_prob: float = 0.0) -> None:
        self.num_scenes, self.seed, self.shapes = num_scenes, seed, tuple(shapes)
        self.empty_caption_prob = empty_caption_prob
        self._images: dict[int, torch.Tensor] = {}  # rendered once per process: epochs reuse them

    def __len__(self) -> int:
        return self.num_scenes

    def scene(self, index: int):
        return make_scene(index, self.seed, self.shapes)

    def caption(self, index: int) -> str:
        """A caption variant drawn from torch's (item-seeded) global generator."""
        draw = int(torch.randint(0, 2**31 - 1, (1,)).item())
        if torch.rand(()).item() < self.empty_caption_prob:
            return ""
        return train_caption(self.scene(index), np.random.default_rng(draw))

    def image(self, index: int) -> torch.Tensor:
        """[3, 32, 32] in [-1, 1]."""
        if index not in self._images:
            self._images[index] = image_tensor(render(self.scene(index))).to(torch.float16)
        return self._images[index].float()

    def __getitem__(self, index: int) -> dict:
        return {"pixels": self.image(index), "caption": self.caption(index), "index": index}


class LatentSceneDataset(SceneDataset):
    """The same scenes with pre-encoded VAE latents: item {"latents": [4, 16, 16], "caption"}."""

    def __init__(self, latents: torch.Tensor, seed: int = 0, shapes: tuple[str, ...] = BASE_SHAPES,
                 empty_caption_prob: float = 0.1) -> None:
        super().__init__(len(latents), seed, shapes, empty_caption_prob)
        self.latents = latents

    def __getitem__(self, index: int) -> dict:
        return {"latents": self.latents[index], "caption": self.caption(index), "index": index}
