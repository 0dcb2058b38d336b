"""Mesh IO: the generated torus asset, OBJ/GLB/PLY loading, textured OBJ export round trip, normalisation,
xatlas UVs, and clear errors for bad input (no faces, degenerate faces, missing texture, unreadable file)."""
from pathlib import Path

import pytest
import torch

from common.errors import UsageError
from common.render.cameras import Cameras
from common.render.mesh import (Mesh, autouv, box_mesh, clean_mesh, load_mesh, normalize_mesh, save_obj,
                                torus_mesh)
from common.render.raster import rasterize
from common.render.raster.maps import face_normals
from common.render.texture import render_texture

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "render"
trimesh = pytest.importorskip("trimesh")


def test_torus_asset_loads_with_texture_and_outward_faces():
    m = load_mesh(ASSETS / "torus.obj")
    ref = torus_mesh(n_major=32, n_minor=16)
    assert m.has_uv and m.texture is not None and m.texture.shape == (3, 128, 128)
    assert torch.allclose(m.verts, ref.verts, atol=1e-5) and torch.equal(m.faces, ref.faces)
    # outward normals: away from the tube's centre circle
    c = m.verts[m.faces].mean(1)
    ring = torch.nn.functional.normalize(c * torch.tensor([1.0, 0, 1]), dim=-1) * 0.7
    assert ((face_normals(m.verts, m.faces) * (c - ring)).sum(-1) > 0).all()
    for name in ("torus.obj", "torus.mtl", "torus.png", "gaussians.ply"):
        assert (ASSETS / name).stat().st_size < 200_000


def test_obj_round_trip_renders_identically(tmp_path):
    m = box_mesh(0.5)
    tex = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = torch.round(tex * 255) / 255  # PNG is 8-bit
    save_obj(tmp_path / "box.obj", m, q)
    assert {p.name for p in tmp_path.iterdir()} == {"box.obj", "box.mtl", "box.png"}
    back = load_mesh(tmp_path / "box.obj")
    cams = Cameras.orbit([20.0], [30.0], 3.0, fov=40, size=24)
    imgs = []
    for mesh, t in ((m, q), (back, back.texture)):
        fr = rasterize(cams.to_clip(mesh.verts), mesh.faces, 24, 24)
        imgs.append(render_texture(fr, mesh.uv_faces, mesh.uvs, t, mode="nearest")[0])
    assert torch.allclose(imgs[0], imgs[1], atol=1e-5)


@pytest.mark.parametrize("ext", ["glb", "ply"])
def test_glb_and_ply_meshes(tmp_path, ext):
    m = box_mesh(2.0)
    trimesh.Trimesh(m.verts.numpy(), m.faces.numpy(), process=False).export(tmp_path / f"box.{ext}")
    got = load_mesh(tmp_path / f"box.{ext}")
    assert got.faces.shape == (12, 3) and not got.has_uv
    n = normalize_mesh(got, scale=0.5)
    assert torch.isclose(n.verts.abs().max(), torch.tensor(0.5)) and torch.allclose(n.verts.mean(0), torch.zeros(3),
                                                                                      atol=1e-6)


def test_autouv_gives_a_valid_atlas():
    pytest.importorskip("xatlas")
    m = autouv(Mesh(box_mesh().verts, box_mesh().faces))
    assert m.has_uv and m.uvs.min() >= 0 and m.uvs.max() <= 1 and len(m.faces) == 12
    # geometry unchanged: same triangles in space
    assert torch.allclose(m.verts[m.faces].sum(), box_mesh().verts[box_mesh().faces].sum(), atol=1e-4)


def test_bad_inputs(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_mesh(tmp_path / "missing.obj")
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(UsageError, match="no faces"):
        load_mesh(tmp_path / "points.obj")
    (tmp_path / "tex.obj").write_text("mtllib tex.mtl\nusemtl m\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\n"
                                      "vt 0 1\nf 1/1 2/2 3/3\n")
    (tmp_path / "tex.mtl").write_text("newmtl m\nmap_Kd nowhere.png\n")
    with pytest.raises(UsageError, match="nowhere.png"):
        load_mesh(tmp_path / "tex.obj")
    (tmp_path / "junk.glb").write_bytes(b"\x00garbage")
    with pytest.raises(UsageError):
        load_mesh(tmp_path / "junk.glb")


def test_degenerate_faces_are_reported_and_skipped():
    m = box_mesh()
    faces = torch.cat([m.faces, torch.tensor([[0, 0, 1], [0, 1, 1]])])
    bad = Mesh(m.verts, faces, m.uvs, faces.clone())
    with pytest.warns(UserWarning, match="2 of 14 faces are degenerate"):
        cleaned = clean_mesh(bad)
    assert torch.equal(cleaned.faces, m.faces) and torch.equal(cleaned.uv_faces, m.faces)
    with pytest.raises(UsageError, match="degenerate"):
        clean_mesh(bad, degenerate="error")
    with pytest.raises(UsageError, match="no usable face"):
        clean_mesh(Mesh(m.verts, torch.tensor([[0, 0, 0]])))
