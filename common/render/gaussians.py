"""3D Gaussians: 3DGS PLY IO, feature rendering (pure-torch EWA splatting, or gsplat on CUDA), and the
colour-only optimisation that SyncTweedies' gs app uses as its n-to-1 inverse.

Cameras are `common.render.cameras.Cameras` (OpenCV frame, pixel centres at +0.5; gsplat uses the same).
The torch path sorts Gaussians by camera depth and alpha-composites front to back over every pixel, so it is
O(N H W): meant for CPUs, tests and small counts. Features may have any number of channels C (RGB, latents).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.errors import UsageError

SH_C0 = 0.28209479177387814  # degree-0 spherical-harmonic constant: rgb = SH_C0 * f_dc + 0.5


@dataclass
class Gaussians:
    """means [N, 3]; quats [N, 4] (w, x, y, z, not necessarily unit); log_scales [N, 3]; opacity_logits [N];
    sh_dc [N, 3] (f_dc); sh_rest [N, K, 3] (f_rest, K = 0, 3, 8 or 15). Stored as 3DGS stores them."""

    means: torch.Tensor
    quats: torch.Tensor
    log_scales: torch.Tensor
    opacity_logits: torch.Tensor
    sh_dc: torch.Tensor
    sh_rest: torch.Tensor

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales)

    @property
    def rgb(self) -> torch.Tensor:
        """View-independent colour [N, 3] from the degree-0 coefficients (not clamped)."""
        return SH_C0 * self.sh_dc + 0.5

    def to(self, device: torch.device | str) -> "Gaussians":
        return Gaussians(*(t.to(device) for t in (self.means, self.quats, self.log_scales, self.opacity_logits,
                                                  self.sh_dc, self.sh_rest)))


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """Inverse of `Gaussians.rgb`: [N, 3] colours -> f_dc."""
    return (rgb - 0.5) / SH_C0


# ------------------------------------------------------------------------------------------------ PLY IO

_REQUIRED = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]


def load_ply(path: str | Path) -> Gaussians:
    """Read a 3DGS point cloud (standard property names; f_rest_* optional). UsageError when fields are missing."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"Gaussian PLY not found: {p}")
    try:
        from plyfile import PlyData

        ply = PlyData.read(str(p))
        vert = ply["vertex"]
    except ImportError:
        raise UsageError("reading Gaussian PLY files needs plyfile: pip install plyfile") from None
    except Exception as exc:
        raise UsageError(f"cannot read PLY {p}: {exc}") from None
    names = [prop.name for prop in vert.properties]
    missing = [n for n in _REQUIRED if n not in names]
    if missing:
        raise UsageError(f"{p} is not a 3DGS PLY: missing vertex properties {', '.join(missing)}")
    col = lambda n: np.asarray(vert[n], dtype=np.float32)  # noqa: E731
    get = lambda ns: torch.from_numpy(np.stack([col(n) for n in ns], -1))  # noqa: E731
    rest = sorted((n for n in names if n.startswith("f_rest_")), key=lambda n: int(n.split("_")[-1]))
    N = len(vert.data)
    if len(rest) % 3:
        raise UsageError(f"{p}: {len(rest)} f_rest_* properties is not a multiple of 3")
    K = len(rest) // 3
    sh_rest = get(rest).view(N, 3, K).transpose(1, 2).contiguous() if K else torch.zeros(N, 0, 3)
    return Gaussians(means=get(["x", "y", "z"]), quats=get([f"rot_{i}" for i in range(4)]),
                     log_scales=get([f"scale_{i}" for i in range(3)]), opacity_logits=torch.from_numpy(col("opacity")),
                     sh_dc=get([f"f_dc_{i}" for i in range(3)]), sh_rest=sh_rest)


def save_ply(path: str | Path, g: Gaussians) -> None:
    """Write a binary little-endian 3DGS PLY (the layout the original code and viewers read), atomically."""
    from plyfile import PlyData, PlyElement

    from common.io import atomic_write

    N, K = len(g), g.sh_rest.shape[1]
    names = ["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)] + \
        [f"f_rest_{i}" for i in range(3 * K)] + ["opacity"] + [f"scale_{i}" for i in range(3)] + \
        [f"rot_{i}" for i in range(4)]
    cols = torch.cat([g.means, torch.zeros(N, 3), g.sh_dc, g.sh_rest.transpose(1, 2).reshape(N, 3 * K),
                      g.opacity_logits[:, None], g.log_scales, g.quats], 1).detach().cpu().float().numpy()
    arr = np.empty(N, dtype=[(n, "f4") for n in names])
    for i, n in enumerate(names):
        arr[n] = cols[:, i]
    with atomic_write(path) as tmp:
        PlyData([PlyElement.describe(arr, "vertex")]).write(str(tmp))


# ------------------------------------------------------------------------------------------------ rendering


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """[N, 4] (w, x, y, z) -> [N, 3, 3]; quaternions are normalised first."""
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).view(-1, 3, 3)


def covariances(g: Gaussians) -> torch.Tensor:
    """World-space covariances [N, 3, 3] = R S S^T R^T."""
    M = quat_to_rotmat(g.quats) * g.scales[:, None, :]
    return M @ M.transpose(1, 2)


def project_gaussians(g: Gaussians, cameras, eps2d: float = 0.3) -> tuple[torch.Tensor, ...]:
    """EWA projection. Returns means2d [B, N, 2] (pixels), cov2d [B, N, 2, 2] (with eps2d I added),
    depth [B, N] (camera z), compensation [B, N] = sqrt(det(cov2d without eps) / det(cov2d))."""
    R, T = cameras.R.to(g.means), cameras.T.to(g.means)
    mc = g.means[None] @ R.transpose(1, 2) + T[:, None]  # [B, N, 3]
    x, y, z = mc.unbind(-1)
    fx, fy = cameras.fx.to(mc)[:, None], cameras.fy.to(mc)[:, None]
    cx, cy = cameras.cx.to(mc)[:, None], cameras.cy.to(mc)[:, None]
    zero = torch.zeros_like(x)
    if cameras.orthographic:
        J = torch.stack([fx.expand_as(x), zero, zero, zero, fy.expand_as(x), zero], -1).view(*x.shape, 2, 3)
        means2d = torch.stack([fx * x + cx, fy * y + cy], -1)
    else:
        zs = z.clamp_min(1e-6)
        # clamp the Jacobian's tangent like 3DGS (1.3 x the half FOV) so that off-screen Gaussians stay sane
        limx = 1.3 * (0.5 * cameras.width / fx)
        limy = 1.3 * (0.5 * cameras.height / fy)
        tx = (x / zs).clamp(-limx, limx) * zs
        ty = (y / zs).clamp(-limy, limy) * zs
        J = torch.stack([fx / zs, zero, -fx * tx / zs ** 2, zero, fy / zs, -fy * ty / zs ** 2], -1).view(*x.shape, 2, 3)
        means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)
    cov_cam = R[:, None] @ covariances(g)[None] @ R.transpose(1, 2)[:, None]  # [B, N, 3, 3]
    cov2d = J @ cov_cam @ J.transpose(-1, -2)
    det0 = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    cov2d = cov2d + eps2d * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    det = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    comp = torch.sqrt((det0 / det).clamp_min(0))
    return means2d, cov2d, z, comp


def _render_torch(g: Gaussians, cameras, features: torch.Tensor, eps2d: float, antialiased: bool,
                  pixel_chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (colour [B, C, H, W], alpha [B, 1, H, W], expected depth [B, 1, H, W]); no background."""
    B, H, W = len(cameras), cameras.height, cameras.width
    means2d, cov2d, z, comp = project_gaussians(g, cameras, eps2d)
    opac = (g.opacities[None] * (comp if antialiased else 1)).expand_as(z)
    a, b, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det = (a * c - b * b).clamp_min(1e-12)
    conic = torch.stack([c / det, -b / det, a / det], -1)  # inverse covariance (xx, xy, yy)
    visible = z > cameras.near
    order = torch.argsort(torch.where(visible, z, torch.full_like(z, float("inf"))), dim=1)  # front to back
    take = lambda t: torch.gather(t, 1, order.view(B, -1, *([1] * (t.ndim - 2))).expand_as(t))  # noqa: E731
    means2d, conic, opac, z, visible = take(means2d), take(conic), take(opac), take(z), take(visible)
    feats = features[order]  # [B, N, C]
    ys, xs = torch.meshgrid(torch.arange(H, device=z.device), torch.arange(W, device=z.device), indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(-1, 2).to(means2d) + 0.5  # [P, 2] pixel centres
    N = z.shape[1]
    chunk = max(1, pixel_chunk // max(N, 1))
    cols, alphas, depths = [], [], []
    for s in range(0, H * W, chunk):
        d = pix[None, None, s:s + chunk] - means2d[:, :, None]  # [B, N, P, 2]
        power = -0.5 * (conic[..., 0:1] * d[..., 0] ** 2 + conic[..., 2:3] * d[..., 1] ** 2) \
            - conic[..., 1:2] * d[..., 0] * d[..., 1]
        alpha = (opac[..., None] * torch.exp(power)).clamp_max(0.99)
        alpha = torch.where((power <= 0) & (alpha >= 1 / 255) & visible[..., None], alpha, torch.zeros_like(alpha))
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
        w = alpha * trans  # [B, N, P]
        cols.append(torch.einsum("bnp,bnc->bcp", w, feats.to(w)))
        alphas.append(w.sum(1))
        depths.append((w * z[..., None]).sum(1))
    col = torch.cat(cols, -1).view(B, -1, H, W)
    return col, torch.cat(alphas, -1).view(B, 1, H, W), torch.cat(depths, -1).view(B, 1, H, W)


def _render_gsplat(g: Gaussians, cameras, features: torch.Tensor, eps2d: float, antialiased: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gsplat import rasterization

    B = len(cameras)
    dev = g.means.device
    viewmats = torch.eye(4, device=dev).repeat(B, 1, 1)
    viewmats[:, :3, :3], viewmats[:, :3, 3] = cameras.R.to(dev), cameras.T.to(dev)
    Ks = torch.zeros(B, 3, 3, device=dev)
    Ks[:, 0, 0], Ks[:, 1, 1] = cameras.fx.to(dev), cameras.fy.to(dev)
    Ks[:, 0, 2], Ks[:, 1, 2], Ks[:, 2, 2] = cameras.cx.to(dev), cameras.cy.to(dev), 1
    out, alpha, _ = rasterization(g.means, torch.nn.functional.normalize(g.quats, dim=-1), g.scales, g.opacities,
                                  features, viewmats, Ks, cameras.width, cameras.height, near_plane=cameras.near,
                                  far_plane=cameras.far, eps2d=eps2d, render_mode="RGB+ED",
                                  rasterize_mode="antialiased" if antialiased else "classic")
    col, depth = out[..., :-1], out[..., -1:]  # expected depth is normalised by alpha in gsplat
    return col.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2), (depth * alpha).permute(0, 3, 1, 2)


def render_gaussians(g: Gaussians, cameras, features: torch.Tensor | None = None,
                     background: Sequence[float] | torch.Tensor | None = None, *, eps2d: float = 0.3,
                     antialiased: bool = False, backend: str = "auto", pixel_chunk: int = 1 << 22
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render per-Gaussian features.

    features [N, C] (default: the degree-0 RGB); background [C] composited as img + (1 - alpha) bg.
    Returns (image [B, C, H, W], alpha [B, 1, H, W], depth [B, 1, H, W]) where depth is the expected camera z
    divided by alpha (0 where alpha = 0). backend: "torch", "gsplat" (CUDA) or "auto".
    """
    feats = g.rgb if features is None else features
    if feats.shape[0] != len(g):
        raise UsageError(f"features have {feats.shape[0]} rows for {len(g)} Gaussians")
    if cameras.orthographic:
        backend = "torch"
    if backend == "auto":
        backend = "gsplat" if g.means.is_cuda and _gsplat_ok() else "torch"
    if backend == "gsplat":
        if not _gsplat_ok():
            raise UsageError("the gsplat backend needs gsplat and a CUDA device: pip install -e .[gsplat] "
                             "(or use --backend torch)")
        col, alpha, depth = _render_gsplat(g, cameras, feats, eps2d, antialiased)
    elif backend == "torch":
        col, alpha, depth = _render_torch(g, cameras, feats, eps2d, antialiased, pixel_chunk)
    else:
        raise UsageError(f"unknown Gaussian render backend {backend!r}; choose auto, torch or gsplat")
    depth = torch.where(alpha > 0, depth / alpha.clamp_min(1e-10), torch.zeros_like(depth))
    if background is not None:
        bg = torch.as_tensor(background, dtype=col.dtype, device=col.device).view(1, -1, 1, 1)
        col = col + (1 - alpha) * bg
    return col, alpha, depth


def _gsplat_ok() -> bool:
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ inverse


def fit_colors(g: Gaussians, cameras, target_images: torch.Tensor, masks: torch.Tensor | None = None,
               iterations: int = 1000, lr: float = 0.025, init: torch.Tensor | None = None,
               views_per_step: int = 1, activation: str = "none", background: Sequence[float] | None = None,
               loss: str = "l1", generator: torch.Generator | None = None, **render_kwargs
               ) -> torch.Tensor:
    """Colour-only optimisation (geometry fixed): features so that renders match the targets.

    target_images [B, C, H, W] (one per camera); masks [B, 1, H, W] (1 = count the pixel); init [N, C]
    (default zeros, SyncTweedies' `color_assign_method` "zero"). Each step renders `views_per_step` random views
    and takes an Adam step on the masked L1 (or "l2") loss. `activation` "sigmoid" optimises logits rendered
    through a sigmoid (the gs app's rgb canonical domain). Returns the raw features [N, C] (pre-activation).
    """
    B, C = target_images.shape[:2]
    if B != len(cameras):
        raise UsageError(f"{B} target images for {len(cameras)} cameras")
    feats = torch.zeros(len(g), C, device=g.means.device) if init is None else init.detach().clone()
    feats.requires_grad_(True)
    opt = torch.optim.Adam([feats], lr=lr)
    act = torch.sigmoid if activation == "sigmoid" else (lambda t: t)
    geo = replace(g, **{k: getattr(g, k).detach() for k in ("means", "quats", "log_scales", "opacity_logits",
                                                           "sh_dc", "sh_rest")})
    for _ in range(iterations):
        idx = torch.randperm(B, generator=generator)[:views_per_step]
        img, _, _ = render_gaussians(geo, cameras[idx], act(feats), background, **render_kwargs)
        diff = img - target_images[idx].to(img)
        err = diff.abs() if loss == "l1" else diff ** 2
        if masks is not None:
            m = masks[idx].to(err)
            err = err * m
            value = err.sum() / (m.sum() * C).clamp_min(1)
        else:
            value = err.mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    return feats.detach()
