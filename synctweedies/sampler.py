"""The one synchronized sampler: cases 0-6 as a hook on the shared loop (common.pipelines.loop.sample).

The loop's state is always the instance batch X_t [N, C, h, w]; the hook synchronises eps, x0|t or x_{t-1}
through the projection. Canonical cases (4-6) keep z_t inside the hook, step it with the same (x_t, x0|t)
step functions (synctweedies.steps) and re-render X_{t-1} = f(z_{t-1}); the loop's own per-instance step is
then overwritten. Steps with t <= (1 - mvd_end) T run unsynchronised, as the original does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from diffusers.utils.torch_utils import randn_tensor

from common.pipelines.loop import Hook, StepState, sample
from common.pipelines.tweedie import alpha_sigma, split_variance
from synctweedies.cases import Case, get_case
from synctweedies.projection import Projection
from synctweedies.steps import SyncStepper


@dataclass
class SyncOptions:
    """What selects the sampler's behaviour (flags of the original's main.py)."""

    case_num: int | str = 2
    mvd_end: float = 1.0
    initialize_xt_from_zt: bool = False
    sampling_method: str = "ddim"
    eta: float = 0.0
    # step noise (DDPM, eta > 0) from this generator; None: the run's generator. The original's wide and ambiguous
    # images draw it from the global RNG, which its main.py seeds with 2024 whatever --seed is
    step_generator: torch.Generator | None = None
    threshold_x0: bool = True  # clip / threshold x0|t as the scheduler config says (False: DDPM steps only, original)


@dataclass
class SyncResult:
    """instances: X_0 [N, C, h, w]; canonical: z_0 (canonical cases synced to the end) or g(X_0)."""

    instances: torch.Tensor
    canonical: torch.Tensor
    synced_steps: list[int] = field(default_factory=list)


ORIGINAL_STEP_SEED = 2024  # the original's main.py: seed_everything() seeds the global RNG its steps draw from
#: mvd_end that syncs every step, t = 0 included (the original's ambiguous images have no mvd_end test)
ALWAYS_SYNC = float("inf")


def sync_active(t, mvd_end: float, num_train_timesteps: int) -> bool:
    """Synchronise while t > (1 - mvd_end) T, strictly, as the original: mvd_end=1 syncs every step with
    t > 0, mvd_end=0 none, ALWAYS_SYNC every step."""
    return float(t) > (1.0 - mvd_end) * num_train_timesteps


class SyncHook(Hook):
    """Cases 0-6 on the shared loop. Holds z_t for the canonical cases."""

    def __init__(self, projection: Projection, case: Case, stepper: SyncStepper, mvd_end: float = 1.0,
                 z_T: torch.Tensor | None = None):
        self.projection, self.case, self.stepper, self.mvd_end = projection, case, stepper, mvd_end
        self.z = z_T
        self.active = False
        self.synced_steps: list[int] = []
        self._z_next: torch.Tensor | None = None

    def on_input(self, state: StepState) -> None:
        self.projection.begin_step(state.i, state.t, state.num_steps)
        self.active = self.case.quantity is not None and sync_active(
            state.t, self.mvd_end, self.stepper.num_train_timesteps)
        if self.active:
            self.synced_steps.append(state.i)
        elif self.case.canonical:
            self.z = None  # instances run on their own from here; the readout is g(X_0)

    def _alpha_sigma(self, state: StepState):
        return alpha_sigma(self.stepper, state.t, state.i, state.x_t)

    def on_x0(self, state: StepState) -> None:
        if not self.active or self.case.quantity == "x_prev":
            return
        p, x_t, (a, s) = self.projection, state.x_t, self._alpha_sigma(state)
        _, variance = split_variance(state.model_output, x_t.shape[1])
        if not self.case.canonical:
            if self.case.quantity == "x0":  # case 2: only the Tweedie estimates meet; X_t is kept
                state.x0 = p.sync(state.x0, "tweedie")
            else:  # case 1
                eps = (x_t - a * state.x0) / s
                state.x0 = (x_t - s * p.sync(eps, "eps")) / a
            return
        if self.case.quantity == "x0":  # case 5
            z0, var = self._canonical(state.x0, variance, "tweedie")
        else:  # case 4
            delta, var = self._canonical((x_t - a * state.x0) / s, variance, "eps")
            z0 = (self.z - s * delta) / a
        self._z_next = self.stepper.step_x0(self.z, z0, state.t, variance=var)
        self.stepper.discard_next_step = True  # the loop's own step is overwritten: it must not draw noise

    def _canonical(self, q: torch.Tensor, variance: torch.Tensor | None, var_type: str):
        """g of a per-instance quantity; IF's variance channels ride along so views see all 2C channels."""
        if variance is None or self.stepper.method != "ddpm":
            return self.projection.inverse(q, var_type), None
        both = self.projection.inverse(torch.cat([q, variance], 1), var_type)
        c = q.shape[1]
        return both[:, :c], both[:, c:]

    def on_step_end(self, state: StepState) -> None:
        if not self.active:
            return
        p = self.projection
        if not self.case.canonical:
            if self.case.quantity == "x_prev":  # case 3
                state.x_prev = p.sync(state.x_prev, "latent")
            return
        if self.case.quantity == "x_prev":  # case 6
            self._z_next = p.inverse(state.x_prev, "latent")
        self.z, self._z_next = self._z_next, None
        state.x_prev = p.forward(self.z, bg=state.x_prev)


def initial_state(projection: Projection, case: Case, channels: int, *, initialize_xt_from_zt: bool,
                  generator: torch.Generator | None, device, dtype,
                  x_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(X_T, z_T). Canonical cases and --initialize_xt_from_zt draw z_T and render X_T = f(z_T) over iid noise."""
    shape = projection.instance_shape(channels)
    if x_T is None:
        x_T = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)
    if not (case.canonical or initialize_xt_from_zt):
        return x_T, None
    z_T = projection.canonical_noise(channels, generator=generator, device=device, dtype=dtype)
    return projection.forward(z_T, bg=x_T), z_T


@torch.no_grad()
def sync_sample(denoiser: Callable, scheduler, projection: Projection, *, options: SyncOptions,
                timesteps: Iterable[torch.Tensor] | None = None, x_T: torch.Tensor | None = None,
                z_T: torch.Tensor | None = None, channels: int | None = None,
                generator: torch.Generator | None = None, hooks: Iterable[Hook] = (), progress: bool = True,
                device=None, dtype=None) -> SyncResult:
    """Run the synchronized reverse process and read out X_0 and the canonical result.

    `x_T` [N, C, h, w]: the iid instance noise (drawn here when None); `z_T`: a given canonical start
    (SDEdit); `denoiser(x, t, step)` maps the instance batch to model outputs (CFG inside).
    """
    case = get_case(options.case_num)
    channels = channels or (x_T.shape[1] if x_T is not None else z_T.shape[1])
    device = device or (x_T.device if x_T is not None else "cpu")
    step_generator = generator if options.step_generator is None else options.step_generator
    stepper = SyncStepper(scheduler, options.sampling_method, options.eta, step_generator, options.threshold_x0)
    dtype = dtype or (x_T.dtype if x_T is not None else torch.float32)
    if z_T is None:
        x_T, z_T = initial_state(projection, case, channels, initialize_xt_from_zt=options.initialize_xt_from_zt,
                                 generator=generator, device=device, dtype=dtype, x_T=x_T)
    elif x_T is None or case.canonical or options.initialize_xt_from_zt:
        x_T = projection.forward(z_T, bg=x_T)
    hook = SyncHook(projection, case, stepper, options.mvd_end, z_T if case.canonical else None)
    x0 = sample(denoiser, stepper, x_T, timesteps, hooks=[hook, *hooks], progress=progress, need_x0=True)
    canonical = hook.z if (case.canonical and hook.z is not None) else projection.inverse(x0, "tweedie")
    return SyncResult(x0, canonical, hook.synced_steps)
