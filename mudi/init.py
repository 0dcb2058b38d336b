"""Mean-shifted noise initialisation (spec §1.4, SDXL): start sampling from noise whose mean carries a collage
of the segmented subjects, so each identity gets its own region from the first step.

Construction (following MuDI's multi-subject inference code; the notebooks of the paper are not public):
1. one reference image + mask per subject, cropped to the mask box, scaled to 0.8 f_max of its slot, placed in
   n side-by-side slots of an H x W white canvas (the Seg-Mix collage routine, `mudi.segmix.collage`);
2. z_seg = VAE encoding of the collage (a posterior sample times the scaling factor), kept only on latent cells
   that any subject pixel touches (M_lat);
3. the original feeds `scheduler.add_noise(gamma * z_seg * M_lat, eps, t_first) / init_noise_sigma` as
   `latents=` (gamma = 3). We keep its mean exactly and keep eps's own scale: x_T = x_T_plain + signal, with
   signal = `scheduler.add_noise(gamma * M_lat * z_seg, 0, t_first)` (sqrt(alphabar) * gamma * M z_seg for DDPM /
   DDIM, gamma * M z_seg for Euler). The noise term therefore is exactly the plain sampler's (gamma = 0 is plain
   sampling), where the original's is smaller by sqrt(1 - alphabar_T) or sigma / sqrt(sigma^2 + 1) (~0.998).

Applied as a loop hook on the first step's input (common.pipelines.loop), so any SDXL sampler can use it.
"""
from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.pipelines.latents import encode_images
from common.pipelines.loop import Hook, StepState
from mudi.segmix import Collage, Subject, collage, crop_subject, max_factor, resize_subject

INIT_SCALE = 0.8  # fraction of f_max in the original's inference code
DEFAULT_GAMMA = 3.0


def init_margins(width: int) -> tuple[int, int]:
    """(slot margin, side-margin max): the original's 16 / 32 at >= 1024 px, scaled down for small images."""
    return min(16, max(1, width // 64)), min(32, max(1, width // 32))


def init_collage(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], height: int, width: int, *,
                 scale: float = INIT_SCALE, rng: Any = _random) -> Collage:
    """Collage of one reference per subject on a white H x W canvas. images: [h, w, 3] uint8; masks: [h, w] uint8."""
    margin, side = init_margins(width)
    subjects = [crop_subject(np.asarray(i), np.asarray(m), str(k)) for k, (i, m) in enumerate(zip(images, masks))]
    n = len(subjects)
    subjects = [resize_subject(s, max_factor(s, (height, width), n, margin) * scale) for s in subjects]
    return collage(subjects, (height, width), side, white=True, rng=rng)


def latent_masks(masks: Sequence[np.ndarray] | np.ndarray, factor: int = 8) -> torch.Tensor:
    """Pixel masks [.., H, W] bool -> latent masks [.., H/f, W/f] bool: a cell counts when any pixel of it is set."""
    m = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    lead = m.shape[:-2]
    m = F.avg_pool2d(m.reshape(-1, 1, *m.shape[-2:]), factor)
    return (m > 0).reshape(*lead, *m.shape[-2:])


@torch.no_grad()
def mean_shift_latent(vae, result: Collage, gamma: float, generator: torch.Generator | None = None,
                      factor: int = 8) -> torch.Tensor:
    """gamma * M_lat * z_seg: [1, C, H/8, W/8] in the VAE's dtype and device."""
    device = next(vae.parameters()).device
    pixels = torch.from_numpy(result.image).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
    z = encode_images(vae, pixels, generator=generator)
    mask = latent_masks(result.merged, factor).to(z)
    return gamma * z * mask


class MeanShiftInit(Hook):
    """Adds the scheduler's signal part of `shift` ([1 or B, C, h, w]) to x_T before the first prediction."""

    def __init__(self, shift: torch.Tensor, scheduler) -> None:
        self.shift, self.scheduler = shift, scheduler

    def signal(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shift = self.shift.to(like).expand_as(like)
        return self.scheduler.add_noise(shift, torch.zeros_like(shift), t.reshape(1).to(like.device))

    def on_input(self, state: StepState) -> None:
        if state.i == 0 and self.shift.abs().max() > 0:
            state.x_t = state.x_t + self.signal(state.t, state.x_t)


def subject_from_files(image: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """(image [h, w, 3] uint8, mask [h, w] uint8) from paths or PIL images (mask size must match)."""
    from PIL import Image

    from common.data import load_rgb
    from mudi.data import load_mask_u8

    img = image if isinstance(image, Image.Image) else load_rgb(image)
    if isinstance(mask, Image.Image):
        m = np.asarray(mask.convert("L"))
        if m.shape != (img.height, img.width):
            from common.errors import UsageError

            raise UsageError(f"mask is {m.shape[1]}x{m.shape[0]} but its image is {img.width}x{img.height}")
    else:
        m = load_mask_u8(mask, img.size)
    return np.asarray(img.convert("RGB")), m


__all__ = ["DEFAULT_GAMMA", "MeanShiftInit", "Subject", "init_collage", "latent_masks", "mean_shift_latent"]
