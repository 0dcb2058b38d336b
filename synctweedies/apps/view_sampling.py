"""The block every multi-view app repeats: install sample-wise attention, run `sync_sample`, restore.

SyncMVD's "sample-wise" attention lets each view attend to a few other views (neighbours always, reference
views early in sampling); the UNet's processors must be put back even when sampling fails, so the
install -> sample -> restore sequence lives here once (wide image, panorama, mesh, Gaussians).
"""
from __future__ import annotations

from typing import Iterable

import torch

from common.attention.reference import ViewContext, install_cross_view_attention
from common.pipelines.loop import Hook
from synctweedies.runtime import ReferenceAttentionSchedule
from synctweedies.sampler import SyncOptions, SyncResult, sync_sample


def sample_with_view_attention(pipe, setup, projection, options: SyncOptions, context: ViewContext, *,
                               ref_attention_end: float, timesteps=None, x_T: torch.Tensor | None = None,
                               z_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                               hooks: Iterable[Hook] = (), progress: bool = True) -> SyncResult:
    """Sample with `context`'s cross-view attention on pipe.unet (reference views while
    t >= (1 - ref_attention_end) T); the UNet's previous processors are restored afterwards."""
    handle = install_cross_view_attention(pipe.unet, context)
    schedule = ReferenceAttentionSchedule(context, ref_attention_end, pipe.scheduler.config.num_train_timesteps)
    try:
        return sync_sample(setup.denoiser, pipe.scheduler, projection, options=options,
                           timesteps=setup.timesteps if timesteps is None else timesteps, x_T=x_T, z_T=z_T,
                           generator=generator, hooks=[schedule, *hooks], progress=progress)
    finally:
        handle.restore()
