"""The denoising training objective shared by every fine-tuning method (Custom Diffusion, MuDI, SynCD, ...).

Noise, timestep and target follow the scheduler's configuration (epsilon / v-prediction for DDPM-type
schedulers; velocity for flow matching), so a method only decides what conditions the model and which
latent cells count (the mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoisedBatch:
    """x_t = noised latents [B, C, h, w]; target: what the model must predict; t: timesteps [B]."""

    x_t: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


def noise_latents(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None,
                  timesteps: torch.Tensor | None = None) -> NoisedBatch:
    """Draw eps ~ N(0, I) and t ~ U{0..T-1} (uniform sigma index for flow matching); build x_t and the target."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    num_train = scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps = torch.randint(0, num_train, (b,), generator=generator, device=latents.device)
    if hasattr(scheduler, "alphas_cumprod"):
        x_t = scheduler.add_noise(latents, noise, timesteps)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {kind} for training")
        return NoisedBatch(x_t, target, timesteps, noise)
    # Flow matching: x_t = (1 - s) x0 + s eps, target velocity eps - x0; timestep = s * T.
    sigma = (timesteps.float() + 1) / num_train
    s = sigma.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return NoisedBatch((1 - s) * latents + s * noise, noise - latents, sigma * num_train, noise)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE averaged over unmasked cells, then over the batch. mask: [B, 1, h, w] (or None)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype).expand_as(err)
    per_sample = (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    return per_sample.mean()
