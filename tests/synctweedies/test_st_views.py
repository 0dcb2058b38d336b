"""Ambiguous-image views are exact permutations (or the documented 1-to-n map), and their projections."""
from __future__ import annotations

import pytest
import torch

from common.errors import UsageError
from synctweedies.anagram import StackProjection, ViewProjection
from synctweedies.views import get_views

PERMS = ["identity", "flip", "rotate_cw", "rotate_ccw", "rotate_180", "skew", "jigsaw", "patch_permute",
         "pixel_permute", "inner_circle", "square_hinge"]


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("name", PERMS)
def test_views_are_invertible_permutations(name, size):
    (view,) = get_views([name])
    x = torch.randn(3, size, size)
    y = view.view(x)
    assert torch.equal(view.inverse_view(y), x)
    assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)
    assert torch.equal(torch.sort(view.index(size)).values, torch.arange(size * size))


def test_rotations_match_torch():
    cw, ccw, r180, flip = get_views(["rotate_cw", "rotate_ccw", "rotate_180", "flip"])
    x = torch.randn(3, 16, 16)
    assert torch.equal(cw.view(x), torch.rot90(x, -1, (1, 2)))
    assert torch.equal(ccw.view(x), torch.rot90(x, 1, (1, 2)))
    assert torch.equal(r180.view(x), torch.rot90(x, 2, (1, 2)))
    assert torch.equal(flip.view(x), x.flip(1))


def test_negate_view_and_six_channels():
    (neg,) = get_views(["negate"])
    x = torch.randn(3, 8, 8)
    assert torch.equal(neg.view(x), -x)
    x6 = torch.randn(2, 6, 8, 8)
    back = neg.inverse_view(x6)
    assert torch.equal(back[:, :3], -x6[:, :3]) and torch.equal(back[:, 3:], x6[:, 3:])


def test_inner_rotate_is_one_to_n():
    (rot45,) = get_views(["inner_rotate"], rotate_angle=45)
    idx = rot45.index(64)
    assert idx.unique().numel() < idx.numel()  # some pixels repeat
    c = 31.5
    ii, jj = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    outside = (((ii - c) ** 2 + (jj - c) ** 2).sqrt() > 24).flatten()
    assert torch.equal(idx[outside], torch.arange(64 * 64)[outside])
    (rot90,) = get_views(["inner_rotate"], rotate_angle=90)
    idx90 = rot90.index(64)
    assert torch.equal(torch.sort(idx90).values, torch.arange(64 * 64))


def test_unknown_view_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown view name"):
        get_views(["identity", "twirl"])


def test_view_projection_round_trip_and_shapes():
    proj = ViewProjection(get_views(["identity", "rotate_cw", "negate"]), 16)
    z = torch.randn(1, 3, 16, 16)
    xs = proj.forward(z)
    assert xs.shape == (3, 3, 16, 16)
    assert torch.allclose(proj.inverse(xs), z, atol=1e-6)
    eps6 = torch.randn(3, 6, 16, 16)  # IF output: eps || variance
    assert proj.inverse(eps6).shape == (1, 6, 16, 16)


def test_tweedie_handles_six_channel_output():
    from diffusers import DDPMScheduler

    from common.pipelines.tweedie import to_x0

    sched = DDPMScheduler(variance_type="learned_range")
    x0 = to_x0(sched, torch.randn(2, 6, 8, 8), torch.randn(2, 3, 8, 8), 500, 0)
    assert x0.shape == (2, 3, 8, 8)


def test_n_to_1_optimisation_inverse_converges():
    proj = StackProjection(get_views(["identity", "identity"]), 8, num_of_zs=4, iterations=200, lr=0.1)
    z = torch.randn(4, 3, 8, 8)
    x = proj.forward(z)
    est = proj.inverse(x, "tweedie")
    assert (proj.forward(est) - x).abs().mean() < 1e-2
    assert ("tweedie", 3) in proj.warm
    noise = proj.canonical_noise(3, torch.Generator().manual_seed(0))
    assert 0.8 < proj.forward(noise).std() < 1.2  # the mean of the stack is unit Gaussian
