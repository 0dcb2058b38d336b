"""LoRA seam: presets, trainable parameters, the disabled (reference) pass, and files diffusers loads."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from common.models.adapters import apply_adapter, read_manifest
from common.models.tiny import build_tiny
from common.train.conditioning import flux_guidance, flux_latent_image_ids, flux_pack_latents, flux_text_ids
from common.train.lora import (
    LORA_TARGET_MODULES,
    LORA_WEIGHTS_NAME,
    TEXT_ENCODER_TARGET_MODULES,
    add_lora,
    lora_disabled,
    lora_state_dict,
    save_lora_weights,
)


def randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero (adapted == base); give it values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def sdxl_unet_call(unet: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return unet(sample, torch.tensor([10, 700]), text, added_cond_kwargs=added).sample


def flux_transformer_call(transformer: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    cfg = transformer.config
    latents = torch.randn(2, cfg.in_channels // 4, 8, 8, generator=g)
    return transformer(
        flux_pack_latents(latents), timestep=torch.tensor([0.2, 0.9]), guidance=flux_guidance(transformer, 3.5, 2),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
        encoder_hidden_states=torch.randn(2, 5, cfg.joint_attention_dim, generator=g),
        txt_ids=flux_text_ids(5), img_ids=flux_latent_image_ids((8, 8)), return_dict=False,
    )[0]


def text_call(encoder: torch.nn.Module) -> torch.Tensor:
    return encoder(torch.tensor([[49406, 320, 1125, 539, 49407, 49407]]))[0]


def test_presets_cover_every_attention_projection_and_only_lora_trains():
    unet = build_tiny("tiny-sd").unet
    for p in unet.parameters():
        p.requires_grad_(True)
    params = add_lora(unet, rank=4, family="sd")

    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 4 * len(attentions) > 0  # to_q, to_k, to_v, to_out.0 of self- and cross-attention
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in params)

    randomize_lora(unet)
    g = torch.Generator().manual_seed(0)
    out = unet(torch.randn(1, 4, 8, 8, generator=g), 5, torch.randn(1, 3, 32, generator=g)).sample
    out.square().mean().backward()
    for name, p in unet.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert all(p.grad.abs().sum() > 0 for p in params if p.grad is not None)

    with pytest.raises(ValueError, match="preset"):
        add_lora(build_tiny("tiny-sd").unet, rank=4, family="if")


def test_flux_preset_reaches_joint_and_single_blocks():
    transformer = build_tiny("tiny-flux").transformer
    add_lora(transformer, rank=2, family="flux")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}
    joint = {f"transformer_blocks.0.{m}" for m in LORA_TARGET_MODULES["flux"]}
    single = {f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"}
    assert adapted == joint | single


def test_disabled_lora_is_exactly_the_base_model_and_restores_state():
    unet = build_tiny("tiny-sdxl").unet
    with torch.no_grad():
        base = sdxl_unet_call(unet)
    params = add_lora(unet, rank=4, family="sdxl")
    randomize_lora(unet)
    with torch.no_grad():
        adapted = sdxl_unet_call(unet)
        with lora_disabled(unet):  # DCO's reference pass
            reference = sdxl_unet_call(unet)
        after = sdxl_unet_call(unet)
    assert not torch.allclose(adapted, base)
    assert torch.equal(reference, base)
    assert torch.equal(after, adapted)
    assert all(p.requires_grad for p in params)

    frozen = build_tiny("tiny-sd").unet
    add_lora(frozen, rank=2, family="sd")
    for p in frozen.parameters():
        p.requires_grad_(False)  # an inference-only LoRA stays frozen after a disabled pass
    with lora_disabled(frozen):
        pass
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="no LoRA layers"):
        with lora_disabled(build_tiny("tiny-sd").unet):
            pass


def test_sdxl_lora_saved_here_loads_in_diffusers_with_the_same_outputs(tmp_path):
    pipe = build_tiny("tiny-sdxl")
    add_lora(pipe.unet, rank=4, alpha=8, family="sdxl")  # alpha != rank: the scale must survive the file
    add_lora(pipe.text_encoder, rank=4, target_modules=TEXT_ENCODER_TARGET_MODULES)
    add_lora(pipe.text_encoder_2, rank=2, target_modules=TEXT_ENCODER_TARGET_MODULES)
    for i, model in enumerate((pipe.unet, pipe.text_encoder, pipe.text_encoder_2)):
        randomize_lora(model, seed=i)
    path = save_lora_weights(tmp_path / "lora", family="sdxl", unet=pipe.unet, text_encoder=pipe.text_encoder,
                             text_encoder_2=pipe.text_encoder_2)
    assert path == tmp_path / "lora" / LORA_WEIGHTS_NAME and path.is_file()
    assert not [p for p in (tmp_path / "lora").iterdir() if p.name.startswith(".lora-")]

    fresh = build_tiny("tiny-sdxl")
    with torch.no_grad():
        base = sdxl_unet_call(fresh.unet)
        fresh.load_lora_weights(str(tmp_path / "lora"))
        loaded, ours = sdxl_unet_call(fresh.unet), sdxl_unet_call(pipe.unet)
        assert not torch.allclose(ours, base)
        assert (loaded - ours).abs().max() < 1e-5
        for a, b in ((fresh.text_encoder, pipe.text_encoder), (fresh.text_encoder_2, pipe.text_encoder_2)):
            assert (text_call(a) - text_call(b)).abs().max() < 1e-5


def test_flux_lora_saved_here_loads_in_diffusers_with_the_same_outputs(tmp_path):
    pipe = build_tiny("tiny-flux")
    add_lora(pipe.transformer, rank=4, family="flux")
    randomize_lora(pipe.transformer)
    save_lora_weights(tmp_path, family="flux", transformer=pipe.transformer)
    state = lora_state_dict(pipe.transformer, prefix="transformer.")
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in state

    fresh = build_tiny("tiny-flux")
    with torch.no_grad():
        base = flux_transformer_call(fresh.transformer)
        fresh.load_lora_weights(str(tmp_path))
        loaded, ours = flux_transformer_call(fresh.transformer), flux_transformer_call(pipe.transformer)
    assert not torch.allclose(ours, base)
    assert (loaded - ours).abs().max() < 1e-5

    # the manifest makes it an explicit adapter: apply_adapter loads it the same way
    manifest = read_manifest(tmp_path)
    assert (manifest["kind"], manifest["base_family"], manifest["weights"]) == ("lora", "flux", LORA_WEIGHTS_NAME)
    other = build_tiny("tiny-flux")
    handle = apply_adapter(other, tmp_path)
    with torch.no_grad():
        assert (flux_transformer_call(other.transformer) - ours).abs().max() < 1e-5
        handle.remove()
        assert torch.equal(flux_transformer_call(other.transformer), base)


def test_save_checks_the_family_slots(tmp_path):
    pipe = build_tiny("tiny-sd")
    add_lora(pipe.unet, rank=2, family="sd")
    with pytest.raises(ValueError, match="transformer"):
        save_lora_weights(tmp_path, family="flux", unet=pipe.unet)
    with pytest.raises(ValueError, match="at least one"):
        save_lora_weights(tmp_path, family="sd")
    assert not (tmp_path / LORA_WEIGHTS_NAME).exists()
