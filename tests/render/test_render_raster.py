"""Rasteriser: analytic coverage and depth, a cube seen along the axes, batching/chunking, the Triton kernel
against the torch reference (TRITON_INTERPRET=1 in a subprocess), interpolation and depth/normal maps."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common.errors import UsageError
from common.render.cameras import Cameras
from common.render.mesh import box_mesh
from common.render.raster import interpolate, rasterize
from common.render.raster.maps import depth_map, face_normals, normal_map, normalize_depth, vertex_normals
from common.render.raster.setup import setup_faces
from common.render.raster.torch_ref import rasterize_keys

ROOT = Path(__file__).resolve().parents[2]


def _tilted_triangle():
    """A triangle in clip space with w varying per vertex (perspective) and generic (non-grid) corners."""
    ndc = torch.tensor([[-0.71, -0.53], [0.62, -0.37], [-0.11, 0.77]])
    w = torch.tensor([1.0, 2.0, 3.0])
    z_ndc = torch.tensor([0.2, 0.5, 0.8])
    return torch.cat([ndc * w[:, None], (z_ndc * w)[:, None], w[:, None]], 1), ndc, z_ndc, w


def test_triangle_coverage_matches_area():
    clip, ndc, _, _ = _tilted_triangle()
    H = W = 64
    fr = rasterize(clip, torch.tensor([[0, 1, 2]]), H, W)
    s = (ndc + 1) * 32
    area = 0.5 * abs((s[1, 0] - s[0, 0]) * (s[2, 1] - s[0, 1]) - (s[1, 1] - s[0, 1]) * (s[2, 0] - s[0, 0]))
    perimeter = sum((s[i] - s[(i + 1) % 3]).norm() for i in range(3))
    assert abs(fr.mask.sum().item() - area.item()) < perimeter.item() / 2
    # every covered pixel centre is inside the triangle (screen barycentrics >= 0), every inside centre covered
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    p = torch.stack([xs, ys], -1)

    def cross(a, b, q):
        return (b[0] - a[0]) * (q[..., 1] - a[1]) - (b[1] - a[1]) * (q[..., 0] - a[0])

    e = torch.stack([cross(s[1], s[2], p), cross(s[2], s[0], p), cross(s[0], s[1], p)], -1)
    inside = (e >= 0).all(-1) | (e <= 0).all(-1)
    assert torch.equal(inside, fr.mask[0])


def test_exact_depth_and_perspective_barycentrics():
    clip, ndc, z_ndc, w = _tilted_triangle()
    fr = rasterize(clip, torch.tensor([[0, 1, 2]]), 48, 40)
    ys, xs = fr.mask[0].nonzero(as_tuple=True)
    px = (xs.double() + 0.5) / 40 * 2 - 1
    py = (ys.double() + 0.5) / 48 * 2 - 1
    # screen-space barycentrics by solving the 2x2 system in NDC
    A = torch.stack([ndc[0].double() - ndc[2].double(), ndc[1].double() - ndc[2].double()], 1)
    rhs = torch.stack([px, py], 0) - ndc[2].double()[:, None]
    l01 = torch.linalg.solve(A, rhs)
    ls = torch.cat([l01, 1 - l01.sum(0, keepdim=True)], 0).T  # [P, 3]
    depth = (ls * z_ndc.double()).sum(1)
    assert torch.allclose(fr.depth[0, ys, xs].double(), depth, atol=1e-5)
    pc = ls / w.double()
    pc = pc / pc.sum(1, keepdim=True)
    assert torch.allclose(fr.bary[0, ys, xs].double(), pc, atol=1e-5)
    assert (fr.face_id[0][~fr.mask[0]] == -1).all() and (fr.depth[0][~fr.mask[0]] == 0).all()


def test_cube_visible_faces_from_axis_views():
    m = box_mesh(0.5)
    cams = Cameras.orbit([0, 0, 0, 0, 90, -90], [0, 90, 180, 270, 0, 0], 3.0, fov=40, size=32)
    fr = rasterize(cams.to_clip(m.verts), m.faces, 32, 32)
    expected = [4, 0, 5, 1, 2, 3]  # +z, +x, -z, -x, +y, -y (two triangles per side)
    for b, side in enumerate(expected):
        ids = torch.unique(fr.face_id[b])
        assert set(ids.tolist()) - {-1} <= {2 * side, 2 * side + 1}, (b, ids)
        # the front face sits at z_cam = 2.5 everywhere
        z = depth_map(fr, cams)[b][fr.mask[b]]
        assert torch.allclose(z, torch.full_like(z, 2.5), atol=1e-3)  # z_ndc float32 -> z
    culled = rasterize(cams.to_clip(m.verts), m.faces, 32, 32, cull_backfaces=True)
    assert torch.equal(culled.face_id, fr.face_id)
    # with the winding flipped, culling keeps the far side of the cube (the inside, seen through)
    inside = rasterize(cams.to_clip(m.verts), m.faces.flip(1), 32, 32, cull_backfaces=True)
    z = depth_map(inside, cams)[:, 16, 16]
    assert torch.allclose(z, torch.full_like(z, 3.5), atol=1e-3)


def test_nearest_face_wins_and_batching():
    # two overlapping quads at different depths; the nearer one must be seen where they overlap
    v = torch.tensor([[-0.8, -0.8, 0.3, 1], [0.5, -0.8, 0.3, 1], [-0.8, 0.5, 0.3, 1],
                      [-0.5, -0.5, 0.6, 1], [0.8, -0.5, 0.6, 1], [-0.5, 0.8, 0.6, 1]])
    f = torch.tensor([[3, 4, 5], [0, 1, 2]])
    fr = rasterize(torch.stack([v, v.flip(0)]), f, 32, 32)
    assert (fr.face_id[0, 12, 12] == 1) and (fr.face_id[0, 28, 4] == -1)
    single = rasterize(v.flip(0), f, 32, 32)
    assert torch.equal(single.face_id[0], fr.face_id[1])


def test_chunking_does_not_change_result():
    torch.manual_seed(0)
    V, F = 30, 50
    v = torch.cat([torch.rand(2, V, 2) * 2 - 1, torch.rand(2, V, 1), torch.ones(2, V, 1)], -1)
    faces = torch.randint(0, V, (F, 3))
    setup = setup_faces(v, faces, 24, 24)
    assert torch.equal(rasterize_keys(setup, 24, 24, budget=1 << 20), rasterize_keys(setup, 24, 24, budget=7))


def test_bad_input():
    with pytest.raises(UsageError):
        rasterize(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), 8, 8)
    with pytest.raises(UsageError):
        rasterize(torch.zeros(3, 4), torch.tensor([[0, 1, 2]]), 8, 8, backend="nope")
    empty = rasterize(torch.zeros(2, 3, 4), torch.zeros(0, 3, dtype=torch.long), 8, 8)
    assert empty.face_id.shape == (2, 8, 8) and not empty.mask.any()
    # a face behind the camera is culled, not drawn mirrored
    v = torch.tensor([[-0.5, -0.5, 0.5, -1.0], [0.5, -0.5, 0.5, 1.0], [0, 0.5, 0.5, 1.0]])
    assert not rasterize(v, torch.tensor([[0, 1, 2]]), 8, 8).mask.any()


def test_interpolate_and_maps():
    m = box_mesh(0.5)
    cams = Cameras.orbit([20.0, 0.0], [30.0, 135.0], 3.0, fov=40, size=24)
    fr = rasterize(cams.to_clip(m.verts), m.faces, 24, 24)
    pos = interpolate(fr, m.faces, m.verts)
    # interpolated world positions project back onto their own pixel centres
    uv = cams.project(pos.view(2, -1, 3)).view(2, 24, 24, 2)
    ys, xs = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(24) + 0.5, indexing="ij")
    grid = torch.stack([xs, ys], -1)
    assert torch.allclose(uv[fr.mask], grid.expand(2, -1, -1, -1)[fr.mask], atol=1e-3)
    # per-batch attributes [B, V, C]
    attrs = torch.stack([m.verts, 2 * m.verts])
    assert torch.allclose(interpolate(fr, m.faces, attrs)[1], 2 * pos[1], atol=1e-5)
    n = normal_map(fr, m.faces, face_normals(m.verts, m.faces), cams, smooth=False)
    assert (n[fr.mask][:, 2] < 0).all()  # visible surfaces face the camera (camera z forward)
    assert vertex_normals(m.verts, m.faces).norm(dim=-1).allclose(torch.ones(24))
    d = normalize_depth(depth_map(fr, cams), fr.mask)
    assert d.shape == (2, 1, 24, 24) and d.max() == 1 and (d[:, 0][~fr.mask] == 0).all()


def test_triton_matches_torch_under_interpreter():
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from common.render.raster import rasterize
        torch.manual_seed(0)
        V, F = 40, 60
        v = torch.cat([torch.rand(2, V, 2) * 2.4 - 1.2, torch.rand(2, V, 1), torch.rand(2, V, 1) * 0.5 + 0.75], -1)
        v[..., :3] *= v[..., 3:]
        f = torch.randint(0, V, (F, 3))
        a = rasterize(v, f, 32, 28, backend="torch")
        b = rasterize(v, f, 32, 28, backend="triton")
        same = a.face_id == b.face_id
        assert a.mask.float().mean() > 0.5
        assert same.float().mean() > 0.999, same.float().mean()
        assert (a.bary - b.bary)[same].abs().max() < 1e-5
        assert (a.depth - b.depth)[same].abs().max() < 1e-6
        print("OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0 and "interpret" in res.stderr.lower() and "OK" not in res.stdout:
        pytest.skip(f"triton interpreter unavailable: {res.stderr[-300:]}")
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
