"""Mean-shifted initialisation (spec §5 tests 16-17)."""
from __future__ import annotations

import random

import numpy as np
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from common.pipelines.loop import StepState
from mudi.init import MeanShiftInit, init_collage, latent_masks, mean_shift_latent

from mudi_helpers import COLOURS, solid


def _ddim():
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading")
    s.set_timesteps(10)
    return s


def test_mean_shift_statistics():
    """(16) over 2000 draws: mean = sqrt(alphabar_T) * gamma * z_seg inside subject cells, 0 outside; std 1."""
    sched = _ddim()
    t = sched.timesteps[0]
    gen = torch.Generator().manual_seed(0)
    z_seg = torch.randn(1, 4, 8, 8, generator=gen)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:4] = 1
    gamma = 3.0
    hook = MeanShiftInit(gamma * z_seg * mask, sched)
    draws = []
    for _ in range(2000):
        state = StepState(i=0, t=t, num_steps=10, x_t=torch.randn(1, 4, 8, 8, generator=gen))
        hook.on_input(state)
        draws.append(state.x_t)
    x = torch.cat(draws)
    coef = sched.alphas_cumprod[t].sqrt()
    inside = mask.bool().expand(1, 4, 8, 8)[0]
    mean = x.mean(0)
    assert (mean[inside] - coef * gamma * z_seg[0][inside]).abs().max() < 0.1
    assert mean[~inside].abs().max() < 0.1
    assert abs(x.std(0).mean() - 1) < 0.02
    # only the first step is shifted, and gamma 0 leaves x_T untouched
    later = StepState(i=1, t=sched.timesteps[1], num_steps=10, x_t=torch.zeros(1, 4, 8, 8))
    hook.on_input(later)
    assert torch.equal(later.x_t, torch.zeros(1, 4, 8, 8))
    plain = torch.randn(1, 4, 8, 8)
    state = StepState(i=0, t=t, num_steps=10, x_t=plain.clone())
    MeanShiftInit(0 * z_seg, sched).on_input(state)
    assert torch.equal(state.x_t, plain)


def test_euler_signal_is_the_shift_itself():
    """Euler (SDXL's scheduler): add_noise(x0, 0) = x0, so the sigma-space latent mean is gamma * M z_seg."""
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    sched.set_timesteps(10)
    sched.set_begin_index(0)
    shift = torch.randn(1, 4, 8, 8)
    assert torch.allclose(MeanShiftInit(shift, sched).signal(sched.timesteps[0], torch.zeros(1, 4, 8, 8)), shift)


def test_collage_separates_subjects():
    """(17) subjects land in disjoint pixel regions and their latent masks do not overlap."""
    img = [solid(COLOURS["a"], 80, 60), solid(COLOURS["b"], 90, 50)]
    masks = [np.pad(np.full((60, 40), 255, np.uint8), ((10, 10), (10, 10))),
             np.pad(np.full((70, 30), 255, np.uint8), ((10, 10), (10, 10)))]
    for seed in range(20):
        out = init_collage(img, masks, 128, 256, rng=random.Random(seed))
        assert not (out.masks[0] & out.masks[1]).any()
        lat = latent_masks(np.stack(out.masks))
        assert lat.shape == (2, 16, 32) and lat[0].any() and lat[1].any()
        assert not (lat[0] & lat[1]).any()
        assert (out.image[~out.merged] == 255).all()


def test_mean_shift_latent_keeps_subject_cells_only(tiny_pipe):
    """The shift is gamma x the VAE latent of the collage on subject cells and exactly 0 elsewhere."""
    from common.pipelines.latents import encode_images

    pipe = tiny_pipe("tiny-sdxl")
    img = [solid(COLOURS["a"], 40, 30), solid(COLOURS["b"], 40, 30)]
    masks = [np.pad(np.full((30, 20), 255, np.uint8), 5)] * 2
    out = init_collage(img, masks, 64, 64, rng=random.Random(0))
    shift = mean_shift_latent(pipe.vae, out, 3.0, generator=torch.Generator().manual_seed(1))
    z = encode_images(pipe.vae, torch.from_numpy(out.image).permute(2, 0, 1)[None].float() / 127.5 - 1,
                      generator=torch.Generator().manual_seed(1))
    cells = latent_masks(out.merged)[None, None].expand_as(z)
    assert torch.allclose(shift[cells], 3.0 * z[cells]) and (shift[~cells] == 0).all()


def test_gamma_zero_equals_plain_sampling(tiny_pipe):
    """Through the shared loop: gamma 0 reproduces plain sampling exactly; gamma 3 changes the result."""
    from common.pipelines.text2image import generate

    pipe = tiny_pipe("tiny-sdxl")
    kw = dict(num_inference_steps=2, guidance_scale=5.0, progress=False)
    plain = generate(pipe, "a dog", generator=torch.Generator().manual_seed(0), **kw)
    shift = torch.randn(1, 4, 8, 8)
    zero = generate(pipe, "a dog", generator=torch.Generator().manual_seed(0),
                    hooks=(MeanShiftInit(0 * shift, pipe.scheduler),), **kw)
    shifted = generate(pipe, "a dog", generator=torch.Generator().manual_seed(0),
                       hooks=(MeanShiftInit(3 * shift, pipe.scheduler),), **kw)
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, shifted)
