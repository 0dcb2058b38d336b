"""UV texture <-> views: sampling a texture into rendered views, and its weighted inverse (baking).

UV convention (OBJ): u right, v up, both in [0, 1]; texel (row r, col c) of an [Ht, Wt] texture has its centre
at u = (c + 0.5) / Wt, v = 1 - (r + 0.5) / Ht. Sampling and baking use the same taps (one texel for
"nearest", four for "bilinear", clamped at the border), so `unproject` is the exact adjoint of `sample_texture`:
baking returns, per texel, the weighted mean of the pixels that sample it, as SyncMVD's one-step SGD bake divided
by its gradient map does. Everything is batched over views.
"""
from __future__ import annotations

import torch

from common.errors import UsageError
from .raster.interpolate import interpolate
from .raster.maps import face_normals


def _taps(uv: torch.Tensor, Ht: int, Wt: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uv [..., 2] -> flat texel indices [..., K] and weights [..., K] (K = 1 nearest, 4 bilinear)."""
    x = uv[..., 0] * Wt
    y = (1 - uv[..., 1]) * Ht
    if mode == "nearest":
        c = x.floor().long().clamp(0, Wt - 1)
        r = y.floor().long().clamp(0, Ht - 1)
        return (r * Wt + c)[..., None], torch.ones_like(x)[..., None]
    if mode != "bilinear":
        raise UsageError(f"texture sampling mode must be 'nearest' or 'bilinear', got {mode!r}")
    x, y = x - 0.5, y - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    cs = torch.stack([x0, x0 + 1, x0, x0 + 1], -1).clamp(0, Wt - 1)
    rs = torch.stack([y0, y0, y0 + 1, y0 + 1], -1).clamp(0, Ht - 1)
    w = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    return rs * Wt + cs, w


def sample_texture(texture: torch.Tensor, uv: torch.Tensor, mask: torch.Tensor | None = None,
                   mode: str = "bilinear") -> torch.Tensor:
    """Look up a texture at per-pixel UVs.

    texture: [C, Ht, Wt] (shared) or [B, C, Ht, Wt]; uv: [B, H, W, 2]; mask: [B, H, W] bool (0 outside).
    Returns [B, C, H, W].
    """
    B, H, W, _ = uv.shape
    tex = texture[None].expand(B, -1, -1, -1) if texture.ndim == 3 else texture
    C, Ht, Wt = tex.shape[1:]
    idx, w = _taps(uv, Ht, Wt, mode)  # [B, H, W, K]
    flat = tex.reshape(B, C, Ht * Wt)
    vals = torch.gather(flat, 2, idx.reshape(B, 1, -1).expand(-1, C, -1)).view(B, C, H, W, -1)
    out = (vals * w[:, None].to(vals.dtype)).sum(-1)
    if mask is not None:
        out = out * mask[:, None].to(out.dtype)
    return out


def pixel_uvs(fragments, uv_faces: torch.Tensor, uvs: torch.Tensor) -> torch.Tensor:
    """Per-pixel UVs [B, H, W, 2] from fragments, UV faces [F, 3] and UV coordinates [T, 2]."""
    return interpolate(fragments, uv_faces, uvs)


def render_texture(fragments, uv_faces: torch.Tensor, uvs: torch.Tensor, texture: torch.Tensor,
                   mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Textured views: (images [B, C, H, W], alpha [B, 1, H, W]) for texture [C, Ht, Wt] or [B, C, Ht, Wt]."""
    mask = fragments.mask
    img = sample_texture(texture, pixel_uvs(fragments, uv_faces, uvs), mask, mode)
    return img, mask[:, None].to(img.dtype)


def view_weights(fragments, verts: torch.Tensor, faces: torch.Tensor, cameras, exp: float = 1.0) -> torch.Tensor:
    """Per-pixel bake weights [B, H, W] = visible x max(cos, 0)^exp.

    cos is between the (flat) face normal and the direction from the surface point to the camera (or the
    constant viewing direction of an orthographic camera); back-facing pixels (cos <= 0) and background get 0.
    Faces must be counter-clockwise seen from outside. verts [V, 3] world, faces [F, 3].
    """
    mask = fragments.mask
    n = face_normals(verts.float(), faces)[fragments.face_id.clamp_min(0)]  # [B, H, W, 3]
    if cameras.orthographic:
        to_cam = -cameras.R[:, 2].float()[:, None, None].expand_as(n)
    else:
        p = interpolate(fragments, faces, verts.float())
        to_cam = torch.nn.functional.normalize(cameras.centers.float()[:, None, None] - p, dim=-1)
    cos = (n * to_cam).sum(-1)
    w = torch.where(mask & (cos > 0), cos.clamp_min(0), torch.zeros_like(cos))
    return torch.where(w > 0, w ** exp, w)


def syncmvd_exp(exp: float | None) -> float:
    """SyncMVD's `if not exp: exp = 1`: an exponent of 0 (or None) means 1 (cosine-weighted blending)."""
    return exp if exp else 1.0


def unproject(views: torch.Tensor, uv: torch.Tensor, weights: torch.Tensor, tex_hw: tuple[int, int],
              mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of `sample_texture`: scatter weighted pixels into texel space, per view.

    views [B, C, H, W], uv [B, H, W, 2], weights [B, H, W] (0 = ignore the pixel) -> (num [B, C, Ht, Wt],
    den [B, 1, Ht, Wt]) with num = sum_p a_pt w_p x_p and den = sum_p a_pt w_p (a = sampling taps).
    """
    B, C, H, W = views.shape
    Ht, Wt = tex_hw
    idx, a = _taps(uv, Ht, Wt, mode)  # [B, H, W, K]
    aw = (a * weights[..., None]).to(views.dtype)  # [B, H, W, K]
    K = idx.shape[-1]
    contrib = views.permute(0, 2, 3, 1)[..., None, :] * aw[..., None]  # [B, H, W, K, C]
    num = torch.zeros(B, Ht * Wt, C, dtype=views.dtype, device=views.device)
    flat_idx = idx.reshape(B, H * W * K)
    num.scatter_add_(1, flat_idx[..., None].expand(-1, -1, C), contrib.reshape(B, -1, C))
    den = torch.zeros(B, Ht * Wt, dtype=views.dtype, device=views.device)
    den.scatter_add_(1, flat_idx, aw.reshape(B, -1))
    return num.permute(0, 2, 1).reshape(B, C, Ht, Wt), den.view(B, 1, Ht, Wt)


def voronoi_fill(values: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Give every unseen texel the value of its nearest seen texel (jump flooding, +1 pass).

    values [N, C, Ht, Wt] (or [C, Ht, Wt]); seen [N, Ht, Wt] (or [Ht, Wt]) bool. Seen texels keep their value;
    with no seen texel at all the input is returned unchanged.
    """
    squeeze = values.ndim == 3
    if squeeze:
        values, seen = values[None], seen[None]
    N, C, H, W = values.shape
    dev = values.device
    ys = torch.arange(H, device=dev).view(1, H, 1).expand(N, H, W)
    xs = torch.arange(W, device=dev).view(1, 1, W).expand(N, H, W)
    best = torch.where(seen, ys * W + xs, torch.full_like(ys, -1))
    inf = torch.tensor(float("inf"), device=dev)
    bestd = torch.where(seen, torch.zeros((), device=dev), inf)
    steps, s = [], 1 << max(0, (max(H, W) - 1).bit_length() - 1)
    while s >= 1:
        steps.append(s)
        s //= 2
    for s in steps + [1]:
        for dy in (-s, 0, s):
            for dx in (-s, 0, s):
                if dy == 0 and dx == 0:
                    continue
                cand = torch.full_like(best, -1)  # cand[y, x] = best[y + dy, x + dx]
                ys0, ys1 = max(0, -dy), min(H, H - dy)
                xs0, xs1 = max(0, -dx), min(W, W - dx)
                if ys1 <= ys0 or xs1 <= xs0:
                    continue
                cand[:, ys0:ys1, xs0:xs1] = best[:, ys0 + dy:ys1 + dy, xs0 + dx:xs1 + dx]
                cy, cx = cand.div(W, rounding_mode="floor"), cand % W
                d = ((cy - ys) ** 2 + (cx - xs) ** 2).float()
                d = torch.where(cand >= 0, d, inf)
                better = d < bestd
                best = torch.where(better, cand, best)
                bestd = torch.where(better, d, bestd)
    src = best.clamp_min(0).view(N, 1, H * W).expand(-1, C, -1)
    out = torch.gather(values.reshape(N, C, H * W), 2, src).view(N, C, H, W)
    out = torch.where((best >= 0)[:, None], out, values)
    return out[0] if squeeze else out


def bake_texture(views: torch.Tensor, uv: torch.Tensor, weights: torch.Tensor, tex_hw: tuple[int, int],
                 mode: str = "nearest", fill: bool = True, eps: float = 1e-8
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted inverse of rendering: one texture from B views.

    views [B, C, H, W]; uv [B, H, W, 2]; weights [B, H, W] (e.g. `view_weights`, 0 on background).
    Returns (texture [C, Ht, Wt], total weight [Ht, Wt]): each seen texel is sum_i sum_p a w x / sum a w over all
    pixels of all views that sample it; unseen texels are Voronoi-filled when `fill` (else 0).
    """
    num, den = unproject(views, uv, weights, tex_hw, mode)
    num, den = num.sum(0), den.sum(0)[0]
    tex = num / (den + eps)
    tex = torch.where(den > 0, tex, torch.zeros_like(tex))
    if fill:
        tex = voronoi_fill(tex, den > 0)
    return tex, den


# ------------------------------------------------------------------------------------------------ SyncMVD order
# SyncMVD (and SyncTweedies' mesh app) bake in two stages: a per-view texture (mean of the pixels that sample each
# texel, Voronoi-filled within the view), then a blend over views with texel-space weights visible_i x cos_i^exp.
# The helpers below give that ordering; `bake_texture` above is the single-stage pixel-weighted mean.


def texel_geometry(verts: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, uv_faces: torch.Tensor,
                   tex_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which face each texel centre lies on and its 3D point: (texel_face [Ht, Wt] int64, -1 outside every UV
    triangle; texel_pos [Ht, Wt, 3]). Rasterises the UV layout (u -> x, v up -> rows up)."""
    from .raster import rasterize

    Ht, Wt = tex_hw
    uv = uvs.float()
    clip = torch.stack([2 * uv[:, 0] - 1, 1 - 2 * uv[:, 1], torch.full_like(uv[:, 0], 0.5), torch.ones_like(uv[:, 0])],
                       -1)
    fr = rasterize(clip, uv_faces, Ht, Wt, backend="torch")
    return fr.face_id[0], interpolate(fr, faces, verts.float())[0]


def texel_weights(texel_face: torch.Tensor, texel_pos: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor,
                  cameras, fragments, exp: float = 1.0) -> torch.Tensor:
    """Texel-space blend weights [B, Ht, Wt] = (texel's face visible in view i) x max(cos_i, 0)^exp.

    "Visible" means at least one pixel of view i shows the face (SyncMVD's visible_triangles); cos_i is between
    the face normal and the direction from the texel's 3D point to camera i.
    """
    B = len(cameras)
    F = faces.shape[0]
    vis = torch.zeros(B, F + 1, dtype=torch.bool, device=texel_face.device)
    fid = fragments.face_id.reshape(B, -1)
    vis.scatter_(1, torch.where(fid >= 0, fid, F), True)
    vis = vis[:, :F]
    tf = texel_face.clamp_min(0)
    n = face_normals(verts.float(), faces)[tf]  # [Ht, Wt, 3]
    if cameras.orthographic:
        to_cam = -cameras.R[:, 2].float()[:, None, None, :]
    else:
        to_cam = torch.nn.functional.normalize(cameras.centers.float()[:, None, None] - texel_pos[None], dim=-1)
    cos = (n[None] * to_cam).sum(-1)  # [B, Ht, Wt]
    ok = vis[:, tf] & (texel_face >= 0)[None] & (cos > 0)
    return torch.where(ok, cos.clamp_min(1e-12) ** exp, torch.zeros_like(cos))


def blend_views(num: torch.Tensor, den: torch.Tensor, weights: torch.Tensor, fill_each: bool = True,
                fill: bool = True, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """SyncMVD's second stage. num [B, C, Ht, Wt], den [B, 1, Ht, Wt] from `unproject` (with pixel weights = mask),
    weights [B, Ht, Wt] from `texel_weights` -> (texture [C, Ht, Wt], total weight [Ht, Wt]).

    Per view: mean = num / den where den > 0, Voronoi-filled over the texture when `fill_each`; then
    texture = sum_i w_i mean_i / (sum_i w_i + eps), Voronoi-filled where no view has weight when `fill`.
    """
    seen = den[:, 0] > 0
    per_view = torch.where(seen[:, None], num / den.clamp_min(1e-30), torch.zeros_like(num))
    if fill_each:
        per_view = voronoi_fill(per_view, seen)
    total = weights.sum(0)
    tex = (per_view * weights[:, None]).sum(0) / (total + eps)
    if fill:
        tex = voronoi_fill(tex, total > 0)
    return tex, total
