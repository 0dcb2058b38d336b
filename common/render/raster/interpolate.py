"""Vertex attributes -> pixels, through the fragments' perspective-correct barycentrics."""
from __future__ import annotations

import torch


def interpolate(fragments, faces: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes at every pixel.

    fragments: `Fragments` with face_id [B, H, W] and bary [B, H, W, 3]; faces [F, 3] indexes `attrs`
    (for UVs pass the UV faces); attrs [V, C] (shared) or [B, V, C]. Returns [B, H, W, C], 0 on background.
    """
    face_id, bary = fragments.face_id, fragments.bary
    B = face_id.shape[0]
    fid = face_id.clamp_min(0)
    tri = faces.to(device=fid.device, dtype=torch.long)[fid]  # [B, H, W, 3]
    if attrs.ndim == 2:
        vals = attrs[tri]  # [B, H, W, 3, C]
    else:
        b = torch.arange(B, device=fid.device).view(B, 1, 1, 1)
        vals = attrs[b, tri]
    out = (bary.to(vals.dtype)[..., None] * vals).sum(-2)
    return out * (face_id >= 0)[..., None].to(out.dtype)
