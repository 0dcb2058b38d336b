"""Cross-view self-attention: each image of a batch attends to its own tokens and to other images' tokens.

SyncMVD / SyncTweedies' "sample-wise" attention (each view also sees its neighbours i-1, i+1 and, early in
sampling, a reference view) is one instance; SynCD's shared attention across a set of images is another.
What varies is only *which* images' keys/values each image sees and with what weight, so the processor
takes a `ViewContext` that builds, per image, a list of context images and a log-weight for each
(-inf = masked). Images are grouped into blocks of `num_views` (the CFG halves [uncond; cond] are separate
blocks, so the halves never mix). ViewContext is now the whole-image case of common.attention.plan's
AttentionPlan (token masks, K/V bank, FLUX blocks); this module keeps the names SyncTweedies imports.
"""
from __future__ import annotations

import torch

from common.attention.plan import AttentionPlan, PlanAttnProcessor


class ViewContext(AttentionPlan):
    """An AttentionPlan over whole images (no token masks) with SyncTweedies' defaults: ring neighbours
    (-1, 1). Mutable: a sampling hook flips `reference_enabled` per step.

    neighbours: offsets (e.g. (-1, 1)); circular wraps around the block; reference: view ids added with
    weight `reference_weight` (a log-bias log(w) on their logits, so w = 1 is plain joint attention);
    max_batch: images processed per chunk (the original's split_groups) to bound memory;
    graph: explicit neighbour lists per view (camera layouts that are not a ring), replacing `neighbours`.
    """

    def __init__(self, num_views: int, neighbours: tuple[int, ...] = (-1, 1), circular: bool = True,
                 reference: tuple[int, ...] = (), reference_weight: float = 1.0, reference_enabled: bool = True,
                 max_batch: int = 1000, graph: tuple[tuple[int, ...], ...] | None = None):
        super().__init__(num_images=num_views, neighbours=tuple(neighbours), circular=circular,
                         reference=tuple(reference), reference_weight=reference_weight,
                         reference_enabled=reference_enabled, max_batch=max_batch, graph=graph)

    @property
    def num_views(self) -> int:
        return self.num_images

    def plan(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [B, k] of context images, log-weight [B, k]); see AttentionPlan.groups."""
        return self.groups(batch, device)


class CrossViewAttnProcessor(PlanAttnProcessor):
    """Self-attention over the tokens of several images with a fixed ViewContext (the SyncTweedies path).
    Drop-in for diffusers' AttnProcessor2_0 on attn1; a `plan` passed per call takes precedence."""

    def __init__(self, context: AttentionPlan, name: str = ""):
        super().__init__(name, default_plan=context)

    @property
    def context(self) -> AttentionPlan:
        return self.default_plan


def install_cross_view_attention(unet, context: AttentionPlan, where="attn1"):
    """Put a CrossViewAttnProcessor (sharing `context`) on the matching layers; returns the restore handle."""
    from common.attention.processors import set_processors

    return set_processors(unet, lambda name, module: CrossViewAttnProcessor(context, name), where)
