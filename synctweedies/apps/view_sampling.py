"""The block every multi-view app repeats: install sample-wise attention, run `sync_sample`, restore.

SyncMVD's "sample-wise" attention lets each view attend to a few other views (neighbours always, reference
views early in sampling); the UNet's processors must be put back even when sampling fails, so the
install -> sample -> restore sequence lives here once (wide image, panorama, mesh, Gaussians).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from common.attention.reference import ViewContext, install_cross_view_attention
from common.pipelines.loop import Hook
from synctweedies.runtime import ReferenceAttentionSchedule
from synctweedies.sampler import SyncOptions, SyncResult, sync_sample


@dataclass
class GraphViewContext(ViewContext):
    """A ViewContext whose neighbours are explicit per-view lists (camera layouts that are not a ring).

    graph[v] lists the views v attends to besides itself; shorter lists are padded with masked entries.
    """

    graph: Sequence[Sequence[int]] = field(default_factory=tuple)

    def plan(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (batch, str(device), self.reference_enabled)
        if key in self._cache:
            return self._cache[key]
        n = self.num_views
        if batch % n:
            raise ValueError(f"batch {batch} is not a multiple of num_views {n}")
        refs = self.reference if self.reference_enabled else ()
        width = 1 + max((len(g) for g in self.graph), default=0) + len(refs)
        rows, biases = [], []
        for b in range(batch):
            block, v = divmod(b, n)
            ids, bias = [v], [0.0]
            for j in self.graph[v]:
                if j not in ids:
                    ids.append(j)
                    bias.append(0.0)
            for r in refs:
                if r not in ids:
                    ids.append(r)
                    bias.append(math.log(self.reference_weight) if self.reference_weight > 0 else -math.inf)
            pad = width - len(ids)
            ids, bias = ids + [v] * pad, bias + [-math.inf] * pad
            rows.append([block * n + j for j in ids])
            biases.append(bias)
        out = (torch.tensor(rows, device=device), torch.tensor(biases, device=device))
        self._cache[key] = out
        return out


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
