"""SynCD training and inference mechanics (spec §6 tests 16-25): canvas layout, clean references, target-only
loss, information flow under full vs neg_mode attention, LoRA setup, sigma sampling, reference clamping,
the guidance formulas, and the released checkpoint layout with its strict key check."""
from __future__ import annotations

import pytest
import torch

from common.attention.plan import install_plan
from common.errors import UsageError
from common.models.tiny import build_tiny
from common.pipelines.loop import StepState
from common.train.flow import flow_matching_loss, resolution_shift, sample_timestep_density, shift_sigmas
from common.train.lora import add_lora
from syncd.canvas import (make_canvas, neg_mode_plan, noise_canvas, pack_canvas, slot_ids, slot_mask, split_canvas,
                          unpack_canvas)
from syncd.checkpoint import PREFIX, TRAIN_TARGETS, load_syncd_checkpoint, save_syncd_checkpoint, syncd_state_dict
from syncd.guidance import normalized_guidance, true_cfg
from syncd.pipeline import ClampReferences

N, C, H, W = 3, 4, 8, 8  # images, latent channels, latent size (4x4 packed tokens per image)


@pytest.fixture(scope="module")
def flux():
    return build_tiny("tiny-flux").transformer


def _lat(b=2, seed=0):
    return torch.randn(b, N, C, H, W, generator=torch.Generator().manual_seed(seed))


def _run(tr, tokens, ids, text=0, **kw):
    b = tokens.shape[0]
    return tr(hidden_states=tokens, encoder_hidden_states=torch.zeros(b, text, tr.config.joint_attention_dim),
              pooled_projections=torch.zeros(b, tr.config.pooled_projection_dim), timestep=torch.full((b,), 0.5),
              guidance=torch.ones(b), txt_ids=torch.zeros(text, 3), img_ids=ids, return_dict=False, **kw)[0]


def test_canvas_layout_ids_and_round_trip():  # 16
    lat = _lat()
    canvas = make_canvas(lat)
    assert canvas.shape == (2, C, H, N * W)
    tokens, ids = pack_canvas(canvas)
    slots = slot_ids((H, W), N)
    for j in range(N):
        cols = ids[slots == j, 2]
        assert cols.min() == j * W // 2 and cols.max() == (j + 1) * W // 2 - 1
        assert (ids[:, 0] == 0).all()
    assert torch.equal(split_canvas(unpack_canvas(tokens, (H, N * W)), N), lat)
    # the target slot's tokens are the target image's own packed tokens
    from common.train.conditioning import flux_pack_latents
    assert torch.equal(tokens[:, slot_mask((H, W), N)], flux_pack_latents(lat[:, 0]))


def test_clean_references_and_noisy_target():  # 17
    lat = _lat()
    canvas = make_canvas(lat)
    noise = torch.randn_like(canvas)
    for s in (0.0, 0.3, 1.0):
        sig = torch.full((2,), s)
        x = split_canvas(noise_canvas(canvas, noise, sig, N), N)
        assert torch.equal(x[:, 1:], lat[:, 1:])
        torch.testing.assert_close(x[:, 0], (1 - s) * lat[:, 0] + s * split_canvas(noise, N)[:, 0], atol=1e-6, rtol=0)


def test_target_only_loss():  # 18
    tokens = pack_canvas(make_canvas(_lat()))[0]
    mask = slot_mask((H, W), N)
    pred = torch.randn_like(tokens, requires_grad=True)
    target = torch.randn_like(tokens)
    loss = flow_matching_loss(pred, target, token_mask=mask)
    loss.backward()
    assert (pred.grad[:, ~mask] == 0).all() and (pred.grad[:, mask] != 0).any()
    other = target.clone()
    other[:, ~mask] += 5.0
    assert torch.equal(flow_matching_loss(pred, other, token_mask=mask), loss)


def test_reference_information_flow(flux):  # 19
    lat = _lat(1).requires_grad_(True)
    tokens, ids = pack_canvas(make_canvas(lat))
    mask = slot_mask((H, W), N)
    out = _run(flux, tokens, ids)
    g_full = torch.autograd.grad(out[:, mask].pow(2).sum(), lat)[0]
    assert g_full[:, 1:].abs().max() > 1e-6
    plan = neg_mode_plan((H, W), N, text_len=0)
    with install_plan(flux):
        out = _run(flux, tokens, ids, joint_attention_kwargs={"plan": plan})
    g_neg = torch.autograd.grad(out[:, mask].pow(2).sum(), lat)[0]
    assert (g_neg[:, 1:] == 0).all() and g_neg[:, 0].abs().max() > 0


def test_neg_mode_equals_separate_images(flux):  # 20
    lat = _lat(1)
    tokens, ids = pack_canvas(make_canvas(lat))
    slots = slot_ids((H, W), N)
    with torch.no_grad(), install_plan(flux):
        joint = _run(flux, tokens, ids, joint_attention_kwargs={"plan": neg_mode_plan((H, W), N, 0)})
    with torch.no_grad():
        for j in range(N):
            alone = _run(flux, tokens[:, slots == j], ids[slots == j])
            torch.testing.assert_close(joint[:, slots == j], alone, atol=1e-5, rtol=0)


def test_lora_setup_trains_only_lora_and_starts_at_base():  # 21
    tr = build_tiny("tiny-flux").transformer
    tokens, ids = pack_canvas(make_canvas(_lat(1)))
    with torch.no_grad():
        base = _run(tr, tokens, ids, text=2)
    params = add_lora(tr, 32, 32, target_modules=list(TRAIN_TARGETS))
    trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_A" in n or "lora_B" in n) for n in trainable) and len(params) == len(trainable)
    assert any("single_transformer_blocks" in n for n in trainable) and any("ff_context" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(_run(tr, tokens, ids, text=2), base)


def test_sigma_sampling():  # 22
    u = sample_timestep_density("beta", 10000, beta_a=4.0, beta_b=2.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(u.mean()) - 2 / 3) < 0.01
    shift = resolution_shift(3 * 1024)
    assert shift > 1
    s = shift_sigmas(u, shift)
    assert (s >= u).all() and (s > 0).all() and (s < 1).all()


def test_reference_clamping():  # 23
    z_ref = torch.randn(1, 48, 16)
    m = slot_mask((H, W), N)[None, :, None].float()
    x = torch.randn(1, 48, 16)
    st = StepState(i=0, t=torch.tensor(500.0), num_steps=2, x_t=x)
    ClampReferences(z_ref, m).on_input(st)
    keep = m[0, :, 0].bool()
    assert torch.equal(st.x_t[:, ~keep], z_ref[:, ~keep]) and torch.equal(st.x_t[:, keep], x[:, keep])


def test_guidance_formulas():  # 24
    g = torch.Generator().manual_seed(0)
    e_u, e_i, e_c = (torch.randn(2, 5, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(true_cfg(e_u, e_c, 3.0), e_u + 3.0 * (e_c - e_u))
    assert torch.equal(normalized_guidance(e_u, e_i, e_c, 0.0, 0.0), e_i)
    # equal norms: no clipping
    d = torch.randn(2, 5, 4, generator=g)
    e_i2, e_c2 = e_u + d, e_u + d + d.flip(-1)
    torch.testing.assert_close(normalized_guidance(e_u, e_i2, e_c2, 1.5, 0.7), e_i2 + 0.7 * d + 1.5 * d.flip(-1))
    # after normalisation both directions have the smaller norm
    out = normalized_guidance(e_u, e_i, e_c, 1.0, 0.0) - e_i  # = d_txt'
    d_img, d_txt = (e_i - e_u).flatten(1).norm(dim=1), (e_c - e_i).flatten(1).norm(dim=1)
    r = torch.minimum(d_img, d_txt)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), r)
    torch.testing.assert_close((normalized_guidance(e_u, e_i, e_c, 0.0, 1.0) - e_i).flatten(1).norm(dim=1), r)


def test_checkpoint_layout_strict_loading(tmp_path):  # 25
    src = build_tiny("tiny-flux").transformer
    add_lora(src, 32, 32, target_modules=list(TRAIN_TARGETS))
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    sd = syncd_state_dict(src)
    assert all(k.startswith(PREFIX) and ".default." in k for k in sd)
    path = tmp_path / "pytorch_model.bin"
    torch.save({**sd, PREFIX + "x_embedder.base_layer.weight": torch.zeros(1)}, path)  # released: torch pickle
    dst = build_tiny("tiny-flux").transformer
    assert load_syncd_checkpoint(dst, path) == len(sd)
    own = dst.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k[len(PREFIX):]], v)
    tokens, ids = pack_canvas(make_canvas(_lat(1)))
    with torch.no_grad():
        assert torch.equal(_run(dst, tokens, ids, text=2), _run(src, tokens, ids, text=2))
    bad = tmp_path / "bad.bin"
    torch.save({k.replace(PREFIX, "transformer."): v for k, v in sd.items()}, bad)
    with pytest.raises(UsageError, match="0 of .* LoRA keys start with"):
        load_syncd_checkpoint(build_tiny("tiny-flux").transformer, bad)
    ours = tmp_path / "ours" / "pytorch_model.safetensors"
    save_syncd_checkpoint(src, ours)
    assert load_syncd_checkpoint(build_tiny("tiny-flux").transformer, ours.parent) == len(sd)
