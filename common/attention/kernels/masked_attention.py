"""Masked attention that skips fully masked key blocks (SynCD's masked shared attention, any `KeyLayout`).

A layout's mask is a rule over per-key vectors (see `common.attention.backends.KeyLayout`), so the kernel never
sees an [Lq, Lk] matrix: it gets, per batch row, which keys image queries may see (`k_img`), which keys text
queries may see (`k_txt`), optional segment ids and an additive per-key bias. Key blocks that no query of a
row can see (background-only blocks of the other images) are dropped from the row's block list before launch,
so their cost is zero - that is where the speed-up over a dense-mask SDPA comes from.

`masked_attention_reference` is the torch reference of exactly this rule (dense, float32); the Triton kernel
is a flash-attention forward (online softmax over the live key blocks). No backward: with gradients the
dispatch falls back to the SDPA reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.errors import UsageError

_NEG = -1.0e30  # finite "minus infinity": keeps the online softmax free of inf - inf


@dataclass
class KeyVectors:
    """Per-key form of a KeyLayout. k_img / k_txt: int8 [B, Lk] (1 = visible to image / text queries);
    seg_q: int32 [B, Lq], seg_k: int32 [B, Lk] (-1 = no segment rule); bias: float32 [B, Lk] or None."""

    k_img: torch.Tensor
    k_txt: torch.Tensor
    seg_q: torch.Tensor
    seg_k: torch.Tensor
    bias: torch.Tensor | None
    text_len: int


def key_vectors(layout, q_len: int) -> KeyVectors:
    """KeyLayout -> KeyVectors for queries of length `q_len` (text first, then image tokens)."""
    vis = layout.visible.bool()
    b, lk = vis.shape
    device = vis.device
    k_idx = torch.arange(lk, device=device)
    own = (k_idx < layout.own_len)[None].expand(b, -1)
    extra = vis & ~own
    k_img = own | extra
    k_txt = own | extra if layout.text_sees_extra else own
    if layout.segments is not None:
        seg = layout.segments.to(device=device, dtype=torch.int32)
        seg_k = F.pad(seg, (0, lk - layout.own_len), value=-1)  # extra keys: no segment rule
        seg_q = F.pad(seg, (0, max(0, q_len - layout.own_len)), value=-1)[:, :q_len]
    else:
        seg_k = torch.full((b, lk), -1, dtype=torch.int32, device=device)
        seg_q = torch.full((b, q_len), -1, dtype=torch.int32, device=device)
    bias = None if layout.bias is None else layout.bias.to(torch.float32).contiguous()
    return KeyVectors(k_img.to(torch.int8).contiguous(), k_txt.to(torch.int8).contiguous(), seg_q.contiguous(),
                      seg_k.contiguous(), bias, layout.text_len)


def allowed_mask(kv: KeyVectors, q_len: int) -> torch.Tensor:
    """bool [B, Lq, Lk] of the per-key rule (what the kernel evaluates tile by tile)."""
    is_text = (torch.arange(q_len, device=kv.k_img.device) < kv.text_len)[None, :, None]
    allowed = torch.where(is_text, kv.k_txt.bool()[:, None, :], kv.k_img.bool()[:, None, :])
    sq, sk = kv.seg_q[:, :, None], kv.seg_k[:, None, :]
    return allowed & ((sq == sk) | (sq < 0) | (sk == -1))


def masked_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout) -> torch.Tensor:
    """Torch reference: q [B, H, Lq, d], k/v [B, H, Lk, d] -> [B, H, Lq, d], float32 softmax over allowed keys."""
    kv = key_vectors(layout, q.shape[2])
    allowed = allowed_mask(kv, q.shape[2])[:, None]
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if kv.bias is not None:
        scores = scores + kv.bias[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v.float()).to(q.dtype)


def live_blocks(kv: KeyVectors, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block ids int32 [B, NB] with the live blocks first, live count int32 [B]).

    A key block is live when some query of the row may see one of its keys; the kernel loops over live
    blocks only."""
    b, lk = kv.k_img.shape
    nb = -(-lk // block_n)
    any_vis = F.pad((kv.k_img | kv.k_txt), (0, nb * block_n - lk)).view(b, nb, block_n).amax(-1) > 0
    order = torch.argsort((~any_vis).to(torch.int8), dim=1, stable=True)
    return order.to(torch.int32).contiguous(), any_vis.sum(1).to(torch.int32).contiguous()


def triton_available(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, *, block_m: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    """Triton forward: q [B, H, Lq, d], k/v [B, H, Lk, d] -> [B, H, Lq, d] (same as the reference).
    Tiles: 64 x 64 on CUDA (a key block = one row of a 64-wide token grid), 32 x 32 in the interpreter."""
    cuda = q.device.type == "cuda"
    block_m = block_m or (64 if cuda else 32)
    block_n = block_n or (64 if cuda else 32)
    if not triton_available(q.device):
        raise UsageError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    from common.attention.kernels._masked_attention_triton import launch

    kv = key_vectors(layout, q.shape[2])
    live, n_live = live_blocks(kv, block_n)
    return launch(q, k, v, kv, live, n_live, block_m=block_m, block_n=block_n)
