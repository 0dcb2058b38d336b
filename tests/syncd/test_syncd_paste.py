"""SynCD rigid scale-and-paste augmentation (spec §1.3 / the original's scale_shift, get_depth and
shift_scale_correspondences): the area rule, where a render pixel lands, correspondences that still join the
same surface points after both views are pasted (and the latent warp of a textured render agrees), the depth
image formula, and the rigid view sampler using it."""
from __future__ import annotations

import random

import pytest
import torch

from common.render.cameras import Cameras
from common.render.mesh import normalize_mesh, torus_mesh
from common.render.raster import rasterize
from common.render.raster.interpolate import interpolate
from common.render.raster.maps import depth_map
from syncd.paste import Paste, inverse_depth_image, paste, sample_paste, scale_range
from syncd.warp import compute_correspondences, shift_scale_correspondences, warp_pair


def _pixel(ndc: torch.Tensor, res: int) -> torch.Tensor:
    """PyTorch3D NDC (+y up, +x left) -> pixel index, as the warp's destination rule."""
    return torch.floor(res * (1 - ndc) / 2).long()


@pytest.mark.parametrize("area,expected", [(0.05, None), (0.0999, None), (0.1, (0.9, 0.95)), (0.19, (0.9, 0.95)),
                                           (0.2, (0.7, 0.95)), (0.8, (0.7, 0.95))])
def test_area_rule(area, expected):
    assert scale_range(area) == expected


def test_sampled_scale_and_offset_ranges():
    rng = random.Random(0)
    assert sample_paste(0.05, rng) is None
    small = [sample_paste(0.15, rng) for _ in range(300)]
    big = [sample_paste(0.5, rng) for _ in range(300)]
    assert all(0.9 <= p.scale <= 0.95 for p in small) and min(p.scale for p in big) < 0.75
    assert all(0.7 <= p.scale <= 0.95 for p in big) and max(p.scale for p in big) > 0.9
    for p in small + big:  # inside the canvas, the top edge within 100 px of the lowest position
        assert 0 <= p.x <= 1024 - p.side and 1024 - p.side - 100 <= p.y <= 1024 - p.side
    assert len({(p.x, p.y) for p in big}) > 250  # positions actually vary
    # seeded: the same draws again
    rng2 = random.Random(0)
    assert sample_paste(0.05, rng2) is None and [sample_paste(0.15, rng2) for _ in range(300)] == small
    # a smaller canvas scales the bottom band (100 px of 1024)
    q = [sample_paste(0.5, rng, canvas=128) for _ in range(200)]
    assert all(128 - p.side - 13 <= p.y <= 128 - p.side for p in q)


def test_pixel_lands_where_the_formula_says():
    canvas = 256
    img = torch.zeros(1, 1, canvas, canvas)
    i, j = 60, 181  # a 4x4 block at a known render location
    img[..., i:i + 4, j:j + 4] = 1.0
    p = Paste(0.75, x=37, y=50, canvas=canvas)
    out = paste(img, p)[0, 0]
    # the block's centre in PyTorch3D NDC, moved by the correspondence update
    ndc_y, ndc_x = 1 - 2 * (i + 2) / canvas, 1 - 2 * (j + 2) / canvas
    moved = shift_scale_correspondences(torch.tensor([[ndc_y, ndc_x, 0.0, 0.0]]), p.scale, p.shift_yx, 1.0, (0, 0),
                                        size=canvas)[0]
    want_y, want_x = canvas * (1 - moved[0]) / 2, canvas * (1 - moved[1]) / 2  # continuous pixel position
    ys, xs = torch.meshgrid(torch.arange(canvas) + 0.5, torch.arange(canvas) + 0.5, indexing="ij")
    cy, cx = float((out * ys).sum() / out.sum()), float((out * xs).sum() / out.sum())
    assert abs(cy - want_y) < 0.5 and abs(cx - want_x) < 0.5, (cy, cx, want_y, want_x)
    # p.y + s * (i + 2): the same point by the plain geometry
    assert abs(cy - (p.y + p.scale * (i + 2))) < 0.5 and abs(cx - (p.x + p.scale * (j + 2))) < 0.5
    # everything outside the pasted square is the black canvas
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[p.y:p.y + p.side, p.x:p.x + p.side] = False
    assert out[mask].abs().max() == 0


def _world_maps(size: int):
    """Two views of the torus: per-pixel world coordinates (the 'texture'), camera depth, alpha, cameras."""
    mesh = normalize_mesh(torus_mesh())
    cams = Cameras.orbit([30.0, 35.0], [0.0, 25.0], distance=2.6, fov=40.0, size=size)
    frags = rasterize(cams.to_clip(mesh.verts), mesh.faces, size, size)
    xyz = interpolate(frags, mesh.faces, mesh.verts).permute(0, 3, 1, 2)  # [2, 3, H, W]
    return xyz, depth_map(frags, cams).float(), frags.mask, cams


def test_pasted_correspondences_join_the_same_surface_points():
    size = 128
    xyz, depth, alpha, cams = _world_maps(size)
    rows = compute_correspondences(depth[0], depth[1], cams[0], cams[1])
    assert rows.shape[0] > 0.1 * size * size
    rng = random.Random(3)
    pa, pb = (sample_paste(float(a.float().mean()), rng, canvas=size) for a in alpha)
    assert pa.scale != pb.scale and (pa.x, pa.y) != (pb.x, pb.y)
    wa, wb = paste(xyz[0], pa, mode="nearest"), paste(xyz[1], pb, mode="nearest")
    ma, mb = paste(alpha[0, None].float(), pa, mode="nearest")[0], paste(alpha[1, None].float(), pb, mode="nearest")[0]
    moved = shift_scale_correspondences(rows, pa.scale, pa.shift_yx, pb.scale, pb.shift_yx, size=size)
    ya, xa, yb, xb = (_pixel(moved[:, c], size) for c in range(4))
    assert bool((ma[ya, xa] > 0).float().mean() > 0.97) and bool((mb[yb, xb] > 0).float().mean() > 0.97)
    dist = (wa[:, ya, xa] - wb[:, yb, xb]).norm(dim=0)
    # one pixel of the pasted torus spans ~2/128 world units: matched pixels are within about a pixel
    assert float(dist.median()) < 0.03 and float((dist < 0.06).float().mean()) > 0.9
    # the unmoved rows point at the wrong pixels of the pasted views
    ya0, xa0, yb0, xb0 = (_pixel(rows[:, c], size) for c in range(4))
    assert float((wa[:, ya0, xa0] - wb[:, yb0, xb0]).norm(dim=0).median()) > 5 * float(dist.median())

    # the latent warp of the pasted textured render of view b into view a agrees with view a's own render
    warped, m = warp_pair(wb, moved, size)
    hit = (m > 0) & (ma > 0)
    err = (warped - wa).norm(dim=0)[hit]
    assert hit.sum() > 0.05 * size * size and float(err.median()) < 0.03


def test_depth_image_is_the_normalised_inverse():
    z = torch.tensor([[[0.0, 2.0], [4.0, 0.0]], [[1.0, 2.0], [5.0, 10.0]]])
    got = inverse_depth_image(z)
    # view 0: background inverse 0 is the minimum, 1/2 the maximum
    want0 = torch.tensor([[0.0, 1.0], [0.25 / 0.5, 0.0]])
    # view 1 (no background): (1/z - 1/10) / (1 - 1/10)
    want1 = (1 / z[1] - 0.1) / 0.9
    torch.testing.assert_close(got, torch.stack([want0, want1]), atol=1e-6, rtol=0)
    # paste with nearest keeps depths exactly; the canvas is background
    d = torch.rand(1, 32, 32) + 1.0
    p = Paste(0.8, x=3, y=6, canvas=32)
    out = paste(d, p, mode="nearest")
    assert out[0, p.y + 2, p.x + 2] in d and out[0, 0, 0] == 0
    img = inverse_depth_image(out[0])
    assert img.min() == 0 and img.max() == 1 and img[0, 0] == 0
    fg = out[0] > 0
    torch.testing.assert_close(img[fg], (1 / out[0][fg]) / (1 / out[0][fg]).max(), atol=1e-6, rtol=0)


def test_rigid_views_paste_and_flag():
    from syncd.generate import rigid_views

    mesh = normalize_mesh(torus_mesh())
    depth, masks, corr, pastes = rigid_views(mesh, 3, 32, random.Random(0), canvas=64)
    assert depth.shape == (3, 1, 32, 32) and masks.shape == (3, 32, 32) and len(pastes) == 3
    assert set(corr) == {(0, 1), (0, 2), (1, 2)}
    for k, p in enumerate(pastes):
        assert 0.7 <= p.scale <= 0.95 and p.canvas == 64
        top, left = (p.y + 1) // 2 + 1, (p.x + 1) // 2 + 1  # canvas -> image pixels, a pixel inside the margin
        assert not masks[k, :max(top - 2, 0)].any() and not masks[k, :, :max(left - 2, 0)].any()
        assert 0.9 < depth[k].max() <= 1 and depth[k, 0, 0, 0] == 0  # area-downsampled; black canvas corner
    # every updated destination lies inside the pasted squares
    for (a, b), rows in corr.items():
        for cols, p in (((0, 1), pastes[a]), ((2, 3), pastes[b])):
            y, x = _pixel(rows[:, cols[0]], 64), _pixel(rows[:, cols[1]], 64)
            assert int(y.min()) >= p.y and int(y.max()) < p.y + p.side + 1
            assert int(x.min()) >= p.x and int(x.max()) < p.x + p.side + 1
    depth2, masks2, corr2, none = rigid_views(mesh, 3, 32, random.Random(0), canvas=64, augment=False)
    assert none is None and masks2.float().mean() > masks.float().mean()
