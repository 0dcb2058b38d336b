"""Cross-view self-attention: each image of a batch attends to its own tokens and to other images' tokens.

SyncMVD / SyncTweedies' "sample-wise" attention (each view also sees its neighbours i-1, i+1 and, early in
sampling, a reference view) is one instance; SynCD's shared attention across a set of images is another.
What varies is only *which* images' keys/values each image sees and with what weight, so the processor
takes a `ViewContext` that builds, per image, a list of context images and a log-weight for each
(-inf = masked). Images are grouped into blocks of `num_views` (the CFG halves [uncond; cond] are separate
blocks, so the halves never mix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ViewContext:
    """Which images each image attends to. Mutable: a sampling hook flips `reference_enabled` per step.

    neighbours: offsets (e.g. (-1, 1)); circular wraps around the block; reference: view ids added with
    weight `reference_weight` (a log-bias log(w) on their logits, so w = 1 is plain joint attention);
    max_batch: images processed per chunk (the original's split_groups) to bound memory;
    graph: explicit neighbour lists per view (camera layouts that are not a ring), replacing `neighbours`.
    """

    num_views: int
    neighbours: tuple[int, ...] = (-1, 1)
    circular: bool = True
    reference: tuple[int, ...] = ()
    reference_weight: float = 1.0
    reference_enabled: bool = True
    max_batch: int = 1000
    graph: tuple[tuple[int, ...], ...] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def context_of(self, v: int) -> list[tuple[int, float]]:
        """(view, log-weight) pairs view `v` attends to: itself, its neighbours, then the references."""
        n = self.num_views
        if self.graph is not None:
            candidates = list(self.graph[v])
        else:
            candidates = [(v + o) % n if self.circular else v + o for o in self.neighbours]
        out, seen = [(v, 0.0)], {v}
        for j in candidates:
            if 0 <= j < n and j not in seen:
                out.append((j, 0.0))
                seen.add(j)
        if self.reference_enabled:
            w = math.log(self.reference_weight) if self.reference_weight > 0 else -math.inf
            for r in self.reference:
                if r not in seen:
                    out.append((r, w))
                    seen.add(r)
        return out

    def plan(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [B, k] of context images, log-weight [B, k]) for a batch of B = blocks * num_views images.

        Rows shorter than k are padded with the image itself at weight -inf (masked).
        """
        key = (batch, str(device), self.reference_enabled)
        if key in self._cache:
            return self._cache[key]
        n = self.num_views
        if batch % n:
            raise ValueError(f"batch {batch} is not a multiple of num_views {n}")
        per_view = [self.context_of(v) for v in range(n)]
        width = max(len(c) for c in per_view)
        rows, biases = [], []
        for b in range(batch):
            block, v = divmod(b, n)
            ctx = per_view[v] + [(v, -math.inf)] * (width - len(per_view[v]))
            rows.append([block * n + j for j, _ in ctx])
            biases.append([w for _, w in ctx])
        out = (torch.tensor(rows, device=device), torch.tensor(biases, device=device))
        self._cache[key] = out
        return out


class CrossViewAttnProcessor:
    """Self-attention over the tokens of several images (SDPA). Drop-in for diffusers' AttnProcessor2_0 on
    self-attention layers (attn1); with no neighbours and no reference it computes exactly the same thing."""

    def __init__(self, context: ViewContext):
        self.context = context

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        head_dim = k.shape[-1] // heads
        split = lambda x: x.view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, heads, L, d]
        q, k, v = split(q), split(k), split(v)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        out = self._attend(q, k, v, length)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
        """q, k, v: [B, heads, L, d] -> [B, heads, L, d], each image attending to its planned context."""
        index, bias = self.context.plan(q.shape[0], q.device)
        if index.shape[1] == 1:
            return F.scaled_dot_product_attention(q, k, v)
        outs = []
        step = max(1, self.context.max_batch)
        for s in range(0, q.shape[0], step):
            idx, bb = index[s:s + step], bias[s:s + step]
            kk = k[idx].permute(0, 2, 1, 3, 4).flatten(2, 3)  # [b, heads, k*L, d]
            vv = v[idx].permute(0, 2, 1, 3, 4).flatten(2, 3)
            mask = None
            if (bb != 0).any():
                mask = bb.repeat_interleave(length, dim=1)[:, None, None, :].to(q.dtype)  # [b, 1, 1, k*L]
            outs.append(F.scaled_dot_product_attention(q[s:s + step], kk, vv, attn_mask=mask))
        return torch.cat(outs)


def install_cross_view_attention(unet, context: ViewContext, where="attn1"):
    """Put a CrossViewAttnProcessor (sharing `context`) on the matching layers; returns the restore handle."""
    from common.attention.processors import set_processors

    proc = CrossViewAttnProcessor(context)
    return set_processors(unet, lambda name, module: proc, where)
