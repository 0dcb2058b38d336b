"""3D Gaussians: one isotropic Gaussian against its closed form, depth, PLY round trip and bad PLYs, and the
colour-only optimisation recovering known colours."""
import math

import numpy as np
import pytest
import torch

from common.errors import UsageError
from common.render.cameras import Cameras
from common.render.gaussians import Gaussians, fit_colors, load_ply, render_gaussians, rgb_to_sh_dc, save_ply


def _gaussians(n, seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    return Gaussians(means=torch.randn(n, 3, generator=g) * 0.4, quats=torch.randn(n, 4, generator=g),
                     log_scales=torch.log(torch.rand(n, 3, generator=g) * 0.15 + 0.05),
                     opacity_logits=torch.randn(n, generator=g) + 1, sh_dc=torch.randn(n, 3, generator=g),
                     sh_rest=torch.randn(n, k, 3, generator=g))


def test_single_isotropic_gaussian_closed_form():
    s, d, o = 0.1, 2.0, 0.8
    g = Gaussians(means=torch.zeros(1, 3), quats=torch.tensor([[1.0, 0, 0, 0]]),
                  log_scales=torch.full((1, 3), math.log(s)), opacity_logits=torch.logit(torch.tensor([o])),
                  sh_dc=torch.zeros(1, 3), sh_rest=torch.zeros(1, 0, 3))
    cams = Cameras.orbit([0.0], [0.0], d, fov=40, size=33)
    img, alpha, depth = render_gaussians(g, cams, torch.tensor([[1.0, 2.0]]), eps2d=0.0)
    f = float(cams.fx[0])
    sigma = f * s / d  # pixels
    ys, xs = torch.meshgrid(torch.arange(33) + 0.5, torch.arange(33) + 0.5, indexing="ij")
    r2 = (xs - 16.5) ** 2 + (ys - 16.5) ** 2
    expect = o * torch.exp(-0.5 * r2 / sigma ** 2)
    expect = torch.where(expect >= 1 / 255, expect, torch.zeros_like(expect))
    assert torch.allclose(alpha[0, 0], expect, atol=1e-5)
    assert torch.allclose(img[0, 1], 2 * expect, atol=1e-5)
    assert torch.allclose(depth[0, 0][expect > 0], torch.full_like(expect[expect > 0], d), atol=1e-5)
    # background compositing
    img_bg, _, _ = render_gaussians(g, cams, torch.tensor([[1.0, 2.0]]), background=[1.0, 1.0], eps2d=0.0)
    assert torch.allclose(img_bg[0, 0], expect + (1 - expect), atol=1e-5)


def test_front_gaussian_occludes_back():
    g = Gaussians(means=torch.tensor([[0.0, 0, 0.5], [0.0, 0, -0.5]]), quats=torch.tensor([[1.0, 0, 0, 0]] * 2),
                  log_scales=torch.full((2, 3), math.log(0.3)), opacity_logits=torch.full((2,), 10.0),
                  sh_dc=torch.zeros(2, 3), sh_rest=torch.zeros(2, 0, 3))
    cams = Cameras.orbit([0.0, 0.0], [0.0, 180.0], 3.0, fov=40, size=15)
    img, _, _ = render_gaussians(g, cams, torch.tensor([[1.0], [0.0]]))
    assert img[0, 0, 7, 7] > 0.98 and img[1, 0, 7, 7] < 0.02  # camera 0 sees Gaussian 0 first, camera 1 the other


def test_ply_round_trip(tmp_path):
    g = _gaussians(20)
    save_ply(tmp_path / "g.ply", g)
    h = load_ply(tmp_path / "g.ply")
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest"):
        assert torch.equal(getattr(g, name), getattr(h, name)), name
    # f_rest order is the 3DGS one: all K coefficients of channel 0, then channel 1, ...
    from plyfile import PlyData

    v = PlyData.read(str(tmp_path / "g.ply"))["vertex"]
    assert np.allclose(v["f_rest_1"], g.sh_rest[:, 1, 0].numpy()) and np.allclose(v["f_rest_3"], g.sh_rest[:, 0, 1])


def test_ply_without_required_fields(tmp_path):
    from plyfile import PlyData, PlyElement

    arr = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1")])
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(tmp_path / "pc.ply"))
    with pytest.raises(UsageError, match="missing vertex properties"):
        load_ply(tmp_path / "pc.ply")
    with pytest.raises(UsageError):
        load_ply(tmp_path / "absent.ply")
    (tmp_path / "junk.ply").write_text("not a ply")
    with pytest.raises(UsageError):
        load_ply(tmp_path / "junk.ply")


def test_fit_colors_recovers_renders():
    g = _gaussians(12, seed=1, k=0)
    g.log_scales = torch.log(torch.full((12, 3), 0.2))
    cams = Cameras.orbit([0.0, 30.0, -20.0], [0.0, 120.0, 240.0], 2.5, fov=50, size=16)
    true = torch.rand(12, 4, generator=torch.Generator().manual_seed(5))
    target, alpha, _ = render_gaussians(g, cams, true)
    mask = (alpha > 0.05).float()
    feats = fit_colors(g, cams, target, mask, iterations=150, lr=0.05, views_per_step=3,
                       generator=torch.Generator().manual_seed(0))
    img, _, _ = render_gaussians(g, cams, feats)
    start = ((0 - target).abs() * mask).sum() / mask.sum()
    end = ((img - target).abs() * mask).sum() / mask.sum()
    assert end < 0.1 * start
    assert rgb_to_sh_dc(g.rgb).allclose(g.sh_dc, atol=1e-5)
