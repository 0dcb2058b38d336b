"""The Triton kernel of `masked_attention` (imported lazily: importing triton is slow and CUDA-targeted)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_attn_fwd(Q, K, V, O, KIMG, KTXT, SEGQ, SEGK, BIAS, LIVE, NLIVE, H, LQ, LK, D, NB, text_len, scale,
                     HAS_BIAS: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < LQ
    d_ok = offs_d < D
    q = tl.load(Q + bh * LQ * D + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    is_text = offs_m < text_len
    sq = tl.load(SEGQ + b * LQ + offs_m, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_live = tl.load(NLIVE + b)
    for i in range(0, n_live):
        kb = tl.load(LIVE + b * NB + i)
        offs_k = kb * BLOCK_N + offs_n
        k_ok = offs_k < LK
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + bh * LK * D + offs_k[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + bh * LK * D + offs_k[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        kim = tl.load(KIMG + b * LK + offs_k, mask=k_ok, other=0)
        ktx = tl.load(KTXT + b * LK + offs_k, mask=k_ok, other=0)
        sk = tl.load(SEGK + b * LK + offs_k, mask=k_ok, other=-1)
        allowed = tl.where(is_text[:, None], ktx[None, :] != 0, kim[None, :] != 0)
        seg_ok = (sq[:, None] == sk[None, :]) | (sq[:, None] < 0) | (sk[None, :] == -1)
        allowed = allowed & seg_ok & k_ok[None, :]
        if HAS_BIAS:
            s = s + tl.load(BIAS + b * LK + offs_k, mask=k_ok, other=0.0)[None, :]
        s = tl.where(allowed, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(allowed, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + bh * LQ * D + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv, live: torch.Tensor, n_live: torch.Tensor, *,
           block_m: int, block_n: int) -> torch.Tensor:
    """q [B, H, Lq, d], k/v [B, H, Lk, d] -> [B, H, Lq, d]."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(d))
    bias = kv.bias if kv.bias is not None else kv.k_img  # placeholder pointer when HAS_BIAS is False
    grid = (triton.cdiv(lq, block_m), b * h)
    _masked_attn_fwd[grid](q, k, v, out, kv.k_img, kv.k_txt, kv.seg_q, kv.seg_k, bias, live, n_live, h, lq, lk, d,
                           live.shape[1], kv.text_len, float(d) ** -0.5, HAS_BIAS=kv.bias is not None,
                           FP32=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return out
