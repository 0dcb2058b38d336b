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
    if name != "identity":  # a bijection that moves nothing would pass the lines above
        assert not torch.equal(y, x)


def _grid(rows):
    return torch.tensor(rows, dtype=torch.float32)[None]  # [1, s, s]


# Expected maps written by hand (value = the input pixel id that lands there, ids row-major)
ID3 = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
HAND_MAPS = {
    "identity": ID3,
    "flip": [[6, 7, 8], [3, 4, 5], [0, 1, 2]],
    "rotate_cw": [[6, 3, 0], [7, 4, 1], [8, 5, 2]],
    "rotate_ccw": [[2, 5, 8], [1, 4, 7], [0, 3, 6]],
    "rotate_180": [[8, 7, 6], [5, 4, 3], [2, 1, 0]],
}


@pytest.mark.parametrize("name", sorted(HAND_MAPS))
def test_simple_views_match_hand_written_maps(name):
    (view,) = get_views([name])
    assert torch.equal(view.view(_grid(ID3)), _grid(HAND_MAPS[name]))


def test_skew_matches_hand_written_map():
    """Column j rolls down by int(1.5 (j - s/2)): at s = 4 the shifts are -3, -1, 0, 1."""
    (view,) = get_views(["skew"])
    ids = _grid([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]])
    expected = _grid([[12, 5, 2, 15], [0, 9, 6, 3], [4, 13, 10, 7], [8, 1, 14, 11]])
    assert torch.equal(view.view(ids), expected)


def test_square_hinge_is_the_original_3x3_alternating_grid():
    """s = 7: 2x2 squares; (row + col) even turns clockwise ([[a, b], [c, d]] -> [[c, a], [d, b]]), odd
    counter-clockwise (-> [[b, d], [a, c]]); the last row and column stay."""
    (view,) = get_views(["square_hinge"])
    ids = torch.arange(49, dtype=torch.float32).view(1, 7, 7)
    expected = _grid([
        [7, 0, 3, 10, 11, 4, 6],
        [8, 1, 2, 9, 12, 5, 13],
        [15, 22, 23, 16, 19, 26, 20],
        [14, 21, 24, 17, 18, 25, 27],
        [35, 28, 31, 38, 39, 32, 34],
        [36, 29, 30, 37, 40, 33, 41],
        [42, 43, 44, 45, 46, 47, 48]])
    assert torch.equal(view.view(ids), expected)
    assert torch.equal(view.inverse_view(expected), ids)


def test_inner_circle_matches_hand_written_map():
    """s = 8, disc radius 3 about (3.5, 3.5): the 24 pixels of the disc turn by 180 degrees."""
    (view,) = get_views(["inner_circle"])
    ids = torch.arange(64, dtype=torch.float32).view(1, 8, 8)
    disc = ["........",
            "..####..",
            ".######.",
            ".######.",
            ".######.",
            ".######.",
            "..####..",
            "........"]
    expected = ids.clone()
    for i, row in enumerate(disc):
        for j, ch in enumerate(row):
            if ch == "#":
                expected[0, i, j] = (7 - i) * 8 + (7 - j)
    assert torch.equal(view.view(ids), expected)


def test_patch_permutes_move_whole_patches():
    """patch_permute: 8x8 grid of patches moved unchanged by a non-trivial bijection (pixel_permute: 64x64)."""
    for name, n in (("patch_permute", 8), ("pixel_permute", 64)):
        (view,) = get_views([name])
        for size in (64, 256):
            b = size // n
            ids = torch.arange(size * size, dtype=torch.float32).view(1, size, size)
            got = view.view(ids)[0].view(n, b, n, b).permute(0, 2, 1, 3).reshape(n * n, b, b)
            src = ids[0].view(n, b, n, b).permute(0, 2, 1, 3).reshape(n * n, b, b)
            where = (got[:, 0, 0][:, None] == src[:, 0, 0][None]).float().argmax(1)
            assert torch.equal(got, src[where])  # every patch is some source patch, unchanged
            assert torch.equal(torch.sort(where).values, torch.arange(n * n))
            assert (where != torch.arange(n * n)).sum() > n * n // 2


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
    outside = (((ii - c) ** 2 + (jj - c) ** 2) >= 24 ** 2).flatten()
    assert torch.equal(idx[outside], torch.arange(64 * 64)[outside])
    (rot90,) = get_views(["inner_rotate"], rotate_angle=90)
    idx90 = rot90.index(64)
    assert torch.equal(torch.sort(idx90).values, torch.arange(64 * 64))


def test_inner_rotate_90_turns_the_disc_clockwise(monkeypatch):
    """s = 8, radius 3: at 90 degrees the view is a clockwise turn of the disc (hand map), the inverse ccw."""
    import synctweedies.views as views_module

    monkeypatch.setattr(views_module, "DISC", 3 / 8)  # radius 3 at size 8
    views_module._disc_rotation.cache_clear()
    (view,) = get_views(["inner_rotate"], rotate_angle=90)
    ids = torch.arange(64, dtype=torch.float32).view(1, 8, 8)
    got, back = view.view(ids), view.inverse_view(ids)
    views_module._disc_rotation.cache_clear()
    rows = ["........", "..####..", ".######.", ".######.", ".######.", ".######.", "..####..", "........"]
    cw, ccw = ids.clone(), ids.clone()
    for i, row in enumerate(rows):
        for j, ch in enumerate(row):
            if ch == "#":
                cw[0, i, j] = (7 - j) * 8 + i  # clockwise: out[i][j] = in[s-1-j][i]
                ccw[0, i, j] = j * 8 + (7 - i)  # counter-clockwise: out[i][j] = in[j][s-1-i]
    assert torch.equal(got, cw) and torch.equal(back, ccw)


@pytest.mark.parametrize("size,angle", [(64, 45.0), (64, 30.0), (256, 45.0), (64, -20.0)])
def test_inner_rotate_matches_torchvision_rotate_of_the_original(size, angle):
    """The original's view is TF.rotate(x, -angle, NEAREST) inside the disc (r = 24 at 64, 96 at 256), the
    border kept; its inverse TF.rotate(x, +angle). torchvision here is the independent reference."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    (view,) = get_views(["inner_rotate"], rotate_angle=angle)
    x = torch.randn(3, size, size)
    r = 24 * size // 64
    ii, jj = torch.meshgrid(torch.arange(size) - size // 2 + 0.5, torch.arange(size) - size // 2 + 0.5,
                            indexing="ij")
    mask = (ii ** 2 + jj ** 2 < r ** 2).float()
    for fn, a in ((view.view, -angle), (view.inverse_view, angle)):
        ref = x * (1 - mask) + TF.rotate(x, a, interpolation=InterpolationMode.NEAREST) * mask
        assert torch.equal(fn(x), ref)


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
