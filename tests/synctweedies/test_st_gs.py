"""3D Gaussian texturing: the n-to-1 Adam inverse (spec 17 on renders), warm starts per quantity, and the gs
app through the CLI on a Blender-style fixture (smoke, both canonical domains, determinism, one-line errors)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from st_helpers import usage_error
from common.render.cameras import load_blender
from common.render.gaussians import load_ply
from synctweedies.gaussian import GaussianProjection, square_cameras
from synctweedies.main import main

PLY = "assets/render/gaussians.ply"


def write_blender(folder, n: int = 4, dist: float = 3.0, size: int = 64) -> None:
    """transforms_train.json with n cameras on a ring (OpenGL c2w) looking at the origin."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(n):
        az, el = 2 * math.pi * i / n, 0.3
        c = np.array([dist * math.cos(el) * math.sin(az), dist * math.sin(el), dist * math.cos(el) * math.cos(az)])
        fwd = -c / np.linalg.norm(c)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, fwd)
        m = np.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, -fwd, c
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": m.tolist()})
    (folder / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.69, "w": size, "h": size,
                                                              "frames": frames}))


@pytest.fixture
def scene(tmp_path):
    write_blender(tmp_path / "ds")
    return tmp_path / "ds"


def latent_projection(scene, **kw) -> GaussianProjection:
    cams, _ = load_blender(scene)
    return GaussianProjection(load_ply(PLY), square_cameras(cams, 16), square_cameras(cams, 16), domain="latent",
                              background_latent=torch.zeros(4), generator=torch.Generator().manual_seed(0), **kw)


def test_adam_inverse_fits_renders(scene):
    """Spec 17 on the Gaussian renderer: x in the range of f -> L1(f(g(x)), x) small on covered pixels."""
    proj = latent_projection(scene, iterations=200, lr=0.1)
    z = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    x = proj.forward(z)
    assert x.shape == (4, 4, 16, 16)
    err = (proj.forward(proj.inverse(x, "tweedie")) - x).abs()
    start = (proj.forward(torch.zeros_like(z)) - x).abs()
    covered = (proj.alpha_lat > 0.01).expand_as(x)
    assert err[covered].mean() < 0.2 * start[covered].mean()


def test_color_assign_previous_warm_starts_per_quantity(scene):
    proj = latent_projection(scene, iterations=5, lr=0.1)
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    first = proj.inverse(x, "tweedie")
    proj.iterations = 0
    assert torch.equal(proj.inverse(x * 0, "tweedie"), first)  # "previous": no steps -> the last fit
    assert torch.equal(proj.inverse(x, "eps"), torch.zeros_like(first))  # a new quantity starts from zero
    zero = latent_projection(scene, iterations=0, color_assign_method="zero")
    assert torch.equal(zero.inverse(x, "tweedie"), torch.zeros_like(first))


def args_for(scene, out, tag, *extra):
    return ["--app", "gs", "--model", "tiny-sd", "--plyfile", PLY, "--source_path", str(scene), "--dataset_type",
            "blender", "--prompt", "a red ball", "--tag", tag, "--save_top_dir", str(out), "--steps", "2",
            "--latent_view_size", "8", "--rgb_view_size", "64", "--iterations", "3", "--final_iterations", "5",
            "--no_progress", "--log_interval", "0", *extra]


def test_gs_app_rgb_domain_smoke(scene, tmp_path):
    out = main(args_for(scene, tmp_path, "rgb", "--case_num", "2", "--zt_init", "--force_clean_composition",
                        "--total_image_to_use", "3"))
    names = {p.name for p in out["dir"].iterdir()}
    assert {"final.ply", "render_0.png", "render_2.png", "renders.png", "control_0.png", "args.json"} <= names
    assert out["renders"].shape == (3, 3, 64, 64) and out["latent_views"].shape == (3, 4, 8, 8)
    assert out["canonical"].shape == (300, 3)
    saved = load_ply(out["dir"] / "final.ply")
    assert len(saved) == 300 and torch.allclose(saved.rgb, out["colors"], atol=1e-5)


def test_gs_app_latent_domain_is_deterministic(scene, tmp_path):
    extra = ("--canonical_domain", "latent", "--color_assign_method", "instance", "--background_color", "black",
             "--no-antialiased", "--case_num", "2")
    a = main(args_for(scene, tmp_path, "a", *extra))
    b = main(args_for(scene, tmp_path, "b", *extra))
    assert a["canonical"].shape == (300, 4)
    assert torch.equal(a["colors"], b["colors"]) and torch.equal(a["renders"], b["renders"])


def test_gs_bad_inputs_are_one_line_errors(scene, tmp_path, capsys):
    from plyfile import PlyData, PlyElement

    arr = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(tmp_path / "points.ply"))
    argv = args_for(scene, tmp_path, "x")
    bad_ply = [a if a != PLY else str(tmp_path / "points.ply") for a in argv]
    assert "missing vertex properties" in usage_error(bad_ply, capsys)
    assert "transforms_train.json" in usage_error(args_for(tmp_path, tmp_path, "y"), capsys)
    assert "COLMAP" in usage_error(args_for(scene, tmp_path, "z", "--dataset_type", "colmap"), capsys)
    assert "not supported" in usage_error(argv + ["--enable_xyz"], capsys)
    assert "cond_type" in usage_error(argv + ["--cond_type", "normal"], capsys)
