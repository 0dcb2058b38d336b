"""Custom Diffusion concepts through the shared adapter seam: found by entry point or manifest, applied as
removable handles anywhere, stacked with LoRAs."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UsageError
from common.models.adapters import adapter_kinds, apply_adapter, apply_adapters, detect_adapter, read_manifest
from common.models.tiny import build_tiny
from customdiffusion.formats import save, save_diffusers
from lora_helpers import ATTN1, make_lora

ALL_ATTN = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"


@torch.no_grad()
def run(pipe, prompt="a <new1> toy"):
    """One UNet call on fixed latents with the prompt's text embeds (tokens and attention weights both count)."""
    embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe.unet(x, 500, encoder_hidden_states=embeds).sample


@pytest.fixture
def pipe():
    p = build_tiny("tiny-sd")
    p.set_progress_bar_config(disable=True)
    return p


def test_entry_point_registers_customdiffusion():
    assert "customdiffusion" in adapter_kinds()


@pytest.mark.parametrize("layout", ["diffusers", "delta"])
def test_apply_adapters_writes_the_concept_into_the_pipeline(tmp_path, concept, layout):
    pipe = build_tiny("tiny-sd")
    weights = concept(pipe)
    path = tmp_path / "concept"
    if layout == "diffusers":
        save_diffusers(weights, path)
    else:
        path = save(weights, tmp_path / "delta.safetensors", fmt="delta")
    assert [h.kind for h in apply_adapters(pipe, [path])] == ["customdiffusion"]  # old layouts: no manifest
    params = dict(pipe.unet.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in weights.unet.items())
    assert pipe.tokenizer.convert_tokens_to_ids("<new1>") == 49408


def test_unknown_adapter_is_one_clear_line(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(UsageError, match="not a trained adapter of a known kind"):
        apply_adapters(build_tiny("tiny-sd"), [junk])
    with pytest.raises(UsageError, match="does not exist"):
        apply_adapters(build_tiny("tiny-sd"), [tmp_path / "missing"])


def test_handle_scale_and_remove_restore_the_base_exactly(tmp_path, pipe, concept):
    save_diffusers(concept(pipe), tmp_path / "c")
    base, base_plain = run(pipe), run(pipe, "a photo of a dog")
    n_tokens, n_rows = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.shape[0]
    handle = apply_adapter(pipe, tmp_path / "c")
    on = run(pipe)
    assert (on - base).abs().max() > 1e-3 and handle.info["tokens"] == ["<new1>"]
    handle.set_scale(0.0)  # base weights (the token stays: prompts without it are the base model's)
    assert torch.equal(run(pipe, "a photo of a dog"), base_plain)
    handle.set_scale(0.5)
    half = run(pipe)
    assert not torch.equal(half, on)
    handle.set_scale(1.0)
    assert torch.equal(run(pipe), on)
    handle.remove()  # weights and tokenizer back: "<new1>" is plain text again
    assert torch.equal(run(pipe), base)
    assert len(pipe.tokenizer) == n_tokens
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == n_rows


def test_concepts_on_the_same_weights_remove_in_reverse_order(tmp_path, pipe, concept):
    save_diffusers(concept(pipe, seed=1), tmp_path / "c1")
    save_diffusers(concept(pipe, seed=2, tokens=("<new2>",)), tmp_path / "c2")
    base = run(pipe, "a <new1> <new2> toy")
    first = apply_adapter(pipe, tmp_path / "c1")
    with pytest.warns(UserWarning, match="overwrites the cross-attention weights"):
        second = apply_adapter(pipe, tmp_path / "c2")
    with pytest.raises(UsageError, match="remove .*c2 first"):
        first.remove()
    second.remove()
    first.remove()
    assert torch.equal(run(pipe, "a <new1> <new2> toy"), base)


@pytest.mark.parametrize("lora_target", [ATTN1, ALL_ATTN], ids=["lora-attn1", "lora-all-attention"])
def test_concept_and_lora_stack_in_either_order(tmp_path, concept, lora_target):
    """A concept writes attn2 K/V; a LoRA adds to attn1 (or to every projection, attn2 K/V included: the
    concept then writes the LoRA layer's base weight). Either order gives the same model."""
    make_lora(tmp_path / "lora", lora_target)
    one, two = build_tiny("tiny-sd"), build_tiny("tiny-sd")
    save_diffusers(concept(one), tmp_path / "c")
    base = run(one)
    h1 = apply_adapters(one, [tmp_path / "c", tmp_path / "lora"])
    h2 = apply_adapters(two, [tmp_path / "lora", tmp_path / "c"])
    assert [h.kind for h in h1] == ["customdiffusion", "lora"] and [h.kind for h in h2] == ["lora", "customdiffusion"]
    stacked = run(one)
    assert (run(two) - stacked).abs().max() <= 1e-5
    h2[1].remove()  # concept off, LoRA stays: equals the LoRA alone
    lora_alone = build_tiny("tiny-sd")
    apply_adapter(lora_alone, tmp_path / "lora")
    assert (run(two) - run(lora_alone)).abs().max() <= 1e-5
    h2[0].remove()
    assert torch.equal(run(two), base)
    for h in reversed(h1):
        h.remove()
    assert torch.equal(run(one), base)


def test_trainer_writes_a_manifest_that_decides_the_kind(tmp_path, pipe, concept):
    from customdiffusion.train import CustomDiffusionMethod

    weights = concept(pipe)
    for fmt, safe in [("diffusers", True), ("delta", False)]:
        out = tmp_path / fmt
        stub = types.SimpleNamespace(pipe=pipe, trained_weights=lambda: weights,
                                     args=types.SimpleNamespace(no_safe_serialization=not safe, save_format=fmt))
        CustomDiffusionMethod.save_final(stub, out)
        manifest = read_manifest(out)
        assert manifest["kind"] == "customdiffusion" and manifest["base_family"] == "sd"
        assert manifest["tokens"] == ["<new1>"] and manifest["info"]["save_format"] == fmt
        assert manifest.get("weights") == (None if fmt == "diffusers" else "delta.bin")
        assert detect_adapter(out).name == "customdiffusion"
        target = build_tiny("tiny-sd")
        handle = apply_adapter(target, out)
        params = dict(target.unet.named_parameters())
        assert all(torch.equal(params[k], v) for k, v in weights.unet.items())
        handle.remove()
    xl = build_tiny("tiny-sdxl")
    with pytest.raises(UsageError, match="trained for a sd model but the pipeline is sdxl"):
        apply_adapter(xl, tmp_path / "diffusers")


def test_a_lora_file_is_not_taken_for_a_delta(tmp_path):
    from safetensors.torch import load_file, save_file

    make_lora(tmp_path / "lora", ATTN1)
    flat = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("unet.") for k in flat)  # what made the old sniffing call it a delta
    save_file(flat, str(tmp_path / "loose.safetensors"))
    assert detect_adapter(tmp_path / "loose.safetensors").name == "lora"


def test_plain_sampler_runs_with_a_concept(tmp_path, concept, tokens_only):
    from plainsample.sample import main

    weights = concept(build_tiny("tiny-sd"), scale=1.0)
    save_diffusers(weights, tmp_path / "concept")
    # the same concept with the base K/V: <new1> is known in both runs, only the K/V differ
    save_diffusers(tokens_only(build_tiny("tiny-sd"), weights), tmp_path / "tokens_only")
    base = ["--model", "tiny-sd", "--prompt", "a <new1> toy", "--num_inference_steps", "2"]
    main([*base, "--output", str(tmp_path / "ref.png"), "--adapters", str(tmp_path / "tokens_only")])
    main([*base, "--output", str(tmp_path / "concept.png"), "--adapters", str(tmp_path / "concept")])
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("ref", "concept"))
    assert a.shape == b.shape and not np.array_equal(a, b)
