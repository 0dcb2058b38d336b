"""Cross-view (sample-wise) attention: plain attention when alone, neighbours only where planned; the apps'
plan, schedule and install -> sample -> restore block are common.attention's (plan, schedule)."""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from common.attention.plan import AttentionPlan, PlanAttnProcessor


def _attn():
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def test_alone_equals_default_processor():
    attn, x = _attn(), torch.randn(6, 10, 16)
    ref = AttnProcessor2_0()(attn, x)
    ours = PlanAttnProcessor(default_plan=AttentionPlan(num_images=3))(attn, x)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_neighbours_and_reference_reach_only_planned_views():
    attn = _attn()
    ctx = AttentionPlan(num_images=6, neighbours=(-1, 1), reference=(3,), max_batch=4)
    proc = PlanAttnProcessor(default_plan=ctx)
    x = torch.randn(12, 10, 16)  # two CFG blocks of 6 views
    out = proc(attn, x)
    y = x.clone()
    y[2] += 1.0  # view 2 of block 0: neighbour of 1 and 3, not of 0, 4, 5; block 1 untouched
    moved = (proc(attn, y) - out).abs().amax(dim=(1, 2))
    assert (moved[[1, 2, 3]] > 0).all() and (moved[[0, 4, 5]] == 0).all() and (moved[6:] == 0).all()
    y = x.clone()
    y[3] += 1.0  # the reference reaches every view of its block
    moved = (proc(attn, y) - out).abs().amax(dim=(1, 2))
    assert (moved[:6] > 0).all() and (moved[6:] == 0).all()
    ctx.reference_enabled = False
    moved = (proc(attn, y) - proc(attn, x)).abs().amax(dim=(1, 2))
    assert moved[0] == 0 and moved[2] > 0


def test_joint_attention_equals_concatenated_keys():
    attn = _attn()
    x = torch.randn(3, 5, 16)
    ours = PlanAttnProcessor(default_plan=AttentionPlan(num_images=3, neighbours=(-1, 1)))(attn, x)
    q = attn.to_q(x[0:1])
    kv = torch.cat([x[0], x[2], x[1]])[None]  # self, i-1 (wraps to 2), i+1
    k, v = attn.to_k(kv), attn.to_v(kv)
    sh = lambda t: t.view(1, -1, 2, 8).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(sh(q), sh(k), sh(v)).transpose(1, 2).reshape(1, 5, 16)
    ref = attn.to_out[0](ref)
    assert torch.allclose(ours[0:1], ref, atol=1e-6)


def test_explicit_graph_replaces_ring_neighbours_and_pads_masked():
    import math

    ctx = AttentionPlan(num_images=3, graph=((1,), (0, 2), ()), reference=(1,))
    index, bias = ctx.groups(6, torch.device("cpu"))
    assert index.shape == (6, 3)
    assert index[0].tolist() == [0, 1, 0] and bias[0].tolist() == [0.0, 0.0, -math.inf]
    assert index[1].tolist() == [1, 0, 2]
    assert index[5].tolist() == [5, 4, 5] and bias[5, 1] == 0.0 and bias[5, 2] == -math.inf


def test_ring_plan_is_the_originals_sample_wise_attention():
    """Ring apps: each view sees itself, i-1, i+1 (wrapping) and the reference n // 2, as the original."""
    from synctweedies.apps.view_sampling import ring_plan

    plan = ring_plan(5, max_batch=7)
    assert plan.max_batch == 7 and plan.reference_enabled
    assert [j for j, _ in plan.context_of(0)] == [0, 4, 1, 2]
    assert [j for j, _ in plan.context_of(2)] == [2, 1, 3]  # the reference itself: no second copy
    assert [j for j, _ in plan.context_of(4)] == [4, 3, 0, 2]


def _view_sampling_run(fail_at: int | None = None):
    """sample_with_view_attention on a tiny SD UNet with a recording denoiser: what each step saw."""
    from types import SimpleNamespace

    from common.models.tiny import build_tiny
    from st_helpers import ddim
    from synctweedies.apps.view_sampling import ring_plan, sample_with_view_attention
    from synctweedies.projection import IdentityProjection
    from synctweedies.sampler import SyncOptions

    unet = build_tiny("tiny-sd").unet
    before = dict(unet.attn_processors)
    sched = ddim(5)
    plan = ring_plan(3, max_batch=8)
    seen = []

    def denoiser(x, t, step=0):
        procs = unet.attn_processors
        seen.append((int(t), plan.reference_enabled,
                     all(isinstance(p, PlanAttnProcessor) and p.default_plan is plan
                         for n, p in procs.items() if "attn1" in n),
                     all(p is before[n] for n, p in procs.items() if "attn2" in n)))
        if fail_at is not None and len(seen) > fail_at:
            raise RuntimeError("boom")
        return torch.zeros_like(x)

    pipe = SimpleNamespace(unet=unet, scheduler=sched)
    setup = SimpleNamespace(denoiser=denoiser, timesteps=sched.timesteps)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    err = None
    try:
        sample_with_view_attention(pipe, setup, IdentityProjection(3, 8, 8), SyncOptions(case_num=0), plan,
                                   ref_attention_end=0.5, x_T=x_T, progress=False)
    except RuntimeError as e:
        err = e
    restored = all(unet.attn_processors[k] is v for k, v in before.items())
    return seen, restored, err


def test_view_sampling_schedules_reference_and_restores_processors():
    """During sampling: plan processors (sharing the app's plan) on attn1 only, the reference view on while
    t >= (1 - ref_attention_end) T = 500; afterwards the UNet's own processors, also when sampling fails."""
    seen, restored, err = _view_sampling_run()
    assert err is None and restored and [t for t, _, _, _ in seen] == [801, 601, 401, 201, 1]
    assert all(on_attn1 and attn2_kept for _, _, on_attn1, attn2_kept in seen)
    assert [ref for _, ref, _, _ in seen] == [t >= 500 for t, _, _, _ in seen] == [True, True, False, False, False]
    seen, restored, err = _view_sampling_run(fail_at=1)
    assert isinstance(err, RuntimeError) and restored and len(seen) == 2
