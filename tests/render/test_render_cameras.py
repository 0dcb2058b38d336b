"""Cameras: look-at frame, intrinsics, clip projection, orbits, OpenGL conversion, Blender/COLMAP readers."""
import json
import math
import struct

import pytest
import torch

from common.errors import UsageError
from common.render.cameras import (Cameras, focal_to_fov, fov_to_focal, load_blender, load_colmap, look_at,
                                   mesh_camera_poses, orbit_positions)


def test_look_at_is_opencv_frame():
    R, T = look_at(torch.tensor([[0.0, 0.0, 3.0]]))
    # camera on +z looking at the origin: forward = -z, right = +x, down = -y
    assert torch.allclose(R[0], torch.tensor([[1.0, 0, 0], [0, -1, 0], [0, 0, -1]]), atol=1e-6)
    assert torch.allclose(T[0], torch.tensor([0.0, 0, 3]), atol=1e-6)
    assert torch.allclose(R[0] @ R[0].T, torch.eye(3), atol=1e-6)
    # straight down from the top stays a rotation
    R, _ = look_at(torch.tensor([[0.0, 2.0, 0.0]]))
    assert torch.allclose(R[0] @ R[0].T, torch.eye(3), atol=1e-6) and torch.det(R[0]) > 0


def test_fov_focal_round_trip():
    f = fov_to_focal(60.0, 512)
    assert f == pytest.approx(256 / math.tan(math.radians(30)))
    assert focal_to_fov(f, 512) == pytest.approx(60.0)
    with pytest.raises(UsageError):
        fov_to_focal(180.0, 10)


def test_clip_projection_matches_intrinsics_and_depth():
    cams = Cameras.orbit([10.0, -20.0], [30.0, 200.0], 3.0, fov=50, size=64, near=0.5, far=10.0)
    pts = torch.randn(5, 3) * 0.3
    clip = cams.to_clip(pts)
    ndc = clip[..., :3] / clip[..., 3:]
    uv = cams.project(pts)
    assert torch.allclose((ndc[..., 0] + 1) * 32, uv[..., 0], atol=1e-4)
    assert torch.allclose((ndc[..., 1] + 1) * 32, uv[..., 1], atol=1e-4)
    zc = cams.world_to_view(pts)[..., 2]
    assert torch.allclose(cams.ndc_depth_to_view(ndc[..., 2]), zc, atol=1e-4)
    assert ((ndc[..., 2] > 0) & (ndc[..., 2] < 1)).all()


def test_orthographic_projection():
    cams = Cameras.orbit([0.0], [0.0], 3.0, size=32, orthographic=True, ortho_scale=1.0, near=0.1, far=10)
    clip = cams.to_clip(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.5]]))
    assert torch.allclose(clip[0, 0, :2], torch.tensor([1.0, -1.0]), atol=1e-6)  # +y world is up = row 0 side
    assert torch.allclose(cams.ndc_depth_to_view(clip[0, 1, 2]), torch.tensor(2.5), atol=1e-5)


def test_mesh_camera_poses_default_set():
    poses = mesh_camera_poses()
    assert len(poses) == 10
    assert [a for _, a in poses[:8]] == [180, 225, 270, 315, 0, 45, 90, 135]
    assert poses[8:] == [(30.0, 0.0), (30.0, 180.0)]
    assert len(mesh_camera_poses(top_cameras=False)) == 8
    pos = orbit_positions([0, 0, 90], [0, 90, 0], 2.0)
    assert torch.allclose(pos, torch.tensor([[0, 0, 2.0], [2.0, 0, 0], [0, 2.0, 0]], dtype=pos.dtype), atol=1e-9)


def test_opengl_c2w_round_trip():
    cams = Cameras.orbit([20.0, 0.0], [45.0, 270.0], 2.5, fov=40, size=16)
    gl = cams.c2w(opengl=True)
    back = Cameras.from_c2w(gl, cams.fx, cams.fy, cams.cx, cams.cy, 16, 16, opengl=True)
    assert torch.allclose(back.R, cams.R, atol=1e-5) and torch.allclose(back.T, cams.T, atol=1e-5)
    # OpenGL cameras look down their -z axis: towards the origin here
    look = -gl[:, :3, 2]
    assert torch.allclose(look, torch.nn.functional.normalize(-cams.centers, dim=-1), atol=1e-5)


def test_blender_reader(tmp_path):
    cams = Cameras.orbit([30.0, 0.0], [0.0, 90.0], 4.0, fov=40, size=20)
    meta = {"camera_angle_x": math.radians(40), "frames": [
        {"file_path": f"./train/r_{i}", "transform_matrix": cams.c2w(opengl=True)[i].tolist()} for i in range(2)]}
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    got, names = load_blender(tmp_path, width=20, height=20)
    assert names[1].endswith("r_1.png") and got.width == 20
    assert torch.allclose(got.R, cams.R, atol=1e-5) and torch.allclose(got.T, cams.T, atol=1e-5)
    assert torch.allclose(got.fx, cams.fx, atol=1e-4)
    with pytest.raises(UsageError):
        load_blender(tmp_path, split="test")


def _rot_to_qvec(R):
    w = math.sqrt(max(0.0, 1 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    if w > 1e-3:
        return [w, (R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w)]
    x = math.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2
    return [(R[2, 1] - R[1, 2]) / (4 * x), x, (R[0, 1] + R[1, 0]) / (4 * x), (R[0, 2] + R[2, 0]) / (4 * x)]


@pytest.mark.parametrize("fmt", ["txt", "bin"])
def test_colmap_reader(tmp_path, fmt):
    cams = Cameras.orbit([10.0, 25.0, 0.0], [15.0, 100.0, 250.0], 3.0, fov=50, size=24)
    R, T = cams.R.double(), cams.T.double()
    f, c = float(cams.fx[0]), 12.0
    images = [(i + 1, _rot_to_qvec(R[i]), T[i].tolist(), 1, f"img_{i}.png") for i in range(3)]
    sparse = tmp_path / "sparse" / "0"
    sparse.mkdir(parents=True)
    if fmt == "txt":
        (sparse / "cameras.txt").write_text(f"# comment\n1 PINHOLE 24 24 {f} {f} {c} {c}\n")
        lines = ["# images"]
        for i, q, t, cid, name in images:
            lines += [" ".join(map(str, [i, *[float(x) for x in q], *t, cid, name])), "1.0 2.0 -1"]
        (sparse / "images.txt").write_text("\n".join(lines) + "\n")
    else:
        with open(sparse / "cameras.bin", "wb") as fh:
            fh.write(struct.pack("<Q", 1) + struct.pack("<iiQQ", 1, 1, 24, 24) + struct.pack("<4d", f, f, c, c))
        with open(sparse / "images.bin", "wb") as fh:
            fh.write(struct.pack("<Q", len(images)))
            for i, q, t, cid, name in images:
                fh.write(struct.pack("<idddddddi", i, *[float(x) for x in q], *t, cid) + name.encode() + b"\x00")
                fh.write(struct.pack("<Q", 1) + struct.pack("<ddq", 1.0, 2.0, -1))
    got, names = load_colmap(tmp_path)
    assert names == ["img_0.png", "img_1.png", "img_2.png"]
    assert torch.allclose(got.R, cams.R, atol=1e-5) and torch.allclose(got.T, cams.T, atol=1e-5)
    assert torch.allclose(got.fx, cams.fx, atol=1e-4) and got.width == 24
    with pytest.raises(UsageError):
        load_colmap(tmp_path / "nothing")
