"""SynCD SDXL noise schedules as the original: sampling (`sample.py`) with Euler ancestral, every UNet input scaled
by `scale_model_input` and the references re-noised with fresh noise each step; training (`model.py`) noises with
DDPM on the model's betas rescaled to zero terminal SNR, whatever sampler the pipeline ships."""
from __future__ import annotations

import torch
from diffusers import EulerAncestralDiscreteScheduler

from common.models.tiny import build_tiny
from syncd.sdxl_pipeline import generate_sdxl


def test_euler_inputs_are_scaled_and_references_renoised_every_step():
    p = build_tiny("tiny-sdxl")
    p.set_progress_bar_config(disable=True)
    p.scheduler = sched = EulerAncestralDiscreteScheduler.from_config(p.scheduler.config)
    unet_inputs, scaled, noises = [], [], []
    forward, scale_model_input, add_noise = p.unet.forward, sched.scale_model_input, sched.add_noise

    def spy_forward(sample, t, *a, **k):
        unet_inputs.append(sample)
        return forward(sample, t, *a, **k)

    def spy_scale(x, t):
        out = scale_model_input(x, t)
        scaled.append((x, out))
        return out

    def spy_add_noise(x0, noise, t):
        noises.append(noise.clone())
        return add_noise(x0, noise, t)

    p.unet.forward, sched.scale_model_input, sched.add_noise = spy_forward, spy_scale, spy_add_noise
    refs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    generate_sdxl(p, "a toy", refs, num_inference_steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    assert len(unet_inputs) == 3 * 4 == len(scaled)  # per step: reference write, e_u, e_i, e_c
    for given, (raw, out) in zip(unet_inputs, scaled):
        assert given is out or torch.equal(given, out.to(given.dtype))  # every UNet input went through the scaling
        assert not torch.allclose(raw, out)  # and Euler's scaling is not the identity
    assert len(noises) == 3 and not torch.allclose(noises[0], noises[1])  # fresh reference noise every step


def test_training_noises_with_zero_terminal_snr_ddpm():
    from accelerate import Accelerator

    from syncd.train import SynCDMethod, build_parser, resolve_args

    args = resolve_args(build_parser().parse_args(["--model", "sdxl", "--pretrained_model_name_or_path", "tiny-sdxl",
                                                   "--train_data_dir", ".", "--output_dir", "unused"]))
    method = SynCDMethod(args, None)
    method.setup(Accelerator(cpu=True))
    sched = method.noise_scheduler
    assert type(sched).__name__ == "DDPMScheduler"
    assert float(sched.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR
    args.rescale_betas_zero_snr = False
    method = SynCDMethod(args, None)
    method.setup(Accelerator(cpu=True))
    assert float(method.noise_scheduler.alphas_cumprod[-1]) > 1e-4
