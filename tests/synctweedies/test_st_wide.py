"""Wide-image windows: exact round trip, 41 windows, analytical counts, averaging, init from z_T."""
from __future__ import annotations

import torch

from synctweedies.cases import get_case
from synctweedies.sampler import initial_state
from synctweedies.wide import WindowProjection


def test_round_trip_and_counts():
    proj = WindowProjection(64, 384, 64, 8)
    assert proj.num_instances == 41
    z = torch.randn(1, 4, 64, 384)
    assert torch.equal(proj.inverse(proj.forward(z)), z)
    counts = proj.count_map()[0]
    cols = torch.arange(384)
    expected = torch.tensor([sum(1 for l in proj.lefts if l <= c < l + 64) for c in cols.tolist()])
    assert torch.equal(counts, expected.float())
    assert counts[0] == 1 and counts[-1] == 1 and counts[192] == 8


def test_average_of_constant_windows():
    proj = WindowProjection(16, 40, 16, 4)
    c = torch.arange(proj.num_instances, dtype=torch.float64)
    xs = c[:, None, None, None].expand(-1, 1, 16, 16)
    z = proj.inverse(xs)
    for col in range(40):
        cover = [i for i, l in enumerate(proj.lefts) if l <= col < l + 16]
        assert torch.allclose(z[0, 0, :, col], c[cover].mean().expand(16))


def test_any_width_is_covered():
    proj = WindowProjection(8, 21, 8, 4)  # 168 px wide at /8: the last window is flush with the edge
    assert proj.lefts[-1] == 13 and (proj.count_map() > 0).all()


def test_initialise_from_z_T_makes_overlaps_identical():
    proj = WindowProjection(64, 384, 64, 8)
    x_T, z_T = initial_state(proj, get_case(2), 4, initialize_xt_from_zt=True,
                             generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float32)
    assert torch.equal(x_T[0, :, :, 8:], x_T[1, :, :, :56])
    x_T, _ = initial_state(proj, get_case(2), 4, initialize_xt_from_zt=False,
                           generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float32)
    assert not torch.equal(x_T[0, :, :, 8:], x_T[1, :, :, :56])
