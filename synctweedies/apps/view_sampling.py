"""SyncMVD's "sample-wise" attention around `sync_sample`, from common's attention seams.

Each view attends to a few other views (neighbours always, reference views early in sampling). The plan
(`common.attention.plan.AttentionPlan`), its schedule (`common.attention.schedule.ReferenceAttentionSchedule`)
and the install -> sample -> restore block (`plan_installed`) are common's; this module only puts them
together for the four multi-view apps (wide image, panorama, mesh, Gaussians).
"""
from __future__ import annotations

from typing import Iterable

import torch

from common.attention.plan import AttentionPlan
from common.attention.schedule import ReferenceAttentionSchedule, plan_installed
from common.pipelines.loop import Hook, StepState
from synctweedies.sampler import SyncOptions, SyncResult, sync_sample


class StrictReferenceSchedule(ReferenceAttentionSchedule):
    """Reference attention while t > (1 - ref_attention_end) T, strictly, as the original's noise-prediction
    functions (common's schedule uses >=; they differ only when t lands on the threshold)."""

    def on_input(self, state: StepState) -> None:
        self.context.reference_enabled = float(state.t) > (1 - self.end) * self.T


def ring_plan(num_views: int, max_batch: int) -> AttentionPlan:
    """Views on a ring (wide image, panorama, Gaussians): neighbours i-1, i+1 (wrapping) and view n // 2 as the
    reference, as the original's sample-wise attention."""
    return AttentionPlan(num_images=num_views, neighbours=(-1, 1), circular=True, reference=(num_views // 2,),
                         max_batch=max_batch)


def sample_with_view_attention(pipe, setup, projection, options: SyncOptions, plan: AttentionPlan, *,
                               ref_attention_end: float, timesteps=None, x_T: torch.Tensor | None = None,
                               z_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                               hooks: Iterable[Hook] = (), progress: bool = True) -> SyncResult:
    """Sample with `plan`'s cross-view attention on pipe.unet's self-attention (reference views while
    t > (1 - ref_attention_end) T); the UNet's previous processors come back afterwards, also on failure."""
    schedule = StrictReferenceSchedule(plan, ref_attention_end, pipe.scheduler.config.num_train_timesteps)
    with plan_installed(pipe.unet, plan, "attn1"):
        return sync_sample(setup.denoiser, pipe.scheduler, projection, options=options,
                           timesteps=setup.timesteps if timesteps is None else timesteps, x_T=x_T, z_T=z_T,
                           generator=generator, hooks=[schedule, *hooks], progress=progress)
