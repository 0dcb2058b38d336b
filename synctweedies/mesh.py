"""Mesh texturing as a SyncTweedies projection: canonical = a UV texture, instances = rendered views.

f_i renders the texture into view i (nearest or bilinear texel lookup, --rasterize_mode); g bakes the views
back in SyncMVD's order: per view the mean of the pixels that sample each texel (Voronoi-filled), then a
blend over views weighted by visible_i x cos_i^exp in texel space. Pixels off the mesh are not part of the
canonical space: `instance_mask` marks the mesh pixels and the background is whatever the app puts there
(`background`, e.g. SyncMVD's noised solid colours), so `forward(z, bg=x)` keeps an instance's own background.
"""
from __future__ import annotations

import torch

from common.render.cameras import Cameras
from common.render.mesh import Mesh
from common.render.raster import rasterize
from common.render.raster.maps import depth_map, normal_map, normalize_depth, vertex_normals
from common.render.texture import (blend_views, pixel_uvs, sample_texture, syncmvd_exp, texel_geometry,
                                   texel_weights, unproject)
from synctweedies.projection import Projection


class MeshProjection(Projection):
    """Texture [1, C, T, T] <-> views [N, C, s, s] for the cameras (all of size s x s).

    exp: the cosine exponent of the bake weights (0 is read as 1, SyncMVD's `if not exp: exp = 1`);
    voronoi: fill texels no pixel samples (per view, then globally), as the original unless --disable_voronoi.
    """

    def __init__(self, mesh: Mesh, cameras: Cameras, tex_size: int, *, mode: str = "nearest", exp: float = 1.0,
                 voronoi: bool = True, backend: str = "auto"):
        if not mesh.has_uv:
            raise ValueError("MeshProjection needs a mesh with UVs")
        self.mesh, self.cameras, self.mode, self.voronoi = mesh, cameras, mode, voronoi
        self.num_instances = len(cameras)
        self.view_size, self.tex_size = cameras.width, tex_size
        verts = mesh.verts.float()
        self.fragments = rasterize(cameras.to_clip(verts), mesh.faces, cameras.height, cameras.width, backend)
        self.uv = pixel_uvs(self.fragments, mesh.uv_faces, mesh.uvs)  # [N, s, s, 2]
        self.mask = self.fragments.mask[:, None]  # [N, 1, s, s] bool
        texel_face, texel_pos = texel_geometry(verts, mesh.faces, mesh.uvs, mesh.uv_faces, (tex_size, tex_size))
        self.texel_covered = texel_face >= 0  # [T, T]: texels inside some UV triangle
        self.texel_w = texel_weights(texel_face, texel_pos, verts, mesh.faces, cameras, self.fragments,
                                     syncmvd_exp(exp))  # [N, T, T]
        self.background: torch.Tensor | None = None  # [N, C, s, s] shown where bg is not given

    def canonical_shape(self, channels: int) -> tuple[int, ...]:
        return (1, channels, self.tex_size, self.tex_size)

    def instance_shape(self, channels: int) -> tuple[int, ...]:
        return (self.num_instances, channels, self.view_size, self.view_size)

    def instance_mask(self) -> torch.Tensor:
        return self.mask

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [1, C, T, T] -> views [N, C, s, s]; off-mesh pixels show `background` (0 when unset)."""
        mask = self.mask.to(z.device)
        x = sample_texture(z[0], self.uv.to(z.device), mask[:, 0], self.mode)
        if self.background is not None:
            x = torch.where(mask, x, self.background.to(x))
        return x

    def _inverse(self, xs: torch.Tensor, var_type: str) -> torch.Tensor:
        """views [N, C, s, s] -> texture [1, C, T, T] (SyncMVD's two-stage bake)."""
        mask = self.mask[:, 0].to(xs.device)
        acc = torch.float64 if xs.dtype == torch.float64 else torch.float32
        num, den = unproject(xs.to(acc), self.uv.to(xs.device), mask.to(acc), (self.tex_size,) * 2, self.mode)
        weights = self.texel_w.to(xs.device, acc)
        if not self.voronoi:  # without fill a view only votes where one of its pixels landed
            weights = weights * (den[:, 0] > 0)
        tex, _ = blend_views(num, den, weights, fill_each=self.voronoi, fill=self.voronoi)
        return tex[None].to(xs.dtype)


def control_images(mesh: Mesh, cameras: Cameras, cond_type: str, backend: str = "auto") -> torch.Tensor:
    """ControlNet conditions [N, 3, s, s] in [0, 1] rendered from the mesh: "depth" (near bright, background 0)
    or "normal" (camera-space normals as ControlNet-normal colours: x right, y up, z towards the viewer)."""
    fr = rasterize(cameras.to_clip(mesh.verts.float()), mesh.faces, cameras.height, cameras.width, backend)
    if cond_type == "depth":
        return normalize_depth(depth_map(fr, cameras), fr.mask).repeat(1, 3, 1, 1).float()
    n = normal_map(fr, mesh.faces, vertex_normals(mesh.verts.float(), mesh.faces), cameras)  # [N, s, s, 3]
    n = n * torch.tensor([1.0, -1.0, -1.0], device=n.device)  # OpenCV camera frame -> x right, y up, z to the viewer
    rgb = (n * 0.5 + 0.5) * fr.mask[..., None]
    return rgb.permute(0, 3, 1, 2).float()


# SyncMVD's view-dependent prompt suffixes
DIRECTIONS = {"front": ", front view", "side": ", side view", "back": ", back view", "top": ", overhead view",
              "bottom": ", bottom view"}


def view_direction(elevation: float, azimuth: float) -> str:
    """SyncMVD's rule: |elevation| > 30 is top/bottom; else azimuth within 30 degrees of 0 is front, within 60 of
    180 is back, the rest side (azimuth in degrees, 0 = front, any range)."""
    if elevation > 30:
        return "top"
    if elevation < -30:
        return "bottom"
    a = (azimuth + 180) % 360 - 180  # (-180, 180]
    if -30 <= a <= 30:
        return "front"
    if a <= -120 or a >= 120:
        return "back"
    return "side"


def view_prompts(prompt: str, poses: list[tuple[float, float]]) -> list[str]:
    """One prompt per (elevation, azimuth) pose with its direction suffix."""
    return [prompt + DIRECTIONS[view_direction(e, a)] for e, a in poses]


def view_graph(poses: list[tuple[float, float]], k: int = 2) -> list[list[int]]:
    """Sample-wise attention neighbours: a view on a ring of >= 3 views at its elevation attends to the previous
    and next view by azimuth (the 8-view ring: -45 / +45 degrees); any other view (the top cameras) to its k
    nearest views by camera direction (ties by index)."""
    el = torch.deg2rad(torch.tensor([p[0] for p in poses], dtype=torch.float64))
    az = torch.deg2rad(torch.tensor([p[1] for p in poses], dtype=torch.float64))
    d = torch.stack([el.cos() * az.sin(), el.sin(), el.cos() * az.cos()], -1)
    ang = (d @ d.T).clamp(-1, 1).acos()
    out = []
    for i, (e, a) in enumerate(poses):
        ring = sorted((j for j, p in enumerate(poses) if p[0] == e), key=lambda j: (poses[j][1] % 360, j))
        if len(ring) >= 3:
            pos = ring.index(i)
            out.append([ring[pos - 1], ring[(pos + 1) % len(ring)]])
            continue
        others = sorted((j for j in range(len(poses)) if j != i), key=lambda j: (round(float(ang[i, j]), 6), j))
        out.append(others[:k])
    return out
