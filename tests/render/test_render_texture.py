"""Texture sampling and its weighted inverse: exact round trip (nearest), smooth round trip (bilinear),
cos^exp weights that vanish on back faces, per-view constants, the exp=0 quirk, Voronoi fill."""
import math

import torch

from common.render.cameras import Cameras, mesh_camera_poses
from common.render.mesh import box_mesh
from common.render.raster import rasterize
from common.render.texture import (bake_texture, pixel_uvs, render_texture, sample_texture, syncmvd_exp,
                                   unproject, view_weights, voronoi_fill)


def _setup(size=64, poses=None, ortho=False):
    m = box_mesh(0.5)
    el, az = zip(*(poses or mesh_camera_poses()))
    cams = Cameras.orbit(el, az, 2.0, fov=50, size=size, orthographic=ortho, ortho_scale=1.0)
    fr = rasterize(cams.to_clip(m.verts), m.faces, size, size)
    return m, cams, fr


def test_nearest_round_trip_is_exact_on_seen_texels():
    m, cams, fr = _setup()
    tex = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))
    img, alpha = render_texture(fr, m.uv_faces, m.uvs, tex, mode="nearest")
    assert img.shape == (10, 3, 64, 64) and torch.equal(alpha[:, 0] > 0, fr.mask)
    uv = pixel_uvs(fr, m.uv_faces, m.uvs)
    baked, den = bake_texture(img, uv, view_weights(fr, m.verts, m.faces, cams), (128, 128), mode="nearest")
    seen = den > 0
    assert seen.float().mean() > 0.3
    assert torch.allclose(baked[:, seen], tex[:, seen], atol=1e-5)
    assert (baked[:, ~seen] != 0).any()  # Voronoi-filled


def test_bilinear_round_trip_on_smooth_texture():
    m, cams, fr = _setup()
    g = torch.Generator().manual_seed(1)
    tex = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(128, 128), mode="bilinear")[0]
    uv = pixel_uvs(fr, m.uv_faces, m.uvs)
    img = sample_texture(tex, uv, fr.mask, "bilinear")
    w = view_weights(fr, m.verts, m.faces, cams)
    baked, den = bake_texture(img, uv, w, (128, 128), mode="bilinear")
    well = den > 0.3 * den[den > 0].median()
    assert (baked - tex).abs().mean(0)[well].mean() < 0.05


def test_sampling_is_adjoint_of_unproject():
    # <sample(T), X> == <T, unproject(X)> for any texture T and views X (bilinear taps)
    g = torch.Generator().manual_seed(2)
    uv = torch.rand(2, 8, 8, 2, generator=g)
    T = torch.rand(3, 16, 16, generator=g)
    X = torch.rand(2, 3, 8, 8, generator=g)
    lhs = (sample_texture(T, uv, None, "bilinear") * X).sum()
    num, _ = unproject(X, uv, torch.ones(2, 8, 8), (16, 16), "bilinear")
    assert torch.allclose(lhs, (num.sum(0) * T).sum(), rtol=1e-5)


def test_weights_cos_exp_and_back_faces():
    m, cams, fr = _setup(32, poses=[(0.0, 45.0)], ortho=True)
    for exp in (1.0, 2.0, 6.0):
        w = view_weights(fr, m.verts, m.faces, cams, exp=exp)[fr.mask]
        assert torch.allclose(w, torch.full_like(w, math.cos(math.radians(45)) ** exp), atol=1e-5)
    # inverted winding: what the camera sees are back faces, so every weight is 0
    fr_in = rasterize(cams.to_clip(m.verts), m.faces.flip(1), 32, 32)
    assert fr_in.mask.any() and (view_weights(fr_in, m.verts, m.faces.flip(1), cams) == 0).all()
    assert syncmvd_exp(0) == 1 and syncmvd_exp(None) == 1 and syncmvd_exp(3) == 3


def test_face_seen_by_one_view_gets_that_views_constant():
    # ortho views from +z (az 0), +x (az 90) and from -x-z (az 225): +x and +z are each seen by one view only
    m, cams, fr = _setup(32, poses=[(0.0, 0.0), (0.0, 90.0), (0.0, 225.0)], ortho=True)
    uv = pixel_uvs(fr, m.uv_faces, m.uvs)
    views = torch.tensor([3.0, 7.0, 5.0]).view(3, 1, 1, 1).expand(3, 1, 32, 32)
    w1 = view_weights(fr, m.verts, m.faces, cams, exp=1)
    baked, den = bake_texture(views, uv, w1, (64, 64), fill=False)
    # box_mesh atlas: 3 x 2 cells, face k in column k % 3 and row k // 3 (v up, so row 0 = texture rows 32..63)
    cells = {0: (slice(32, 64), slice(0, 21)), 4: (slice(0, 32), slice(22, 42)), 1: (slice(32, 64), slice(22, 42))}
    for side, value in ((0, 7.0), (4, 3.0), (1, 5.0)):  # +x by view 1, +z by view 0, -x by view 2
        r, c = cells[side]
        got = baked[0, r, c][den[r, c] > 0]
        assert got.numel() > 20 and torch.allclose(got, torch.full_like(got, value), atol=1e-5), side
    # exp quirk: exp=0 in the SyncMVD sense is exp=1
    w0 = view_weights(fr, m.verts, m.faces, cams, exp=syncmvd_exp(0))
    assert torch.equal(baked, bake_texture(views, uv, w0, (64, 64), fill=False)[0])


def test_voronoi_fill_nearest_seen_texel():
    g = torch.Generator().manual_seed(3)
    H, W = 23, 31
    seen = torch.rand(2, H, W, generator=g) < 0.05
    vals = torch.rand(2, 2, H, W, generator=g) * seen[:, None]
    out = voronoi_fill(vals, seen)
    assert torch.equal(out[:, :, seen[0]][0], vals[:, :, seen[0]][0])
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    grid = torch.stack([ys, xs], -1).view(-1, 2).float()
    for b in range(2):
        seeds = grid[seen[b].view(-1)]
        d = torch.cdist(grid, seeds)  # exact nearest distances
        best = d.min(1).values
        # the value each texel got comes from a seed at the minimal distance (ties allowed)
        got = out[b, 0].view(-1)
        seed_vals = vals[b, 0].view(-1)[seen[b].view(-1)]
        ok = ((d <= best[:, None] + 1e-4) & (seed_vals[None] == got[:, None])).any(1)
        assert ok.float().mean() > 0.99


def _side_cell(side: int, tex: int, margin: int = 2) -> tuple[slice, slice]:
    """Interior texels of box_mesh side `side` (0 +x, 1 -x, 2 +y, 3 -y, 4 +z, 5 -z): atlas column side % 3,
    row side // 3, v up (texture row = (1 - v) * tex), gutter 0.02."""
    col, row = side % 3, side // 3
    u0, u1 = col / 3 + 0.02, (col + 1) / 3 - 0.02
    v0, v1 = row / 2 + 0.02, (row + 1) / 2 - 0.02
    return (slice(int(tex * (1 - v1)) + margin, int(tex * (1 - v0)) - margin),
            slice(int(tex * u0) + margin, int(tex * u1) - margin))


def test_syncmvd_order_blend_matches_hand_computed_values():
    """SyncMVD's order (per-view texture, then a texel blend weighted visible x cos^exp), values by hand.

    Orthographic views (cos constant on each side), view i a constant c = 2, 5, 11, exp = 2:
    view 0 (el 0, az 0) sees +z head-on (w = 1); view 1 (0, 45) sees +z and +x at 45 deg (w = 1/2 each);
    view 2 (30, 90) sees +x at 30 deg (w = 3/4) and +y at 60 deg (w = 1/4). So
    +z = (2 * 1 + 5 / 2) / (3 / 2) = 3, +x = (5 / 2 + 11 * 3 / 4) / (5 / 4) = 8.6, +y = 11; -x, -y, -z: no view.
    (Visibility alone would give 3.5 and 8; exp = 1 gives 3.2426 and 8.3031.)"""
    from common.render.texture import blend_views, texel_geometry, texel_weights

    m, cams, fr = _setup(32, poses=[(0.0, 0.0), (0.0, 45.0), (30.0, 90.0)], ortho=True)
    uv = pixel_uvs(fr, m.uv_faces, m.uvs)
    views = torch.tensor([2.0, 5.0, 11.0]).view(3, 1, 1, 1).expand(3, 1, 32, 32)
    num, den = unproject(views, uv, fr.mask.float(), (48, 48))
    tface, tpos = texel_geometry(m.verts, m.faces, m.uvs, m.uv_faces, (48, 48))
    w = texel_weights(tface, tpos, m.verts, m.faces, cams, fr, exp=2.0)
    tex, total = blend_views(num, den, w, fill=False)
    assert (total[tface < 0] == 0).all()  # gutters between UV islands belong to no face
    expected = {4: (3.0, 1.5), 0: (8.6, 1.25), 2: (11.0, 0.25), 1: (0.0, 0.0), 3: (0.0, 0.0), 5: (0.0, 0.0)}
    for side, (value, weight) in expected.items():
        r, c = _side_cell(side, 48)
        got, tot = tex[0, r, c], total[r, c]
        assert got.numel() >= 60, side
        assert torch.allclose(got, torch.full_like(got, value), atol=1e-4), (side, got.median().item(), value)
        assert torch.allclose(tot, torch.full_like(tot, weight), atol=1e-4), (side, tot.median().item(), weight)
    filled, _ = blend_views(num, den, w)  # the final Voronoi fill touches only texels no view weighs
    assert torch.equal(filled[:, total > 0], tex[:, total > 0])
    assert set(filled[0, total == 0].unique().tolist()) <= set(tex[0, total > 0].unique().tolist())
