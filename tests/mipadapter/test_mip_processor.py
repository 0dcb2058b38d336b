"""The weighted merge on a standalone diffusers Attention (spec §5 tests 1-14): exact equalities with a direct
computation of §1.3, reductions to plain IP-Adapter, invariances, gradients and the fp16 guard."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from mipadapter.processor import MIPAdapterAttnProcessor, MIPState

C, D, HEADS, N, T, L = 32, 24, 4, 64, 4, 77


def make(seed=0, zero_gate=False, dtype=torch.float32):
    torch.manual_seed(seed)
    attn = Attention(C, cross_attention_dim=D, heads=HEADS, dim_head=C // HEADS).eval()
    proc = MIPAdapterAttnProcessor(C, D, T, name="layer")
    with torch.no_grad():
        proc.text_to_weight.weight.normal_()
        if zero_gate:
            proc.text_to_weight.weight.zero_()
    return attn.to(dtype), proc.to(dtype)


def inputs(b=2, k=2, seed=1, lengths=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, N, C, generator=g)
    text = torch.randn(b, 7, D, generator=g)
    tokens = torch.randn(b, k, T, D, generator=g)
    ent = torch.randn(b, k, L, D, generator=g)
    lens = torch.tensor(lengths or [[1 + (i % 3) for i in range(k)]] * b)
    return x.to(dtype), text.to(dtype), tokens.to(dtype), ent.to(dtype), lens


def run(attn, proc, x, text, tokens, ent, lens, scale=1.0, debug=None, **kw):
    attn.set_processor(proc)
    state = MIPState(tokens, ent, lens, scale=scale, debug=debug, **kw)
    return attn(x, encoder_hidden_states=text, mip=state)


def direct(attn, proc, x, text, tokens, ent, lens, scale=1.0):
    """§1.3 written out literally: full 77-row maps, per-object loop, per-sample loop over entity lengths."""
    b, n, _ = x.shape
    h, d = attn.heads, C // attn.heads
    split = lambda t: t.view(b, -1, h, d).transpose(1, 2)
    q = split(attn.to_q(x))
    ht = F.scaled_dot_product_attention(q, split(attn.to_k(text)), split(attn.to_v(text)))
    ht = ht.transpose(1, 2).reshape(b, n, C)
    g = torch.sigmoid(ht @ proc.text_to_weight.weight.T)[..., 0]
    g = g / g.mean(1, keepdim=True)
    k = tokens.shape[1]
    maps = torch.zeros(b, k, n)
    outs = []
    for j in range(k):
        ke = split(attn.to_k(ent[:, j]))
        full = (torch.matmul(ke, q.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)  # [B, 77, N]
        for i in range(b):
            maps[i, j] = full[i, 1:1 + int(lens[i, j])].mean(0)
        hk = F.scaled_dot_product_attention(q, split(proc.to_k_ip[0](tokens[:, j])), split(proc.to_v_ip[0](tokens[:, j])))
        outs.append(scale * hk.transpose(1, 2).reshape(b, n, C))
    w = maps / maps.sum(1, keepdim=True) if k > 1 else torch.ones_like(maps)
    z = ht + sum(g[..., None] * w[:, j, :, None] * outs[j] for j in range(k))
    return attn.to_out[0](z), w, maps, g


def test_shapes_3d_and_4d():  # 1
    attn, proc = make()
    x, text, tokens, ent, lens = inputs()
    assert run(attn, proc, x, text, tokens, ent, lens).shape == x.shape
    x4 = x.transpose(1, 2).reshape(2, C, 8, 8)
    out4 = run(attn, proc, x4, text, tokens, ent, lens)
    assert out4.shape == x4.shape
    torch.testing.assert_close(out4.flatten(2).transpose(1, 2), run(attn, proc, x, text, tokens, ent, lens))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_equals_direct_computation_for_any_k(k):
    attn, proc = make()
    x, text, tokens, ent, lens = inputs(k=k)
    debug = {}
    out = run(attn, proc, x, text, tokens, ent, lens, scale=0.7, debug=debug)
    ref, w, maps, g = direct(attn, proc, x, text, tokens, ent, lens, scale=0.7)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(debug["layer"][0]["a"], maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(debug["layer"][0]["w"], w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(debug["layer"][0]["gate"], g, atol=1e-6, rtol=1e-5)


def test_weights_sum_to_one_and_maps_are_spatial_softmaxes():  # 2
    attn, proc = make()
    debug = {}
    run(attn, proc, *inputs(k=3), debug=debug)
    rec = debug["layer"][0]
    torch.testing.assert_close(rec["a"].sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(rec["w"].sum(1), torch.ones(2, N), atol=1e-5, rtol=0)


def test_gate_mean_is_one():  # 3
    attn, proc = make()
    debug = {}
    run(attn, proc, *inputs(), debug=debug)
    gate = debug["layer"][0]["gate"]
    assert (gate > 0).all()
    torch.testing.assert_close(gate.mean(1), torch.ones(2), atol=1e-6, rtol=0)


def ip_adapter_out(attn, proc, x, text, tokens, scale):
    """diffusers' IPAdapterAttnProcessor2_0 with the same to_k_ip / to_v_ip; tokens: [B, T, D]."""
    ref = IPAdapterAttnProcessor2_0(C, D, num_tokens=(T,), scale=scale)
    ref.load_state_dict({k: v for k, v in proc.state_dict().items() if "text_to_weight" not in k})
    attn.set_processor(ref)
    return attn(x, encoder_hidden_states=(text, [tokens[:, None]]))


def test_k1_zero_gate_is_plain_ip_adapter():  # 4
    attn, proc = make(zero_gate=True)
    x, text, tokens, ent, lens = inputs(k=1)
    out = run(attn, proc, x, text, tokens, ent, lens, scale=0.6)
    torch.testing.assert_close(out, ip_adapter_out(attn, proc, x, text, tokens[:, 0], 0.6), atol=1e-5, rtol=1e-5)


def test_identical_references_and_words_are_plain_ip_adapter():  # 5
    attn, proc = make(zero_gate=True)
    x, text, tokens, ent, lens = inputs(k=1)
    debug = {}
    out = run(attn, proc, x, text, tokens.repeat(1, 2, 1, 1), ent.repeat(1, 2, 1, 1), lens.repeat(1, 2), debug=debug)
    torch.testing.assert_close(debug["layer"][0]["w"], torch.full((2, 2, N), 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ip_adapter_out(attn, proc, x, text, tokens[:, 0], 1.0), atol=1e-5, rtol=1e-5)


def test_permuting_references_with_their_words_changes_nothing():  # 6
    attn, proc = make()
    x, text, tokens, ent, lens = inputs(k=3, lengths=[[1, 2, 3], [3, 1, 2]])
    perm = torch.tensor([2, 0, 1])
    out = run(attn, proc, x, text, tokens, ent, lens)
    out_p = run(attn, proc, x, text, tokens[:, perm], ent[:, perm], lens[:, perm])
    torch.testing.assert_close(out, out_p, atol=1e-5, rtol=1e-5)


def test_swapping_only_the_words_changes_the_output():  # 7
    attn, proc = make()
    x, text, tokens, ent, lens = inputs(k=2, lengths=[[1, 1], [1, 1]])
    out = run(attn, proc, x, text, tokens, ent, lens)
    swapped = run(attn, proc, x, text, tokens, ent.flip(1), lens)
    assert (out - swapped).abs().max() >= 1e-3


def test_scale_zero_is_text_only_attention():  # 8
    attn, proc = make()
    x, text, tokens, ent, lens = inputs()
    out = run(attn, proc, x, text, tokens, ent, lens, scale=0.0)
    attn.set_processor(AttnProcessor2_0())
    torch.testing.assert_close(out, attn(x, encoder_hidden_states=text), atol=0, rtol=0)
    attn.set_processor(proc)  # and without any state the processor is the stock one
    torch.testing.assert_close(attn(x, encoder_hidden_states=text), out, atol=0, rtol=0)


def test_linear_in_scale():  # 9
    attn, proc = make()
    args = inputs()
    base = run(attn, proc, *args, scale=0.0)
    half, full = run(attn, proc, *args, scale=0.5) - base, run(attn, proc, *args, scale=1.0) - base
    torch.testing.assert_close(half, 0.5 * full, atol=1e-5, rtol=1e-4)


def test_relevance_map_is_detached_and_only_the_adapter_trains():  # 10
    attn, proc = make()
    attn.requires_grad_(False)
    frozen = list(attn.parameters())  # before the processor becomes a submodule
    x, text, tokens, ent, lens = inputs()
    ent.requires_grad_(True)
    run(attn, proc, x, text, tokens, ent, lens).sum().backward()
    assert ent.grad is None or not ent.grad.any()
    for p in (proc.text_to_weight.weight, proc.to_k_ip[0].weight, proc.to_v_ip[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen)


def test_entity_length_selects_rows():  # 11
    attn, proc = make()
    x, text, tokens, ent, lens = inputs(k=2, lengths=[[2, 1], [2, 1]])
    debug = {}
    run(attn, proc, x, text, tokens, ent, lens, debug=debug)
    b, h, d = 2, HEADS, C // HEADS
    q = attn.to_q(x).view(b, N, h, d).transpose(1, 2)
    ke = attn.to_k(ent[:, 0]).view(b, L, h, d).transpose(1, 2)
    rows = (torch.matmul(ke, q.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)
    torch.testing.assert_close(debug["layer"][0]["a"][:, 0], rows[:, 1:3].mean(1), atol=1e-6, rtol=1e-5)
    ent2 = ent.clone()
    ent2[:, 0, 3] += 5.0  # the padding row after the word: not looked at
    debug2 = {}
    out = run(attn, proc, x, text, tokens, ent2, lens, debug=debug2)
    torch.testing.assert_close(out, run(attn, proc, x, text, tokens, ent, lens), atol=0, rtol=0)


def test_words_route_references_spatially():  # 12
    attn, proc = make()
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(C))
        attn.to_k.weight.zero_()
        attn.to_k.weight[::C // HEADS, 0] = 1.0  # every head's first key channel reads embedding channel 0
    direction = torch.zeros(C)
    direction[::C // HEADS] = 1.0  # and every head's first query channel is +-1 left / right
    x = torch.zeros(1, N, C)
    col = torch.arange(N) % 8
    x[0, col < 4] = direction  # left half of the 8x8 grid
    x[0, col >= 4] = -direction
    ent = torch.zeros(1, 2, L, D)
    ent[0, 0, 1, 0], ent[0, 1, 1, 0] = 20.0, -20.0
    debug = {}
    run(attn, proc, x, torch.randn(1, 7, D), torch.randn(1, 2, T, D), ent, torch.tensor([[1, 1]]), debug=debug)
    w1 = debug["layer"][0]["w"][0, 0]
    assert (w1[col < 4] > 0.9).all() and (w1[col >= 4] < 0.1).all()


def test_batch_rows_are_independent():  # 13
    attn, proc = make()
    x, text, tokens, ent, lens = inputs(b=2, lengths=[[1, 3], [2, 1]])
    both = run(attn, proc, x, text, tokens, ent, lens)
    for i in range(2):
        one = run(attn, proc, x[i:i + 1], text[i:i + 1], tokens[i:i + 1], ent[i:i + 1], lens[i:i + 1])
        torch.testing.assert_close(both[i:i + 1], one, atol=1e-5, rtol=1e-5)


def test_low_precision_underflowing_map_stays_finite():  # 14
    dtype = torch.float16
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
    except RuntimeError:
        dtype = torch.bfloat16
    attn, proc = make(dtype=dtype)
    x, text, tokens, ent, lens = inputs(dtype=dtype)
    ent[:, 0, 1] = 3e3  # word 1's spatial softmax is one-hot: zero at every other position
    ent[:, 1, 1] = -3e3
    debug = {}
    out = run(attn, proc, x, text, tokens, ent, lens, debug=debug)
    assert torch.isfinite(out).all()
    assert torch.isfinite(debug["layer"][0]["w"]).all()


def test_cfg_rows_negative_first():  # 22 (processor side)
    attn, proc = make()
    x, text, tokens, ent, lens = inputs(b=1)
    neg_ent = torch.randn_like(ent)
    state = MIPState(tokens, ent, lens, negative_tokens=torch.zeros_like(tokens), negative_entity_embeds=neg_ent)
    t2, e2, l2, _, _ = state.rows(2)
    assert torch.equal(e2[0], neg_ent[0]) and torch.equal(e2[1], ent[0])
    assert torch.equal(t2[0], torch.zeros_like(tokens[0])) and torch.equal(l2[0], lens[0]) and torch.equal(l2[1], lens[0])
    attn.set_processor(proc)
    both = attn(x.repeat(2, 1, 1), encoder_hidden_states=text.repeat(2, 1, 1), mip=state)
    pos = run(attn, proc, x, text, tokens, ent, lens)
    neg = run(attn, proc, x, text, torch.zeros_like(tokens), neg_ent, lens)
    torch.testing.assert_close(both, torch.cat([neg, pos]), atol=1e-5, rtol=1e-5)


def test_masks_confine_a_reference():
    attn, proc = make()
    x, text, tokens, ent, lens = inputs(b=1)
    masks = torch.zeros(1, 2, 8, 8)
    masks[:, 0, :, :4] = 1
    masks[:, 1] = 1
    debug = {}
    run(attn, proc, x, text, tokens, ent, lens, debug=debug, masks=masks, latent_hw=(8, 8))
    w = debug["layer"][0]["w"][0]
    col = torch.arange(N) % 8
    assert (w[0, col >= 4] == 0).all() and (w[0, col < 4] > 0).all()
