"""MIP-Adapter on the tiny SDXL UNet (spec §5 tests 15-22): install, checkpoints in the original layout, IP-Adapter
init, diffusers' converters, UNet-level equivalence with diffusers' IP-Adapter, the plus path, averaging, CFG."""
from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from common.errors import UsageError
from common.models.image_encoders import load_image_encoder
from common.models.ip_adapter import load_ip_adapter, read_ip_adapter, save_ip_adapter
from common.models.tiny import build_tiny
from mipadapter.model import MIPAdapter, VARIANTS, random_mip_state
from mipadapter.pipeline import build_state, encode_entities, encode_references
from mipadapter.processor import MIPAdapterAttnProcessor, MIPState


@pytest.fixture(scope="module")
def pipe():
    return build_tiny("tiny-sdxl")


@pytest.fixture(scope="module")
def encoders():
    return {v: load_image_encoder(VARIANTS[v].tiny_image_encoder) for v in VARIANTS}


def fresh_unet(pipe):
    unet = type(pipe.unet).from_config(pipe.unet.config)
    unet.load_state_dict(pipe.unet.state_dict())
    return unet.eval()


def image(seed, size=40):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())


def unet_call(unet, state, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    text = torch.randn(b, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(b, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * b)}
    kwargs = None if state is None else {"mip": state}
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=text, added_cond_kwargs=added, cross_attention_kwargs=kwargs).sample


def random_state(k=2, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    return MIPState(torch.randn(b, k, 4, 64, generator=g), torch.randn(b, k, 77, 64, generator=g),
                    torch.ones(b, k, dtype=torch.long))


def test_processors_on_cross_attention_only_with_odd_indices(pipe):  # 15
    unet = fresh_unet(pipe)
    MIPAdapter(unet, random_mip_state(unet, "sdxl"))
    procs = list(unet.attn_processors.items())
    mip = [i for i, (_, p) in enumerate(procs) if isinstance(p, MIPAdapterAttnProcessor)]
    assert all(n.endswith("attn2.processor") for n, p in procs if isinstance(p, MIPAdapterAttnProcessor))
    assert all(not isinstance(p, MIPAdapterAttnProcessor) for n, p in procs if n.endswith("attn1.processor"))
    blocks = sum(1 for n, _ in unet.named_modules() if re.search(r"transformer_blocks\.\d+$", n))
    assert len(mip) == blocks and mip == list(range(1, 2 * blocks, 2))


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_checkpoint_round_trip_bit_identical(pipe, tmp_path, suffix):  # 16
    unet = fresh_unet(pipe)
    adapter = MIPAdapter(unet, random_mip_state(unet, "sdxl", seed=3))
    path = adapter.save(tmp_path / f"model{suffix}")
    state = read_ip_adapter(path)
    assert set(state) == {"image_proj", "ip_adapter"}
    keys = list(state["ip_adapter"])
    pattern = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip|text_to_weight)\.weight$")
    assert all(pattern.match(k) for k in keys)
    ids = [int(pattern.match(k).group(1)) for k in keys]
    assert all(i % 2 == 1 for i in ids) and all(ids.count(i) == 3 for i in set(ids))
    assert len(set(ids)) == sum(1 for n in unet.attn_processors if n.endswith("attn2.processor"))
    other = fresh_unet(pipe)
    MIPAdapter.load(other, path)
    s = random_state()
    assert torch.equal(unet_call(unet, s), unet_call(other, s))


def test_ip_adapter_init_reports_missing_gates_and_drops_mismatched_latents(pipe):  # 17
    for variant in VARIANTS:
        unet = fresh_unet(pipe)
        ip_state = random_mip_state(unet, variant, gates=False)
        with pytest.raises(UsageError, match="no text_to_weight gates"):
            MIPAdapter(unet, ip_state)
        assert not any(isinstance(p, MIPAdapterAttnProcessor) for p in unet.attn_processors.values())
        adapter = MIPAdapter(unet, ip_state, require_gate=False)
        n_layers = len(ip_state["ip_adapter"]) // 2
        assert len(adapter.missing) == n_layers and all(k.endswith("text_to_weight.weight") for k in adapter.missing)
        adapter.remove()
    unet = fresh_unet(pipe)
    plus = random_mip_state(unet, "sdxl_plus", gates=False)
    adapter = MIPAdapter(unet, plus, require_gate=False, num_tokens=8)
    assert adapter.dropped == ["latents"] and adapter.num_tokens == 8
    bad = random_mip_state(unet, "sdxl")
    bad["ip_adapter"]["999.to_k_ip.weight"] = torch.zeros(1)
    with pytest.raises(UsageError, match="unexpected key ip_adapter.999.to_k_ip.weight"):
        MIPAdapter(fresh_unet(pipe), bad)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_converters_agree(pipe, encoders, variant):  # 18
    unet = fresh_unet(pipe)
    state = random_mip_state(unet, variant, seed=5)
    adapter = MIPAdapter(unet, state)
    ip_only = {"image_proj": state["image_proj"],
               "ip_adapter": {k: v for k, v in state["ip_adapter"].items() if "text_to_weight" not in k}}
    converted = unet._convert_ip_adapter_attn_to_diffusers([ip_only], low_cpu_mem_usage=False)
    ours = {n: p for n, p in unet.attn_processors.items() if isinstance(p, MIPAdapterAttnProcessor)}
    for name, proc in ours.items():
        assert torch.equal(converted[name].to_k_ip[0].weight, proc.to_k_ip[0].weight)
        assert torch.equal(converted[name].to_v_ip[0].weight, proc.to_v_ip[0].weight)
    proj = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
    feats = encoders[variant].encode([image(1)], VARIANTS[variant].feature)
    torch.testing.assert_close(proj(feats), adapter.image_proj(feats), atol=0, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_k1_zero_gate_unet_equals_diffusers_ip_adapter(pipe, encoders, variant):  # 19
    state = random_mip_state(pipe.unet, variant, seed=7)
    for k in state["ip_adapter"]:
        if "text_to_weight" in k:
            state["ip_adapter"][k].zero_()
    ours_unet = fresh_unet(pipe)
    adapter = MIPAdapter(ours_unet, state)
    feats = encoders[variant].encode([image(2)], VARIANTS[variant].feature)
    tokens = adapter.image_proj(feats)  # [1, T, D]
    s = MIPState(tokens[:, None], torch.zeros(1, 1, 77, 64), torch.ones(1, 1, dtype=torch.long))
    theirs = fresh_unet(pipe)
    load_ip_adapter(theirs, {"image_proj": state["image_proj"], "ip_adapter": {
        k: v for k, v in state["ip_adapter"].items() if "text_to_weight" not in k}})
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        ref = theirs(x, 500, encoder_hidden_states=text, added_cond_kwargs={**added, "image_embeds": [feats[None]]}).sample
        out = ours_unet(x, 500, encoder_hidden_states=text, added_cond_kwargs=added,
                        cross_attention_kwargs={"mip": s}).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_plus_tokens_and_zero_pixel_negative(pipe, encoders):  # 20
    unet = fresh_unet(pipe)
    adapter = MIPAdapter(unet, random_mip_state(unet, "sdxl_plus"))
    enc = encoders["sdxl_plus"]
    refs = [[image(1)], [image(2)]]
    tokens, negative = encode_references(adapter, enc, refs)
    assert tokens.shape == (2, 16, 64)
    feats = enc.encode([image(1), image(2)], "penultimate")
    torch.testing.assert_close(tokens, adapter.image_proj(feats), atol=1e-6, rtol=1e-5)
    pixels = torch.zeros_like(enc.pixel_values([image(1)]))
    zero_pix = enc.model(pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(negative[0], adapter.image_proj(zero_pix)[0], atol=1e-6, rtol=1e-5)
    zero_feat = adapter.image_proj(torch.zeros_like(zero_pix))[0]
    assert (negative[0] - zero_feat).abs().max() > 1e-3  # not zero features


def test_images_of_an_object_are_averaged(pipe, encoders):  # 21
    unet = fresh_unet(pipe)
    adapter = MIPAdapter(unet, random_mip_state(unet, "sdxl"))
    enc = encoders["sdxl"]
    one, _ = encode_references(adapter, enc, [[image(1)], [image(3)]])
    two, _ = encode_references(adapter, enc, [[image(1), image(1)], [image(3)]])
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)  # batched encoder: rounding only
    mixed, _ = encode_references(adapter, enc, [[image(1), image(4)], [image(3)]])
    single = [encode_references(adapter, enc, [[image(i)]])[0][0] for i in (1, 4)]
    torch.testing.assert_close(mixed[0], (single[0] + single[1]) / 2, atol=1e-6, rtol=1e-5)


def test_cfg_negative_half_uses_empty_word_and_positive_lengths(pipe, encoders):  # 22
    unet = fresh_unet(pipe)
    adapter = MIPAdapter(unet, random_mip_state(unet, "sdxl"))
    words = ["teddy bear", "cat"]
    state = build_state(pipe, adapter, encoders["sdxl"], [[image(1)], [image(2)]], words, batch=1)
    tokens, embeds, lengths, _, _ = state.rows(2)
    pos, empty = encode_entities(pipe, words)
    assert torch.equal(embeds[0], empty) and torch.equal(embeds[1], pos)
    assert lengths.tolist() == [[2, 1], [2, 1]]
    assert torch.equal(tokens[1], encode_references(adapter, encoders["sdxl"], [[image(1)], [image(2)]])[0])
