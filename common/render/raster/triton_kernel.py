"""Triton rasteriser (CUDA-targeted; runs on CPU under TRITON_INTERPRET=1 for tests).

Same algorithm as `torch_ref`: every face's bounding box is cut into pieces of at most `piece` pixels (row
bands, so a huge face does not serialise on one program); one program per piece walks it in blocks of BLOCK
pixels, evaluates the edge functions exactly as `setup.edge_values` does and `atomic_min`s the packed
int64 (z_ndc bits, face id) key into the z-buffer. `setup.resolve` then turns keys into fragments, so face ids
match the reference (up to exact depth ties) and barycentrics match to float rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .setup import EMPTY_KEY, FaceSetup
from .torch_ref import pieces


@triton.jit
def _raster_pieces(coef_ptr, zs_ptr, piece_ptr, keys_ptr, F, H, W, BLOCK: tl.constexpr):
    q = tl.program_id(0).to(tl.int64) * 6  # piece record: b, f, x0, y0, width, rows
    b = tl.load(piece_ptr + q + 0)
    f = tl.load(piece_ptr + q + 1)
    x0 = tl.load(piece_ptr + q + 2)
    y0 = tl.load(piece_ptr + q + 3)
    bw = tl.load(piece_ptr + q + 4)
    n = bw * tl.load(piece_ptr + q + 5)
    pid = b * F + f
    if n > 0:
        c = coef_ptr + pid * 9
        a0 = tl.load(c + 0)
        e0 = tl.load(c + 1)
        k0 = tl.load(c + 2)
        a1 = tl.load(c + 3)
        e1 = tl.load(c + 4)
        k1 = tl.load(c + 5)
        a2 = tl.load(c + 6)
        e2 = tl.load(c + 7)
        k2 = tl.load(c + 8)
        z0 = tl.load(zs_ptr + pid * 3 + 0)
        z1 = tl.load(zs_ptr + pid * 3 + 1)
        z2 = tl.load(zs_ptr + pid * 3 + 2)
        offs = tl.arange(0, BLOCK)
        for start in range(0, n, BLOCK):
            k = start + offs
            m = k < n
            x = x0 + k % bw
            y = y0 + k // bw
            px = x.to(tl.float32) + 0.5
            py = y.to(tl.float32) + 0.5
            b0 = a0 * px + e0 * py + k0
            b1 = a1 * px + e1 * py + k1
            b2 = a2 * px + e2 * py + k2
            z = b0 * z0 + b1 * z1 + b2 * z2
            inside = m & (b0 >= 0) & (b1 >= 0) & (b2 >= 0) & (z >= 0) & (z <= 1)
            z = tl.where(z > 0, z, 0.0)
            key = (z.to(tl.int32, bitcast=True).to(tl.int64) << 32) | f.to(tl.int64)
            lin = (b * H + y) * W + x
            tl.atomic_min(keys_ptr + lin, key, mask=inside)


def rasterize_keys(setup: FaceSetup, H: int, W: int, block: int = 128, piece: int = 2048) -> torch.Tensor:
    """Packed z-buffer keys [B, H*W] int64, like `torch_ref.rasterize_keys`."""
    B, F = setup.valid.shape
    keys = torch.full((B * H * W,), EMPTY_KEY, dtype=torch.int64, device=setup.coef.device)
    rec = torch.stack(pieces(setup, piece), -1).contiguous()  # [P, 6]
    if rec.shape[0] == 0:
        return keys.view(B, H * W)
    _raster_pieces[(rec.shape[0],)](setup.coef, setup.zs, rec, keys, F, H, W, BLOCK=block)
    return keys.view(B, H * W)
