"""VAE encode/decode with each family's scaling (SD/SDXL scaling factor, SDXL latents mean/std, FLUX shift)."""
from __future__ import annotations

import torch


def _mean_std(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is None or getattr(cfg, "latents_std", None) is None:
        return None
    shape = (1, len(cfg.latents_mean), 1, 1)
    return (torch.tensor(cfg.latents_mean).view(shape).to(like), torch.tensor(cfg.latents_std).view(shape).to(like))


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] (fp16 VAEs that need it are upcast)."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    stats = _mean_std(vae, latents)
    if stats is not None:
        latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
    else:
        latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents + shift
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    if upcast:
        vae.to(torch.float16)
    return image


def encode_images(vae, images: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/8, W/8] (a posterior sample, or its mode)."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    latents = dist.sample(generator) if sample else dist.mode()
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents - shift
    stats = _mean_std(vae, latents)
    if stats is not None:
        return (latents - stats[0]) * vae.config.scaling_factor / stats[1]
    return latents * vae.config.scaling_factor
