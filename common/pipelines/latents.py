"""VAE encode/decode with each family's scaling (SD/SDXL scaling factor, SDXL latents mean/std, FLUX shift)."""
from __future__ import annotations

import torch


def _mean_std(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is None or getattr(cfg, "latents_std", None) is None:
        return None
    shape = (1, len(cfg.latents_mean), 1, 1)
    return (torch.tensor(cfg.latents_mean).view(shape).to(like), torch.tensor(cfg.latents_std).view(shape).to(like))


def _needs_upcast(vae) -> bool:
    return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def decode_latents(vae, latents: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1].

    `upcast`: run an fp16 VAE marked `force_upcast` in fp32 (the SDXL VAE overflows in fp16). diffusers' SD
    pipelines decode in fp16 regardless; pass upcast=False to match them exactly.
    """
    upcast = upcast and _needs_upcast(vae)
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
    """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/8, W/8] (a posterior sample, or its mode).

    An fp16 VAE marked `force_upcast` (SDXL's) encodes in fp32, as diffusers' SDXL pipelines do; the latents
    come back in the VAE's dtype.
    """
    upcast = _needs_upcast(vae)
    if upcast:
        vae.to(torch.float32)
    try:
        dist = vae.encode(images.to(vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
    finally:
        if upcast:
            vae.to(torch.float16)
    latents = latents.to(vae.dtype)
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents - shift
    stats = _mean_std(vae, latents)
    if stats is not None:
        return (latents - stats[0]) * vae.config.scaling_factor / stats[1]
    return latents * vae.config.scaling_factor
