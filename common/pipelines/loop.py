"""The one denoising loop every sampler builds on: predict -> (x0|t) -> step, with per-step hooks.

Hooks may replace the state at four points: the input x_t, the model output, the Tweedie estimate x0|t
and the next state x_{t-1}. A replaced x0|t is turned back into a model output of the scheduler's kind
(common.pipelines.tweedie), so the scheduler's own step runs; with no hook the loop is exactly diffusers'.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from tqdm.auto import tqdm

from common.pipelines.tweedie import from_x0, to_x0


@dataclass
class StepState:
    """What a hook sees at step `i` (timestep `t`). Tensors are [B, C, H, W] (or packed [B, N, C] for FLUX)."""

    i: int
    t: torch.Tensor
    num_steps: int
    x_t: torch.Tensor
    model_output: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    x_prev: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Hook:
    """Per-step callbacks; override the ones you need and assign to the state's fields to replace them."""

    def on_input(self, state: StepState) -> None: ...

    def on_prediction(self, state: StepState) -> None: ...

    def on_x0(self, state: StepState) -> None: ...

    def on_step_end(self, state: StepState) -> None: ...


class Denoiser(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor: ...


def sample(denoiser: Callable[..., torch.Tensor], scheduler, x_T: torch.Tensor,
           timesteps: Iterable[torch.Tensor] | None = None, *, hooks: Iterable[Hook] = (),
           extra_step_kwargs: dict[str, Any] | None = None, progress: bool = True,
           need_x0: bool | None = None) -> torch.Tensor:
    """Run the reverse process from x_T over `timesteps` (default: scheduler.timesteps) and return x_0.

    `denoiser(x_t, t, step)` returns the (guided) model output. `need_x0` forces computing x0|t every step
    (default: only when a hook is given).
    """
    hooks = list(hooks)
    timesteps = list(scheduler.timesteps if timesteps is None else timesteps)
    need_x0 = bool(hooks) if need_x0 is None else need_x0
    extra_step_kwargs = extra_step_kwargs or {}
    begin = _begin_index(scheduler, timesteps)  # > 0 when starting part-way (SDEdit, img2img)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    x = x_T
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling", leave=False)):
        state = StepState(i=i, t=t, num_steps=len(timesteps), x_t=x)
        for h in hooks:
            h.on_input(state)
        state.model_output = denoiser(state.x_t, t, i)
        for h in hooks:
            h.on_prediction(state)
        if need_x0:
            state.x0 = original_x0 = to_x0(scheduler, state.model_output, state.x_t, t, begin + i)
            for h in hooks:
                h.on_x0(state)
            if state.x0 is not original_x0:
                state.model_output = from_x0(scheduler, state.x0, state.x_t, t, begin + i, like=state.model_output)
        state.x_prev = scheduler.step(state.model_output, t, state.x_t, **extra_step_kwargs, return_dict=False)[0]
        for h in hooks:
            h.on_step_end(state)
        x = state.x_prev
    return x


def _begin_index(scheduler, timesteps: list) -> int:
    """Position of the first timestep in the scheduler's full schedule (index-based schedulers need it)."""
    full = getattr(scheduler, "timesteps", None)
    if full is None or not timesteps:
        return 0
    hits = (full == timesteps[0]).nonzero()
    return int(hits[0]) if len(hits) else 0
