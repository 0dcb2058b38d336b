"""Installing processors by layer pattern: the right layers, called, and restorable."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from common.attention.processors import matching_layers, processors_of, remove_processors, set_processors
from common.models.tiny import build_tiny


class Counting(AttnProcessor2_0):
    """Default attention that counts its calls (output unchanged)."""

    def __init__(self, log: list, name: str):
        super().__init__()
        self.log, self.name = log, name

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.log.append(self.name)
        return super().__call__(attn, hidden_states, *args, **kwargs)


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=ctx).sample


def test_pattern_selects_cross_attention_only():
    unet = build_tiny("tiny-sd").unet
    names = matching_layers(unet, "attn2")
    assert names and all(n.endswith("attn2") for n in names)
    assert set(matching_layers(unet, "all")) == set(names) | set(matching_layers(unet, "attn1"))
    assert matching_layers(unet, "up_blocks.*attn2") == [n for n in names if n.startswith("up_blocks")]
    assert matching_layers(unet, "re:^mid_block") == [n for n in matching_layers(unet, "all") if n.startswith("mid")]


def test_installed_processors_run_on_exactly_the_matched_layers_and_restore():
    unet = build_tiny("tiny-sd").unet
    before_procs = dict(unet.attn_processors)
    before = _unet_out(unet)
    log: list[str] = []
    handle = set_processors(unet, lambda name, module: Counting(log, name), where="attn2")
    out = _unet_out(unet)
    assert sorted(set(log)) == sorted(matching_layers(unet, "attn2"))
    assert torch.allclose(out, before, atol=1e-6)
    handle.restore()
    assert all(unet.attn_processors[k] is v for k, v in before_procs.items())
    log.clear()
    _unet_out(unet)
    assert log == []


def test_none_keeps_a_layer_and_context_manager_restores():
    unet = build_tiny("tiny-sd").unet
    first = matching_layers(unet, "attn2")[0]
    with set_processors(unet, lambda n, m: Counting([], n) if n == first else None) as handle:
        assert list(handle.installed) == [first]
        assert isinstance(processors_of(unet, "attn2")[first], Counting)
    assert not any(isinstance(p, Counting) for p in unet.attn_processors.values())


def test_flux_transformer_blocks_by_pattern():
    transformer = build_tiny("tiny-flux").transformer
    assert matching_layers(transformer, "joint") == ["transformer_blocks.0.attn"]
    assert matching_layers(transformer, "single") == ["single_transformer_blocks.0.attn"]
    seen = []
    handle = set_processors(transformer, lambda name, module: seen.append(name) or module.processor, where="single")
    assert seen == ["single_transformer_blocks.0.attn"]
    handle.restore()


def test_no_match_is_an_error_and_remove_resets_defaults():
    unet = build_tiny("tiny-sd").unet
    with pytest.raises(ValueError, match="no attention layer"):
        set_processors(unet, lambda n, m: Counting([], n), where="nothing.here")
    set_processors(unet, lambda n, m: Counting([], n), where="all")
    remove_processors(unet)
    assert not any(isinstance(p, Counting) for p in unet.attn_processors.values())


@pytest.mark.parametrize("name", ["tiny-if", "tiny-flux"])
def test_remove_restores_default_outputs_on_if_and_flux(name):
    pipe = build_tiny(name)
    model = getattr(pipe, "unet", None) or pipe.transformer
    kinds = {k: type(v) for k, v in model.attn_processors.items()}
    set_processors(model, lambda n, m: Counting([], n), where="all")
    remove_processors(model)
    assert {k: type(v) for k, v in model.attn_processors.items()} == kinds
