"""Equirectangular <-> perspective geometry: pinhole views of a 360-degree panorama and their inverse.

Conventions (those of SyncTweedies' panorama renderer): camera x right, y down, z forward; pinhole with
f = 0.5 w / tan(FOV / 2) and centre ((w-1)/2, (h-1)/2); a view at yaw theta and pitch phi rotates its rays
by R = R_y(theta) R_x(phi) (about y first, then about the turned x axis); lon = atan2(x, z),
lat = asin(y / |r|); pano pixel X = (lon / 2pi + 0.5)(W - 1), Y = (lat / pi + 0.5)(H - 1).
Pure geometry: no diffusion imports.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def check_fov(fov: float) -> None:
    if not 0 < fov < 180:
        raise ValueError(f"FOV must be in (0, 180) degrees, got {fov}")


def rotation(theta: float, phi: float) -> torch.Tensor:
    """[3, 3] camera-to-world rotation for yaw `theta` and pitch `phi` (degrees)."""
    t, p = math.radians(theta), math.radians(phi)
    ry = torch.tensor([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]], dtype=torch.float64)
    return ry @ rx


def focal(size: int, fov: float) -> float:
    check_fov(fov)
    return 0.5 * size / math.tan(math.radians(fov) / 2)


def perspective_to_pano(theta: float, phi: float, fov: float, size: int, pano_h: int, pano_w: int) -> torch.Tensor:
    """Float pano coordinates (X, Y) seen by every pixel of a size x size view: [size, size, 2]."""
    f, c = focal(size, fov), (size - 1) / 2
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    rays = torch.stack([(u - c) / f, (v - c) / f, torch.ones_like(u)], -1) @ rotation(theta, phi).T
    lon = torch.atan2(rays[..., 0], rays[..., 2])
    lat = torch.asin(rays[..., 1] / rays.norm(dim=-1))
    return torch.stack([(lon / (2 * math.pi) + 0.5) * (pano_w - 1), (lat / math.pi + 0.5) * (pano_h - 1)], -1)


def nearest_index(coords: torch.Tensor, pano_h: int, pano_w: int) -> torch.Tensor:
    """Flat pano index of the nearest pixel to each coordinate: coords [..., 2] -> [...] (long)."""
    x = coords[..., 0].round().clamp(0, pano_w - 1).long()
    y = coords[..., 1].round().clamp(0, pano_h - 1).long()
    return y * pano_w + x


def pano_to_perspective(theta: float, phi: float, fov: float, size: int, pano_h: int, pano_w: int,
                        rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """For pano rows `rows`: view coordinates (u, v) [r, W, 2] of every pano pixel and whether it is in
    front of the camera and inside the view ([-0.5, size - 0.5]^2): [r, W] bool."""
    ys = torch.arange(pano_h, dtype=torch.float64)[rows]
    xs = torch.arange(pano_w, dtype=torch.float64)
    lat = (ys / (pano_h - 1) - 0.5) * math.pi
    lon = (xs / (pano_w - 1) - 0.5) * 2 * math.pi
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    d = torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], -1) @ rotation(theta, phi)
    f, c = focal(size, fov), (size - 1) / 2
    z = d[..., 2]
    front = z > 1e-8
    zs = torch.where(front, z, torch.ones_like(z))
    uv = torch.stack([f * d[..., 0] / zs + c, f * d[..., 1] / zs + c], -1)
    inside = front & (uv > -0.5).all(-1) & (uv < size - 0.5).all(-1)
    return uv, inside


def footprint(theta: float, phi: float, fov: float, size: int, pano_h: int, pano_w: int,
              chunk_rows: int = 256) -> torch.Tensor:
    """Flat indices of the pano pixels a view sees (row chunks keep memory low at 2048 x 4096)."""
    out = []
    for r0 in range(0, pano_h, chunk_rows):
        _, inside = pano_to_perspective(theta, phi, fov, size, pano_h, pano_w, slice(r0, r0 + chunk_rows))
        out.append(inside.flatten().nonzero().squeeze(1) + r0 * pano_w)
    return torch.cat(out)


def scatter_sources(index: torch.Tensor, region: torch.Tensor, pano_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter + Voronoi fill as a fixed map, for one view.

    index: [h*w] pano pixel hit by each view pixel (the last view pixel wins where several hit one);
    region: flat pano pixels to fill. Returns (pixels [M], source view pixel [M]): every pixel of the region
    plus every hit takes the value of the view pixel whose hit is nearest (Euclidean, pano pixels).
    """
    from scipy.spatial import cKDTree

    n = index.numel()
    winner = torch.full((int(index.max()) + 1,), -1, dtype=torch.long)
    winner.scatter_reduce_(0, index, torch.arange(n), reduce="amax")
    hits = index.unique()
    src_of_hit = winner[hits]
    pixels = torch.unique(torch.cat([region, hits]))
    hit_xy = np.stack([(hits % pano_w).numpy(), (hits // pano_w).numpy()], 1).astype(np.float64)
    px_xy = np.stack([(pixels % pano_w).numpy(), (pixels // pano_w).numpy()], 1).astype(np.float64)
    _, nearest = cKDTree(hit_xy).query(px_xy, k=1)
    return pixels, src_of_hit[torch.from_numpy(np.asarray(nearest, dtype=np.int64))]


def sample_perspective(pano: torch.Tensor, theta: float, phi: float, fov: float, size: int,
                       mode: str = "bilinear") -> torch.Tensor:
    """Render a perspective view of a pano [C, H, W] -> [C, size, size] (grid_sample, border padding)."""
    _, h, w = pano.shape
    xy = perspective_to_pano(theta, phi, fov, size, h, w)
    grid = torch.stack([xy[..., 0] / (w - 1) * 2 - 1, xy[..., 1] / (h - 1) * 2 - 1], -1)
    out = torch.nn.functional.grid_sample(pano[None].float(), grid[None].float(), mode=mode, padding_mode="border",
                                          align_corners=True)
    return out[0].to(pano.dtype)
