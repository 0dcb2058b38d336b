"""The Conditioning object: CFG batching once, per-family builders, image embeds on diffusers' UNet path,
attention state reaching processors per call (never stored on them)."""
from __future__ import annotations

import pytest
import torch

from common.attention.plan import AttentionPlan, FluxPlanAttnProcessor, PlanAttnProcessor, install_plan
from common.pipelines.conditioning import (FAMILY_BUILDERS, Conditioning, build_conditioning,
                                           split_image_embeds)
from common.pipelines.denoisers import FluxDenoiser, UNetDenoiser
from common.pipelines.prompts import PromptEmbeds, encode_prompt
from common.pipelines.text2image import prepare

PROMPT, NEG = "a photo of a dog", "blurry"


def test_cfg_batches_every_field_negative_first_and_image_negatives_default_to_zeros():
    e, n = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    img = [torch.randn(2, 3, 8), torch.randn(2, 1, 4, 8)]
    cond = Conditioning("sdxl", e, n, torch.randn(2, 6), torch.randn(2, 6), time_ids=torch.randn(2, 6),
                        image_embeds=img, negative_image_embeds=[torch.ones(2, 3, 8), None])
    both = cond.cfg()
    assert torch.equal(both.embeds, torch.cat([n, e])) and both.negative is None
    assert torch.equal(both.pooled, torch.cat([cond.negative_pooled, cond.pooled]))
    assert torch.equal(both.time_ids, torch.cat([cond.time_ids, cond.time_ids]))
    assert torch.equal(both.image_embeds[0], torch.cat([torch.ones(2, 3, 8), img[0]]))
    assert torch.equal(both.image_embeds[1], torch.cat([torch.zeros_like(img[1]), img[1]]))
    added = both.added_cond_kwargs()
    assert set(added) == {"text_embeds", "time_ids", "image_embeds"} and added["image_embeds"] is both.image_embeds
    pos = cond.positive()
    assert pos.cfg() is pos and pos.negative_image_embeds is None and pos.image_embeds is img
    moved = cond.to(dtype=torch.float64)
    assert moved.image_embeds[0].dtype == torch.float64 and moved.family == "sdxl"


def test_prompt_embeds_is_the_conditioning_and_builders_are_registered():
    assert PromptEmbeds is Conditioning
    assert {"sd", "sdxl", "flux", "if", "if-sr"} <= set(FAMILY_BUILDERS)
    with pytest.raises(ValueError, match="unknown family"):
        build_conditioning(object(), PROMPT, family="nope")


def test_split_image_embeds_matches_diffusers_layout():
    neg, pos = torch.zeros(1, 4, 8), torch.randn(1, 4, 8)
    p, n = split_image_embeds([torch.cat([neg, pos])], batch=3, do_cfg=True)
    assert torch.equal(p[0], pos.expand(3, -1, -1)) and torch.equal(n[0], neg.expand(3, -1, -1))
    p, n = split_image_embeds([pos], batch=2, do_cfg=False)
    assert n is None and p[0].shape == (2, 4, 8)


def test_sdxl_builder_adds_time_ids_like_diffusers(load_tiny):
    pipe = load_tiny("tiny-sdxl")
    cond = build_conditioning(pipe, PROMPT, NEG, height=64, width=48)
    ref = pipe._get_add_time_ids((64, 48), (0, 0), (64, 48), dtype=cond.embeds.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond.time_ids, ref) and torch.equal(cond.negative_time_ids, ref)
    plain = encode_prompt(pipe, PROMPT, NEG)
    assert torch.equal(plain.embeds, cond.embeds) and plain.time_ids is None


def test_unet_gets_image_embeds_as_added_cond_kwargs(load_tiny):
    """prepare(ip_adapter_image_embeds=...) in diffusers' layout reaches the UNet as
    added_cond_kwargs["image_embeds"] = [negative; positive] rows, repeated per image like diffusers."""
    pipe = load_tiny("tiny-sdxl")
    neg, pos = torch.zeros(1, 4, 32), torch.randn(1, 4, 32)
    setup = prepare(pipe, PROMPT, NEG, num_inference_steps=2, num_images_per_prompt=2,
                    ip_adapter_image_embeds=[torch.cat([neg, pos])], generator=torch.Generator().manual_seed(0))
    seen = {}
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw["added_cond_kwargs"]),
                                               with_kwargs=True)
    setup.denoiser(setup.x_T, setup.timesteps[0], 0)
    hook.remove()
    assert torch.equal(seen["image_embeds"][0], torch.cat([neg, neg, pos, pos]))
    assert seen["time_ids"].shape == (4, 6) and seen["text_embeds"].shape[0] == 4


class _Recording(PlanAttnProcessor):
    def __init__(self, log, name):
        super().__init__(name)
        self.log = log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 plan=None, kv_bank=None, *args, **kwargs):
        self.log.append(plan)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, plan, kv_bank)


def test_attention_state_reaches_processors_per_call(load_tiny):
    from common.attention.processors import set_processors

    pipe = load_tiny("tiny-sd")
    plan = AttentionPlan(num_images=1)
    setup = prepare(pipe, PROMPT, NEG, num_inference_steps=2, attention={"plan": plan},
                    generator=torch.Generator().manual_seed(0))
    log: list = []
    handle = set_processors(pipe.unet, lambda name, m: _Recording(log, name), where="attn1")
    setup.denoiser(setup.x_T, setup.timesteps[0], 0)
    assert log and all(p is plan for p in log)
    assert all(proc.default_plan is None for proc in handle.installed.values())
    log.clear()
    override = AttentionPlan(num_images=2)
    UNetDenoiser(pipe.unet, pipe.scheduler, setup.prompts, 5.0,
                 cross_attention_kwargs={"plan": override})(setup.x_T, setup.timesteps[0], 0)
    assert all(p is override for p in log)
    handle.restore()


def test_flux_denoiser_passes_attention_and_fills_text_len(load_tiny):
    pipe = load_tiny("tiny-flux")
    plan, neg_plan = AttentionPlan(num_images=1), AttentionPlan(num_images=1)
    setup = prepare(pipe, PROMPT, NEG, num_inference_steps=2, true_cfg_scale=2.0, max_sequence_length=16,
                    attention={"plan": plan}, generator=torch.Generator().manual_seed(0))
    setup.prompts.negative_attention = {"plan": neg_plan}
    seen = []

    class Spy(FluxPlanAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, plan=None, kv_bank=None):
            seen.append(plan)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    plan, kv_bank)

    from common.attention.processors import set_processors

    with set_processors(pipe.transformer, lambda n, m: Spy(n), where="all"):
        assert isinstance(setup.denoiser, FluxDenoiser)
        setup.denoiser(setup.x_T, setup.timesteps[0], 0)
    assert seen[:2] == [plan, plan] and seen[2:] == [neg_plan, neg_plan]
    assert plan.text_len == setup.prompts.embeds.shape[1] == 16


def test_flux_denoiser_with_a_trivial_plan_installed_equals_plain(load_tiny):
    pipe = load_tiny("tiny-flux")
    kw = dict(num_inference_steps=2, max_sequence_length=16)
    plain = prepare(pipe, PROMPT, generator=torch.Generator().manual_seed(1), **kw)
    out = plain.denoiser(plain.x_T, plain.timesteps[0], 0)
    planned = prepare(pipe, PROMPT, attention={"plan": AttentionPlan()}, generator=torch.Generator().manual_seed(1),
                      **kw)
    with install_plan(pipe.transformer):
        assert torch.equal(planned.denoiser(planned.x_T, planned.timesteps[0], 0), out)
