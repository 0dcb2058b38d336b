"""The shared loop against a re-implementation of the original's (base_model.compute_prev_state,
one_step_process cases 0-6, wide_image_model's loop, mapper and final read-out), on a tiny float64 UNet.

Each test fails on the behaviour we had before the audit: DDIM steps in (eps) form instead of the original's
(xt_coeff, x0_coeff), DDPM std from the config's variance type instead of fixed_small_log, DDPM thresholding
switched off with --x0_thresholding off, DDPM's previous timestep, mvd_end / ref_attention_end tested with >=,
the wide image's noise drawn windows-first, and its final views decoded from X_0 without f(g(.)) or per-view clamp.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

sys.path.insert(0, str(Path(__file__).parent))
from st_helpers import eps_model, tiny_unet  # noqa: E402

from common.pipelines.loop import StepState  # noqa: E402
from synctweedies.apps.view_sampling import StrictReferenceSchedule, ring_plan  # noqa: E402
from synctweedies.apps.wide_image import average_rgb_views, final_latent_views, initial_noise  # noqa: E402
from synctweedies.sampler import ALWAYS_SYNC, SyncOptions, sync_sample  # noqa: E402
from synctweedies.steps import SyncStepper  # noqa: E402
from synctweedies.wide import WindowProjection  # noqa: E402


# ---------------------------------------------------------------- the original's formulas, written out again
def orig_prev_state(sched, method, xts, x0s, t, eps, eta=0.0, generator=None):
    """base_model.compute_prev_state."""
    t = int(t)
    c = xts.shape[1]
    predicted = None
    if eps is not None and eps.shape[1] == 2 * c and sched.config.variance_type in ("learned", "learned_range"):
        eps, predicted = torch.split(eps, c, dim=1)
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    if method == "ddpm":
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_a = a_t / a_prev
        cur_b = 1 - cur_a
        if sched.config.thresholding:
            x0s = sched._threshold_sample(x0s)
        elif sched.config.clip_sample:
            x0s = x0s.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
        mean = (a_prev ** 0.5 * cur_b) / b_t * x0s + (cur_a ** 0.5 * b_prev / b_t) * xts
        var = 0
        if t > 0:
            noise = randn_tensor(mean.shape, generator=generator, device=xts.device, dtype=xts.dtype)
            if predicted is None:
                var = orig_get_variance(sched, t, None, "fixed_small_log") * noise
            elif sched.variance_type == "learned_range":
                var = torch.exp(0.5 * orig_get_variance(sched, t, predicted, "learned_range")) * noise
            else:
                var = orig_get_variance(sched, t, predicted, sched.variance_type) ** 0.5 * noise
        return mean + var
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    xt_coeff = torch.sqrt(1 - a_prev - std ** 2) / torch.sqrt(1 - a_t)
    x0_coeff = torch.sqrt(a_prev) - torch.sqrt(a_t) / torch.sqrt(1 - a_t) * torch.sqrt(1 - a_prev - std ** 2)
    return xt_coeff * xts + x0_coeff * x0s


def orig_get_variance(sched, t, predicted, variance_type):
    """DDPMScheduler._get_variance of diffusers 0.19.3 (the original's pin): previous timestep t - T/S."""
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
    cur_b = 1 - a_t / a_prev
    variance = torch.clamp((1 - a_prev) / (1 - a_t) * cur_b, min=1e-20)
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(variance))
    if variance_type == "learned":
        return predicted
    frac = (predicted + 1) / 2
    return frac * torch.log(cur_b) + (1 - frac) * torch.log(variance)


def orig_views(h, w, window, stride):
    """wide_image_model.get_views."""
    nh, nw = (h - window) // stride + 1, (w - window) // stride + 1
    return [((i // nw) * stride, (i // nw) * stride + window, (i % nw) * stride, (i % nw) * stride + window)
            for i in range(nh * nw)]


def orig_forward(views, z):
    return torch.cat([z[:, :, a:b, c:d] for a, b, c, d in views])


def orig_inverse(views, xs, shape):
    value, count = torch.zeros(shape, dtype=xs.dtype), torch.zeros(shape, dtype=xs.dtype)
    for i, (a, b, c, d) in enumerate(views):
        value[:, :, a:b, c:d] += xs[i:i + 1]
        count[:, :, a:b, c:d] += 1
    return torch.where(count > 0, value / count, value)


def orig_wide_loop(unet, sched, method, case, views, z_T, x_T, mvd_end, init_from_z, generator=None):
    """wide_image_model.__call__ + one_step_process (cases 0-6); returns what it decodes at the end."""
    f = lambda z: orig_forward(views, z)  # noqa: E731
    g = lambda x: orig_inverse(views, x, z_T.shape)  # noqa: E731
    alphas, sigmas = sched.alphas_cumprod ** 0.5, (1 - sched.alphas_cumprod) ** 0.5
    T = sched.config.num_train_timesteps
    canonical = case in (4, 5, 6)
    zts, xts = z_T, (f(z_T) if init_from_z and not canonical else x_T)
    step = lambda x, x0, t, e: orig_prev_state(sched, method, x, x0, t, e, generator=generator)  # noqa: E731
    tw = lambda x, e, t: (x - sigmas[int(t)] * e[:, :x.shape[1]]) / alphas[int(t)]  # noqa: E731
    for t in sched.timesteps:
        if t > (1 - mvd_end) * T:
            if canonical:
                xts = f(zts)
            eps = unet(xts, t).sample
            if case == 0:
                x_prev = step(xts, tw(xts, eps, t), t, eps)
            elif case == 1:
                eps = f(g(eps))
                x_prev = step(xts, tw(xts, eps, t), t, eps)
            elif case == 2:
                x0 = f(g(tw(xts, eps, t)))
                x_prev = step(xts, x0, t, eps)
            elif case == 3:
                x_prev = f(g(step(xts, tw(xts, eps, t), t, eps)))
            elif case == 4:
                delta = g(eps)
                z_prev = step(zts, tw(zts, delta, t), t, delta)
            elif case == 5:
                delta = g(eps)
                z_prev = step(zts, g(tw(xts, eps, t)), t, delta)
            else:
                z_prev = g(step(xts, tw(xts, eps, t), t, eps))
            if canonical:
                zts, xts = z_prev, f(z_prev)
            else:
                xts, zts = x_prev, g(x_prev)
        else:
            eps = unet(xts, t).sample
            xts = step(xts, tw(xts, eps, t), t, eps)
            zts = g(xts)
            canonical = False  # from here the canonical cases read out g(x_t_1) as well
    return f(zts) if canonical else f(g(xts))


# ---------------------------------------------------------------- steps
def _ddim(steps=5, **kw):
    s = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw)
    s.set_timesteps(steps)
    return s


def test_ddim_step_is_the_originals_formula_bit_for_bit():
    sched = _ddim(10)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        for t in sched.timesteps:
            x, x0 = (torch.randn(2, 3, 8, 8, generator=g, dtype=dtype) for _ in range(2))
            ours = SyncStepper(sched, "ddim").step_x0(x, x0, t)
            assert torch.equal(ours, orig_prev_state(sched, "ddim", x, x0, t, None))


@pytest.mark.parametrize("variance_type,thresholding", [("fixed_small", False), ("fixed_large", False),
                                                        ("learned_range", True), ("learned", False)])
def test_ddpm_step_is_the_originals_formula(variance_type, thresholding):
    """fixed_small_log whenever no variance channels (also for fixed_large), the original's learned branches,
    the config's thresholding in DDPM steps even with threshold=False (--x0_thresholding off), prev t = t - T/S."""
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, clip_sample=False,
                          thresholding=thresholding, sample_max_value=0.5, timestep_spacing="trailing")
    sched.set_timesteps(7)  # trailing spacing: the schedule's steps are uneven, the original still steps T/S
    learned = variance_type.startswith("learned")
    for threshold in (True, False):
        stepper = SyncStepper(sched, "ddpm", threshold=threshold)
        for t in sched.timesteps:
            gen = torch.Generator().manual_seed(int(t))
            x, x0 = (torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=gen) for _ in range(2))
            var = torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=gen) * (2 if learned else 0) - (
                1 if variance_type == "learned_range" else 0) + (0.01 if variance_type == "learned" else 0)
            eps = torch.cat([torch.zeros_like(x), var], 1) if learned else None
            ours = stepper.step_x0(x, x0, t, variance=var if learned else None,
                                   generator=torch.Generator().manual_seed(1))
            ref = orig_prev_state(sched, "ddpm", x, x0, t, eps, generator=torch.Generator().manual_seed(1))
            assert torch.allclose(ours, ref, atol=1e-12, rtol=0), (variance_type, int(t))


def test_ddim_never_thresholds_with_threshold_off_but_ddpm_does():
    sched = DDIMScheduler(num_train_timesteps=1000, thresholding=True, sample_max_value=0.5)
    big = torch.full((1, 3, 4, 4), 3.0)
    assert torch.equal(SyncStepper(sched, "ddim", threshold=False).clip_x0(big), big)
    assert SyncStepper(sched, "ddpm", threshold=False).clip_x0(big).abs().max() <= 1.0


# ---------------------------------------------------------------- mvd_end / ref_attention_end
def test_mvd_end_is_strict_and_ambiguous_images_sync_every_step():
    unet = tiny_unet()
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(4)  # 750, 500, 250, 0
    proj = WindowProjection(16, 24, 16, 4)
    x_T = torch.randn(proj.num_instances, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    run = lambda m: sync_sample(eps_model(unet), sched, proj, options=SyncOptions(2, m), x_T=x_T,  # noqa: E731
                                progress=False).synced_steps
    assert run(0.5) == [0]  # t = 500 is not > 500
    assert run(1.0) == [0, 1, 2]  # t = 0 is not > 0
    assert run(ALWAYS_SYNC) == [0, 1, 2, 3]


def test_reference_attention_is_strict():
    plan = ring_plan(3, 8)
    sched = StrictReferenceSchedule(plan, 0.2, 1000)
    for t, on in [(801, True), (800, False)]:
        sched.on_input(StepState(0, torch.tensor(t), 1, torch.zeros(1)))
        assert plan.reference_enabled is on


# ---------------------------------------------------------------- the wide image loop and read-out
@pytest.mark.parametrize("case,method,init", [(2, "ddim", True), (2, "ddim", False), (1, "ddim", False),
                                              (3, "ddim", False), (4, "ddim", False), (5, "ddim", False),
                                              (6, "ddim", False), (2, "ddpm", False), (5, "ddpm", True)])
def test_wide_loop_matches_the_original(case, method, init):
    unet = tiny_unet()
    sched = (DDPMScheduler if method == "ddpm" else DDIMScheduler)(num_train_timesteps=1000, clip_sample=False,
                                                                   steps_offset=1)
    sched.set_timesteps(4)
    h, w, window, stride = 16, 24, 16, 4
    proj, views = WindowProjection(h, w, window, stride), orig_views(h, w, window, stride)
    assert [(a, c) for a, _, c, _ in views] == proj.offsets
    gen = torch.Generator().manual_seed(3)
    z_T = torch.randn(1, 3, h, w, dtype=torch.float64, generator=gen)
    x_T = torch.randn(len(views), 3, window, window, dtype=torch.float64, generator=gen)
    mvd_end = 0.6  # the last steps run unsynchronised (the original's else branch)
    ref = orig_wide_loop(unet, sched, method, case, views, z_T, x_T, mvd_end, init,
                         generator=torch.Generator().manual_seed(9))
    res = sync_sample(eps_model(unet), sched, proj, x_T=x_T, z_T=z_T, progress=False,
                      options=SyncOptions(case, mvd_end, init, method,
                                          step_generator=torch.Generator().manual_seed(9)))
    assert torch.allclose(final_latent_views(proj, res), ref, atol=1e-9, rtol=0)


def test_wide_noise_is_drawn_canvas_first_then_windows():
    proj = WindowProjection(8, 16, 8, 4)
    pipe = types.SimpleNamespace(vae_scale_factor=8, scheduler=types.SimpleNamespace(init_noise_sigma=1.0),
                                 unet=types.SimpleNamespace(config=types.SimpleNamespace(in_channels=4)),
                                 _execution_device=torch.device("cpu"))
    pipe.prepare_latents = types.MethodType(StableDiffusionPipeline.prepare_latents, pipe)
    z_T, x_T = initial_noise(pipe, proj, 8, torch.Generator().manual_seed(5), torch.float32)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(z_T, torch.randn(1, 4, 8, 16, generator=g))
    assert torch.equal(x_T, torch.randn(proj.num_instances, 4, 8, 8, generator=g))


def test_wide_views_are_clamped_before_the_rgb_average():
    proj = WindowProjection(2, 3, 2, 1).scaled(8)
    views = torch.stack([torch.full((3, 16, 16), 3.0), torch.full((3, 16, 16), -0.5)])
    image = average_rgb_views(proj, views)
    assert torch.allclose(image[..., 8:16], torch.tensor(0.25))  # (clamp(3) + -0.5) / 2, not clamp(1.25)


# ---------------------------------------------------------------- ambiguous images: noise order and CFG
def _if_pipe(channels=3, size=8):
    from diffusers import IFPipeline

    pipe = types.SimpleNamespace(scheduler=types.SimpleNamespace(init_noise_sigma=1.0), _execution_device="cpu",
                                 unet=types.SimpleNamespace(config=types.SimpleNamespace(
                                     in_channels=channels, sample_size=size), dtype=torch.float32))
    pipe.prepare_intermediate_images = types.MethodType(IFPipeline.prepare_intermediate_images, pipe)
    return pipe


def _amb_args(**kw):
    import argparse

    base = dict(case_num=2, initialize_xt_from_zt=False, initialize_same_xt=False, optimize_inverse_mapping=False,
                num_of_zs=3, iterations=1, lr=0.1, inverse_warm_start="noise", inverse_lr_schedule="constant",
                stack_noise_scale="one")
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw", [dict(case_num=5), dict(initialize_xt_from_zt=True), dict(),
                                dict(initialize_same_xt=True), dict(optimize_inverse_mapping=True, case_num=4)])
def test_ambiguous_noise_is_drawn_as_the_original(kw):
    """Canonical cases / init from z_T draw z_T only ([K, 3, s, s] n-to-1), the others N views (one, repeated,
    with --initialize_same_xt); n-to-1 then draws the latent, 6-channel eps and Tweedie warm starts."""
    from synctweedies.apps.ambiguous_image import initial_noise, make_projection
    from synctweedies.views import get_views

    args, views = _amb_args(**kw), get_views(["identity", "rotate_cw"])
    proj = make_projection(args, views, 8, torch.Generator().manual_seed(4))
    z_T, x_T = initial_noise(_if_pipe(), proj, args, proj.generator if args.optimize_inverse_mapping else
                             torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    k = args.num_of_zs if args.optimize_inverse_mapping else 1
    if kw.get("case_num", 2) in (4, 5) or args.initialize_xt_from_zt:
        assert torch.equal(z_T, torch.randn(k, 3, 8, 8, generator=g)) and torch.equal(x_T, proj.forward(z_T))
    else:
        first = torch.randn(1 if args.initialize_same_xt else 2, 3, 8, 8, generator=g)
        assert z_T is None and torch.equal(x_T, first.expand(2, -1, -1, -1))
    if args.optimize_inverse_mapping:
        for key in [("latent", 3), ("eps", 6), ("tweedie", 3)]:
            assert torch.equal(proj.warm[key], torch.randn(k, key[1], 8, 8, generator=g))
        assert torch.equal(proj.warm[("eps", 3)], proj.warm[("eps", 6)][:, :3])


def test_ambiguous_cfg_guides_the_variance_channels_too(tmp_path, monkeypatch):
    """The original's compute_noise_preds guides all 2C channels of IF's output (eps and variance)."""
    import synctweedies.apps.ambiguous_image as amb
    from synctweedies.main import main

    seen = []
    real = amb.sync_sample

    def spy(denoiser, *a, **k):
        seen.append(denoiser)
        return real(denoiser, *a, **k)

    monkeypatch.setattr(amb, "sync_sample", spy)
    main(["--app", "ambiguous_image", "--model", "tiny-if", "--tag", "a", "--save_top_dir", str(tmp_path),
          "--num_inference_steps", "1", "--views_names", "identity", "rotate_cw", "--no_progress", "--log_step", "0",
          "--skip_stage_2"])
    d = seen[0]
    s = d.unet.config.sample_size
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        out = d.unet(torch.cat([x, x]), t, encoder_hidden_states=d.encoder_hidden_states, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        assert out.shape[1] == 6
        assert torch.allclose(d(x, t), uncond + d.guidance_scale * (cond - uncond), atol=1e-6)


@pytest.mark.parametrize("method,cls", [("ddim", DDIMScheduler), ("ddpm", DDPMScheduler)])
def test_ambiguous_stages_share_one_scheduler_of_the_sampling_method(method, cls):
    import argparse

    from synctweedies.apps.ambiguous_image import load_stages

    args = argparse.Namespace(model="tiny-if", adapters=[], skip_stage_2=False, sampling_method=method)
    one, two = load_stages(args, "cpu", torch.float32)
    assert type(one.scheduler) is cls and two.scheduler is one.scheduler
