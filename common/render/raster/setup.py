"""Per-face set-up shared by every rasteriser backend, so they evaluate the same float32 expressions.

Screen space here is pixel units: sx = (x_ndc + 1) W / 2, sy = (y_ndc + 1) H / 2, so the centre of pixel
(row i, col j) is (j + 0.5, i + 0.5). For face f with screen vertices p0, p1, p2 the edge functions are
e_k(p) = A_k px + B_k py + C_k (e_0 is opposite p0, ...), scaled by 1 / (signed doubled area) so that inside
the triangle they are the screen-space barycentrics b_k >= 0 whatever the winding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Packed z-buffer key: float32 bits of z_ndc (>= 0, so they sort like ints) in the high 32 bits, face id low.
EMPTY_KEY = torch.iinfo(torch.int64).max
W_EPS = 1e-8  # faces with a vertex at w <= W_EPS (behind a perspective camera) are culled, not clipped


@dataclass
class FaceSetup:
    """coef [B, F, 9] (A0, B0, C0, A1, B1, C1, A2, B2, C2), zs [B, F, 3] z_ndc, inv_w [B, F, 3] 1/w,
    bbox [B, F, 4] int64 (x0, y0, x1, y1) inclusive pixel bounds, valid [B, F] bool."""

    coef: torch.Tensor
    zs: torch.Tensor
    inv_w: torch.Tensor
    bbox: torch.Tensor
    valid: torch.Tensor


def setup_faces(verts_clip: torch.Tensor, faces: torch.Tensor, H: int, W: int, cull_backfaces: bool = False
                ) -> FaceSetup:
    """verts_clip [B, V, 4], faces [F, 3] int64 -> FaceSetup (float32 throughout)."""
    v = verts_clip.float()
    w = v[..., 3]
    inv_w = 1.0 / torch.where(w.abs() > W_EPS, w, torch.ones_like(w))
    sx = (v[..., 0] * inv_w + 1) * (W / 2)
    sy = (v[..., 1] * inv_w + 1) * (H / 2)
    z = v[..., 2] * inv_w
    f = faces.long()
    x0, x1, x2 = sx[:, f[:, 0]], sx[:, f[:, 1]], sx[:, f[:, 2]]
    y0, y1, y2 = sy[:, f[:, 0]], sy[:, f[:, 1]], sy[:, f[:, 2]]
    fw = w[:, f]  # [B, F, 3]
    # edge k is opposite vertex k: e0(p) = (x2 - x1)(py - y1) - (y2 - y1)(px - x1), etc.
    A0, B0 = -(y2 - y1), x2 - x1
    A1, B1 = -(y0 - y2), x0 - x2
    A2, B2 = -(y1 - y0), x1 - x0
    C0 = -(A0 * x1 + B0 * y1)
    C1 = -(A1 * x2 + B1 * y2)
    C2 = -(A2 * x0 + B2 * y0)
    area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)  # signed doubled area (> 0: clockwise on screen)
    valid = (area != 0) & (fw > W_EPS).all(-1) & torch.isfinite(area)
    if cull_backfaces:  # counter-clockwise seen from the camera (OpenGL front faces) have area < 0 in y-down
        valid &= area < 0
    inv_area = 1.0 / torch.where(valid, area, torch.ones_like(area))
    coef = torch.stack([A0, B0, C0, A1, B1, C1, A2, B2, C2], -1) * inv_area[..., None]
    xs = torch.stack([x0, x1, x2], -1)
    ys = torch.stack([y0, y1, y2], -1)
    # pixel j is covered when its centre j + 0.5 lies in [min, max]: j in [ceil(min - 0.5), floor(max - 0.5)]
    bx0 = torch.ceil(xs.amin(-1) - 0.5).clamp(0, W)
    bx1 = torch.floor(xs.amax(-1) - 0.5).clamp(-1, W - 1)
    by0 = torch.ceil(ys.amin(-1) - 0.5).clamp(0, H)
    by1 = torch.floor(ys.amax(-1) - 0.5).clamp(-1, H - 1)
    zf = z[:, f]
    valid &= (bx1 >= bx0) & (by1 >= by0) & (zf.amax(-1) >= 0) & (zf.amin(-1) <= 1)
    bbox = torch.stack([bx0, by0, bx1, by1], -1).nan_to_num(0).long()
    return FaceSetup(coef=coef.contiguous(), zs=zf.contiguous(), inv_w=inv_w[:, f].contiguous(), bbox=bbox,
                     valid=valid)


def edge_values(coef: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Screen barycentrics (b0, b1, b2) at pixel centres px, py for per-sample coefficients coef [..., 9].

    Same operation order as the Triton kernel so both give bit-identical results on CPU.
    """
    b0 = coef[..., 0] * px + coef[..., 1] * py + coef[..., 2]
    b1 = coef[..., 3] * px + coef[..., 4] * py + coef[..., 5]
    b2 = coef[..., 6] * px + coef[..., 7] * py + coef[..., 8]
    return b0, b1, b2


def resolve(keys: torch.Tensor, setup: FaceSetup, H: int, W: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the packed z-buffer keys [B, H*W] to (face_id [B,H,W], bary [B,H,W,3], depth [B,H,W]).

    bary are perspective-correct; depth is the z_ndc of the winning sample (what the z-test compared).
    """
    B = keys.shape[0]
    hit = keys != EMPTY_KEY
    face = torch.where(hit, keys & 0xFFFFFFFF, torch.full_like(keys, -1))
    depth_bits = (keys >> 32).to(torch.int32)
    depth = torch.where(hit, depth_bits.view(torch.float32), torch.zeros((), dtype=torch.float32))
    fidx = face.clamp_min(0)
    bidx = torch.arange(B, device=keys.device)[:, None].expand_as(fidx)
    coef = setup.coef[bidx, fidx]  # [B, HW, 9]
    inv_w = setup.inv_w[bidx, fidx]
    pix = torch.arange(H * W, device=keys.device)
    px = (pix % W).float() + 0.5
    py = (pix // W).float() + 0.5
    b0, b1, b2 = edge_values(coef, px, py)
    p0, p1, p2 = b0 * inv_w[..., 0], b1 * inv_w[..., 1], b2 * inv_w[..., 2]
    s = p0 + p1 + p2
    s = torch.where(hit & (s != 0), s, torch.ones_like(s))
    bary = torch.stack([p0 / s, p1 / s, p2 / s], -1) * hit[..., None]
    return face.view(B, H, W), bary.view(B, H, W, 3), depth.view(B, H, W)
