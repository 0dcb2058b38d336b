"""SynCD rigid-object warping (spec §6 tests 10-15): correspondences from our rasteriser's depth, identity
and translation warps, the out-of-range guard, the paste update, and the t > 0.8 schedule."""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from common.pipelines.loop import sample
from common.render.cameras import Cameras
from common.render.mesh import normalize_mesh, torus_mesh
from syncd.warp import (LatentWarpHook, compute_correspondences, render_depth, shift_scale_correspondences,
                        triplet_correspondences, warp_latents, warp_pair)

R = 128


def _centres(res):
    k = (2 * torch.arange(res) + 1) / res - 1
    y, x = torch.meshgrid(k, k, indexing="ij")
    return -y.flatten(), -x.flatten()  # PyTorch3D NDC: +y up, +x left


def _identity_rows(res=R):
    y, x = _centres(res)
    return torch.stack([y, x, y, x], -1)


def test_identity_camera_correspondences():  # 10
    mesh = normalize_mesh(torus_mesh())
    cams = Cameras.orbit([30.0], [45.0], distance=2.5, size=32)
    depth = render_depth(mesh, cams, 32)[0]
    rows = compute_correspondences(depth, depth, cams, cams)
    assert rows.shape[0] == int((depth > 0).sum()) > 50
    assert (rows[:, :2] - rows[:, 2:]).abs().max() < 1e-4


def test_correspondences_between_views_are_consistent():
    mesh = normalize_mesh(torus_mesh())
    cams = Cameras.orbit([30.0, 30.0, 40.0], [0.0, 30.0, 60.0], distance=2.5, size=128)
    depths = render_depth(mesh, cams, 128)  # the original's 128^2 z-buffer
    corr = triplet_correspondences(depths, cams)
    assert corr is not None and set(corr) == {(0, 1), (0, 2), (1, 2)}
    rows = corr[(0, 1)]
    assert 0.1 * 128 * 128 < rows.shape[0] < int((depths[0] > 0).sum())  # some pixels are occluded in view 1
    assert (rows[:, :2] - rows[:, 2:]).abs().max() > 0.05  # the view changed


def test_identity_warp_is_a_noop():  # 11
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(3, 4, 32, 32, generator=g)
    ident = _identity_rows()
    corr = {(0, 2): ident, (1, 2): ident, (0, 1): ident}
    same = lat.clone()
    same[0], same[1] = lat[2], lat[2]  # identity map from the anchor: every image becomes the anchor
    torch.testing.assert_close(warp_latents(lat, corr, t=0.95), same, atol=1e-3, rtol=0)
    # with the anchor equal to the others, warping changes nothing, with or without erosion
    flat = lat[2:].expand(3, -1, -1, -1).clone()
    for t in (0.95, 0.85):
        torch.testing.assert_close(warp_latents(flat, corr, t=t), flat, atol=1e-3, rtol=0)


def test_translation_warp_moves_a_delta():  # 12
    k = 5
    src = torch.zeros(1, R, R)
    src[0, 40, 60 + k] = 1.0
    y, x = _centres(R)
    shift = 2 * k / R  # k pixels to the right = -shift in PyTorch3D x
    rows = torch.stack([y, x, y, x - shift], -1)
    keep = (x - shift) > -1 + 1 / R
    warped, m = warp_pair(src, rows[keep], R)
    assert abs(float(warped[0, 40, 60]) - 1.0) < 1e-4
    assert warped.abs().sum() - warped[0, 40, 60].abs() < 1e-3
    # blending keeps unmatched pixels
    lat = torch.randn(3, 1, R, R)
    lat[2] = src
    corr = {(0, 2): rows[keep], (1, 2): rows[keep], (0, 1): rows[keep][:0]}
    out = warp_latents(lat, corr, t=0.95)
    unmatched = m == 0
    assert unmatched.any()
    torch.testing.assert_close(out[0, 0][unmatched], lat[0, 0][unmatched])
    assert abs(float(out[0, 0, 40, 60]) - 1.0) < 1e-4


def test_out_of_range_guard():  # 13
    rows = torch.tensor([[1 - 2 * 128.5 / 128, 0.0, 0.0, 0.0]])  # destination row index 128
    assert warp_pair(torch.zeros(1, R, R), rows, R) is None
    lat = torch.randn(3, 1, 32, 32)
    assert warp_latents(lat, {(0, 2): rows, (1, 2): rows, (0, 1): rows}, t=0.95) is None


def test_shift_scale_update():  # 14
    rows = torch.tensor([[1.0, -1.0, 0.3, -0.7]])
    torch.testing.assert_close(shift_scale_correspondences(rows, 1.0, (0, 0), 1.0, (0, 0)), rows, atol=1e-7, rtol=0)
    out = shift_scale_correspondences(torch.tensor([[1.0, -1.0, 1.0, -1.0]]), 0.5, (0, 0), 0.5, (0, 0))
    assert out.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_warp_only_above_threshold():  # 15
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(30)
    expected = [i for i, t in enumerate(sched.timesteps) if float(t) / 1000 > 0.8]
    seen = []

    def fake_warp(lat, corr, t):
        seen.append(t)
        return lat

    hook = LatentWarpHook({}, (2, 2), warp=fake_warp)
    x = torch.zeros(3, 4, 8)
    sample(lambda x_t, t, i: torch.zeros_like(x_t), sched, x, hooks=[hook], progress=False)
    assert hook.calls == expected and 0 < len(expected) < 30 and all(t > 0.8 for t in seen)
