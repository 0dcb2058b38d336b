"""Mesh texturing: the texture <-> views projection (spec tests 14-16, case 2's kept state) and the mesh app
through the CLI on tiny presets (smoke, SDEdit, determinism, one-line errors)."""
from __future__ import annotations

import math

import sys
from pathlib import Path

import pytest
import torch

from st_helpers import usage_error
from common.render.cameras import mesh_camera_poses
from common.render.mesh import box_mesh, load_mesh
from synctweedies.apps.mesh import cameras_for
from synctweedies.main import main
from synctweedies.mesh import MeshProjection, view_direction, view_graph, view_prompts
from synctweedies.sampler import SyncOptions, sync_sample
from synctweedies.steps import ddim_step

sys.path.insert(0, str(Path(__file__).parent))
from st_helpers import ddim  # noqa: E402

TORUS = "assets/render/torus.obj"


def smooth_texture(c: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, c, 6, 6, generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=True)


def test_bake_of_render_returns_texture_on_well_seen_texels():
    """Spec 14 with our rasteriser: cube with 6 UV islands, 10 views at 64^2, 128^2 texture."""
    poses = mesh_camera_poses()
    proj = MeshProjection(box_mesh(0.6), cameras_for(poses, 64, 2.0), 128)
    tex = smooth_texture(3, 128)
    views = proj.forward(tex)
    baked = proj.inverse(views)
    seen = proj.texel_w.amax(0) > 0.3
    assert seen.sum() > 1000
    assert (baked - tex)[0][:, seen].abs().mean() < 0.05
    # identity-like consistency: f(g(x)) gives x back on the mesh pixels
    again = proj.sync(views)
    mask = proj.mask.expand_as(views)
    assert (again - views)[mask].abs().mean() < 0.02
    assert torch.equal(again[~mask], views[~mask])  # background keeps the instance's own values


def _face_cell(face: int, tex: int, margin: int = 3):
    """Interior texels of box_mesh face `face` (atlas: column face % 3, row face // 3, v up, gutter 0.02)."""
    col, row = face % 3, face // 3
    u0, u1 = col / 3 + 0.02, (col + 1) / 3 - 0.02
    v0, v1 = row / 2 + 0.02, (row + 1) / 2 - 0.02
    rows = slice(int(tex * (1 - v1)) + margin, int(tex * (1 - v0)) - margin)
    return rows, slice(int(tex * u0) + margin, int(tex * u1) - margin)


def test_bake_weights_are_visibility_times_cosine():
    """Spec 15 with expected values written by hand: view i shows the constant i, weight = visible x cos.
    Cameras (elevation, azimuth): 0 (0, 0) sees +z head-on, 1 (0, 90) +x, 2 (0, 180) -z, 3 (0, 270) -x,
    4 (30, 0) sees +z at cos 30 deg and +y at cos 60 deg. So +z = (0 * 1 + 4 cos30) / (1 + cos30) = 1.8564
    (visibility alone would give 2, cos^2 1.7143), +x = 1, -z = 2, -x = 3, +y = 4; this is SyncMVD's
    two-stage order (per-view unprojection, then the weighted blend)."""
    poses = [(0.0, 0.0), (0.0, 90.0), (0.0, 180.0), (0.0, 270.0), (30.0, 0.0)]
    proj = MeshProjection(box_mesh(0.6), cameras_for(poses, 32, 2.0), 64)
    n = len(poses)
    views = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1).expand(n, 1, 32, 32).clone()
    baked = proj.inverse(views)[0, 0]
    c30 = math.cos(math.radians(30))
    expected = {4: 4 * c30 / (1 + c30), 0: 1.0, 5: 2.0, 1: 3.0, 2: 4.0}  # face id -> value (+z, +x, -z, -x, +y)
    assert abs(expected[4] - 1.85641) < 1e-5
    for face, value in expected.items():
        r, c = _face_cell(face, 64)
        got = baked[r, c]
        assert got.numel() > 100
        close = (got - value).abs() < 1e-6
        assert close.float().mean() > 0.99, (face, got.median().item(), value)


def test_exp_zero_is_cosine_weighted_like_syncmvd():
    """Spec 16: the original's `if not exp: exp = 1`."""
    cams = cameras_for(mesh_camera_poses(), 16, 2.0)
    a = MeshProjection(box_mesh(0.6), cams, 32, exp=0)
    b = MeshProjection(box_mesh(0.6), cams, 32, exp=1)
    c = MeshProjection(box_mesh(0.6), cams, 32, exp=2)
    assert torch.equal(a.texel_w, b.texel_w) and not torch.equal(b.texel_w, c.texel_w)


def test_case2_keeps_instance_state_and_steps_with_synced_tweedie():
    """Spec 4 on the mesh: x_{t'} = DDIM(x_t, f(g(x0))); a change of view 0's x_t on a face only view 0 sees
    changes nothing in the other view."""
    proj = MeshProjection(box_mesh(0.6), cameras_for([(0.0, 0.0), (0.0, 180.0)], 16, 2.0), 32)
    sched = ddim(10)
    denoiser = lambda x, t, step=0: 0.3 * x  # noqa: E731  (pixel-wise, so locality is exact)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    opts = SyncOptions(case_num=2, mvd_end=1.0)
    t = sched.timesteps[:1]
    out = sync_sample(denoiser, sched, proj, options=opts, timesteps=t, x_T=x_T, progress=False).instances
    abar = sched.alphas_cumprod  # float32 coefficients, as the stepper
    a_t, a_p = abar[int(t[0])], abar[int(t[0]) - 100]
    x0 = (x_T - (1 - a_t).sqrt() * 0.3 * x_T) / a_t.sqrt()
    assert torch.allclose(out, ddim_step(x_T, proj.sync(x0), a_t, a_p), atol=1e-6)
    bumped = x_T.clone()
    bumped[0] += 1.0 * proj.mask[0]
    out2 = sync_sample(denoiser, sched, proj, options=opts, timesteps=t, x_T=bumped, progress=False).instances
    assert torch.equal(out2[1], out[1])
    assert not torch.allclose(out2[0], out[0])


def test_view_prompts_and_attention_graph():
    poses = mesh_camera_poses()
    prompts = view_prompts("a cat", poses)
    assert prompts[4] == "a cat, front view" and prompts[0] == "a cat, back view" and prompts[2] == "a cat, side view"
    assert view_direction(60, 0) == "top" and view_direction(0, -20) == "front"
    graph = view_graph(poses)
    assert graph[4] == [3, 5] and graph[0] == [7, 1] and 4 in graph[8]


TINY = ["--app", "mesh", "--model", "tiny-sd", "--prompt", "a donut", "--steps", "2", "--latent_view_size", "8",
        "--rgb_view_size", "64", "--latent_tex_size", "16", "--rgb_tex_size", "32", "--no_progress",
        "--log_interval", "0"]


def test_mesh_app_smoke_and_determinism(tmp_path):
    argv = TINY + ["--mesh", TORUS, "--save_top_dir", str(tmp_path), "--case_num", "2", "--sampling_method", "ddim",
                   "--initialize_xt_from_zt", "--save_gif", "--log_height", "24", "--log_width", "32"]
    out = main(argv + ["--tag", "a"])
    names = {p.name for p in out["dir"].iterdir()}
    assert {"textured.obj", "textured.mtl", "textured.png", "view_0.png", "view_9.png", "control_0.png",
            "turntable.gif", "args.json"} <= names
    assert out["texture"].shape == (3, 32, 32) and out["views"].shape == (10, 3, 64, 64)
    assert out["latent_views"].shape == (10, 4, 8, 8) and out["latent_texture"].shape == (1, 4, 16, 16)
    reloaded = load_mesh(out["dir"] / "textured.obj")
    assert reloaded.texture.shape == (3, 32, 32)
    assert (reloaded.texture - out["texture"]).abs().max() <= 1 / 255 + 1e-6
    again = main(argv + ["--tag", "b"])
    assert torch.equal(again["texture"], out["texture"])


def test_mesh_app_sdedit_normal_bilinear_case1(tmp_path):
    out = main(TINY + ["--mesh", TORUS, "--save_top_dir", str(tmp_path), "--tag", "e", "--sdedit",
                       "--sdedit_prompt", "a glazed donut", "--sdedit_timestep", "0.5", "--cond_type", "normal",
                       "--rasterize_mode", "bilinear", "--disable_voronoi", "--log_interval", "1"])
    assert (out["dir"] / "intermediate").is_dir() and (out["dir"] / "latent_texture.png").exists()
    assert out["texture"].shape == (3, 32, 32)


@pytest.mark.parametrize("start,steps", [(0.0, 10), (0.5, 5), (1.0, 1)])
def test_sdedit_timestep_zero_is_full_generation_and_one_runs_the_last_step_only(start, steps, monkeypatch):
    """--sdedit_timestep s starts at index round(s S): 0 runs all S steps from the views noised to the first
    timestep (~T), 1 only the last step from the views noised to the last timestep (almost x0); x_t is
    sqrt(abar_t) x0 + sqrt(1 - abar_t) noise and the canonical cases start from g(x_t)."""
    from types import SimpleNamespace

    import synctweedies.apps.sdedit as sdedit
    from synctweedies.projection import IdentityProjection

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monkeypatch.setattr(sdedit, "encode_images", lambda vae, v, g: x0[: len(v)])
    sched = ddim(10)
    pipe = SimpleNamespace(vae=None, scheduler=sched)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    setup = SimpleNamespace(x_T=noise, timesteps=sched.timesteps)
    proj = IdentityProjection(2, 8, 8)
    views = torch.zeros(2, 3, 64, 64)
    ts, x_t, z_t = sdedit.sdedit_start(pipe, views, proj, setup, None, sdedit_timestep=start, max_batch_size=8,
                                      initialize_xt_from_zt=False, case_num=2)
    assert len(ts) == steps and torch.equal(ts, sched.timesteps[10 - steps:]) and z_t is None
    abar = sched.alphas_cumprod[int(ts[0])].double()
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)
    if start == 0.0:
        assert int(ts[0]) == int(sched.timesteps[0]) and abar < 0.01  # essentially pure noise
    if start == 1.0:
        assert (x_t - x0).abs().max() < 0.1  # essentially the input
    _, x5, z5 = sdedit.sdedit_start(pipe, views, proj, setup, None, sdedit_timestep=start, max_batch_size=8,
                                    initialize_xt_from_zt=False, case_num=5)
    assert torch.equal(x5, x_t) and torch.allclose(z5, x_t.mean(0, keepdim=True))


def test_mesh_bad_inputs_are_one_line_errors(tmp_path, capsys):
    base = TINY + ["--save_top_dir", str(tmp_path), "--tag", "x"]
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    assert "no faces" in usage_error(base + ["--mesh", str(tmp_path / "points.obj")], capsys)
    (tmp_path / "lost.mtl").write_text("newmtl m\nmap_Kd missing.png\n")
    (tmp_path / "lost.obj").write_text("mtllib lost.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\n"
                                       "f 1/1 2/2 3/3\n")
    assert "missing.png" in usage_error(base + ["--mesh", str(tmp_path / "lost.obj")], capsys)
    assert "cond_type" in usage_error(base + ["--mesh", TORUS, "--cond_type", "canny"], capsys)
    (tmp_path / "nouv.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    assert "--mesh_autouv" in usage_error(base + ["--mesh", str(tmp_path / "nouv.obj")], capsys)
    assert "has none" in usage_error(base + ["--mesh", str(tmp_path / "nouv.obj"), "--mesh_autouv", "--sdedit"],
                                      capsys)
    assert "mesh file not found" in usage_error(base + ["--mesh", str(tmp_path / "nope.obj")], capsys)
    assert "shuffle_bg_end" in usage_error(base + ["--mesh", TORUS, "--shuffle_bg_end", "2"], capsys)
