"""What a training step feeds SDXL and FLUX besides latents and text embeddings, built as diffusers does.

SDXL: `add_time_ids` = (original h, w, crop top, left, target h, w) per sample (the micro-conditioning of
`StableDiffusionXLPipeline._get_add_time_ids` and of diffusers' SDXL training examples).
FLUX: latents [B, C, H, W] travel as 2x2 patches [B, (H/2)(W/2), 4C] in row-major order, with position ids
(0, row, col) per patch and zero ids for text tokens; a guidance-distilled transformer takes the guidance
scale as an input (`FluxPipeline._pack_latents` / `_unpack_latents` / `_prepare_latent_image_ids`).
A wide canvas (SynCD: target and references side by side, [B, C, H, n*W]) is packed the same way, so its
tokens are the row-major scan of the whole canvas and its ids those of one wide image.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Size = tuple[int, int]


def _rows(value: Any) -> list[Size] | None:
    """The per-sample (a, b) rows of a time-id argument, or None for one pair meaning every sample.

    Accepts a pair of numbers, a list of pairs, a [B, 2] tensor, or default_collate's [as [B], bs [B]].
    """
    if isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) and v.ndim == 1 for v in value):
        value = torch.stack(list(value), dim=1)
    if len(value) == 2 and all(isinstance(v, (int, float)) or torch.is_tensor(v) and v.ndim == 0 for v in value):
        return None
    return [tuple(int(v) for v in row) for row in value]


def sdxl_add_time_ids(
    original_size: Size | Sequence[Size],
    crop_top_left: Size | Sequence[Size],
    target_size: Size | Sequence[Size],
    *,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """SDXL time ids [B, 6]: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample.

    Each argument is one (h, w)-style pair for every sample, or a list of pairs (one per sample, as a
    dataset records each image's original size and random-crop offset). `batch` defaults to the length of
    the lists, or 1 when all three are single pairs.
    """
    args = {"original_size": original_size, "crop_top_left": crop_top_left, "target_size": target_size}
    rows = {name: _rows(v) for name, v in args.items()}
    if batch is None:
        batch = max((len(r) for r in rows.values() if r is not None), default=1)
    for name, r in rows.items():
        if r is None:
            rows[name] = [tuple(int(v) for v in args[name])] * batch
        elif len(r) != batch:
            raise ValueError(f"{name}: {len(r)} entries for a batch of {batch}")
    per_sample = zip(*rows.values())
    return torch.tensor([[*o, *c, *t] for o, c, t in per_sample], dtype=dtype, device=device)


def flux_pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches in row-major order, channels (c, dy, dx)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches; latent size {h}x{w} must be even")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def flux_unpack_latents(packed: torch.Tensor, latent_hw: Size) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] for latent size `latent_hw` = (H, W); inverse of `flux_pack_latents`."""
    b, n, c4 = packed.shape
    h, w = latent_hw
    if h % 2 or w % 2 or n != (h // 2) * (w // 2) or c4 % 4:
        raise ValueError(f"cannot unpack {tuple(packed.shape)} tokens into a {h}x{w} latent")
    x = packed.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def flux_latent_image_ids(latent_hw: Size, *, device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Position ids [(H/2)(W/2), 3] = (0, row, col) of each packed token of an H x W latent."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(device=device, dtype=dtype)


def flux_text_ids(seq_len: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Text token ids [L, 3]: all zeros (FLUX places text at the origin of its rotary grid)."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def flux_guidance(transformer: Any, scale: float, batch: int, *,
                  device: torch.device | str | None = None) -> torch.Tensor | None:
    """The guidance input [B] (float32) of a guidance-distilled FLUX transformer (FLUX.1-dev), else None."""
    config = getattr(transformer, "config", transformer)
    if not getattr(config, "guidance_embeds", False):
        return None
    return torch.full((batch,), float(scale), device=device, dtype=torch.float32)
