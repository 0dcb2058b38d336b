"""Attention plans: stock-exact when nothing is planned, backends agree, masked keys have no influence,
a K/V bank written then read equals the joint batch, FLUX rotary honoured, schedules and restore."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from common.attention.backends import KeyLayout, attend, build_mask
from common.attention.plan import (AttentionPlan, FluxPlanAttnProcessor, KVBank, PlanAttnProcessor, install_plan,
                                   token_visibility)
from common.attention.schedule import PlanGate, ReferenceAttentionSchedule, plan_installed
from common.models.tiny import build_tiny
from common.pipelines.loop import StepState

T, P = 6, 16  # FLUX test text length, image tokens (4x4)


@pytest.fixture(scope="module")
def unet():
    return build_tiny("tiny-sdxl").unet


@pytest.fixture(scope="module")
def flux():
    return build_tiny("tiny-flux").transformer


def _unet_inputs(unet, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(batch, pooled_dim, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    return x, ctx, added


def _run_unet(unet, x, ctx, added, rows=slice(None), **kw):
    with torch.no_grad():
        return unet(x[rows], 10, encoder_hidden_states=ctx[rows], return_dict=False,
                    added_cond_kwargs={k: v[rows] for k, v in added.items()}, **kw)[0]


def _flux_inputs(tr, batch):
    g = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(P, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(P) // 4, torch.arange(P) % 4
    return dict(hidden_states=torch.randn(batch, P, tr.config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, T, tr.config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, tr.config.pooled_projection_dim, generator=g),
                timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5),
                txt_ids=torch.zeros(T, 3), img_ids=img_ids)


def _run_flux(tr, inputs, rows=slice(None), **kw):
    batched = {k: v[rows] if k not in ("txt_ids", "img_ids") else v for k, v in inputs.items()}
    with torch.no_grad():
        return tr(**batched, return_dict=False, **kw)[0]


def _masks(n, h=4, w=4, seed=1):
    return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) > 0.4


# ------------------------------------------------------------------ nothing planned == stock, exactly


def test_unet_plan_processors_without_a_plan_equal_stock_exactly(unet):
    x, ctx, added = _unet_inputs(unet, 2)
    stock = _run_unet(unet, x, ctx, added)
    with install_plan(unet, "all"):
        assert torch.equal(_run_unet(unet, x, ctx, added), stock)
        trivial = {"plan": AttentionPlan(num_images=2)}
        assert torch.equal(_run_unet(unet, x, ctx, added, cross_attention_kwargs=trivial), stock)
    assert torch.equal(_run_unet(unet, x, ctx, added), stock)  # restored


def test_flux_plan_processors_without_a_plan_equal_stock_exactly(flux):
    inputs = _flux_inputs(flux, 2)
    stock = _run_flux(flux, inputs)
    with install_plan(flux):  # joint and single blocks, rotary embedding included
        assert torch.equal(_run_flux(flux, inputs), stock)
        trivial = {"plan": AttentionPlan(num_images=2, text_len=T)}
        assert torch.equal(_run_flux(flux, inputs, joint_attention_kwargs=trivial), stock)


def test_all_foreground_masks_equal_unmasked_shared_attention(unet):
    x, ctx, added = _unet_inputs(unet, 3)
    with install_plan(unet):
        free = _run_unet(unet, x, ctx, added, cross_attention_kwargs={"plan": AttentionPlan.shared(3)})
        full = AttentionPlan.shared(3, torch.ones(3, 8, 8, dtype=torch.bool))
        assert torch.equal(_run_unet(unet, x, ctx, added, cross_attention_kwargs={"plan": full}), free)
        stock = _run_unet(unet, x, ctx, added, cross_attention_kwargs={"plan": AttentionPlan(num_images=3)})
        assert (free - stock).abs().max() > 1e-3  # sharing does something


# ----------------------------------------------------------------------------- backends agree


def test_backends_agree_on_tiny_sdxl(unet):
    x, ctx, added = _unet_inputs(unet, 6)  # two CFG blocks of three images
    masks = _masks(3, 8, 8)
    outs = {}
    with install_plan(unet):
        for backend in ("sdpa", "flex"):
            plan = AttentionPlan(num_images=3, neighbours=(-1,), reference=(1,), reference_weight=2.0,
                                 token_masks=masks, backend=backend)
            outs[backend] = _run_unet(unet, x, ctx, added, cross_attention_kwargs={"plan": plan})
    assert (outs["sdpa"] - outs["flex"]).abs().max() <= 1e-5


def test_backends_agree_on_tiny_flux(flux):
    inputs = _flux_inputs(flux, 3)
    outs = {}
    with install_plan(flux):
        for backend in ("sdpa", "flex"):
            plan = AttentionPlan.shared(3, _masks(3), backend=backend, text_len=T)
            outs[backend] = _run_flux(flux, inputs, joint_attention_kwargs={"plan": plan})
    assert (outs["sdpa"] - outs["flex"]).abs().max() <= 1e-5
    assert (outs["sdpa"] - _run_flux(flux, inputs)).abs().max() > 1e-4


def test_backends_agree_on_segments_and_text_rules():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=g) for _ in range(3))
    kk, vv = (torch.cat([t, torch.randn(2, 2, 6, 8, generator=g)], dim=2) for t in (k, v))
    seg = torch.tensor([-1, -1, 0, 0, 0, 1, 1, 1, 2, 2]).expand(2, -1)
    vis = torch.rand(2, 16, generator=g) > 0.5
    for text_sees in (False, True):
        layout = KeyLayout(10, 2, vis, torch.randn(2, 16, generator=g), text_sees, seg)
        assert (attend(q, kk, vv, layout, "sdpa") - attend(q, kk, vv, layout, "flex")).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- mask semantics


def test_mask_semantics_follow_syncd():
    """Text queries see own text + own image only; image queries also see others' foreground tokens."""
    fg = torch.tensor([[True, False, True, False], [False, False, True, True]])  # images n-1, n-2 (2x2 tokens)
    t, p, n = 3, 4, 3
    visible = torch.cat([torch.ones(t + p, dtype=torch.bool), fg.flatten()])[None]
    mask = build_mask(KeyLayout(t + p, t, visible), t + p)[0]
    assert mask.shape == (t + p, t + n * p)
    assert mask[:, : t + p].all()
    assert not mask[:t, t + p:].any()
    assert torch.equal(mask[t:, t + p:], fg.flatten()[None].expand(p, -1))


def test_token_visibility_resizes_to_each_layer_grid():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    assert token_visibility(masks, 64).view(8, 8).equal(masks[0])
    small = token_visibility(masks, 16).view(4, 4)
    assert small[:2, :2].all() and small.sum() == 4
    with pytest.raises(ValueError, match="tokens"):
        token_visibility(masks.flatten(1), 16)


# -------------------------------------------------------------- a masked-out key has no influence


def _attn():
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_masked_out_key_token_has_no_influence_unet(backend):
    attn = _attn()
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    masks[1, 2, 3] = False  # token 11 of image 1 is background
    proc = PlanAttnProcessor("layer")
    plan = AttentionPlan.shared(2, masks, backend=backend)
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    out = proc(attn, x, plan=plan)
    y = x.clone()
    y[1, 11] += 5.0
    moved = proc(attn, y, plan=plan)
    assert torch.equal(moved[0], out[0]) and not torch.equal(moved[1], out[1])
    y = x.clone()
    y[1, 10] += 5.0  # a foreground token does reach image 0
    assert (proc(attn, y, plan=plan)[0] - out[0]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_masked_out_key_token_has_no_influence_flux_joint(flux, backend):
    attn = flux.transformer_blocks[0].attn
    inputs = _flux_inputs(flux, 2)
    rotary = flux.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    g = torch.Generator().manual_seed(3)
    hidden, text = torch.randn(2, P, attn.query_dim, generator=g), torch.randn(2, T, attn.query_dim, generator=g)
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    masks[1, 0, 1] = False
    plan = AttentionPlan.shared(2, masks, backend=backend)
    proc = FluxPlanAttnProcessor("transformer_blocks.0.attn")
    with torch.no_grad():
        img, txt = proc(attn, hidden, text, image_rotary_emb=rotary, plan=plan)
        moved = hidden.clone()
        moved[1, 1] += 5.0
        img2, txt2 = proc(attn, moved, text, image_rotary_emb=rotary, plan=plan)
        assert torch.equal(img2[0], img[0]) and torch.equal(txt2[0], txt[0])
        moved = hidden.clone()
        moved[1, 2] += 5.0  # foreground: reaches image 0's image queries, never its text queries
        img3, txt3 = proc(attn, moved, text, image_rotary_emb=rotary, plan=plan)
        assert (img3[0] - img[0]).abs().max() > 1e-5 and torch.equal(txt3[0], txt[0])


def test_text_key_mask_hides_prompt_tokens_on_cross_attention():
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 9, 16, generator=g), torch.randn(2, 5, 12, generator=g)
    keep = torch.tensor([[True, True, False, True, True], [True] * 5])
    plan = AttentionPlan(num_images=2, text_key_mask=keep)
    proc = PlanAttnProcessor("attn2")
    out = proc(attn, x, ctx, plan=plan)
    moved = ctx.clone()
    moved[:, 2] += 3.0
    again = proc(attn, x, moved, plan=plan)
    assert torch.equal(again[0], out[0]) and not torch.equal(again[1], out[1])
    stock = AttnProcessor2_0()(attn, x, ctx)
    assert torch.equal(proc(attn, x, ctx), stock)
    assert torch.equal(proc(attn, x, ctx, plan=AttentionPlan(num_images=2)), stock)


# ----------------------------------------------------------------------------------- K/V bank


def test_kv_bank_write_then_read_equals_joint_batch_unet(unet):
    """References run alone in 'write' mode, the target reads them: same as one joint batch where the
    target sees the references' foreground (graph) and the references see only themselves."""
    x, ctx, added = _unet_inputs(unet, 3)
    masks = _masks(3, 8, 8)
    with install_plan(unet):
        joint_plan = AttentionPlan(num_images=3, graph=((1, 2), (), ()), token_masks=masks)
        joint = _run_unet(unet, x, ctx, added, cross_attention_kwargs={"plan": joint_plan})
        bank = KVBank(mode="write", masks=masks[1:])
        written = _run_unet(unet, x, ctx, added, rows=slice(1, 3), cross_attention_kwargs={"kv_bank": bank})
        bank.mode = "read"
        read = _run_unet(unet, x, ctx, added, rows=slice(0, 1), cross_attention_kwargs={"kv_bank": bank})
    assert len(bank.store) == len([n for n in unet.attn_processors if "attn1" in n])
    assert (written - joint[1:]).abs().max() <= 1e-5
    assert (read - joint[:1]).abs().max() <= 1e-5


def test_kv_bank_write_then_read_equals_joint_batch_flux(flux):
    inputs = _flux_inputs(flux, 3)
    masks = _masks(3)
    with install_plan(flux):
        joint_plan = AttentionPlan(num_images=3, graph=((1, 2), (), ()), token_masks=masks, text_len=T)
        joint = _run_flux(flux, inputs, joint_attention_kwargs={"plan": joint_plan})
        bank = KVBank(mode="write", masks=masks[1:], text_len=T)
        written = _run_flux(flux, inputs, rows=slice(1, 3), joint_attention_kwargs={"kv_bank": bank})
        bank.mode = "read"
        read = _run_flux(flux, inputs, rows=slice(0, 1),
                         joint_attention_kwargs={"kv_bank": bank, "plan": AttentionPlan(text_len=T)})
    assert set(bank.store) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    assert (written - joint[1:]).abs().max() <= 1e-5
    assert (read - joint[:1]).abs().max() <= 1e-5


def test_project_on_read_bank_uses_the_reading_pass_projections():
    """SynCD SDXL (the original's RefAttnProc): references write their attention inputs with the LoRA off; the
    target's pass projects them with its own (LoRA'd) to_k / to_v. Changing to_k / to_v between the passes
    (a LoRA switched on) must show in the references' keys, unlike a bank of stored K/V."""
    attn = _attn()
    proc = PlanAttnProcessor("layer")
    gen = torch.Generator().manual_seed(3)
    refs, target = torch.randn(2, 16, 16, generator=gen), torch.randn(1, 16, 16, generator=gen)
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    masks[0, :2] = False
    inputs_bank = KVBank(mode="write", masks=masks, project_on_read=True)
    kv_bank = KVBank(mode="write", masks=masks)
    with torch.no_grad():
        written = proc(attn, refs, kv_bank=inputs_bank)
        assert torch.allclose(written, AttnProcessor2_0()(attn, refs), atol=1e-6)  # references see themselves
        proc(attn, refs, kv_bank=kv_bank)
        assert not inputs_bank.store and set(inputs_bank.inputs) == {"layer"}
        for lin in (attn.to_k, attn.to_v):  # "LoRA on" for the reading pass
            lin.weight += 0.3 * torch.randn(lin.weight.shape, generator=gen)
        inputs_bank.mode = kv_bank.mode = "read"
        read = proc(attn, target, kv_bank=inputs_bank)
        joint_plan = AttentionPlan(num_images=3, graph=((1, 2), (), ()),
                                   token_masks=torch.cat([torch.ones(1, 4, 4, dtype=torch.bool), masks]))
        joint = proc(attn, torch.cat([target, refs]), plan=joint_plan)[:1]
        stale = proc(attn, target, kv_bank=kv_bank)
    assert (read - joint).abs().max() <= 1e-5
    assert (stale - joint).abs().max() > 1e-3


def test_reading_an_empty_bank_is_an_error():
    attn = _attn()
    with pytest.raises(KeyError, match="write"):
        PlanAttnProcessor("x")(attn, torch.randn(1, 4, 16), kv_bank=KVBank(mode="read"))


# --------------------------------------------------------------------------------- FLUX rotary


def test_flux_key_rotary_of_the_same_positions_equals_per_image_rotation(flux):
    """plan.key_rotary rotates the gathered keys [T + N*P]: with every slot at its own image's positions it
    equals the default (keys rotated per image); with other positions it differs (the rotary is used)."""
    inputs = _flux_inputs(flux, 2)
    txt_ids, img_ids = inputs["txt_ids"], inputs["img_ids"]
    same = flux.pos_embed(torch.cat([txt_ids, img_ids, img_ids]))
    shifted_ids = img_ids.clone()
    shifted_ids[:, 1] += 4  # the other image stacked below (SynCD's layout)
    stacked = flux.pos_embed(torch.cat([txt_ids, img_ids, shifted_ids]))
    with install_plan(flux):
        run = lambda **kw: _run_flux(flux, inputs, joint_attention_kwargs={
            "plan": AttentionPlan.shared(2, text_len=T, **kw)})
        default = run()
        assert (run(key_rotary=same) - default).abs().max() <= 1e-5
        assert (run(key_rotary=stacked) - default).abs().max() > 1e-5


# ------------------------------------------------------------------------- schedules, restore


def test_reference_schedule_and_gate_flip_the_plan():
    plan = AttentionPlan(num_images=2, reference=(0,))
    sched = ReferenceAttentionSchedule(plan, 0.2, 1000)
    sched.on_input(StepState(i=0, t=torch.tensor(900), num_steps=2, x_t=torch.zeros(1)))
    assert plan.reference_enabled
    sched.on_input(StepState(i=1, t=torch.tensor(700), num_steps=2, x_t=torch.zeros(1)))
    assert not plan.reference_enabled
    gate = PlanGate(plan, lambda s: s.i > 0)
    gate.on_input(StepState(i=0, t=torch.tensor(999), num_steps=2, x_t=torch.zeros(1)))
    assert plan.masks_enabled is False
    gate.on_input(StepState(i=1, t=torch.tensor(500), num_steps=2, x_t=torch.zeros(1)))
    assert plan.masks_enabled is True


def test_plan_installed_restores_even_when_sampling_fails(unet):
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError):
        with plan_installed(unet, AttentionPlan.shared(2)):
            assert all(isinstance(p, PlanAttnProcessor) for n, p in unet.attn_processors.items() if "attn1" in n)
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())


def test_updating_token_masks_in_place_takes_effect():
    """SynCD refines its masks every step (in place or by assignment): the plan must not serve stale ones."""
    attn = _attn()
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    plan = AttentionPlan.shared(2, masks)
    proc = PlanAttnProcessor("layer")
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    full = proc(attn, x, plan=plan)
    masks[1] = False
    alone = proc(attn, x, plan=plan)
    assert torch.equal(alone[0], proc(attn, x, plan=AttentionPlan(num_images=2))[0])
    plan.token_masks = torch.ones(2, 4, 4, dtype=torch.bool)
    assert torch.equal(proc(attn, x, plan=plan), full)
