"""Generate the small render assets used by tests and smoke runs (deterministic; re-run to rebuild):

  assets/render/torus.obj + torus.mtl + torus.png   a UV-mapped torus with a 128x128 colour-grid texture
  assets/render/gaussians.ply                       300 Gaussians on a sphere, SH degree 1, 3DGS layout
  assets/render/gs_cameras/transforms_train.json    4 Blender-style cameras on a ring around it (tiny_gs.yaml)

python assets/make_render_assets.py [--out assets/render]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.render.gaussians import Gaussians, rgb_to_sh_dc, save_ply  # noqa: E402
from common.render.mesh import save_obj, torus_mesh  # noqa: E402


def grid_texture(size: int = 128, cells: int = 8) -> torch.Tensor:
    """[3, size, size] colour grid: hue varies with u, brightness with v, thin dark lines between cells."""
    t = (torch.arange(size) + 0.5) / size
    v, u = torch.meshgrid(t, t, indexing="ij")
    r = 0.5 + 0.5 * torch.cos(2 * math.pi * u)
    g = 0.5 + 0.5 * torch.cos(2 * math.pi * (u - 1 / 3))
    b = 0.5 + 0.5 * torch.cos(2 * math.pi * (u - 2 / 3))
    tex = torch.stack([r, g, b]) * (0.4 + 0.6 * v)
    line = ((u * cells) % 1 < 0.08) | ((v * cells) % 1 < 0.08)
    return torch.where(line, torch.full_like(tex, 0.1), tex)


def sphere_gaussians(n: int = 300, seed: int = 0) -> Gaussians:
    """Gaussians on a unit sphere, coloured by their direction, flattened along the normal."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.float64) + 0.5
    phi = torch.acos(1 - 2 * i / n)
    theta = math.pi * (1 + 5 ** 0.5) * i
    xyz = torch.stack([phi.sin() * theta.cos(), phi.cos(), phi.sin() * theta.sin()], -1).float() * 0.8
    rgb = (xyz / 0.8 + 1) / 2
    scales = torch.tensor([0.12, 0.12, 0.02]).expand(n, 3)
    # rotate local z onto the normal: quaternion between (0, 0, 1) and n
    nrm = torch.nn.functional.normalize(xyz, dim=-1)
    axis = torch.linalg.cross(torch.tensor([0.0, 0, 1]).expand(n, 3), nrm, dim=-1)
    w = 1 + nrm[:, 2:3]
    quats = torch.nn.functional.normalize(torch.cat([w, axis], -1), dim=-1)
    quats = torch.where(w < 1e-6, torch.tensor([0.0, 1, 0, 0]), quats)
    return Gaussians(means=xyz, quats=quats, log_scales=scales.log(),
                     opacity_logits=torch.full((n,), 2.0), sh_dc=rgb_to_sh_dc(rgb),
                     sh_rest=torch.randn(n, 3, 3, generator=g) * 0.02)


def ring_cameras(n: int = 4, dist: float = 3.0, size: int = 64, elevation: float = 0.3) -> dict:
    """A Blender `transforms_train.json`: n cameras (OpenGL camera-to-world) on a ring looking at the origin."""
    frames = []
    for i in range(n):
        az = 2 * math.pi * i / n
        c = torch.tensor([dist * math.cos(elevation) * math.sin(az), dist * math.sin(elevation),
                          dist * math.cos(elevation) * math.cos(az)], dtype=torch.float64)
        fwd = -c / c.norm()
        right = torch.linalg.cross(fwd, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
        right = right / right.norm()
        up = torch.linalg.cross(right, fwd)
        m = torch.eye(4, dtype=torch.float64)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, -fwd, c
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": [[round(float(v), 6) for v in row]
                                                                           for row in m]})
    return {"camera_angle_x": 0.69, "w": size, "h": size, "frames": frames}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "render"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    mesh = torus_mesh(n_major=32, n_minor=16)
    save_obj(out / "torus.obj", mesh, grid_texture())
    save_ply(out / "gaussians.ply", sphere_gaussians())
    (out / "gs_cameras").mkdir(parents=True, exist_ok=True)
    (out / "gs_cameras" / "transforms_train.json").write_text(json.dumps(ring_cameras(), indent=1) + "\n")
    for p in sorted(out.iterdir()):
        print(f"{p}  {p.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
