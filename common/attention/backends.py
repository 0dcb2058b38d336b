"""Attention with a structured key mask: SDPA with a dense boolean/additive mask (the reference) and
FlexAttention with a block mask (skips fully masked key blocks; unfused but exact on CPU).

The mask of every plan we build has the same shape of rule, so it is described by a few small tensors
(`KeyLayout`) instead of a dense [Lq, Lk] matrix: a query image's own tokens come first and are always
visible (optionally split into segments), and the extra keys after them (other images, a K/V bank) are
visible per key token, to image queries only unless `text_sees_extra`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {}


def register_backend(name: str) -> Callable:
    def deco(fn):
        BACKENDS[name] = fn
        return fn
    return deco


@dataclass
class KeyLayout:
    """Which keys each query sees. Queries are [text (text_len); image] tokens of one image.

    own_len: keys [0, own_len) are the query image's own tokens (visible to all of its queries);
    visible: bool [B, Lk] for the extra keys (columns >= own_len; ignored below own_len);
    bias: float [B, Lk] additive log-weight per key (e.g. log of a reference view's weight) or None;
    text_sees_extra: text queries also see the visible extra keys (SynCD: they do not);
    segments: long [B, own_len] or None: own image tokens see own image tokens of the same segment only
    (a canvas of several images in one sequence); -1 marks text tokens, which see and are seen by all.
    """

    own_len: int
    text_len: int
    visible: torch.Tensor
    bias: torch.Tensor | None = None
    text_sees_extra: bool = False
    segments: torch.Tensor | None = None


def build_mask(layout: KeyLayout, q_len: int) -> torch.Tensor:
    """Dense boolean mask [B, Lq, Lk] (True = attend) of a layout; the reference for every backend."""
    vis = layout.visible
    device = vis.device
    k_idx = torch.arange(vis.shape[1], device=device)
    q_idx = torch.arange(q_len, device=device)
    own = (k_idx < layout.own_len)[None, None, :]
    extra = (vis & (k_idx >= layout.own_len))[:, None, :]
    if not layout.text_sees_extra:
        extra = extra & (q_idx >= layout.text_len)[None, :, None]
    if layout.segments is not None:
        seg = layout.segments  # [B, own_len]
        sq = seg[:, :q_len, None]
        sk = F.pad(seg, (0, vis.shape[1] - layout.own_len), value=-2)[:, None, :]
        own = own & ((sq == sk) | (sq < 0) | (sk == -1))
    return own | extra


@register_backend("sdpa")
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: KeyLayout) -> torch.Tensor:
    """q [B, H, Lq, d], k/v [B, H, Lk, d] -> [B, H, Lq, d] with the dense mask (additive when biased)."""
    mask = build_mask(layout, q.shape[2])[:, None]
    if layout.bias is not None:
        mask = torch.where(mask, layout.bias[:, None, None, :].to(q.dtype),
                           torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_COMPILED_FLEX = None


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


@register_backend("flex")
def flex_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: KeyLayout) -> torch.Tensor:
    """Same result as `sdpa_attention`; the block mask is built from the layout's per-key vectors
    (O(B * Lk) memory, no [Lq, Lk] matrix) and lets the kernel skip key blocks nobody sees. PyTorch has no
    FlexAttention backward on CPU: with gradients on CPU this runs the SDPA reference instead."""
    from torch.nn.attention.flex_attention import create_block_mask

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return sdpa_attention(q, k, v, layout)

    vis, own_len, text_len = layout.visible, layout.own_len, layout.text_len
    segments, text_sees_extra = layout.segments, layout.text_sees_extra
    if segments is not None:
        seg_k = F.pad(segments, (0, vis.shape[1] - own_len), value=-2)
        seg_q = F.pad(segments, (0, max(0, q.shape[2] - own_len)), value=-2)

    def mask_mod(b, h, q_idx, kv_idx):
        own = kv_idx < own_len
        if segments is not None:
            sq, sk = seg_q[b, q_idx], seg_k[b, kv_idx]
            own = own & ((sq == sk) | (sq < 0) | (sk == -1))
        extra = vis[b, kv_idx] & (kv_idx >= own_len)
        if not text_sees_extra:
            extra = extra & (q_idx >= text_len)
        return own | extra

    score_mod = None
    if layout.bias is not None:
        bias = layout.bias.to(torch.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, kv_idx]

    block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_fn(q.device)(q, k, v, block_mask=block_mask, score_mod=score_mod)


@register_backend("triton")
def triton_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: KeyLayout) -> torch.Tensor:
    """Same result as `sdpa_attention` from a Triton kernel that skips key blocks no query sees
    (common/attention/kernels). Forward only: with gradients it runs the SDPA reference."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return sdpa_attention(q, k, v, layout)
    from common.attention.kernels.masked_attention import masked_attention

    return masked_attention(q, k, v, layout)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: KeyLayout, backend: str = "sdpa"
           ) -> torch.Tensor:
    """Dispatch to a registered backend. q [B, H, Lq, d], k/v [B, H, Lk, d] -> [B, H, Lq, d]."""
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; known: {sorted(BACKENDS)}") from None
    return fn(q, k, v, layout)
