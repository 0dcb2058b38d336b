"""DDIM and DDPM steps written as functions of (x_t, x0|t) only — the heart of SyncTweedies.

The synchronized step is the method's novelty: once a step is a function of the state and its Tweedie
estimate alone, replacing x0|t by a synchronised value (case 2) changes the implied noise consistently,
and the same function steps a canonical variable z_t (cases 4-5) that no network ever saw. Diffusers'
schedulers take a model output instead, so we keep the formulas here and wrap them in `SyncStepper`,
which quacks like a scheduler for `common.pipelines.loop.sample`.

Unlike the original `compute_prev_state`, DDIM with eta > 0 scales its noise by sigma_eta, and x0|t is
clipped / thresholded where the wrapped scheduler's config asks for it (DeepFloyd IF's does) in DDIM steps too;
the original thresholds in DDPM steps only (`threshold=False`, flag --x0_thresholding off).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from common.pipelines.tweedie import split_variance, to_x0

METHODS = ("ddim", "ddpm")


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t'} = sqrt(abar') x0 + sqrt(1 - abar' - s^2) eps(x_t, x0) + s noise, s = eta * sigma_ddim.

    Shapes: x_t, x0, noise [B, C, ...]; abar_* scalars. eps is implied by (x_t, x0), never taken from a model.
    """
    # the original's compute_prev_state form (xt_coeff x_t + x0_coeff x0), so results match it bit for bit;
    # scalar coefficients stay in the scheduler's precision (float32), as in diffusers
    var = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * var ** 0.5
    root = torch.sqrt((1 - abar_prev - std ** 2).clamp(min=0))
    xt_coeff = root / torch.sqrt(1 - abar_t)
    x0_coeff = torch.sqrt(abar_prev) - torch.sqrt(abar_t) / torch.sqrt(1 - abar_t) * root
    out = xt_coeff * x_t + x0_coeff * x0
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + std * noise
    return out


def ddpm_posterior_mean(x_t: torch.Tensor, x0: torch.Tensor, abar_t: torch.Tensor,
                        abar_prev: torch.Tensor) -> torch.Tensor:
    """Mean of q(x_{t'} | x_t, x0): [sqrt(abar') beta_t x0 + sqrt(alpha_t)(1 - abar') x_t] / (1 - abar_t)."""
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    c0 = abar_prev.sqrt() * beta_t / (1 - abar_t)
    cx = alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)
    return c0 * x0 + cx * x_t


def ddpm_std(abar_t: torch.Tensor, abar_prev: torch.Tensor, variance_type: str,
             predicted: torch.Tensor | None = None) -> torch.Tensor:
    """Std of the DDPM step, computed as diffusers' DDPMScheduler does for each `variance_type`.

    `predicted`: the model's variance channels (learned / learned_range, DeepFloyd IF), else ignored.
    """
    beta_t = 1 - abar_t / abar_prev
    small = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20)
    if variance_type == "fixed_small":
        return small ** 0.5
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(small))
    if variance_type == "fixed_large":
        return beta_t ** 0.5
    if variance_type == "fixed_large_log":
        return torch.exp(0.5 * torch.log(beta_t))
    if variance_type in ("learned_range", "learned"):
        if predicted is None:
            return small ** 0.5
        if variance_type == "learned":
            return torch.exp(0.5 * predicted)
        frac = (predicted + 1) / 2
        return torch.exp(0.5 * (frac * torch.log(beta_t) + (1 - frac) * torch.log(small)))
    raise ValueError(f"unsupported variance_type {variance_type}")


def ddpm_step(x_t: torch.Tensor, x0: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor,
              std: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t'} = posterior mean + std * noise (no noise when std is None, i.e. at t = 0)."""
    out = ddpm_posterior_mean(x_t, x0, abar_t, abar_prev)
    if std is not None:
        out = out + std * noise
    return out


@dataclass
class StepCoefficients:
    abar_t: torch.Tensor
    abar_prev: torch.Tensor
    prev_t: int


class SyncStepper:
    """A scheduler look-alike whose `step` runs `ddim_step` / `ddpm_step` on (x_t, x0|t).

    It keeps the wrapped diffusers scheduler's betas, timesteps and clipping/thresholding config, so the
    loop's Tweedie conversions (common.pipelines.tweedie) see the same alphas. `step_x0` is the same step
    for callers that already hold x0|t (the canonical variable of cases 4-6).
    """

    def __init__(self, scheduler, method: str = "ddim", eta: float = 0.0,
                 generator: torch.Generator | None = None, threshold: bool = True):
        if method not in METHODS:
            raise ValueError(f"sampling method must be one of {METHODS}, got {method!r}")
        self.scheduler, self.method, self.eta, self.generator = scheduler, method, eta, generator
        self.threshold = threshold
        # set by the canonical cases 4-5, whose per-instance step is thrown away: that step then draws no noise,
        # so the generator's draws are the original's (z_t's noise only)
        self.discard_next_step = False
        self.config = scheduler.config
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.final_alpha_cumprod = getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0))

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.num_train_timesteps)

    def scale_model_input(self, sample: torch.Tensor, t=None) -> torch.Tensor:
        return sample

    def prev_timestep(self, t) -> int:
        """t - T/S for DDIM and DDPM alike, as the original's compute_prev_state (and diffusers' DDIM)."""
        return int(t) - self.num_train_timesteps // self.scheduler.num_inference_steps

    def coefficients(self, t, like: torch.Tensor) -> StepCoefficients:
        prev = self.prev_timestep(t)
        ac = self.alphas_cumprod.to(like.device)  # float32 like the scheduler; products promote to like's dtype
        abar_t = ac[int(t)]
        if prev >= 0:
            abar_prev = ac[prev]
        elif self.method == "ddim":
            abar_prev = self.final_alpha_cumprod.to(like.device, ac.dtype)
        else:
            abar_prev = torch.tensor(1.0, device=like.device, dtype=ac.dtype)
        return StepCoefficients(abar_t, abar_prev, prev)

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Thresholding / clipping of x0|t where the wrapped scheduler's config asks for it. threshold=False is
        the original's compute_prev_state: DDIM steps never threshold, DDPM steps still follow the config."""
        if not self.threshold and self.method == "ddim":
            return x0
        if self.config.get("thresholding", False):
            return self.scheduler._threshold_sample(x0)
        if self.config.get("clip_sample", False):
            r = self.config.get("clip_sample_range", 1.0)
            return x0.clamp(-r, r)
        return x0

    def step_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t, *, variance: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reverse step from (x_t, x0|t). `variance`: the model's variance channels (IF), for DDPM only."""
        c = self.coefficients(t, x_t)
        x0 = self.clip_x0(x0)
        generator = generator or self.generator
        if self.method == "ddim":
            if self.eta > 0 and noise is None:
                noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            return ddim_step(x_t, x0, c.abar_t, c.abar_prev, self.eta, noise)
        if int(t) <= 0:
            return ddpm_step(x_t, x0, c.abar_t, c.abar_prev)
        vtype = self.config.get("variance_type", "fixed_small")
        # as the original: without predicted variance channels the std is always fixed_small_log (whatever the
        # config says); "learned" takes the prediction ** 0.5, "learned_range" interpolates the log variance
        if variance is None or vtype not in ("learned", "learned_range"):
            std = ddpm_std(c.abar_t, c.abar_prev, "fixed_small_log")
        elif vtype == "learned":
            std = variance ** 0.5
        else:
            std = ddpm_std(c.abar_t, c.abar_prev, vtype, variance)
        if noise is None:
            noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return ddpm_step(x_t, x0, c.abar_t, c.abar_prev, std, noise)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = False, **_: Any):
        """diffusers-style step: model output -> x0|t -> `step_x0`. Returns (prev_sample,)."""
        _, variance = split_variance(model_output, sample.shape[1])
        x0 = to_x0(self, model_output, sample, timestep, 0)
        if self.discard_next_step:
            self.discard_next_step = False
            variance_noise = torch.zeros_like(sample)
        prev = self.step_x0(sample, x0, timestep, variance=variance, noise=variance_noise, generator=generator)
        return (prev,)
