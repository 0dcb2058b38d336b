"""Rigid objects (SynCD §1.3): pixel correspondences between rendered views from known cameras and depth,
and the cross-view warping of the noisy latents for t > warp_thresh.

Correspondences keep the original's layout: rows [y_a, x_a, y_b, x_b] in PyTorch3D NDC (+x left, +y up,
pixel centres at +-(2k+1)/R - 1), so destination pixel = floor(R (1 - ndc) / 2) and the grid_sample grid is
-(x_b, y_b). Depths are camera-frame z from `common.render` (our rasteriser, OpenCV camera convention).
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F

from common.pipelines.loop import Hook, StepState
from common.render.cameras import Cameras
from common.render.mesh import Mesh
from common.render.raster import rasterize
from common.render.raster.maps import depth_map


def render_depth(mesh: Mesh, cameras: Cameras, size: int, backend: str = "auto") -> torch.Tensor:
    """Camera-frame depth [V, size, size] of `mesh` seen by `cameras` (0 on background)."""
    frags = rasterize(cameras.to_clip(mesh.verts), mesh.faces, size, size, backend=backend)
    return depth_map(frags, cameras).float()


def _pixel_grid(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return i, j


def compute_correspondences(depth_a: torch.Tensor, depth_b: torch.Tensor, cam_a: Cameras, cam_b: Cameras,
                            tol: float = 0.01) -> torch.Tensor:
    """Rows [M, 4] = (y_a, x_a, y_b, x_b) in PyTorch3D NDC for pixels of view a visible in view b.

    depth_a, depth_b: camera z [H, W] (0 = background). A pixel of a is unprojected at its centre,
    projected into b, and kept iff b's depth at the nearest pixel equals its reprojected z within `tol`."""
    h, w = depth_a.shape
    i, j = _pixel_grid(h, w, depth_a.device)
    valid = depth_a > 0
    z = depth_a[valid].double()
    u, v = j[valid].double() + 0.5, i[valid].double() + 0.5
    ca = cam_a.to(dtype=torch.float64)
    cb = cam_b.to(dtype=torch.float64)
    x_cam = torch.stack([(u - ca.cx[0]) / ca.fx[0] * z, (v - ca.cy[0]) / ca.fy[0] * z, z], -1)
    world = (x_cam - ca.T[0]) @ ca.R[0]  # R^T (x - T)
    in_b = world @ cb.R[0].T + cb.T[0]
    zb = in_b[:, 2]
    ub = in_b[:, 0] / zb.clamp_min(1e-12) * cb.fx[0] + cb.cx[0]
    vb = in_b[:, 1] / zb.clamp_min(1e-12) * cb.fy[0] + cb.cy[0]
    hb, wb = depth_b.shape
    cols, rows = torch.floor(ub).long(), torch.floor(vb).long()
    inside = (zb > 0) & (cols >= 0) & (cols < wb) & (rows >= 0) & (rows < hb)
    db = torch.zeros_like(zb)
    db[inside] = depth_b.double()[rows[inside], cols[inside]]
    keep = inside & (db > 0) & ((db - zb).abs() < tol)
    # PyTorch3D NDC: +x left, +y up
    ya, xa = 1 - 2 * v[keep] / h, 1 - 2 * u[keep] / w
    yb, xb = 1 - 2 * vb[keep] / hb, 1 - 2 * ub[keep] / wb
    return torch.stack([ya, xa, yb, xb], -1).float()


def triplet_correspondences(depths: torch.Tensor, cameras: Cameras, min_fraction: float = 0.1
                            ) -> dict[tuple[int, int], torch.Tensor] | None:
    """Pairs (0,1), (0,2), (1,2) of three views; None unless each pair matches > min_fraction of the pixels."""
    n = depths.shape[0]
    out = {}
    for a, b in itertools.combinations(range(n), 2):
        rows = compute_correspondences(depths[a], depths[b], cameras[a], cameras[b])
        if rows.shape[0] <= min_fraction * depths[a].numel():
            return None
        out[(a, b)] = rows
    return out


def shift_scale_correspondences(rows: torch.Tensor, scale_a: float, shift_a: tuple[float, float], scale_b: float,
                                shift_b: tuple[float, float], size: int = 1024) -> torch.Tensor:
    """After pasting view a (b) scaled by s at pixel offset shift=(y, x) on a size^2 canvas:
    ndc' = s * ndc + (1 - 2 shift / size) - s per axis (PyTorch3D NDC: a top-left anchored paste)."""
    out = rows.clone()
    for cols, s, (sy, sx) in (((0, 1), scale_a, shift_a), ((2, 3), scale_b, shift_b)):
        out[:, cols[0]] = s * rows[:, cols[0]] + (1 - 2 * sy / size) - s
        out[:, cols[1]] = s * rows[:, cols[1]] + (1 - 2 * sx / size) - s
    return out


def warp_pair(src: torch.Tensor, rows: torch.Tensor, res: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sample src [C, res, res] at view-b coordinates and scatter to view-a pixels.

    Returns (warped [C, res, res], match mask [res, res]) or None when a destination falls outside the grid."""
    ya = torch.floor(res * (1 - rows[:, 0]) / 2).long()
    xa = torch.floor(res * (1 - rows[:, 1]) / 2).long()
    if ((ya < 0) | (ya >= res) | (xa < 0) | (xa >= res)).any():
        return None
    grid = -torch.stack([rows[:, 3], rows[:, 2]], -1).to(src.dtype)  # grid_sample wants (x, y)
    vals = F.grid_sample(src[None], grid[None, None], mode="bicubic", align_corners=False)[0, :, 0]  # [C, M]
    warped = torch.zeros_like(src)
    mask = torch.zeros(res, res, dtype=src.dtype, device=src.device)
    warped[:, ya, xa] = vals
    mask[ya, xa] = 1
    return warped, mask


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """mask [N, R, R] -> the original's erosion: 3x3 mean with zero padding (conv of ones / 9, 'same') >= 0.9, so
    a pixel stays only when its 9 neighbours are all set (the image border always goes)."""
    return (F.avg_pool2d(mask[:, None], 3, stride=1, padding=1, count_include_pad=True)[:, 0] >= 0.9).to(mask.dtype)


def warp_latents(latents: torch.Tensor, corr: dict[tuple[int, int], torch.Tensor], t: float, res: int = 128,
                 erode_below: float = 0.9) -> torch.Tensor | None:
    """latents [N, C, h, w] (N = 2 or 3) -> warped latents, or None (out of range: stop warping this sample).

    The original's `warpcorrespondence`, step by step: the last image (anchor) is warped into every other image
    (pairs (a, N-1)) with match mask m (eroded for t < erode_below) and blended z_a = m w + (1 - m) z_a; then
    (N = 3) image 1 *as just blended* is warped into image 0 at the pair-(0, 1) matches where the (eroded) m_0 is
    0, that mask eroded on its own, and blended into the already blended image 0."""
    n, c, h, w = latents.shape
    up = F.interpolate(latents.float(), size=(res, res), mode="nearest")
    anchor = n - 1
    warped = torch.zeros_like(up)
    masks = torch.zeros(n, res, res, dtype=up.dtype, device=up.device)
    for a in range(anchor):
        r = warp_pair(up[anchor], corr[(a, anchor)], res)
        if r is None:
            return None
        warped[a], masks[a] = r
    if t < erode_below:
        masks = _erode(masks)
    out = masks[:, None] * warped + (1 - masks[:, None]) * up
    if anchor > 1 and (0, 1) in corr:  # the original's warp_first_second
        r = warp_pair(out[1], corr[(0, 1)], res)
        if r is None:
            return None
        vals, hit = r
        second = hit * (1 - masks[0])  # 1 - m_0 at the matched pixels, 0 elsewhere
        if t < erode_below:
            second = _erode(second[None])[0]
        out[0] = second * vals + (1 - second) * out[0]
    return F.interpolate(out, size=(h, w), mode="nearest").to(latents.dtype)


class LatentWarpHook(Hook):
    """Warps the packed noisy latents [N, L, C] (token grid token_hw, L = h*w) before the transformer call while t / T > thresh; stops for
    good after an out-of-range correspondence. `warp` is `warp_latents`-like (replaceable for tests)."""

    def __init__(self, corr: dict[tuple[int, int], torch.Tensor] | None, token_hw: tuple[int, int],
                 thresh: float = 0.8, num_train_timesteps: int = 1000,
                 warp: Callable[..., torch.Tensor | None] = warp_latents):
        self.corr, self.token_hw, self.thresh, self.T, self.warp = corr, token_hw, thresh, num_train_timesteps, warp
        self.enabled = corr is not None
        self.calls: list[int] = []

    def on_input(self, state: StepState) -> None:
        t = float(state.t) / self.T
        if not self.enabled or t <= self.thresh:
            return
        self.calls.append(state.i)
        x = state.x_t
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.token_hw)  # the token grid, as the original
        out = self.warp(grid, self.corr, t)
        if out is None:
            self.enabled = False
            return
        state.x_t = out.flatten(2).transpose(1, 2).to(x.dtype)
