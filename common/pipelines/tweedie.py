"""Conversions between a model output and the Tweedie estimate x0|t, for every parameterisation we use.

A method that edits x0|t (SyncTweedies averages it across views, for instance) hands the loop a new x0;
the loop turns it back into a model output of the scheduler's own kind, so the scheduler's step (DDIM,
DDPM, Euler / k-diffusion, Euler flow matching) runs unchanged.

Three state conventions (x_t as the scheduler holds it, before `scale_model_input`):
* variance preserving (DDIM, DDPM, ...):  x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
* k-diffusion sigmas (Euler, Heun, LMS, ...): x_t = x0 + sigma eps
* flow matching (FLUX):                   x_t = (1 - s) x0 + s eps, the model predicts v = eps - x0
"""
from __future__ import annotations

import torch


def is_flow_matching(scheduler) -> bool:
    return hasattr(scheduler, "sigmas") and not hasattr(scheduler, "alphas_cumprod")


def is_k_diffusion(scheduler) -> bool:
    """Schedulers that keep unscaled states x0 + sigma eps (they hold both `sigmas` and `alphas_cumprod`)."""
    return getattr(scheduler, "sigmas", None) is not None and hasattr(scheduler, "alphas_cumprod")


def alpha_sigma(scheduler, t, step_index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) with x_t = alpha_t x0 + sigma_t eps, broadcastable to `like`.

    Flow matching: alpha = 1 - s, sigma = s. k-diffusion: alpha = 1, sigma = sigma_t. DDPM family:
    sqrt(abar_t), sqrt(1 - abar_t).
    """
    if is_flow_matching(scheduler):
        s = scheduler.sigmas[step_index].to(like.device, torch.float32)
        a = 1.0 - s
    elif is_k_diffusion(scheduler):
        s = scheduler.sigmas[step_index].to(like.device, torch.float32)
        a = torch.ones_like(s)
    else:
        abar = scheduler.alphas_cumprod.to(like.device)[int(t)].to(torch.float32)
        a, s = abar.sqrt(), (1 - abar).sqrt()
    return a.to(like.dtype), s.to(like.dtype)


def split_variance(model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeepFloyd IF predicts [eps, variance] on 2C channels: return (prediction, variance or None)."""
    if model_output.shape[1] == 2 * channels and model_output.ndim == 4:
        return model_output[:, :channels], model_output[:, channels:]
    return model_output, None


def _kind(scheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {kind}")
    return kind


def to_x0(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t, step_index: int) -> torch.Tensor:
    """Tweedie's estimate x0|t from the model output. Shapes: like x_t."""
    pred, _ = split_variance(model_output, x_t.shape[1])
    a, s = alpha_sigma(scheduler, t, step_index, x_t)
    if is_flow_matching(scheduler):
        return x_t - s * pred  # velocity v = eps - x0
    kind = _kind(scheduler)
    if kind == "sample":
        return pred
    if is_k_diffusion(scheduler):  # as diffusers' Euler: v-prediction on the scaled input x_t / sqrt(s^2 + 1)
        if kind == "epsilon":
            return x_t - s * pred
        return x_t / (s**2 + 1) - s / (s**2 + 1).sqrt() * pred
    if kind == "epsilon":
        return (x_t - s * pred) / a
    return a * x_t - s * pred


def from_x0(scheduler, x0: torch.Tensor, x_t: torch.Tensor, t, step_index: int,
            like: torch.Tensor) -> torch.Tensor:
    """The model output (same kind and channel layout as `like`) whose Tweedie estimate is `x0`."""
    _, variance = split_variance(like, x_t.shape[1])
    a, s = alpha_sigma(scheduler, t, step_index, x_t)
    if is_flow_matching(scheduler):
        pred = (x_t - x0) / s
    elif _kind(scheduler) == "sample":
        pred = x0
    elif is_k_diffusion(scheduler):
        eps = (x_t - x0) / s
        pred = eps if _kind(scheduler) == "epsilon" else (x_t / (s**2 + 1) - x0) * (s**2 + 1).sqrt() / s
    else:
        eps = (x_t - a * x0) / s
        pred = eps if _kind(scheduler) == "epsilon" else a * eps - s * x0
    return pred if variance is None else torch.cat([pred, variance], dim=1)


def to_eps(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t, step_index: int) -> torch.Tensor:
    """The noise estimate eps|t implied by the model output."""
    x0 = to_x0(scheduler, model_output, x_t, t, step_index)
    a, s = alpha_sigma(scheduler, t, step_index, x_t)
    return (x_t - a * x0) / s
