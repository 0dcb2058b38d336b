"""Flow-matching training pieces: where sigmas are drawn (density, shift), how x_t is built, loss weighting.

Conventions (FLUX / SD3, diffusers' flow-matching examples): x_t = (1 - sigma) x_0 + sigma eps, the model
predicts the velocity eps - x_0, and the transformer's timestep input is sigma (diffusers' examples pass
`timesteps / 1000`). The density schemes "logit_normal" and "mode" and the loss weightings follow diffusers'
`compute_density_for_timestep_sampling` / `compute_loss_weighting_for_sd3` (same random draws for the same
generator); "beta" (SynCD: Beta(4, 2), biased to high noise) and the resolution shift of FLUX
(`calculate_shift` + the scheduler's exponential time shift) are added.
"""
from __future__ import annotations

import math
from typing import Any

import torch

DENSITY_SCHEMES = ("logit_normal", "mode", "beta", "uniform")
WEIGHTING_SCHEMES = ("sigma_sqrt", "cosmap", "none")
# diffusers' examples pass one --weighting_scheme to both functions: these names mean "uniform" here.
_UNIFORM_ALIASES = ("uniform", "none", "sigma_sqrt", "cosmap")


def sample_timestep_density(
    scheme: str,
    batch: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    beta_a: float = 4.0,
    beta_b: float = 2.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """u: [batch] in [0, 1], drawn from the density `scheme` (see DENSITY_SCHEMES).

    "beta" maps a uniform draw through the inverse regularized incomplete beta function, so it honours
    `generator` like the others (torch's Beta sampler takes none).
    """
    if scheme == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch,), device=device, generator=generator)
        return torch.sigmoid(u)
    if scheme == "mode":
        u = torch.rand(size=(batch,), device=device, generator=generator)
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme == "beta":
        from scipy.special import betaincinv

        u = torch.rand(size=(batch,), device=device, generator=generator)
        x = betaincinv(beta_a, beta_b, u.detach().cpu().double().numpy())
        return torch.from_numpy(x).to(device=device, dtype=u.dtype)
    if scheme in _UNIFORM_ALIASES:
        return torch.rand(size=(batch,), device=device, generator=generator)
    raise ValueError(f"unknown timestep density {scheme!r}; choose from {', '.join(DENSITY_SCHEMES)}")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift s' = shift * s / (1 + (shift - 1) * s): shift > 1 moves toward noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(image_seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift exp(mu), mu linear in the image token count (diffusers' calculate_shift).

    `shift_sigmas(s, resolution_shift(L))` equals the scheduler's exponential time shift with mu at sigma 1.
    """
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    mu = image_seq_len * slope + base_shift - slope * base_seq
    return math.exp(mu)


def scheduler_resolution_shift(scheduler: Any, image_seq_len: int) -> float:
    """`resolution_shift` with base/max sequence lengths and shifts read from a flow-matching scheduler config."""
    cfg = scheduler.config
    return resolution_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


def scheduler_sigmas(u: torch.Tensor, scheduler: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [B], timesteps [B]) at index floor(u * T) of a *training* scheduler's tables (diffusers' examples).

    Use a scheduler on which `set_timesteps` was never called: its tables are the training ones (already
    shifted by `config.shift` unless it uses dynamic shifting).
    """
    indices = (u * scheduler.config.num_train_timesteps).long().cpu()
    return scheduler.sigmas[indices].to(u.device), scheduler.timesteps[indices].to(u.device)


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) for x0, noise: [B, ...] and sigmas: [B]; x_t = (1 - s) x0 + s noise, v = noise - x0."""
    s = sigmas.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights [B] for `scheme` in WEIGHTING_SCHEMES (others weigh 1), as SD3's examples."""
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None = None,
                       token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE: per-sample mean over the kept elements, then the batch mean.

    pred, target: [B, ...] (FLUX packed: [B, L, C]); weighting: [B] or None; token_mask: bool [B, L] or [L]
    over dim 1 (e.g. SynCD's target tokens of a packed target-plus-references canvas), or None for all.
    """
    err = (pred.float() - target.float()) ** 2
    if weighting is not None:
        err = err * weighting.float().reshape(-1, *([1] * (err.ndim - 1)))
    if token_mask is None:
        return err.reshape(err.shape[0], -1).mean(1).mean()
    keep = token_mask.to(err.device, torch.bool).expand(err.shape[:2])
    per_sample = (err * keep.reshape(*keep.shape, *([1] * (err.ndim - 2)))).reshape(err.shape[0], -1).sum(1)
    count = keep.sum(1) * math.prod(err.shape[2:])
    return (per_sample / count.clamp_min(1)).mean()
