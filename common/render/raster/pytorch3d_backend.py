"""Optional pytorch3d backend (used only when pytorch3d imports; it is not a dependency).

Our clip space is turned into pytorch3d's NDC (x left, y up, shorter side spanning [-1, 1]) with z = z_ndc,
rasterised without perspective correction, so `zbuf` is our screen-linear depth; the perspective-correct
barycentrics are then recovered with the vertices' 1/w. Validity (w > 0, back faces) comes from our setup.
"""
from __future__ import annotations

import torch

from .setup import setup_faces


def available() -> bool:
    try:
        import pytorch3d.renderer  # noqa: F401
    except Exception:  # ImportError, or a broken build
        return False
    return True


def rasterize_pytorch3d(verts_clip: torch.Tensor, faces: torch.Tensor, H: int, W: int, cull_backfaces: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verts_clip [B, V, 4], faces [F, 3] -> (face_id [B,H,W], bary [B,H,W,3], depth [B,H,W])."""
    from common.errors import UsageError

    if not available():
        raise UsageError("the pytorch3d rasteriser backend needs pytorch3d: pip install -e .[pytorch3d] "
                         "(or choose --raster_backend torch / triton)")
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
    from pytorch3d.structures import Meshes
    B = verts_clip.shape[0]
    setup = setup_faces(verts_clip, faces, H, W, cull_backfaces)
    v = verts_clip.float()
    w = v[..., 3:].clamp_min(1e-8)
    s = min(H, W)
    ndc = torch.cat([-v[..., :1] / w * (W / s), -v[..., 1:2] / w * (H / s), v[..., 2:3] / w], -1)
    keep = [setup.valid[b].nonzero()[:, 0] for b in range(B)]
    meshes = Meshes(verts=list(ndc), faces=[faces[k] for k in keep])
    pix_to_face, zbuf, bary, _ = rasterize_meshes(meshes, image_size=(H, W), blur_radius=0.0, faces_per_pixel=1,
                                                  perspective_correct=False, cull_backfaces=False)
    pix, zbuf, bary = pix_to_face[..., 0], zbuf[..., 0], bary[..., 0, :]
    first = meshes.mesh_to_faces_packed_first_idx()
    hit = pix >= 0
    face_id = torch.full_like(pix, -1)
    for b in range(B):
        local = pix[b] - first[b]
        face_id[b] = torch.where(hit[b], keep[b][local.clamp(0, max(len(keep[b]) - 1, 0))], -1) if len(keep[b]) \
            else -1
    fid = face_id.clamp_min(0)
    inv_w = setup.inv_w[torch.arange(B, device=fid.device)[:, None, None], fid]
    p = bary * inv_w
    p = p / p.sum(-1, keepdim=True).where(hit[..., None], torch.ones_like(p[..., :1]))
    return face_id, p * hit[..., None], torch.where(hit, zbuf, torch.zeros_like(zbuf))
