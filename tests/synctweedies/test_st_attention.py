"""Cross-view (sample-wise) attention: plain attention when alone, neighbours only where planned."""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from common.attention.reference import CrossViewAttnProcessor, ViewContext


def _attn():
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def test_alone_equals_default_processor():
    attn, x = _attn(), torch.randn(6, 10, 16)
    ref = AttnProcessor2_0()(attn, x)
    ours = CrossViewAttnProcessor(ViewContext(num_views=3, neighbours=()))(attn, x)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_neighbours_and_reference_reach_only_planned_views():
    attn = _attn()
    ctx = ViewContext(num_views=6, neighbours=(-1, 1), reference=(3,), max_batch=4)
    proc = CrossViewAttnProcessor(ctx)
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
    ours = CrossViewAttnProcessor(ViewContext(num_views=3, neighbours=(-1, 1)))(attn, x)
    q = attn.to_q(x[0:1])
    kv = torch.cat([x[0], x[2], x[1]])[None]  # self, i-1 (wraps to 2), i+1
    k, v = attn.to_k(kv), attn.to_v(kv)
    sh = lambda t: t.view(1, -1, 2, 8).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(sh(q), sh(k), sh(v)).transpose(1, 2).reshape(1, 5, 16)
    ref = attn.to_out[0](ref)
    assert torch.allclose(ours[0:1], ref, atol=1e-6)


def test_explicit_graph_replaces_ring_neighbours_and_pads_masked():
    import math

    from common.attention.reference import ViewContext

    ctx = ViewContext(num_views=3, graph=((1,), (0, 2), ()), reference=(1,))
    index, bias = ctx.plan(6, torch.device("cpu"))
    assert index.shape == (6, 3)
    assert index[0].tolist() == [0, 1, 0] and bias[0].tolist() == [0.0, 0.0, -math.inf]
    assert index[1].tolist() == [1, 0, 2]
    assert index[5].tolist() == [5, 4, 5] and bias[5, 1] == 0.0 and bias[5, 2] == -math.inf
