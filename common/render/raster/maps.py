"""Depth and normal maps from fragments (ControlNet conditioning), and the mesh normals they need."""
from __future__ import annotations

import torch

from .interpolate import interpolate


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit normals [F, 3] (or [B, F, 3] for verts [B, V, 3]) of counter-clockwise faces; 0 for degenerate ones."""
    f = faces.long()
    v0, v1, v2 = verts[..., f[:, 0], :], verts[..., f[:, 1], :], verts[..., f[:, 2], :]
    return torch.nn.functional.normalize(torch.linalg.cross(v1 - v0, v2 - v0, dim=-1), dim=-1)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals [V, 3] for verts [V, 3], faces [F, 3]."""
    f = faces.long()
    n = torch.linalg.cross(verts[f[:, 1]] - verts[f[:, 0]], verts[f[:, 2]] - verts[f[:, 0]], dim=-1)
    out = torch.zeros_like(verts).index_add_(0, f.reshape(-1), n.repeat_interleave(3, 0))
    return torch.nn.functional.normalize(out, dim=-1)


def depth_map(fragments, cameras) -> torch.Tensor:
    """Camera-frame depth z [B, H, W] (0 on background) from the fragments' z_ndc."""
    z = cameras.ndc_depth_to_view(fragments.depth.to(cameras.R.dtype))
    return torch.where(fragments.mask, z, torch.zeros_like(z))


def normal_map(fragments, faces: torch.Tensor, normals: torch.Tensor, cameras=None, smooth: bool = True
               ) -> torch.Tensor:
    """Unit normals [B, H, W, 3] per pixel (0 on background).

    normals: vertex normals [V, 3] (interpolated when `smooth`) or face normals [F, 3] (with smooth=False,
    indexed by face id). With `cameras`, normals are rotated to the camera frame (x right, y down, z forward:
    a surface facing the camera has n_z < 0).
    """
    if smooth:
        n = interpolate(fragments, faces, normals)
    else:
        n = normals[fragments.face_id.clamp_min(0)] * fragments.mask[..., None]
    if cameras is not None:
        n = torch.einsum("bij,bhwj->bhwi", cameras.R.to(n.dtype), n)
    return torch.nn.functional.normalize(n, dim=-1) * fragments.mask[..., None]


def normalize_depth(depth: torch.Tensor, mask: torch.Tensor, low: float = 0.0) -> torch.Tensor:
    """Camera depth [B, H, W] -> ControlNet-style [B, 1, H, W]: nearest foreground 1, farthest `low`, background 0.

    Normalised per view over its foreground (like MiDaS-style conditioning: near is bright).
    """
    inf = torch.finfo(depth.dtype).max
    zmin = torch.where(mask, depth, torch.full_like(depth, inf)).flatten(1).amin(1).view(-1, 1, 1)
    zmax = torch.where(mask, depth, torch.full_like(depth, -inf)).flatten(1).amax(1).view(-1, 1, 1)
    t = (zmax - depth) / (zmax - zmin).clamp_min(1e-8)
    out = low + (1 - low) * t
    return torch.where(mask, out, torch.zeros_like(out))[:, None]
