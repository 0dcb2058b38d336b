"""The shared loop equals diffusers' pipelines, and its hooks act where they claim to."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from common.pipelines.loop import Hook, sample
from common.pipelines.prompts import encode_prompt
from common.pipelines.text2image import generate, prepare
from common.pipelines.tweedie import from_x0, to_eps, to_x0

PROMPT, NEG = "a photo of a dog", "blurry"


def _diffusers(pipe, name, **kw):
    extra = {"clean_caption": False} if name == "tiny-if" else {}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", **kw, **extra).images


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-if"])
def test_loop_equals_diffusers_pipeline(load_tiny, name):
    pipe = load_tiny(name)
    kw = dict(num_inference_steps=4, guidance_scale=5.0)
    if name == "tiny-flux":
        kw["max_sequence_length"] = 77
    else:
        kw["negative_prompt"] = NEG
    ref = _diffusers(pipe, name, **kw)
    neg = kw.pop("negative_prompt", None)
    ours = generate(pipe, PROMPT, neg, generator=torch.Generator().manual_seed(7), output_type="np",
                    progress=False, **kw)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5


def test_loop_equals_diffusers_with_euler_and_eta_ddim(load_tiny):
    pipe = load_tiny("tiny-sd")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref = _diffusers(pipe, "tiny-sd", num_inference_steps=3, negative_prompt=NEG)
    ours = generate(pipe, PROMPT, NEG, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                    output_type="np", progress=False)
    assert np.abs(ours - ref).max() <= 1e-5
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = _diffusers(pipe, "tiny-sd", num_inference_steps=3, eta=1.0)
    ours = generate(pipe, PROMPT, num_inference_steps=3, eta=1.0, generator=torch.Generator().manual_seed(7),
                    output_type="np", progress=False)
    assert np.abs(ours - ref).max() <= 1e-5


def test_controlnet_denoiser_equals_diffusers(load_tiny, tiny_folders):
    from diffusers import StableDiffusionControlNetPipeline

    from common.models.loading import load_controlnet, load_pipeline
    from common.pipelines.denoisers import ControlSpec

    net = load_controlnet(tiny_folders["tiny-controlnet"])
    pipe = load_pipeline(tiny_folders["tiny-sd"], StableDiffusionControlNetPipeline, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref = pipe(PROMPT, image=hint, num_inference_steps=4, generator=torch.Generator().manual_seed(7),
               controlnet_conditioning_scale=0.8, control_guidance_end=0.5, output_type="np").images
    control = ControlSpec(net, hint, scale=0.8, guidance_end=0.5)
    ours = generate(pipe, PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(7), control=control,
                    output_type="np", progress=False)
    assert np.abs(ours - ref).max() <= 1e-5


class Recorder(Hook):
    def __init__(self):
        self.x0, self.seen = [], []

    def on_x0(self, state):
        self.x0.append(state.x0.clone())

    def on_step_end(self, state):
        self.seen.append(int(state.t))


class ReplaceX0(Hook):
    """Replaces x0|t by an equal copy: forces the x0 -> model-output path without changing anything."""

    def on_x0(self, state):
        state.x0 = state.x0.clone()


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux", "tiny-if"])
def test_identity_x0_replacement_changes_nothing(load_tiny, name):
    pipe = load_tiny(name)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np", progress=False)
    plain = generate(pipe, PROMPT, generator=torch.Generator().manual_seed(2), **kw)
    hooked = generate(pipe, PROMPT, generator=torch.Generator().manual_seed(2), hooks=(ReplaceX0(),), **kw)
    assert np.abs(plain - hooked).max() <= 1e-5


def test_hook_sees_the_schedulers_own_tweedie_estimate(load_tiny):
    pipe = load_tiny("tiny-sd")
    setup = prepare(pipe, PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    x = setup.x_T
    sample(setup.denoiser, pipe.scheduler, x, setup.timesteps, hooks=(rec,), progress=False)
    # Re-run step by step with the scheduler's pred_original_sample
    pipe.scheduler.set_timesteps(3)
    for i, t in enumerate(pipe.scheduler.timesteps):
        out = setup.denoiser(x, t, i)
        res = pipe.scheduler.step(out, t, x)
        assert torch.allclose(res.pred_original_sample, rec.x0[i], atol=1e-5)
        x = res.prev_sample
    assert rec.seen == [int(t) for t in pipe.scheduler.timesteps]


def test_replacing_x0_by_a_constant_steers_ddim_to_it(load_tiny):
    """DDIM(eta=0, final alpha 1) with x0|t forced to a target at every step ends exactly at that target."""
    pipe = load_tiny("tiny-sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    setup = prepare(pipe, PROMPT, num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    target = torch.full_like(setup.x_T, 0.3)

    class Force(Hook):
        def on_x0(self, state):
            state.x0 = target

    out = sample(setup.denoiser, pipe.scheduler, setup.x_T, setup.timesteps, hooks=(Force(),), progress=False)
    assert torch.allclose(out, target, atol=1e-4)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_tweedie_round_trip_per_parameterisation(kind):
    sched = DDPMScheduler(prediction_type=kind)
    x_t, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor(500)
    x0 = to_x0(sched, out, x_t, t, 0)
    assert torch.allclose(from_x0(sched, x0, x_t, t, 0, like=out), out, atol=1e-5)
    abar = sched.alphas_cumprod[500]
    eps = to_eps(sched, out, x_t, t, 0)
    assert torch.allclose(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, x_t, atol=1e-5)


def test_tweedie_keeps_learned_variance_channels():
    sched = DDPMScheduler(variance_type="learned_range")
    x_t, out = torch.randn(1, 3, 4, 4), torch.randn(1, 6, 4, 4)
    back = from_x0(sched, to_x0(sched, out, x_t, torch.tensor(10), 0), x_t, torch.tensor(10), 0, like=out)
    assert torch.allclose(back, out, atol=1e-4) and torch.equal(back[:, 3:], out[:, 3:])


def test_prompt_embeds_cfg_order_is_negative_then_positive(load_tiny):
    pipe = load_tiny("tiny-sdxl")
    emb = encode_prompt(pipe, PROMPT, NEG)
    both = emb.cfg()
    assert torch.equal(both.embeds[:1], emb.negative) and torch.equal(both.embeds[1:], emb.embeds)
    assert torch.equal(both.pooled[1:], emb.pooled)


def test_if_stage_two_equals_diffusers(load_tiny):
    pipe = load_tiny("tiny-if-sr")
    low = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(image=low, num_inference_steps=3, guidance_scale=4.0, noise_level=50)
    ref = pipe(PROMPT, negative_prompt=NEG, generator=torch.Generator().manual_seed(1), output_type="pt",
               clean_caption=False, **kw).images
    ours = generate(pipe, PROMPT, NEG, generator=torch.Generator().manual_seed(1), progress=False, **kw)
    assert ours.shape == (1, 3, 64, 64)
    assert (ours - ref).abs().max() <= 1e-5


def test_partial_schedule_uses_the_right_sigmas_for_flow_matching(load_tiny):
    """Starting part-way (SDEdit) with a flow-matching scheduler: x0|t must use the sigma of that timestep."""
    pipe = load_tiny("tiny-flux")
    setup = prepare(pipe, PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                    max_sequence_length=77)
    start = 3
    rec = Recorder()
    sample(setup.denoiser, pipe.scheduler, setup.x_T, setup.timesteps[start:], hooks=(rec,), progress=False)
    sigma = pipe.scheduler.sigmas[start]
    out = setup.denoiser(setup.x_T, setup.timesteps[start], 0)
    assert torch.allclose(rec.x0[0], setup.x_T - sigma * out, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_euler_hooks_see_the_schedulers_x0_and_identity_replacement_is_exact(load_tiny, kind):
    """k-diffusion schedulers keep x0 + sigma eps: x0|t must be the scheduler's own pred_original_sample."""
    pipe = load_tiny("tiny-sd")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type=kind)
    setup = prepare(pipe, PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    sample(setup.denoiser, pipe.scheduler, setup.x_T, setup.timesteps, hooks=(rec,), progress=False)
    pipe.scheduler.set_timesteps(3)
    x = setup.x_T
    for i, t in enumerate(pipe.scheduler.timesteps):
        res = pipe.scheduler.step(setup.denoiser(x, t, i), t, x)
        assert torch.allclose(res.pred_original_sample, rec.x0[i], atol=1e-4), i
        x = res.prev_sample
    plain = generate(pipe, PROMPT, generator=torch.Generator().manual_seed(2), num_inference_steps=3,
                     output_type="np", progress=False)
    hooked = generate(pipe, PROMPT, generator=torch.Generator().manual_seed(2), num_inference_steps=3,
                      output_type="np", progress=False, hooks=(ReplaceX0(),))
    assert np.abs(plain - hooked).max() <= 1e-5


def test_sdxl_controlnet_guess_mode_equals_diffusers():
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from common.models.tiny import build_tiny
    from common.pipelines.denoisers import ControlSpec

    base = build_tiny("tiny-sdxl")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref = pipe(PROMPT, image=hint, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
               guess_mode=True, output_type="np").images
    ours = generate(pipe, PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                    control=ControlSpec(net, hint, guess_mode=True), output_type="np", progress=False)
    assert np.abs(ours - ref).max() <= 1e-5


def test_default_guidance_follows_the_pipeline(load_tiny):
    from common.pipelines.text2image import default_guidance_scale

    assert default_guidance_scale(load_tiny("tiny-flux")) == 3.5
    assert default_guidance_scale(load_tiny("tiny-sdxl")) == 5.0
    assert default_guidance_scale(load_tiny("tiny-sd")) == 7.5


def test_fp16_vae_encodes_in_fp32_when_marked_force_upcast():
    from common.models.tiny import build_tiny
    from common.pipelines.latents import encode_images

    vae = build_tiny("tiny-sd").vae.to(torch.float16)
    assert vae.config.force_upcast
    seen = []
    handle = vae.encoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    latents = encode_images(vae, torch.rand(1, 3, 64, 64) * 2 - 1, sample=False)
    handle.remove()
    assert seen == [torch.float32] and vae.dtype == torch.float16 and latents.dtype == torch.float16
