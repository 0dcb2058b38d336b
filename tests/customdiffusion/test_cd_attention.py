"""Trainable K/V processors: equivalence at init, trainable sets, BOS detach, gradient locality, state IO."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from common.errors import UsageError
from customdiffusion import attention as A


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 500]), ctx


def _added(pipe, batch=2):
    if getattr(pipe, "text_encoder_2", None) is None:
        return {}
    g = torch.Generator().manual_seed(1)
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                                  "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * batch, dtype=torch.float32)}}


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("mode", ["crossattn_kv", "crossattn"])
def test_processor_equivalence_at_init(tiny, name, mode):
    pipe = tiny(name)
    x, t, ctx = _inputs(pipe.unet)
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx, **_added(pipe)).sample
        handle = A.install(pipe.unet, mode)
        out = pipe.unet(x, t, ctx, **_added(pipe)).sample
        handle.restore()
        back = pipe.unet(x, t, ctx, **_added(pipe)).sample
    assert (out - ref).abs().max() < 1e-5
    assert torch.equal(back, ref)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_trainable_set_kv(tiny, name):
    unet = tiny(name).unet
    from common.attention.processors import matching_layers

    layers = matching_layers(unet, "attn2")
    A.install(unet, "crossattn-kv")  # LDM spelling accepted
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    expected = {f"{l}.processor.to_{w}_custom_diffusion.weight" for l in layers for w in "kv"}
    assert trainable == expected and len(trainable) == 2 * len(layers)
    assert set(A.trainable_parameters(unet)) == expected
    assert not any("attn1" in n or n.endswith("bias") for n in trainable)
    base = set(A.trained_param_names(unet, "crossattn_kv"))
    assert base == {f"{l}.to_{w}.weight" for l in layers for w in "kv"}


def test_trainable_set_crossattn(tiny):
    unet = tiny().unet
    from common.attention.processors import matching_layers

    layers = matching_layers(unet, "attn2")
    A.install(unet, "crossattn")
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    tails = ["to_q_custom_diffusion.weight", "to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight",
             "to_out_custom_diffusion.0.weight", "to_out_custom_diffusion.0.bias"]
    assert trainable == {f"{l}.processor.{t}" for l in layers for t in tails}
    assert {A.proc_key_to_param(k) for k in trainable} == set(A.trained_param_names(unet, "crossattn"))


def test_bad_freeze_model(tiny):
    with pytest.raises(UsageError, match="crossattn_kv or crossattn"):
        A.install(tiny().unet, "all")


def test_gradient_locality(tiny):
    pipe = tiny()
    unet = pipe.unet
    A.install(unet)
    x, t, ctx = _inputs(unet)
    loss = F.mse_loss(unet(x, t, ctx).sample, torch.randn_like(x))
    loss.backward()
    trainable = A.trainable_parameters(unet)
    for name, p in unet.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    assert all(p.grad is None for p in pipe.vae.parameters())


def _attn_layer(unet):
    return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2


def test_bos_detach(tiny):
    """Position 0 of the text sends no gradient to W_k / W_v; the forward is the plain attention."""
    attn = _attn_layer(tiny().unet)
    proc = A.CustomDiffusionProcessor.from_attention(attn)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    ctx = torch.randn(2, 6, attn.to_k.in_features, generator=g)

    def grads(context):
        proc.zero_grad()
        out = proc(attn, h, context)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), proc.to_k_custom_diffusion.weight.grad.clone(), proc.to_v_custom_diffusion.weight.grad.clone()

    out, gk, gv = grads(ctx)
    with torch.no_grad():
        ref = attn.processor(attn, h, ctx)
    assert (out - ref).abs().max() < 1e-6

    # Reference gradient: K/V at position 0 computed with detached weights.
    wk, wv = proc.to_k_custom_diffusion.weight, proc.to_v_custom_diffusion.weight
    wk_ref, wv_ref = wk.detach().clone().requires_grad_(), wv.detach().clone().requires_grad_()
    k = torch.cat([ctx[:, :1] @ wk_ref.detach().T, ctx[:, 1:] @ wk_ref.T], 1)
    v = torch.cat([ctx[:, :1] @ wv_ref.detach().T, ctx[:, 1:] @ wv_ref.T], 1)
    q = attn.to_q(h)
    split = lambda z: z.view(2, -1, attn.heads, z.shape[-1] // attn.heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, 16, -1)
    o = attn.to_out[0](o)
    (o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum().backward()
    assert torch.allclose(gk, wk_ref.grad, atol=1e-6) and torch.allclose(gv, wv_ref.grad, atol=1e-6)

    # Only position 0 carries text: the trained weights get exactly zero gradient, though the output depends on it.
    only_bos = torch.zeros_like(ctx)
    only_bos[:, 0] = ctx[:, 0]
    out0, gk0, gv0 = grads(only_bos)
    assert torch.count_nonzero(gk0) == 0 and torch.count_nonzero(gv0) == 0
    assert not torch.allclose(out0, out)


def test_state_roundtrip_and_errors(tiny):
    unet_a, unet_b = tiny().unet, tiny().unet
    A.install(unet_a)
    with torch.no_grad():
        for p in A.trainable_parameters(unet_a).values():
            p.add_(0.1)
    state = A.get_state(unet_a)
    A.install(unet_b)
    A.set_state(unet_b, state)
    assert all(torch.equal(state[k], v) for k, v in A.get_state(unet_b).items())
    missing = dict(list(state.items())[1:])
    with pytest.raises(UsageError, match=list(state)[0].replace(".", r"\.")):
        A.set_state(unet_b, missing)
    with pytest.raises(UsageError, match="install"):
        A.get_state(tiny().unet)


def test_key_conversion_roundtrip():
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_custom_diffusion.0.bias"
    assert A.proc_key_to_param(key) == "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"
    assert A.param_to_proc_key(A.proc_key_to_param(key)) == key


def test_save_attn_procs_interop(tiny, tmp_path):
    """diffusers' own save_attn_procs works on our processors; its file loads with our reader and with diffusers'."""
    from customdiffusion.apply import apply_customdiffusion

    pipe = tiny()
    A.install(pipe.unet)
    with torch.no_grad():
        for p in A.trainable_parameters(pipe.unet).values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    pipe.unet.save_attn_procs(tmp_path, safe_serialization=False)
    sd = torch.load(tmp_path / "pytorch_custom_diffusion_weights.bin", weights_only=True)
    tensors = {k for k, v in sd.items() if isinstance(v, torch.Tensor)}
    assert tensors == set(A.trainable_parameters(pipe.unet))
    assert all("custom_diffusion" in k for k in tensors)
    x, t, ctx = _inputs(pipe.unet)
    with torch.no_grad():
        want = pipe.unet(x, t, ctx).sample
        ours = tiny()
        apply_customdiffusion(ours, tmp_path)
        theirs = tiny()
        # diffusers 0.42 only installs the loaded processors when given the pipeline (else it is a no-op)
        theirs.unet.load_attn_procs(tmp_path, weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=theirs)
        assert (ours.unet(x, t, ctx).sample - want).abs().max() < 1e-6
        assert (theirs.unet(x, t, ctx).sample - want).abs().max() < 1e-6


def test_our_bin_folder_loads_in_diffusers(tiny, concept, tmp_path):
    """The upstream .bin layout carries {} entries for attn1, which diffusers' loader needs to load it."""
    from customdiffusion.apply import apply_customdiffusion
    from customdiffusion.formats import save_diffusers

    base = tiny()
    weights = concept(base)
    save_diffusers(weights, tmp_path, safe_serialization=False)
    ours, theirs = tiny(), tiny()
    apply_customdiffusion(ours, tmp_path)
    theirs.unet.load_attn_procs(tmp_path, weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=theirs)
    x, t, ctx = _inputs(base.unet)
    with torch.no_grad():
        assert (ours.unet(x, t, ctx).sample - theirs.unet(x, t, ctx).sample).abs().max() < 1e-5
