"""Triangle meshes with UVs and a texture: loading (OBJ/GLB/PLY via trimesh), clean-up, normalisation,
UV atlases (xatlas) and textured OBJ export. Also two analytic primitives for tests and assets.

Faces are counter-clockwise seen from outside. UVs follow the OBJ convention (v up), see `texture.py`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from common.errors import UsageError


@dataclass
class Mesh:
    """verts [V, 3] float32, faces [F, 3] int64; uvs [T, 2] and uv_faces [F, 3] (index uvs) or None;
    texture [C, Ht, Wt] float in [0, 1] or None."""

    verts: torch.Tensor
    faces: torch.Tensor
    uvs: torch.Tensor | None = None
    uv_faces: torch.Tensor | None = None
    texture: torch.Tensor | None = None

    @property
    def has_uv(self) -> bool:
        return self.uvs is not None and self.uv_faces is not None

    def to(self, device: torch.device | str) -> "Mesh":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Mesh(mv(self.verts), mv(self.faces), mv(self.uvs), mv(self.uv_faces), mv(self.texture))


# ------------------------------------------------------------------------------------------------ primitives


def box_mesh(size: float = 1.0) -> Mesh:
    """Cube [-size, size]^3 with 24 vertices and six separate UV islands in a 3 x 2 atlas (with gutters)."""
    # (normal axis, sign) per face, with tangent directions (u axis, v axis) giving outward CCW winding
    specs = [((1, 0, 0), (0, 0, -1), (0, 1, 0)), ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
             ((0, 1, 0), (1, 0, 0), (0, 0, -1)), ((0, -1, 0), (1, 0, 0), (0, 0, 1)),
             ((0, 0, 1), (1, 0, 0), (0, 1, 0)), ((0, 0, -1), (-1, 0, 0), (0, 1, 0))]
    verts, uvs, faces = [], [], []
    pad = 0.02
    for i, (n, tu, tv) in enumerate(specs):
        n, tu, tv = (np.array(a, dtype=np.float64) for a in (n, tu, tv))
        col, row = i % 3, i // 3
        u0, v0 = col / 3 + pad, row / 2 + pad
        du, dv = 1 / 3 - 2 * pad, 1 / 2 - 2 * pad
        base = len(verts)
        for a, b in ((0, 0), (1, 0), (1, 1), (0, 1)):
            verts.append(size * (n + (2 * a - 1) * tu + (2 * b - 1) * tv))
            uvs.append((u0 + a * du, v0 + b * dv))
        faces += [(base, base + 1, base + 2), (base, base + 2, base + 3)]
    f = torch.tensor(faces, dtype=torch.long)
    return Mesh(torch.tensor(np.array(verts), dtype=torch.float32), f, torch.tensor(uvs, dtype=torch.float32),
                f.clone())


def torus_mesh(R: float = 0.7, r: float = 0.3, n_major: int = 32, n_minor: int = 16) -> Mesh:
    """Torus around the y axis with a seamless-looking (u around the ring, v around the tube) UV grid.

    Seam vertices are duplicated so that UVs run 0..1 without wrapping; uv_faces == faces.
    """
    i = torch.arange(n_major + 1, dtype=torch.float64) / n_major
    j = torch.arange(n_minor + 1, dtype=torch.float64) / n_minor
    u, v = torch.meshgrid(i, j, indexing="ij")
    a, b = 2 * math.pi * u, 2 * math.pi * v
    x = (R + r * b.cos()) * a.cos()
    z = -(R + r * b.cos()) * a.sin()
    y = r * b.sin()
    verts = torch.stack([x, y, z], -1).reshape(-1, 3).float()
    uvs = torch.stack([u, v], -1).reshape(-1, 2).float()
    idx = torch.arange((n_major + 1) * (n_minor + 1)).view(n_major + 1, n_minor + 1)
    q0, q1, q2, q3 = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    faces = torch.cat([torch.stack([q0, q1, q2], -1).reshape(-1, 3), torch.stack([q0, q2, q3], -1).reshape(-1, 3)])
    return Mesh(verts, faces, uvs, faces.clone())


# ------------------------------------------------------------------------------------------------ clean-up


def degenerate_faces(verts: torch.Tensor, faces: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[F] bool: faces with repeated indices or (near) zero area."""
    f = faces.long()
    rep = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])
    v = verts.double()
    area2 = torch.linalg.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1).norm(dim=-1)
    scale = (v.amax(0) - v.amin(0)).norm().clamp_min(1e-30)
    return rep | (area2 <= eps * scale ** 2)


def clean_mesh(mesh: Mesh, degenerate: str = "skip", name: str = "mesh") -> Mesh:
    """Check a mesh; `degenerate` = "skip" (drop them with a warning), "error" or "keep"."""
    if mesh.faces.numel() == 0:
        raise UsageError(f"{name}: the mesh has no faces (a point cloud?); a triangle mesh is required")
    if mesh.faces.min() < 0 or mesh.faces.max() >= len(mesh.verts):
        raise UsageError(f"{name}: face indices out of range for {len(mesh.verts)} vertices")
    if not torch.isfinite(mesh.verts).all():
        raise UsageError(f"{name}: vertex positions contain NaN or inf")
    bad = degenerate_faces(mesh.verts, mesh.faces)
    n_bad = int(bad.sum())
    if n_bad and degenerate != "keep":
        msg = f"{name}: {n_bad} of {len(bad)} faces are degenerate (zero area or repeated vertices)"
        if degenerate == "error" or n_bad == len(bad):
            raise UsageError(msg + ("" if n_bad < len(bad) else "; no usable face left"))
        warnings.warn(msg + "; skipping them", stacklevel=2)
        keep = ~bad
        mesh = replace(mesh, faces=mesh.faces[keep],
                       uv_faces=None if mesh.uv_faces is None else mesh.uv_faces[keep])
    return mesh


def normalize_mesh(mesh: Mesh, scale: float = 1.0) -> Mesh:
    """Centre the bounding box at the origin and scale so the largest |coordinate| is `scale` (fits [-s, s]^3).

    `scale` is the mesh app's `--mesh_scale`.
    """
    lo, hi = mesh.verts.amin(0), mesh.verts.amax(0)
    v = mesh.verts - (lo + hi) / 2
    ext = v.abs().max().clamp_min(1e-12)
    return replace(mesh, verts=v * (scale / ext))


def autouv(mesh: Mesh) -> Mesh:
    """UV atlas with xatlas (vertices are split along the new seams; uv_faces == faces afterwards)."""
    try:
        import xatlas
    except ImportError:
        raise UsageError("automatic UVs need the xatlas package: pip install xatlas") from None
    vmapping, indices, uvs = xatlas.parametrize(mesh.verts.numpy().astype(np.float32),
                                                mesh.faces.numpy().astype(np.uint32))
    faces = torch.from_numpy(indices.astype(np.int64))
    return Mesh(mesh.verts[torch.from_numpy(vmapping.astype(np.int64))], faces,
                torch.from_numpy(uvs.astype(np.float32)), faces.clone(), mesh.texture)


# ------------------------------------------------------------------------------------------------ IO


def _image_to_tensor(img) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _obj_texture_path(path: Path) -> Path | None:
    """The map_Kd file named by the OBJ's material library, or None when the OBJ names none."""
    mtllibs = [ln.split(None, 1)[1].strip() for ln in path.read_text(errors="replace").splitlines()
               if ln.startswith("mtllib ") and len(ln.split(None, 1)) > 1]
    for lib in mtllibs:
        mtl = path.parent / lib
        if not mtl.is_file():
            raise UsageError(f"{path}: material library {mtl} not found")
        for ln in mtl.read_text(errors="replace").splitlines():
            parts = ln.strip().split()
            if parts and parts[0] == "map_Kd" and len(parts) > 1:
                tex = path.parent / parts[-1]
                if not tex.is_file():
                    raise UsageError(f"{path}: texture image {tex} (map_Kd in {mtl.name}) not found")
                return tex
    return None


def load_mesh(path: str | Path, degenerate: str = "skip", autouv_if_missing: bool = False) -> Mesh:
    """Load an OBJ (with UVs and its map_Kd texture), GLB/GLTF or PLY mesh; multi-part scenes are merged.

    Raises UsageError for a missing/unreadable file, no faces, a missing texture file, or (with
    degenerate="error") degenerate faces. With `autouv_if_missing`, a mesh without UVs gets an xatlas atlas.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"mesh file not found: {p}")
    try:
        import trimesh
    except ImportError:
        raise UsageError("loading meshes needs trimesh: pip install trimesh") from None
    tex_path = _obj_texture_path(p) if p.suffix.lower() == ".obj" else None
    try:
        loaded = trimesh.load(p, process=False, maintain_order=True)
    except Exception as exc:  # trimesh raises many types for broken files
        raise UsageError(f"cannot read mesh {p}: {exc}") from None
    if isinstance(loaded, trimesh.Scene):
        geoms = [g for g in loaded.dump() if isinstance(g, trimesh.Trimesh)] if loaded.geometry else []
        if not geoms:
            raise UsageError(f"{p}: the file holds no triangle mesh")
        loaded = geoms[0] if len(geoms) == 1 else trimesh.util.concatenate(geoms)
    if not isinstance(loaded, trimesh.Trimesh) or len(getattr(loaded, "faces", [])) == 0:
        raise UsageError(f"{p}: the mesh has no faces (a point cloud?); a triangle mesh is required")
    verts = torch.tensor(np.asarray(loaded.vertices), dtype=torch.float32)
    faces = torch.tensor(np.asarray(loaded.faces), dtype=torch.long)
    uvs = texture = None
    visual = loaded.visual
    uv = getattr(visual, "uv", None)
    if uv is not None and len(uv) == len(verts):
        uvs = torch.tensor(np.asarray(uv), dtype=torch.float32)
        img = getattr(getattr(visual, "material", None), "image", None)
        if img is None:
            img = getattr(getattr(visual, "material", None), "baseColorTexture", None)
        if img is not None:
            texture = _image_to_tensor(img)
    if texture is None and tex_path is not None:
        from PIL import Image

        try:
            texture = _image_to_tensor(Image.open(tex_path))
        except Exception as exc:
            raise UsageError(f"cannot read texture {tex_path}: {exc}") from None
    mesh = Mesh(verts, faces, uvs, None if uvs is None else faces.clone(), texture)
    mesh = clean_mesh(mesh, degenerate, name=str(p))
    if autouv_if_missing and not mesh.has_uv:
        mesh = autouv(mesh)
    return mesh


def save_obj(path: str | Path, mesh: Mesh, texture: torch.Tensor | None = None) -> None:
    """Write `path` (.obj) + `<stem>.mtl` + `<stem>.png` (texture [C, Ht, Wt] in [0, 1]), each atomically."""
    from PIL import Image

    from common.io import atomic_write, atomic_write_text

    p = Path(path)
    tex = mesh.texture if texture is None else texture
    lines = []
    if tex is not None and mesh.has_uv:
        lines.append(f"mtllib {p.stem}.mtl")
        lines.append("usemtl material_0")
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.verts.tolist()]
    if mesh.has_uv:
        lines += [f"vt {u:.6f} {v:.6f}" for u, v in mesh.uvs.tolist()]
        lines += [f"f {a + 1}/{ta + 1} {b + 1}/{tb + 1} {c + 1}/{tc + 1}"
                  for (a, b, c), (ta, tb, tc) in zip(mesh.faces.tolist(), mesh.uv_faces.tolist())]
    else:
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in mesh.faces.tolist()]
    if tex is not None and mesh.has_uv:
        arr = (tex[:3].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        with atomic_write(p.with_suffix(".png")) as tmp:
            Image.fromarray(arr).save(tmp)
        atomic_write_text(p.with_suffix(".mtl"),
                          f"newmtl material_0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {p.stem}.png\n")
    atomic_write_text(p, "\n".join(lines) + "\n")
