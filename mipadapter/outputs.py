"""What sampling writes: prompt-safe file names (never overwriting a result) and weight-map heat-map overlays."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_NAME = 120


def safe_name(prompt: str) -> str:
    """A file stem from a prompt: '/', '.', and other unsafe characters become '_' (the original used the raw
    prompt, so '/' broke saving and '.' truncated its CLIP-T text); long prompts are cut."""
    stem = re.sub(r"[^\w ,'()+-]", "_", prompt.strip()).strip(" _") or "prompt"
    return stem[:MAX_NAME]


def heat_colors(values: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] -> [h, w, 3] uint8 (blue -> cyan -> yellow -> red)."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float32)
    pos = v * (len(stops) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    frac = pos - lo
    return (stops[lo[..., 0]] * (1 - frac) + stops[lo[..., 0] + 1] * frac).astype(np.uint8)


def weight_overlay(image: Image.Image, weights: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The routing weight map w^k [h, w] (in [0, 1]) as a heat map blended over the generated image."""
    w = weights.float().clamp(0, 1).cpu().numpy()
    heat = Image.fromarray(heat_colors(w)).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)
