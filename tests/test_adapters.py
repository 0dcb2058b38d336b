"""Explicit adapters: manifests decide the kind, handles scale and remove exactly, LoRAs stack and unload."""
from __future__ import annotations

import json

import pytest
import torch

from common.errors import UsageError
from common.models import adapters
from common.models.adapters import (
    MANIFEST_NAME,
    AdapterHandle,
    adapter_kinds,
    apply_adapter,
    apply_adapters,
    detect_adapter,
    read_manifest,
    register_adapter,
    write_manifest,
)
from common.models.tiny import build_tiny
from lora_helpers import ATTN1, make_lora

ALL_ATTN = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"


@torch.no_grad()
def run(pipe, prompt="a photo of a dog"):
    """One UNet call on fixed latents with the prompt's text embeds: what every adapter here changes (text
    encoder tokens, attention weights), at a fraction of a sampling run's cost."""
    embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe.unet(x, 500, encoder_hidden_states=embeds).sample


@pytest.fixture
def pipe():
    p = build_tiny("tiny-sd")
    p.set_progress_bar_config(disable=True)
    return p


def test_manifest_round_trip_and_scope(tmp_path):
    path = write_manifest(tmp_path, kind="lora", base_family="sdxl", tokens=["<a>"], options={"scale": 0.5},
                          weights="w.safetensors")
    assert path == tmp_path / MANIFEST_NAME
    m = read_manifest(tmp_path)
    assert (m["kind"], m["base_family"], m["tokens"], m["options"], m["weights"]) == \
        ("lora", "sdxl", ["<a>"], {"scale": 0.5}, "w.safetensors")
    assert read_manifest(tmp_path / "w.safetensors") == m  # the file the manifest names
    assert read_manifest(tmp_path / "other.safetensors") is None  # a file it does not describe
    assert read_manifest(tmp_path / "elsewhere") is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(UsageError, match="not a readable adapter manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"kind": "lora"}))
    with pytest.raises(UsageError, match="is not an adapter manifest"):
        read_manifest(tmp_path)


def test_manifest_decides_where_layouts_compete(tmp_path, monkeypatch):
    make_lora(tmp_path / "lora")
    assert detect_adapter(tmp_path / "lora").name == "lora"
    kinds = dict(adapter_kinds())
    monkeypatch.setattr(adapters, "_KINDS", kinds)
    register_adapter("greedy", lambda p: True, lambda pipe, path, **o: AdapterHandle("greedy", path))
    with pytest.raises(UsageError, match=r"fits several adapter kinds \(lora, greedy\)"):
        detect_adapter(tmp_path / "lora")
    write_manifest(tmp_path / "lora", kind="lora", base_family="sd")
    assert detect_adapter(tmp_path / "lora").name == "lora"
    write_manifest(tmp_path / "lora", kind="greedy", base_family="sd")
    assert detect_adapter(tmp_path / "lora").name == "greedy"
    write_manifest(tmp_path / "lora", kind="nonesuch", base_family="sd")
    with pytest.raises(UsageError, match="'nonesuch' adapter, a kind not installed here"):
        detect_adapter(tmp_path / "lora")


def test_manifest_family_must_match_the_pipeline(tmp_path, pipe):
    make_lora(tmp_path / "lora")
    write_manifest(tmp_path / "lora", kind="lora", base_family="sdxl")
    with pytest.raises(UsageError, match="trained for a sdxl model but the pipeline is sd"):
        apply_adapter(pipe, tmp_path / "lora")


def test_lora_handle_scale_and_remove_are_exact(tmp_path, pipe):
    make_lora(tmp_path / "lora")
    base = run(pipe)
    handle = apply_adapter(pipe, tmp_path / "lora")
    on = run(pipe)
    assert handle.kind == "lora" and (on - base).abs().max() > 1e-3
    handle.set_scale(0.0)
    assert torch.equal(run(pipe), base)
    handle.set_scale(1.0)
    assert torch.equal(run(pipe), on)
    handle.remove()
    assert torch.equal(run(pipe), base)
    assert not any(".lora_" in n for n, _ in pipe.unet.named_parameters())  # LoRA layers unloaded
    handle.remove()  # idempotent
    with pytest.raises(UsageError, match="was removed"):
        handle.set_scale(1.0)


def test_manifest_options_are_defaults_and_call_options_win(tmp_path, pipe):
    make_lora(tmp_path / "lora")
    write_manifest(tmp_path / "lora", kind="lora", base_family="sd", options={"scale": 0.0})
    base = run(pipe)
    handle = apply_adapter(pipe, tmp_path / "lora")
    assert handle.scale == 0.0 and torch.equal(run(pipe), base)
    handle.remove()
    handle = apply_adapter(pipe, tmp_path / "lora", scale=0.5)
    assert handle.scale == 0.5 and not torch.equal(run(pipe), base)


def test_two_loras_stack_commute_and_remove_in_any_order(tmp_path, pipe):
    make_lora(tmp_path / "a", seed=1)
    make_lora(tmp_path / "b", ALL_ATTN, seed=2)
    base = run(pipe)
    ha, hb = apply_adapters(pipe, [tmp_path / "a", tmp_path / "b"])
    both = run(pipe)
    ha.remove()
    only_b = run(pipe)
    hb.remove()
    assert torch.equal(run(pipe), base)
    hb, ha = apply_adapters(pipe, [tmp_path / "b", tmp_path / "a"])
    assert (run(pipe) - both).abs().max() <= 1e-5  # same sum of deltas, other order (float order)
    ha.remove()
    assert (run(pipe) - only_b).abs().max() <= 1e-5
    hb.remove()
    assert torch.equal(run(pipe), base)


def test_failed_stack_leaves_the_pipeline_as_it_was(tmp_path, pipe):
    make_lora(tmp_path / "a")
    (tmp_path / "junk.txt").write_text("x")
    base = run(pipe)
    with pytest.raises(UsageError, match="not a trained adapter"):
        apply_adapters(pipe, [tmp_path / "a", tmp_path / "junk.txt"])
    assert torch.equal(run(pipe), base)
    assert not any(pipe.get_list_adapters().values())
