"""Triangle rasterisation: `rasterize(verts_clip, faces, H, W) -> Fragments`, with three backends.

backend "torch" (reference, any device), "triton" (CUDA; or CPU under TRITON_INTERPRET=1), "pytorch3d" (when
importable) and "auto" (triton on CUDA when triton imports, else torch). Clip space and pixel conventions
are those of `common.render.cameras`: NDC x right, y down, z_ndc in [0, 1]; pixel centres at +0.5.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.errors import UsageError

from .interpolate import interpolate
from .setup import setup_faces, resolve

__all__ = ["Fragments", "rasterize", "interpolate", "available_backends"]


@dataclass
class Fragments:
    """Per-pixel result of rasterisation (the nearest face through each pixel centre).

    face_id [B, H, W] int64: index into `faces`, -1 for background.
    bary [B, H, W, 3] float32: perspective-correct barycentrics of the face's three vertices (0 on background).
    depth [B, H, W] float32: z_ndc in [0, 1] (0 on background); `Cameras.ndc_depth_to_view` gives camera z.
    """

    face_id: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """[B, H, W] bool: pixel covered by a face."""
        return self.face_id >= 0


def _triton_ok(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this environment."""
    out = ["torch"]
    if _triton_ok(torch.device(device)):
        out.append("triton")
    from .pytorch3d_backend import available as p3d_available

    if p3d_available():
        out.append("pytorch3d")
    return out


def rasterize(verts_clip: torch.Tensor, faces: torch.Tensor, H: int, W: int, backend: str = "auto",
              cull_backfaces: bool = False) -> Fragments:
    """Rasterise triangles given in clip space.

    verts_clip: [V, 4] or [B, V, 4] clip coordinates (e.g. `Cameras.to_clip(verts)`); faces: [F, 3] int.
    Faces with a vertex behind a perspective camera (w <= 0) are culled (no near-plane clipping); pixels whose
    z_ndc falls outside [0, 1] are rejected. `cull_backfaces` drops faces wound clockwise as seen from the
    camera (front faces are counter-clockwise, the OBJ / OpenGL convention).
    """
    if verts_clip.ndim == 2:
        verts_clip = verts_clip[None]
    if verts_clip.ndim != 3 or verts_clip.shape[-1] != 4:
        raise UsageError(f"verts_clip must be [V, 4] or [B, V, 4], got {tuple(verts_clip.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise UsageError(f"faces must be [F, 3], got {tuple(faces.shape)}")
    if faces.shape[0] >= 2**31:
        raise UsageError("at most 2^31 - 1 faces")
    faces = faces.to(device=verts_clip.device, dtype=torch.long)
    if faces.shape[0] == 0:
        B, dev = verts_clip.shape[0], verts_clip.device
        return Fragments(torch.full((B, H, W), -1, dtype=torch.long, device=dev),
                         torch.zeros(B, H, W, 3, device=dev), torch.zeros(B, H, W, device=dev))
    if backend == "auto":
        backend = "triton" if verts_clip.device.type == "cuda" and _triton_ok(verts_clip.device) else "torch"
    if backend == "pytorch3d":
        from .pytorch3d_backend import rasterize_pytorch3d

        return Fragments(*rasterize_pytorch3d(verts_clip, faces, H, W, cull_backfaces))
    setup = setup_faces(verts_clip, faces, H, W, cull_backfaces)
    if backend == "torch":
        from .torch_ref import rasterize_keys
    elif backend == "triton":
        if not _triton_ok(verts_clip.device):
            raise UsageError("the triton rasteriser needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        from .triton_kernel import rasterize_keys
    else:
        raise UsageError(f"unknown rasteriser backend {backend!r}; choose auto, torch, triton or pytorch3d")
    keys = rasterize_keys(setup, H, W)
    return Fragments(*resolve(keys, setup, H, W))
